"""The standardized dataset on disk: one PNG per image, a uint8 array per split, a manifest.

Layout under ``data/dataset/``::

    images/{res}px-{mode}-{version}/{split}/{CLASS}/{sha256[:20]}.png   one standardized image
    arrays/{split}.npy                         uint8 [N, res, res], manifest order
    manifest.parquet                           split, label, class_name, source_id, source_path,
                                               sha256 (source bytes), pixel_sha256 (stored pixels),
                                               orig_width, orig_height, orig_mode, path
    skipped.csv                                bad input: split, source_id, source_path, reason
    dropped.csv                                images identical to one of another split, dropped
                                               (dataset.drop_cross_split_duplicates; never from
                                               test): split, source_id, source_path, sha256,
                                               duplicate_of, reason
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

from synth_xray_assets.dataset.duplicates import DROPPED_COLUMNS, duplicates_to_drop
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

# Bump when the standardization changes its pixels or its cache (v2: EXIF orientation applied;
# v3: cached PNGs record and are checked against their source's sha256: v2 caches may hold a
# neighbour's pixels, so they are never reused).
STANDARDIZE_VERSION = "standardize-v3"

SKIPPED_FILE = "skipped.csv"  # bad input: split, source_id, source_path, reason
SKIPPED_COLUMNS = ["split", "source_id", "source_path", "reason"]
DROPPED_FILE = "dropped.csv"  # images identical to one of another split (drop_cross_split_duplicates)


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
    "source_path",
    "sha256",
    "pixel_sha256",
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
    origin: dict | None = None
    rows: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    arrays: dict[str, list[np.ndarray]] = field(default_factory=dict)
    reused: int = 0
    decoded: int = 0

    def skip(self, split: str, rec: SourceRecord, reason: str) -> None:
        self.skipped.append(
            {"split": split, "source_id": rec.source_id, "source_path": rec.source_path, "reason": reason}
        )


def build_standardized_dataset(
    records: dict[str, Iterable[SourceRecord]],
    settings: DatasetSettings,
    out_dir: Path,
    log: Callable[[str], None] = print,
    origin: dict | None = None,
) -> BuildReport:
    """Standardize every record of every split into ``out_dir`` and return the manifest.

    ``origin`` (the source's kind, location, revision and whether it is the project's phantoms) is
    recorded in ``version.json``, so that every result made from the dataset can say what it was.
    """
    build = _Build(settings, out_dir, origin=origin)
    for split, split_records in records.items():
        _standardize_split(build, split, split_records)
        log(f"{split}: {len(build.arrays[split])} images standardized to {settings.resolution} px")
    manifest = pd.DataFrame(build.rows, columns=_MANIFEST_COLUMNS)
    arrays, dropped = build.arrays, pd.DataFrame(columns=DROPPED_COLUMNS)
    if settings.drop_cross_split_duplicates:
        manifest, arrays, dropped = _drop_cross_split_duplicates(manifest, arrays)
        for row in dropped.itertuples():
            log(f"dropped {row.source_path}: {row.reason}: {row.duplicate_of}")
        log(f"{len(dropped)} images identical to one of another split dropped (drop_cross_split_duplicates)")
    skipped_df = pd.DataFrame(build.skipped, columns=SKIPPED_COLUMNS)
    report = BuildReport(data_version(manifest, settings), manifest, skipped_df, dropped)
    report.reused, report.decoded = build.reused, build.decoded
    # The same content already there, complete, is not rewritten: that would only make the folder
    # read as incomplete meanwhile to other runs' readers (a double click, a retry beside a run).
    if not _complete_with_version(build, report.version, arrays):
        _write_dataset(build, arrays, report)
    return report


def _standardize_split(build: _Build, split: str, split_records: Iterable[SourceRecord]) -> None:
    """Standardize one split's records (reusing cached PNGs) into ``build``.

    Results are matched to records by the source bytes' sha256, never by position: a split may
    hold byte-identical files (the same patient's image twice), which are decoded once.
    """
    settings, out_dir = build.settings, build.out_dir
    build.arrays[split] = []
    todo = [rec for rec in split_records if _readable(build, split, rec)]
    hashes = [sha256_bytes(r.data) for r in todo]
    pngs = [
        _cached_png(out_dir, settings, split, settings.class_names[r.label], h) for r, h in zip(todo, hashes)
    ]
    results: dict[str, StandardizeResult] = {}
    on_disk: set[Path] = set()  # cached PNGs that hold their source's pixels
    for sha, png in zip(hashes, pngs):
        if png not in on_disk and (cached := _read_cached_png(png, sha)) is not None:
            results.setdefault(sha, cached)
            on_disk.add(png)
            build.reused += 1
    fresh = {sha: rec.data for rec, sha in zip(todo, hashes) if sha not in results}
    for result in standardize_many(
        fresh.values(),
        settings.resolution,
        settings.mode,
        settings.max_image_pixels,
        workers=settings.workers,
    ):
        results[result.sha256] = result
        build.decoded += 1
    missing = set(fresh) - set(results)
    if missing:  # standardize_many returns one result per input: this would be a bug, never silent
        raise RuntimeError(f"{split}: no standardization result for {len(missing)} source hashes")
    for rec, sha, png in zip(todo, hashes, pngs):
        _add_row(build, rec, results[sha], png, cached=png in on_disk)
        on_disk.add(png)


def _readable(build: _Build, split: str, rec: SourceRecord) -> bool:
    """Whether ``rec`` is an image of a known class to standardize (else it is listed as skipped)."""
    if rec.skip_reason:
        build.skip(split, rec, rec.skip_reason)
    elif rec.label is None:
        build.skip(split, rec, f"unknown label {rec.label_name!r}")
    else:
        return True
    return False


def _add_row(build: _Build, rec: SourceRecord, result: StandardizeResult, png: Path, cached: bool) -> None:
    """``rec``'s manifest row and pixels (or its skip reason); its PNG written unless ``cached``."""
    if result.pixels is None:
        build.skip(rec.split, rec, result.reason)
        return
    if not cached:
        _save_png_with_origin(result, png)
    build.arrays[rec.split].append(result.pixels)
    build.rows.append(
        {
            "split": rec.split,
            "label": rec.label,
            "class_name": build.settings.class_names[rec.label],
            "source_id": rec.source_id,
            "source_path": rec.source_path,
            "sha256": result.sha256,
            "pixel_sha256": sha256_bytes(result.pixels.tobytes()),  # what duplicates are found by
            "orig_width": result.original_size[0],
            "orig_height": result.original_size[1],
            "orig_mode": result.original_mode,
            "path": str(png.relative_to(build.out_dir)),
        }
    )


def _read_cached_png(png: Path, sha: str) -> StandardizeResult | None:
    """A standardized image written earlier for the source bytes ``sha``, with the original size
    and mode it records; None when there is none, or it records another source (never reused)."""
    try:
        with Image.open(png) as im:
            meta = json.loads(im.info.get("synth_xray", "{}"))
            if meta.get("sha256") != sha:
                return None
            return StandardizeResult(sha, np.asarray(im), tuple(meta["size"]), meta.get("mode"))
    except (OSError, ValueError, KeyError):  # missing, half-written or foreign: decode again
        return None


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
            "origin": build.origin,
        },
    )


def _drop_cross_split_duplicates(
    manifest: pd.DataFrame, arrays: dict[str, list[np.ndarray]]
) -> tuple[pd.DataFrame, dict[str, list[np.ndarray]], pd.DataFrame]:
    """``manifest`` and ``arrays`` with each shared image in one split only, and the rows dropped."""
    dropped = duplicates_to_drop(manifest)
    keep = ~manifest.index.isin(dropped.index)
    position = manifest.groupby("split").cumcount()  # each row's place in its split's array
    kept_arrays = {
        split: [images[i] for i in position[keep & (manifest.split == split)]]
        for split, images in arrays.items()
    }
    return manifest[keep].reset_index(drop=True), kept_arrays, dropped.reset_index(drop=True)


def _complete_with_version(build: _Build, version: str, splits: Iterable[str]) -> bool:
    """Whether the output folder already holds this exact version from the same origin, every file
    of it written."""
    out_dir = build.out_dir
    try:
        recorded = json.loads((out_dir / "version.json").read_text())
    except (OSError, ValueError):
        return False
    files = [out_dir / "manifest.parquet", out_dir / "skipped.csv"]
    files += [out_dir / "arrays" / f"{split}.npy" for split in splits]
    same = recorded.get("version") == version and recorded.get("origin") == build.origin
    return same and all(f.is_file() for f in files)


def _save_png_with_origin(result: StandardizeResult, path: Path) -> None:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    meta = {"sha256": result.sha256, "size": result.original_size, "mode": result.original_mode}
    info.add_text("synth_xray", json.dumps(meta))
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
    origin: dict | None = None  # where the images came from (None: not recorded by an older build)

    @classmethod
    def open(cls, root: Path) -> StandardizedDataset:
        version_file = root / "version.json"
        if not version_file.exists():
            raise FileNotFoundError(
                f"no standardized dataset at {root}: materialize chest_xray_dataset first"
            )
        recorded = json.loads(version_file.read_text())
        manifest = pd.read_parquet(root / "manifest.parquet")
        return cls(root, manifest, recorded["version"], recorded.get("origin"))

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
