"""Filling a folder with images from a Stable Diffusion pipeline, one recorded seed per image, resumably.

``generate_set``
fills a folder with ``count`` images: image ``i`` uses seed ``seed_offset + i`` through its own
generator (each set its own ``seed_offset``: :func:`seed_stream_offset`), so it does not depend
on the batch it was made in, and a re-run after an interruption
makes only the images that are missing. Used for the synthetic images and the prior-preservation
class images alike.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from diffusers import StableDiffusionPipeline
from PIL import Image

from synth_xray_assets.diffusion.image_sets import MANIFEST
from synth_xray_assets.diffusion.pipelines import sample_images, use_dpm_solver
from synth_xray_assets.settings import GenerationSettings
from synth_xray_assets.storage import save_png_atomic, sha256_bytes, write_parquet_atomic


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


def generate_set(
    make_pipe: Callable[[], StableDiffusionPipeline],
    out_dir: Path,
    count: int,
    recipe: Recipe,
    *,
    batch_size: int,
    log: Callable[[str], None] = print,
) -> GenerationReport:
    """Make images ``0..count-1`` in ``out_dir/images/``, keeping those already there.

    An existing image is kept when the manifest lists it with the same recipe (its
    ``extra_columns`` too, for example the checkpoint's version) and seed, and its file is intact; everything
    else is made (again). The manifest is rewritten atomically after every batch, so an
    interrupted run loses at most one batch. ``make_pipe`` is called only if work is left.
    """
    out_dir = Path(out_dir)
    columns = recipe.columns()
    manifest_path = out_dir / MANIFEST
    rows = _kept_rows(manifest_path, count, recipe.seed_offset, columns)
    reused = len(rows)
    todo = [i for i in range(count) if i not in rows]
    if todo:
        log(f"{len(todo)} of {count} images to make in {out_dir} ({reused} kept)")
        pipe = use_dpm_solver(make_pipe())
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            seeds = [recipe.seed_offset + i for i in batch]
            r = recipe
            images = sample_images(
                pipe, r.prompt, seeds, r.num_inference_steps, r.guidance_scale, r.resolution
            )
            for i, seed, pixels in zip(batch, seeds, images):
                file = f"images/{i:05d}.png"
                save_png_atomic(Image.fromarray(pixels, mode="L"), out_dir / file)
                rows[i] = {
                    "index": i,
                    "file": file,
                    "seed": seed,
                    **columns,
                    "sha256": _png_hash(out_dir / file),
                }
            _write_manifest(rows, manifest_path)
            log(f"made {min(start + batch_size, len(todo))}/{len(todo)} images")
    # Files beyond ``count`` (a smaller setting than last time) are left out of the manifest.
    manifest = _write_manifest(rows, manifest_path)
    return GenerationReport(manifest=manifest, generated=todo, reused=reused)


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
