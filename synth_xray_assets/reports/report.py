"""The study's results table, redone with seeds, confidence intervals and paired tests.

Input: finished runs as ``classifier.experiment.load_run`` gives them (one dict per experiment
and seed, per-image test probabilities included). Output under ``data/reports/``:
``report.md`` (readable on its own), ``results.csv`` and the study's four figures.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from synth_xray_assets.classifier.stats import bootstrap_ci, mcnemar_exact, mean_std, paired_bootstrap_diff
from synth_xray_assets.reports import plots
from synth_xray_assets.storage import write_bytes_atomic

SUMMARY_METRICS = ("accuracy", "f1", "auc", "precision", "recall", "specificity")
CI_METRICS = ("accuracy", "f1", "auc")
LAST_METRICS = ("accuracy", "f1", "auc")


@dataclass
class ReportResult:
    """Where the report went, and its table."""

    report_path: Path
    table_path: Path
    figure_paths: dict[str, Path]
    table: pd.DataFrame
    markdown: str


def group_runs(runs: Sequence[dict[str, Any]], order: Sequence[str] = ()) -> dict[str, list[dict[str, Any]]]:
    """Runs by experiment, in ``order`` first (the study's), then any others; seeds sorted."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(run["experiment"], []).append(run)
    names = [e for e in order if e in groups] + [e for e in groups if e not in order]
    return {e: sorted(groups[e], key=lambda r: int(r["seed"])) for e in names}


def _test_labels(runs: Sequence[dict[str, Any]]) -> np.ndarray:
    keys = {(tuple(r["test_labels"]), tuple(r.get("test_image_ids", ()))) for r in runs}
    if len(keys) != 1:
        raise ValueError("runs were scored on different test sets; a paired comparison needs one")
    return np.array(next(iter(keys))[0], dtype=np.int64)


def results_table(
    runs: Sequence[dict[str, Any]],
    published: Mapping[str, Mapping[str, float]],
    n_boot: int = 2000,
    baseline: str = "baseline",
) -> pd.DataFrame:
    """Per experiment: mean/std over seeds, bootstrap CIs, paired test vs ``baseline``, study figures."""
    y = _test_labels(runs)
    groups = group_runs(runs, list(published))
    base_runs = {r["seed"]: r for r in groups.get(baseline, [])}
    rows = []
    for name, group in groups.items():
        prob = np.array([r["test_prob_selected"] for r in group])
        prob_last = np.array([r["test_prob_last"] for r in group])
        row: dict[str, Any] = {
            "experiment": name,
            "n_seeds": len(group),
            "seeds": ",".join(str(r["seed"]) for r in group),
            "selection": "/".join(sorted({r["selection"] for r in group})),
            "n_train": float(np.mean([r["n_train"] for r in group])),
            "n_real": float(np.mean([r["extra"].get("n_real", np.nan) for r in group])),
            "n_synthetic": float(np.mean([r["extra"].get("n_synthetic", np.nan) for r in group])),
            "selected_epoch_mean": float(np.mean([r["selected_epoch"] for r in group])),
        }
        for metric in SUMMARY_METRICS:
            values = [r["test_selected"][metric] for r in group]
            row[f"{metric}_mean"], row[f"{metric}_std"] = mean_std(values)
        for metric in LAST_METRICS:
            row[f"last_{metric}_mean"], row[f"last_{metric}_std"] = mean_std(
                [r["test_last"][metric] for r in group]
            )
        for metric in CI_METRICS:
            _, row[f"{metric}_ci_low"], row[f"{metric}_ci_high"] = bootstrap_ci(y, prob, metric, n_boot)
            _, row[f"last_{metric}_ci_low"], row[f"last_{metric}_ci_high"] = bootstrap_ci(
                y, prob_last, metric, n_boot
            )
        row.update(_paired(y, base_runs, group, n_boot) if name != baseline else _paired_nan())
        pub = published.get(name, {})
        for key in ("accuracy", "f1", "auc", "last_accuracy", "last_auc"):
            row[f"published_{key}"] = float(pub.get(key, float("nan")))
        rows.append(row)
    return pd.DataFrame(rows)


def _paired_nan() -> dict[str, float]:
    keys = ("delta_accuracy", "delta_ci_low", "delta_ci_high", "p_paired_bootstrap", "p_mcnemar_median")
    return {**dict.fromkeys(keys, float("nan")), "n_paired_seeds": 0}


def _paired(
    y: np.ndarray, base_runs: dict[int, dict[str, Any]], group: list[dict[str, Any]], n_boot: int
) -> dict[str, float]:
    """Accuracy minus the baseline's, paired by seed and by test image."""
    mine = {r["seed"]: r for r in group}
    seeds = [s for s in sorted(base_runs) if s in mine]
    if not seeds:
        return _paired_nan()
    a = np.array([base_runs[s]["test_prob_selected"] for s in seeds])
    b = np.array([mine[s]["test_prob_selected"] for s in seeds])
    diff = paired_bootstrap_diff(y, a, b, n_boot)
    mcnemar = [mcnemar_exact((a[i] > 0.5) == y, (b[i] > 0.5) == y)["p_value"] for i in range(len(seeds))]
    return {
        "delta_accuracy": diff["diff"],
        "delta_ci_low": diff["ci_low"],
        "delta_ci_high": diff["ci_high"],
        "p_paired_bootstrap": diff["p_value"],
        "p_mcnemar_median": float(np.median(mcnemar)),
        "n_paired_seeds": len(seeds),
    }


# ---------------------------------------------------------------- markdown


def _pct(v: float, digits: int = 1) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{100 * v:.{digits}f}"


def _num(v: float, digits: int = 3) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{v:.{digits}f}"


def _pm(mean: float, std: float, pct: bool = True) -> str:
    fmt = _pct if pct else _num
    return fmt(mean) if math.isnan(std) else f"{fmt(mean)} ± {fmt(std)}"


def _ci(low: float, high: float, pct: bool = True) -> str:
    fmt = _pct if pct else _num
    return f"{fmt(low)}–{fmt(high)}"


def _p(v: float) -> str:
    return "n/a" if math.isnan(v) else (f"{v:.3f}" if v >= 0.001 else f"{v:.1e}")


def _delta(diff: float, low: float, high: float) -> str:
    return "—" if math.isnan(diff) else f"{100 * diff:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main_table_md(t: pd.DataFrame) -> str:
    """The results table: selected epoch (mean ± sd over seeds, 95% CI), last epoch, Δ vs baseline."""
    return md_table(
        [
            "experiment",
            "train (real + synth)",
            "seeds",
            "acc % (mean ± sd)",
            "acc 95% CI",
            "F1",
            "F1 95% CI",
            "AUC",
            "AUC 95% CI",
            "last-epoch acc %",
            "last-epoch AUC",
            "Δacc vs baseline [95% CI]",
            "p (paired bootstrap)",
            "p (McNemar, median over seeds)",
        ],
        [
            [
                r.experiment,
                f"{r.n_real:.0f} + {r.n_synthetic:.0f}" if not math.isnan(r.n_real) else f"{r.n_train:.0f}",
                str(r.n_seeds),
                _pm(r.accuracy_mean, r.accuracy_std),
                _ci(r.accuracy_ci_low, r.accuracy_ci_high),
                _pm(r.f1_mean, r.f1_std, pct=False),
                _ci(r.f1_ci_low, r.f1_ci_high, pct=False),
                _pm(r.auc_mean, r.auc_std, pct=False),
                _ci(r.auc_ci_low, r.auc_ci_high, pct=False),
                _pm(r.last_accuracy_mean, r.last_accuracy_std),
                _pm(r.last_auc_mean, r.last_auc_std, pct=False),
                _delta(r.delta_accuracy, r.delta_ci_low, r.delta_ci_high),
                _p(r.p_paired_bootstrap),
                _p(r.p_mcnemar_median),
            ]
            for r in t.itertuples()
        ],
    )


def _side_by_side_md(t: pd.DataFrame) -> str:
    return md_table(
        [
            "experiment",
            "ours acc %",
            "study acc %",
            "ours F1",
            "study F1",
            "ours AUC",
            "study AUC",
            "ours last acc %",
            "study last acc %",
            "ours last AUC",
            "study last AUC",
        ],
        [
            [
                r.experiment,
                _pct(r.accuracy_mean),
                _pct(r.published_accuracy),
                _num(r.f1_mean),
                _num(r.published_f1),
                _num(r.auc_mean),
                _num(r.published_auc),
                _pct(r.last_accuracy_mean),
                _pct(r.published_last_accuracy),
                _num(r.last_auc_mean),
                _num(r.published_last_auc),
            ]
            for r in t.itertuples()
        ],
    )


def _setup_md(runs: Sequence[dict[str, Any]]) -> str:
    first, c = runs[0], runs[0]["settings"]
    extras = [r.get("extra", {}) for r in runs]
    data_note = (
        "**Demo profile: the 'real' images are SYNTHETIC PHANTOMS made by the project, not patients, "
        "and the models are tiny runs; the numbers show the pipeline works, not the study's findings.**"
        if any(e.get("profile") == "demo" for e in extras)
        else "Real images: `hf-vision/chest-xray-pneumonia` (or the local source named in the settings)."
    )
    weights = "; ".join(sorted({str(e.get("initial_weights", "?")) for e in extras}))
    versions = ", ".join(sorted({str(e.get("dataset_version")) for e in extras}))
    on_test = " (and, under the study's protocol, to pick the epoch)" if first["selection"] == "test" else ""
    hidden = c["hidden_units"]
    return "\n".join(
        [
            data_note,
            "",
            f"- Classifier: DenseNet-121, head Linear(1024, {hidden}) → ReLU → Dropout({c['dropout']}) → "
            f"Linear({hidden}, 2); initial weights: {weights}.",
            f"- Training: AdamW (lr {c['learning_rate']:g}, weight decay {c['weight_decay']:g}), cosine "
            f"annealing over {c['epochs']} epochs, batch {c['batch_size']}, images resized to "
            f"{c['resize']} and center-cropped to {c['resolution']} px; augmentation: horizontal flip "
            f"{'on' if c['hflip'] else 'off'}, rotation ±{c['rotation_degrees']:g}°, brightness "
            f"±{c['brightness']:g}, contrast ±{c['contrast']:g}; ImageNet normalisation.",
            f"- Validation: {first['n_val']} real training images ({100 * c['val_fraction']:g}% of each "
            f"class, split seed {c['split_seed']}), the same for every experiment and seed, never used "
            "for training. An experiment's real fraction is taken from the rest of real train.",
            f"- Test: {first['n_test']} images, used only for the scores below{on_test}.",
            "- Synthetic images: class-balanced (half NORMAL, half PNEUMONIA), drawn with the run's seed; "
            "real subsets stratified by class, drawn with the run's seed.",
            f"- Dataset version: {versions}.",
        ]
    )


def _runs_md(
    runs: Sequence[dict[str, Any]], expected: int, missing: Sequence[str], excluded: Sequence[tuple[str, str]]
) -> str:
    lines = [f"{len(runs)} of {expected or len(runs)} expected runs (experiment × seed) are reported."]
    if missing:
        lines.append(f"\n**Missing (not yet materialized): {len(missing)}**: " + ", ".join(missing) + ".")
    if excluded:
        lines.append(f"\n**Left out: {len(excluded)}**")
        lines += [f"- {name}: {why}" for name, why in excluded]
    if not missing and not excluded:
        lines.append("None is missing.")
    return "\n".join(lines)


def _per_run_md(runs: Sequence[dict[str, Any]], order: Sequence[str]) -> str:
    def key(r: dict[str, Any]) -> tuple[int, int]:
        return (list(order).index(r["experiment"]) if r["experiment"] in order else 99, int(r["seed"]))

    return md_table(
        [
            "experiment",
            "seed",
            "real + synth",
            "selected epoch",
            "val acc %",
            "test acc % (selected)",
            "test acc % (last)",
            "F1",
            "AUC",
            "specificity",
            "train s",
        ],
        [
            [
                r["experiment"],
                str(r["seed"]),
                f"{r['extra'].get('n_real', '?')} + {r['extra'].get('n_synthetic', '?')}",
                f"{r['selected_epoch']}/{r['epochs']}",
                _pct(r["val_selected"]["accuracy"]),
                _pct(r["test_selected"]["accuracy"]),
                _pct(r["test_last"]["accuracy"]),
                _num(r["test_selected"]["f1"]),
                _num(r["test_selected"]["auc"]),
                _num(r["test_selected"]["specificity"]),
                f"{r['train_time_s']:.0f}",
            ]
            for r in sorted(runs, key=key)
        ],
    )


def render_markdown(
    table: pd.DataFrame,
    runs: Sequence[dict[str, Any]],
    figures: Mapping[str, Path],
    n_boot: int,
    expected: int = 0,
    missing: Sequence[str] = (),
    excluded: Sequence[tuple[str, str]] = (),
) -> str:
    n_test = runs[0]["n_test"]
    seeds = sorted({int(r["seed"]) for r in runs})
    protocol = (
        "**The epoch of each run was selected on the TEST set (the study's own protocol), so the "
        "'selected' figures are optimistic; the last-epoch figures are not.**"
        if any(r["selection"] == "test" for r in runs)
        else "The epoch of each run was selected by accuracy on a validation split carved from the real "
        "training images; the test set was scored only after training. The last epoch is reported too."
    )
    figs = "\n\n".join(
        f"### {name.replace('_', ' ').capitalize()}\n\n![{name}]({p.name})" for name, p in figures.items()
    )
    return f"""# Synthetic chest X-rays for pneumonia classification: results

DenseNet-121 pneumonia classifiers trained on {len(table)} mixes of real and synthetic chest X-rays,
over {len(seeds)} seed(s) ({", ".join(map(str, seeds))}), scored on the same {n_test} test images.
This reproduces the classifier experiments of the study "Synthetic-XRay" (February 2026).

{protocol}

## Setup

{_setup_md(runs)}

## Runs

{_runs_md(runs, expected, missing, excluded)}

## Results

Selected epoch unless marked "last". How to read: "mean ± sd" is over seeds; the 95% confidence
intervals are percentile bootstraps over test images ({n_boot} resamples, the seed-mean recomputed
on each); "Δacc" is the experiment's accuracy minus the baseline's, paired by seed and by test
image, with a paired-bootstrap interval and two-sided p-value (which cannot go below
1/{n_boot} = {1 / n_boot:.4f}, its resolution); the McNemar column is the exact
test on per-image correctness, one per seed, median shown. One test image is
{100 / n_test:.2f} accuracy points.

{main_table_md(table)}

## Side by side with the study

The study's figures come from one seed and were selected on its test set; its "last" figures are
the same runs at their last epoch (20).

{_side_by_side_md(table)}

## Figures

{figs}

## Every run

{_per_run_md(runs, list(table.experiment))}
"""


def build_report(
    runs: Sequence[dict[str, Any]],
    published: Mapping[str, Mapping[str, float]],
    out_dir: Path,
    n_boot: int = 2000,
    baseline: str = "baseline",
    expected: int = 0,
    missing: Sequence[str] = (),
    excluded: Sequence[tuple[str, str]] = (),
) -> ReportResult:
    """Write ``report.md``, ``results.csv`` and the four figures under ``out_dir``.

    ``runs``: ``classifier.experiment.load_run`` dicts; ``published``: ``settings.PUBLISHED_RESULTS``;
    ``missing``: names of expected runs not found; ``excluded``: ``(name, reason)`` of runs found
    but left out (stale).
    """
    if not runs:
        raise ValueError("no runs to report")
    out_dir = Path(out_dir)
    table = results_table(runs, published, n_boot, baseline)
    groups = group_runs(runs, list(published))
    figures = {
        "accuracy_comparison": plots.accuracy_comparison(table, out_dir / "accuracy_comparison.png"),
        "training_curves": plots.training_curves(groups, out_dir / "training_curves.png"),
        "confusion_matrices": plots.confusion_matrices(table, groups, out_dir / "confusion_matrices.png"),
        "metrics_heatmap": plots.metrics_heatmap(table, out_dir / "metrics_heatmap.png"),
    }
    table_path = write_bytes_atomic(out_dir / "results.csv", table.to_csv(index=False).encode())
    markdown = render_markdown(table, runs, figures, n_boot, expected, missing, excluded)
    report_path = write_bytes_atomic(out_dir / "report.md", markdown.encode())
    return ReportResult(report_path, table_path, figures, table, markdown)
