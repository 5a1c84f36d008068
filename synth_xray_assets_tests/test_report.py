"""The study report: table, confidence intervals, paired tests, figures, missing runs."""

import json
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from synth_xray_assets.classifier.experiment import run_dir, save_run, settings_fingerprint
from synth_xray_assets.classifier.stats import binary_metrics, holm
from synth_xray_assets.classifier.train import SELECTION_LABELS, RunExtra, RunResult
from synth_xray_assets.evaluation.fidelity import ClassFidelity, save_fidelity
from synth_xray_assets.reports import assets as report_assets
from synth_xray_assets.reports.report import ReportOptions, build_report
from synth_xray_assets.resources import SettingsResource
from synth_xray_assets.settings import PUBLISHED_RESULTS, ClassifierSettings, Settings
from synth_xray_assets.storage import write_json_atomic
from synth_xray_assets.synthesis.store import MANIFEST_COLUMNS, SyntheticImages, synthetic_dir

N_TEST = 120
Y = np.r_[np.zeros(48, np.int64), np.ones(72, np.int64)]
TEST_IDS = [f"sha-{i:03d}" for i in range(N_TEST)]


SYNTHETIC_VERSIONS: dict[str, str] = {}  # what the fake synthetic runs were trained on


PHANTOM_ORIGIN = {"kind": "parquet", "location": "/data/sources/phantoms", "revision": None, "phantoms": True}
MIRROR_ORIGIN = {"kind": "imagefolder", "location": "/shared/chest-xray", "revision": None, "phantoms": False}


def fake_run(
    experiment: str,
    seed: int,
    accuracy: float,
    selection: str = "validation",
    settings: Settings | None = None,
) -> RunResult:
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
    n_synth = {"baseline": 0, "synth-25": 600, "synth-only": 2400, "balance-synth-25": 0}[experiment]
    settings = settings or Settings.for_profile("demo", "/nonexistent")
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
        extra=RunExtra(
            n_real=0 if experiment == "synth-only" else 100,
            n_synthetic=n_synth,
            profile="demo",
            initial_weights="none: random initialisation",
            dataset_version="v1",
            data_origin=PHANTOM_ORIGIN,
            settings_fingerprint=settings_fingerprint(settings, experiment),
            synthetic_versions=dict(SYNTHETIC_VERSIONS) if n_synth else {},
            generator_keys={"normal": "normal", "pneumonia": "pneumonia"} if n_synth else {},
            normal_share=0.3 if experiment != "balance-synth-25" else 0.34,
            balance_like="synth-25" if experiment == "balance-synth-25" else None,
            validation_split={"describe": "by patient: 90 patients / 100 images train"},
        ),
    )


def write_fake_synthetic(data_dir: Path, tag: str) -> None:
    """Manifests of synthetic sets (the report reads only their versions) and the versions recorded."""
    for label, key in enumerate(("normal", "pneumonia")):
        rows = [[i, f"images/{i:05d}.png", key, label, i, "p", "ckpt", f"{tag}-{key}-{i}"] for i in range(3)]
        root = synthetic_dir(data_dir, key)
        root.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows, columns=MANIFEST_COLUMNS).to_parquet(root / "manifest.parquet", index=False)
        SYNTHETIC_VERSIONS[key] = SyntheticImages.open(root).version()


def write_fake_runs(data_dir: Path, runs: list[RunResult]) -> None:
    for r in runs:
        save_run(r, run_dir(data_dir, r.experiment, r.seed), TEST_IDS)


def as_loaded(r: RunResult) -> RunResult:
    return RunResult.from_dict({**r.to_dict(), "test_image_ids": TEST_IDS})


def test_report_with_two_seeds(tmp_path):
    runs = [
        fake_run(name, seed, acc)
        for name, acc in [
            ("baseline", 0.80),
            ("synth-25", 0.93),
            ("synth-only", 0.70),
            ("balance-synth-25", 0.8),
        ]
        for seed in (0, 1)
    ]
    opts = ReportOptions(n_boot=200, balance_pairs={"balance-synth-25": "synth-25"})
    result = build_report([as_loaded(r) for r in runs], PUBLISHED_RESULTS, tmp_path, opts)
    t = result.table.set_index("experiment")
    assert list(t.index) == ["baseline", "synth-25", "synth-only", "balance-synth-25"]  # the study's order
    assert (t.n_seeds == 2).all()
    base_acc = [r.test_selected["accuracy"] for r in runs[:2]]
    assert t.loc["baseline", "accuracy_mean"] == pytest.approx(np.mean(base_acc))
    assert t.loc["baseline", "accuracy_std"] == pytest.approx(np.std(base_acc, ddof=1))
    for name in t.index:
        assert (
            t.loc[name, "accuracy_ci_low"] <= t.loc[name, "accuracy_mean"] <= t.loc[name, "accuracy_ci_high"]
        )
    c = result.comparisons.set_index("comparison")
    assert list(c.index) == [
        "synth-25 − baseline",
        "synth-only − baseline",
        "balance-synth-25 − baseline",
        "synth-25 − balance-synth-25",
    ]
    # the better experiment is significantly better, the worse one significantly worse
    assert (
        c.loc["synth-25 − baseline", "delta_ci_low"] > 0
        and c.loc["synth-25 − baseline", "p_bootstrap"] < 0.05
    )
    assert c.loc["synth-only − baseline", "delta_ci_high"] < 0
    assert c.loc["synth-25 − baseline", "p_delong"] < 0.05
    # Holm within each family: the three comparisons with the baseline, then the balance pair alone
    family = c[c.family == "vs baseline"]
    for column in ("p_bootstrap", "p_seeds", "p_delong"):
        assert family[f"{column}_holm"].tolist() == pytest.approx(holm(family[column].tolist()), nan_ok=True)
        assert (family[f"{column}_holm"] >= family[column]).all()
    balance = c.loc["synth-25 − balance-synth-25"]
    assert balance.p_bootstrap_holm == balance.p_bootstrap and balance.delta_accuracy > 0
    assert t.loc["synth-25", "published_accuracy"] == 0.894
    md = result.markdown
    assert (tmp_path / "report.md").read_text() == md
    assert "SYNTHETIC PHANTOMS" in md and "over 2 seed(s) (0, 1)" in md
    assert "seeds drawn with replacement" in md and "trained once" in md
    assert "| baseline | 100 + 0 | 30.0 |" in md and "| 88.0 |" in md  # ours beside the study's 88.0
    assert "balance-synth-25 (real, balanced like synth-25)" in md and "oversampling" in md
    assert "Generators (settings dreambooth.generators): **study**" in md
    assert "by patient: 90 patients" in md
    assert "None is missing." in md
    for name in ("accuracy_comparison", "training_curves", "confusion_matrices", "metrics_heatmap"):
        path = tmp_path / f"{name}.png"
        assert f"![{name}]({name}.png)" in md
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 300
    csv = pd.read_csv(tmp_path / "results.csv")
    assert len(csv) == 4 and {"accuracy_ci_low", "auc_ci_high", "normal_share"} <= set(csv.columns)
    assert {"p_bootstrap", "p_bootstrap_holm", "p_delong_holm"} <= set(
        pd.read_csv(tmp_path / "comparisons.csv")
    )


def test_one_seed_says_the_seed_level_cannot_be_estimated_and_study_protocol_is_labelled(tmp_path):
    runs = [fake_run("baseline", 0, 0.8, "test"), fake_run("synth-25", 0, 0.85, "test")]
    result = build_report([as_loaded(r) for r in runs], PUBLISHED_RESULTS, tmp_path, ReportOptions(n_boot=50))
    assert "seed-level part of the variance cannot be estimated" in result.markdown
    assert "selected on the TEST set (the study's own protocol: no validation split" in result.markdown
    assert np.isnan(result.comparisons.p_seeds.iloc[0])  # no test over one seed
    assert "n/a / n/a" in result.markdown


def test_runs_on_different_test_sets_are_refused(tmp_path):
    a, b = as_loaded(fake_run("baseline", 0, 0.8)), as_loaded(fake_run("synth-25", 0, 0.8))
    b.test_labels = b.test_labels[::-1]
    with pytest.raises(ValueError, match="different test sets"):
        build_report([a, b], PUBLISHED_RESULTS, tmp_path, ReportOptions(n_boot=10))


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
    write_fake_synthetic(tmp_path, "v1")
    runs = [fake_run("baseline", s, 0.8) for s in (0, 1)] + [fake_run("synth-25", 0, 0.9)]
    runs.append(fake_run("synth-only", 1, 0.7, selection="test"))  # another protocol: left out
    write_fake_runs(tmp_path, runs)

    # one generator scored: its FID record and class fidelity, shown beside the experiments using it
    def scores(fid, kid, std, n=32, n_ref=120):
        return {
            "fid": fid,
            "kid_mean": kid,
            "kid_std": std,
            "kid_subset_size": 16,
            "n_images": n,
            "n_reference": n_ref,
            "fid_min_images": 1024,
            "fid_biased": True,
        }

    fid = {"available": True, "scores": {"synthetic": scores(12.5, 0.01, 0.002, n_ref=60)}}
    held = {
        "available": True,
        "scores": {
            "synthetic": scores(20.0, 0.0435, 0.0109),
            "real_floor": scores(8.0, 0.0232, 0.005),
            "base_model": scores(90.0, 0.0248, 0.0065),
        },
    }
    unavailable = {"available": False, "reason": "no local Inception weights"}
    comparison = {"cxr": {"verdict": "away from real", "difference": -0.0187, "spread": 0.0174}}
    write_json_atomic(
        tmp_path / "evaluation" / "fid" / "normal.json",
        {
            "spaces": {"cxr": fid, "inception": unavailable},
            "held_out": {
                "reference_set": "120 held-out NORMAL phantoms",
                "kid_comparison": comparison,
                "spaces": {"cxr": held, "inception": unavailable},
            },
        },
    )
    fidelity = ClassFidelity(
        "normal", "normal", 32, 8, 0.25, 0.13, 0.42, 0.95, 0.8, "x", "v", 0.9, 0.8, 0.95, 40
    )
    save_fidelity(fidelity, tmp_path)
    result = materialize_report(tmp_path)
    assert result.success
    md = result.asset_materializations_for_node("study_report")[0].metadata
    assert md["num_runs"].value == 3 and md["num_expected"].value == 20  # (7 experiments + 3 controls) x 2
    missing = md["missing_runs"].value
    assert "synth-25/seed-1" in missing and "limited-10/seed-0" in missing and "baseline" not in missing
    assert "balance-synth-50/seed-0" in missing
    assert (
        "synth-only/seed-1" in md["excluded_runs"].value and "selected on test" in md["excluded_runs"].value
    )
    assert len(md["results"].value.records) == 2  # baseline, synth-25
    assert "25% [13, 42] of 32" in md["results"].value.records[1].data["class fidelity of its generators"]
    # KID first: per space, the three sets' KID with spread, n and subset size, and the verdict
    rows = {r.data["space"]: r.data for r in md["generator_quality"].value.records}
    assert rows["inception"]["KID fine-tuned"] == "unavailable: no local Inception weights"
    kid = rows["cxr"]
    assert kid["generator"] == "normal" and kid["KID fine-tuned"] == "0.0435 ± 0.0109 (n 32, subsets of 16)"
    assert kid["KID base model"] == "0.0248 ± 0.0065 (n 32, subsets of 16)"
    assert kid["KID real floor"] == "0.0232 ± 0.0050 (n 32, subsets of 16)"
    assert kid["held-out ref n"] == "120" and kid["fine-tuning moved images"] == "away from real"
    fid = md["generator_fid"].value.records[0].data
    assert fid["FID own train ref"] == "12.50 (n 32 vs 60; biased: n < 1024)"
    assert fid["FID held-out ref"] == "20.00 (n 32 vs 120; biased: n < 1024)"
    assert fid["FID real floor"] == "8.00 (n 32 vs 120; biased: n < 1024)"
    assert md["comparisons"].value.records[0].data["comparison"] == "synth-25 − baseline"
    assert md["accuracy_comparison"].value.startswith("![accuracy_comparison](data:image/png;base64,")
    report = (tmp_path / "reports" / "report.md").read_text()
    assert "3 of 20 expected runs" in report and "**Missing (not yet materialized): 16**" in report
    assert "synth-only/seed-1: selected on test" in report
    kid_row = (
        "| normal | cxr | 0.0435 ± 0.0109 (n 32, subsets of 16) | 0.0248 ± 0.0065 (n 32, subsets of 16) | "
        "0.0232 ± 0.0050 (n 32, subsets of 16) | 120 | away from real | 25% [13, 42] of 32 (real test "
        "images: 90% of 40) |"
    )
    assert kid_row in report and "(normal: 120 held-out NORMAL phantoms)" in report
    fid_row = "| normal | cxr | 12.50 (n 32 vs 60; biased: n < 1024) | 20.00 (n 32 vs 120; biased: n < 1024) "
    assert fid_row in report and "below 1024 (cxr) images on either side it is marked biased" in report
    assert report.index("## Generators: KID first") < report.index("FID, for side-by-side reading")
    for name in ("accuracy_comparison", "training_curves", "confusion_matrices", "metrics_heatmap"):
        assert (tmp_path / "reports" / f"{name}.png").stat().st_size > 1000
    check = result.get_asset_check_evaluations()[0]
    assert check.check_name == "every_run_reported" and not check.passed
    assert check.severity == dg.AssetCheckSeverity.WARN


def test_stale_runs_are_excluded_and_listed_with_the_reason(tmp_path):
    write_fake_synthetic(tmp_path, "v1")
    other = Settings.for_profile("demo", tmp_path, {"classifier": {"learning_rate": 0.5}})
    runs = [
        fake_run("baseline", 0, 0.8),
        fake_run("baseline", 1, 0.8, settings=other),  # other classifier settings
        fake_run("synth-25", 0, 0.9),  # trained on the v1 synthetic images
    ]
    write_fake_runs(tmp_path, runs)
    write_fake_synthetic(tmp_path, "v2")  # the synthetic images were made again since
    result = materialize_report(tmp_path)
    assert result.success
    md = result.asset_materializations_for_node("study_report")[0].metadata
    assert md["num_runs"].value == 1
    excluded = md["excluded_runs"].value
    assert "baseline/seed-1 (trained under other settings (fingerprint" in excluded
    assert "synth-25/seed-0 (trained on synthetic images normal version" in excluded
    report = (tmp_path / "reports" / "report.md").read_text()
    assert "**Left out: 2** (stale" in report and "- baseline/seed-1: trained under other settings" in report


def test_study_report_without_runs_fails_clearly(tmp_path):
    result = materialize_report(tmp_path)
    assert not result.success
    failure = [e for e in result.all_events if e.is_step_failure][0]
    assert "materialize classifier_experiment first" in str(failure.step_failure_data.error)


def test_the_report_names_the_real_images_from_the_source_each_run_recorded():
    """Runs on the real mirror under the demo profile are not called phantoms; phantoms are."""
    from synth_xray_assets.reports.markdown import _data_note

    def extras(origin, profile="demo"):
        return [RunExtra(profile=profile, data_origin=origin)]

    on_mirror = _data_note(extras(MIRROR_ORIGIN))
    assert "PHANTOMS" not in on_mirror and "`/shared/chest-xray` (imagefolder)" in on_mirror
    assert "Demo profile" in on_mirror and "tiny runs" in on_mirror
    assert "SYNTHETIC PHANTOMS" in _data_note(extras(PHANTOM_ORIGIN))
    assert "not recorded" in _data_note(extras(None))
    hub = {**MIRROR_ORIGIN, "kind": "hub", "location": "hf-vision/x", "revision": "abc"}
    full = _data_note(extras(hub, "full"))
    assert full == "Real images: `hf-vision/x@abc` (hub)."
