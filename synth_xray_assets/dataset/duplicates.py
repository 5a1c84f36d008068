"""The same image in more than one split: found, named by file, and (on request) dropped.

"The same" is the same stored pixels (``pixel_sha256``; the source bytes' ``sha256`` for a
manifest without it): byte-identical files, and also copies re-encoded to the same pixels.

Real chest-X-ray sets hold such copies (the Kermany originals: 6 train-test, 4 train-validation
and 1 validation-test group). A copy on both sides of an evaluation leaks it, so the blocking
check ``no_duplicates_across_splits`` fails on any, naming the files, and
``dataset.drop_cross_split_duplicates`` keeps each such image in one split only: test first,
then validation, then any other split, train last. Nothing is ever dropped from test.

Within train, copies stay together on one side of the carved validation split (``splits.py``
groups them with their patient), so no pair straddles it.
"""

from __future__ import annotations

import pandas as pd

KEEP_FIRST = ("test", "validation")  # a shared image stays in the first of these it is in
DROPPED_COLUMNS = ["split", "source_id", "source_path", "sha256", "duplicate_of", "reason"]
SHARED_COLUMNS = ["content", "splits", "files"]


def content_key(manifest: pd.DataFrame) -> pd.Series:
    """What makes two rows the same image: their stored pixels' hash, else their source bytes'."""
    return manifest["pixel_sha256"] if "pixel_sha256" in manifest else manifest["sha256"]


def keep_rank(split: str) -> int:
    """Lower keeps: test 0, validation 1, any other split 2, train 3."""
    if split in KEEP_FIRST:
        return KEEP_FIRST.index(split)
    return len(KEEP_FIRST) + (split == "train")


def file_names(manifest: pd.DataFrame) -> pd.Series:
    """Each row's file as a person finds it (``source_path``; the ``source_id`` where none)."""
    if "source_path" not in manifest:
        return manifest.source_id.astype(str)
    paths = manifest.source_path.fillna("").astype(str)
    return paths.where(paths != "", manifest.source_id.astype(str))


def cross_split_duplicates(manifest: pd.DataFrame) -> pd.DataFrame:
    """Every image in more than one split: ``content`` (its hash), ``splits``, ``files`` (named)."""
    m = manifest.assign(file=file_names(manifest), key=content_key(manifest))
    n_splits = m.groupby("key").split.nunique()
    shared = m[m.key.isin(n_splits[n_splits > 1].index)]
    rows = [
        {
            "content": key,
            "splits": ", ".join(sorted(set(g.split), key=keep_rank)),
            "files": "; ".join(g.file),
        }
        for key, g in shared.groupby("key", sort=True)
    ]
    return pd.DataFrame(rows, columns=SHARED_COLUMNS)


def duplicates_to_drop(manifest: pd.DataFrame) -> pd.DataFrame:
    """The rows to drop so that each shared image stays in one split (test first, never dropped
    from test), indexed as ``manifest``, with what each duplicates and why."""
    m = manifest.assign(
        file=file_names(manifest), rank=manifest.split.map(keep_rank), key=content_key(manifest)
    )
    kept_rank = m.groupby("key")["rank"].transform("min")
    gone = m[m["rank"] > kept_rank]
    kept = m[m["rank"] == kept_rank]
    kept_files = kept.groupby("key").file.agg("; ".join)
    kept_split = kept.groupby("key").split.first()
    out = gone.assign(
        source_path=gone.file,
        duplicate_of=gone.key.map(kept_files),
        reason="identical to a " + gone.key.map(kept_split) + " image (kept there)",
    )
    return out[DROPPED_COLUMNS]


def straddling_validation(train_rows: pd.DataFrame, keep: list[int], val: list[int]) -> pd.DataFrame:
    """Images of train on both sides of the carved validation split, with their files."""
    side = pd.Series("train", index=train_rows.index)
    side.iloc[list(val)] = "carved validation"
    rows = train_rows.assign(split=side.to_numpy())
    return cross_split_duplicates(rows.iloc[sorted(list(keep) + list(val))])
