"""The synthetic sets as Hugging Face datasets: the tiny graph end to end, read back with ``datasets``
and trained on; the join by content hash; the licences and the card's YAML header."""

import json
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_overrides_json
from huggingface_hub import DatasetCard
from PIL import Image

from synth_xray_assets.classifier.data import SplitArrays
from synth_xray_assets.classifier.train import TrainRun, train_classifier
from synth_xray_assets.dataset.assets import chest_xray_dataset
from synth_xray_assets.dataset.store import StandardizedDataset
from synth_xray_assets.dreambooth import assets as dreambooth
from synth_xray_assets.evaluation import assets as evaluation
from synth_xray_assets.export.assets import READS_BACK, synthetic_hub_dataset_asset
from synth_xray_assets.export.card import (
    BaseModelFacts,
    CardFacts,
    SourceFacts,
    card_text,
    licences_that_apply,
)
from synth_xray_assets.export.hub import (
    CLASS_SCORE_COLUMNS,
    MEMORIZATION_COLUMNS,
    HubLayout,
    ScoresDoNotMatchError,
    SetProvenance,
    export_table,
    hub_features,
    scores_by_hash,
)
from synth_xray_assets.resources import ComputeResource, SettingsResource
from synth_xray_assets.settings import CLASS_KEYS, ExportSettings, Settings
from synth_xray_assets.synthesis import assets as synthesis
from synth_xray_assets.synthesis.store import SyntheticImages, synthetic_dir

N_IMAGES = 4  # per class: the tiny settings' generation.images_per_class
EVALUATION = {
    "feature_resolution": 32,
    "feature_epochs": 1,
    "batch_size": 16,
    "kid_subsets": 5,
    "kid_subset_size": 3,
    "inception_download": False,
    "memorization_pixel_size": 32,
}
CLASSIFIER = {"batch_size": 8, "num_workers": 0, "pretrained": "none", "val_fraction": 0.25}
# The asset factories read only the partitions and the step tags from it (the study's generators).
DEMO = Settings.for_profile("demo")
PER_GENERATOR = [
    dreambooth.dreambooth_checkpoint_asset(DEMO),
    synthesis.synthetic_images_asset(DEMO),
    synthesis.base_model_images_asset(DEMO),  # per class: the study's generators are the classes
    evaluation.fid_scores_asset(DEMO),
    evaluation.memorization_asset(DEMO),
    evaluation.class_fidelity_asset(DEMO),
    synthetic_hub_dataset_asset(DEMO),
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny demo graph materialized through synthetic_hub_dataset, both classes."""
    data = tmp_path_factory.mktemp("data")
    settings = SettingsResource(
        data_dir=str(data), overrides_json=tiny_overrides_json(evaluation=EVALUATION, classifier=CLASSIFIER)
    )
    resources = {"settings": settings, "compute": ComputeResource(device="cpu")}
    upstream = [
        chest_xray_dataset,
        dreambooth.base_model_asset(DEMO),
        dreambooth.prior_class_images_asset(DEMO),
        evaluation.cxr_feature_extractor_asset(DEMO),
    ]
    with dg.instance_for_test() as instance:
        assert dg.materialize(upstream, instance=instance, resources=resources).success
        results = {
            key: dg.materialize(PER_GENERATOR, instance=instance, resources=resources, partition_key=key)
            for key in CLASS_KEYS
        }
    return settings.get(), results


def test_each_generator_is_written_as_a_hub_dataset_that_reads_back(exported, tmp_path):
    s, results = exported
    for label, key in enumerate(CLASS_KEYS):
        result = results[key]
        assert result.success
        md = result.asset_materializations_for_node("synthetic_hub_dataset")[0].metadata
        folder = Path(md["path"].value)
        assert folder == s.layout.hub_dataset(key) and md["n_images"].value == N_IMAGES
        assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
            "README.md",
            "data/train-00000-of-00001.parquet",
        ]
        check = {c.check_name: c for c in result.get_asset_check_evaluations()}[READS_BACK]
        assert check.passed, check.metadata

        import datasets

        loaded = datasets.load_dataset(
            "parquet", data_dir=str(folder), split="train", cache_dir=str(tmp_path)
        )
        assert loaded.features == hub_features(s.dataset.class_names)
        assert loaded.features["label"].names == ["NORMAL", "PNEUMONIA"]
        assert isinstance(loaded.features["image"], datasets.Image)
        assert loaded["label"] == [label] * N_IMAGES
        _provenance_matches_the_manifest(s, key, loaded)


def _provenance_matches_the_manifest(s: Settings, key: str, loaded) -> None:
    images = SyntheticImages.open(synthetic_dir(s.data_dir, key))
    manifest = images.manifest
    by_hash = {row["synthetic_sha256"]: row for row in loaded.remove_columns("image")}
    assert sorted(by_hash) == sorted(manifest["sha256"])
    class_scores = pd.read_parquet(s.layout.class_fidelity_images(key)).set_index("synthetic_sha256")
    near = pd.read_parquet(s.layout.memorization(key)).set_index("synthetic_sha256")
    fidelity = json.loads(s.layout.class_fidelity(key).read_text())
    for m in manifest.itertuples():
        row = by_hash[m.sha256]
        assert (row["generator"], row["prompt"], row["seed"]) == (key, m.prompt, m.seed)
        assert row["checkpoint_version"] == m.checkpoint_version
        assert (row["num_inference_steps"], row["guidance_scale"]) == (
            m.num_inference_steps,
            m.guidance_scale,
        )
        assert row["sampler"].startswith("DPM-Solver multistep")
        assert row["class_score"] == pytest.approx(class_scores.loc[m.sha256, "class_score"])
        assert row["extractor_sha256"] == fidelity["extractor_sha256"]
        assert row["nearest_real_cosine_distance"] == pytest.approx(near.loc[m.sha256, "cosine_distance"])
        assert row["nearest_real_source_id"] == near.loc[m.sha256, "nearest_real_source_id"]
        assert row["near_copy"] == bool(near.loc[m.sha256, "near_copy"])
    # the class score is the extractor's probability of the generator's class
    prob = class_scores["pneumonia_probability"]
    expected = prob if key == "pneumonia" else 1 - prob
    assert np.allclose(class_scores["class_score"], expected)
    assert fidelity["n_assigned"] == int(class_scores["assigned_to_class"].sum())
    # the image column holds the PNG itself: same pixels as the file on disk
    first = loaded[0]
    png = manifest.set_index("sha256").loc[first["synthetic_sha256"], "file"]
    assert np.array_equal(np.asarray(first["image"].convert("L")), np.asarray(Image.open(images.root / png)))


def test_the_card_has_the_hubs_header_and_says_what_the_images_are_for(exported):
    s, results = exported
    card = DatasetCard.load(s.layout.hub_dataset("normal") / "README.md")
    # the demo: the project's phantoms and a tiny model trained here, so no third-party licence
    assert card.data.license == "other" and card.data.license_name == "no-third-party-licence"
    assert card.data.task_categories == ["image-classification"]
    features = card.data.dataset_info["features"]
    assert [f["name"] for f in features][:2] == ["image", "label"]
    assert features[1]["dtype"]["class_label"]["names"] == {"0": "NORMAL", "1": "PNEUMONIA"}
    text = card.text
    assert "Research only. Not for diagnosis" in text
    assert "the project's phantoms (not patients)" in text
    assert f"{N_IMAGES} generated images, all labelled NORMAL" in text
    assert "Against held-out real images" in text and "KID (mean ± std)" in text
    record = json.loads(s.layout.fid_scores("normal").read_text())
    synthetic = record["held_out"]["spaces"]["cxr"]["scores"]["synthetic"]
    assert f"| cxr | synthetic | {synthetic['n_images']} | {synthetic['kid_mean']:.4f}" in text
    assert "near-copies of a real training image" in text
    assert "hf upload <user>/synthetic-chest-xray-normal" in text and "Nothing has been pushed" in text


def test_one_classifier_epoch_trains_on_the_exported_sets(exported, tmp_path):
    import datasets

    s, _ = exported
    root = s.layout.hub_dataset("normal").parent  # every generator's folder
    both = datasets.load_dataset("parquet", data_dir=str(root), split="train", cache_dir=str(tmp_path / "hf"))
    assert sorted(both["label"]) == [0] * N_IMAGES + [1] * N_IMAGES
    images = torch.from_numpy(np.stack([np.asarray(im.convert("L")) for im in both["image"]]))
    real = StandardizedDataset.open(s.layout.dataset)
    data = SplitArrays(
        images,
        np.asarray(both["label"], np.int64),
        torch.from_numpy(real.images("validation").copy()),
        real.labels("validation"),
        torch.from_numpy(real.images("test").copy()),
        real.labels("test"),
    )
    result = train_classifier(
        data,
        s.classifier.model_copy(update={"epochs": 1, "resolution": 32, "resize": 36}),
        TrainRun(0, "cpu", tmp_path / "run", lambda m: None, experiment="synthetic-only"),
    )
    assert result.epochs == 1 and len(result.history) == 1
    assert result.n_train == 2 * N_IMAGES and result.n_train_per_class == [N_IMAGES, N_IMAGES]
    assert np.isfinite(result.history[0]["train_loss"])
    assert len(result.test_prob_last) == len(real.labels("test"))


# --------------------------------------------------------------------------- the join and the licences

PROVENANCE = SetProvenance("normal", "DreamBooth, full fine-tune", "base", "DPM-Solver multistep", "abc")


def _manifest(hashes: list[str]) -> pd.DataFrame:
    n = len(hashes)
    return pd.DataFrame(
        {
            "file": [f"images/{i:05d}.png" for i in range(n)],
            "sha256": hashes,
            "seed": range(100, 100 + n),
            "prompt": "p",
            "checkpoint_version": "v1",
            "num_inference_steps": 2,
            "guidance_scale": 4.0,
            "resolution": 32,
        }
    )


def _scores(hashes: list[str], values: list[float]) -> pd.DataFrame:
    table = pd.DataFrame({"synthetic_sha256": hashes, "class_score": values})
    return scores_by_hash(table, CLASS_SCORE_COLUMNS, "class_fidelity[normal]")


def _nearest(hashes: list[str]) -> tuple[str, pd.DataFrame]:
    """A memorization table of ``hashes``: image i's nearest real image is ``real-{i}``."""
    n = len(hashes)
    table = pd.DataFrame(
        {
            "synthetic_sha256": hashes,
            "cosine_distance": np.arange(n) / 10,
            "nearest_real_source_id": [f"real-{i}" for i in range(n)],
            "pixel_correlation": 0.5,
            "nearest_real_source_id_pixel": "real-0",
            "near_copy": False,
        }
    )
    return "memorization[normal]", scores_by_hash(table, MEMORIZATION_COLUMNS, "memorization[normal]")


def test_scores_are_joined_by_content_hash_not_position():
    manifest = _manifest(["h0", "h1", "h2"])
    scores = [
        ("class_fidelity[normal]", _scores(["h2", "h0", "h1"], [0.2, 0.0, 0.1])),
        _nearest(["h1", "h2", "h0"]),
    ]
    table = export_table(manifest, scores, PROVENANCE, 0)
    assert list(table["synthetic_sha256"]) == ["h0", "h1", "h2"]  # the manifest's order
    assert list(table["class_score"]) == [0.0, 0.1, 0.2]
    assert list(table["nearest_real_source_id"]) == ["real-2", "real-0", "real-1"]
    assert list(table["nearest_real_cosine_distance"]) == [0.2, 0.0, 0.1]
    assert list(table["seed"]) == [100, 101, 102] and set(table["label"]) == {0}


@pytest.mark.parametrize(
    "scored, message",
    [
        (["h0", "h1"], "does not score 1 of the 3 synthetic images"),
        (["h0", "h1", "h2", "old"], "scores 1 images that are not in the synthetic set"),
    ],
)
def test_scores_of_another_set_are_refused(scored, message):
    scores = _scores(scored, [0.5] * len(scored))
    with pytest.raises(ScoresDoNotMatchError, match=message):
        export_table(_manifest(["h0", "h1", "h2"]), [("class_fidelity[normal]", scores)], PROVENANCE, 0)
    with pytest.raises(ScoresDoNotMatchError, match="keeps no per-image synthetic_sha256"):
        scores_by_hash(pd.DataFrame({"class_score": [0.1]}), CLASS_SCORE_COLUMNS, "class_fidelity[normal]")


def test_the_sources_and_the_base_models_licences_apply_to_real_images_and_sd21():
    export = ExportSettings()
    hub = SourceFacts(
        {"kind": "hub", "location": "hf-vision/chest-xray-pneumonia", "phantoms": False}, "v", "K"
    )
    sd21 = BaseModelFacts("Manojb/stable-diffusion-2-1-base at revision main", tiny=False)
    assert licences_that_apply(hub, sd21, export).ids == ("cc-by-4.0", "openrail++")
    phantoms = SourceFacts({"kind": "parquet", "location": "/x", "phantoms": True}, "v", "K")
    tiny = BaseModelFacts("tiny", tiny=True)
    assert licences_that_apply(phantoms, sd21, export).ids == ("openrail++",)
    assert licences_that_apply(hub, tiny, export).ids == ("cc-by-4.0",)  # a real source under the demo
    assert licences_that_apply(phantoms, tiny, export).ids == ()

    facts = CardFacts(
        generator="pneumonia",
        class_name="PNEUMONIA",
        n_images=1200,
        licences=licences_that_apply(hub, sd21, export),
        source=hub,
        made=["made"],
        quality="q",
        fidelity="f",
        memorization="m",
        layout=HubLayout("train", 1000, ("NORMAL", "PNEUMONIA")),
        repo_id="me/x",
    )
    card = DatasetCard(card_text(facts))
    assert card.data.license == ["cc-by-4.0", "openrail++"]
    assert card.data.source_datasets == ["hf-vision/chest-xray-pneumonia"]
    assert card.data.size_categories == ["1K<n<10K"]
    assert "CreativeML Open RAIL++-M" in card.text and "CC BY 4.0" in card.text
    assert "`data/train-00000-of-00002.parquet`, `data/train-00001-of-00002.parquet`" in card.text
