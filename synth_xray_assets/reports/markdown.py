"""``report.md``: the study's results as markdown tables (every table written by
``storage.markdown_table``), the setup, the generators' quality, the figures and every run."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from synth_xray_assets.classifier.train import RunExtra, RunResult
from synth_xray_assets.storage import markdown_table

if TYPE_CHECKING:
    from synth_xray_assets.reports.report import GeneratorQuality, ReportOptions, SetFigures


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
    """KID first: per generator and feature space, KID (mean ± std over subsets, subset size, n) of
    the fine-tuned images, the base model's and the real floor against the held-out reference, whether
    fine-tuning moved the images toward real beyond the spread, and class fidelity."""
    rows = []
    for q in quality:
        head = {"generator": q.generator}
        for space, why in q.unavailable.items():
            rows.append({**head, "space": space, "KID fine-tuned": f"unavailable: {why}"})
        for space, f in q.scores.items():
            rows.append(
                {
                    **head,
                    "space": space,
                    "KID fine-tuned": kid_cell(f.get("synthetic")),
                    "KID base model": kid_cell(f.get("base_model")),
                    "KID real floor": kid_cell(f.get("real_floor")),
                    "held-out ref n": _count(f.get("synthetic"), "n_reference"),
                    "fine-tuning moved images": q.kid_verdict.get(space, "not measured"),
                    "class fidelity [95% CI]": fidelity_text(q),
                }
            )
    return pd.DataFrame(rows)


def fid_frame(quality: Sequence[GeneratorQuality]) -> pd.DataFrame:
    """FID with n beside it, marked biased where either side holds fewer than the space's minimum:
    against the generator's own training images, and the three sets against the held-out reference."""
    rows = []
    for q in quality:
        for space, f in q.scores.items():
            rows.append(
                {
                    "generator": q.generator,
                    "space": space,
                    "FID own train ref": fid_cell(f.get("train")),
                    "FID held-out ref": fid_cell(f.get("synthetic")),
                    "FID base model": fid_cell(f.get("base_model")),
                    "FID real floor": fid_cell(f.get("real_floor")),
                }
            )
    return pd.DataFrame(rows)


def kid_cell(f: SetFigures | None) -> str:
    """``0.0435 ± 0.0109 (n 58, subsets of 16)``."""
    if f is None or _nan(f.kid_mean):
        return "n/a" if f is None else f"n/a (n {f.n})"
    return f"{f.kid_mean:.4f} ± {f.kid_std:.4f} (n {f.n}, subsets of {f.kid_subset_size})"


def fid_cell(f: SetFigures | None) -> str:
    """``73.40 (n 58 vs 120; biased: n < 1024)``."""
    if f is None or _nan(f.fid):
        return "n/a" if f is None else f"n/a (n {f.n})"
    mark = f"; biased: n < {f.fid_min_images}" if f.fid_biased else ""
    return f"{f.fid:.2f} (n {f.n} vs {f.n_reference}{mark})"


def _count(f: SetFigures | None, name: str) -> str:
    return "n/a" if f is None else str(getattr(f, name))


def fidelity_text(q: GeneratorQuality) -> str:
    if _nan(q.class_fidelity):
        return "n/a"
    low, high = 100 * q.class_fidelity_low, 100 * q.class_fidelity_high
    text = f"{100 * q.class_fidelity:.0f}% [{low:.0f}, {high:.0f}] of {q.class_fidelity_n}"
    if _nan(q.real_test_recall):
        return text
    return f"{text} (real test images: {100 * q.real_test_recall:.0f}% of {q.real_test_n})"


def _held_out_md(quality: Sequence[GeneratorQuality]) -> str:
    """The held-out reference sets, in words (one per generator)."""
    named = [f"{q.generator}: {q.held_out_reference}" for q in quality if q.held_out_reference]
    return f" ({'; '.join(named)})" if named else ""


def _fid_minimum_md(quality: Sequence[GeneratorQuality]) -> str:
    """``1024 (cxr) / 2048 (inception)``: the minimum n per feature space the scores record."""
    minimum = {
        space: f.fid_min_images for q in quality for space, sets in q.scores.items() for f in sets.values()
    }
    return " / ".join(f"{n} ({space})" for space, n in minimum.items()) or "the feature dimension"


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


def _real_plus_synthetic(extra: RunExtra) -> str:
    """``real + synthetic`` training images of a run (``?`` where not recorded)."""
    return " + ".join("?" if n is None else str(n) for n in (extra.n_real, extra.n_synthetic))


def _data_note(extras: Sequence[RunExtra]) -> str:
    """What the 'real' images were, from the source each run recorded, and the demo's caveat."""
    origins = [e.data_origin for e in extras]
    if any(o and o.get("phantoms") for o in origins):
        data = "the 'real' images are SYNTHETIC PHANTOMS made by the project, not patients"
    elif origins and all(origins):
        data = "real images: " + ", ".join(sorted({_origin_text(o) for o in origins}))
    else:  # runs saved before the source was recorded
        data = "the source of the real images was not recorded in these runs (the demo's default: phantoms)"
    if any(e.profile == "demo" for e in extras):
        return (
            f"**Demo profile: {data}; the models are tiny runs (the generators far from converged), "
            "so the numbers show how the pipeline behaves, not the study's findings.**"
        )
    return data[0].upper() + data[1:] + "."


def _origin_text(origin: dict) -> str:
    rev = f"@{origin['revision']}" if origin.get("revision") else ""
    return f"`{origin.get('location')}{rev}` ({origin.get('kind')})"


def _setup_md(runs: Sequence[RunResult], opts: ReportOptions) -> str:
    first, c = runs[0], runs[0].settings
    extras = [r.extra for r in runs]
    data_note = _data_note(extras)
    weights = "; ".join(
        sorted({str("?" if e.initial_weights is None else e.initial_weights) for e in extras})
    )
    versions = ", ".join(sorted({str(e.dataset_version) for e in extras}))
    on_test = " (and, under the study's protocol, to pick the epoch)" if first.selection == "test" else ""
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
            f"- Test: {first.n_test} images, used only for the scores below{on_test}.",
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


def _per_run_md(runs: Sequence[RunResult], order: Sequence[str]) -> str:
    def key(r: RunResult) -> tuple[int, int]:
        return (list(order).index(r.experiment) if r.experiment in order else 99, int(r.seed))

    return markdown_table(
        pd.DataFrame(
            [
                {
                    "experiment": r.experiment,
                    "seed": str(r.seed),
                    "real + synth": _real_plus_synthetic(r.extra),
                    "selected epoch": f"{r.selected_epoch}/{r.epochs}",
                    "val acc %": _pct(r.val_selected["accuracy"]),
                    "test acc % (selected)": _pct(r.test_selected["accuracy"]),
                    "test acc % (last)": _pct(r.test_last["accuracy"]),
                    "F1": _num(r.test_selected["f1"]),
                    "AUC": _num(r.test_selected["auc"]),
                    "specificity": _num(r.test_selected["specificity"]),
                    "train s": f"{r.train_time_s:.0f}",
                }
                for r in sorted(runs, key=key)
            ]
        )
    )


def _uncertainty_md(runs: Sequence[RunResult], opts: ReportOptions, n_test: int) -> str:
    n_seeds = max(Counter(r.experiment for r in runs).values())  # the most seeds of an experiment
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
    runs: Sequence[RunResult],
    figures: Mapping[str, Path],
    opts: ReportOptions,
) -> str:
    n_test = runs[0].n_test
    seeds = sorted({int(r.seed) for r in runs})
    protocol = (
        "**The epoch of each run was selected on the TEST set (the study's own protocol: no validation "
        "split, all of real train trains), so the 'selected' figures are optimistic; the last-epoch "
        "figures are not.**"
        if any(r.selection == "test" for r in runs)
        else "The epoch of each run was selected by accuracy on a validation split carved from the real "
        "training images by patient; the test set was scored only after training. The last epoch is "
        "reported too."
    )
    figs = "\n\n".join(
        f"### {name.replace('_', ' ').capitalize()}\n\n![{name}]({p.name})" for name, p in figures.items()
    )
    fidelity = {q.generator: fidelity_text(q) for q in opts.quality}
    quality = markdown_table(quality_frame(opts.quality)) or "No generator has been scored yet."
    fid = markdown_table(fid_frame(opts.quality)) or "No generator has been scored yet."
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

## Generators: KID first, n beside every score

KID (kernel inception distance in each feature space: unbiased at any n, so it leads and decides) of
each generator's images against held-out real images of its class, never seen by a generator or a
classifier{_held_out_md(opts.quality)}: the fine-tuned images, the untrained base model's images of
the same prompt with the same sampler settings, and the real floor (as many real images, outside the
held-out set, against the same reference: what "as good as real" scores). Mean ± std over random
subsets of the stated size; n is the number of images scored. "Fine-tuning moved images": toward or
away from real when the base model's KID and the fine-tuned images' differ by more than their spreads
summed, else within the spread. Class fidelity: the share of a generator's synthetic images that the
chest-X-ray feature extractor (a DenseNet-121 trained on real images only) assigns to the generator's
class, 95% Wilson interval, beside its recall on the real test images of the class.

{quality}

FID, for side-by-side reading with the study (which reports FID only); it decides nothing. FID is
biased upwards at small n (its bias falls as 1/n and its covariances are rank-deficient below the
feature dimension): below {_fid_minimum_md(opts.quality)} images on either side it is marked biased.
Against the generator's own training images it rewards memorization.

{fid}

## Side by side with the study

The study's figures come from one seed and were selected on its test set; its "last" figures are
the same runs at their last epoch (20).

{_side_by_side_md(table)}

## Figures

{figs}

## Every run

{_per_run_md(runs, list(table.experiment))}
"""
