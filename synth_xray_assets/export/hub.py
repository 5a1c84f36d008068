"""A generator's synthetic images as a Hugging Face dataset others can load.

The real set's features (``image`` an Image, ``label`` a ClassLabel of the class names) plus
provenance columns (:data:`COLUMNS`): how each image was made, and its evaluation scores, joined
from ``class_fidelity`` and ``memorization`` by the image's PNG sha256, never by position.

Layout (``Layout.hub_dataset(generator)``), the Hub's own::

    data/{split}-{i:05d}-of-{n:05d}.parquet   the images (PNG bytes) and their columns
    README.md                                   the dataset card (``card.py``)

``datasets.load_dataset("parquet", data_dir=folder)`` reads it; so does the Hub, once pushed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from synth_xray_assets.storage import atomic_path, combined_hash, sha256_bytes, sha256_file

CARD = "README.md"

# Provenance columns: (name, datasets Value dtype, what it holds). The same for every image of a
# set: generator .. resolution and extractor_sha256; the rest per image.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("generator", "string", "the generator (partition key): a class, or a class and limited real fraction"),
    ("generator_method", "string", "how the generator was made from the base model"),
    ("base_model", "string", "the base model the generator was fine-tuned from"),
    ("checkpoint_version", "string", "content hash of the fine-tuned checkpoint that made the image"),
    ("prompt", "string", "the prompt"),
    ("seed", "int64", "the image's own seed (image i of a set: the set's first seed + i)"),
    ("sampler", "string", "the sampler"),
    ("num_inference_steps", "int64", "sampler steps"),
    ("guidance_scale", "float64", "classifier-free guidance scale"),
    ("resolution", "int64", "image side in pixels"),
    ("synthetic_sha256", "string", "sha256 of the image's PNG bytes (the key every score is joined by)"),
    ("class_score", "float64", "the real-trained feature extractor's probability of the image's label"),
    ("extractor_sha256", "string", "sha256 of the feature extractor's weights"),
    ("nearest_real_cosine_distance", "float64", "cosine distance to the nearest real training image"),
    ("nearest_real_source_id", "string", "that nearest real image (by features) in the source dataset"),
    ("nearest_real_pixel_correlation", "float64", "pixel correlation with the nearest real image by pixels"),
    ("nearest_real_source_id_pixel", "string", "that nearest real image (by pixels) in the source dataset"),
    ("near_copy", "bool", "either distance past its near-copy threshold"),
)
# Where the per-image scores come from: the evaluation tables' columns, renamed.
CLASS_SCORE_COLUMNS = {"class_score": "class_score"}
MEMORIZATION_COLUMNS = {
    "cosine_distance": "nearest_real_cosine_distance",
    "nearest_real_source_id": "nearest_real_source_id",
    "pixel_correlation": "nearest_real_pixel_correlation",
    "nearest_real_source_id_pixel": "nearest_real_source_id_pixel",
    "near_copy": "near_copy",
}
KEY = "synthetic_sha256"


class ScoresDoNotMatchError(ValueError):
    """An evaluation table does not score the images on disk now (stale, or made by older code)."""


@dataclass(frozen=True)
class SetProvenance:
    """What is the same for every image of one generator's set."""

    generator: str
    generator_method: str
    base_model: str
    sampler: str
    extractor_sha256: str


@dataclass(frozen=True)
class HubLayout:
    """Where the files go: the split's name, images per parquet file, and the class names (labels)."""

    split: str
    shard_rows: int
    class_names: tuple[str, ...]


def scores_by_hash(table: pd.DataFrame, columns: dict[str, str], asset: str) -> pd.DataFrame:
    """``table``'s ``columns`` (renamed) indexed by the image's sha256; a clear error when the
    table keeps no hashes (made by older code). Identical images have identical scores: one row each."""
    if KEY not in table.columns:
        raise ScoresDoNotMatchError(f"{asset} keeps no per-image {KEY}: materialize {asset} again")
    missing = sorted(set(columns) - set(table.columns))
    if missing:
        raise ScoresDoNotMatchError(f"{asset} has no column {', '.join(missing)}: materialize {asset} again")
    keyed = table.drop_duplicates(KEY).set_index(KEY)[list(columns)]
    return keyed.rename(columns=columns)


def export_table(
    manifest: pd.DataFrame,
    scores: Sequence[tuple[str, pd.DataFrame]],
    provenance: SetProvenance,
    label: int,
) -> pd.DataFrame:
    """One row per image of ``manifest`` (its order): file, label and every column of :data:`COLUMNS`.

    ``scores`` are ``(asset, table)`` pairs already keyed by sha256 (:func:`scores_by_hash`); an
    image one of them does not score is an error naming the asset to materialize again.
    """
    keys = manifest["sha256"].astype(str)
    table = pd.DataFrame(
        {
            "file": manifest["file"].to_numpy(),
            "label": label,
            **{name: getattr(provenance, name) for name in ("generator", "generator_method", "base_model")},
            "checkpoint_version": manifest["checkpoint_version"].astype(str).to_numpy(),
            "prompt": manifest["prompt"].to_numpy(),
            "seed": manifest["seed"].astype("int64").to_numpy(),
            "sampler": provenance.sampler,
            "num_inference_steps": manifest["num_inference_steps"].astype("int64").to_numpy(),
            "guidance_scale": manifest["guidance_scale"].astype("float64").to_numpy(),
            "resolution": manifest["resolution"].astype("int64").to_numpy(),
            KEY: keys.to_numpy(),
            "extractor_sha256": provenance.extractor_sha256,
        }
    )
    for asset, keyed in scores:
        unscored = keys[~keys.isin(keyed.index)]
        if len(unscored):
            raise ScoresDoNotMatchError(
                f"{asset} does not score {len(unscored)} of the {len(keys)} synthetic images on disk now "
                f"(first: {manifest['file'].iloc[unscored.index[0]]}): materialize {asset} again"
            )
        extra = len(set(keyed.index) - set(keys))
        if extra:
            raise ScoresDoNotMatchError(
                f"{asset} scores {extra} images that are not in the synthetic set on disk now: "
                f"materialize {asset} again"
            )
        for column in keyed.columns:
            table[column] = keyed[column].reindex(keys).to_numpy()
    return table[["file", "label", *(name for name, _, _ in COLUMNS)]]


def hub_features(class_names: Sequence[str]):
    """The dataset's ``datasets.Features``: the real set's ``image`` and ``label``, then :data:`COLUMNS`."""
    import datasets  # heavy import, only when exporting

    return datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=list(class_names)),
            **{name: datasets.Value(dtype) for name, dtype, _ in COLUMNS},
        }
    )


def shard_names(n_rows: int, layout: HubLayout) -> list[str]:
    """``data/{split}-00000-of-0000n.parquet``, ...: the Hub's file names for ``n_rows`` images."""
    n = max(1, -(-n_rows // layout.shard_rows))
    return [f"data/{layout.split}-{i:05d}-of-{n:05d}.parquet" for i in range(n)]


def write_hub_dataset(out: Path, images_root: Path, table: pd.DataFrame, layout: HubLayout, card: str) -> str:
    """Write the images of ``table`` (PNG files under ``images_root``) with their columns as parquet
    files and ``card`` as README.md into ``out``, atomically (the whole folder at once); return the
    folder's version (a hash of its files). Each PNG's bytes must still hash to its ``synthetic_sha256``."""
    import datasets  # heavy import, only when exporting

    features = hub_features(layout.class_names)
    with atomic_path(out) as tmp:
        (tmp / "data").mkdir(parents=True)
        for i, name in enumerate(shard_names(len(table), layout)):
            part = table.iloc[i * layout.shard_rows : (i + 1) * layout.shard_rows]
            rows = {"image": [_png(images_root, f, h) for f, h in zip(part["file"], part[KEY], strict=True)]}
            rows |= {column: part[column].tolist() for column in features if column != "image"}
            datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp / name))
        (tmp / CARD).write_text(card)
    return hub_dataset_version(out)


def _png(images_root: Path, file: str, sha256: str) -> dict:
    data = (images_root / file).read_bytes()
    if sha256_bytes(data) != sha256:
        raise ScoresDoNotMatchError(
            f"{images_root / file} changed since its manifest was written: materialize synthetic_images again"
        )
    return {"bytes": data, "path": Path(file).name}


def hub_dataset_version(folder: Path) -> str:
    """A hash of the folder's parquet files and card."""
    files = sorted(folder.glob("data/*.parquet")) + [folder / CARD]
    return combined_hash([f"{f.relative_to(folder)}:{sha256_file(f)}" for f in files])


def read_back(folder: Path, layout: HubLayout):
    """The exported split as ``datasets`` reads it from the folder: streamed (a
    ``datasets.IterableDataset``), so that checking it writes no copy into the ``datasets`` cache."""
    import datasets

    return datasets.load_dataset("parquet", data_dir=str(folder), split=layout.split, streaming=True)


def mismatches(loaded, table: pd.DataFrame, layout: HubLayout) -> list[str]:
    """What differs between the dataset read back and the table written: features, rows, hashes."""
    problems = []
    if loaded.features != hub_features(layout.class_names):
        problems.append(f"features {loaded.features} are not the expected ones")
    rows = list(loaded.select_columns([KEY, "label"]))
    if len(rows) != len(table):
        problems.append(f"{len(rows)} rows read back, {len(table)} written")
    elif [(r[KEY], r["label"]) for r in rows] != list(zip(table[KEY], table["label"], strict=True)):
        problems.append("the images' hashes or labels read back differ from those written")
    return problems
