"""Dagster wiring of the evaluation: ``cxr_feature_extractor``, ``fid_scores``, ``memorization``
and ``class_fidelity``.

The numerical work lives in ``extractor.py`` (training the chest-X-ray DenseNet-121), ``fid.py``
(FID / KID / precision-recall with cached reference features), ``memorization.py`` (nearest
real image of every synthetic one) and ``fidelity.py``; what they read in ``inputs.py``. Here:
metadata and checks.
"""

import dataclasses
import math
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd

from synth_xray_assets.classifier.data import SplitArrays
from synth_xray_assets.dataset.splits import validation_split
from synth_xray_assets.deployment import gpu_step
from synth_xray_assets.evaluation.extractor import (
    extractor_dir,
    extractor_weights,
    train_cxr_feature_extractor,
)
from synth_xray_assets.evaluation.features import get_feature_space
from synth_xray_assets.evaluation.fid import (
    TOWARD_REAL,
    KidComparison,
    ReferenceImages,
    SetScores,
    SpaceScores,
    compare_kid,
    features_in_space,
    real_floor_set,
    score_sets,
)
from synth_xray_assets.evaluation.fidelity import (
    FidelityInputs,
    fidelity_from_scores,
    per_image_class_scores,
    save_fidelity,
    score_fidelity_inputs,
)
from synth_xray_assets.evaluation.inputs import (
    FidReferences,
    base_model_set,
    checkpoint_versions,
    class_reference,
    extractor_predictor,
    fid_references,
    open_dataset,
    real_test_images,
    reference_note,
    synthetic_set,
)
from synth_xray_assets.evaluation.memorization import (
    PairsView,
    closest_pairs_image,
    memorization_histogram,
    memorization_summary,
    nearest_real_images,
    real_baseline,
)
from synth_xray_assets.metadata import metadata_table, settings_metadata
from synth_xray_assets.operations.locks import one_writer
from synth_xray_assets.partitions import (
    class_key_of,
    class_label,
    class_of_generator,
    generator_partitions,
)
from synth_xray_assets.resources import ComputeResource, SettingsResource, on_a_card
from synth_xray_assets.settings import Settings
from synth_xray_assets.storage import (
    png_markdown,
    sha256_file,
    write_json_atomic,
    write_parquet_atomic,
)
from synth_xray_assets.synthesis.store import images_per_class

OWNERS = ["team:synth-xray"]
SPACES = ("cxr", "inception")
METRICS = ("kid_mean", "kid_std", "fid", "precision", "recall")
# What every evaluation asset's decorator shares; build_defs adds the gpu pool, the op tags and,
# for the per-generator ones, the generator partitions.
_ON_GPU = dict(group_name="evaluation", kinds={"pytorch"}, owners=OWNERS)


# --------------------------------------------------------------------------- cxr_feature_extractor


_CXR_FEATURE_EXTRACTOR_ASSET = dict(
    deps=["chest_xray_dataset"],
    **_ON_GPU,
    code_version="cxr-extractor-v2",
    description=(
        "The chest-X-ray feature space: a DenseNet-121 trained with the study's classifier recipe on "
        "the real training split only (epoch chosen on the validation split, no synthetic image seen), "
        "at evaluation.feature_resolution. Its pooled 1024-d features score FID / KID / precision-recall "
        "beside Inception, and find each synthetic image's nearest real image. Weights (safetensors) "
        "under data/evaluation/cxr_feature_extractor/; works offline."
    ),
)


@one_writer
@on_a_card
def cxr_feature_extractor(
    context: dg.AssetExecutionContext, settings: SettingsResource, compute: ComputeResource
) -> dg.MaterializeResult:
    s = settings.get()
    ds = open_dataset(s)
    device = compute.resolve_device()
    # The epoch is chosen on the classifier experiments' validation split, carved from real train
    # (the dataset's own validation split is 16 images in the Hub dataset).
    images, labels = ds.images("train"), ds.labels("train")
    split = validation_split(ds.rows("train"), s.classifier.val_fraction, s.classifier.split_seed)
    keep, val = split.keep, split.val
    splits = SplitArrays(
        images[keep], labels[keep], images[val], labels[val], ds.images("test"), ds.labels("test")
    )
    info = train_cxr_feature_extractor(
        splits,
        s.classifier,
        s.evaluation,
        extractor_dir(s.data_dir),
        device=device,
        log=context.log.info,
    )
    per_class = ", ".join(f"{c} {n}" for c, n in zip(s.dataset.class_names, info.n_train_per_class))
    curve = pd.DataFrame(info.history)
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(info.weights_path),
            "weights_sha256": info.weights_sha256,
            "training_set": (
                f"chest_xray_dataset train split less the classifiers' validation split, real images only: "
                f"{info.n_train} ({per_class}); "
                f"dataset version {ds.version}"
            ),
            "dataset_version": ds.version,
            "validation_split": split.describe(),
            "validation_accuracy": dg.MetadataValue.float(float(info.validation_accuracy)),
            "test_accuracy": dg.MetadataValue.float(float(info.test_accuracy)),
            "test_auc": dg.MetadataValue.float(_finite_or_nan(info.test_auc)),
            "selected_epoch": f"{info.selected_epoch} of {info.epochs} (by validation accuracy, "
            f"{info.n_validation} images)",
            "feature_resolution": info.resolution,
            "initial_weights": info.pretrained,
            "train_images_per_s": dg.MetadataValue.float(round(float(info.train_images_per_s), 2)),
            "device": device,
            "precision": info.precision,
            "micro_batch": info.compute.get("micro_batch", 0),  # < batch size after an OOM
            "history": metadata_table(curve.round(4)),
            **settings_metadata(s),
        },
        data_version=dg.DataVersion(info.weights_sha256[:16]),
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
        description="Against the held-out real reference, the fine-tuned images' KID is below the untrained "
        "base model's by more than their spreads (evaluation.kid_verdict_spreads), in every available "
        "feature space (warns). FID decides nothing.",
    ),
]


# fid_scores' decorator arguments; its dependency on base_model_images (per class) is added by
# fid_scores_asset, with the mapping from generator to class of the settings.
_FID_SCORES_ASSET = dict(
    **_ON_GPU,
    code_version="fid-scores-v4",  # v4: reads base_model_images, made beside DreamBooth
    check_specs=FID_CHECKS,
    description=(
        "KID (mean ± std over subsets, unbiased at small n: it leads and decides), FID (marked biased "
        "below evaluation.fid_min_images per feature space) and precision/recall (Kynkaanniemi, k=3) "
        "of the generator's synthetic images, with torch-fidelity, n beside every score, against two "
        "references: the generator's own real training images (which rewards memorization) and "
        "held-out real images of its class (the demo: phantoms made for it; real sources: the "
        "classifiers' validation split; never seen by a generator), beside the real-vs-real floor "
        "(as many other real images against the held-out reference). Two feature spaces: Inception "
        "(inception-v3-compat, as the study's FID 61.88 / 64.08; recorded unavailable, with the "
        "reason, where its weights cannot be had) and the chest-X-ray space of cxr_feature_extractor. "
        "The untrained base model's images of the same prompt, made with the same sampler settings "
        "(generation.*) by base_model_images (per class, beside DreamBooth), are scored the same way. "
        "Reference features are cached per reference images and feature space."
    ),
)


@one_writer
@on_a_card
def fid_scores(
    context: dg.AssetExecutionContext, settings: SettingsResource, compute: ComputeResource
) -> dg.MaterializeResult:
    s = settings.get()
    key = context.partition_key
    ds = open_dataset(s)
    refs = fid_references(s, ds, key)
    synthetic, syn_set = synthetic_set(s, key)
    base, base_set = base_model_set(s, key)
    device = compute.resolve_device()
    sets = {"synthetic": synthetic, "base_model": base}
    if len(base) < len(synthetic):  # FID falls with the number of images: also compare at equal counts
        sets["synthetic_matched"] = synthetic[: len(base)]
    floor = real_floor_set(refs.floor_pool, len(synthetic), s.evaluation.floor_seed)
    held_sets = {"synthetic": synthetic, "base_model": base, "real_floor": floor}
    if len(floor) < len(synthetic):
        held_sets["synthetic_at_floor_size"] = synthetic[: len(floor)]
    results, held_out = _score_spaces(context, s, refs, (sets, held_sets), device)
    moved = kid_comparisons(held_out, s.evaluation.kid_verdict_spreads)
    record = {
        "class": class_key_of(key),
        "generator": key,
        "reference_set": refs.train_note,
        "dataset_version": ds.version,
        "synthetic_checkpoint_version": checkpoint_versions(syn_set.manifest),
        "synthetic_version": syn_set.version(),
        "base_model_version": checkpoint_versions(base_set.manifest),
        "base_model_images_version": base_set.version(),
        "base_model_images": (
            f"base_model_images[{class_key_of(key)}]: {len(base)} base-model images of the instance prompt, "
            f"{_one(base_set.manifest, 'num_inference_steps')} DPM-Solver steps, guidance "
            f"{_one(base_set.manifest, 'guidance_scale')} (the fine-tuned sets' sampler)"
        ),
        "published_fid_inception": s.evaluation.published_fid.get(class_key_of(key)),
        "fid_min_images": dict(s.evaluation.fid_min_images),
        "spaces": {name: r.to_dict() for name, r in results.items()},
        "held_out": {
            "reference_set": refs.held_out_note,
            "n_reference": len(refs.held_out),
            "real_floor": f"{len(floor)} real {class_key_of(key)} training images outside the held-out set "
            f"(seed {s.evaluation.floor_seed}), scored against it like the synthetic set",
            "kid_comparison": {space: dataclasses.asdict(c) for space, c in moved.items()},
            "spaces": {name: r.to_dict() for name, r in held_out.items()},
        },
    }
    path = s.layout.fid_scores(key)
    write_json_atomic(path, record)

    metadata: dict = {
        "kid_held_out": dg.MetadataValue.md(kid_summary_md(held_out, moved)),
        "scores_held_out": metadata_table(_scores_frame(held_out)),
        "held_out_reference_set": refs.held_out_note,
        "n_held_out_reference": len(refs.held_out),
        "real_floor_set": record["held_out"]["real_floor"],
        "fid_min_images": dg.MetadataValue.json(record["fid_min_images"]),
        "reference_set": refs.train_note,
        "n_reference": len(refs.train),
        "n_synthetic": len(synthetic),
        "n_base_model": len(base),
        "base_model_images": record["base_model_images"],
        "scores": metadata_table(_scores_frame(results)),
        "dataset_version": ds.version,
        "checkpoint_version": record["synthetic_checkpoint_version"],
        "base_model_version": record["base_model_version"],
        "published_fid_inception": dg.MetadataValue.float(
            float(s.evaluation.published_fid.get(class_key_of(key), math.nan))
        ),
        "path": dg.MetadataValue.path(str(path)),
        **_score_metadata(results, held_out),
    }
    metadata.update(settings_metadata(s))
    checks = _fid_checks(results, s, len(synthetic)) + [_closer_check(moved, held_out)]
    return dg.MaterializeResult(metadata=metadata, check_results=checks)


def _one(manifest: pd.DataFrame, column: str) -> str:
    """The value of ``column`` every row of a generated set's manifest shares (joined if several)."""
    return ", ".join(str(v) for v in sorted(manifest[column].unique()))


def kid_comparisons(held_out: dict[str, SpaceScores], spreads: float) -> dict[str, KidComparison]:
    """Per available feature space: did fine-tuning move the images toward the held-out real images?"""
    return {
        space: compare_kid(r.scores.get("synthetic"), r.scores.get("base_model"), spreads)
        for space, r in held_out.items()
        if r.available
    }


def kid_summary_md(held_out: dict[str, SpaceScores], moved: dict[str, KidComparison]) -> str:
    """KID first, in words: per space the three sets' KID (mean ± std, subset size, n) and the verdict."""
    lines = []
    for space, r in held_out.items():
        if not r.available:
            lines.append(f"- **{space}**: unavailable ({r.reason})")
            continue
        figures = "; ".join(
            f"{name} {kid_text(sc)}"
            for name, sc in r.scores.items()
            if name in ("synthetic", "base_model", "real_floor")
        )
        lines.append(
            f"- **{space}** KID against the held-out reference: {figures}. "
            f"Fine-tuning moved the images: **{moved[space].verdict}**."
        )
    return "\n".join(lines)


def kid_text(sc: SetScores) -> str:
    """``0.0123 ± 0.0045 (subsets of 16, n 58 vs 120)``, or why there is no KID."""
    n = f"n {sc.n_images} vs {sc.n_reference}"
    if sc.kid_mean is None:
        return f"no KID ({n}: {sc.skipped.get('kid', '')})"
    return f"{sc.kid_mean:.4f} ± {sc.kid_std:.4f} (subsets of {sc.kid_subset_size}, {n})"


def _closer_check(moved: dict[str, KidComparison], held_out: dict[str, SpaceScores]) -> dg.AssetCheckResult:
    """``closer_to_real_than_base_model``, on KID against the held-out reference in every available space."""
    metadata: dict[str, Any] = {}
    for space, c in moved.items():
        scores = held_out[space].scores
        metadata[f"{space}_verdict"] = c.verdict
        metadata[f"{space}_kid_fine_tuned"] = kid_text(scores["synthetic"])
        metadata[f"{space}_kid_base_model"] = kid_text(scores["base_model"])
        metadata[f"{space}_kid_difference"] = _finite_or_nan(c.difference)
        metadata[f"{space}_spread"] = _finite_or_nan(c.spread)
    return dg.AssetCheckResult(
        check_name="closer_to_real_than_base_model",
        passed=bool(moved) and all(c.verdict == TOWARD_REAL for c in moved.values()),
        severity=dg.AssetCheckSeverity.WARN,
        metadata=metadata,
    )


def _score_spaces(
    context: dg.AssetExecutionContext,
    s: Settings,
    refs: FidReferences,
    sets: tuple[dict[str, np.ndarray], dict[str, np.ndarray]],
    device: str,
) -> tuple[dict[str, SpaceScores], dict[str, SpaceScores]]:
    """Scores of the first sets against the generator's training images and of the second against
    the held-out reference, in every feature space."""
    key, cache = context.partition_key, s.layout.reference_features
    train_ref = ReferenceImages(refs.train, f"{refs.cache_key}-train", cache)
    held_ref = ReferenceImages(refs.held_out, f"{refs.cache_key}-held-out", cache)
    results, held_out = {}, {}
    for name in SPACES:
        space = get_feature_space(name, s.evaluation, cxr_weights=extractor_weights(s.data_dir))
        context.log.info(f"{key}: scoring {', '.join(sets[0])} in the {name} space")
        results[name] = score_sets(sets[0], train_ref, space, s.evaluation, device)
        held_out[name] = score_sets(sets[1], held_ref, space, s.evaluation, device)
        if not results[name].available:
            context.log.warning(f"{name} scores unavailable: {results[name].reason}")
    return results, held_out


def _score_metadata(results: dict[str, SpaceScores], held_out: dict[str, SpaceScores]) -> dict[str, Any]:
    """Each score as its own float (e.g. ``kid_cxr``, ``kid_std_cxr``, ``fid_inception_base_model_held_out``)
    with its ``n_*`` and whether the FID is biased (``fid_*_biased``), the weights' hashes, whether the
    reference features were reused, and why a space is unavailable."""
    metadata: dict[str, Any] = {}
    for space, result in results.items():
        if not result.available:
            metadata[f"{space}_unavailable"] = result.reason
            continue
        metadata[f"{space}_weights_sha256"] = result.fingerprint["weights_sha256"]
        metadata[f"{space}_reference_features_reused"] = bool(result.reference_cache["hit"])
        for ref, by_space in (("", results), ("_held_out", held_out)):
            for set_name, scores in by_space[space].scores.items():
                suffix = ("" if set_name == "synthetic" else f"_{set_name}") + ref
                metadata[f"n_{space}{suffix}"] = scores.n_images
                for metric in METRICS:
                    if getattr(scores, metric) is not None:
                        label = "kid" if metric == "kid_mean" else metric
                        metadata[f"{label}_{space}{suffix}"] = dg.MetadataValue.float(getattr(scores, metric))
                if scores.fid is not None:
                    metadata[f"fid_{space}{suffix}_biased"] = scores.fid_biased
    return metadata


def _fid_checks(results: dict[str, SpaceScores], s: Settings, n_synthetic: int) -> list[dg.AssetCheckResult]:
    available = {k: v for k, v in results.items() if v.available}
    values = {
        f"{metric}_{space}_{set_name}": getattr(scores, metric)
        for space, r in available.items()
        for set_name, scores in r.scores.items()
        for metric in METRICS
        if getattr(scores, metric) is not None
    }
    bad = sorted(k for k, v in values.items() if not math.isfinite(v))
    # the number of images behind each space's score of the synthetic set
    counts = {space: r.scores["synthetic"].n_images for space, r in available.items()}
    expected = images_per_class(s)
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
    ]


def _scores_frame(results: dict[str, SpaceScores]) -> pd.DataFrame:
    """One row per feature space and image set, KID first: n, reference n, KID mean and std with its
    subset size, FID (and whether it is below the space's minimum n: biased), precision, recall."""
    rows = []
    for space, r in results.items():
        if not r.available:
            rows.append({"space": space, "images": f"unavailable: {r.reason}"})
            continue
        for set_name, sc in r.scores.items():
            rows.append(
                {
                    "space": space,
                    "images": set_name,
                    "n": sc.n_images,
                    "n_reference": sc.n_reference,
                    "kid": sc.kid_mean,
                    "kid_std": sc.kid_std,
                    "kid_subset_size": sc.kid_subset_size,
                    "fid": sc.fid,
                    "fid_reading": fid_reading(sc),
                    "precision": sc.precision,
                    "recall": sc.recall,
                }
            )
    columns = ["space", "images", "n", "n_reference", "kid", "kid_std", "kid_subset_size", "fid"]
    frame = pd.DataFrame(rows, columns=[*columns, "fid_reading", "precision", "recall"])
    counts = {c: "Int64" for c in ("n", "n_reference", "kid_subset_size")}
    return frame.astype({**counts, **{m: float for m in ("kid", "kid_std", "fid", "precision", "recall")}})


def fid_reading(sc: SetScores) -> str:
    """How to read an FID: ``biased (n < 1024)`` below the space's minimum, else ``n >= 1024``."""
    if sc.fid is None:
        return "not computed"
    if sc.fid_biased:
        return f"biased (n < {sc.fid_min_images}): for side-by-side reading only"
    return f"n >= {sc.fid_min_images}"


# --------------------------------------------------------------------------- memorization


_MEMORIZATION_ASSET = dict(
    deps=["chest_xray_dataset", "cxr_feature_extractor", "synthetic_images"],
    **_ON_GPU,
    code_version="memorization-v2",  # v2: each row keyed by the synthetic PNG's sha256
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


@one_writer
@on_a_card
def memorization(
    context: dg.AssetExecutionContext, settings: SettingsResource, compute: ComputeResource
) -> dg.MaterializeResult:
    s = settings.get()
    e = s.evaluation
    key = context.partition_key
    ds, real, rows, cache_key = class_reference(s, key)
    synthetic, syn_set = synthetic_set(s, key)
    space = get_feature_space("cxr", e, cxr_weights=extractor_weights(s.data_dir))
    reference = ReferenceImages(real, cache_key, s.layout.reference_features)
    device = compute.resolve_device()
    feats = features_in_space({"synthetic": synthetic}, reference, space, e.batch_size, device)
    table = nearest_real_images(synthetic, real, feats.sets["synthetic"], feats.reference, e)
    baseline = real_baseline(real, feats.reference, e) if len(real) >= 2 else None
    summary = memorization_summary(table, e, baseline)
    saved = table.assign(
        synthetic_file=syn_set.manifest["file"].to_numpy(),
        synthetic_sha256=syn_set.manifest["sha256"].to_numpy(),
        nearest_real_source_id=rows["source_id"].to_numpy()[table["nearest_real_index"]],
        nearest_real_source_id_pixel=rows["source_id"].to_numpy()[table["nearest_real_index_pixel"]],
    )
    path = s.layout.memorization(key)
    write_parquet_atomic(saved, path)
    copies = saved[saved["near_copy"]]
    n = e.memorization_pairs_shown
    return dg.MaterializeResult(
        metadata={
            "n_synthetic": len(synthetic),
            "n_real": len(real),
            "real_set": reference_note(s, ds, key, len(real)),
            "dataset_version": ds.version,
            "checkpoint_version": checkpoint_versions(syn_set.manifest),
            "n_near_copies": summary["n_near_copies"],
            "min_cosine_distance": dg.MetadataValue.float(summary["min_cosine_distance"]),
            "median_cosine_distance": dg.MetadataValue.float(summary["median_cosine_distance"]),
            "max_pixel_correlation": dg.MetadataValue.float(summary["max_pixel_correlation"]),
            "summary": dg.MetadataValue.json(summary),
            "distribution": dg.MetadataValue.md(png_markdown(memorization_histogram(table, e, baseline))),
            "closest_pairs_features": dg.MetadataValue.md(
                png_markdown(
                    closest_pairs_image(synthetic, real, table, PairsView("cosine_distance", n, cell=80))
                )
            ),
            "closest_pairs_pixels": dg.MetadataValue.md(
                png_markdown(
                    closest_pairs_image(synthetic, real, table, PairsView("pixel_correlation", n, cell=80))
                )
            ),
            "path": dg.MetadataValue.path(str(path)),
            **settings_metadata(s),
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
                    "near_copies": metadata_table(
                        copies.head(20)[
                            [
                                "synthetic_file",
                                "nearest_real_source_id",
                                "cosine_distance",
                                "nearest_real_source_id_pixel",
                                "pixel_correlation",
                            ]
                        ]
                    ),
                },
            )
        ],
    )


# --------------------------------------------------------------------------- class_fidelity

FIDELITY_CHECK = "synthetic_images_look_like_their_class"


_CLASS_FIDELITY_ASSET = dict(
    deps=["chest_xray_dataset", "cxr_feature_extractor", "synthetic_images"],  # the real test images too
    **_ON_GPU,
    code_version="class-fidelity-v3",  # v3: the class score of each image kept
    check_specs=[
        dg.AssetCheckSpec(
            FIDELITY_CHECK,
            asset="class_fidelity",
            description="At least evaluation.class_fidelity_threshold of the generator's images are "
            "assigned to its class by the real-trained chest-X-ray classifier (warns).",
        )
    ],
    description=(
        "Class fidelity: the share of the generator's synthetic images that cxr_feature_extractor (a "
        "DenseNet-121 trained on real images only) assigns to the generator's class, with a Wilson "
        "interval. Near zero means the images look like the other class to a real-trained classifier "
        "(what FID does not show). data/evaluation/class_fidelity/{generator}.json, and each image's "
        "class score (keyed by its PNG's sha256) in {generator}.parquet."
    ),
)


@one_writer
@on_a_card
def class_fidelity(
    context: dg.AssetExecutionContext, settings: SettingsResource, compute: ComputeResource
) -> dg.MaterializeResult:
    s = settings.get()
    e = s.evaluation
    key = context.partition_key
    synthetic, syn_set = synthetic_set(s, key)
    weights = extractor_weights(s.data_dir)
    about = {
        "generator": key,
        "class_key": class_key_of(key),
        "threshold": e.class_fidelity_threshold,
        "extractor_sha256": sha256_file(weights),
        "synthetic_version": syn_set.version(),
    }
    predict = extractor_predictor(s, compute.resolve_device())
    inputs = FidelityInputs(synthetic, real_test_images(s, class_label(key)), class_label(key))
    scores = score_fidelity_inputs(predict, inputs)
    per_image = per_image_class_scores(syn_set.manifest, scores.synthetic, inputs.label)
    per_image_path = write_parquet_atomic(per_image, s.layout.class_fidelity_images(key))
    record = fidelity_from_scores(scores, inputs.label, about, e.class_fidelity_level)
    path = save_fidelity(record, s.data_dir)
    interval = f"{record.share:.3f} [{record.ci_low:.3f}, {record.ci_high:.3f}]"
    recall = f"{record.real_recall:.3f} [{record.real_recall_low:.3f}, {record.real_recall_high:.3f}]"
    return dg.MaterializeResult(
        metadata={
            "class_fidelity": dg.MetadataValue.float(record.share),
            "interval": f"{interval} ({100 * record.level:g}% Wilson)",
            "n_assigned": record.n_assigned,
            "n_synthetic": record.n_images,
            "real_test_recall": f"{recall} of {record.n_real} real test images of the class (for reading "
            "the share: what a faithful generator can reach)",
            "classifier": "cxr_feature_extractor (DenseNet-121 trained on real train only)",
            "synthetic_version": record.synthetic_version,
            "path": dg.MetadataValue.path(str(path)),
            "per_image_path": dg.MetadataValue.path(str(per_image_path)),
            **settings_metadata(s),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=FIDELITY_CHECK,
                passed=record.passed,
                severity=dg.AssetCheckSeverity.WARN,
                metadata={
                    "class_fidelity": interval,
                    "threshold": record.threshold,
                    "real_test_recall": recall,
                },
            )
        ],
    )


# --------------------------------------------------------------------------- helpers


def _finite_or_nan(value) -> float:
    return float(value) if value is not None and math.isfinite(value) else math.nan


def build_defs(s: Settings) -> dg.Definitions:
    """The evaluation domain's definitions: GPU steps, per-generator partitions from ``s``."""
    return dg.Definitions(
        assets=[
            cxr_feature_extractor_asset(s),
            fid_scores_asset(s),
            memorization_asset(s),
            class_fidelity_asset(s),
        ]
    )


def cxr_feature_extractor_asset(s: Settings) -> dg.AssetsDefinition:
    """``cxr_feature_extractor``: trains a DenseNet-121."""
    return dg.asset(**_CXR_FEATURE_EXTRACTOR_ASSET, **gpu_step(s, "classifier"))(cxr_feature_extractor)


def fid_scores_asset(s: Settings) -> dg.AssetsDefinition:
    """``fid_scores`` per generator, reading its class's ``base_model_images``: Inception and
    DenseNet features only (the base model's images are their own step), so sized as a classifier step."""
    deps = [
        "chest_xray_dataset",
        "cxr_feature_extractor",
        "synthetic_images",
        dg.AssetDep("base_model_images", partition_mapping=class_of_generator(s)),
    ]
    return dg.asset(
        **_FID_SCORES_ASSET, deps=deps, partitions_def=generator_partitions(s), **gpu_step(s, "classifier")
    )(fid_scores)


def memorization_asset(s: Settings) -> dg.AssetsDefinition:
    """``memorization`` per generator: DenseNet-121 features."""
    return dg.asset(
        **_MEMORIZATION_ASSET, partitions_def=generator_partitions(s), **gpu_step(s, "classifier")
    )(memorization)


def class_fidelity_asset(s: Settings) -> dg.AssetsDefinition:
    """``class_fidelity`` per generator: DenseNet-121 predictions."""
    return dg.asset(
        **_CLASS_FIDELITY_ASSET, partitions_def=generator_partitions(s), **gpu_step(s, "classifier")
    )(class_fidelity)
