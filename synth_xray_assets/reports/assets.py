"""Dagster wiring of the study report: ``study_report`` and its check."""

import dataclasses
import json

import dagster as dg
from PIL import Image

from synth_xray_assets.classifier.experiment import is_finished, load_run, run_dir, settings_fingerprint
from synth_xray_assets.classifier.train import RunResult
from synth_xray_assets.dataset.store import StandardizedDataset
from synth_xray_assets.evaluation.fidelity import load_fidelity
from synth_xray_assets.metadata import metadata_table, settings_metadata
from synth_xray_assets.operations.locks import one_writer
from synth_xray_assets.partitions import generator_keys
from synth_xray_assets.reports.markdown import (
    comparisons_frame,
    fid_frame,
    fidelity_text,
    main_frame,
    quality_frame,
)
from synth_xray_assets.reports.report import GeneratorQuality, ReportOptions, SetFigures, build_report
from synth_xray_assets.resources import SettingsResource
from synth_xray_assets.settings import PUBLISHED_RESULTS, Settings
from synth_xray_assets.storage import atomic_path, png_markdown, write_json_atomic
from synth_xray_assets.synthesis.store import MANIFEST, SyntheticImages, synthetic_dir

OWNERS = ["team:synth-xray"]
REPORT_VERSION = "report-v5"  # v5: generators by KID first (mean ± std, subset size), n beside every score
RUNS_FILE = "runs.json"  # which runs the last report read, and which were missing


def collect_runs(s: Settings) -> tuple[list[RunResult], list[str], list[tuple[str, str]]]:
    """The finished runs of the settings' experiments x seeds: ``(runs, missing, excluded)``.

    Only runs that exist are read. A run is left out, with the reason, when it is stale: trained on
    another dataset version, under another selection protocol, under other settings (its settings
    fingerprint differs from the current one) or on other synthetic images than those on disk now.
    """
    c = s.classifier
    try:
        current_version = StandardizedDataset.open(s.layout.dataset).version
    except FileNotFoundError:
        current_version = None
    runs, missing, excluded = [], [], []
    for experiment in c.all_experiments():
        for seed in c.seeds:
            name = f"{experiment}/seed-{seed}"
            folder = run_dir(s.data_dir, experiment, seed)
            if not is_finished(folder):
                missing.append(name)
                continue
            run = load_run(folder)
            why = stale_reason(s, run, current_version)
            if why:
                excluded.append((name, why))
            else:
                runs.append(run)
    return runs, missing, excluded


def stale_reason(s: Settings, run: RunResult, dataset_version: str | None) -> str | None:
    """Why ``run`` does not belong in a report of the current settings and files (None: it does)."""
    extra = run.extra
    version = extra.dataset_version
    if dataset_version is not None and version != dataset_version:
        return f"trained on dataset version {version}, current is {dataset_version}"
    if run.selection != s.classifier.selection:
        return f"selected on {run.selection}, the settings say {s.classifier.selection}"
    fingerprint, current = extra.settings_fingerprint, settings_fingerprint(s, run.experiment)
    if fingerprint is None:
        return "no settings fingerprint recorded (made by an older version): cannot tell its settings"
    if fingerprint != current:
        return f"trained under other settings (fingerprint {fingerprint}, current {current})"
    for generator, used in sorted((extra.synthetic_versions or {}).items()):
        root = synthetic_dir(s.data_dir, generator)
        now = SyntheticImages.open(root).version() if (root / MANIFEST).is_file() else None
        if used != now:
            return f"trained on synthetic images {generator} version {used}, current is {now or 'none'}"
    if extra.n_synthetic and not extra.synthetic_versions:
        return "used synthetic images but recorded no versions: cannot tell which"
    return None


def generator_quality(s: Settings) -> list[GeneratorQuality]:
    """KID, FID and class fidelity of every generator of the settings, from the evaluation's files."""
    out = []
    for key in generator_keys(s.dreambooth.generators, s.classifier.experiments):
        fid_path = s.layout.fid_scores(key)
        record = json.loads(fid_path.read_text()) if fid_path.is_file() else {}
        fidelity = load_fidelity(s.data_dir, key)
        if not record and fidelity is None:
            continue
        held = record.get("held_out", {})
        scores, unavailable = _space_figures(record.get("spaces", {}), held.get("spaces", {}))
        out.append(
            GeneratorQuality(
                generator=key,
                scores=scores,
                kid_verdict={k: v["verdict"] for k, v in held.get("kid_comparison", {}).items()},
                unavailable=unavailable,
                held_out_reference=held.get("reference_set", ""),
                train_reference=record.get("reference_set", ""),
                class_fidelity=fidelity.share if fidelity else float("nan"),
                class_fidelity_low=fidelity.ci_low if fidelity else float("nan"),
                class_fidelity_high=fidelity.ci_high if fidelity else float("nan"),
                class_fidelity_n=fidelity.n_images if fidelity else 0,
                real_test_recall=fidelity.real_recall if fidelity else float("nan"),
                real_test_n=fidelity.n_real if fidelity else 0,
            )
        )
    return out


def _space_figures(train: dict, held: dict) -> tuple[dict[str, dict[str, SetFigures]], dict[str, str]]:
    """Per available space the synthetic set against its own training images (``train``) and every
    set against the held-out reference; per unavailable space the reason."""
    scores: dict[str, dict[str, SetFigures]] = {}
    unavailable: dict[str, str] = {}
    for space in ("cxr", "inception"):
        own, other = train.get(space, {}), held.get(space, {})
        if not (own.get("available") or other.get("available")):
            if own or other:
                unavailable[space] = own.get("reason") or other.get("reason") or "unavailable"
            continue
        figures = {name: SetFigures.from_scores(v) for name, v in other.get("scores", {}).items()}
        if "synthetic" in own.get("scores", {}):
            figures["train"] = SetFigures.from_scores(own["scores"]["synthetic"])
        scores[space] = figures
    return scores, unavailable


@dg.asset(
    deps=[
        dg.AssetDep("classifier_experiment", partition_mapping=dg.AllPartitionMapping()),
        dg.AssetDep("fid_scores", partition_mapping=dg.AllPartitionMapping()),
        dg.AssetDep("class_fidelity", partition_mapping=dg.AllPartitionMapping()),
    ],
    group_name="reports",
    kinds={"pandas", "matplotlib"},
    owners=OWNERS,
    code_version=REPORT_VERSION,
    description=(
        "The study's results, redone: per experiment the mean and spread over seeds, two-level (seeds, "
        "then test images) bootstrap intervals, paired tests against the baseline and of each mix "
        "against its balance control (paired bootstrap, t over seeds, DeLong; raw and Holm-adjusted), "
        "each generator's KID first (mean ± std over subsets, against held-out real images, with the base "
        "model and the real floor, and whether fine-tuning moved its images toward real beyond the "
        "spread), then FID marked biased below its minimum n, n beside every score, and class fidelity, "
        "the study's published figures side by side, and its four figures (accuracy comparison, "
        "training curves, confusion matrices, metrics heatmap). Reads only the classifier runs that "
        "exist and are current; lists the missing and the stale ones with the reason. "
        "data/reports/report.md, results.csv, comparisons.csv and PNGs."
    ),
)
@one_writer
def study_report(context: dg.AssetExecutionContext, settings: SettingsResource) -> dg.MaterializeResult:
    s = settings.get()
    runs, missing, excluded = collect_runs(s)
    expected = len(s.classifier.all_experiments()) * len(s.classifier.seeds)
    for name, why in excluded:
        context.log.warning(f"left out {name}: {why}")
    if missing:
        context.log.warning(f"{len(missing)} of {expected} runs missing: {', '.join(missing)}")
    if not runs:
        raise dg.Failure(
            description=f"no finished classifier runs under {s.layout.classifier_runs}: "
            "materialize classifier_experiment first",
            metadata={"missing": ", ".join(missing)},
        )
    out = s.layout.reports
    c = s.classifier
    quality = generator_quality(s)
    opts = ReportOptions(
        n_boot=c.bootstrap_samples,
        level=c.ci_level,
        resample_seeds=c.hierarchical_bootstrap,
        balance_pairs=dict(c.balance_controls),
        generators=s.dreambooth.generators,
        expected=expected,
        missing=missing,
        excluded=excluded,
        quality=quality,
    )
    # The whole folder at once: a kill leaves the previous report whole, never new text, old plots.
    with atomic_path(out) as tmp:
        report = build_report(runs, PUBLISHED_RESULTS, tmp, opts)
        write_json_atomic(
            tmp / RUNS_FILE,
            {
                "reported": [f"{r.experiment}/seed-{r.seed}" for r in runs],
                "missing": missing,
                "excluded": [{"run": n, "reason": w} for n, w in excluded],
            },
        )
    fidelity = {q.generator: fidelity_text(q) for q in quality}
    report = dataclasses.replace(
        report,
        report_path=out / report.report_path.name,
        table_path=out / report.table_path.name,
        figure_paths={name: out / path.name for name, path in report.figure_paths.items()},
    )
    figures = {}
    for name, path in report.figure_paths.items():
        with Image.open(path) as im:
            thumb = im.convert("RGB")
        thumb.thumbnail((720, 480))
        figures[name] = dg.MetadataValue.md(png_markdown(thumb, name))
    return dg.MaterializeResult(
        metadata={
            "report": dg.MetadataValue.path(str(report.report_path)),
            "results_csv": dg.MetadataValue.path(str(report.table_path)),
            "num_runs": len(runs),
            "num_expected": expected,
            "missing_runs": ", ".join(missing) or "none",
            "excluded_runs": "; ".join(f"{n} ({w})" for n, w in excluded) or "none",
            "selection": s.classifier.selection,
            "generators": s.dreambooth.generators,
            "results": metadata_table(main_frame(report.table, fidelity)),
            "comparisons": metadata_table(comparisons_frame(report.comparisons)),
            "generator_quality": metadata_table(quality_frame(quality)),
            "generator_fid": metadata_table(fid_frame(quality)),
            **figures,
            **settings_metadata(s),
        }
    )


@dg.asset_check(
    asset=study_report,
    description="Every experiment x seed of the settings is in the report (warns, listing the missing).",
)
def every_run_reported(settings: SettingsResource) -> dg.AssetCheckResult:
    s = settings.get()
    listed = json.loads((s.layout.reports / RUNS_FILE).read_text())
    not_in = listed["missing"] + [e["run"] for e in listed["excluded"]]
    return dg.AssetCheckResult(
        passed=not not_in,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"num_reported": len(listed["reported"]), "not_reported": ", ".join(not_in) or "none"},
    )


def build_defs(s: Settings) -> dg.Definitions:
    """The reports domain's definitions (none depends on settings)."""
    return dg.Definitions(assets=[study_report], asset_checks=[every_run_reported])
