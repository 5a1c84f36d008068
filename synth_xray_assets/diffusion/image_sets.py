"""A set of generated images on disk (the synthetic images of a class, the prior-preservation
class images): one PNG per image and a manifest.

Layout::

    images/{index:05d}.png   one generated image (mode L, resolution x resolution)
    manifest.parquet          index, file, class_key, label, seed, prompt, checkpoint_version, sha256

Other domains (FID, the classifier) read generated images only through ``SyntheticImages``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from synth_xray_assets.storage import combined_hash

MANIFEST = "manifest.parquet"
MANIFEST_COLUMNS = ["index", "file", "class_key", "label", "seed", "prompt", "checkpoint_version", "sha256"]


def manifest_version(manifest: pd.DataFrame) -> str:
    """The data version of a set of generated images: a hash of their PNGs' hashes."""
    return combined_hash(list(manifest["sha256"]))


@dataclass
class SyntheticImages:
    root: Path
    manifest: pd.DataFrame

    @classmethod
    def open(cls, root: str | Path) -> SyntheticImages:
        root = Path(root)
        path = root / MANIFEST
        if not path.exists():
            raise FileNotFoundError(
                f"no synthetic images at {root} (missing {MANIFEST}): materialize synthetic_images first"
            )
        return cls(root, pd.read_parquet(path).sort_values("index").reset_index(drop=True))

    def __len__(self) -> int:
        return len(self.manifest)

    def version(self) -> str:
        return manifest_version(self.manifest)

    def paths(self) -> list[Path]:
        return [self.root / f for f in self.manifest.file]

    def images(self, limit: int | None = None) -> np.ndarray:
        """uint8 [N, H, W] in manifest order (seed order)."""
        files = self.paths()[:limit] if limit is not None else self.paths()
        if not files:
            return np.zeros((0, 0, 0), dtype=np.uint8)
        return np.stack([np.asarray(Image.open(p).convert("L")) for p in files])
