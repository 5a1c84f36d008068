"""The report's statistics, each checked against a computation written independently here."""

import math

import numpy as np
import pytest
from scipy.stats import ttest_rel

from synth_xray_assets.classifier.stats import (
    Bootstrap,
    bootstrap_ci,
    delong_test,
    holm,
    paired_bootstrap_diff,
    paired_seed_test,
    roc_auc,
)


def test_hierarchical_bootstrap_resamples_seeds_exactly():
    # Seed 0 is right on every image, seed 1 on none: image resampling changes nothing, and the
    # seed-mean over two seeds drawn with replacement is 0, 1/2 or 1 with chances 1/4, 1/2, 1/4.
    y = np.r_[np.zeros(30), np.ones(30)].astype(int)
    prob = np.stack([y * 0.8 + 0.1, (1 - y) * 0.8 + 0.1])
    est, low, high = bootstrap_ci(y, prob, "accuracy", Bootstrap(2000, seed=1))
    assert (est, low, high) == (0.5, 0.0, 1.0)
    assert bootstrap_ci(y, prob, "accuracy", Bootstrap(500, resample_seeds=False)) == (0.5, 0.5, 0.5)


def test_hierarchical_bootstrap_variance_matches_the_two_level_formula():
    # T = mean over S drawn seeds of the accuracy on N drawn images (shared). Its exact variance:
    # var(cbar)/N + (1/S) [var_s(acc_s) + (mean_s var(c_s) - var(cbar)) / N], population variances,
    # c_s the seed's per-image correctness and cbar their mean over seeds.
    rng = np.random.default_rng(3)
    n_seeds, n = 4, 150
    y = rng.integers(0, 2, n)
    skill = np.array([0.6, 0.7, 0.8, 0.9])
    correct = rng.random((n_seeds, n)) < skill[:, None]
    prob = np.where(correct == (y == 1), 0.8, 0.2)
    c = correct.astype(float)
    cbar = c.mean(0)
    expected = cbar.var() / n + (c.mean(1).var() + (c.var(1).mean() - cbar.var()) / n) / n_seeds
    draws = []
    rng_b = np.random.default_rng(0)
    for _ in range(4000):  # the statistic, resampled by hand
        s, i = rng_b.integers(0, n_seeds, n_seeds), rng_b.integers(0, n, n)
        draws.append(c[np.ix_(s, i)].mean())
    assert np.var(draws) == pytest.approx(expected, rel=0.1)
    # the library's interval has the width of that variance (normal approximation, 10%)
    _, low, high = bootstrap_ci(y, prob, "accuracy", Bootstrap(4000, seed=5))
    assert (high - low) / (2 * 1.96) == pytest.approx(math.sqrt(expected), rel=0.1)
    _, low1, high1 = bootstrap_ci(y, prob, "accuracy", Bootstrap(4000, seed=5, resample_seeds=False))
    assert high1 - low1 < 0.7 * (high - low)  # leaving the seeds out understates the uncertainty


def test_paired_hierarchical_difference():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    noisy = np.stack([np.where(rng.random(200) < 0.8, y, 1 - y).astype(float) for _ in range(3)])
    same = paired_bootstrap_diff(y, noisy, noisy, boot=Bootstrap(300))
    assert same["diff"] == 0 and same["p_value"] == 1.0
    better = paired_bootstrap_diff(y, noisy, np.stack([y.astype(float)] * 3), boot=Bootstrap(300))
    assert better["diff"] == pytest.approx(1 - (noisy == y).mean())
    assert better["ci_low"] > 0 and better["p_value"] == pytest.approx(1 / 300)
    auc = paired_bootstrap_diff(y, noisy, noisy[::-1], "auc", Bootstrap(200))
    assert auc["ci_low"] < auc["diff"] < auc["ci_high"]


def _delong_by_hand(y, a, b):
    """DeLong et al. (1988) from the Mann-Whitney kernel, with explicit loops over all pairs."""
    pos, neg = [i for i in range(len(y)) if y[i] == 1], [i for i in range(len(y)) if y[i] == 0]

    def psi(x, z):
        return 1.0 if x > z else 0.5 if x == z else 0.0

    v10 = [[np.mean([psi(s[i], s[j]) for j in neg]) for i in pos] for s in (a, b)]
    v01 = [[np.mean([psi(s[i], s[j]) for i in pos]) for j in neg] for s in (a, b)]
    auc = [np.mean(v) for v in v10]

    def cov(u, v):
        mu, mv = np.mean(u), np.mean(v)
        return sum((x - mu) * (z - mv) for x, z in zip(u, v)) / (len(u) - 1)

    var = sum((cov(v[0], v[0]) + cov(v[1], v[1]) - 2 * cov(v[0], v[1])) / len(v[0]) for v in (v10, v01))
    z = (auc[1] - auc[0]) / math.sqrt(var)
    return auc, var, math.erfc(abs(z) / math.sqrt(2))


def test_delong_against_a_brute_force_implementation():
    # a worked example: 3 positives, 3 negatives, ties included
    y = np.array([1, 1, 1, 0, 0, 0])
    a = np.array([0.9, 0.6, 0.4, 0.5, 0.3, 0.4])
    b = np.array([0.8, 0.7, 0.7, 0.2, 0.7, 0.1])
    (auc_a, auc_b), var, p = _delong_by_hand(y, a, b)
    assert auc_a == pytest.approx(7.5 / 9) and auc_b == pytest.approx(8 / 9)  # pairs counted by hand
    ours = delong_test(y, a, b)
    assert ours["diff"] == pytest.approx(auc_b - auc_a) and ours["var"] == pytest.approx(var)
    assert ours["p_value"] == pytest.approx(p)
    # random scores with many ties, against the brute force
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 80)
    a = np.round(y * 0.3 + rng.random(80), 1)
    b = np.round(y * 0.6 + rng.random(80), 1)
    (auc_a, auc_b), var, p = _delong_by_hand(y, a, b)
    assert roc_auc(y, a) == pytest.approx(auc_a)
    ours = delong_test(y, a, b)
    assert ours["var"] == pytest.approx(var) and ours["p_value"] == pytest.approx(p)
    assert delong_test(y, a, a)["p_value"] == 1.0
    # several seeds: the mean difference, the mean of the per-seed variances
    both = delong_test(y, np.stack([a, b]), np.stack([b, b]))
    assert both["diff"] == pytest.approx((auc_b - auc_a) / 2)
    assert both["var"] == pytest.approx(var / 2)


def test_holm_by_hand_and_the_seed_level_test():
    # sorted .005 .01 .03 .04, times 4 3 2 1: .02 .03 .06 .04, then the running maximum
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adjusted = holm([0.2, float("nan"), 0.9])
    assert adjusted[0] == pytest.approx(0.4) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.9)
    assert holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])  # capped at 1
    a, b = [0.80, 0.82, 0.79, 0.85, 0.81], [0.83, 0.84, 0.80, 0.88, 0.86]
    ours = paired_seed_test(a, b)
    assert ours["p_value"] == pytest.approx(ttest_rel(b, a).pvalue)
    assert ours["diff"] == pytest.approx(np.mean(np.subtract(b, a)))
    assert math.isnan(paired_seed_test([0.8], [0.9])["p_value"])  # one seed: cannot be estimated
