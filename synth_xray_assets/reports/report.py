"""The study's results table, redone with seeds, hierarchical intervals and corrected paired tests.

Input: finished runs as ``classifier.experiment.load_run`` gives them (one ``RunResult`` per
experiment and seed, per-image test probabilities and image ids included), and per generator its
FID and class fidelity.
Output under ``data/reports/``: ``report.md`` (readable on its own, every table written by
``storage.markdown_table``), ``results.csv``, ``comparisons.csv`` and the study's four figures.

Statistics (``classifier.stats``): every interval and paired difference is a two-level bootstrap
(seeds with replacement, then test images); accuracy differences are also tested with a paired
t-test over seeds; AUC differences with DeLong's test; every family of comparisons is Holm-adjusted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from synth_xray_assets.classifier.stats import (
    Bootstrap,
    bootstrap_ci,
    delong_test,
    holm,
    mean_std,
    paired_bootstrap_diff,
    paired_seed_test,
)
from synth_xray_assets.classifier.train import RunResult
from synth_xray_assets.reports import plots
from synth_xray_assets.reports.markdown import render_markdown
from synth_xray_assets.storage import write_bytes_atomic

SUMMARY_METRICS = ("accuracy", "f1", "auc", "precision", "recall", "specificity")
CI_METRICS = ("accuracy", "f1", "auc")
LAST_METRICS = ("accuracy", "f1", "auc")
P_COLUMNS = ("p_bootstrap", "p_seeds", "p_delong")


@dataclass(frozen=True)
class SetFigures:
    """One image set's scores in one feature space against one reference, each with its n (NaN: none)."""

    n: int = 0
    n_reference: int = 0
    kid_mean: float = float("nan")
    kid_std: float = float("nan")
    kid_subset_size: int = 0
    fid: float = float("nan")
    fid_biased: bool = True  # fewer than fid_min_images on either side: read only beside the study
    fid_min_images: int = 0

    @classmethod
    def from_scores(cls, scores: Mapping[str, Any]) -> SetFigures:
        """From a ``fid_scores`` record's ``SetScores`` (as JSON)."""

        def value(name: str) -> float:
            v = scores.get(name)
            return float("nan") if v is None else float(v)

        return cls(
            n=int(scores.get("n_images", 0)),
            n_reference=int(scores.get("n_reference", 0)),
            kid_mean=value("kid_mean"),
            kid_std=value("kid_std"),
            kid_subset_size=int(scores.get("kid_subset_size", 0)),
            fid=value("fid"),
            fid_biased=bool(scores.get("fid_biased", True)),
            fid_min_images=int(scores.get("fid_min_images", 0)),
        )


@dataclass(frozen=True)
class GeneratorQuality:
    """What the report shows of one generator: per feature space the KID and FID of its images
    against its own training images (``train``) and against the held-out reference (``synthetic``,
    ``base_model``, ``real_floor``), whether fine-tuning moved its images toward real (on KID), and
    class fidelity with its interval (NaN where not measured)."""

    generator: str
    scores: dict[str, dict[str, SetFigures]] = field(default_factory=dict)  # space -> set -> figures
    kid_verdict: dict[str, str] = field(default_factory=dict)  # space -> toward real / ...
    unavailable: dict[str, str] = field(default_factory=dict)  # space -> why it has no score
    held_out_reference: str = ""
    train_reference: str = ""
    class_fidelity: float = float("nan")
    class_fidelity_low: float = float("nan")
    class_fidelity_high: float = float("nan")
    class_fidelity_n: int = 0
    real_test_recall: float = float("nan")  # the same classifier on real test images of the class
    real_test_n: int = 0


@dataclass(frozen=True)
class ReportOptions:
    """How the report is computed and what it says about the runs it could not use."""

    n_boot: int = 2000
    level: float = 0.95
    resample_seeds: bool = True
    baseline: str = "baseline"
    balance_pairs: Mapping[str, str] = field(default_factory=dict)  # control -> the mix it copies
    generators: str = "study"  # the arrangement the settings ask for
    expected: int = 0
    missing: Sequence[str] = ()
    excluded: Sequence[tuple[str, str]] = ()
    quality: Sequence[GeneratorQuality] = ()

    def bootstrap(self) -> Bootstrap:
        """The bootstrap these options ask for (seed 0)."""
        return Bootstrap(self.n_boot, level=self.level, resample_seeds=self.resample_seeds)


@dataclass
class ReportResult:
    """Where the report went, and its tables."""

    report_path: Path
    table_path: Path
    figure_paths: dict[str, Path]
    table: pd.DataFrame
    comparisons: pd.DataFrame
    markdown: str


def group_runs(runs: Sequence[RunResult], order: Sequence[str] = ()) -> dict[str, list[RunResult]]:
    """Runs by experiment, in ``order`` first (the study's), then any others; seeds sorted."""
    groups: dict[str, list[RunResult]] = {}
    for run in runs:
        groups.setdefault(run.experiment, []).append(run)
    names = [e for e in order if e in groups] + [e for e in groups if e not in order]
    return {e: sorted(groups[e], key=lambda r: int(r.seed)) for e in names}


def _test_labels(runs: Sequence[RunResult]) -> np.ndarray:
    keys = {(tuple(r.test_labels), tuple(r.test_image_ids)) for r in runs}
    if len(keys) != 1:
        raise ValueError("runs were scored on different test sets; a paired comparison needs one")
    return np.array(next(iter(keys))[0], dtype=np.int64)


def results_table(
    runs: Sequence[RunResult], published: Mapping[str, Mapping[str, float]], opts: ReportOptions
) -> pd.DataFrame:
    """Per experiment: mean/std over seeds, two-level bootstrap CIs, composition, study figures."""
    y = _test_labels(runs)
    rows = []
    for name, group in group_runs(runs, list(published)).items():
        prob = np.array([r.test_prob_selected for r in group])
        prob_last = np.array([r.test_prob_last for r in group])
        extras = [r.extra for r in group]
        row: dict[str, Any] = {
            "experiment": name,
            "n_seeds": len(group),
            "seeds": ",".join(str(r.seed) for r in group),
            "selection": "/".join(sorted({r.selection for r in group})),
            "n_train": float(np.mean([r.n_train for r in group])),
            "n_real": _mean_recorded([e.n_real for e in extras]),
            "n_synthetic": _mean_recorded([e.n_synthetic for e in extras]),
            "normal_share": _mean_recorded([e.normal_share for e in extras]),
            "balance_like": extras[0].balance_like or "",
            "generators": ", ".join(sorted({k for e in extras for k in (e.generator_keys or {}).values()})),
            "selected_epoch_mean": float(np.mean([r.selected_epoch for r in group])),
        }
        for metric in SUMMARY_METRICS:
            row[f"{metric}_mean"], row[f"{metric}_std"] = mean_std([r.test_selected[metric] for r in group])
        for metric in LAST_METRICS:
            row[f"last_{metric}_mean"], row[f"last_{metric}_std"] = mean_std(
                [r.test_last[metric] for r in group]
            )
        for metric in CI_METRICS:
            for prefix, p in (("", prob), ("last_", prob_last)):
                _, row[f"{prefix}{metric}_ci_low"], row[f"{prefix}{metric}_ci_high"] = bootstrap_ci(
                    y, p, metric, opts.bootstrap()
                )
        pub = published.get(name, {})
        for key in ("accuracy", "f1", "auc", "last_accuracy", "last_auc"):
            row[f"published_{key}"] = float(pub.get(key, float("nan")))
        rows.append(row)
    return pd.DataFrame(rows)


def compare(
    y: np.ndarray, reference: list[RunResult], other: list[RunResult], opts: ReportOptions
) -> dict[str, float]:
    """``other`` minus ``reference``, paired by seed and test image: accuracy with a two-level paired
    bootstrap interval and p-value, a paired t-test over seeds, AUC with DeLong's test."""
    mine = {r.seed: r for r in other}
    ref = {r.seed: r for r in reference}
    seeds = [s for s in sorted(ref) if s in mine]
    if not seeds:
        return {"n_paired_seeds": 0}
    a = np.array([ref[s].test_prob_selected for s in seeds])
    b = np.array([mine[s].test_prob_selected for s in seeds])
    boot = paired_bootstrap_diff(y, a, b, boot=opts.bootstrap())
    per_seed = paired_seed_test(
        [ref[s].test_selected["accuracy"] for s in seeds],
        [mine[s].test_selected["accuracy"] for s in seeds],
    )
    auc = delong_test(y, a, b)
    return {
        "n_paired_seeds": len(seeds),
        "delta_accuracy": boot["diff"],
        "delta_ci_low": boot["ci_low"],
        "delta_ci_high": boot["ci_high"],
        "p_bootstrap": boot["p_value"],
        "p_seeds": per_seed["p_value"],
        "delta_auc": auc["diff"],
        "p_delong": auc["p_value"],
    }


def _mean_recorded(values: Sequence[float | None]) -> float:
    """The mean of per-run values; NaN when a run did not record its value."""
    return float(np.mean([np.nan if v is None else v for v in values]))


def comparisons_table(runs: Sequence[RunResult], order: Sequence[str], opts: ReportOptions) -> pd.DataFrame:
    """Every experiment against the baseline (one family), and every synthetic mix against its
    real-only balance control (another); raw p-values and Holm-adjusted within each family."""
    y = _test_labels(runs)
    groups = group_runs(runs, order)
    rows = []
    base = groups.get(opts.baseline, [])
    for name, group in groups.items():
        if name != opts.baseline and base:
            rows.append(
                {
                    "family": "vs baseline",
                    "comparison": f"{name} − {opts.baseline}",
                    **compare(y, base, group, opts),
                }
            )
    for control, mix in opts.balance_pairs.items():
        if control in groups and mix in groups:
            rows.append(
                {
                    "family": "mix vs its balance control",
                    "comparison": f"{mix} − {control}",
                    **compare(y, groups[control], groups[mix], opts),
                }
            )
    table = pd.DataFrame(
        rows,
        columns=[
            "family",
            "comparison",
            "n_paired_seeds",
            "delta_accuracy",
            "delta_ci_low",
            "delta_ci_high",
            *P_COLUMNS,
            "delta_auc",
        ],
    )
    for column in P_COLUMNS:
        table[f"{column}_holm"] = np.nan
        for _, idx in table.groupby("family").groups.items():
            table.loc[idx, f"{column}_holm"] = holm(table.loc[idx, column].astype(float).tolist())
    return table


def build_report(
    runs: Sequence[RunResult],
    published: Mapping[str, Mapping[str, float]],
    out_dir: Path,
    opts: ReportOptions | None = None,
) -> ReportResult:
    """Write ``report.md``, ``results.csv``, ``comparisons.csv`` and the four figures under ``out_dir``.

    ``runs``: as ``classifier.experiment.load_run`` gives them; ``published``: ``settings.PUBLISHED_RESULTS``.
    """
    if not runs:
        raise ValueError("no runs to report")
    opts = opts or ReportOptions()
    out_dir = Path(out_dir)
    table = results_table(runs, published, opts)
    comparisons = comparisons_table(runs, list(published), opts)
    groups = group_runs(runs, list(published))
    figures = {
        "accuracy_comparison": plots.accuracy_comparison(table, out_dir / "accuracy_comparison.png"),
        "training_curves": plots.training_curves(groups, out_dir / "training_curves.png"),
        "confusion_matrices": plots.confusion_matrices(table, groups, out_dir / "confusion_matrices.png"),
        "metrics_heatmap": plots.metrics_heatmap(table, out_dir / "metrics_heatmap.png"),
    }
    table_path = write_bytes_atomic(out_dir / "results.csv", table.to_csv(index=False).encode())
    write_bytes_atomic(out_dir / "comparisons.csv", comparisons.to_csv(index=False).encode())
    markdown = render_markdown(table, comparisons, runs, figures, opts)
    report_path = write_bytes_atomic(out_dir / "report.md", markdown.encode())
    return ReportResult(report_path, table_path, figures, table, comparisons, markdown)
