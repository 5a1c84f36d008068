"""Shared splits of real train: the validation split by patient, and each generator's real images."""

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from synth_xray_assets.classifier.data import compose_experiment
from synth_xray_assets.dataset.splits import (
    generator_positions,
    patient_id,
    stratified_split,
    validation_split,
)
from synth_xray_assets.partitions import generator_for, generator_keys, parse_generator_key
from synth_xray_assets.settings import Settings

MIRROR = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest-xray-pneumonia-224"


def test_patient_from_the_three_kermany_forms_and_none_elsewhere():
    assert patient_id("person123_bacteria_456.jpeg") == "person123"
    assert patient_id("person1_virus_6.jpeg") == "person1"
    assert patient_id("person1_virus_11_1.jpeg") == "person1"  # the one odd form in train
    assert patient_id("IM-0001-0001.jpeg") == "IM-0001"
    assert patient_id("IM-0001-0001-0002.jpeg") == "IM-0001"
    assert patient_id("NORMAL2-IM-1427-0001.jpeg") == "NORMAL2-IM-1427"
    assert patient_id("NORMAL2-IM-1427-0001-0001.jpeg") == "NORMAL2-IM-1427"
    assert patient_id("some/dir/IM-0042-0003.jpeg") == "IM-0042"
    for other in ("scan_0001.png", "00012.jpeg", "", None, "IM-0001.jpeg", "personX_bacteria_1.jpeg"):
        assert patient_id(other) is None


def _kermany_rows(rng: np.random.Generator) -> pd.DataFrame:
    """A manifest of patients with 1-4 images each, in the three forms, NORMAL and PNEUMONIA."""
    rows = []
    for p in range(60):
        n = int(rng.integers(1, 5))
        for k in range(n):
            if p < 20:
                name, label = f"IM-{p:04d}-{k + 1:04d}.jpeg", 0
            elif p < 30:
                name, label = f"NORMAL2-IM-{p:04d}-{k + 1:04d}.jpeg", 0
            else:
                name, label = f"person{p}_{'bacteria' if k % 2 else 'virus'}_{k}.jpeg", 1
            rows.append({"label": label, "source_id": f"train/{len(rows)}:{name}"})
    return pd.DataFrame(rows)


def _patients_by_hand(rows: pd.DataFrame) -> np.ndarray:
    """An independent reading of the patient: drop the trailing image counters of the name."""
    names = [s.split(":", 1)[1] for s in rows.source_id]
    return np.array(
        [re.sub(r"(_(bacteria|virus)_\d+(_\d+)?|(?<=IM-\d{4})(-\d{4})+)\.jpeg$", "", n) for n in names]
    )


def test_validation_split_keeps_each_patient_on_one_side_stratified():
    rows = _kermany_rows(np.random.default_rng(0))
    split = validation_split(rows, 0.2, seed=42)
    patients = _patients_by_hand(rows)
    assert split.unit == "patient"
    assert not set(patients[split.keep]) & set(patients[split.val])
    assert np.array_equal(np.sort(np.concatenate([split.keep, split.val])), np.arange(len(rows)))
    labels = rows.label.to_numpy()
    for cls in (0, 1):
        n_cls, n_val = (labels == cls).sum(), (labels[split.val] == cls).sum()
        assert 1 <= n_val <= round(0.2 * n_cls) + 0.5  # never over the class's share, never empty
    # the straddling count is what the per-image split would have done, counted here by hand
    old_keep, old_val = stratified_split(labels, 0.2, seed=42)
    straddled = len(set(patients[old_keep]) & set(patients[old_val]))
    assert split.straddled_per_image == straddled > 0
    summary = split.summary()
    assert summary["n_patients_keep"] + summary["n_patients_val"] == len(set(patients))
    assert summary["n_images_val"] == len(split.val)
    assert "by patient" in split.describe() and f"split {straddled} patients" in split.describe()
    again = validation_split(rows, 0.2, seed=42)
    assert np.array_equal(again.val, split.val)  # fixed by the seed


def test_names_without_a_patient_split_per_image_and_say_so():
    labels = np.array([0] * 10 + [1] * 30)
    rows = pd.DataFrame({"label": labels, "source_id": [f"train/{i}" for i in range(40)]})
    split = validation_split(rows, 0.1, seed=3)
    keep, val = stratified_split(labels, 0.1, seed=3)
    assert split.unit == "image" and split.straddled_per_image is None
    assert np.array_equal(split.val, val) and np.array_equal(split.keep, keep)
    assert "per image" in split.describe() and "carry no patient" in split.describe()
    assert np.bincount(labels[split.val]).tolist() == [1, 3]


def test_study_protocol_carves_nothing():
    rows = _kermany_rows(np.random.default_rng(1))
    split = validation_split(rows, 0.1, seed=42, carve=False)
    assert split.unit == "none" and len(split.val) == 0 and len(split.keep) == len(rows)
    assert "no validation split" in split.describe()


@pytest.mark.skipif(not MIRROR.is_dir(), reason=f"real mirror absent: {MIRROR}")
def test_straddling_patients_on_the_real_mirror():
    import pyarrow.parquet as pq

    table = pq.read_table(MIRROR / "data" / "train-00000-of-00001.parquet", columns=["image", "label"])
    names = [r["path"] for r in table.column("image").to_pylist()]
    rows = pd.DataFrame(
        {
            "label": table.column("label").to_pylist(),
            "source_id": [f"train/{i}:{n}" for i, n in enumerate(names)],
        }
    )
    split = validation_split(rows, 0.1, seed=42)
    print("mirror:", split.describe())
    patients = _patients_by_hand(rows)
    assert len(set(patients)) == 2846 and split.n_images_without_patient == 0
    assert not set(patients[split.keep]) & set(patients[split.val])
    assert split.straddled_per_image > 0


def _settings(tmp_path, generators: str) -> Settings:
    return Settings.for_profile(
        "demo",
        tmp_path,
        {
            "dreambooth": {"generators": generators},
            "classifier": {"val_fraction": 0.2, "split_seed": 5},
        },
    )


def test_generator_keys_follow_the_settings(tmp_path):
    study, matched = _settings(tmp_path, "study"), _settings(tmp_path, "matched")
    assert generator_keys("study", study.classifier.experiments) == ["normal", "pneumonia"]
    keys = generator_keys("matched", matched.classifier.experiments)
    assert keys == ["normal", "pneumonia", "normal-r10", "pneumonia-r10", "normal-r25", "pneumonia-r25"]
    assert parse_generator_key("pneumonia-r25") == ("pneumonia", 0.25)
    assert parse_generator_key("normal") == ("normal", None)
    assert generator_for("normal", 0.1, "matched") == "normal-r10"
    assert generator_for("normal", 0.0, "matched") == "normal"  # synth-only: the full generator
    assert generator_for("normal", 0.1, "study") == "normal"
    with pytest.raises(ValueError, match="unknown generator key"):
        parse_generator_key("lungs")


def test_dreambooth_images_exclude_validation_and_matched_equal_the_limited_subset(tmp_path):
    rows = _kermany_rows(np.random.default_rng(2))
    labels = rows.label.to_numpy()
    s = _settings(tmp_path, "matched")
    for class_key, label in (("normal", 0), ("pneumonia", 1)):
        full, split = generator_positions(s, rows, class_key)
        assert not set(full) & set(split.val)
        assert np.array_equal(full, split.keep[labels[split.keep] == label])  # all the rest of the class
        # matched: exactly the real images a limited-10 classifier trains on, for every seed
        matched, _ = generator_positions(s, rows, f"{class_key}-r10")
        for seed in (0, 1, 2):
            real, _ = compose_experiment(labels[split.keep], np.zeros(0), 0.1, 0, seed, subset_seed=5)
            chosen = split.keep[real]
            assert np.array_equal(matched, chosen[labels[chosen] == label])
        assert 0 < len(matched) < len(full)


def _kermany_image_folder(root: Path) -> Path:
    """An image folder whose file names carry the patient, as Kermany's do (2 images per patient)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    names = {
        "NORMAL": [f"IM-{p:04d}-{k:04d}.jpeg" for p in range(1, 7) for k in (1, 2)],
        "PNEUMONIA": [f"person{p}_bacteria_{p * 3 + k}.jpeg" for p in range(1, 7) for k in (1, 2)],
    }
    for split, keep in (("train", None), ("validation", 2), ("test", 2)):
        for cls, files in names.items():
            folder = root / split / cls
            folder.mkdir(parents=True)
            for name in files[:keep]:
                pixels = rng.integers(0, 255, (40, 48), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / (name if split == "train" else f"{split}-{name}"))
    return root


def test_dataset_asset_keeps_file_names_and_reports_the_patient_split(tmp_path):
    import json

    import dagster as dg

    from synth_xray_assets.dataset.assets import chest_xray_dataset
    from synth_xray_assets.dataset.store import StandardizedDataset
    from synth_xray_assets.resources import SettingsResource

    source = _kermany_image_folder(tmp_path / "source")
    overrides = {
        "dataset": {"source": str(source), "resolution": 32, "workers": 1},
        "classifier": {"val_fraction": 0.25},
    }
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [chest_xray_dataset],
            instance=instance,
            resources={
                "settings": SettingsResource(
                    data_dir=str(tmp_path / "data"), overrides_json=json.dumps(overrides)
                )
            },
        )
    assert result.success
    rows = StandardizedDataset.open(tmp_path / "data" / "dataset").rows("train")
    assert {patient_id(s.split(":", 1)[1]) for s in rows.source_id} >= {"IM-0001", "person6"}
    md = result.asset_materializations_for_node("chest_xray_dataset")[0].metadata
    # 25% of 12 images per class is 3; whole patients of 2 images give 2 per class (one patient each)
    assert md["validation_split"].value.startswith(
        "by patient: 10 patients / 20 images train, 2 patients / 4"
    )


@pytest.mark.skipif(not MIRROR.is_dir(), reason=f"real mirror absent: {MIRROR}")
def test_the_mirror_parquet_keeps_file_names_through_the_source_loader(tmp_path):
    from synth_xray_assets.dataset.sources import iter_records, load_source, resolve_source

    s = Settings.for_profile("demo", tmp_path, {"dataset": {"source": str(MIRROR)}})
    dsd = load_source(resolve_source(s), s)
    first = [r.source_id for _, r in zip(range(3), iter_records(dsd, "train", s.dataset.class_names))]
    assert all(patient_id(file_name) for file_name in (sid.split(":", 1)[1] for sid in first)), first


def test_matched_generators_partition_every_per_generator_asset(tmp_path):
    from synth_xray_assets.definitions import build_defs

    keys = ["normal", "pneumonia", "normal-r10", "pneumonia-r10", "normal-r25", "pneumonia-r25"]
    d = build_defs(Settings.for_profile("demo", tmp_path, {"dreambooth": {"generators": "matched"}}))
    for name in ("dreambooth_checkpoint", "synthetic_images", "fid_scores", "memorization", "class_fidelity"):
        assert d.resolve_assets_def(name).partitions_def.get_partition_keys() == keys, name
    assert d.resolve_job_def("per_class_job").partitions_def.get_partition_keys() == keys
    assert d.resolve_assets_def("base_model_images").partitions_def.get_partition_keys() == keys[:2]
    checks = d.get_repository_def().asset_checks_defs_by_key
    for key, check in checks.items():
        if key.name in ("checkpoint_loads", "no_blank_samples"):
            assert check.partitions_def.get_partition_keys() == keys, key
    study = build_defs(Settings.for_profile("demo", tmp_path))
    assert study.resolve_assets_def("fid_scores").partitions_def.get_partition_keys() == keys[:2]
