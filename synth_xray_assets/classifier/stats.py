"""Test metrics, uncertainty over test images and seeds, and paired tests against the baseline.

PNEUMONIA (label 1) is the positive class; an image is called PNEUMONIA when its probability
exceeds 0.5 (the argmax of the two logits).

Probabilities may be one run ``[N]`` or several seeds of the same experiment ``[S, N]`` on the
same test images; with seeds, the statistic is the mean over seeds and the bootstrap is two-level
(hierarchical): seeds with replacement, then test images with replacement, so the intervals
cover both sources of noise. Paired tests: the paired two-level bootstrap, a paired t-test over
seeds, DeLong's test for AUC; Holm's adjustment for a family of comparisons.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import binomtest, norm, rankdata
from scipy.stats import t as student_t

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


def _hierarchical_draws(n_seeds: int, n_images: int, boot: Bootstrap):
    """``boot.n_boot`` pairs ``(seed_idx [S], image_idx [N])``: seeds drawn with replacement (when asked
    and there are two or more), then test images with replacement, the same images for every seed."""
    rng = np.random.default_rng(boot.seed)
    resample = boot.resample_seeds and n_seeds > 1
    for _ in range(boot.n_boot):
        seeds = rng.integers(0, n_seeds, n_seeds) if resample else np.arange(n_seeds)
        yield seeds, rng.integers(0, n_images, n_images)


def _quantiles(stats: np.ndarray, level: float) -> tuple[float, float]:
    stats = stats[~np.isnan(stats)]
    if stats.size == 0:
        return float("nan"), float("nan")
    alpha = (1 - level) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    return float(low), float(high)


@dataclass(frozen=True)
class Bootstrap:
    """A two-level percentile bootstrap: resamples, their seed, the level, whether seeds are resampled."""

    n_boot: int = 2000
    seed: int = 0
    level: float = 0.95
    resample_seeds: bool = True


def bootstrap_ci(
    y_true: np.ndarray, prob: np.ndarray, metric: str = "accuracy", boot: Bootstrap = Bootstrap()
) -> tuple[float, float, float]:
    """``(estimate, low, high)``: two-level (hierarchical) percentile bootstrap CI of ``metric``.

    ``prob`` is ``[N]`` or ``[S, N]``; the statistic is the mean over seeds. Each resample draws
    ``S`` seeds with replacement, then ``N`` test images with replacement (the same for every
    drawn seed), so the interval covers seed-to-seed and test-image variance. With one seed
    (or ``boot.resample_seeds=False``) only test images are resampled.
    """
    y = np.asarray(y_true).astype(np.int64)
    runs = _as_runs(prob)
    estimate = metric_value(y, runs, metric)
    stats = np.array(
        [
            metric_value(y[idx], runs[np.ix_(seeds, idx)], metric)
            for seeds, idx in _hierarchical_draws(len(runs), len(y), boot)
        ]
    )
    return (estimate, *_quantiles(stats, boot.level))


def paired_bootstrap_diff(
    y_true: np.ndarray,
    prob_baseline: np.ndarray,
    prob_other: np.ndarray,
    metric: str = "accuracy",
    boot: Bootstrap = Bootstrap(),
) -> dict[str, float]:
    """``metric`` of ``other`` minus ``baseline`` with a two-level paired bootstrap CI and p-value.

    ``[S, N]`` inputs are paired by seed (row) and by test image: every resample draws the same
    seeds and the same images for both. The p-value is twice the smaller share of resampled
    differences on either side of zero, clipped to ``[1 / n_boot, 1]`` (its resolution).
    """
    y = np.asarray(y_true).astype(np.int64)
    base, other = _as_runs(prob_baseline), _as_runs(prob_other)
    if base.shape != other.shape:
        raise ValueError(f"paired runs differ in shape: {base.shape} vs {other.shape}")
    diff = metric_value(y, other, metric) - metric_value(y, base, metric)
    diffs = np.array(
        [
            metric_value(y[idx], other[np.ix_(seeds, idx)], metric)
            - metric_value(y[idx], base[np.ix_(seeds, idx)], metric)
            for seeds, idx in _hierarchical_draws(len(base), len(y), boot)
        ]
    )
    low, high = _quantiles(diffs, boot.level)
    diffs = diffs[~np.isnan(diffs)]
    p = (
        min(1.0, max(1.0 / boot.n_boot, 2 * min((diffs <= 0).mean(), (diffs >= 0).mean())))
        if diffs.size
        else float("nan")
    )
    return {"diff": float(diff), "ci_low": low, "ci_high": high, "p_value": float(p)}


def paired_seed_test(values_baseline: Sequence[float], values_other: Sequence[float]) -> dict[str, float]:
    """Paired t-test over seeds of a per-seed figure (e.g. test accuracy): mean difference, its
    t statistic and two-sided p-value; NaN with fewer than two paired seeds (or no variation)."""
    a, b = np.asarray(values_baseline, np.float64), np.asarray(values_other, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired seeds differ in count: {a.shape} vs {b.shape}")
    d = b - a
    if d.size < 2 or not np.isfinite(d).all():
        return {
            "diff": float(d.mean()) if d.size else float("nan"),
            "t": float("nan"),
            "p_value": float("nan"),
        }
    sd = d.std(ddof=1)
    if sd == 0:
        return {"diff": float(d.mean()), "t": float("nan"), "p_value": 1.0 if d.mean() == 0 else 0.0}
    t = d.mean() / (sd / np.sqrt(d.size))
    return {"diff": float(d.mean()), "t": float(t), "p_value": float(2 * student_t.sf(abs(t), d.size - 1))}


def _delong_components(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUCs ``[K]`` and DeLong's structural components ``V10 [K, m]`` (positives) and ``V01 [K, n]``
    (negatives) of ``K`` score vectors, from mid-ranks (Sun and Xu's fast form)."""
    pos, neg = y == 1, y == 0
    m, n = int(pos.sum()), int(neg.sum())
    aucs, v10, v01 = [], [], []
    for s in scores:
        r_all, r_pos, r_neg = rankdata(s), rankdata(s[pos]), rankdata(s[neg])
        v10.append((r_all[pos] - r_pos) / n)  # share of negatives below each positive (ties half)
        v01.append(1.0 - (r_all[neg] - r_neg) / m)  # share of positives above each negative
        aucs.append(v10[-1].mean())
    return np.array(aucs), np.array(v10), np.array(v01)


def delong_test(y_true: np.ndarray, score_a: np.ndarray, score_b: np.ndarray) -> dict[str, float]:
    """DeLong's test of two correlated AUCs on the same images: ``auc_b - auc_a``, its variance,
    z and two-sided p-value. ``score_*`` may be ``[N]`` or ``[S, N]`` (seeds paired by row): then
    the difference is the mean over seeds and its variance the mean of the per-seed variances, an
    upper bound of the mean's test-image variance (seeds share the test images)."""
    y = np.asarray(y_true).astype(np.int64)
    a, b = _as_runs(score_a), _as_runs(score_b)
    if a.shape != b.shape:
        raise ValueError(f"paired runs differ in shape: {a.shape} vs {b.shape}")
    if (y == 1).sum() < 2 or (y == 0).sum() < 2:
        return {"diff": float("nan"), "var": float("nan"), "z": float("nan"), "p_value": float("nan")}
    diffs, variances = [], []
    for sa, sb in zip(a, b):
        aucs, v10, v01 = _delong_components(y, np.stack([sa, sb]))
        cov = np.cov(v10) / v10.shape[1] + np.cov(v01) / v01.shape[1]
        diffs.append(aucs[1] - aucs[0])
        variances.append(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    diff, var = float(np.mean(diffs)), float(np.mean(variances))
    if var <= 0:
        return {"diff": diff, "var": var, "z": float("nan"), "p_value": 1.0 if diff == 0 else 0.0}
    z = diff / np.sqrt(var)
    return {"diff": diff, "var": var, "z": float(z), "p_value": float(2 * norm.sf(abs(z)))}


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (NaN entries are left out and stay NaN)."""
    p = np.asarray(p_values, np.float64)
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(~np.isnan(p))
    order = idx[np.argsort(p[idx], kind="stable")]
    running, k = 0.0, len(order)
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (k - rank) * p[i]))
        out[i] = running
    return out.tolist()


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
