"""No step outlives its run worker (``operations/lifetime.py``), shown on a real DreamBooth step.

The slow test runs the tiny model's DreamBooth under the multiprocess executor in a run worker
of its own (its own process group), pauses the step just after checkpoint-2 (a fault plan
entry with ``pause_s``: an orphan would go on training after it), kills only the run worker's pid
with SIGKILL, and checks that the step went with it, that nothing more reached the run's event
log, that checkpoint-2 is intact, and that the next run resumes from it.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import psutil
import pytest
from conftest import tiny_overrides_json
from dagster._core.storage.dagster_run import DagsterRunStatus, RunsFilter
from servers import stop_group

from synth_xray_assets.definitions import build_defs
from synth_xray_assets.dreambooth import store
from synth_xray_assets.dreambooth.checkpoints import list_checkpoints
from synth_xray_assets.operations.faults import PLAN_ENV
from synth_xray_assets.operations.recovery import recover_dead_runs
from synth_xray_assets.resources import SettingsResource

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
PAUSE_S = 4.0  # the step's pause after checkpoint-2; the run worker is killed within it
GONE_WITHIN_S = 3.0
START_TIMEOUT_S = 300  # spawning the step, loading the tiny model, encoding the images

# A process that starts a child which ties itself to it; prints the child's pid, then sleeps.
PARENT = """
import multiprocessing, os, sys, time
sys.path.insert(0, {repo!r})
from synth_xray_assets.operations.lifetime import exit_with_parent

def child(how):
    how.put(exit_with_parent())
    time.sleep(120)

if __name__ == "__main__":
    how = multiprocessing.get_context("spawn").Queue()
    p = multiprocessing.get_context("spawn").Process(target=child, args=(how,))
    p.start()
    print(p.pid, how.get(timeout=60), flush=True)
    time.sleep(120)
"""

# The run worker: the DreamBooth step of class "normal" under the multiprocess executor.
RUN_WORKER = """
import os, sys
import dagster as dg

def per_class_job():
    from synth_xray_assets.definitions import build_defs
    from synth_xray_assets.resources import SettingsResource

    settings = SettingsResource(
        data_dir=os.environ["LIFETIME_DATA"], overrides_json=os.environ["LIFETIME_OVERRIDES"]
    )
    return build_defs(settings).resolve_job_def("per_class_job")

if __name__ == "__main__":
    with dg.DagsterInstance.get() as instance:
        result = dg.execute_job(
            dg.reconstructable(per_class_job),
            instance,
            tags={"dagster/partition": "normal"},
            asset_selection=[dg.AssetKey("dreambooth_checkpoint")],
        )
        print(result.run_id, result.success, flush=True)
"""


def _wait_gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def test_a_child_dies_with_its_parent(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(PARENT.format(repo=str(REPO)))
    parent = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        child_pid, how = parent.stdout.readline().split()
        assert how == ("prctl" if sys.platform.startswith("linux") else "watchdog")
        assert psutil.Process(int(child_pid)).ppid() == parent.pid
        os.kill(parent.pid, signal.SIGKILL)  # the parent only
        assert _wait_gone(int(child_pid), GONE_WITHIN_S), "the child outlived its parent"
    finally:
        stop_group(parent, signal.SIGKILL, grace_s=1)


# A step standardizing images over two processes, its input stalled once the pool has started.
STANDARDIZING_STEP = """
import io, sys, time
sys.path.insert(0, {repo!r})
from PIL import Image
from synth_xray_assets.dataset.standardize import standardize_many

def items():
    for i in range(4):
        out = io.BytesIO()
        Image.new("L", (40 + i, 40), i).save(out, "PNG")
        yield out.getvalue()
    print("ready", flush=True)
    time.sleep(120)

for _ in standardize_many(items(), 16, workers=2, chunk_size=1):
    pass
"""


def test_the_standardization_pool_dies_with_its_step(tmp_path):
    script = tmp_path / "step.py"
    script.write_text(STANDARDIZING_STEP.format(repo=str(REPO)))
    step = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert step.stdout.readline().strip() == "ready"
        workers = psutil.Process(step.pid).children()
        assert len(workers) >= 2, workers
        os.kill(step.pid, signal.SIGKILL)  # the step only
        left = [w.pid for w in workers if not _wait_gone(w.pid, GONE_WITHIN_S)]
        assert left == [], "pool workers outlived their step"
    finally:
        stop_group(step, signal.SIGKILL, grace_s=1)


def test_every_step_starts_the_settings_resource(tmp_path):
    """Its setup ties a step process to its run worker, so every asset and check must use it."""
    from conftest import tiny_settings

    d = build_defs(tiny_settings(tmp_path))
    nodes = [*d.resolve_asset_graph().assets_defs, *(d.asset_checks or [])]
    without = {n.node_def.name for n in nodes if "settings" not in n.required_resource_keys}
    assert without == set(), without


def _prepare(home: Path, data: Path, overrides: str) -> None:
    """The instance (the shipped dagster.yaml: gpu pool of 1, run retries) and DreamBooth's inputs."""
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO / "dagster.yaml").read_text())
    upstream = {dg.AssetKey(k) for k in ("chest_xray_dataset", "base_model", "prior_class_images")}
    defs = build_defs(SettingsResource(data_dir=str(data), overrides_json=overrides))
    job = defs.resolve_implicit_global_asset_job_def().get_subset(asset_selection=upstream)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert job.execute_in_process(instance=instance).success


def _start_run_worker(script: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, str(script)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: whatever it starts is killed at the end
        )


def _wait_fired(marker: Path, worker: subprocess.Popen, log: Path) -> dict:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not marker.exists():
        assert worker.poll() is None, f"the run worker exited early:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"the step never reached step 3:\n{log.read_text()[-4000:]}"
        time.sleep(0.05)
    return json.loads(marker.read_text())


@pytest.mark.slow
def test_killing_only_the_run_worker_ends_its_step_and_the_retry_resumes(tmp_path):
    home, data = tmp_path / "home", tmp_path / "data"
    overrides = tiny_overrides_json(dreambooth={"max_train_steps": 4, "checkpointing_steps": 2})
    _prepare(home, data, overrides)
    plan = tmp_path / "plan" / "plan.json"
    plan.parent.mkdir()
    # After step 3, before it is saved: checkpoint-2 is on disk, steps 3-4 and the final save not.
    plan.write_text(json.dumps([{"point": "dreambooth.step", "hit": 3, "pause_s": PAUSE_S}]))
    script = tmp_path / "run_worker.py"
    script.write_text(RUN_WORKER)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "DAGSTER_HOME": str(home),
        "LIFETIME_DATA": str(data),
        "LIFETIME_OVERRIDES": overrides,
    }
    worker = _start_run_worker(script, {**env, PLAN_ENV: str(plan)}, tmp_path / "killed.log")
    try:
        fired = _wait_fired(plan.parent / "fired" / "0.json", worker, tmp_path / "killed.log")
        step_pid = fired["pid"]
        # A step process of this run worker: forked by the fork server the run worker started.
        fork_server = psutil.Process(psutil.Process(step_pid).ppid())
        assert fork_server.ppid() == worker.pid and "forkserver" in " ".join(fork_server.cmdline())
        os.kill(worker.pid, signal.SIGKILL)  # only the run worker, as the out-of-memory killer would
        killed_at = time.time()
        worker.wait(timeout=10)
        assert _wait_gone(step_pid, GONE_WITHIN_S), "the step outlived its run worker"
        time.sleep(PAUSE_S + 2)  # an orphan would have gone on training by now
    finally:
        stop_group(worker, signal.SIGKILL, grace_s=1)

    work = store.work_dir(data, "normal")
    assert [step for step, _ in list_checkpoints(work)] == [2]  # intact, not pruned by an orphan
    assert not (store.checkpoint_dir(data, "normal") / "model_index.json").exists()
    with dg.DagsterInstance.from_config(str(home)) as instance:
        (run,) = instance.get_runs(RunsFilter(job_name="per_class_job"))
        logs = instance.all_logs(run.run_id)
        late = [(e.timestamp - killed_at, e.user_message or e.dagster_event_type) for e in logs]
        assert [x for x in late if x[0] > 0] == [], "events written into the run after the kill"
        assert not any(e.dagster_event_type == dg.DagsterEventType.STEP_SUCCESS for e in logs)
        assert recover_dead_runs(instance) == [run.run_id]  # as the next `make demo` does
        assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.FAILURE

    again = _start_run_worker(script, env, tmp_path / "again.log")
    try:
        assert again.wait(timeout=START_TIMEOUT_S) == 0, (tmp_path / "again.log").read_text()[-4000:]
    finally:
        stop_group(again, signal.SIGKILL, grace_s=1)
    assert (tmp_path / "again.log").read_text().split()[-1] == "True"
    with dg.DagsterInstance.from_config(str(home)) as instance:
        record = instance.get_latest_materialization_event(dg.AssetKey("dreambooth_checkpoint"))
        assert record.asset_materialization.metadata["resumed_from_step"].value == 2
