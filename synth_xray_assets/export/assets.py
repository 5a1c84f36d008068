"""Dagster wiring of the export: ``synthetic_hub_dataset``, one Hugging Face dataset per generator.

The work lives in ``hub.py`` (the table, the parquet files, reading them back) and ``card.py``
(the dataset card); here: what they read, metadata and the check.
"""

import json
from pathlib import Path

import dagster as dg
import pandas as pd

from synth_xray_assets.dataset.store import StandardizedDataset
from synth_xray_assets.diffusion.pipelines import SAMPLER
from synth_xray_assets.dreambooth.store import base_model_record
from synth_xray_assets.evaluation.fidelity import ClassFidelity, load_fidelity
from synth_xray_assets.evaluation.memorization import memorization_summary
from synth_xray_assets.export.card import (
    BaseModelFacts,
    CardFacts,
    SourceFacts,
    card_body,
    card_text,
    fidelity_section,
    licences_that_apply,
    memorization_section,
    quality_section,
)
from synth_xray_assets.export.hub import (
    CLASS_SCORE_COLUMNS,
    MEMORIZATION_COLUMNS,
    HubLayout,
    SetProvenance,
    export_table,
    mismatches,
    read_back,
    scores_by_hash,
    shard_names,
    write_hub_dataset,
)
from synth_xray_assets.operations.locks import one_writer
from synth_xray_assets.partitions import class_label, generator_partitions
from synth_xray_assets.resources import SettingsResource
from synth_xray_assets.settings import Settings
from synth_xray_assets.synthesis.store import SyntheticImages, synthetic_dir

OWNERS = ["team:synth-xray"]
READS_BACK = "hub_dataset_reads_back"


# The decorator's arguments; build_defs adds the generator partitions of the settings.
_SYNTHETIC_HUB_DATASET_ASSET = dict(
    deps=["chest_xray_dataset", "synthetic_images", "class_fidelity", "memorization", "fid_scores"],
    group_name="export",
    kinds={"huggingface", "parquet"},
    owners=OWNERS,
    code_version="synthetic-hub-dataset-v1",
    check_specs=[
        dg.AssetCheckSpec(
            READS_BACK,
            asset="synthetic_hub_dataset",
            description="datasets.load_dataset('parquet', data_dir=...) reads the folder back with the "
            "expected features, every image once, with its hash and label.",
        )
    ],
    description=(
        "The generator's synthetic images as a Hugging Face datasets parquet in the Hub's layout, with "
        "the real set's features (image, label ClassLabel NORMAL/PNEUMONIA) plus provenance columns: "
        "generator, base model, checkpoint version, prompt, seed, sampler, and per image the feature "
        "extractor's class score (class_fidelity) and the nearest-real distances (memorization), joined "
        "by the image's PNG sha256. README.md is the dataset card (the Hub's YAML header: licences, "
        "features; how it was made, KID/FID, memorization, intended use: research only, not diagnosis). "
        "Nothing is pushed. data/export/{generator}/."
    ),
)


@one_writer
def synthetic_hub_dataset(
    context: dg.AssetExecutionContext, settings: SettingsResource
) -> dg.MaterializeResult:
    s = settings.get()
    key = context.partition_key
    images = SyntheticImages.open(synthetic_dir(s.data_dir, key))
    fidelity = _fidelity(s, key)
    layout = HubLayout(s.export.split, s.export.shard_rows, tuple(s.dataset.class_names))
    near = _table(s.layout.memorization(key), f"memorization[{key}]")
    scores = [
        (f"class_fidelity[{key}]", _table(s.layout.class_fidelity_images(key), f"class_fidelity[{key}]")),
        (f"memorization[{key}]", near),
    ]
    keyed = [
        (asset, scores_by_hash(table, columns, asset))
        for (asset, table), columns in zip(scores, (CLASS_SCORE_COLUMNS, MEMORIZATION_COLUMNS), strict=True)
    ]
    base = _base_model(s)
    provenance = SetProvenance(key, _method(s), base.name, SAMPLER, fidelity.extractor_sha256)
    table = export_table(images.manifest, keyed, provenance, class_label(key))
    facts = _card_facts(s, key, table, (base, fidelity, near), layout)
    out = s.layout.hub_dataset(key)
    version = write_hub_dataset(out, images.root, table, layout, card_text(facts))
    problems = mismatches(read_back(out, layout), table, layout)
    context.log.info(f"{key}: {len(table)} images written as a Hub dataset under {out}")
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(out)),
            "n_images": len(table),
            "label": s.dataset.class_names[class_label(key)],
            "licences": ", ".join(facts.licences.ids) or "none (the project's phantoms and tiny model)",
            "files": ", ".join(shard_names(len(table), layout)),
            "checkpoint_version": ", ".join(sorted(set(table["checkpoint_version"]))),
            "synthetic_version": images.version(),
            "dataset_card": dg.MetadataValue.md(card_body(facts)),
        },
        data_version=dg.DataVersion(version),
        check_results=[
            dg.AssetCheckResult(
                check_name=READS_BACK,
                passed=not problems,
                metadata={"rows": len(table), "problems": "; ".join(problems) or "none"},
            )
        ],
    )


def _table(path: Path, asset: str) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"no per-image table of {asset} at {path}: materialize {asset} first")
    return pd.read_parquet(path)


def _fidelity(s: Settings, key: str) -> ClassFidelity:
    record = load_fidelity(s.data_dir, key)
    if record is None:
        raise FileNotFoundError(f"no class_fidelity[{key}] record: materialize class_fidelity[{key}] first")
    return record


def _base_model(s: Settings) -> BaseModelFacts:
    """The base model in words, with the version ``base_model`` recorded."""
    record = base_model_record(s.data_dir)
    version = json.loads(record.read_text()).get("version", "unknown") if record.is_file() else "unknown"
    b = s.base_model
    if b.tiny:
        name = f"a tiny Stable Diffusion built from config (version {version})"
    else:
        name = f"{b.pretrained_model} at revision {b.revision} (version {version})"
    return BaseModelFacts(name, b.tiny)


def _method(s: Settings) -> str:
    d = s.dreambooth
    if d.method == "lora":
        return f"DreamBooth, LoRA rank {d.lora_rank}"
    return "DreamBooth, full fine-tune of the UNet" + (" and text encoder" if d.train_text_encoder else "")


def _card_facts(
    s: Settings,
    key: str,
    table: pd.DataFrame,
    read: tuple[BaseModelFacts, ClassFidelity, pd.DataFrame],
    layout: HubLayout,
) -> CardFacts:
    base, fidelity, near = read
    ds = StandardizedDataset.open(s.layout.dataset)
    source = SourceFacts(ds.origin, ds.version, s.export.source_attribution)
    fid_path = s.layout.fid_scores(key)
    class_name = s.dataset.class_names[class_label(key)]
    return CardFacts(
        generator=key,
        class_name=class_name,
        n_images=len(table),
        licences=licences_that_apply(source, base, s.export),
        source=source,
        made=_made(table, base, _method(s)),
        quality=quality_section(json.loads(fid_path.read_text()) if fid_path.is_file() else None),
        fidelity=fidelity_section(fidelity, class_name),
        memorization=memorization_section(memorization_summary(near, s.evaluation)),
        layout=layout,
        repo_id=s.export.repo_id_example.format(generator=key),
    )


def _made(table: pd.DataFrame, base: BaseModelFacts, method: str) -> list[str]:
    """How the images were made, one line each, from the table's provenance columns."""

    def values(column: str) -> str:
        return ", ".join(str(v) for v in sorted(set(table[column])))

    first, last = int(table["seed"].min()), int(table["seed"].max())
    return [
        f"Generator: {method}, from {base.name}; checkpoint version {values('checkpoint_version')}.",
        f'Prompt: "{values("prompt")}".',
        f"Sampler: {SAMPLER}, {values('num_inference_steps')} steps, guidance {values('guidance_scale')}; "
        f"{values('resolution')} x {values('resolution')} px, grayscale PNG.",
        f"Seeds {first}..{last}: each image its own seed and noise generator (column `seed`).",
        "Made by the synth_xray_assets pipeline (Dagster asset synthetic_hub_dataset), which records "
        "every image's sha256 (`synthetic_sha256`) beside its scores.",
    ]


def synthetic_hub_dataset_asset(s: Settings) -> dg.AssetsDefinition:
    """``synthetic_hub_dataset`` per generator of ``s``: files only, no GPU."""
    return dg.asset(**_SYNTHETIC_HUB_DATASET_ASSET, partitions_def=generator_partitions(s))(
        synthetic_hub_dataset
    )


def build_defs(s: Settings) -> dg.Definitions:
    """The export domain's definitions: one partition per generator of ``s``."""
    return dg.Definitions(assets=[synthetic_hub_dataset_asset(s)])
