"""The demo dataset: synthetic chest radiograph phantoms, NOT real patients.

A deterministic generator of grayscale frontal chest radiograph look-alikes in two classes,
NORMAL (clear lung fields) and PNEUMONIA (patchy or lobar opacities inside the lungs), with
varied sizes and aspect ratios like real scans, written in the Hub dataset's own parquet
layout (``data/{split}-00000-of-00001.parquet``; features ``image`` and ``label``, a
ClassLabel NORMAL/PNEUMONIA), so that ``datasets.load_dataset(folder)`` reads it exactly as
it reads ``hf-vision/chest-xray-pneumonia``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from synth_xray_assets.dataset.standardize import standardize_bytes
from synth_xray_assets.settings import CLASS_NAMES, DatasetSettings, PhantomSettings
from synth_xray_assets.storage import atomic_path, combined_hash, write_bytes_atomic

PHANTOM_README = """# Synthetic chest radiograph phantoms (demo data, not real patients)

Made by `synth_xray_assets.dataset.phantoms` from settings `{fingerprint}`. Drawn shapes
(body, lungs, spine, ribs, heart) plus opacities for PNEUMONIA: a stand-in for
`hf-vision/chest-xray-pneumonia` where there is no network. Same layout as the Hub dataset.
"""
# The held-out reference's seed stream: a name no split of the parquet takes.
HELD_OUT = "held-out-reference"


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2


def render_phantom(label: int, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """One phantom as a uint8 [height, width] array; ``label`` 1 adds pneumonia opacities."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yy /= height
    xx /= width
    img = np.full((height, width), 0.08, np.float32)
    # soft tissue of the torso
    torso = _ellipse(yy, xx, 0.62, 0.5, 0.55, 0.46 + rng.uniform(-0.03, 0.03))
    img += 0.45 * np.clip(1.2 - torso, 0, 1)
    # lungs: two dark fields either side of the mediastinum
    lung_y = 0.5 + rng.uniform(-0.03, 0.03)
    lungs = []
    for side in (-1, 1):
        cx = 0.5 + side * (0.19 + rng.uniform(-0.02, 0.02))
        d = _ellipse(yy, xx, lung_y, cx, 0.30 + rng.uniform(-0.02, 0.02), 0.13 + rng.uniform(-0.01, 0.01))
        mask = np.clip((1.0 - d) * 2.5, 0, 1)
        lungs.append((mask, cx))
        img -= 0.32 * mask
    lung_mask = np.clip(lungs[0][0] + lungs[1][0], 0, 1)
    # ribs: faint bright arcs across the lungs
    phase = rng.uniform(0, 2 * np.pi)
    ribs = 0.5 + 0.5 * np.sin(yy * 2 * np.pi * 9 + phase + 6 * (xx - 0.5) ** 2)
    img += 0.07 * ribs * lung_mask
    # spine and heart
    img += 0.30 * np.exp(-(((xx - 0.5) / 0.035) ** 2)) * (yy > 0.15)
    heart = _ellipse(yy, xx, 0.64, 0.46 + rng.uniform(-0.02, 0.02), 0.13, 0.12)
    img += 0.16 * np.clip((1.0 - heart) * 2, 0, 1)
    if label == 1:
        if rng.random() < 0.5:  # lobar: a dense region in the lower part of one lung
            mask, cx = lungs[int(rng.integers(2))]
            lower = 1 / (1 + np.exp(-(yy - (lung_y + rng.uniform(0.0, 0.1))) * 30))
            img += 0.30 * mask * lower
        else:  # patchy: several soft blobs inside the lungs
            for _ in range(int(rng.integers(3, 7))):
                mask, cx = lungs[int(rng.integers(2))]
                by = lung_y + rng.uniform(-0.2, 0.22)
                bx = cx + rng.uniform(-0.08, 0.08)
                r = rng.uniform(0.04, 0.09)
                blob = np.exp(-(((yy - by) ** 2 + (xx - bx) ** 2) / (2 * r * r)))
                img += 0.35 * blob * mask
    img += rng.normal(0, 0.025, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def phantom_fingerprint(settings: PhantomSettings) -> str:
    """A version of the generator's output: same settings, same images (the held-out reference,
    which the parquet does not hold, left out)."""
    dumped = settings.model_dump(mode="json", exclude={"held_out_counts"})
    return combined_hash([json.dumps(dumped, sort_keys=True), "phantoms-v1"])


def generate_phantom_split(settings: PhantomSettings, split: str) -> tuple[list[bytes], list[int]]:
    """JPEG bytes and labels of one split, deterministic in (settings, split)."""
    return _render_split(settings, split, settings.split_counts[split])


def held_out_phantoms(phantoms: PhantomSettings, dataset: DatasetSettings, label: int) -> np.ndarray:
    """The held-out reference phantoms of class ``label`` (``phantoms.held_out_counts``), standardized
    like the stored dataset (uint8 ``[N, res, res]``): their own seed stream, in no split, so no
    generator and no classifier sees them."""
    images, labels = _render_split(phantoms, HELD_OUT, phantoms.held_out_counts)
    out = [
        standardize_bytes(b, dataset.resolution, dataset.mode).pixels
        for b, y in zip(images, labels, strict=True)
        if y == label
    ]
    return np.stack(out) if out else np.zeros((0, dataset.resolution, dataset.resolution), np.uint8)


def _render_split(
    settings: PhantomSettings, split: str, counts: tuple[int, ...]
) -> tuple[list[bytes], list[int]]:
    """JPEG bytes and labels of ``counts`` (NORMAL, PNEUMONIA) phantoms from ``split``'s seed stream."""
    n_normal, n_pneumonia = counts
    labels = [0] * n_normal + [1] * n_pneumonia
    split_seed = settings.seed + sum(ord(c) for c in split) * 7919
    order = np.random.default_rng(split_seed).permutation(len(labels))
    images = []
    for k, i in enumerate(order):
        rng = np.random.default_rng([split_seed, k])
        side = rng.integers(settings.min_side, settings.max_side + 1)
        aspect = rng.uniform(0.75, 1.35)  # width / height, like real scans
        width, height = int(side * aspect), int(side)
        arr = render_phantom(labels[i], width, height, rng)
        buf = io.BytesIO()
        Image.fromarray(arr, "L").save(buf, format="JPEG", quality=92)
        images.append(buf.getvalue())
    return images, [labels[i] for i in order]


def write_phantom_dataset(settings: PhantomSettings, out_dir: Path) -> Path:
    """Write the phantoms in the Hub parquet layout under ``out_dir`` (skipped when already there)."""
    import datasets  # heavy import, only when writing

    fingerprint = phantom_fingerprint(settings)
    stamp = out_dir / "FINGERPRINT"
    if stamp.exists() and stamp.read_text().strip() == fingerprint:
        return out_dir
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASS_NAMES))}
    )
    with atomic_path(out_dir) as tmp:
        (tmp / "data").mkdir(parents=True)
        for split in settings.split_counts:
            images, labels = generate_phantom_split(settings, split)
            rows = {"image": [{"bytes": b, "path": None} for b in images], "label": labels}
            ds = datasets.Dataset.from_dict(rows, features=features)
            ds.to_parquet(str(tmp / "data" / f"{split}-00000-of-00001.parquet"))
        (tmp / "README.md").write_text(PHANTOM_README.format(fingerprint=fingerprint))
        write_bytes_atomic(tmp / "FINGERPRINT", fingerprint.encode())
    return out_dir
