"""Where the synthetic images of a class live (``Layout.synthetic``); the set itself is a
``diffusion.image_sets.SyntheticImages``."""

from __future__ import annotations

from pathlib import Path

from synth_xray_assets.diffusion.image_sets import (
    MANIFEST,
    MANIFEST_COLUMNS,
    SyntheticImages,
    manifest_version,
)
from synth_xray_assets.layout import Layout

__all__ = ["MANIFEST", "MANIFEST_COLUMNS", "SyntheticImages", "manifest_version", "synthetic_dir"]


def synthetic_dir(data_dir: str | Path, class_key: str) -> Path:
    return Layout(Path(data_dir)).synthetic(class_key)
