"""What the machine offers: the CPU cores this process may use, free GPU memory, free disk.

Plain functions, no Dagster: the training code sizes its workers, batches and presets from them,
and the disk preflight compares what a step will write with what is free.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"
MAX_LOADER_WORKERS = 8  # beyond this, uint8 batch gathering gains nothing and costs memory


def available_cpus(cgroup_cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota (containers)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = cgroup_cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def loader_workers(torch_threads: int, cpus: int | None = None) -> int:
    """Data-loader processes: the cores left after the training process's torch threads (at least 1)."""
    cpus = available_cpus() if cpus is None else cpus
    return max(1, min(MAX_LOADER_WORKERS, cpus - torch_threads))


def free_gpu_memory(device: str) -> int | None:
    """Free memory of a CUDA ``device`` in bytes (what the driver reports), ``None`` off CUDA."""
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(torch.device(device))
    return int(free)


def least_free_gpu_memory(devices: Sequence[str]) -> int | None:
    """The least free memory among the CUDA ``devices`` (a generation plan that fits every one),
    ``None`` when none is on CUDA."""
    free = [f for f in map(free_gpu_memory, devices) if f is not None]
    return min(free) if free else None


def free_disk(path: str | Path) -> int:
    """Free bytes on the file system holding ``path`` (its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


GIB = 1024**3


class NotEnoughDiskError(OSError):
    """The disk preflight's refusal: a step would write more than is free. Deterministic, so the
    Dagster wiring retries it neither as a step nor as a run (``operations.refusals``)."""


def require_free_space(path: str | Path, needed_bytes: int, what: str) -> None:
    """Fail before any write when the file system of ``path`` has less than ``needed_bytes`` free.

    The message names the step, both figures and the folder (``NotEnoughDiskError``).
    """
    free = free_disk(path)
    if free < needed_bytes:
        raise NotEnoughDiskError(
            f"not enough disk for {what}: it needs about {format_bytes(needed_bytes)}, "
            f"{format_bytes(free)} free at {Path(path).absolute()}; free space there or point "
            "SYNTH_XRAY_DATA at a larger disk"
        )


def format_bytes(n: int) -> str:
    """``n`` bytes in GiB (two decimals), or in MiB below a tenth of a GiB."""
    return f"{n / GIB:.2f} GiB" if n >= GIB // 10 else f"{n / 2**20:.1f} MiB"
