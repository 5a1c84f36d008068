"""Fault injection: SIGKILL the run worker of real runs, with the daemon running, and recover.

``dagster dev`` (webserver, daemon, code server; loopback, its own process group) runs the shipped
``dagster.yaml`` with short polling intervals. Each stage's asset is launched as a real run; at
points chosen with a fixed-seed RNG (printed), the run worker freezes (see
``operations/faults.py``) and the test kills it and its children with SIGKILL, as the
out-of-memory killer or a preempted node would. Then, with no manual step: run monitoring marks
the dead run failed, its pool slots are freed, the run retry finishes the asset, and the result
equals an uninterrupted run (for training resumed from a checkpoint: the same steps on the same
data, equal within float tolerance), and every output passes its checks.
``SYNTH_XRAY_FAULT_KILLS`` (default 1) sets the kills per stage where more than one fits.
"""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import psutil
import pytest
from conftest import TINY_CLASSIFIER, TINY_MODEL_OVERRIDES
from dagster._core.storage.dagster_run import DagsterRunStatus, RunsFilter
from servers import LAUNCH_RUN, stop_group

from synth_xray_assets.operations.faults import PLAN_ENV
from synth_xray_assets.operations.launcher import run_worker_record

REPO = Path(__file__).resolve().parents[1]
SEED = 13
KILLS = int(os.environ.get("SYNTH_XRAY_FAULT_KILLS", "1"))
TIMEOUT_S = 420  # one stage, its kills and retries included

OVERRIDES = json.loads(json.dumps(TINY_MODEL_OVERRIDES))
OVERRIDES["dreambooth"].update({"max_train_steps": 4, "checkpointing_steps": 2})
OVERRIDES["classifier"] = {
    **TINY_CLASSIFIER,
    "bootstrap_samples": 20,
    "seeds": [0],
    "experiments": {"baseline": [1.0, 0]},
}
N_DATASET_IMAGES = sum(a + b for a, b in OVERRIDES["phantoms"]["split_counts"].values())
N_SYNTHETIC = OVERRIDES["generation"]["images_per_class"]
N_REPORT_WRITES = 7  # four figures, results.csv, report.md, runs.json
IN_PROCESS = {"execution": {"config": {"in_process": {}}}}
FAST_INSTANCE = """
run_monitoring:
  enabled: true
  poll_interval_seconds: 1
  max_resume_run_attempts: 0
  free_slots_after_run_end_seconds: 1
"""


@dataclass
class Stage:
    name: str
    assets: list[str]
    partition: str | None = None
    kills: list[dict] = field(default_factory=list)  # fault plan entries, in order


def kill_plan(rng: random.Random) -> list[Stage]:
    """Where to kill, drawn with a fixed seed: ``hit`` counts within the process then running."""

    def writes(match: str, total: int, n: int) -> list[dict]:
        out, left = [], total
        for _ in range(n):
            hit = rng.randint(1, left)
            out.append({"point": "write", "match": match, "hit": hit})
            left -= hit - 1  # those before the kill were written; the frozen one was not
        return out

    return [
        Stage(
            "dataset standardization",
            ["chest_xray_dataset"],
            None,
            writes("/dataset/images/", N_DATASET_IMAGES, min(KILLS, 2)),
        ),
        Stage("base model and prior images", ["base_model", "prior_class_images"]),
        Stage(
            "DreamBooth checkpoint save, then training",
            ["dreambooth_checkpoint"],
            "normal",
            [
                {"point": "write", "match": "/.work-normal/checkpoint-", "hit": 1},
                # After checkpoint-2 of the retry, so that the next retry resumes from it.
                {"point": "dreambooth.step", "hit": rng.randint(3, 4)},
            ],
        ),
        Stage(
            "image generation",
            ["synthetic_images"],
            "normal",
            writes("/synthetic/normal/images/", N_SYNTHETIC, min(KILLS, 2)),
        ),
        Stage(
            "classifier training",
            ["classifier_experiment"],
            "baseline|0",
            [{"point": "classifier.epoch", "hit": rng.randint(1, 2)}]
            + (
                [{"point": "write", "match": "/classifier/baseline/", "hit": rng.randint(1, 3)}]
                if KILLS > 1
                else []
            ),
        ),
        Stage("report writing", ["study_report"], None, writes("/reports/", N_REPORT_WRITES, min(KILLS, 2))),
    ]


# --------------------------------------------------------------------------- dagster dev on loopback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DagsterDev:
    """``dagster dev`` in its own process group on 127.0.0.1; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, home: Path, env: dict[str, str], log: Path):
        self.port = _free_port()
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("dagster")), "dev", "-w", str(REPO / "workspace.yaml")]
            + ["-h", "127.0.0.1", "-p", str(self.port)],
            cwd=REPO,
            env={**env, "DAGSTER_HOME": str(home)},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/graphql",
            data=json.dumps({"query": query, "variables": variables or {}}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as response:
            return json.loads(response.read())

    def wait_ready(self, timeout: float = 240) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, "dagster dev exited"
            try:
                if self.graphql("{ version }").get("data"):
                    return
            except OSError:
                pass
            time.sleep(1)
        raise AssertionError("dagster dev did not answer")

    def stop(self) -> None:
        stop_group(self.proc, grace_s=30)
        self.log.close()


def partition_tags(partition: str | None) -> dict[str, str]:
    """The tags the UI puts on a run of one partition (per dimension for experiment x seed)."""
    if not partition:
        return {}
    tags = {"dagster/partition": partition}
    if "|" in partition:
        experiment, seed = partition.split("|")
        tags.update({"dagster/partition/experiment": experiment, "dagster/partition/seed": seed})
    return tags


def launch(dev: DagsterDev, stage: Stage) -> str:
    params = {
        "selector": {
            "repositoryLocationName": "synth_xray_assets",
            "repositoryName": "__repository__",
            "jobName": "__ASSET_JOB",
            "assetSelection": [{"path": [a]} for a in stage.assets],
        },
        "runConfigData": IN_PROCESS,
        "executionMetadata": {
            "tags": [{"key": k, "value": v} for k, v in partition_tags(stage.partition).items()]
        },
    }
    answer = dev.graphql(LAUNCH_RUN, {"params": params})
    result = answer.get("data", {}).get("launchRun", {})
    assert result.get("__typename") == "LaunchRunSuccess", answer
    return result["run"]["runId"]


# --------------------------------------------------------------------------- kill, detect, recover


def wait_for(what: str, condition, timeout: float = TIMEOUT_S, every: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def chain_runs(instance: dg.DagsterInstance, root: str) -> list:
    """The root run and its retries, oldest first."""
    retries = instance.get_runs(filters=RunsFilter(tags={"dagster/root_run_id": root}))
    return sorted(
        [instance.get_run_by_id(root), *retries], key=lambda r: int(r.tags.get("dagster/retry_number", 0))
    )


def kill_worker_tree(pid: int) -> list[int]:
    """SIGKILL the run worker and every process under it, as the OOM killer or a lost node would."""
    proc = psutil.Process(pid)
    victims = [*proc.children(recursive=True), proc]
    for victim in victims:
        try:
            victim.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    return [v.pid for v in victims]


def claimed_by(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    infos = instance.event_log_storage.get_concurrency_infos(["gpu", "cpu"])
    return [
        f"{pool}:{slot.step_key}"
        for pool, info in infos.items()
        for slot in info.claimed_slots
        if slot.run_id == run_id
    ]


def kill_at(instance: dg.DagsterInstance, fired: Path, index: int, entry: dict, root: str) -> dict:
    """Wait for the worker to freeze at plan entry ``index``, kill it, and see the platform recover."""
    marker = wait_for(
        f"fault point {entry}",
        lambda: (fired / f"{index}.json").is_file() and json.loads((fired / f"{index}.json").read_text()),
    )
    run = next(r for r in chain_runs(instance, root) if r.status == DagsterRunStatus.STARTED)
    worker = run_worker_record(instance, run.run_id)
    assert worker is not None, run.run_id
    frozen = psutil.Process(marker["pid"])
    assert marker["pid"] == worker.pid or worker.pid in [p.pid for p in frozen.parents()], (marker, worker)
    held = claimed_by(instance, run.run_id)
    killed = kill_worker_tree(worker.pid)
    t0 = time.time()
    where = f"{entry['point']} #{entry['hit']}: {marker['detail']}"
    print(f"  kill: run {run.run_id[:8]} worker pid {worker.pid} (+{len(killed) - 1} children) at {where}")
    print(f"        pool slots held: {held or 'none'}")
    failed = wait_for(
        "the dead run to be marked failed",
        lambda: (r := instance.get_run_by_id(run.run_id)).status == DagsterRunStatus.FAILURE and r,
    )
    logs = instance.all_logs(run.run_id)
    reasons = [
        e.message for e in logs if e.dagster_event and e.dagster_event.event_type_value == "PIPELINE_FAILURE"
    ]
    detected = time.time() - t0
    # Whoever saw it first: run monitoring (our launcher's health check), or the code server that
    # started the worker and saw its child die. Either way no person was needed.
    by_monitoring = any("is gone" in m and str(worker.pid) in m for m in reasons)
    by_code_server = any(f"Run execution process for {run.run_id}" in e.message for e in logs)
    assert by_monitoring or by_code_server, reasons
    wait_for("its pool slots to be freed", lambda: not claimed_by(instance, run.run_id), timeout=60)
    freed = time.time() - t0
    detector = "run monitoring" if by_monitoring else "the code server"
    print(f"        marked failed after {detected:.1f} s by {detector}: {reasons[-1][:100]}")
    print(f"        slots free after {freed:.1f} s")
    return {"run": failed.run_id, "detected_s": detected, "freed_s": freed, "by": detector}


def run_stage(
    dev: DagsterDev, instance: dg.DagsterInstance, stage: Stage, plan: list[dict], plan_file: Path
) -> dict:
    """Launch ``stage``, make its planned kills, and wait for a retry to finish it."""
    first = len(plan)
    plan.extend(stage.kills)
    plan_file.write_text(json.dumps(plan))
    fired = plan_file.parent / "fired"
    root = launch(dev, stage)
    print(f"{stage.name}: run {root[:8]}, {len(stage.kills)} kill(s) planned: {stage.kills}")
    kills = [kill_at(instance, fired, first + i, entry, root) for i, entry in enumerate(stage.kills)]
    done = wait_for(
        f"{stage.name} to finish",
        lambda: (
            (runs := chain_runs(instance, root))
            and runs[-1].is_finished
            and runs[-1].status != DagsterRunStatus.FAILURE
            and runs[-1]
        ),
    )
    if done.status != DagsterRunStatus.SUCCESS:
        raise AssertionError(f"{stage.name}: the last run {done.run_id} ended {done.status}")
    checks = {
        e.dagster_event.event_specific_data.check_name: e.dagster_event.event_specific_data.passed
        for e in instance.all_logs(done.run_id)
        if e.dagster_event and e.dagster_event.event_type_value == "ASSET_CHECK_EVALUATION"
    }
    retry = done.tags.get("dagster/retry_number", 0)
    runs = chain_runs(instance, root)
    print(f"  recovered by run {done.run_id[:8]} (retry {retry}, {len(runs)} runs); checks {checks}")
    assert len(runs) == len(stage.kills) + 1, [(r.run_id, r.status) for r in runs]  # one retry per kill
    return {
        "kills": kills,
        "retries": int(done.tags.get("dagster/retry_number", 0)),
        "checks": checks,
        "run": done.run_id,
    }


# ------------------------------------------------------------------ the uninterrupted run; comparison


def settings_json() -> str:
    return json.dumps(OVERRIDES)


def settings_env() -> dict[str, str]:
    """The same settings as ``SYNTH_XRAY_<SECTION>__<FIELD>`` variables, for the Dagster processes."""
    return {
        f"SYNTH_XRAY_{section.upper()}__{name.upper()}": value
        if isinstance(value, str)
        else json.dumps(value)
        for section, fields in OVERRIDES.items()
        for name, value in fields.items()
    }


def run_uninterrupted(data: Path, stages: list[Stage]) -> None:
    """The same stages in-process, never killed: what the killed runs must end up equal to."""
    from synth_xray_assets.definitions import build_defs
    from synth_xray_assets.resources import SettingsResource

    defs = build_defs(SettingsResource(data_dir=str(data), overrides_json=settings_json()))
    with dg.instance_for_test() as instance:
        for stage in stages:
            job = defs.resolve_implicit_global_asset_job_def().get_subset(
                asset_selection={dg.AssetKey(a) for a in stage.assets}
            )
            result = job.execute_in_process(instance=instance, partition_key=stage.partition)
            assert result.success, stage.name


def compare(ref: Path, got: Path) -> dict[str, str]:
    """Each stage's output against the uninterrupted run's; returns what was found, per stage."""
    from safetensors.torch import load_file

    from synth_xray_assets.classifier.experiment import load_run
    from synth_xray_assets.dataset.store import StandardizedDataset
    from synth_xray_assets.diffusion.image_sets import SyntheticImages
    from synth_xray_assets.layout import Layout

    found = {}
    a, b = (StandardizedDataset.open(Layout(d).dataset) for d in (ref, got))
    assert a.version == b.version
    assert all(np.array_equal(a.images(split), b.images(split)) for split in ("train", "validation", "test"))
    found["dataset"] = f"version {a.version} equal, pixels equal"

    unet = "unet/diffusion_pytorch_model.safetensors"
    wa, wb = (load_file(str(Layout(d).dreambooth_checkpoint("normal") / unet)) for d in (ref, got))
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    scale = max(float(wa[k].abs().max()) for k in wa)
    info = [
        json.loads((Layout(d).dreambooth_checkpoint("normal") / "dreambooth.json").read_text())
        for d in (ref, got)
    ]
    assert info[0]["global_step"] == info[1]["global_step"]  # (fingerprints name their own data folder)
    assert diff <= 1e-4 * scale, (diff, scale)  # resumed from a checkpoint: same steps, same data
    found["dreambooth"] = f"{info[1]['global_step']} steps; UNet max |diff| {diff:.2e} (max |w| {scale:.2f})"

    ia = SyntheticImages.open(Layout(ref).synthetic("normal")).images()
    ib = SyntheticImages.open(Layout(got).synthetic("normal")).images()
    assert ia.shape == ib.shape
    pixel = float(np.abs(ia.astype(int) - ib.astype(int)).mean())
    assert pixel < 1.0, pixel  # same seeds through (near-)equal weights
    found["generation"] = f"{len(ib)} images, mean |pixel diff| {pixel:.3f} gray levels"

    ra, rb = (load_run(Layout(d).classifier_run("baseline", 0)) for d in (ref, got))
    la = [h["train_loss"] for h in ra.history]
    lb = [h["train_loss"] for h in rb.history]
    assert np.allclose(la, lb, atol=1e-4), (la, lb)
    assert ra.test_selected["accuracy"] == rb.test_selected["accuracy"]
    found["classifier"] = (
        f"train losses {np.round(lb, 5).tolist()} (uninterrupted {np.round(la, 5).tolist()}), "
        "test accuracy equal"
    )

    ta, tb = (pd.read_csv(Layout(d).reports / "results.csv") for d in (ref, got))
    numeric = ta.select_dtypes("number").columns
    assert list(ta.columns) == list(tb.columns) and len(ta) == len(tb)
    assert np.allclose(ta[numeric].to_numpy(float), tb[numeric].to_numpy(float), atol=1e-6, equal_nan=True)
    found["report"] = f"results.csv equal ({len(tb)} rows, {len(numeric)} numeric columns)"
    return found


@pytest.mark.slow
def test_killed_run_workers_are_failed_freed_retried_and_finish_as_if_never_killed(tmp_path):
    import yaml

    stages = kill_plan(random.Random(SEED))
    print(f"kill plan (seed {SEED}, {KILLS} per stage where more fit):")
    for stage in stages:
        print(f"  {stage.name}: {stage.kills or 'no kill'}")
    run_uninterrupted(tmp_path / "reference", stages)

    home, data, faults = tmp_path / "home", tmp_path / "data", tmp_path / "faults"
    for folder in (home, faults):
        folder.mkdir()
    config = yaml.safe_load((REPO / "dagster.yaml").read_text())
    config.update(yaml.safe_load(FAST_INSTANCE))
    config["run_coordinator"]["config"] = {"dequeue_interval_seconds": 1}
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    plan_file = faults / "plan.json"
    plan_file.write_text("[]")
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "SYNTH_XRAY_PROFILE": "demo",
        "SYNTH_XRAY_DATA": str(data),
        **settings_env(),
        PLAN_ENV: str(plan_file),
    }
    dev = DagsterDev(home, env, tmp_path / "dagster-dev.log")
    outcomes, plan = [], []
    try:
        dev.wait_ready()
        with dg.DagsterInstance.from_config(str(home)) as instance:
            for stage in stages:
                outcomes.append(run_stage(dev, instance, stage, plan, plan_file))
    except BaseException:
        print((tmp_path / "dagster-dev.log").read_text()[-6000:])
        raise
    finally:
        dev.stop()

    made = sum(len(o["kills"]) for o in outcomes)
    survived = sum(len(o["kills"]) for o in outcomes if o["retries"] == len(o["kills"]))
    print(f"kills made: {made}, survived (the retry after the last kill finished the asset): {survived}")
    assert made == len(plan) == len(list((faults / "fired").glob("*.json")))
    assert survived == made
    for stage, outcome in zip(stages, outcomes):
        assert all(outcome["checks"].values()), (stage.name, outcome["checks"])
        assert outcome["checks"] or stage.assets == ["base_model", "prior_class_images"], stage.name
    for stage, finding in compare(tmp_path / "reference", data).items():
        print(f"equal to the uninterrupted run: {stage}: {finding}")


# --------------------------------------------------------------------------- a killed `make demo`

DEMO_LIKE = """
import sys
import dagster as dg
from synth_xray_assets.definitions import defs  # the settings of the environment, as dagster loads them
with dg.DagsterInstance.get() as instance:  # as demo.py: in-process runs on the persistent instance
    for assets, partition in [(sys.argv[1].split(","), sys.argv[2] or None)]:
        job = defs.resolve_implicit_global_asset_job_def().get_subset(
            asset_selection={dg.AssetKey(a) for a in assets}
        )
        result = job.execute_in_process(instance=instance, partition_key=partition, raise_on_error=False)
        db = "dreambooth_checkpoint"
        md = result.asset_materializations_for_node(db) if db in assets and result.success else []
        resumed = md[0].metadata["resumed_from_step"].value if md else "-"
        print("RESULT", result.run_id, result.success, resumed, flush=True)
"""


@pytest.mark.slow
def test_a_killed_in_process_run_is_failed_by_the_daemon_and_frees_the_gpu_pool(tmp_path):
    """A ``make demo`` killed during DreamBooth would leave its run STARTED and the gpu slot taken:
    the daemon fails it and frees the slot. Only the daemon runs here (no code server watches the
    in-process run)."""
    import yaml

    step = random.Random(SEED).randint(3, 4)  # after checkpoint-2, so that the re-run resumes
    print(f"kill during DreamBooth training at step {step} (seed {SEED})")
    home, faults = tmp_path / "home", tmp_path / "faults"
    for folder in (home, faults):
        folder.mkdir()
    config = yaml.safe_load((REPO / "dagster.yaml").read_text())
    config.update(yaml.safe_load(FAST_INSTANCE))
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    plan_file = faults / "plan.json"
    plan_file.write_text(json.dumps([{"point": "dreambooth.step", "hit": step}]))
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "DAGSTER_HOME": str(home),
        "SYNTH_XRAY_PROFILE": "demo",
        "SYNTH_XRAY_DATA": str(tmp_path / "data"),
        **settings_env(),
    }

    def demo(assets: str, partition: str = "", **extra) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-c", DEMO_LIKE, assets, partition],
            env={**env, **extra},
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    dg.DagsterInstance.from_config(str(home)).dispose()  # storage made before the processes share it
    assert "True" in demo("chest_xray_dataset,base_model,prior_class_images").communicate(timeout=600)[0]
    daemon = subprocess.Popen(
        [str(Path(sys.executable).with_name("dagster-daemon")), "run", "-w", str(REPO / "workspace.yaml")],
        cwd=REPO,
        env=env,
        stdout=(tmp_path / "daemon.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    killed = demo("dreambooth_checkpoint", "normal", **{PLAN_ENV: str(plan_file)})
    try:
        with dg.DagsterInstance.from_config(str(home)) as instance:
            marker = wait_for("the freeze", lambda: (faults / "fired" / "0.json").is_file())
            run = wait_for(
                "the run", lambda: instance.get_runs(filters=RunsFilter(statuses=[DagsterRunStatus.STARTED]))
            )[0]
            wait_for("the gpu slot to be taken", lambda: claimed_by(instance, run.run_id), timeout=30)
            held = claimed_by(instance, run.run_id)
            print(f"killing pid {killed.pid} (run {run.run_id[:8]}), slots held {held}")
            os.killpg(killed.pid, signal.SIGKILL)
            killed.wait(timeout=30)
            t0 = time.time()
            failed = wait_for(
                "the daemon to fail the dead run", lambda: instance.get_run_by_id(run.run_id).is_finished
            )
            reasons = [
                e.message
                for e in instance.all_logs(run.run_id)
                if e.dagster_event and e.dagster_event.event_type_value == "PIPELINE_FAILURE"
            ]
            assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.FAILURE and failed
            assert any("is gone" in m and str(killed.pid) in m for m in reasons), reasons
            print(f"failed after {time.time() - t0:.1f} s: {reasons[-1][:160]}")
            wait_for("the gpu slot to be freed", lambda: not claimed_by(instance, run.run_id), timeout=60)
            print(f"gpu slot free after {time.time() - t0:.1f} s")
        # Run again, as an operator would (make demo): it gets the gpu slot and resumes.
        out = demo("dreambooth_checkpoint", "normal", **{PLAN_ENV: str(plan_file)}).communicate(timeout=600)[
            0
        ]
        result = next(line.split() for line in out.splitlines() if line.startswith("RESULT"))
        print(f"re-run: success {result[2]}, resumed from step {result[3]}")
        assert result[2] == "True" and result[3] == "2"
        assert marker
    finally:
        for proc in (killed, daemon):
            stop_group(proc, grace_s=30)
