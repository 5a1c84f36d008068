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


_MANIFEST_COLUMNS = [
    "split",
    "label",
    "class_name",
    "source_id",
    "sha256",
    "orig_width",
    "orig_height",
    "orig_mode",
    "path",
]


@dataclass
class _Build:
    """What standardizing the splits gathers: manifest rows, skipped records, pixels, cache counts."""

    settings: DatasetSettings
    out_dir: Path
    rows: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    arrays: dict[str, list[np.ndarray]] = field(default_factory=dict)
    reused: int = 0
    decoded: int = 0

    def skip(self, split: str, rec: SourceRecord, reason: str) -> None:
        self.skipped.append({"split": split, "source_id": rec.source_id, "reason": reason})


def build_standardized_dataset(
    records: dict[str, Iterable[SourceRecord]],
    settings: DatasetSettings,
    out_dir: Path,
    log: Callable[[str], None] = print,
) -> BuildReport:
    """Standardize every record of every split into ``out_dir`` and return the manifest."""
    build = _Build(settings, out_dir)
    for split, split_records in records.items():
        _standardize_split(build, split, split_records)
        log(f"{split}: {len(build.arrays[split])} images standardized to {settings.resolution} px")
    rows, arrays, dropped = build.rows, build.arrays, []
    if settings.drop_train_test_duplicates:
        rows, arrays, dropped = _drop_duplicates_of_test(rows, arrays)
        log(f"train: {len(dropped)} images identical to a test image dropped (drop_train_test_duplicates)")
    manifest = pd.DataFrame(rows, columns=_MANIFEST_COLUMNS)
    skipped_df = pd.DataFrame(build.skipped, columns=["split", "source_id", "reason"])
    version = data_version(manifest, settings)
    counts = {"reused": build.reused, "decoded": build.decoded}
    if _complete_with_version(out_dir, version, arrays):
        # The same content is already there, complete: rewriting it would only make the folder read
        # as incomplete meanwhile to other runs' readers (a double click, a retry beside a run).
        return BuildReport(version, manifest, skipped_df, **counts)
    dropped_df = pd.DataFrame(dropped, columns=DROPPED_COLUMNS)
    _write_dataset(build, arrays, BuildReport(version, manifest, skipped_df, dropped_df))
    return BuildReport(version, manifest, skipped_df, dropped_df, **counts)


def _standardize_split(build: _Build, split: str, split_records: Iterable[SourceRecord]) -> None:
    """Standardize one split's records (reusing cached PNGs) into ``build``."""
    settings, out_dir = build.settings, build.out_dir
    build.arrays[split] = []
    todo: list[SourceRecord] = []
    for rec in split_records:
        if rec.skip_reason:
            build.skip(split, rec, rec.skip_reason)
        elif rec.label is None:
            build.skip(split, rec, f"unknown label {rec.label_name!r}")
        else:
            todo.append(rec)
    hashes = [sha256_bytes(r.data) for r in todo]
    cached = [
        _cached_png(out_dir, settings, split, settings.class_names[r.label], h) for r, h in zip(todo, hashes)
    ]
    fresh = [r.data for r, p in zip(todo, cached) if not p.exists()]
    results = iter(
        standardize_many(
            fresh, settings.resolution, settings.mode, settings.max_image_pixels, workers=settings.workers
        )
    )
    for rec, sha, png in zip(todo, hashes, cached):
        if png.exists():
            result = _read_cached_png(png, sha)
            build.reused += 1
        else:
            result = next(results)
            build.decoded += 1
            if result.pixels is not None:
                _save_png_with_origin(result, png)
        if result.pixels is None:
            build.skip(split, rec, result.reason)
            continue
        build.arrays[split].append(result.pixels)
        build.rows.append(
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


def _read_cached_png(png: Path, sha: str) -> StandardizeResult:
    """A standardized image written earlier, with the original size and mode it records."""
    with Image.open(png) as im:
        meta = json.loads(im.info.get("synth_xray", "{}"))
        return StandardizeResult(sha, np.asarray(im), tuple(meta.get("size", (0, 0))), meta.get("mode"))


def _write_dataset(build: _Build, arrays: dict[str, list[np.ndarray]], report: BuildReport) -> None:
    """Write the arrays, the skipped / dropped lists and the manifest; ``version.json`` last."""
    settings, out_dir = build.settings, build.out_dir
    shape = (0, settings.resolution, settings.resolution) + ((3,) if settings.mode == "RGB" else ())
    # Until the new version.json is written last, the folder reads as incomplete, never as the old
    # version with new arrays.
    (out_dir / "version.json").unlink(missing_ok=True)
    for split, images in arrays.items():
        stacked = np.stack(images) if images else np.zeros(shape, np.uint8)
        save_numpy_atomic(stacked, out_dir / "arrays" / f"{split}.npy")
    write_bytes_atomic(out_dir / SKIPPED_FILE, report.skipped.to_csv(index=False).encode())
    write_bytes_atomic(out_dir / DROPPED_FILE, report.dropped.to_csv(index=False).encode())
    write_parquet_atomic(report.manifest, out_dir / "manifest.parquet")
    write_json_atomic(
        out_dir / "version.json",
        {
            "version": report.version,
            "resolution": settings.resolution,
            "mode": settings.mode,
            "standardize": STANDARDIZE_VERSION,
        },
    )


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


def _complete_with_version(out_dir: Path, version: str, splits: Iterable[str]) -> bool:
    """Whether ``out_dir`` already holds this exact version, every file of it written."""
    try:
        recorded = json.loads((out_dir / "version.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        return False
    files = [out_dir / "manifest.parquet", out_dir / "skipped.csv"]
    files += [out_dir / "arrays" / f"{split}.npy" for split in splits]
    return recorded == version and all(f.is_file() for f in files)


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
