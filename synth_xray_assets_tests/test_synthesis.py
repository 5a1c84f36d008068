"""Synthetic images: seeded, deterministic, resumable; and the DreamBooth -> images chain as assets."""

import dagster as dg
import numpy as np
from conftest import tiny_overrides_json
from PIL import Image

from synth_xray_assets.dataset import assets as dataset_assets
from synth_xray_assets.dataset.store import StandardizedDataset
from synth_xray_assets.diffusion.generate import Recipe, generate_set
from synth_xray_assets.diffusion.pipelines import load_pipeline
from synth_xray_assets.dreambooth import assets as dreambooth_assets
from synth_xray_assets.dreambooth import store as models
from synth_xray_assets.partitions import class_partitions
from synth_xray_assets.resources import ComputeResource, SettingsResource
from synth_xray_assets.settings import Settings
from synth_xray_assets.synthesis import assets as synthesis_assets
from synth_xray_assets.synthesis.store import SyntheticImages, synthetic_dir

PROMPT = "A chest xray of healthy normal lungs, clear lung fields"
# The asset factories read only the partitions and the step tags from it (the study's generators).
DEMO = Settings.for_profile("demo")


def make(base, out, count=5, batch_size=2, version="v1", **kw):
    calls = []

    def make_pipe(device):
        calls.append(1)
        return load_pipeline(base, device)

    report = generate_set(
        make_pipe,
        out,
        count,
        Recipe(
            PROMPT,
            num_inference_steps=2,
            guidance_scale=4.0,
            resolution=32,
            extra_columns={"class_key": "normal", "label": 0, "checkpoint_version": version},
            **kw,
        ),
        batch_size=batch_size,
        log=lambda m: None,
    )
    return report, calls


def test_same_seed_same_image_in_any_batch(tiny_base_model, tmp_path):
    a, _ = make(tiny_base_model, tmp_path / "a", count=4, batch_size=4)
    b, _ = make(tiny_base_model, tmp_path / "b", count=4, batch_size=1)
    assert list(a.manifest.sha256) == list(b.manifest.sha256)
    assert list(a.manifest.seed) == [0, 1, 2, 3]
    imgs = SyntheticImages.open(tmp_path / "a").images()
    assert imgs.shape == (4, 32, 32) and imgs.dtype == np.uint8
    assert len({img.tobytes() for img in imgs}) == 4  # different seeds, different images


def test_rerun_makes_only_missing_images(tiny_base_model, tmp_path):
    out = tmp_path / "set"
    first, _ = make(tiny_base_model, out)
    assert first.generated == [0, 1, 2, 3, 4]
    (out / "images/00001.png").unlink()
    (out / "images/00003.png").write_bytes(b"truncated")  # a corrupt file is remade too
    kept = (out / "images/00002.png").stat().st_mtime_ns
    again, _ = make(tiny_base_model, out)
    assert again.generated == [1, 3] and again.reused == 3
    assert (out / "images/00002.png").stat().st_mtime_ns == kept
    assert list(again.manifest.sha256) == list(first.manifest.sha256)  # remade identically
    done, calls = make(tiny_base_model, out)
    assert done.generated == [] and calls == []  # nothing left: the model is not even loaded


def test_new_checkpoint_remakes_everything(tiny_base_model, tmp_path):
    out = tmp_path / "set"
    make(tiny_base_model, out, count=2)
    again, _ = make(tiny_base_model, out, count=2, version="v2")
    assert again.generated == [0, 1]
    assert set(again.manifest.checkpoint_version) == {"v2"}


def test_dreambooth_chain_materializes_as_assets(tmp_path):
    """Dataset -> tiny base model -> prior images -> DreamBooth[normal] -> synthetic_images[normal]."""
    resources = {
        "settings": SettingsResource(data_dir=str(tmp_path / "data"), overrides_json=tiny_overrides_json()),
        "compute": ComputeResource(),
    }
    assets = [
        dataset_assets.chest_xray_dataset,
        dreambooth_assets.base_model_asset(DEMO),
        dreambooth_assets.prior_class_images_asset(DEMO),
    ]
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(assets, resources=resources, instance=instance)
    assert result.success
    prior = result.asset_materializations_for_node("prior_class_images")[0].metadata
    assert prior["num_images"].value == 4 and prior["made_this_run"].value == 4

    per_class = [
        dreambooth_assets.dreambooth_checkpoint_asset(DEMO),
        dreambooth_assets.checkpoint_loads_check(class_partitions),
        synthesis_assets.synthetic_images_asset(DEMO),
        synthesis_assets.no_blank_samples_check(class_partitions),
    ]
    result = dg.materialize(per_class, resources=resources, partition_key="normal", instance=instance)
    assert result.success
    meta = result.asset_materializations_for_node("dreambooth_checkpoint")[0].metadata
    assert meta["steps"].value == 3 and meta["method"].value == "full"
    # DreamBooth never sees the classifiers' validation split: 6 NORMAL in train, 1 carved off (10%)
    assert meta["num_instance_images"].value == 5
    assert "less the classifiers' validation split" in meta["instance_images"].value
    assert np.isfinite(meta["final_loss"].value)
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert checks["checkpoint_loads"].passed
    assert set(checks) == {"checkpoint_loads", "no_blank_samples"}
    images = SyntheticImages.open(synthetic_dir(tmp_path / "data", "normal"))
    assert len(images) == 4
    synth_meta = result.asset_materializations_for_node("synthetic_images")[0].metadata
    grid_md = synth_meta["samples (top) and real training images of the class (bottom)"].value
    assert grid_md.startswith("![synthetic normal above real normal](data:image/png;base64,")
    grid = synthesis_assets.samples_beside_real(
        images,
        SettingsResource(data_dir=str(tmp_path / "data"), overrides_json=tiny_overrides_json()).get(),
        "normal",
    )
    # 4 synthetic images padded to one row of 8, then one row of real NORMAL training images.
    assert grid.size == (8 * 96, 2 * 96)
    real = StandardizedDataset.open(tmp_path / "data" / "dataset").images("train", 0)[0]
    cell = np.asarray(grid.convert("L").crop((0, 96, 96, 192)), dtype=float)
    resized = np.asarray(Image.fromarray(real).resize((96, 96), Image.Resampling.BILINEAR), dtype=float)
    assert np.abs(cell - resized).mean() < 2.0  # the first real NORMAL image opens the bottom row
    assert set(images.manifest.class_key) == {"normal"}
    assert (models.checkpoint_dir(tmp_path / "data", "normal") / "model_index.json").is_file()


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    resources = {
        "settings": SettingsResource(data_dir=str(tmp_path / "data"), overrides_json=tiny_overrides_json()),
        "compute": ComputeResource(),
    }
    result = dg.materialize(
        [synthesis_assets.synthetic_images_asset(DEMO)],
        resources=resources,
        partition_key="pneumonia",
        raise_on_error=False,
    )
    assert not result.success
    errors = [str(e.step_failure_data.error) for e in result.all_events if e.is_step_failure]
    assert errors and "no DreamBooth checkpoint for 'pneumonia'" in errors[0]


def test_synthetic_counts_follow_the_real_training_set(tmp_path):
    """The study's counts (1200 per class; Synth-25/50/100 = 600/1200/2400 beside 5,216 real) scale
    with the dataset's real training split, rounded up; study_train_size None keeps them as written."""
    full = Settings.for_profile("full", tmp_path)
    assert [full.synthetic_count(n, 5216) for n in (600, 1200, 2400)] == [600, 1200, 2400]
    demo = Settings.for_profile("demo", tmp_path)
    counts = {e: demo.synthetic_count(n, 248) for e, (_, n) in demo.classifier.experiments.items()}
    assert counts["synth-25"] == 29 and counts["synth-50"] == 58 and counts["synth-100"] == 115
    per_class = demo.synthetic_count(demo.generation.images_per_class, 248)
    assert per_class == 58 and 2 * per_class >= max(counts.values())  # enough for every experiment
    mirror = 4694  # the real 224-px mirror's training images
    assert demo.synthetic_count(2400, mirror) == 2160
    absolute = Settings.for_profile("demo", tmp_path, {"generation": {"study_train_size": None}})
    assert absolute.synthetic_count(2400, 248) == 2400
