"""Data-parallel DreamBooth: one run on k cards, launched the way accelerate users launch it.

``python -m synth_xray_assets.dreambooth.data_parallel --ranks k JOB`` starts torchrun's agent
(``torch.distributed.run``), which starts k rank processes of this module; each runs
``train_dreambooth`` (``training.py``) under accelerate, which wraps the trained models in
DistributedDataParallel (NCCL on cards, gloo on the CPU). ``rank_pieces`` (``loss.py``) gives each
rank its share of every optimizer step, so the global batch, the noise each image sees and the
learning-rate schedule are a one-card run's: k changes the speed, not the optimization.

The job folder (``write_job``) holds what the ranks train on: ``job.json`` (paths, prompt,
settings), ``instance.npy`` and ``class.npy``. Rank 0 writes ``result.json`` (the ``TrainResult``);
a rank that fails writes ``failed-rank{r}.json`` naming itself, its device and the error, which the
asset raises. Rank 0 reports its log lines through Dagster Pipes when started by
``dg.PipesSubprocessClient`` (the asset, ``assets.py``).

Lifetimes: the agent dies with whoever started it, and each rank with the agent
(``exit_with_parent``); when one rank fails, the agent stops the others (``--max-restarts 0``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from synth_xray_assets.dreambooth.loss import require_world_size, valid_world_sizes
from synth_xray_assets.hardware import NotEnoughDiskError
from synth_xray_assets.settings import DreamBoothSettings
from synth_xray_assets.storage import save_numpy_atomic, write_json_atomic

JOB_NAME = "job.json"
RESULT_NAME = "result.json"
MODULE = "synth_xray_assets.dreambooth.data_parallel"  # this file, also when run as __main__


@dataclasses.dataclass(frozen=True)
class DataParallelJob:
    """One data-parallel DreamBooth run: where it reads and writes, and with which settings."""

    base_model_dir: Path
    instance_prompt: str
    settings: DreamBoothSettings
    output_dir: Path
    work_dir: Path
    device: str  # "cuda" (rank r takes local card r) or "cpu" (gloo)
    preset: str = "none"  # the memory preset's name, for error messages


def write_job(
    folder: Path, job: DataParallelJob, instance_images: np.ndarray, class_images: np.ndarray | None
) -> Path:
    """The job folder the ranks read (earlier results and failures removed); returns ``job.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in [folder / RESULT_NAME, *folder.glob("failed-*.json")]:
        stale.unlink(missing_ok=True)
    save_numpy_atomic(instance_images, folder / "instance.npy")
    if class_images is not None:
        save_numpy_atomic(class_images, folder / "class.npy")
    else:
        (folder / "class.npy").unlink(missing_ok=True)
    record = {
        **{k: str(v) for k, v in dataclasses.asdict(job).items() if k != "settings"},
        "settings": job.settings.model_dump(mode="json"),
    }
    return write_json_atomic(folder / JOB_NAME, record)


def launch_command(job_file: Path, ranks: int) -> list[str]:
    """The command that trains ``job_file``'s run on ``ranks`` processes."""
    return [sys.executable, "-m", MODULE, "--ranks", str(ranks), str(job_file)]


def ranks_for(key: str, steps: dict[str, int], cards: int, settings: DreamBoothSettings) -> int:
    """How many cards generator ``key``'s run asks for: ``settings.data_parallel_cards`` (refused
    unless it divides the global batch), else its share of the machine's ``cards`` by its steps
    against every generator's (``steps``; at least 1), rounded down to a count that divides it."""
    if settings.data_parallel_cards is not None:
        require_world_size(settings, settings.data_parallel_cards)
        return settings.data_parallel_cards
    share = max(1, int(cards * steps[key] / sum(steps.values()))) if cards else 1
    return max(k for k in valid_world_sizes(settings) if k <= share)


def read_job(job_file: Path) -> tuple[DataParallelJob, np.ndarray, np.ndarray | None]:
    record = json.loads(Path(job_file).read_text())
    folder = Path(job_file).parent
    job = DataParallelJob(
        base_model_dir=Path(record["base_model_dir"]),
        instance_prompt=record["instance_prompt"],
        settings=DreamBoothSettings.model_validate(record["settings"]),
        output_dir=Path(record["output_dir"]),
        work_dir=Path(record["work_dir"]),
        device=record["device"],
        preset=record["preset"],
    )
    class_file = folder / "class.npy"
    class_images = np.load(class_file) if class_file.exists() else None
    return job, np.load(folder / "instance.npy"), class_images


def read_result(folder: Path):
    """Rank 0's ``TrainResult``, or a ``RuntimeError`` naming each rank that failed, the first
    failure (the cause; the others are ranks stopped for it) first: a ``NotEnoughDiskError`` when
    that was the disk preflight's refusal (not retried)."""
    from synth_xray_assets.dreambooth.training import TrainResult

    failures = [json.loads(f.read_text()) for f in Path(folder).glob("failed-*.json")]
    if failures:
        failures.sort(key=lambda f: f.get("time", 0.0))
        text = "data-parallel DreamBooth failed: " + "; then ".join(f["message"] for f in failures)
        final = failures[0].get("error") == NotEnoughDiskError.__name__
        raise (NotEnoughDiskError if final else RuntimeError)(text)
    result = Path(folder) / RESULT_NAME
    if not result.exists():
        raise RuntimeError(
            f"data-parallel DreamBooth ended without a result in {folder} (a rank was killed?)"
        )
    record = json.loads(result.read_text())
    return TrainResult(**{**record, "output_dir": Path(record["output_dir"])})


# ---------------------------------------------------------------------------------------------
# The processes: torchrun's agent, then each rank
# ---------------------------------------------------------------------------------------------


def _start_agent(job_file: Path, ranks: int) -> int:
    """torchrun on this machine: ``ranks`` processes of this module, none restarted."""
    from torch.distributed import run as torchrun

    from synth_xray_assets.operations.lifetime import exit_with_parent

    exit_with_parent(os.getppid())
    args = ["--standalone", f"--nproc-per-node={ranks}", "--max-restarts=0", "-m", MODULE]
    torchrun.main([*args, "--ranks", str(ranks), "--rank-process", str(job_file)])
    return 0


def _run_rank(job_file: Path) -> None:
    """One rank: train, then rank 0 writes the result; a failure is written down before it is raised."""
    from synth_xray_assets.operations.lifetime import exit_with_parent

    exit_with_parent(os.getppid())  # the agent
    rank, job = int(os.environ["RANK"]), None
    try:
        job, instance_images, class_images = read_job(job_file)
        with _rank_log(rank) as log:
            result = _train(job, instance_images, class_images, log)
    except BaseException as exc:
        _write_failure(job_file.parent, rank, job, exc)
        raise
    if rank == 0:
        record = {**dataclasses.asdict(result), "output_dir": str(result.output_dir)}
        write_json_atomic(job_file.parent / RESULT_NAME, record)


def _train(job: DataParallelJob, instance_images: np.ndarray, class_images: np.ndarray | None, log):
    from synth_xray_assets.dreambooth.training import RunDirs, RunInputs, train_dreambooth

    device = job.device
    if device.startswith("cuda"):
        import torch

        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    inputs = RunInputs(job.base_model_dir, instance_images, class_images, job.instance_prompt)
    return train_dreambooth(inputs, job.settings, RunDirs(job.output_dir, job.work_dir), device, log=log)


@contextlib.contextmanager
def _rank_log(rank: int) -> Iterator[Callable[[str], None]]:
    """Rank 0 logs through Dagster Pipes when a Pipes client started it (else to stdout); the other
    ranks keep quiet (their failures are written down)."""
    if rank != 0:
        yield lambda message: None
        return
    from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes

    if not PipesEnvVarParamsLoader().is_dagster_pipes_process():
        yield lambda message: print(message, flush=True)
        return
    with open_dagster_pipes() as pipes:
        yield pipes.log.info


def _write_failure(folder: Path, rank: int, job: DataParallelJob | None, exc: BaseException) -> None:
    """``failed-rank{r}.json``: the rank, its device (card name on CUDA), the preset and the error
    (``job`` None: its job file could not be read). A failure to write it is printed instead."""
    where, preset = ("?", "?") if job is None else (job.device, job.preset)
    try:
        if where.startswith("cuda"):
            import torch

            local = int(os.environ.get("LOCAL_RANK", 0))
            where = f"cuda:{local} ({torch.cuda.get_device_name(local)})"
        message = f"rank {rank} on {where}, memory preset {preset}: {type(exc).__name__}: {exc}"
        record = {"rank": rank, "message": message, "error": type(exc).__name__, "time": time.time()}
        write_json_atomic(folder / f"failed-rank{rank}.json", record)
    except Exception as unwritten:  # the disk may be what failed: the agent's stderr still has it
        print(f"rank {rank}: could not write down its failure ({unwritten}): {exc!r}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, required=True, help="processes (cards) to train on")
    parser.add_argument("--rank-process", action="store_true", help=argparse.SUPPRESS)  # torchrun's
    parser.add_argument("job", type=Path, help="the job folder's job.json (write_job)")
    args = parser.parse_args(argv)
    if not args.rank_process:
        settings = DreamBoothSettings.model_validate(json.loads(args.job.read_text())["settings"])
        try:
            require_world_size(settings, args.ranks)
        except ValueError as exc:  # refused before any rank starts
            write_json_atomic(args.job.parent / "failed-launch.json", {"rank": None, "message": str(exc)})
            print(exc, file=sys.stderr)
            return 2
        return _start_agent(args.job, args.ranks)
    _run_rank(args.job)
    return 0


if __name__ == "__main__":
    sys.exit(main())
