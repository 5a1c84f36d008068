"""The dataset card of an exported synthetic set: README.md with the Hub's YAML header.

The header (``huggingface_hub.DatasetCardData``, ``datasets``' features) names the licences that
apply, the task, the source dataset and the features; the text says what the images are, how
they were made, their scores (KID / FID, class fidelity, memorization), what they are for
(research only, never diagnosis), their known limits, and how a user would push them.
Everything here is words from facts it is given: nothing reads files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from synth_xray_assets.export.hub import COLUMNS, HubLayout, hub_features, shard_names
from synth_xray_assets.settings import ExportSettings

# Names of the Hub licence ids this card may use, for the text.
LICENCE_NAMES = {"cc-by-4.0": "CC BY 4.0", "openrail++": "CreativeML Open RAIL++-M"}
# When no third-party licence applies (the demo: the project's phantoms and a model trained from
# scratch on them), the Hub's header still needs one: "other", named.
NO_THIRD_PARTY = "no-third-party-licence"
SCORES_HEADER = "| space | images | n | KID (mean ± std) | FID |\n|---|---|---|---|---|"


@dataclass(frozen=True)
class Licences:
    """The Hub licence ids that apply, and one line of text per licence (or why none applies)."""

    ids: tuple[str, ...]
    lines: tuple[str, ...]


@dataclass(frozen=True)
class SourceFacts:
    """Where the real images came from: the stored dataset's origin and version."""

    origin: Mapping[str, Any] | None  # kind, location, revision, phantoms (None: not recorded)
    dataset_version: str
    attribution: str


@dataclass(frozen=True)
class BaseModelFacts:
    """The model the generator was fine-tuned from."""

    name: str  # a Hub id with revision, or the tiny model's description
    tiny: bool


def licences_that_apply(source: SourceFacts, base: BaseModelFacts, export: ExportSettings) -> Licences:
    """The source images' licence unless they are the project's phantoms, and the base model
    weights' unless the base model is the tiny one built from config."""
    ids, lines = [], []
    phantoms = bool((source.origin or {}).get("phantoms"))
    if phantoms:
        lines.append(
            "Source images: the project's own phantoms (drawn shapes, no patient): no third-party licence."
        )
    else:
        ids.append(export.source_license)
        lines.append(
            f"Source images: {_licence(export.source_license)}; attribution: {source.attribution}. "
            "The synthetic images derive from them through the fine-tuned generator."
        )
    if base.tiny:
        lines.append(
            f"Base model: {base.name}, trained from scratch by this pipeline: no third-party weights."
        )
    else:
        ids.append(export.base_model_license)
        lines.append(
            f"Base model weights ({base.name}): {_licence(export.base_model_license)}. Its use-based "
            "restrictions bind the fine-tuned generator, and no use of its outputs may contravene them."
        )
    return Licences(tuple(ids), tuple(lines))


def _licence(hub_id: str) -> str:
    return f"{LICENCE_NAMES.get(hub_id, hub_id)} (`{hub_id}`)"


@dataclass(frozen=True)
class CardFacts:
    """Everything the card says, as facts and prepared text sections."""

    generator: str
    class_name: str
    n_images: int
    licences: Licences
    source: SourceFacts
    made: Sequence[str]  # how the images were made, one line each
    quality: str  # markdown: KID / FID (``quality_section``)
    fidelity: str  # markdown: class fidelity (``fidelity_section``)
    memorization: str  # markdown (``memorization_section``)
    layout: HubLayout
    repo_id: str  # the example repository id of the push instructions


def card_text(facts: CardFacts) -> str:
    """The whole README.md: the YAML header, then the text."""
    return f"---\n{card_yaml(facts)}\n---\n\n{card_body(facts)}"


def card_yaml(facts: CardFacts) -> str:
    """The Hub's YAML header: licences, task, size, source, the one config and the features."""
    import datasets
    from datasets.info import DatasetInfosDict
    from huggingface_hub import DatasetCardData

    ids = facts.licences.ids
    licence: dict[str, Any] = (
        {"license": list(ids)} if ids else {"license": "other", "license_name": NO_THIRD_PARTY}
    )
    origin = facts.source.origin or {}
    hub_source = [origin["location"]] if origin.get("kind") == "hub" else []
    data = DatasetCardData(
        **licence,
        pretty_name=f"Synthetic chest X-rays, {facts.class_name} ({facts.generator})",
        task_categories=["image-classification"],
        size_categories=[_size_category(facts.n_images)],
        source_datasets=hub_source or None,
        tags=["medical", "chest-x-ray", "synthetic", "stable-diffusion", "dreambooth"],
        configs=[
            {
                "config_name": "default",
                "data_files": [{"split": facts.layout.split, "path": f"data/{facts.layout.split}-*"}],
            }
        ],
    )
    info = datasets.DatasetInfo(features=hub_features(facts.layout.class_names))
    DatasetInfosDict({"default": info}).to_dataset_card_data(data)
    return data.to_yaml()


def _size_category(n: int) -> str:
    """The Hub's size category of ``n`` rows."""
    for bound, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K")):
        if n < bound:
            return name
    return "100K<n<1M"


def card_body(facts: CardFacts) -> str:
    """The card's text, section by section."""
    split, files = facts.layout.split, shard_names(facts.n_images, facts.layout)
    columns = "\n".join(f"| `{name}` | {dtype} | {what} |" for name, dtype, what in COLUMNS)
    return f"""# Synthetic chest X-rays: {facts.class_name} (generator `{facts.generator}`)

{facts.n_images} generated images, all labelled {facts.class_name}, in one split (`{split}`).

**Research only. Not for diagnosis, treatment or any clinical decision**, and not for training
a model meant for one. No image shows a patient; the label is the class the generator was
fine-tuned and prompted for, not a finding anyone verified.

## Licences

{_bullets(facts.licences.lines)}

## Source dataset

{_source_text(facts.source)}

## How it was made

{_bullets(facts.made)}

## Features

The real dataset's features, `image` (PNG) and `label` (ClassLabel
{", ".join(f"{i} = {n}" for i, n in enumerate(facts.layout.class_names))}), then per image:

| column | type | what |
|---|---|---|
{columns}

## Quality

{facts.quality}

### Class fidelity

{facts.fidelity}

### Memorization

{facts.memorization}

## Known limits

{_bullets(_limits(facts))}

## Loading

```python
from datasets import load_dataset

ds = load_dataset("parquet", data_dir="path/to/this/folder", split="{split}")
```

Files: {", ".join(f"`{f}`" for f in files)}.

## Pushing to the Hub

Nothing has been pushed. To share it, with a token that may write (`hf auth login`, or `HF_TOKEN`
in the environment), upload this folder as a dataset repository (private first):

```bash
hf upload {facts.repo_id} path/to/this/folder . --repo-type dataset --private
```

or in Python: `huggingface_hub.HfApi().upload_folder(folder_path="path/to/this/folder",
repo_id="{facts.repo_id}", repo_type="dataset")`. Keep this card with the files: the licences
above go with the images.
"""


def _bullets(lines: Sequence[str]) -> str:
    return "\n".join(f"- {line}" for line in lines)


def _source_text(source: SourceFacts) -> str:
    origin = source.origin
    if origin is None:
        return f"Not recorded by the stored dataset (version {source.dataset_version})."
    location = str(origin.get("location"))
    if origin.get("kind") != "hub":  # a local folder: its name, not this machine's path
        location = Path(location).name
    where = f"{origin.get('kind')}: `{location}`"
    if origin.get("revision"):
        where += f" at revision `{origin['revision']}`"
    what = "the project's phantoms (not patients)" if origin.get("phantoms") else "real chest X-rays"
    return f"{what}, from {where}; standardized dataset version `{source.dataset_version}`."


def _limits(facts: CardFacts) -> list[str]:
    limits = [
        "The images are as good as one generator fine-tuned on one dataset: they carry its biases "
        "(the study's source holds paediatric patients of one hospital) and its failures.",
        "`class_score` comes from a classifier trained on real images only: a second opinion on the "
        "label, not ground truth.",
        "The near-copy check compares each image with the generator's real training images of the "
        "class in one feature space and by pixels; it cannot prove that no patient is recognisable.",
        "KID and FID from a few hundred images or fewer carry wide uncertainty; FID is biased at small n.",
    ]
    if (facts.source.origin or {}).get("phantoms"):
        limits.insert(0, "Demo data: the generator learned drawn phantoms, not chest X-rays of people.")
    return limits


def quality_section(record: Mapping[str, Any] | None) -> str:
    """KID (mean ± std, subset size) and FID with n of every scored set, from ``fid_scores``'
    record, against the held-out real images first, then against the generator's training images."""
    if not record:
        return "Not measured (materialize `fid_scores` for this generator, then export again)."
    minimum = record.get("fid_min_images") or {}
    parts = []
    for title, block in (
        ("Against held-out real images (seen by no generator)", record.get("held_out", {})),
        ("Against the generator's own training images (rewards memorization)", record),
    ):
        rows = _score_rows(block.get("spaces", {}), minimum)
        reference = block.get("reference_set", "")
        parts.append(f"{title}: {reference}.\n\n{SCORES_HEADER}\n{rows}")
    return "\n\n".join(parts)


def _score_rows(spaces: Mapping[str, Any], minimum: Mapping[str, int]) -> str:
    rows = []
    for space, result in spaces.items():
        if not result.get("available"):
            rows.append(f"| {space} | unavailable: {result.get('reason', '')} | | | |")
            continue
        for name, sc in result.get("scores", {}).items():
            rows.append(
                f"| {space} | {name} | {sc.get('n_images')} | {_kid(sc)} | {_fid(sc, minimum.get(space))} |"
            )
    return "\n".join(rows)


def _kid(sc: Mapping[str, Any]) -> str:
    mean, std = sc.get("kid_mean"), sc.get("kid_std")
    if mean is None:
        return "not computed"
    spread = "" if std is None else f" ± {std:.4f}"
    return f"{mean:.4f}{spread} (subsets of {sc.get('kid_subset_size')})"


def _fid(sc: Mapping[str, Any], minimum: int | None) -> str:
    fid = sc.get("fid")
    if fid is None or not math.isfinite(fid):
        return "not computed"
    n = min(sc.get("n_images") or 0, sc.get("n_reference") or 0)
    return f"{fid:.2f}" + (f" (biased: n {n} < {minimum})" if minimum and n < minimum else "")


def fidelity_section(record: Any | None, class_name: str) -> str:
    """Class fidelity in words from ``class_fidelity``'s record (an ``evaluation.fidelity.ClassFidelity``)."""
    if record is None:
        return "Not measured."
    return (
        f"{100 * record.share:.0f}% [{100 * record.ci_low:.0f}, {100 * record.ci_high:.0f}] "
        f"({100 * record.level:g}% Wilson) of the {record.n_images} images are called {class_name} "
        f"by the feature extractor trained on real images only; on {record.n_real} real test images of "
        f"the class it reaches {100 * record.real_recall:.0f}% (what a faithful generator can reach)."
    )


def memorization_section(summary: Mapping[str, Any]) -> str:
    """The nearest-real summary in words (``evaluation.memorization.memorization_summary``)."""
    return (
        f"{summary['n_near_copies']} of {summary['n_synthetic']} images are near-copies of a real "
        f"training image (cosine distance below {summary['cosine_threshold']} in the chest-X-ray "
        f"feature space, or pixel correlation above {summary['pixel_threshold']}). Nearest real image: "
        f"cosine distance min {summary['min_cosine_distance']:.4f}, median "
        f"{summary['median_cosine_distance']:.4f}; pixel correlation max "
        f"{summary['max_pixel_correlation']:.4f}, median {summary['median_pixel_correlation']:.4f} "
        f"(centered: {summary['centered']}). Per image: the `nearest_real_*` and `near_copy` columns."
    )
