"""Where the DreamBooth domain keeps its models and images under ``data/``.

models/base/                   the tiny demo base model (diffusers layout)
models/hub/                    the Hub cache of the full profile's base model
models/base_model.json         which folder the ``base_model`` asset made, and its version
prior/images/{i:05d}.png       prior-preservation class images made by the base model
prior/manifest.parquet
models/dreambooth/{class}/     a fine-tuned pipeline (full) or LoRA weights (lora)
models/dreambooth/.work-{class}/checkpoint-<step>/   resumable training state
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from synth_xray_assets.diffusion.image_sets import SyntheticImages
from synth_xray_assets.layout import Layout


def models_dir(data_dir: str | Path) -> Path:
    return Layout(Path(data_dir)).models


def base_model_record(data_dir: str | Path) -> Path:
    return Layout(Path(data_dir)).base_model_record


def base_model_path(data_dir: str | Path) -> Path:
    """The folder of the base pipeline the ``base_model`` asset made (a clear error if none)."""
    record = base_model_record(data_dir)
    if not record.is_file():
        raise FileNotFoundError(f"no base model recorded at {record}: materialize base_model first")
    path = Path(json.loads(record.read_text())["path"])
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"the base model folder {path} (from {record}) is missing or incomplete")
    return path


def prior_dir(data_dir: str | Path) -> Path:
    return Layout(Path(data_dir)).prior


def prior_images(data_dir: str | Path) -> np.ndarray:
    """The prior-preservation class images, uint8 ``[N, H, W]`` (the base model's own images)."""
    return SyntheticImages.open(prior_dir(data_dir)).images()


def checkpoint_dir(data_dir: str | Path, class_key: str) -> Path:
    return Layout(Path(data_dir)).dreambooth_checkpoint(class_key)


def work_dir(data_dir: str | Path, class_key: str) -> Path:
    return Layout(Path(data_dir)).dreambooth_work(class_key)
