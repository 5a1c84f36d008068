"""Test metrics, uncertainty over test images and seeds, and paired tests against the baseline.

PNEUMONIA (label 1) is the positive class; an image is called PNEUMONIA when its probability
exceeds 0.5 (the argmax of the two logits).

Probabilities may be one run ``[N]`` or several seeds of the same experiment ``[S, N]`` on the
same test images; with seeds, the statistic is the mean over seeds and the bootstrap resamples
test images (the same resample for every seed), so it covers both sources of noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import binomtest, rankdata

METRICS = ("accuracy", "f1", "auc", "precision", "recall", "specificity")


def roc_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half); NaN when one class is absent."""
    y = np.asarray(y_true).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(np.asarray(score, dtype=np.float64))
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _ratio(a: int, b: int) -> float:
    return a / b if b else 0.0


def binary_metrics(y_true: np.ndarray, prob_pneumonia: np.ndarray) -> dict[str, Any]:
    """Accuracy, F1, AUC, precision, recall, specificity and confusion ``[[tn, fp], [fn, tp]]``.

    Rows of the confusion matrix are the true class, columns the predicted one (NORMAL first).
    Undefined ratios (0/0, e.g. precision when nothing is called PNEUMONIA) are reported as 0.
    """
    y = np.asarray(y_true).astype(np.int64)
    p = np.asarray(prob_pneumonia, dtype=np.float64)
    if y.shape != p.shape:
        raise ValueError(f"labels {y.shape} and probabilities {p.shape} differ in shape")
    pred = p > 0.5
    pos = y == 1
    tp, fn = int((pred & pos).sum()), int((~pred & pos).sum())
    fp, tn = int((pred & ~pos).sum()), int((~pred & ~pos).sum())
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {
        "accuracy": _ratio(tp + tn, len(y)),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "auc": roc_auc(y, p),
        "precision": precision,
        "recall": recall,
        "specificity": _ratio(tn, tn + fp),
        "confusion": [[tn, fp], [fn, tp]],
        "n": int(len(y)),
    }


def metric_value(y_true: np.ndarray, prob: np.ndarray, metric: str) -> float:
    """One metric of :func:`binary_metrics`; for ``[S, N]`` probabilities, the mean over seeds."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")
    y = np.asarray(y_true).astype(np.int64)
    runs = _as_runs(prob)
    if metric == "auc":
        return float(np.mean([roc_auc(y, p) for p in runs]))
    pred, pos = runs > 0.5, (y == 1)[None, :]
    tp, fp = (pred & pos).sum(1), (pred & ~pos).sum(1)
    fn, tn = (~pred & pos).sum(1), (~pred & ~pos).sum(1)
    num, den = {
        "accuracy": (tp + tn, tp + tn + fp + fn),
        "f1": (2 * tp, 2 * tp + fp + fn),
        "precision": (tp, tp + fp),
        "recall": (tp, tp + fn),
        "specificity": (tn, tn + fp),
    }[metric]
    return float(np.mean(np.where(den > 0, num / np.maximum(den, 1), 0.0)))


def _as_runs(prob: np.ndarray | Sequence[Any]) -> np.ndarray:
    p = np.asarray(prob, dtype=np.float64)
    return p[None, :] if p.ndim == 1 else p


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; NaN for fewer than two values)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float("nan")


def bootstrap_ci(
    y_true: np.ndarray,
    prob: np.ndarray,
    metric: str = "accuracy",
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """``(estimate, low, high)``: percentile bootstrap CI of ``metric`` over test images.

    ``prob`` is ``[N]`` or ``[S, N]`` (the seed-mean is recomputed on every resample).
    """
    y = np.asarray(y_true).astype(np.int64)
    runs = _as_runs(prob)
    estimate = metric_value(y, runs, metric)
    rng = np.random.default_rng(seed)
    stats = np.array(
        [metric_value(y[idx], runs[:, idx], metric) for idx in rng.integers(0, len(y), (n_boot, len(y)))]
    )
    stats = stats[~np.isnan(stats)]
    if stats.size == 0:
        return estimate, float("nan"), float("nan")
    alpha = (1 - level) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    return estimate, float(low), float(high)


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> dict[str, Any]:
    """Exact McNemar test on paired per-image correctness of two classifiers.

    ``only_a_correct`` (b) and ``only_b_correct`` (c) are the discordant images; the p-value is
    the two-sided binomial test of b against ``Binomial(b + c, 1/2)``, 1 when they never disagree.
    """
    a, b_ = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b_.shape:
        raise ValueError(f"paired arrays differ in shape: {a.shape} vs {b_.shape}")
    b, c = int((a & ~b_).sum()), int((~a & b_).sum())
    p = 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5, alternative="two-sided").pvalue)
    return {"only_a_correct": b, "only_b_correct": c, "p_value": p}


def paired_bootstrap_diff(
    y_true: np.ndarray,
    prob_baseline: np.ndarray,
    prob_other: np.ndarray,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float]:
    """Accuracy of ``other`` minus ``baseline`` with a paired bootstrap CI and two-sided p-value.

    Both are resampled with the same test images; ``[S, N]`` inputs are paired by seed (row) and
    averaged. The p-value is twice the smaller share of bootstrap differences on either side of
    zero, clipped to ``[1 / n_boot, 1]`` (its resolution).
    """
    y = np.asarray(y_true).astype(np.int64)
    base, other = _as_runs(prob_baseline), _as_runs(prob_other)
    if base.shape != other.shape:
        raise ValueError(f"paired runs differ in shape: {base.shape} vs {other.shape}")
    # Per image: mean over seeds of (other correct - baseline correct).
    delta = (((other > 0.5) == y).astype(np.float64) - ((base > 0.5) == y).astype(np.float64)).mean(0)
    rng = np.random.default_rng(seed)
    diffs = delta[rng.integers(0, len(y), (n_boot, len(y)))].mean(1)
    alpha = (1 - level) / 2
    low, high = np.quantile(diffs, [alpha, 1 - alpha])
    p = min(1.0, max(1.0 / n_boot, 2 * min((diffs <= 0).mean(), (diffs >= 0).mean())))
    return {"diff": float(delta.mean()), "ci_low": float(low), "ci_high": float(high), "p_value": float(p)}
