"""Time DreamBooth steps on random images in a temporary folder (shared by dreambooth.py and gpu.py)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from synth_xray_assets.dreambooth.training import RunDirs, RunInputs, TrainResult, train_dreambooth
from synth_xray_assets.settings import DreamBoothSettings


def timed_dreambooth(
    base: str | Path, instance: np.ndarray, class_images: np.ndarray, db: DreamBoothSettings, device: str
) -> tuple[float, TrainResult]:
    """Train on the NORMAL prompt; steps per second after the first two (warm-up: allocations,
    kernel selection) and the run's result."""
    times: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        result = train_dreambooth(
            RunInputs(Path(base), instance, class_images, db.instance_prompts["normal"]),
            db,
            RunDirs(Path(tmp) / "out", Path(tmp) / "work"),
            device,
            log=lambda m: None,
            on_step=lambda step, metrics: times.append(time.perf_counter()),
        )
    steady = (len(times) - 2) / (times[-1] - times[1]) if len(times) > 2 else float("nan")
    return steady, result
