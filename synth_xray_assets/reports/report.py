"""The study's results table, redone with seeds, hierarchical intervals and corrected paired tests.

Input: finished runs as ``classifier.experiment.load_run`` gives them (one dict per experiment
and seed, per-image test probabilities included), and per generator its FID and class fidelity.
Output under ``data/reports/``: ``report.md`` (readable on its own, every table written by
``storage.markdown_table``), ``results.csv``, ``comparisons.csv`` and the study's four figures.

Statistics (``classifier.stats``): every interval and paired difference is a two-level bootstrap
(seeds with replacement, then test images); accuracy differences are also tested with a paired
t-test over seeds; AUC differences with DeLong's test; every family of comparisons is Holm-adjusted.
"""

from __future__ import annotations

import math
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
from synth_xray_assets.classifier.train import RunExtra
from synth_xray_assets.reports import plots
from synth_xray_assets.storage import markdown_table, write_bytes_atomic

SUMMARY_METRICS = ("accuracy", "f1", "auc", "precision", "recall", "specificity")
CI_METRICS = ("accuracy", "f1", "auc")
LAST_METRICS = ("accuracy", "f1", "auc")
P_COLUMNS = ("p_bootstrap", "p_seeds", "p_delong")


@dataclass(frozen=True)
class GeneratorQuality:
    """What the report shows of one generator: FID (train and held-out reference, real floor, base
    model) in each feature space, and class fidelity with its interval (NaN where not measured)."""

    generator: str
    fid: dict[str, dict[str, float]] = field(default_factory=dict)  # space -> figure -> value
    held_out_reference: str = ""
    train_reference: str = ""
    class_fidelity: float = float("nan")
    class_fidelity_low: float = float("nan")
    class_fidelity_high: float = float("nan")
    class_fidelity_n: int = 0


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
    runs: Sequence[dict[str, Any]], published: Mapping[str, Mapping[str, float]], opts: ReportOptions
) -> pd.DataFrame:
    """Per experiment: mean/std over seeds, two-level bootstrap CIs, composition, study figures."""
    y = _test_labels(runs)
    rows = []
    for name, group in group_runs(runs, list(published)).items():
        prob = np.array([r["test_prob_selected"] for r in group])
        prob_last = np.array([r["test_prob_last"] for r in group])
        extras = [RunExtra.from_dict(r.get("extra")) for r in group]
        row: dict[str, Any] = {
            "experiment": name,
            "n_seeds": len(group),
            "seeds": ",".join(str(r["seed"]) for r in group),
            "selection": "/".join(sorted({r["selection"] for r in group})),
            "n_train": float(np.mean([r["n_train"] for r in group])),
            "n_real": _mean_recorded([e.n_real for e in extras]),
            "n_synthetic": _mean_recorded([e.n_synthetic for e in extras]),
            "normal_share": _mean_recorded([e.normal_share for e in extras]),
            "balance_like": extras[0].balance_like or "",
            "generators": ", ".join(sorted({k for e in extras for k in (e.generator_keys or {}).values()})),
            "selected_epoch_mean": float(np.mean([r["selected_epoch"] for r in group])),
        }
        for metric in SUMMARY_METRICS:
            row[f"{metric}_mean"], row[f"{metric}_std"] = mean_std(
                [r["test_selected"][metric] for r in group]
            )
        for metric in LAST_METRICS:
            row[f"last_{metric}_mean"], row[f"last_{metric}_std"] = mean_std(
                [r["test_last"][metric] for r in group]
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
    y: np.ndarray, reference: list[dict[str, Any]], other: list[dict[str, Any]], opts: ReportOptions
) -> dict[str, float]:
    """``other`` minus ``reference``, paired by seed and test image: accuracy with a two-level paired
    bootstrap interval and p-value, a paired t-test over seeds, AUC with DeLong's test."""
    mine = {r["seed"]: r for r in other}
    ref = {r["seed"]: r for r in reference}
    seeds = [s for s in sorted(ref) if s in mine]
    if not seeds:
        return {"n_paired_seeds": 0}
    a = np.array([ref[s]["test_prob_selected"] for s in seeds])
    b = np.array([mine[s]["test_prob_selected"] for s in seeds])
    boot = paired_bootstrap_diff(y, a, b, boot=opts.bootstrap())
    per_seed = paired_seed_test(
        [ref[s]["test_selected"]["accuracy"] for s in seeds],
        [mine[s]["test_selected"]["accuracy"] for s in seeds],
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


def comparisons_table(
    runs: Sequence[dict[str, Any]], order: Sequence[str], opts: ReportOptions
) -> pd.DataFrame:
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
    return "n/a" if _nan(v) else (f"{v:.3f}" if v >= 0.001 else f"{v:.1e}")


def _delta(diff: float, low: float, high: float) -> str:
    return "—" if _nan(diff) else f"{100 * diff:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"


def main_frame(t: pd.DataFrame, fidelity: Mapping[str, str] | None = None) -> pd.DataFrame:
    """The results table as printed: selected epoch (mean ± sd over seeds, two-level 95% CI), last
    epoch, composition (NORMAL share, generators) and the class fidelity of the generators used."""
    fidelity = fidelity or {}
    rows = []
    for r in t.itertuples():
        used = [g for g in r.generators.split(", ") if g]
        rows.append(
            {
                "experiment": r.experiment
                + (f" (real, balanced like {r.balance_like})" if r.balance_like else ""),
                "train (real + synth)": f"{r.n_real:.0f} + {r.n_synthetic:.0f}"
                if not math.isnan(r.n_real)
                else f"{r.n_train:.0f}",
                "NORMAL %": _pct(r.normal_share),
                "generators": ", ".join(used) or "—",
                "seeds": str(r.n_seeds),
                "acc % (mean ± sd)": _pm(r.accuracy_mean, r.accuracy_std),
                "acc 95% CI": _ci(r.accuracy_ci_low, r.accuracy_ci_high),
                "F1": _pm(r.f1_mean, r.f1_std, pct=False),
                "F1 95% CI": _ci(r.f1_ci_low, r.f1_ci_high, pct=False),
                "AUC": _pm(r.auc_mean, r.auc_std, pct=False),
                "AUC 95% CI": _ci(r.auc_ci_low, r.auc_ci_high, pct=False),
                "last-epoch acc %": _pm(r.last_accuracy_mean, r.last_accuracy_std),
                "last-epoch AUC": _pm(r.last_auc_mean, r.last_auc_std, pct=False),
                "class fidelity of its generators": "; ".join(f"{g} {fidelity.get(g, 'n/a')}" for g in used)
                or "—",
            }
        )
    return pd.DataFrame(rows)


def comparisons_frame(c: pd.DataFrame) -> pd.DataFrame:
    """The paired comparisons as printed: raw and Holm-adjusted p-values side by side."""
    return pd.DataFrame(
        [
            {
                "family": r.family,
                "comparison": r.comparison,
                "paired seeds": str(r.n_paired_seeds),
                "Δacc [95% CI]": _delta(r.delta_accuracy, r.delta_ci_low, r.delta_ci_high),
                "p bootstrap (raw / Holm)": f"{_p(r.p_bootstrap)} / {_p(r.p_bootstrap_holm)}",
                "p over seeds, paired t (raw / Holm)": f"{_p(r.p_seeds)} / {_p(r.p_seeds_holm)}",
                "ΔAUC": "—" if _nan(r.delta_auc) else f"{r.delta_auc:+.3f}",
                "p DeLong (raw / Holm)": f"{_p(r.p_delong)} / {_p(r.p_delong_holm)}",
            }
            for r in c.itertuples()
        ]
    )


def quality_frame(quality: Sequence[GeneratorQuality]) -> pd.DataFrame:
    """Per generator: class fidelity and FID against its own training images, against held-out real
    images, the real-vs-real floor and the base model at the same sampler, in each space."""
    rows = []
    for q in quality:
        row = {
            "generator": q.generator,
            "class fidelity [95% CI]": fidelity_text(q),
        }
        for space in ("cxr", "inception"):
            f = q.fid.get(space, {})
            row[f"FID {space}: own train ref"] = _num(f.get("train", float("nan")), 2)
            row[f"{space}: held-out ref"] = _num(f.get("held_out", float("nan")), 2)
            row[f"{space}: real floor"] = _num(f.get("real_floor", float("nan")), 2)
            row[f"{space}: base model"] = _num(f.get("base_model", float("nan")), 2)
        rows.append(row)
    return pd.DataFrame(rows)


def fidelity_text(q: GeneratorQuality) -> str:
    if _nan(q.class_fidelity):
        return "n/a"
    low, high = 100 * q.class_fidelity_low, 100 * q.class_fidelity_high
    return f"{100 * q.class_fidelity:.0f}% [{low:.0f}, {high:.0f}] of {q.class_fidelity_n}"


def _nan(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def main_table_md(t: pd.DataFrame, fidelity: Mapping[str, str] | None = None) -> str:
    return markdown_table(main_frame(t, fidelity))


def _side_by_side_md(t: pd.DataFrame) -> str:
    return markdown_table(
        pd.DataFrame(
            [
                {
                    "experiment": r.experiment,
                    "ours acc %": _pct(r.accuracy_mean),
                    "study acc %": _pct(r.published_accuracy),
                    "ours F1": _num(r.f1_mean),
                    "study F1": _num(r.published_f1),
                    "ours AUC": _num(r.auc_mean),
                    "study AUC": _num(r.published_auc),
                    "ours last acc %": _pct(r.last_accuracy_mean),
                    "study last acc %": _pct(r.published_last_accuracy),
                    "ours last AUC": _num(r.last_auc_mean),
                    "study last AUC": _num(r.published_last_auc),
                }
                for r in t.itertuples()
            ]
        )
    )


def _mean_recorded(values: Sequence[float | None]) -> float:
    """The mean of per-run values; NaN when a run did not record its value."""
    return float(np.mean([np.nan if v is None else v for v in values]))


def _real_plus_synthetic(extra: RunExtra) -> str:
    """``real + synthetic`` training images of a run (``?`` where not recorded)."""
    return " + ".join("?" if n is None else str(n) for n in (extra.n_real, extra.n_synthetic))


def _setup_md(runs: Sequence[dict[str, Any]], opts: ReportOptions) -> str:
    first, c = runs[0], runs[0]["settings"]
    extras = [RunExtra.from_dict(r.get("extra")) for r in runs]
    data_note = (
        "**Demo profile: the 'real' images are SYNTHETIC PHANTOMS made by the project, not patients, "
        "and the models are tiny runs; the numbers show the pipeline works, not the study's findings.**"
        if any(e.profile == "demo" for e in extras)
        else "Real images: `hf-vision/chest-xray-pneumonia` (or the local source named in the settings)."
    )
    weights = "; ".join(
        sorted({str("?" if e.initial_weights is None else e.initial_weights) for e in extras})
    )
    versions = ", ".join(sorted({str(e.dataset_version) for e in extras}))
    on_test = " (and, under the study's protocol, to pick the epoch)" if first["selection"] == "test" else ""
    split = next((e.validation_split["describe"] for e in extras if e.validation_split), None)
    hidden = c["hidden_units"]
    arrangement = (
        "**matched**: one generator per class fine-tuned on real train less the validation split, and "
        "one per class and limited fraction fine-tuned only on that fraction's real subset, fixed "
        "across seeds; Limited-10/25 use the matched generators, so they never draw on real images "
        "they are supposed to lack."
        if opts.generators == "matched"
        else "**study**: one generator per class, fine-tuned on real train less the validation split; "
        "every experiment's synthetic images come from it, so Limited-10/25 draw on real images "
        "(through the generator) beyond their 10% / 25%."
    )
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
            f"- Validation split of real train ({100 * c['val_fraction']:g}% of each class, split seed "
            f"{c['split_seed']}), the same for every experiment and seed, never used for training, "
            f"never seen by a generator: {split or 'not recorded'}.",
            f"- Test: {first['n_test']} images, used only for the scores below{on_test}.",
            f"- Generators (settings dreambooth.generators): {arrangement}",
            "- Synthetic images: class-balanced (half NORMAL, half PNEUMONIA), drawn with the run's seed. "
            "Balance controls: the baseline's real images plus seeded duplicates of real NORMAL images "
            "(**oversampling**, not class weights), to the class shares of the mix named; no synthetic "
            "image.",
            f"- Dataset version: {versions}.",
        ]
    )


def _runs_md(opts: ReportOptions, n_runs: int) -> str:
    lines = [f"{n_runs} of {opts.expected or n_runs} expected runs (experiment × seed) are reported."]
    if opts.missing:
        lines.append(
            f"\n**Missing (not yet materialized): {len(opts.missing)}**: " + ", ".join(opts.missing) + "."
        )
    if opts.excluded:
        lines.append(
            f"\n**Left out: {len(opts.excluded)}** (stale: made under other settings or from other images)"
        )
        lines += [f"- {name}: {why}" for name, why in opts.excluded]
    if not opts.missing and not opts.excluded:
        lines.append("None is missing.")
    return "\n".join(lines)


def _per_run_md(runs: Sequence[dict[str, Any]], order: Sequence[str]) -> str:
    def key(r: dict[str, Any]) -> tuple[int, int]:
        return (list(order).index(r["experiment"]) if r["experiment"] in order else 99, int(r["seed"]))

    return markdown_table(
        pd.DataFrame(
            [
                {
                    "experiment": r["experiment"],
                    "seed": str(r["seed"]),
                    "real + synth": _real_plus_synthetic(RunExtra.from_dict(r.get("extra"))),
                    "selected epoch": f"{r['selected_epoch']}/{r['epochs']}",
                    "val acc %": _pct(r["val_selected"]["accuracy"]),
                    "test acc % (selected)": _pct(r["test_selected"]["accuracy"]),
                    "test acc % (last)": _pct(r["test_last"]["accuracy"]),
                    "F1": _num(r["test_selected"]["f1"]),
                    "AUC": _num(r["test_selected"]["auc"]),
                    "specificity": _num(r["test_selected"]["specificity"]),
                    "train s": f"{r['train_time_s']:.0f}",
                }
                for r in sorted(runs, key=key)
            ]
        )
    )


def _uncertainty_md(runs: Sequence[dict[str, Any]], opts: ReportOptions, n_test: int) -> str:
    n_seeds = max(len(g) for g in group_runs(runs).values())
    seeds = (
        "**With one seed per experiment, the seed-level part of the variance cannot be estimated**: "
        "the intervals below resample test images only, and the paired test over seeds is n/a."
        if n_seeds < 2
        else f"Intervals are two-level bootstraps ({opts.n_boot} resamples): seeds drawn with replacement, "
        "then test images with replacement (the same for every drawn seed), so they cover seed-to-seed "
        "and test-image variance."
    )
    return f"""{seeds} Every generator was trained once, so the variance of DreamBooth itself (another
fine-tuning run) is **not** in the intervals. "Δacc" is accuracy minus the reference's, paired by seed
and by test image, with its two-level paired bootstrap interval and p-value (which cannot go below
1/{opts.n_boot} = {1 / opts.n_boot:.4f}); "p over seeds" is a paired t-test of per-seed accuracies;
"p DeLong" tests the AUC difference (per seed; several seeds: mean difference over mean variance, an
upper bound of its test-image variance). Each family of comparisons is corrected with Holm's method;
raw and adjusted p-values are both shown. One test image is {100 / n_test:.2f} accuracy points."""


def render_markdown(
    table: pd.DataFrame,
    comparisons: pd.DataFrame,
    runs: Sequence[dict[str, Any]],
    figures: Mapping[str, Path],
    opts: ReportOptions,
) -> str:
    n_test = runs[0]["n_test"]
    seeds = sorted({int(r["seed"]) for r in runs})
    protocol = (
        "**The epoch of each run was selected on the TEST set (the study's own protocol: no validation "
        "split, all of real train trains), so the 'selected' figures are optimistic; the last-epoch "
        "figures are not.**"
        if any(r["selection"] == "test" for r in runs)
        else "The epoch of each run was selected by accuracy on a validation split carved from the real "
        "training images by patient; the test set was scored only after training. The last epoch is "
        "reported too."
    )
    figs = "\n\n".join(
        f"### {name.replace('_', ' ').capitalize()}\n\n![{name}]({p.name})" for name, p in figures.items()
    )
    fidelity = {q.generator: fidelity_text(q) for q in opts.quality}
    quality = markdown_table(quality_frame(opts.quality)) or "No generator has been scored yet."
    return f"""# Synthetic chest X-rays for pneumonia classification: results

DenseNet-121 pneumonia classifiers trained on {len(table)} mixes of real and synthetic chest X-rays,
over {len(seeds)} seed(s) ({", ".join(map(str, seeds))}), scored on the same {n_test} test images.
This reproduces the classifier experiments of the study "Synthetic-XRay" (February 2026).

{protocol}

## Setup

{_setup_md(runs, opts)}

## Runs

{_runs_md(opts, len(runs))}

## Results

Selected epoch unless marked "last"; "mean ± sd" is over seeds. {_uncertainty_md(runs, opts, n_test)}

{main_table_md(table, fidelity)}

## Paired comparisons

Against the baseline (every experiment and balance control: one Holm family), and each synthetic
mix against its real-only balance control (another family): does the synthetic content help beyond
the class balance it brings?

{markdown_table(comparisons_frame(comparisons)) or "No paired comparison: the baseline has no run."}

## Generators: class fidelity and FID

Class fidelity: the share of a generator's synthetic images that the chest-X-ray feature extractor (a
DenseNet-121 trained on real images only) assigns to the generator's class, 95% Wilson interval; read it
beside Synth-Only (trained on synthetic images only, tested on real). FID against the generator's own
training images rewards memorization; against held-out real images (never seen by a generator) it does
not; the real floor is the FID of as many real images (outside the held-out set) against the same
held-out reference: what "as good as real" scores. Base model: its images of the same prompt with the
same sampler settings.

{quality}

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
    opts: ReportOptions | None = None,
) -> ReportResult:
    """Write ``report.md``, ``results.csv``, ``comparisons.csv`` and the four figures under ``out_dir``.

    ``runs``: ``classifier.experiment.load_run`` dicts; ``published``: ``settings.PUBLISHED_RESULTS``.
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
