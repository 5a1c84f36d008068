"""Class fidelity: does a classifier trained on real images only call a class's synthetic images that class?

The share of one generator's synthetic images that the chest-X-ray feature extractor (a
DenseNet-121 trained on real train only, ``extractor.py``) assigns to the generator's class,
with a Wilson score interval. A generator whose NORMAL images look like PNEUMONIA to a
real-trained classifier scores near zero, which FID alone does not show. Beside it, the same
classifier's recall on the real test images of the class: the share a faithful generator can be
expected to reach (a measurement for the reader; nothing is selected with it).

Layout: ``data/evaluation/class_fidelity/{generator}.json`` (a :class:`ClassFidelity`) and, per
image, ``{generator}.parquet`` (:func:`per_image_class_scores`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import binomtest

from synth_xray_assets.layout import Layout
from synth_xray_assets.storage import write_json_atomic


@dataclass(frozen=True)
class ClassFidelity:
    """One generator's class fidelity: ``share`` of ``n_images`` called ``class_key``, its interval."""

    generator: str
    class_key: str
    n_images: int
    n_assigned: int
    share: float
    ci_low: float
    ci_high: float
    level: float
    threshold: float
    extractor_sha256: str
    synthetic_version: str
    # The extractor's recall on the real test images of the class, with its interval (NaN: not measured).
    real_recall: float = float("nan")
    real_recall_low: float = float("nan")
    real_recall_high: float = float("nan")
    n_real: int = 0

    @property
    def passed(self) -> bool:
        return self.share >= self.threshold


def fidelity_share(predicted: np.ndarray, label: int, level: float = 0.95) -> tuple[int, float, float, float]:
    """``(n_assigned, share, low, high)``: how many predictions equal ``label``, and the Wilson interval."""
    pred = np.asarray(predicted).astype(np.int64)
    if pred.size == 0:
        raise ValueError("class fidelity needs at least one synthetic image")
    k = int((pred == label).sum())
    ci = binomtest(k, pred.size).proportion_ci(confidence_level=level, method="wilson")
    return k, k / pred.size, float(ci.low), float(ci.high)


@dataclass(frozen=True)
class FidelityInputs:
    """The images to judge: synthetic and real test images of class ``label`` (uint8 ``[N, H, W]``)."""

    synthetic: np.ndarray
    real_test: np.ndarray
    label: int


@dataclass(frozen=True)
class FidelityScores:
    """The extractor's PNEUMONIA probability of each synthetic and each real test image."""

    synthetic: np.ndarray
    real_test: np.ndarray


def score_fidelity_inputs(
    predict: Callable[[np.ndarray], np.ndarray], inputs: FidelityInputs
) -> FidelityScores:
    """Both image sets through ``predict`` (images to PNEUMONIA probabilities)."""
    return FidelityScores(
        np.asarray(predict(inputs.synthetic), np.float64), np.asarray(predict(inputs.real_test), np.float64)
    )


def fidelity_from_scores(
    scores: FidelityScores, label: int, about: dict[str, Any], level: float
) -> ClassFidelity:
    """Class fidelity of the synthetic images and recall on the real test images of class ``label``
    from their scores; ``about`` fills the remaining fields."""

    def assigned(prob: np.ndarray) -> tuple[int, float, float, float]:
        return fidelity_share((prob > 0.5).astype(np.int64), label, level)

    k, share, low, high = assigned(scores.synthetic)
    _, recall, recall_low, recall_high = assigned(scores.real_test)
    return ClassFidelity(
        n_images=len(scores.synthetic),
        n_assigned=k,
        share=share,
        ci_low=low,
        ci_high=high,
        level=level,
        real_recall=recall,
        real_recall_low=recall_low,
        real_recall_high=recall_high,
        n_real=len(scores.real_test),
        **about,
    )


def measure_class_fidelity(
    predict: Callable[[np.ndarray], np.ndarray],
    inputs: FidelityInputs,
    about: dict[str, Any],
    level: float,
) -> ClassFidelity:
    """Class fidelity of the synthetic images under ``predict`` (images to PNEUMONIA probabilities),
    and recall on the real test images of the class; ``about`` fills the remaining fields."""
    return fidelity_from_scores(score_fidelity_inputs(predict, inputs), inputs.label, about, level)


def per_image_class_scores(
    manifest: pd.DataFrame, pneumonia_probability: np.ndarray, label: int
) -> pd.DataFrame:
    """One row per synthetic image (in ``manifest`` order, keyed by its PNG's sha256): the
    extractor's probability of class ``label`` (``class_score``) and whether it calls it that class."""
    prob = np.asarray(pneumonia_probability, np.float64)
    if len(prob) != len(manifest):
        raise ValueError(f"{len(prob)} scores for {len(manifest)} images")
    return pd.DataFrame(
        {
            "synthetic_file": manifest["file"].to_numpy(),
            "synthetic_sha256": manifest["sha256"].to_numpy(),
            "pneumonia_probability": prob,
            "class_score": prob if label == 1 else 1.0 - prob,
            "assigned_to_class": (prob > 0.5) == bool(label),
        }
    )


def fidelity_path(data_dir: str | Path, generator: str) -> Path:
    return Layout(Path(data_dir)).class_fidelity(generator)


def save_fidelity(record: ClassFidelity, data_dir: str | Path) -> Path:
    return write_json_atomic(fidelity_path(data_dir, record.generator), asdict(record))


def load_fidelity(data_dir: str | Path, generator: str) -> ClassFidelity | None:
    """The saved record of ``generator``, or None when it has not been measured."""
    path = fidelity_path(data_dir, generator)
    return ClassFidelity(**json.loads(path.read_text())) if path.is_file() else None
