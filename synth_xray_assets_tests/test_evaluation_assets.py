"""End to end on tiny data: chest_xray_dataset -> cxr_feature_extractor, base_model_images ->
fid_scores + memorization.

The synthetic images are written here in the ``SyntheticImages`` layout (the DreamBooth and
generation assets are not run): "fine-tuned" images are lightly altered real training images, one
of them an exact copy (the memorization check must warn). The "base model" images are made by
``base_model_images`` with a random, untrained tiny Stable Diffusion: smooth noise, unlike any
radiograph.
"""

import json
import math
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from synth_xray_assets.dataset.assets import chest_xray_dataset
from synth_xray_assets.dataset.splits import shared_validation_split
from synth_xray_assets.dataset.store import StandardizedDataset
from synth_xray_assets.dreambooth.store import base_model_record
from synth_xray_assets.evaluation import assets as evaluation
from synth_xray_assets.evaluation.extractor import extractor_weights
from synth_xray_assets.evaluation.inputs import base_model_set, held_out_reference
from synth_xray_assets.resources import ComputeResource, SettingsResource
from synth_xray_assets.settings import Settings
from synth_xray_assets.storage import write_json_atomic
from synth_xray_assets.synthesis import assets as synthesis
from synth_xray_assets.synthesis.store import MANIFEST, MANIFEST_COLUMNS, synthetic_dir

N_SYNTHETIC = 8
# The asset factories read only the partitions and the step tags from it (the study's generators).
DEMO = Settings.for_profile("demo")
OVERRIDES = {
    "phantoms": {
        "split_counts": {"train": (12, 12), "validation": (2, 2), "test": (2, 2)},
        "min_side": 40,
        "max_side": 80,
        "held_out_counts": (10, 10),  # the held-out FID / KID reference
    },
    "dataset": {"resolution": 32, "workers": 1},
    "dreambooth": {"resolution": 32},
    "generation": {
        "images_per_class": N_SYNTHETIC,
        "study_train_size": None,
        "num_inference_steps": 2,
        "batch_size": 8,
    },
    # 25% of each class validates (3 of 12): the held-out reference when no phantoms are made for it
    "classifier": {"batch_size": 8, "num_workers": 0, "pretrained": "none", "val_fraction": 0.25},
    "evaluation": {
        "feature_resolution": 32,
        "feature_epochs": 1,
        "batch_size": 16,
        "kid_subsets": 10,
        "kid_subset_size": 8,
        "inception_download": False,
        "memorization_pixel_size": 32,
    },
}


def write_image_set(root: Path, images: np.ndarray, class_key: str, version: str) -> None:
    """Images in the layout ``SyntheticImages`` reads (PNGs + manifest.parquet)."""
    (root / "images").mkdir(parents=True)
    rows = []
    for i, img in enumerate(images):
        file = f"images/{i:05d}.png"
        Image.fromarray(img, mode="L").save(root / file)
        rows.append([i, file, class_key, 0, i, "a prompt", version, ""])
    pd.DataFrame(rows, columns=MANIFEST_COLUMNS).to_parquet(root / MANIFEST, index=False)


@pytest.fixture(scope="module")
def materialized(tmp_path_factory, tiny_base_model):
    data = tmp_path_factory.mktemp("data")
    # the base model's images are made by a (random, untrained) tiny Stable Diffusion
    write_json_atomic(base_model_record(data), {"path": str(tiny_base_model), "version": "base-v1"})
    resources = {
        "settings": SettingsResource(data_dir=str(data), overrides_json=json.dumps(OVERRIDES)),
        "compute": ComputeResource(device="cpu"),
    }
    with dg.instance_for_test() as instance:
        upstream = dg.materialize(
            [chest_xray_dataset, evaluation.cxr_feature_extractor_asset(DEMO)],
            instance=instance,
            resources=resources,
        )
        real = StandardizedDataset.open(data / "dataset").images("train", 0)
        rng = np.random.default_rng(0)
        synthetic = np.clip(real[:N_SYNTHETIC] + rng.normal(0, 6, (N_SYNTHETIC, 32, 32)), 0, 255)
        synthetic = synthetic.astype(np.uint8)
        synthetic[2] = real[7]  # a planted copy of a training image
        write_image_set(synthetic_dir(data, "normal"), synthetic, "normal", "ckpt-v1")
        downstream = dg.materialize(
            [
                synthesis.base_model_images_asset(DEMO),  # made by the tiny base model
                evaluation.fid_scores_asset(DEMO),
                evaluation.memorization_asset(DEMO),
                evaluation.class_fidelity_asset(DEMO),
            ],
            instance=instance,
            resources=resources,
            partition_key="normal",
        )
        failures = {}
        for case in ("missing", "unreadable"):
            if case == "unreadable":  # a manifest whose PNG is not an image
                write_image_set(synthetic_dir(data, "pneumonia"), synthetic[:1], "pneumonia", "ckpt-v1")
                (synthetic_dir(data, "pneumonia") / "images" / "00000.png").write_bytes(b"not a png")
            result = dg.materialize(
                [evaluation.fid_scores_asset(DEMO)],
                instance=instance,
                resources=resources,
                partition_key="pneumonia",
                raise_on_error=False,
            )
            assert not result.success
            failure = next(e for e in result.all_events if e.is_step_failure)
            failures[case] = str(failure.step_failure_data.error)
    return data, upstream, downstream, failures


def test_feature_extractor_is_trained_on_real_train_images_and_saved(materialized):
    data, upstream, _, _ = materialized
    assert upstream.success
    md = upstream.asset_materializations_for_node("cxr_feature_extractor")[0].metadata
    assert Path(md["path"].value) == extractor_weights(data) and extractor_weights(data).is_file()
    assert md["path"].value.endswith(".safetensors")
    # 24 real train images less the classifiers' validation split (25% of each class: 3 + 3).
    assert "validation split, real images only: 18 (NORMAL 9, PNEUMONIA 9)" in md["training_set"].value
    assert "6 images" in md["selected_epoch"].value
    assert "per image (the file names carry no patient)" in md["validation_split"].value
    assert 0.0 <= md["validation_accuracy"].value <= 1.0
    assert md["feature_resolution"].value == 32


def test_fid_scores_in_the_chest_xray_space_beside_an_unavailable_inception(materialized):
    data, _, downstream, _ = materialized
    assert downstream.success
    md = downstream.asset_materializations_for_node("fid_scores")[0].metadata
    assert md["n_synthetic"].value == N_SYNTHETIC and md["n_base_model"].value == N_SYNTHETIC
    # the generator's own training images: 12 NORMAL less the 3 that validate
    assert md["n_reference"].value == 9
    assert "generator normal's own 9 NORMAL training images" in md["reference_set"].value
    assert md["checkpoint_version"].value == "ckpt-v1"
    # held out: the 10 phantoms made for the reference; floor: 8 real NORMAL training images
    assert md["n_held_out_reference"].value == 10
    assert "10 held-out NORMAL phantoms made for the reference alone" in md["held_out_reference_set"].value
    assert "8 real normal training images outside the held-out set" in md["real_floor_set"].value
    # KID leads the metadata, with its spread, subset size and n for each of the three sets
    assert list(md)[:2] == ["kid_held_out", "scores_held_out"]
    kid = md["kid_held_out"].value
    for name, key in (("synthetic", ""), ("base_model", "_base_model"), ("real_floor", "_real_floor")):
        assert f"{name} {md[f'kid_cxr{key}_held_out'].value:.4f} ± " in kid
    assert "(subsets of 8, n 8 vs 10)" in kid and "Fine-tuning moved the images: **toward real**" in kid
    assert "inception**: unavailable" in kid
    held = {(r.data["space"], r.data["images"]): r.data for r in md["scores_held_out"].value.records}
    floor = held[("cxr", "real_floor")]
    assert (floor["n"], floor["n_reference"], floor["kid_subset_size"]) == (8, 10, 8)
    assert floor["kid_std"] == pytest.approx(md["kid_std_cxr_real_floor_held_out"].value)
    # below 1024 images FID is biased: marked so, in the table and in its own flag
    assert floor["fid_reading"].startswith("biased (n < 1024)") and md["fid_cxr_held_out_biased"].value
    assert md["fid_min_images"].value == {"cxr": 1024, "inception": 2048}
    assert "2 DPM-Solver steps, guidance 4.0" in md["base_model_images"].value  # the fine-tuned sampler
    assert md["base_model_images"].value.startswith("base_model_images[normal]: 8 base-model images")
    made = downstream.asset_materializations_for_node("base_model_images")[0].metadata
    assert made["num_images"].value == N_SYNTHETIC and made["made_this_run"].value == N_SYNTHETIC
    assert md["base_model_version"].value == made["base_model_version"].value  # from the set's manifest
    grid = made["samples (top) and real training images of the class (bottom)"].value
    assert grid.startswith("![base model normal above real normal](data:image/png;base64,")
    for key in ("fid_cxr", "kid_cxr", "precision_cxr", "fid_cxr_base_model"):
        assert math.isfinite(md[key].value), key
    for key in ("fid_cxr_held_out", "fid_cxr_real_floor_held_out", "fid_cxr_base_model_held_out"):
        assert math.isfinite(md[key].value), key
    # the floor is real images against real images: below the untrained base model's noise
    assert md["fid_cxr_real_floor_held_out"].value < md["fid_cxr_base_model_held_out"].value
    assert md["fid_cxr"].value < md["fid_cxr_base_model"].value
    assert "disabled" in md["inception_unavailable"].value
    assert "fid_inception" not in md
    assert md["published_fid_inception"].value == 61.88
    # The scores table: numbers typed as numbers (so the UI shows them in their cells).
    scores = md["scores"]
    assert isinstance(scores, dg.TableMetadataValue)
    assert {c.name: c.type for c in scores.schema.columns}["fid"] == "float"
    rows = {(r.data["space"], r.data["images"]): r.data for r in scores.records}
    assert rows[("cxr", "synthetic")]["fid"] == pytest.approx(md["fid_cxr"].value)
    assert rows[("cxr", "synthetic")]["n"] == N_SYNTHETIC
    assert rows[("inception", "unavailable: " + md["inception_unavailable"].value)]["fid"] is None
    record = json.loads(Path(md["path"].value).read_text())
    assert record["spaces"]["inception"]["available"] is False
    assert record["spaces"]["cxr"]["scores"]["synthetic"]["n_images"] == N_SYNTHETIC
    assert record["held_out"]["spaces"]["cxr"]["scores"]["real_floor"]["n_images"] == 8
    assert record["held_out"]["spaces"]["cxr"]["scores"]["real_floor"]["n_reference"] == 10
    assert record["held_out"]["spaces"]["cxr"]["scores"]["real_floor"]["fid_biased"] is True
    comparison = record["held_out"]["kid_comparison"]["cxr"]
    assert comparison["verdict"] == "toward real" and comparison["difference"] > comparison["spread"] > 0
    base_manifest = pd.read_parquet(data / "evaluation" / "base_model_images" / "normal" / MANIFEST)
    assert set(base_manifest.num_inference_steps) == {2} and set(base_manifest.guidance_scale) == {4.0}

    checks = {c.check_name: c for c in downstream.get_asset_check_evaluations()}
    assert checks["scores_are_finite"].passed
    assert checks["every_synthetic_image_scored"].passed
    closer = checks["closer_to_real_than_base_model"]
    assert closer.passed and closer.metadata["cxr_verdict"].value == "toward real"
    assert closer.metadata["cxr_kid_base_model"].value.endswith("(subsets of 8, n 8 vs 10)")


def test_without_held_out_phantoms_the_reference_is_the_carved_validation_split(materialized):
    data = materialized[0]
    carved = {**OVERRIDES, "phantoms": {**OVERRIDES["phantoms"], "held_out_counts": (0, 0)}}
    s = Settings.for_profile("demo", data, carved)
    ds = StandardizedDataset.open(s.layout.dataset)
    split = shared_validation_split(s, ds.rows("train"))
    images, note = held_out_reference(s, ds, 0, split)
    assert len(images) == 3 and "classifiers' validation split" in note  # 25% of 12 NORMAL
    train = {img.tobytes() for img in ds.images("train", 0)}
    assert {img.tobytes() for img in images} <= train  # carved from real train
    phantoms = held_out_reference(Settings.for_profile("demo", data, OVERRIDES), ds, 0, split)[0]
    assert len(phantoms) == 10 and not {img.tobytes() for img in phantoms} & train


def test_memorization_warns_about_the_planted_copy(materialized):
    data, _, downstream, _ = materialized
    md = downstream.asset_materializations_for_node("memorization")[0].metadata
    assert md["n_synthetic"].value == N_SYNTHETIC and md["n_near_copies"].value >= 1
    assert md["distribution"].value.startswith("![") and "base64" in md["closest_pairs_features"].value
    table = pd.read_parquet(md["path"].value)
    planted = table.loc[table.synthetic_index == 2].iloc[0]
    assert planted.near_copy and planted.nearest_real_index == 7 and planted.cosine_distance < 1e-4
    check = {c.check_name: c for c in downstream.get_asset_check_evaluations()}["no_memorized_images"]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    near = check.metadata["near_copies"]
    assert isinstance(near, dg.TableMetadataValue)
    assert "images/00002.png" in [r.data["synthetic_file"] for r in near.records]


def test_a_missing_or_unreadable_synthetic_set_is_a_clear_error_naming_it(materialized):
    _, _, _, failures = materialized
    assert "materialize synthetic_images[pneumonia] first" in failures["missing"]
    assert "could not read synthetic_images[pneumonia]" in failures["unreadable"]


def test_fid_scores_without_base_model_images_names_the_asset_to_materialize(materialized):
    data = materialized[0]
    s = Settings.for_profile("demo", data, OVERRIDES)
    with pytest.raises(FileNotFoundError, match=r"materialize base_model_images\[pneumonia\] first"):
        base_model_set(s, "pneumonia-r10")  # a matched generator reads its class's set


def test_class_fidelity_is_recorded_with_its_interval_and_check(materialized):
    data, _, downstream, _ = materialized
    md = downstream.asset_materializations_for_node("class_fidelity")[0].metadata
    record = json.loads(Path(md["path"].value).read_text())
    assert record["n_images"] == N_SYNTHETIC and record["generator"] == "normal"
    assert record["share"] == pytest.approx(record["n_assigned"] / N_SYNTHETIC)
    assert record["ci_low"] <= record["share"] <= record["ci_high"]
    check = {c.check_name: c for c in downstream.get_asset_check_evaluations()}[evaluation.FIDELITY_CHECK]
    assert check.severity == dg.AssetCheckSeverity.WARN
    assert check.passed == (record["share"] >= record["threshold"])
