"""Filling a folder with images from a Stable Diffusion pipeline, one recorded seed per image, resumably.

``generate_set``
fills a folder with ``count`` images: image ``i`` uses seed ``seed_offset + i`` through its own
generator (each set its own ``seed_offset``: :func:`seed_stream_offset`), so it does not depend
on the batch it was made in, and a re-run after an interruption
makes only the images that are missing. Used for the synthetic images and the prior-preservation
class images alike. Given several devices, it splits the set by image index over them, one process
a device (``shards.py``), and makes the same bytes as on one.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from diffusers import StableDiffusionPipeline
from PIL import Image

from synth_xray_assets.diffusion.image_sets import MANIFEST
from synth_xray_assets.diffusion.pipelines import sample_images, use_dpm_solver
from synth_xray_assets.diffusion.shards import Shard, ShardFailed, run_shards
from synth_xray_assets.settings import GenerationSettings
from synth_xray_assets.storage import (
    remove_dead_temporaries,
    save_png_atomic,
    sha256_bytes,
    write_parquet_atomic,
)

__all__ = [
    "GenerationReport",
    "PipeFactory",
    "Recipe",
    "ShardFailed",
    "generate_set",
    "seed_stream_offset",
]


def seed_stream_offset(settings: GenerationSettings, set_name: str) -> int:
    """The first seed of image set ``set_name``'s own stream: image ``i`` uses this + ``i``.

    Each set (``normal``, ``pneumonia``, ``prior``, ``normal-r10``, ...) starts at
    ``seed_offset + crc32(set_name) * seed_stream_stride``, so no two sets share a starting noise
    (the study gave image ``i`` of every set seed ``i``).
    """
    return settings.seed_offset + zlib.crc32(set_name.encode()) * settings.seed_stream_stride


@dataclass(frozen=True)
class Recipe:
    """How every image of a set is made; image ``i`` uses seed ``seed_offset + i``."""

    prompt: str
    num_inference_steps: int
    guidance_scale: float
    resolution: int
    seed_offset: int = 0
    # More manifest columns an image must match (e.g. the checkpoint's version, the class).
    extra_columns: Mapping[str, object] = field(default_factory=dict)

    def columns(self) -> dict[str, object]:
        """The manifest columns an image must match to be kept (the seed is checked apart)."""
        return {
            "prompt": self.prompt,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": float(self.guidance_scale),
            "resolution": self.resolution,
            **self.extra_columns,
        }


@dataclass
class GenerationReport:
    manifest: pd.DataFrame
    generated: list[int]  # indices made by this call
    reused: int


# Builds the pipeline on a device. Picklable (a dataclass such as ``pipelines.TrainedPipeline``,
# not a lambda) when there are several devices: each shard's process builds its own.
PipeFactory = Callable[[str], StableDiffusionPipeline]


def generate_set(
    make_pipe: PipeFactory,
    out_dir: Path,
    count: int,
    recipe: Recipe,
    *,
    batch_size: int,
    devices: Sequence[str] = ("cpu",),
    log: Callable[[str], None] = print,
) -> GenerationReport:
    """Make images ``0..count-1`` in ``out_dir/images/``, keeping those already there.

    An existing image is kept when the manifest lists it with the same recipe (its
    ``extra_columns`` too, for example the checkpoint's version) and seed, and its file is intact; everything
    else is made (again). The manifest is rewritten atomically after every batch, so an
    interrupted run loses at most one batch. ``make_pipe(device)`` is called only if work is left.
    With several ``devices`` the set is split by image index, one process per device
    (:mod:`synth_xray_assets.diffusion.shards`; a failure raises ``ShardFailed``); the images and
    the manifest are the same bytes as on one device, as the seed is still the image index.
    """
    out_dir = Path(out_dir)
    manifest_path = out_dir / MANIFEST
    remove_dead_temporaries(out_dir / "images")  # left by a shard killed mid-write
    rows = _kept_rows(manifest_path, count, recipe.seed_offset, recipe.columns())
    reused = len(rows)
    todo = [i for i in range(count) if i not in rows]
    if todo:
        on = "" if len(devices) == 1 else f" on {len(devices)} devices"
        log(f"{len(todo)} of {count} images to make in {out_dir} ({reused} kept){on}")
        maker = _Maker(make_pipe, out_dir, recipe, batch_size)
        progress = _Progress(rows, manifest_path, len(todo), log)
        if len(devices) == 1:
            for made in maker(devices[0], todo):
                progress.add(made)
        else:
            run_shards(maker, devices, todo, progress.add_from)
    # Files beyond ``count`` (a smaller setting than last time) are left out of the manifest.
    manifest = _write_manifest(rows, manifest_path)
    return GenerationReport(manifest=manifest, generated=todo, reused=reused)


@dataclass(frozen=True)
class _Maker:
    """Makes given images of a set on a device, a batch at a time (picklable, for shards)."""

    make_pipe: PipeFactory
    out_dir: Path
    recipe: Recipe
    batch_size: int

    def __call__(self, device: str, indices: list[int]) -> Iterator[list[dict]]:
        if device.startswith("cuda:"):  # what uses the current device stays on this shard's card
            import torch

            torch.cuda.set_device(device)
        pipe = use_dpm_solver(self.make_pipe(device))
        for start in range(0, len(indices), self.batch_size):
            yield self._batch(pipe, indices[start : start + self.batch_size])

    def _batch(self, pipe: StableDiffusionPipeline, batch: list[int]) -> list[dict]:
        r = self.recipe
        seeds = [r.seed_offset + i for i in batch]
        images = sample_images(pipe, r.prompt, seeds, r.num_inference_steps, r.guidance_scale, r.resolution)
        return [self._save(i, seed, pixels) for i, seed, pixels in zip(batch, seeds, images)]

    def _save(self, i: int, seed: int, pixels: np.ndarray) -> dict:
        file = f"images/{i:05d}.png"
        save_png_atomic(Image.fromarray(pixels, mode="L"), self.out_dir / file)
        return {
            "index": i,
            "file": file,
            "seed": seed,
            **self.recipe.columns(),
            "sha256": _png_hash(self.out_dir / file),
        }


@dataclass
class _Progress:
    """The rows so far: the manifest is rewritten after every batch made, by this process alone."""

    rows: dict[int, dict]
    path: Path
    total: int
    log: Callable[[str], None]
    made: int = 0

    def add(self, made: list[dict], where: str = "") -> None:
        self.rows.update((int(row["index"]), row) for row in made)
        self.made += len(made)
        _write_manifest(self.rows, self.path)
        self.log(f"made {self.made}/{self.total} images{where}")

    def add_from(self, shard: Shard, made: list[dict]) -> None:
        self.add(made, f" (the last {len(made)} by shard {shard.number} on {shard.device})")


def _kept_rows(
    manifest_path: Path, count: int, seed_offset: int, columns: dict[str, object]
) -> dict[int, dict]:
    """The manifest rows whose image can be kept: same seed and columns, file intact."""
    rows: dict[int, dict] = {}
    if not manifest_path.exists():
        return rows
    for row in pd.read_parquet(manifest_path).to_dict("records"):
        i = int(row["index"])
        same = i < count and int(row["seed"]) == seed_offset + i
        same = same and all(_same(row.get(k), v) for k, v in columns.items())
        if same and _intact(manifest_path.parent / row["file"], row["sha256"]):
            rows[i] = row
    return rows


def _write_manifest(rows: dict[int, dict], path: Path) -> pd.DataFrame:
    frame = pd.DataFrame([rows[i] for i in sorted(rows)])
    write_parquet_atomic(frame, path)
    return frame


def _png_hash(path: Path) -> str:
    return sha256_bytes(Path(path).read_bytes())


def _intact(path: Path, sha: str) -> bool:
    return path.is_file() and _png_hash(path) == sha


def _same(a: object, b: object) -> bool:
    if isinstance(b, float):
        return a is not None and abs(float(a) - b) < 1e-9
    return a == b
