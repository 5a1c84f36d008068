"""The chest-X-ray feature extractor: a DenseNet-121 trained on the real training split only.

The study's classifier recipe (``classifier.train.train_classifier`` with ``classifier.*``
settings) at the evaluation's own input size and number of epochs: images resized to
``feature_resolution`` without a crop, exactly as :class:`features.CXRDenseNetFeatures` sees
them later; the epoch is chosen by accuracy on the validation split; the test split is only
scored. No synthetic image is ever seen. Its pooled 1024-d features define the chest-X-ray
feature space of FID, KID, precision/recall and the memorization check.

Layout under ``data/evaluation/cxr_feature_extractor/``::

    cxr_densenet121.safetensors   the selected epoch's weights (the feature space)
    extractor.json                what it was trained on and how well it classifies
    training/                     train_classifier's own files (best / last epoch)
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from synth_xray_assets.classifier.data import SplitArrays
from synth_xray_assets.classifier.train import TrainRun, train_classifier
from synth_xray_assets.layout import Layout
from synth_xray_assets.settings import ClassifierSettings, EvaluationSettings
from synth_xray_assets.storage import atomic_path, sha256_file, write_json_atomic

WEIGHTS_FILE = "cxr_densenet121.safetensors"


def extractor_dir(data_dir: str | Path) -> Path:
    return Layout(Path(data_dir)).cxr_feature_extractor


def extractor_weights(data_dir: str | Path) -> Path:
    """The safetensors file of the chest-X-ray feature space (written by ``cxr_feature_extractor``)."""
    return extractor_dir(data_dir) / WEIGHTS_FILE


# ExtractorInfo's fields that are the training run's own (RunResult's fields of the same name).
_AS_IN_THE_RUN = (
    "n_train",
    "n_train_per_class",
    "n_test",
    "epochs",
    "selected_epoch",
    "train_images_per_s",
    "train_time_s",
    "precision",
    "compute",
    "history",
)


@dataclass
class ExtractorInfo:
    """The trained extractor: its weights, data, selected epoch and scores, speed and history
    (``extractor.json``)."""

    weights_path: str
    weights_sha256: str
    n_train: int
    n_train_per_class: list[int]
    n_validation: int
    n_test: int
    epochs: int
    selected_epoch: int
    validation_accuracy: float
    test_accuracy: float
    test_auc: float
    train_images_per_s: float
    train_time_s: float
    resolution: int
    pretrained: str | bool
    seed: int
    device: str
    precision: str
    compute: dict[str, Any]  # micro-batch (after any out-of-memory halving), channels_last, ...
    history: list[dict[str, Any]]


def extractor_settings(classifier: ClassifierSettings, evaluation: EvaluationSettings) -> ClassifierSettings:
    """The classifier recipe at the feature space's input size (resize = crop = resolution) and epochs."""
    r = evaluation.feature_resolution
    return classifier.model_copy(
        update={"resolution": r, "resize": r, "epochs": evaluation.feature_epochs, "selection": "validation"}
    )


def train_cxr_feature_extractor(
    data: SplitArrays,
    classifier: ClassifierSettings,
    evaluation: EvaluationSettings,
    out_dir: str | Path,
    device: str = "cpu",
    log: Callable[[str], Any] = print,
) -> ExtractorInfo:
    """Train the extractor on ``data``'s train split (uint8 images ``[N, H, W]``, labels), choose its
    epoch on its validation split, score it on its test split; write
    ``out_dir/cxr_densenet121.safetensors`` and ``extractor.json`` (what the returned record holds)."""
    out_dir = Path(out_dir)
    if len(data.val_x) == 0:
        raise ValueError(
            "the chest-X-ray feature extractor needs a non-empty validation split to choose its epoch"
        )
    settings = extractor_settings(classifier, evaluation)
    run = TrainRun(
        evaluation.feature_seed, device, out_dir / "training", log, experiment="cxr_feature_extractor"
    )
    result = train_classifier(data, settings, run)
    weights = out_dir / WEIGHTS_FILE
    with atomic_path(weights) as tmp:
        shutil.copyfile(result.weights_path, tmp)
    info = ExtractorInfo(
        weights_path=str(weights),
        weights_sha256=sha256_file(weights),
        n_validation=result.n_val,
        validation_accuracy=result.val_selected["accuracy"],
        test_accuracy=result.test_selected["accuracy"],
        test_auc=result.test_selected["auc"],
        resolution=settings.resolution,
        pretrained=settings.pretrained,
        seed=evaluation.feature_seed,
        device=device,
        **{name: getattr(result, name) for name in _AS_IN_THE_RUN},
    )
    write_json_atomic(out_dir / "extractor.json", asdict(info))
    return info
