"""Where the synthetic images of a class live (``Layout.synthetic``); the set itself is a
``diffusion.image_sets.SyntheticImages``. How many there are: ``images_per_class``."""

from __future__ import annotations

from pathlib import Path

from synth_xray_assets.dataset.store import StandardizedDataset
from synth_xray_assets.diffusion.image_sets import (
    MANIFEST,
    MANIFEST_COLUMNS,
    SyntheticImages,
    manifest_version,
)
from synth_xray_assets.layout import Layout
from synth_xray_assets.settings import Settings

__all__ = [
    "MANIFEST",
    "MANIFEST_COLUMNS",
    "SyntheticImages",
    "images_per_class",
    "manifest_version",
    "synthetic_dir",
]


def synthetic_dir(data_dir: str | Path, class_key: str) -> Path:
    return Layout(Path(data_dir)).synthetic(class_key)


def images_per_class(s: Settings) -> int:
    """How many synthetic images each class gets: ``generation.images_per_class`` scaled to the real
    training split of the standardized dataset (``Settings.synthetic_count``)."""
    n_train = len(StandardizedDataset.open(s.layout.dataset).rows("train"))
    return s.synthetic_count(s.generation.images_per_class, n_train)
