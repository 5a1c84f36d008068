"""Dagster wiring of the evaluation: ``cxr_feature_extractor``, ``fid_scores`` and ``memorization``.

The numerical work lives in ``extractor.py`` (training the chest-X-ray DenseNet-121), ``fid.py``
(FID / KID / precision-recall with cached reference features) and ``memorization.py`` (nearest
real image of every synthetic one). Here: inputs, metadata and checks.
"""

import math
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd

from synth_xray_assets.automation import automation_for
from synth_xray_assets.dataset.splits import validation_split
from synth_xray_assets.dataset.store import StandardizedDataset
from synth_xray_assets.dreambooth.store import prior_dir, prior_images
from synth_xray_assets.evaluation.extractor import (
    extractor_dir,
    extractor_weights,
    train_cxr_feature_extractor,
)
from synth_xray_assets.evaluation.features import get_feature_space
from synth_xray_assets.evaluation.fid import features_in_space, score_sets
from synth_xray_assets.evaluation.memorization import (
    closest_pairs_image,
    memorization_histogram,
    memorization_summary,
    nearest_real_images,
    real_baseline,
)
from synth_xray_assets.partitions import class_label, class_partitions
from synth_xray_assets.resources import ComputeResource, SettingsResource
from synth_xray_assets.settings import Settings
from synth_xray_assets.storage import markdown_table, png_markdown, write_json_atomic, write_parquet_atomic
from synth_xray_assets.synthesis.store import MANIFEST, SyntheticImages, synthetic_dir

OWNERS = ["team:synth-xray"]
SPACES = ("cxr", "inception")
METRICS = ("fid", "kid_mean", "precision", "recall")


# --------------------------------------------------------------------------- inputs


def _dataset(s: Settings) -> StandardizedDataset:
    return StandardizedDataset.open(s.data_dir / "dataset")


def _reference(s: Settings, class_key: str) -> tuple[StandardizedDataset, np.ndarray, pd.DataFrame, str]:
    """The real standardized training images of the class, their manifest rows, and the cache key."""
    ds = _dataset(s)
    label = class_label(class_key)
    rows = ds.rows("train")
    rows = rows[rows.label == label].reset_index(drop=True)
    images = ds.images("train", label)
    if len(images) == 0:
        raise ValueError(f"chest_xray_dataset has no {class_key} training images to compare with")
    return ds, images, rows, f"{ds.version}-train-{class_key}"


def _image_set(asset: str, root: Path, read: Callable[[], np.ndarray]) -> tuple[np.ndarray, SyntheticImages]:
    """A generated image set (``SyntheticImages`` layout); clear errors name the asset that makes it."""
    if not (root / MANIFEST).is_file():
        raise FileNotFoundError(f"no {asset} at {root} (no {MANIFEST}): materialize {asset} first")
    try:
        opened, images = SyntheticImages.open(root), read()
    except Exception as exc:
        raise RuntimeError(f"could not read {asset} at {root}: {type(exc).__name__}: {exc}") from exc
    if len(images) == 0:
        raise ValueError(f"{asset} at {root} holds no images: materialize {asset} again")
    return images, opened


def _synthetic(s: Settings, class_key: str) -> tuple[np.ndarray, SyntheticImages]:
    root = synthetic_dir(s.data_dir, class_key)
    return _image_set(f"synthetic_images[{class_key}]", root, lambda: SyntheticImages.open(root).images())


def _versions(manifest: pd.DataFrame) -> str:
    return ", ".join(sorted(map(str, manifest["checkpoint_version"].unique())))


def _reference_note(s: Settings, ds: StandardizedDataset, class_key: str, n: int) -> str:
    return (
        f"all {n} {s.dataset.class_names[class_label(class_key)]} images of the chest_xray_dataset train "
        f"split (standardized to {s.dataset.resolution} px, {s.dataset.mode}), dataset version {ds.version}"
    )


# --------------------------------------------------------------------------- cxr_feature_extractor


@dg.asset(
    deps=["chest_xray_dataset"],
    group_name="evaluation",
    automation_condition=automation_for("evaluation"),
    pool="gpu",
    kinds={"pytorch"},
    owners=OWNERS,
    code_version="cxr-extractor-v1",
    description=(
        "The chest-X-ray feature space: a DenseNet-121 trained with the study's classifier recipe on "
        "the real training split only (epoch chosen on the validation split, no synthetic image seen), "
        "at evaluation.feature_resolution. Its pooled 1024-d features score FID / KID / precision-recall "
        "beside Inception, and find each synthetic image's nearest real image. Weights (safetensors) "
        "under data/evaluation/cxr_feature_extractor/; works offline."
    ),
)
def cxr_feature_extractor(
    context: dg.AssetExecutionContext, settings: SettingsResource, compute: ComputeResource
) -> dg.MaterializeResult:
    s = settings.get()
    ds = _dataset(s)
    device = compute.resolve_device()
    # The epoch is chosen on the classifier experiments' validation split, carved from real train
    # (the dataset's own validation split is 16 images in the Hub dataset).
    images, labels = ds.images("train"), ds.labels("train")
    split = validation_split(ds.rows("train"), s.classifier.val_fraction, s.classifier.split_seed)
    keep, val = split.keep, split.val
    info = train_cxr_feature_extractor(
        (images[keep], labels[keep]),
        (images[val], labels[val]),
        (ds.images("test"), ds.labels("test")),
        s.classifier,
        s.evaluation,
        extractor_dir(s.data_dir),
        device=device,
        log=context.log.info,
    )
    per_class = ", ".join(f"{c} {n}" for c, n in zip(s.dataset.class_names, info["n_train_per_class"]))
    curve = pd.DataFrame(info["history"])
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(info["weights_path"]),
            "weights_sha256": info["weights_sha256"],
            "training_set": (
                f"chest_xray_dataset train split less the classifiers' validation split, real images only: "
                f"{info['n_train']} ({per_class}); "
                f"dataset version {ds.version}"
            ),
            "dataset_version": ds.version,
            "validation_split": split.describe(),
            "validation_accuracy": dg.MetadataValue.float(float(info["validation_accuracy"])),
            "test_accuracy": dg.MetadataValue.float(float(info["test_accuracy"])),
            "test_auc": dg.MetadataValue.float(_finite_or_nan(info["test_auc"])),
            "selected_epoch": f"{info['selected_epoch']} of {info['epochs']} (by validation accuracy, "
            f"{info['n_validation']} images)",
            "feature_resolution": info["resolution"],
            "initial_weights": info["pretrained"],
            "train_images_per_s": dg.MetadataValue.float(round(float(info["train_images_per_s"]), 2)),
            "device": device,
            "history": dg.MetadataValue.md(markdown_table(curve.round(4)) if len(curve) else "-"),
        },
        data_version=dg.DataVersion(info["weights_sha256"][:16]),
    )


# --------------------------------------------------------------------------- fid_scores

FID_CHECKS = [
    dg.AssetCheckSpec(
        "scores_are_finite",
        asset="fid_scores",
        description="Every score that was computed is a finite number.",
    ),
    dg.AssetCheckSpec(
        "every_synthetic_image_scored",
        asset="fid_scores",
        description="The scores rest on generation.images_per_class synthetic images.",
    ),
    dg.AssetCheckSpec(
        "closer_to_real_than_base_model",
        asset="fid_scores",
        description="The fine-tuned images' chest-X-ray FID is below the untrained base model's (warns).",
    ),
]


@dg.asset(
    deps=["chest_xray_dataset", "cxr_feature_extractor", "synthetic_images", "prior_class_images"],
    partitions_def=class_partitions,
    group_name="evaluation",
    automation_condition=automation_for("evaluation"),
    pool="gpu",
    kinds={"pytorch"},
    owners=OWNERS,
    code_version="fid-scores-v1",
    check_specs=FID_CHECKS,
    description=(
        "FID, KID and precision/recall (Kynkaanniemi, k=3) of the class's synthetic images against ALL "
        "real standardized training images of the class, with torch-fidelity, in two feature spaces: "
        "Inception (inception-v3-compat, as the study's FID 61.88 / 64.08; recorded unavailable, with "
        "the reason, where its weights cannot be had) and the chest-X-ray space of "
        "cxr_feature_extractor. The untrained base model's images (prior_class_images) are scored the "
        "same way. Reference features are cached per dataset version and feature space."
    ),
)
def fid_scores(
    context: dg.AssetExecutionContext, settings: SettingsResource, compute: ComputeResource
) -> dg.MaterializeResult:
    s = settings.get()
    key = context.partition_key
    ds, real, _, cache_key = _reference(s, key)
    synthetic, syn_set = _synthetic(s, key)
    base, base_set = _image_set("prior_class_images", prior_dir(s.data_dir), lambda: prior_images(s.data_dir))
    sets = {"synthetic": synthetic, "base_model": base}
    if len(base) < len(synthetic):  # FID falls with the number of images: also compare at equal counts
        sets["synthetic_matched"] = synthetic[: len(base)]
    device = compute.resolve_device()
    results = {}
    for name in SPACES:
        space = get_feature_space(name, s.evaluation, cxr_weights=extractor_weights(s.data_dir))
        context.log.info(f"{key}: scoring {', '.join(sets)} in the {name} space")
        results[name] = score_sets(
            sets,
            real,
            space,
            reference_cache_key=cache_key,
            cache_dir=s.data_dir / "evaluation" / "reference_features",
            settings=s.evaluation,
            device=device,
        )
        if not results[name]["available"]:
            context.log.warning(f"{name} scores unavailable: {results[name]['reason']}")
    reference_note = _reference_note(s, ds, key, len(real))
    record = {
        "class": key,
        "reference_set": reference_note,
        "dataset_version": ds.version,
        "synthetic_checkpoint_version": _versions(syn_set.manifest),
        "base_model_version": _versions(base_set.manifest),
        "published_fid_inception": s.evaluation.published_fid.get(key),
        "spaces": results,
    }
    path = s.data_dir / "evaluation" / "fid" / f"{key}.json"
    write_json_atomic(path, record)

    metadata: dict = {
        "reference_set": reference_note,
        "n_reference": len(real),
        "n_synthetic": len(synthetic),
        "n_base_model": len(base),
        "dataset_version": ds.version,
        "checkpoint_version": record["synthetic_checkpoint_version"],
        "base_model_version": record["base_model_version"],
        "published_fid_inception": dg.MetadataValue.float(
            float(s.evaluation.published_fid.get(key, math.nan))
        ),
        "scores": dg.MetadataValue.md(_scores_md(results)),
        "path": dg.MetadataValue.path(str(path)),
    }
    for space, result in results.items():
        if not result["available"]:
            metadata[f"{space}_unavailable"] = result["reason"]
            continue
        metadata[f"{space}_weights_sha256"] = result["weights_sha256"]
        metadata[f"{space}_reference_features_reused"] = bool(result["reference_cache"]["hit"])
        for set_name, scores in result["scores"].items():
            suffix = "" if set_name == "synthetic" else f"_{set_name}"
            for metric in METRICS:
                if scores[metric] is not None:
                    label = "kid" if metric == "kid_mean" else metric
                    metadata[f"{label}_{space}{suffix}"] = dg.MetadataValue.float(scores[metric])
    return dg.MaterializeResult(metadata=metadata, check_results=_fid_checks(results, s, len(synthetic)))


def _fid_checks(results: dict, s: Settings, n_synthetic: int) -> list[dg.AssetCheckResult]:
    available = {k: v for k, v in results.items() if v["available"]}
    values = {
        f"{metric}_{space}_{set_name}": scores[metric]
        for space, r in available.items()
        for set_name, scores in r["scores"].items()
        for metric in METRICS
        if scores[metric] is not None
    }
    bad = sorted(k for k, v in values.items() if not math.isfinite(v))
    # the number of images behind each space's score of the synthetic set
    counts = {space: r["scores"]["synthetic"]["n_images"] for space, r in available.items()}
    expected = s.generation.images_per_class
    cxr = available.get("cxr", {}).get("scores", {})
    fine_tuned = cxr.get("synthetic_matched", cxr.get("synthetic", {})).get("fid")
    base = cxr.get("base_model", {}).get("fid")
    return [
        dg.AssetCheckResult(
            check_name="scores_are_finite",
            passed=bool(values) and not bad,
            metadata={"num_scores": len(values), "not_finite": ", ".join(bad) or "none"},
        ),
        dg.AssetCheckResult(
            check_name="every_synthetic_image_scored",
            passed=n_synthetic == expected and all(n == expected for n in counts.values()),
            metadata={
                "expected": expected,
                "n_synthetic": n_synthetic,
                "per_space": dg.MetadataValue.json(counts),
            },
        ),
        dg.AssetCheckResult(
            check_name="closer_to_real_than_base_model",
            passed=fine_tuned is not None and base is not None and fine_tuned < base,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={
                "fid_cxr_fine_tuned_at_equal_count": _finite_or_nan(fine_tuned),
                "fid_cxr_base_model": _finite_or_nan(base),
            },
        ),
    ]


def _scores_md(results: dict) -> str:
    lines = [
        "| space | images | n | FID | KID | precision | recall |",
        "|---|---|---|---|---|---|---|",
    ]
    for space, r in results.items():
        if not r["available"]:
            lines.append(f"| {space} | unavailable: {r['reason'].replace('|', '/')} | | | | | |")
            continue
        for set_name, sc in r["scores"].items():
            cells = [_fmt(sc[m]) for m in METRICS]
            lines.append(f"| {space} | {set_name} | {sc['n_images']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- memorization


@dg.asset(
    deps=["chest_xray_dataset", "cxr_feature_extractor", "synthetic_images"],
    partitions_def=class_partitions,
    group_name="evaluation",
    automation_condition=automation_for("evaluation"),
    pool="gpu",
    kinds={"pytorch"},
    owners=OWNERS,
    code_version="memorization-v1",
    check_specs=[
        dg.AssetCheckSpec(
            "no_memorized_images",
            asset="memorization",
            description="No synthetic image is a near-copy of a real training image (thresholds in "
            "evaluation.memorization_*; warns).",
        )
    ],
    description=(
        "For every synthetic image of the class, its nearest real training image of the class by "
        "cosine distance in the chest-X-ray feature space and by pixel correlation; a near-copy "
        "would leak a patient. The same search among the real images (leave-one-out) is the "
        "baseline. Table under data/evaluation/memorization/."
    ),
)
def memorization(
    context: dg.AssetExecutionContext, settings: SettingsResource, compute: ComputeResource
) -> dg.MaterializeResult:
    s = settings.get()
    e = s.evaluation
    key = context.partition_key
    ds, real, rows, cache_key = _reference(s, key)
    synthetic, syn_set = _synthetic(s, key)
    space = get_feature_space("cxr", e, cxr_weights=extractor_weights(s.data_dir))
    feats = features_in_space(
        {"synthetic": synthetic},
        real,
        space,
        reference_cache_key=cache_key,
        cache_dir=s.data_dir / "evaluation" / "reference_features",
        batch_size=e.batch_size,
        device=compute.resolve_device(),
    )
    table = nearest_real_images(synthetic, real, feats.sets["synthetic"], feats.reference, e)
    baseline = real_baseline(real, feats.reference, e) if len(real) >= 2 else None
    summary = memorization_summary(table, e, baseline)
    saved = table.assign(
        synthetic_file=syn_set.manifest["file"].to_numpy(),
        nearest_real_source_id=rows["source_id"].to_numpy()[table["nearest_real_index"]],
        nearest_real_source_id_pixel=rows["source_id"].to_numpy()[table["nearest_real_index_pixel"]],
    )
    path = s.data_dir / "evaluation" / "memorization" / f"{key}.parquet"
    write_parquet_atomic(saved, path)
    copies = saved[saved["near_copy"]]
    n = e.memorization_pairs_shown
    return dg.MaterializeResult(
        metadata={
            "n_synthetic": len(synthetic),
            "n_real": len(real),
            "real_set": _reference_note(s, ds, key, len(real)),
            "dataset_version": ds.version,
            "checkpoint_version": _versions(syn_set.manifest),
            "n_near_copies": summary["n_near_copies"],
            "min_cosine_distance": dg.MetadataValue.float(summary["min_cosine_distance"]),
            "median_cosine_distance": dg.MetadataValue.float(summary["median_cosine_distance"]),
            "max_pixel_correlation": dg.MetadataValue.float(summary["max_pixel_correlation"]),
            "summary": dg.MetadataValue.json(summary),
            "distribution": dg.MetadataValue.md(png_markdown(memorization_histogram(table, e, baseline))),
            "closest_pairs_features": dg.MetadataValue.md(
                png_markdown(closest_pairs_image(synthetic, real, table, n, "cosine_distance", cell=80))
            ),
            "closest_pairs_pixels": dg.MetadataValue.md(
                png_markdown(closest_pairs_image(synthetic, real, table, n, "pixel_correlation", cell=80))
            ),
            "path": dg.MetadataValue.path(str(path)),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name="no_memorized_images",
                passed=copies.empty,
                severity=dg.AssetCheckSeverity.WARN,
                metadata={
                    "n_near_copies": len(copies),
                    "cosine_threshold": e.memorization_cosine_threshold,
                    "pixel_threshold": e.memorization_pixel_threshold,
                    "near_copies": dg.MetadataValue.md(
                        markdown_table(
                            copies.head(20)[
                                [
                                    "synthetic_file",
                                    "nearest_real_source_id",
                                    "cosine_distance",
                                    "nearest_real_source_id_pixel",
                                    "pixel_correlation",
                                ]
                            ]
                        )
                        if len(copies)
                        else "none"
                    ),
                },
            )
        ],
    )


# --------------------------------------------------------------------------- helpers


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def _finite_or_nan(value) -> float:
    return float(value) if value is not None and math.isfinite(value) else math.nan


defs = dg.Definitions(assets=[cxr_feature_extractor, fid_scores, memorization])
