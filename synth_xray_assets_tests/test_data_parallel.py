"""Data-parallel DreamBooth on the CPU: torchrun, 2 ranks, gloo, the tiny model.

Two ranks train what one process trains (same global batch, noise and schedule); a 2-rank run that
is killed after a checkpoint resumes and ends where an uninterrupted 2-rank run ends; killing the
process that started the ranks stops every rank; one rank out of memory stops both and is named.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_dreambooth import PROMPT, db_settings, images

from synth_xray_assets.dreambooth.data_parallel import (
    DataParallelJob,
    launch_command,
    read_result,
    write_job,
)
from synth_xray_assets.dreambooth.loss import rank_pieces, step_micro_batches, valid_world_sizes
from synth_xray_assets.dreambooth.training import RunDirs, RunInputs, train_dreambooth
from synth_xray_assets.operations.faults import PLAN_ENV

# 5 instance images at a global batch of 4 (2 x 2 accumulation): every epoch ends with a step of one
# image, which leaves rank 1 nothing (the zero-weight piece).
INSTANCE, CLASS = images(5, 1), images(4, 2)
STEPS = 4
LAUNCH_TIMEOUT_S = 300
# Two ranks sum their gradients in another order than one process; Adam magnifies the rounding where
# a gradient is near zero. Tolerances: per-step losses within 1e-5 (relative), and the distance
# between the two runs' weights under 1% of how far training moved them.
LOSS_RTOL, WEIGHT_RATIO = 1e-5, 0.01
PARTS = ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors")


def settings(tmp_path: Path, **values):
    return db_settings(
        tmp_path,
        train_batch_size=2,
        gradient_accumulation_steps=2,
        max_train_steps=STEPS,
        checkpointing_steps=2,
        lr_warmup_steps=0,
        **values,
    )


def job(base: Path, tmp_path: Path, name: str, **values) -> Path:
    spec = DataParallelJob(
        base, PROMPT, settings(tmp_path, **values), tmp_path / name, tmp_path / f"{name}.work", "cpu"
    )
    return write_job(tmp_path / f"{name}.work" / "data-parallel", spec, INSTANCE, CLASS)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for part in PARTS:
        out.update({f"{part}:{k}": v.double() for k, v in load_file(str(folder / part)).items()})
    return out


def distance(a: dict, b: dict) -> float:
    return float(torch.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a)))


def test_rank_pieces_cover_each_step_once():
    s = db_settings(Path("/unused"), train_batch_size=4, gradient_accumulation_steps=2)
    assert valid_world_sizes(s) == [1, 2, 4, 8]
    for step in range(4):  # 11 images: steps of 8 then 3 (a short last step)
        micro = step_micro_batches(step, 11, 7, s)
        for world in (1, 2, 4, 8):
            seen = [
                (m, int(r))
                for rank in range(world)
                for m, rows in rank_pieces(micro, rank, world)
                for r in rows
            ]
            assert seen == [(m, r) for m, (inst, _) in enumerate(micro) for r in range(len(inst))]
    short = step_micro_batches(1, 11, 7, s)  # 3 images, 4 ranks: one rank idle
    assert sum(not rank_pieces(short, rank, 4) for rank in range(4)) == 1
    whole = rank_pieces(step_micro_batches(0, 11, 7, s), 0, 1)
    assert [(m, list(r)) for m, r in whole] == [(0, [0, 1, 2, 3]), (1, [0, 1, 2, 3])]


def test_two_ranks_train_what_one_process_trains(tiny_base_model, tmp_path):
    one = train_dreambooth(
        RunInputs(tiny_base_model, INSTANCE, CLASS, PROMPT),
        settings(tmp_path),
        RunDirs(tmp_path / "one", tmp_path / "one.work"),
        "cpu",
        log=lambda m: None,
    )
    job_file = job(tiny_base_model, tmp_path, "two")
    done = subprocess.run(
        launch_command(job_file, 2), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S
    )
    assert done.returncode == 0, done.stderr[-4000:]
    two = read_result(job_file.parent)
    assert two.global_step == one.global_step == STEPS
    np.testing.assert_allclose(two.losses, one.losses, rtol=LOSS_RTOL)
    np.testing.assert_allclose(two.prior_losses, one.prior_losses, rtol=LOSS_RTOL)
    base, w1, w2 = weights(tiny_base_model), weights(tmp_path / "one"), weights(tmp_path / "two")
    moved = distance(w1, base)
    assert moved > 0.1  # training moved the weights
    assert distance(w2, w1) < WEIGHT_RATIO * moved, (distance(w2, w1), moved)
    assert "rank 0" not in done.stdout and "device cpu:0" in done.stdout  # rank 0 logs; rank 1 is quiet


def _pids_running(job_file: Path) -> list[int]:
    """Processes whose command line names the job (the agent and its ranks)."""
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if str(job_file) in cmd and state != "Z":
                out.append(int(proc.name))
    return out


def _wait(what: str, predicate, timeout_s: float = LAUNCH_TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_killed_ranks_resume_and_end_where_an_uninterrupted_run_ends(tiny_base_model, tmp_path):
    """Freeze a rank after step 3 (checkpoint-2 written by both ranks), kill the process that started
    torchrun (as the run worker's step would die): every rank dies. Resume on 2 ranks: steps 3-4
    run, the weights move on from the checkpoint, and end where an uninterrupted 2-rank run ends."""
    reference = job(tiny_base_model, tmp_path, "reference")
    done = subprocess.run(
        launch_command(reference, 2), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S
    )
    assert done.returncode == 0, done.stderr[-4000:]

    plan = tmp_path / "faults" / "plan.json"
    plan.parent.mkdir()
    plan.write_text(json.dumps([{"point": "dreambooth.step", "match": "3", "hit": 1}]))
    killed = job(tiny_base_model, tmp_path, "killed", keep_checkpoints=True)
    env = {**os.environ, PLAN_ENV: str(plan)}
    # The parent stands in for the step process: it starts the agent and is killed with SIGKILL.
    starter = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys; subprocess.run(sys.argv[1:])",
            *launch_command(killed, 2),
        ],
        env=env,
        start_new_session=True,
    )
    try:
        _wait("a rank to freeze after step 3", lambda: (plan.parent / "fired" / "0.json").is_file())
        assert len(_pids_running(killed)) == 4  # the starter, the agent and two ranks
        os.kill(starter.pid, signal.SIGKILL)
        starter.wait(timeout=30)
        _wait("every rank to die with the agent", lambda: not _pids_running(killed), timeout_s=30)
    finally:
        if _pids_running(killed):  # the test failed: leave nothing behind
            os.killpg(starter.pid, signal.SIGKILL)
    work = tmp_path / "killed.work"
    assert sorted(p.name for p in work.glob("checkpoint-*")) == ["checkpoint-2"]
    saved = load_file(str(work / "checkpoint-2" / "model.safetensors"))

    resumed = subprocess.run(
        launch_command(killed, 2), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    result = read_result(killed.parent)
    assert result.resumed_from_step == 2 and result.steps_run == [3, 4]
    assert "resumed from checkpoint-2" in resumed.stdout
    final_unet = load_file(str(tmp_path / "killed" / "unet" / "diffusion_pytorch_model.safetensors"))
    moved = max((final_unet[k] - v).abs().max().item() for k, v in saved.items())
    assert moved > 1e-5  # the weights keep changing after the resume
    np.testing.assert_allclose(result.losses, read_result(reference.parent).losses, rtol=LOSS_RTOL)
    w_ref, w_res = weights(tmp_path / "reference"), weights(tmp_path / "killed")
    assert distance(w_res, w_ref) < WEIGHT_RATIO * distance(w_ref, weights(tiny_base_model))

    # The same checkpoint resumes on one process too (checkpoints hold the bare model's names).
    one = train_dreambooth(
        RunInputs(tiny_base_model, INSTANCE, CLASS, PROMPT),
        settings(tmp_path, keep_checkpoints=True),
        RunDirs(tmp_path / "one", work),
        "cpu",
        log=lambda m: None,
    )
    assert one.resumed_from_step == 2 and one.steps_run == [3, 4]
    np.testing.assert_allclose(one.losses, result.losses, rtol=LOSS_RTOL)


def test_ranks_that_do_not_divide_the_global_batch_are_refused_before_any_starts(tiny_base_model, tmp_path):
    job_file = job(tiny_base_model, tmp_path, "odd")
    done = subprocess.run(
        launch_command(job_file, 3), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S
    )
    assert done.returncode == 2 and "3 ranks do not divide the global batch of 4" in done.stderr
    with pytest.raises(
        RuntimeError, match=r"3 ranks do not divide the global batch of 4.*one of 1, 2, 4 cards"
    ):
        read_result(job_file.parent)


def test_the_asset_trains_on_two_cards_through_pipes(tmp_path):
    """``dreambooth_checkpoint[normal]`` with ``data_parallel_cards`` 2 on two (fake) free cards: the
    step holds both, torchrun trains on 2 ranks (gloo), rank 0's log lines reach the step's logs
    through Dagster Pipes, and the model and metadata are the asset's as on one card."""
    import dagster as dg
    from conftest import tiny_overrides_json

    from synth_xray_assets.cards import CardConfig
    from synth_xray_assets.dataset import assets as dataset_assets
    from synth_xray_assets.dreambooth import assets as dreambooth_assets
    from synth_xray_assets.resources import ComputeResource, SettingsResource
    from synth_xray_assets.settings import Settings

    overrides = tiny_overrides_json(dreambooth={"data_parallel_cards": 2})
    s = Settings.for_profile("demo")
    cards = [CardConfig(index=i, name=f"Fake {i}", total_memory=2**34, key=f"fake-{i}") for i in range(2)]
    resources = {
        "settings": SettingsResource(data_dir=str(tmp_path / "data"), overrides_json=overrides),
        "compute": ComputeResource(cards=cards),
    }
    instance = dg.DagsterInstance.ephemeral()
    before = [
        dataset_assets.chest_xray_dataset,
        dreambooth_assets.base_model_asset(s),
        dreambooth_assets.prior_class_images_asset(s),
    ]
    assert dg.materialize(before, resources=resources, instance=instance).success
    result = dg.materialize(
        [dreambooth_assets.dreambooth_checkpoint_asset(s)],
        resources=resources,
        partition_key="normal",
        instance=instance,
    )
    assert result.success
    meta = result.asset_materializations_for_node("dreambooth_checkpoint")[0].metadata
    assert meta["data_parallel_ranks"].value == 2 and meta["steps"].value == 3
    logs = [r.user_message for r in instance.all_logs(result.run_id) if r.user_message]
    assert any("data-parallel DreamBooth on 2 ranks (cpu: card 0 (Fake 0" in m for m in logs)
    assert any("step 3/3 loss" in m for m in logs)  # rank 0's line, through Pipes
    assert (tmp_path / "data" / "models" / "dreambooth" / "normal" / "dreambooth.json").is_file()


def test_one_rank_out_of_memory_stops_every_rank_and_is_named(tiny_base_model, tmp_path):
    """Rank 1 runs out of memory at its second step (injected): torchrun stops rank 0 too, the
    launch fails, and the error names the rank, its device and the memory preset."""
    plan = tmp_path / "faults" / "plan.json"
    plan.parent.mkdir()
    plan.write_text(
        json.dumps([{"point": "dreambooth.step", "match": "rank 1", "hit": 2, "raise": "out_of_memory"}])
    )
    failing = job(tiny_base_model, tmp_path, "oom")
    done = subprocess.run(
        launch_command(failing, 2),
        env={**os.environ, PLAN_ENV: str(plan)},
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT_S,
    )
    assert done.returncode != 0
    assert json.loads((plan.parent / "fired" / "0.json").read_text())["detail"] == "2 rank 1"
    assert not _pids_running(failing)  # rank 0 did not wait on for ever in a collective
    with pytest.raises(RuntimeError) as failed:
        read_result(failing.parent)
    # the cause first; rank 0, stopped for it, may follow ("; then rank 0 ...")
    assert str(failed.value).startswith(
        "data-parallel DreamBooth failed: rank 1 on cpu, memory preset none: "
        "RuntimeError: DreamBooth ran out of memory on cpu"
    )


def test_a_rank_refused_for_disk_is_a_disk_refusal_not_retried(tmp_path):
    """The first failure decides the error's type: the disk preflight's refusal in a rank reaches
    the asset as ``NotEnoughDiskError`` (``disk_refusal_is_final`` does not retry it), the ranks
    stopped after it only follow in the message."""
    from synth_xray_assets.hardware import NotEnoughDiskError

    for rank, error, when in ((1, "NotEnoughDiskError", 1.0), (0, "RuntimeError", 2.0)):
        record = {"rank": rank, "message": f"rank {rank}: {error}", "error": error, "time": when}
        (tmp_path / f"failed-rank{rank}.json").write_text(json.dumps(record))
    with pytest.raises(NotEnoughDiskError, match=r"failed: rank 1: NotEnoughDiskError; then rank 0"):
        read_result(tmp_path)
    (tmp_path / "failed-rank1.json").unlink()
    with pytest.raises(RuntimeError, match="rank 0") as other:
        read_result(tmp_path)
    assert not isinstance(other.value, NotEnoughDiskError)
