"""Dagster wiring of the classifier experiments: ``classifier_experiment`` and its checks."""

import math

import dagster as dg
from PIL import Image

from synth_xray_assets.classifier.data import ExperimentData
from synth_xray_assets.classifier.experiment import CURVES_FILE, run_dir, run_experiment
from synth_xray_assets.classifier.stats import METRICS
from synth_xray_assets.classifier.train import RunResult
from synth_xray_assets.deployment import gpu_step
from synth_xray_assets.metadata import settings_metadata
from synth_xray_assets.operations.locks import one_writer
from synth_xray_assets.operations.refusals import disk_refusal_is_final
from synth_xray_assets.partitions import experiment_partitions
from synth_xray_assets.resources import ComputeResource, SettingsResource, on_a_card
from synth_xray_assets.settings import Settings
from synth_xray_assets.storage import png_markdown

OWNERS = ["team:synth-xray"]
CLASSIFIER_VERSION = "classifier-v2"  # bump when training, composition or scoring changes
LEAKAGE_CHECK = "no_test_leakage"
FINITE_CHECK = "metrics_are_finite"


_CLASSIFIER_EXPERIMENT_ASSET = dict(
    deps=[
        dg.AssetDep("chest_xray_dataset"),
        dg.AssetDep("synthetic_images", partition_mapping=dg.AllPartitionMapping()),
    ],
    group_name="classifier",
    kinds={"pytorch"},
    owners=OWNERS,
    code_version=CLASSIFIER_VERSION,
    check_specs=[
        dg.AssetCheckSpec(
            LEAKAGE_CHECK,
            asset="classifier_experiment",
            blocking=True,
            description="No test image (by content hash) is among the training or validation images.",
        ),
        dg.AssetCheckSpec(
            FINITE_CHECK,
            asset="classifier_experiment",
            description="Every test metric and every epoch's loss is a finite number.",
        ),
    ],
    description=(
        "One DenseNet-121 pneumonia classifier per experiment (the study's mixes of real and "
        "synthetic images) and seed, trained with the study's head, optimizer, schedule and "
        "augmentation. The epoch is selected on a validation split carved from real train (or on "
        "the test set with classifier.selection='test', the study's protocol, labelled as such); the "
        "test set gives the final scores, at the selected and at the last epoch. Weights, per-image "
        "test probabilities and curves under data/classifier/{experiment}/seed-{seed}/."
    ),
)


@disk_refusal_is_final
@one_writer
@on_a_card
def classifier_experiment(
    context: dg.AssetExecutionContext, settings: SettingsResource, compute: ComputeResource
) -> dg.MaterializeResult:
    s = settings.get()
    keys = context.partition_key.keys_by_dimension
    experiment, seed = keys["experiment"], int(keys["seed"])
    device = compute.resolve_device()
    result, data = run_experiment(s, experiment, seed, device, log=context.log.info)

    sel, last = result.test_selected, result.test_last
    (tn, fp), (fn, tp) = sel["confusion"]
    folder = run_dir(s.data_dir, experiment, seed)
    with Image.open(folder / CURVES_FILE) as im:
        curves = im.convert("RGB")
    metadata = {
        "experiment": experiment,
        "seed": seed,
        "selection": f"{result.selection}: {result.selection_note}",
        "selected_epoch": f"{result.selected_epoch}/{result.epochs}",
        **{f"test_{m}": dg.MetadataValue.float(float(sel[m])) for m in METRICS},
        **{f"last_epoch_test_{m}": dg.MetadataValue.float(float(last[m])) for m in METRICS},
        "val_accuracy": dg.MetadataValue.float(float(result.val_selected["accuracy"])),
        "confusion_matrix (rows true, columns predicted)": dg.MetadataValue.md(
            f"| | pred NORMAL | pred PNEUMONIA |\n|---|---|---|\n| NORMAL | {tn} | {fp} |\n"
            f"| PNEUMONIA | {fn} | {tp} |"
        ),
        "composition": dg.MetadataValue.md(_composition_markdown(data.counts())),
        "validation_split": data.split.describe(),
        "validation_split_counts": dg.MetadataValue.json(data.split.summary()),
        "generators": f"{s.dreambooth.generators}: {data.generators or 'no synthetic images'}",
        "normal_share": dg.MetadataValue.float(data.normal_share()),
        "balance_control": (
            f"real only, oversampled to {data.spec.balance_like}'s NORMAL share "
            f"{data.target_normal_share:.3f}"
            if data.spec.balance_like
            else "no"
        ),
        "settings_fingerprint": result.extra.settings_fingerprint,
        "n_train": result.n_train,
        "n_real": result.extra.n_real,
        "n_synthetic": result.extra.n_synthetic,
        "initial_weights": result.extra.initial_weights,
        "training_curves": dg.MetadataValue.md(png_markdown(curves, "loss and accuracy per epoch")),
        "history": dg.MetadataValue.json(
            [{k: round(v, 5) if isinstance(v, float) else v for k, v in h.items()} for h in result.history]
        ),
        "wall_time_s": dg.MetadataValue.float(round(result.wall_time_s, 2)),
        "train_images_per_s": dg.MetadataValue.float(round(result.train_images_per_s, 2)),
        "resumed_from_epoch": result.resumed_from_epoch,
        "device": device,
        "precision": result.precision,
        "micro_batch": result.compute.get("micro_batch", 0),  # < batch_size after out-of-memory
        "compute": dg.MetadataValue.json(result.compute),
        "checkpoint": dg.MetadataValue.path(result.weights_path),
        "last_epoch_checkpoint": dg.MetadataValue.path(result.last_weights_path),
        "run_dir": dg.MetadataValue.path(str(folder)),
        "dataset_version": data.dataset_version,
        "synthetic_versions": dg.MetadataValue.json(data.synthetic_versions),
        "settings": dg.MetadataValue.json(s.section_json("classifier")),
    }
    metadata.update(settings_metadata(s))
    return dg.MaterializeResult(metadata=metadata, check_results=_run_checks(result, data))


def _composition_markdown(counts: dict[str, int]) -> str:
    """The training, validation and test images per source and class, as a markdown table."""
    rows = [
        ("train, real", "train_real"),
        ("train, real copies (balance control)", "train_real_copy"),
        ("train, synthetic", "train_synthetic"),
        ("validation (real train)", "val_real"),
        ("test", "test_real"),
    ]
    return "\n".join(
        [
            "| | NORMAL | PNEUMONIA |",
            "|---|---|---|",
            *(f"| {name} | {counts[f'{key}_normal']} | {counts[f'{key}_pneumonia']} |" for name, key in rows),
        ]
    )


def _run_checks(result: RunResult, data: ExperimentData) -> list[dg.AssetCheckResult]:
    """No test image among the training or validation images; every score and loss finite."""
    out = data.composition
    test_ids = set(out.loc[out.role == "test", "image_id"])
    leaked = sorted(set(out.loc[out.role.isin(["train", "val"]), "image_id"]) & test_ids)
    sel, last = result.test_selected, result.test_last
    numbers = [sel[m] for m in METRICS] + [last[m] for m in METRICS]
    numbers += [h[k] for h in result.history for k in ("train_loss", "val_loss")]
    not_finite = sum(not math.isfinite(v) for v in numbers)
    return [
        dg.AssetCheckResult(
            check_name=LEAKAGE_CHECK,
            passed=not leaked,
            metadata={
                "num_leaked": len(leaked),
                "leaked_hashes": ", ".join(leaked[:20]) or "none",
                "num_test": len(test_ids),
            },
        ),
        dg.AssetCheckResult(
            check_name=FINITE_CHECK,
            passed=not_finite == 0,
            metadata={"num_not_finite": not_finite, "num_checked": len(numbers)},
        ),
    ]


def build_defs(s: Settings) -> dg.Definitions:
    """The classifier domain's definitions: one partition per experiment x seed of ``s``."""
    return dg.Definitions(assets=[classifier_experiment_asset(s)])


def classifier_experiment_asset(s: Settings) -> dg.AssetsDefinition:
    """``classifier_experiment`` on the settings' experiments x seeds, a GPU step that trains."""
    partitions = experiment_partitions(s.classifier)
    return dg.asset(**_CLASSIFIER_EXPERIMENT_ASSET, partitions_def=partitions, **gpu_step(s, "classifier"))(
        classifier_experiment
    )
