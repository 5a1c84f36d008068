"""The standardized dataset on disk: one PNG per image, a uint8 array per split, a manifest.

Layout under ``data/dataset/``::

    images/{res}px-{mode}-{version}/{split}/{CLASS}/{sha256[:20]}.png   one standardized image
    arrays/{split}.npy                         uint8 [N, res, res], manifest order
    manifest.parquet                           split, label, class_name, source_id, sha256,
                                               orig_width, orig_height, orig_mode, path
    skipped.csv                                bad input: split, source_id, reason
    dropped.csv                                train images identical to a test image, dropped
                                               (dataset.drop_train_test_duplicates): split,
                                               source_id, sha256, duplicate_of
    version.json                               data version and what it was made from

The data version is a content hash (image hashes, labels, splits, resolution, mode), so an
unchanged source gives the same version and downstream assets stay fresh. A re-run reuses
images already standardized (by content hash) instead of decoding them again.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from synth_xray_assets.dataset.sources import SourceRecord
from synth_xray_assets.dataset.standardize import StandardizeResult, standardize_many
from synth_xray_assets.settings import DatasetSettings
from synth_xray_assets.storage import (
    atomic_path,
    combined_hash,
    save_numpy_atomic,
    sha256_bytes,
    write_bytes_atomic,
    write_json_atomic,
    write_parquet_atomic,
)

# Bump when the standardization changes its pixels (v2: EXIF orientation applied).
STANDARDIZE_VERSION = "standardize-v2"

SKIPPED_FILE = "skipped.csv"  # bad input: split, source_id, reason
DROPPED_FILE = "dropped.csv"  # train images identical to a test image (drop_train_test_duplicates)
DROPPED_COLUMNS = ["split", "source_id", "sha256", "duplicate_of"]


@dataclass
class BuildReport:
    version: str
    manifest: pd.DataFrame
    skipped: pd.DataFrame
    dropped: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=DROPPED_COLUMNS))
    reused: int = 0
    decoded: int = 0
    extra: dict = field(default_factory=dict)


def _cached_png(out_dir: Path, settings: DatasetSettings, split: str, class_name: str, sha: str) -> Path:
    # Keyed by what shapes the pixels, so a new resolution or mode never reuses old images.
    recipe = f"{settings.resolution}px-{settings.mode}-{STANDARDIZE_VERSION}"
    return out_dir / "images" / recipe / split / class_name / f"{sha[:20]}.png"


def build_standardized_dataset(
    records: dict[str, Iterable[SourceRecord]],
    settings: DatasetSettings,
    out_dir: Path,
    log: Callable[[str], None] = print,
) -> BuildReport:
    """Standardize every record of every split into ``out_dir`` and return the manifest."""
    rows: list[dict] = []
    skipped: list[dict] = []
    arrays: dict[str, list[np.ndarray]] = {}
    reused = decoded = 0
    for split, split_records in records.items():
        arrays[split] = []
        todo: list[SourceRecord] = []
        for rec in split_records:
            if rec.skip_reason:
                skipped.append({"split": split, "source_id": rec.source_id, "reason": rec.skip_reason})
                continue
            if rec.label is None:
                skipped.append(
                    {
                        "split": split,
                        "source_id": rec.source_id,
                        "reason": f"unknown label {rec.label_name!r}",
                    }
                )
                continue
            todo.append(rec)
        hashes = [sha256_bytes(r.data) for r in todo]
        cached = [
            _cached_png(out_dir, settings, split, settings.class_names[r.label], h)
            for r, h in zip(todo, hashes)
        ]
        fresh = [r.data for r, p in zip(todo, cached) if not p.exists()]
        results = iter(
            standardize_many(
                fresh, settings.resolution, settings.mode, settings.max_image_pixels, workers=settings.workers
            )
        )
        for rec, sha, png in zip(todo, hashes, cached):
            if png.exists():
                with Image.open(png) as im:
                    meta = json.loads(im.info.get("synth_xray", "{}"))
                    result = StandardizeResult(
                        sha, np.asarray(im), tuple(meta.get("size", (0, 0))), meta.get("mode")
                    )
                reused += 1
            else:
                result = next(results)
                decoded += 1
                if result.pixels is not None:
                    _save_png_with_origin(result, png)
            if result.pixels is None:
                skipped.append({"split": split, "source_id": rec.source_id, "reason": result.reason})
                continue
            arrays[split].append(result.pixels)
            rows.append(
                {
                    "split": split,
                    "label": rec.label,
                    "class_name": settings.class_names[rec.label],
                    "source_id": rec.source_id,
                    "sha256": sha,
                    "orig_width": result.original_size[0],
                    "orig_height": result.original_size[1],
                    "orig_mode": result.original_mode,
                    "path": str(png.relative_to(out_dir)),
                }
            )
        log(f"{split}: {len(arrays[split])} images standardized to {settings.resolution} px")
    dropped: list[dict] = []
    if settings.drop_train_test_duplicates:
        rows, arrays, dropped = _drop_duplicates_of_test(rows, arrays)
        log(f"train: {len(dropped)} images identical to a test image dropped (drop_train_test_duplicates)")
    manifest = pd.DataFrame(
        rows,
        columns=[
            "split",
            "label",
            "class_name",
            "source_id",
            "sha256",
            "orig_width",
            "orig_height",
            "orig_mode",
            "path",
        ],
    )
    skipped_df = pd.DataFrame(skipped, columns=["split", "source_id", "reason"])
    version = data_version(manifest, settings)
    shape = (0, settings.resolution, settings.resolution) + ((3,) if settings.mode == "RGB" else ())
    # Until the new version.json is written last, the folder reads as incomplete, never as the old
    # version with new arrays.
    (out_dir / "version.json").unlink(missing_ok=True)
    for split, images in arrays.items():
        stacked = np.stack(images) if images else np.zeros(shape, np.uint8)
        save_numpy_atomic(stacked, out_dir / "arrays" / f"{split}.npy")
    write_bytes_atomic(out_dir / SKIPPED_FILE, skipped_df.to_csv(index=False).encode())
    dropped_df = pd.DataFrame(dropped, columns=DROPPED_COLUMNS)
    write_bytes_atomic(out_dir / DROPPED_FILE, dropped_df.to_csv(index=False).encode())
    write_parquet_atomic(manifest, out_dir / "manifest.parquet")
    write_json_atomic(
        out_dir / "version.json",
        {
            "version": version,
            "resolution": settings.resolution,
            "mode": settings.mode,
            "standardize": STANDARDIZE_VERSION,
        },
    )
    return BuildReport(version, manifest, skipped_df, dropped_df, reused=reused, decoded=decoded)


def _drop_duplicates_of_test(
    rows: list[dict], arrays: dict[str, list[np.ndarray]]
) -> tuple[list[dict], dict[str, list[np.ndarray]], list[dict]]:
    """``rows`` and ``arrays`` without the train images identical to a test image, and those dropped."""
    dropped = _duplicates_of_test(rows)
    gone = {d["source_id"] for d in dropped}  # source ids are unique within a split
    train_rows = [r for r in rows if r["split"] == "train"]
    kept = [a for a, r in zip(arrays.get("train", []), train_rows) if r["source_id"] not in gone]
    rows = [r for r in rows if not (r["split"] == "train" and r["source_id"] in gone)]
    return rows, {**arrays, "train": kept} if "train" in arrays else arrays, dropped


def _duplicates_of_test(rows: list[dict]) -> list[dict]:
    """Train rows whose source bytes equal a test image's, each with the test files it duplicates."""
    test_files: dict[str, list[str]] = {}
    for r in rows:
        if r["split"] == "test":
            test_files.setdefault(r["sha256"], []).append(r["source_id"])
    return [
        {
            **{k: r[k] for k in ("split", "source_id", "sha256")},
            "duplicate_of": "; ".join(test_files[r["sha256"]]),
        }
        for r in rows
        if r["split"] == "train" and r["sha256"] in test_files
    ]


def train_test_duplicates(manifest: pd.DataFrame) -> pd.DataFrame:
    """Images in both train and test (same source bytes): the content hash and the files on each side."""
    split_files = manifest.groupby(["sha256", "split"]).source_id.agg("; ".join).unstack()
    columns = ["sha256", "train", "test"]
    if not {"train", "test"} <= set(split_files.columns):
        return pd.DataFrame(columns=columns)
    shared = split_files.dropna(subset=["train", "test"]).reset_index()
    return shared[columns].sort_values("sha256").reset_index(drop=True)


def _save_png_with_origin(result: StandardizeResult, path: Path) -> None:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("synth_xray", json.dumps({"size": result.original_size, "mode": result.original_mode}))
    img = Image.fromarray(result.pixels)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG", pnginfo=info)


def data_version(manifest: pd.DataFrame, settings: DatasetSettings) -> str:
    """Content hash of what the standardized dataset holds."""
    parts = [f"{r.split}:{r.label}:{r.sha256}:{r.source_id}" for r in manifest.itertuples()]
    parts.append(f"{settings.resolution}:{settings.mode}:{STANDARDIZE_VERSION}")
    return combined_hash(parts)


@dataclass
class StandardizedDataset:
    """Read access to a built dataset, for downstream assets."""

    root: Path
    manifest: pd.DataFrame
    version: str

    @classmethod
    def open(cls, root: Path) -> StandardizedDataset:
        version_file = root / "version.json"
        if not version_file.exists():
            raise FileNotFoundError(
                f"no standardized dataset at {root}: materialize chest_xray_dataset first"
            )
        version = json.loads(version_file.read_text())["version"]
        return cls(root, pd.read_parquet(root / "manifest.parquet"), version)

    def images(self, split: str, label: int | None = None) -> np.ndarray:
        """uint8 [N, res, res] of ``split`` (optionally one class), in manifest order."""
        arr = np.load(self.root / "arrays" / f"{split}.npy", mmap_mode="r")
        if label is None:
            return np.asarray(arr)
        return np.asarray(arr[self.labels(split) == label])

    def labels(self, split: str) -> np.ndarray:
        return self.manifest.loc[self.manifest.split == split, "label"].to_numpy(np.int64)

    def rows(self, split: str) -> pd.DataFrame:
        return self.manifest[self.manifest.split == split].reset_index(drop=True)
