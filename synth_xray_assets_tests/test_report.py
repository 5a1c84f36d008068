"""The study report: table, confidence intervals, paired tests, figures, missing runs."""

import json
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from synth_xray_assets.classifier.experiment import run_dir, save_run
from synth_xray_assets.classifier.stats import binary_metrics
from synth_xray_assets.classifier.train import SELECTION_LABELS, RunResult
from synth_xray_assets.reports import assets as report_assets
from synth_xray_assets.reports.report import build_report
from synth_xray_assets.resources import SettingsResource
from synth_xray_assets.settings import PUBLISHED_RESULTS, ClassifierSettings

N_TEST = 120
Y = np.r_[np.zeros(48, np.int64), np.ones(72, np.int64)]
TEST_IDS = [f"sha-{i:03d}" for i in range(N_TEST)]


def fake_run(experiment: str, seed: int, accuracy: float, selection: str = "validation") -> RunResult:
    """A run whose test predictions are right on about ``accuracy`` of the images."""
    rng = np.random.default_rng([seed, len(experiment), int(accuracy * 1000)])
    right = rng.random(N_TEST) < accuracy
    confidence = rng.uniform(0.55, 0.95, N_TEST)
    prob = np.where(right == (Y == 1), confidence, 1 - confidence)
    prob_last = np.clip(prob + rng.normal(0, 0.1, N_TEST), 0.01, 0.99)
    history = [
        {
            "epoch": e + 1,
            "lr": 1e-4,
            "train_loss": 0.7 / (e + 1),
            "train_accuracy": 0.6 + 0.1 * e,
            "val_loss": 0.6 / (e + 1),
            "val_accuracy": 0.6 + 0.1 * e,
            "train_images": 100,
            "train_seconds": 1.0,
        }
        for e in range(3)
    ]
    n_synth = {"baseline": 0, "synth-25": 600, "synth-only": 2400}[experiment]
    return RunResult(
        experiment=experiment,
        seed=seed,
        selection=selection,
        selection_note=SELECTION_LABELS[selection],
        epochs=3,
        selected_epoch=3,
        history=history,
        val_selected=binary_metrics(Y[:20], prob[:20]),
        test_selected=binary_metrics(Y, prob),
        test_last=binary_metrics(Y, prob_last),
        test_labels=Y.tolist(),
        test_prob_selected=prob.tolist(),
        test_prob_last=prob_last.tolist(),
        n_train=100 + n_synth,
        n_train_per_class=[50, 50 + n_synth],
        n_val=20,
        n_test=N_TEST,
        weights_path="best.safetensors",
        last_weights_path="last.safetensors",
        resumed_from_epoch=0,
        wall_time_s=3.0,
        train_time_s=3.0,
        train_images_per_s=100.0,
        device="cpu",
        settings=ClassifierSettings(epochs=3).model_dump(mode="json"),
        extra={
            "n_real": 0 if experiment == "synth-only" else 100,
            "n_synthetic": n_synth,
            "profile": "demo",
            "initial_weights": "none: random initialisation",
            "dataset_version": "v1",
        },
    )


def write_fake_runs(data_dir: Path, runs: list[RunResult]) -> None:
    for r in runs:
        save_run(r, run_dir(data_dir, r.experiment, r.seed), TEST_IDS)


def as_loaded(r: RunResult) -> dict:
    return {**r.to_dict(), "test_image_ids": TEST_IDS}


def test_report_with_two_seeds(tmp_path):
    runs = [
        fake_run(name, seed, acc)
        for name, acc in [("baseline", 0.80), ("synth-25", 0.93), ("synth-only", 0.70)]
        for seed in (0, 1)
    ]
    result = build_report([as_loaded(r) for r in runs], PUBLISHED_RESULTS, tmp_path, n_boot=200)
    t = result.table.set_index("experiment")
    assert list(t.index) == ["baseline", "synth-25", "synth-only"]  # the study's order
    assert (t.n_seeds == 2).all()
    base_acc = [r.test_selected["accuracy"] for r in runs[:2]]
    assert t.loc["baseline", "accuracy_mean"] == pytest.approx(np.mean(base_acc))
    assert t.loc["baseline", "accuracy_std"] == pytest.approx(np.std(base_acc, ddof=1))
    for name in t.index:
        assert (
            t.loc[name, "accuracy_ci_low"] <= t.loc[name, "accuracy_mean"] <= t.loc[name, "accuracy_ci_high"]
        )
    # the better experiment is significantly better, the worse one significantly worse
    assert t.loc["synth-25", "delta_ci_low"] > 0 and t.loc["synth-25", "p_paired_bootstrap"] < 0.05
    assert t.loc["synth-only", "delta_ci_high"] < 0
    assert t.loc["synth-25", "p_mcnemar_median"] < 0.05 and np.isnan(t.loc["baseline", "delta_accuracy"])
    assert t.loc["synth-25", "published_accuracy"] == 0.894
    md = result.markdown
    assert (tmp_path / "report.md").read_text() == md
    assert "SYNTHETIC PHANTOMS" in md and "over 2 seed(s) (0, 1)" in md
    assert "| baseline | 100 + 0 | 2 |" in md and "| 88.0 |" in md  # ours beside the study's 88.0
    assert "None is missing." in md
    for name in ("accuracy_comparison", "training_curves", "confusion_matrices", "metrics_heatmap"):
        path = tmp_path / f"{name}.png"
        assert f"![{name}]({name}.png)" in md
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 300
    csv = pd.read_csv(tmp_path / "results.csv")
    assert len(csv) == 3 and {"accuracy_ci_low", "auc_ci_high", "p_paired_bootstrap"} <= set(csv.columns)


def test_runs_on_different_test_sets_are_refused(tmp_path):
    a, b = as_loaded(fake_run("baseline", 0, 0.8)), as_loaded(fake_run("synth-25", 0, 0.8))
    b["test_labels"] = b["test_labels"][::-1]
    with pytest.raises(ValueError, match="different test sets"):
        build_report([a, b], PUBLISHED_RESULTS, tmp_path, n_boot=10)


def materialize_report(data_dir: Path, seeds=(0, 1)):
    overrides = {"classifier": {"seeds": list(seeds), "bootstrap_samples": 100}}
    with dg.instance_for_test() as instance:
        return dg.materialize(
            [report_assets.study_report, report_assets.every_run_reported],
            instance=instance,
            resources={
                "settings": SettingsResource(data_dir=str(data_dir), overrides_json=json.dumps(overrides))
            },
            raise_on_error=False,
        )


def test_study_report_asset_reads_only_existing_runs_and_lists_the_missing(tmp_path):
    runs = [fake_run("baseline", s, 0.8) for s in (0, 1)] + [fake_run("synth-25", 0, 0.9)]
    runs.append(fake_run("synth-only", 1, 0.7, selection="test"))  # another protocol: left out
    write_fake_runs(tmp_path, runs)
    result = materialize_report(tmp_path)
    assert result.success
    md = result.asset_materializations_for_node("study_report")[0].metadata
    assert md["num_runs"].value == 3 and md["num_expected"].value == 14  # 7 experiments x 2 seeds
    missing = md["missing_runs"].value
    assert "synth-25/seed-1" in missing and "limited-10/seed-0" in missing and "baseline" not in missing
    assert (
        "synth-only/seed-1" in md["excluded_runs"].value and "selected on test" in md["excluded_runs"].value
    )
    assert md["results"].value.count("\n") == 3  # header, rule, baseline, synth-25
    assert md["accuracy_comparison"].value.startswith("![accuracy_comparison](data:image/png;base64,")
    report = (tmp_path / "reports" / "report.md").read_text()
    assert "3 of 14 expected runs" in report and "**Missing (not yet materialized): 10**" in report
    assert "synth-only/seed-1: selected on test" in report
    for name in ("accuracy_comparison", "training_curves", "confusion_matrices", "metrics_heatmap"):
        assert (tmp_path / "reports" / f"{name}.png").stat().st_size > 1000
    check = result.get_asset_check_evaluations()[0]
    assert check.check_name == "every_run_reported" and not check.passed
    assert check.severity == dg.AssetCheckSeverity.WARN


def test_study_report_without_runs_fails_clearly(tmp_path):
    result = materialize_report(tmp_path)
    assert not result.success
    failure = [e for e in result.all_events if e.is_step_failure][0]
    assert "materialize classifier_experiment first" in str(failure.step_failure_data.error)
