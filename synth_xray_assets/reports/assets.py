"""Dagster wiring of the study report: ``study_report`` and its check."""

import dataclasses
import json

import dagster as dg
from PIL import Image

from synth_xray_assets.classifier.experiment import is_finished, load_run, run_dir
from synth_xray_assets.dataset.store import StandardizedDataset
from synth_xray_assets.operations.locks import one_writer
from synth_xray_assets.reports.report import build_report, main_table_md
from synth_xray_assets.resources import SettingsResource
from synth_xray_assets.settings import PUBLISHED_RESULTS, Settings
from synth_xray_assets.storage import atomic_path, png_markdown, write_json_atomic

OWNERS = ["team:synth-xray"]
REPORT_VERSION = "report-v1"
RUNS_FILE = "runs.json"  # which runs the last report read, and which were missing


def collect_runs(s: Settings) -> tuple[list[dict], list[str], list[tuple[str, str]]]:
    """The finished runs of the settings' experiments x seeds: ``(runs, missing, excluded)``.

    Only runs that exist are read. A run is left out (with the reason) when it was trained on
    another dataset version or under another selection protocol than the current settings.
    """
    c = s.classifier
    try:
        current_version = StandardizedDataset.open(s.layout.dataset).version
    except FileNotFoundError:
        current_version = None
    runs, missing, excluded = [], [], []
    for experiment in c.experiments:
        for seed in c.seeds:
            name = f"{experiment}/seed-{seed}"
            folder = run_dir(s.data_dir, experiment, seed)
            if not is_finished(folder):
                missing.append(name)
                continue
            run = load_run(folder)
            version = run.get("extra", {}).get("dataset_version")
            if current_version is not None and version != current_version:
                excluded.append((name, f"trained on dataset version {version}, current is {current_version}"))
            elif run["selection"] != c.selection:
                excluded.append((name, f"selected on {run['selection']}, the settings say {c.selection}"))
            else:
                runs.append(run)
    return runs, missing, excluded


@dg.asset(
    deps=[dg.AssetDep("classifier_experiment", partition_mapping=dg.AllPartitionMapping())],
    group_name="reports",
    kinds={"pandas", "matplotlib"},
    owners=OWNERS,
    code_version=REPORT_VERSION,
    description=(
        "The study's results, redone: per experiment the mean and spread over seeds, 95% bootstrap "
        "confidence intervals, a paired test against the baseline (paired bootstrap and McNemar), "
        "the study's published figures side by side, and its four figures (accuracy comparison, "
        "training curves, confusion matrices, metrics heatmap). Reads only the classifier runs that "
        "exist and lists the missing ones. data/reports/report.md, results.csv and PNGs."
    ),
)
@one_writer
def study_report(context: dg.AssetExecutionContext, settings: SettingsResource) -> dg.MaterializeResult:
    s = settings.get()
    runs, missing, excluded = collect_runs(s)
    expected = len(s.classifier.experiments) * len(s.classifier.seeds)
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
    # The whole folder at once: a kill leaves the previous report whole, never new text, old plots.
    with atomic_path(out) as tmp:
        report = build_report(
            runs,
            PUBLISHED_RESULTS,
            tmp,
            n_boot=s.classifier.bootstrap_samples,
            expected=expected,
            missing=missing,
            excluded=excluded,
        )
        write_json_atomic(
            tmp / RUNS_FILE,
            {
                "reported": [f"{r['experiment']}/seed-{r['seed']}" for r in runs],
                "missing": missing,
                "excluded": [{"run": n, "reason": w} for n, w in excluded],
            },
        )
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
            "results": dg.MetadataValue.md(main_table_md(report.table)),
            **figures,
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
