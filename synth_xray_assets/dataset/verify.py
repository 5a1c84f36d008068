"""Re-derive stored images from their source: the proof that every stored row holds its own pixels.

A seeded random sample of the manifest's rows (every row of a small dataset) is read again from
the source, its bytes checked against the recorded sha256, standardized afresh and compared
pixel for pixel with what the dataset stores at that row.

Every row of a stored dataset, from the command line (the settings from the environment, as for
the platform; ``HF_TOKEN`` for a gated Hub source)::

    python -m synth_xray_assets.dataset.verify --all
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import numpy as np
import pandas as pd

from synth_xray_assets.dataset.duplicates import file_names
from synth_xray_assets.dataset.sources import SourceRecord, load_source, record_at, resolve_source
from synth_xray_assets.dataset.standardize import standardize_many
from synth_xray_assets.dataset.store import StandardizedDataset
from synth_xray_assets.settings import DatasetSettings, Settings, load_settings
from synth_xray_assets.storage import sha256_bytes

MISMATCH_COLUMNS = ["split", "row", "file", "problem"]
Fetch = Callable[[str, int], SourceRecord]  # (split, source row index) -> the source's record


def source_row(source_id: str) -> int:
    """The source row index in a manifest ``source_id`` (``train/12:IM-0001-0001.jpeg`` -> 12)."""
    return int(str(source_id).split(":")[0].split("/")[1])


def sample_positions(n_rows: int, n: int | None, seed: int) -> np.ndarray:
    """Sorted manifest positions to verify: ``n`` drawn with ``seed``, or every row when fewer
    (or ``n`` is None)."""
    if n is None or n >= n_rows:
        return np.arange(n_rows)
    return np.sort(np.random.default_rng(seed).choice(n_rows, size=n, replace=False))


def reverify(s: Settings, token: str | None, n: int | None) -> tuple[int, pd.DataFrame]:
    """Re-derive ``n`` seeded rows (``dataset.verify_seed``; None: every row) of the stored dataset
    of ``s`` from its source: how many were verified, and those that differ."""
    ds = StandardizedDataset.open(s.layout.dataset)
    resolved = resolve_source(s)
    dsd = load_source(resolved, s, token)
    names = s.dataset.class_names
    positions = sample_positions(len(ds.manifest), n, s.dataset.verify_seed)
    bad = verify_rows(ds, lambda split, i: record_at(dsd, split, i, names, resolved), s.dataset, positions)
    return len(positions), bad


def verify_rows(
    ds: StandardizedDataset, fetch: Fetch, settings: DatasetSettings, positions: np.ndarray
) -> pd.DataFrame:
    """The rows at ``positions`` whose stored pixels differ from their re-standardized source."""
    m = ds.manifest.assign(file=file_names(ds.manifest), pos=ds.manifest.groupby("split").cumcount())
    rows = m.iloc[positions]
    records = {i: fetch(r.split, source_row(r.source_id)) for i, r in rows.iterrows()}
    data = {sha256_bytes(rec.data): rec.data for rec in records.values()}
    results = {
        res.sha256: res
        for res in standardize_many(
            data.values(),
            settings.resolution,
            settings.mode,
            settings.max_image_pixels,
            workers=settings.workers,
        )
    }
    arrays = {split: np.load(ds.root / "arrays" / f"{split}.npy", mmap_mode="r") for split in set(rows.split)}
    bad = []
    for i, r in rows.iterrows():
        problem = _problem(r, sha256_bytes(records[i].data), results, arrays[r.split][r.pos])
        if problem:
            bad.append({"split": r.split, "row": int(r.pos), "file": r.file, "problem": problem})
    return pd.DataFrame(bad, columns=MISMATCH_COLUMNS)


def _problem(row: pd.Series, sha: str, results: dict, stored: np.ndarray) -> str | None:
    """What is wrong with one stored row, or None."""
    if sha != row.sha256:
        return f"the source's bytes changed since the build (sha256 {sha[:12]} != {row.sha256[:12]})"
    fresh = results[sha]
    if fresh.pixels is None:
        return f"the source no longer standardizes: {fresh.reason}"
    if fresh.pixels.shape != stored.shape or not np.array_equal(fresh.pixels, stored):
        diff = (
            np.abs(fresh.pixels.astype(np.int16) - stored.astype(np.int16)).mean()
            if fresh.pixels.shape == stored.shape
            else None
        )
        return "stored pixels differ from the source's" + (
            f" (mean |diff| {diff:.1f})" if diff is not None else ""
        )
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description="Re-derive stored dataset rows from their source.")
    parser.add_argument("--all", action="store_true", help="every row (default: dataset.verify_sample)")
    args = parser.parse_args()
    s = load_settings()
    n, bad = reverify(s, os.environ.get("HF_TOKEN"), None if args.all else s.dataset.verify_sample)
    for r in bad.itertuples():
        print(f"stored {r.split} row {r.row} ({r.file}): {r.problem}")
    print(f"{s.layout.dataset}: {n} stored rows re-derived from their source, {len(bad)} differ")
    raise SystemExit(1 if len(bad) else 0)


if __name__ == "__main__":
    main()
