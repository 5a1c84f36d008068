"""The classifier domain: composition, honest selection, metrics, resume, and the asset."""

import dataclasses
import json
import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import torch
import torchvision.transforms.functional as TF
from conftest import TINY_CLASSIFIER
from PIL import Image

from synth_xray_assets.classifier import assets as classifier_assets
from synth_xray_assets.classifier.data import (
    EpochBatchSampler,
    SplitArrays,
    augment_batch,
    compose_experiment,
    load_experiment_data,
    normalize_batch,
    prepare_images,
)
from synth_xray_assets.classifier.experiment import RUN_FILE, load_run, run_dir
from synth_xray_assets.classifier.model import build_densenet121, load_classifier
from synth_xray_assets.classifier.stats import (
    Bootstrap,
    binary_metrics,
    bootstrap_ci,
    mcnemar_exact,
    metric_value,
    paired_bootstrap_diff,
    roc_auc,
)
from synth_xray_assets.classifier.train import STATE_FILE, TrainRun, predict_proba, train_classifier
from synth_xray_assets.dataset import assets as dataset_assets
from synth_xray_assets.dataset.splits import class_count, generator_positions, stratified_split
from synth_xray_assets.dataset.store import StandardizedDataset
from synth_xray_assets.resources import ComputeResource, SettingsResource
from synth_xray_assets.settings import ClassifierSettings, Settings
from synth_xray_assets.storage import sha256_file
from synth_xray_assets.synthesis.store import MANIFEST_COLUMNS, SyntheticImages, synthetic_dir

# A dataset small enough to train on in seconds: 20 NORMAL / 40 PNEUMONIA in train.
TINY = {
    "phantoms": {
        "split_counts": {"train": [20, 40], "validation": [2, 2], "test": [6, 10]},
        "min_side": 40,
        "max_side": 80,
    },
    "dataset": {"resolution": 40, "workers": 1},
    "generation": {"study_train_size": None},  # the counts below as written
    "classifier": {
        **TINY_CLASSIFIER,
        "bootstrap_samples": 50,
        # The demo's experiment names (the partitions), with counts that fit 8 synthetic per class.
        "experiments": {
            "baseline": [1.0, 0],
            "synth-25": [1.0, 4],
            "synth-50": [1.0, 8],
            "synth-100": [1.0, 16],
            "limited-10": [0.1, 16],
            "limited-25": [0.25, 16],
            "synth-only": [0.0, 16],
        },
    },
}
SYNTH_PER_CLASS = 8


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: on a small shared CPU, threads that wait on each other cost 10x or more."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_fake_synthetic(data_dir: Path, class_key: str, images: np.ndarray, generator: str = "") -> Path:
    """PNGs + manifest.parquet in the ``SyntheticImages`` layout (what ``synthetic_images`` writes)."""
    root = synthetic_dir(data_dir, generator or class_key)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, img in enumerate(images):
        file = f"images/{i:05d}.png"
        Image.fromarray(img).save(root / file)
        rows.append(
            {
                "index": i,
                "file": file,
                "class_key": class_key,
                "label": ("normal", "pneumonia").index(class_key),
                "seed": i,
                "prompt": f"fake {class_key}",
                "checkpoint_version": "fake",
                "sha256": sha256_file(root / file),
            }
        )
    pd.DataFrame(rows, columns=MANIFEST_COLUMNS).to_parquet(root / "manifest.parquet", index=False)
    return root


def materialize_tiny_dataset(data_dir: Path, overrides: dict) -> None:
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [dataset_assets.chest_xray_dataset],
            instance=instance,
            resources={
                "settings": SettingsResource(data_dir=str(data_dir), overrides_json=json.dumps(overrides))
            },
        )
    assert result.success


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Settings:
    """The tiny phantom dataset, built by the dataset asset, plus fake synthetic images (64 px)."""
    data_dir = tmp_path_factory.mktemp("clf") / "data"
    materialize_tiny_dataset(data_dir, TINY)
    rng = np.random.default_rng(0)
    for label, key in enumerate(("normal", "pneumonia")):
        # Pneumonia-like synthetic images are brighter; 64 px, unlike the real 40 px images.
        fake = rng.integers(40 + 80 * label, 120 + 80 * label, (SYNTH_PER_CLASS, 64, 64), dtype=np.uint8)
        write_fake_synthetic(data_dir, key, fake)
    return Settings.for_profile("demo", data_dir, TINY)


# --- composition -----------------------------------------------------------------------------


def test_study_counts_and_rounding():
    # 10% and 25% of the study's 1341 / 3875 give its 522 and 1304 images
    assert class_count(1341, 0.1) + class_count(3875, 0.1) == 522
    assert class_count(1341, 0.25) + class_count(3875, 0.25) == 1304
    assert class_count(5, 0.0) == 0 and class_count(5, 1.0) == 5


def test_stratified_validation_split():
    labels = np.array([0] * 100 + [1] * 300)
    keep, val = stratified_split(labels, 0.1, seed=42)
    assert np.bincount(labels[val]).tolist() == [10, 30]
    assert len(np.intersect1d(keep, val)) == 0 and len(keep) + len(val) == 400
    again, _ = stratified_split(labels, 0.1, seed=42)
    other, _ = stratified_split(labels, 0.1, seed=43)
    assert np.array_equal(keep, again) and not np.array_equal(keep, other)


def test_composition_is_stratified_balanced_seeded_and_nested():
    real = np.array([0] * 90 + [1] * 270)
    synth = np.array([0] * 40 + [1] * 40)
    r10, s_small = compose_experiment(real, synth, 0.1, 10, seed=3)
    r25, s_big = compose_experiment(real, synth, 0.25, 30, seed=3)
    assert np.bincount(real[r10]).tolist() == [9, 27]
    assert np.bincount(real[r25]).tolist() == [23, 68]  # 22.5 and 67.5 rounded half up
    assert np.bincount(synth[s_small]).tolist() == [5, 5] and np.bincount(synth[s_big]).tolist() == [15, 15]
    assert set(r10) <= set(r25) and set(s_small) <= set(s_big)  # smaller subsets inside larger ones
    _, s_odd = compose_experiment(real, synth, 1.0, 7, seed=3)
    assert np.bincount(synth[s_odd]).tolist() == [3, 4]
    r_other, s_other = compose_experiment(real, synth, 0.25, 30, seed=4)
    assert not np.array_equal(r25, r_other) and not np.array_equal(s_big, s_other)
    full, none = compose_experiment(real, synth, 1.0, 0, seed=3)
    assert np.array_equal(full, np.arange(360)) and len(none) == 0
    with pytest.raises(ValueError, match="needs 41 synthetic NORMAL"):
        compose_experiment(real, synth, 1.0, 82, seed=3)


def test_every_experiment_composition_from_the_stores(tiny):
    ds = StandardizedDataset.open(tiny.data_dir / "dataset")
    train_ids = set(ds.rows("train").sha256)
    test_ids = set(ds.rows("test").sha256)
    # val: 20% of 20 / 40 real train; pool 16 / 32
    expected = {
        "baseline": (16, 32, 0),
        "synth-25": (16, 32, 4),
        "synth-50": (16, 32, 8),
        "synth-100": (16, 32, 16),
        "limited-10": (2, 3, 16),
        "limited-25": (4, 8, 16),
        "synth-only": (0, 0, 16),
    }
    vals = []
    for seed in (0, 1):
        for name, (n_normal, n_pneu, n_synth) in expected.items():
            d = load_experiment_data(tiny, name, seed, log=lambda m: None)
            c = d.counts()
            assert (c["train_real_normal"], c["train_real_pneumonia"]) == (n_normal, n_pneu), name
            assert c["train_synthetic_normal"] == c["train_synthetic_pneumonia"] == n_synth // 2, name
            assert (c["val_real_normal"], c["val_real_pneumonia"]) == (4, 8)
            assert (c["test_real_normal"], c["test_real_pneumonia"]) == (6, 10)
            assert d.train_x.shape == (n_normal + n_pneu + n_synth, 32, 32) and d.train_x.dtype == torch.uint8
            assert np.array_equal(
                np.bincount(d.train_y, minlength=2), [n_normal + n_synth // 2, n_pneu + n_synth // 2]
            )
            comp = d.composition
            fit = comp[comp.role.isin(["train", "val"]) & (comp.source == "real")]
            assert set(fit.image_id) <= train_ids  # real training and validation come from real train only
            assert not set(comp[comp.role != "test"].image_id) & test_ids  # the test set never enters
            train_real = set(comp[(comp.role == "train") & (comp.source == "real")].image_id)
            assert not train_real & set(comp[comp.role == "val"].image_id)
            assert set(comp[comp.role == "test"].image_id) == test_ids
            vals.append(tuple(comp[comp.role == "val"].image_id))
    assert len(set(vals)) == 1  # one validation split for every experiment and seed
    # the prepared arrays are cached per dataset version
    assert any((tiny.data_dir / "classifier" / "cache").glob(f"real-{ds.version}-36-32/train.npy"))


def test_balance_control_has_the_mix_class_shares_from_real_images_only(tiny):
    quiet = lambda m: None  # noqa: E731
    base = load_experiment_data(tiny, "baseline", 0, log=quiet)
    for mix_name in ("synth-50", "synth-100"):
        mix = load_experiment_data(tiny, mix_name, 0, log=quiet)
        ctl = load_experiment_data(tiny, f"balance-{mix_name}", 0, log=quiet)
        m, c = mix.counts(), ctl.counts()
        mix_share = (m["train_real_normal"] + m["train_synthetic_normal"]) / len(mix.train_y)
        assert abs(ctl.normal_share() - mix_share) <= 1 / len(ctl.train_y), mix_name
        assert ctl.normal_share() > base.normal_share()  # the mixes add NORMAL share; so does the control
        assert c["train_synthetic_normal"] == c["train_synthetic_pneumonia"] == 0  # real images only
        assert c["train_real_copy_normal"] > 0 and c["train_real_copy_pneumonia"] == 0
        comp, base_comp = ctl.composition, base.composition
        originals = comp[(comp.role == "train") & (comp.source == "real")]
        assert set(originals.image_id) == set(
            base_comp[(base_comp.role == "train") & (base_comp.source == "real")].image_id
        )
        copies = comp[comp.source == "real_copy"]
        assert set(copies.image_id) <= set(originals[originals.label == 0].image_id)
        assert ctl.target_normal_share == pytest.approx(mix_share)


def test_study_protocol_trains_on_all_real_train_without_validation(tiny):
    study = tiny.model_copy(update={"classifier": tiny.classifier.model_copy(update={"selection": "test"})})
    d = load_experiment_data(study, "baseline", 0, log=lambda m: None)
    c = d.counts()
    ds = StandardizedDataset.open(tiny.data_dir / "dataset")
    assert (c["train_real_normal"], c["train_real_pneumonia"]) == (20, 40)  # every real training image
    assert c["val_real_normal"] == c["val_real_pneumonia"] == 0
    assert d.split.unit == "none" and "no validation split" in d.split.describe()
    assert set(d.composition[d.composition.role == "train"].image_id) == set(ds.rows("train").sha256)
    assert np.array_equal(d.val_y, d.test_y)  # the test set stands in for validation, as in the study


def test_matched_generators_fix_the_limited_subset_and_supply_its_synthetic_images(tiny):
    matched = tiny.model_copy(
        update={"dreambooth": tiny.dreambooth.model_copy(update={"generators": "matched"})}
    )
    rng = np.random.default_rng(5)
    for key in ("normal", "pneumonia"):
        fake = rng.integers(10, 250, (SYNTH_PER_CLASS, 64, 64), dtype=np.uint8)
        write_fake_synthetic(tiny.data_dir, key, fake, generator=f"{key}-r10")
    ds = StandardizedDataset.open(tiny.data_dir / "dataset")
    rows = ds.rows("train")
    subsets = []
    for seed in (0, 1):
        d = load_experiment_data(matched, "limited-10", seed, log=lambda m: None)
        comp = d.composition
        assert d.generators == {"normal": "normal-r10", "pneumonia": "pneumonia-r10"}
        assert set(comp[comp.source == "synthetic"].image_id.str.split("/").str[1]) == {
            "normal-r10",
            "pneumonia-r10",
        }
        real = comp[(comp.role == "train") & (comp.source == "real")]
        subsets.append(set(real.image_id))
        # exactly the images the matched generators are fine-tuned on
        for label, key in enumerate(("normal", "pneumonia")):
            positions, _ = generator_positions(matched, rows, f"{key}-r10")
            assert set(rows.sha256.to_numpy()[positions]) == set(real[real.label == label].image_id)
    assert subsets[0] == subsets[1]  # fixed across seeds
    # the study arrangement draws the subset anew for each seed, from the full generators
    study = [load_experiment_data(tiny, "limited-25", seed, log=lambda m: None) for seed in (0, 1)]
    assert study[0].generators == {"normal": "normal", "pneumonia": "pneumonia"}
    sets = [
        set(d.composition[(d.composition.role == "train") & (d.composition.source == "real")].image_id)
        for d in study
    ]
    assert sets[0] != sets[1]


def test_synthetic_images_are_resized_like_real_ones():
    square = np.random.default_rng(1).integers(0, 255, (3, 64, 64), dtype=np.uint8)
    ours = prepare_images(square, 36, 32).numpy().astype(float)
    ref = TF.center_crop(TF.resize(torch.from_numpy(square), [36], antialias=True), [32]).numpy()
    assert ours.shape == (3, 32, 32)
    assert np.abs(ours - ref.astype(float)).max() <= 1  # torchvision's Resize + CenterCrop


def test_augmentation_on_tensors_is_per_batch_seeded_and_matches_torchvision():
    s = ClassifierSettings()
    batch = torch.randint(0, 256, (4, 32, 32), dtype=torch.uint8)
    a = augment_batch(batch, s, torch.Generator().manual_seed(5))
    b = augment_batch(batch, s, torch.Generator().manual_seed(5))
    c = augment_batch(batch, s, torch.Generator().manual_seed(6))
    assert a.shape == (4, 32, 32) and a.dtype == torch.uint8 and torch.equal(a, b) and not torch.equal(a, c)
    off = {"hflip": False, "rotation_degrees": 0.0, "brightness": 0.0, "contrast": 0.0}
    assert torch.equal(augment_batch(batch, s.model_copy(update=off), torch.Generator()), batch)
    flips = augment_batch(
        batch, s.model_copy(update={**off, "hflip": True}), torch.Generator().manual_seed(1)
    )
    assert all(torch.equal(f, x) or torch.equal(f, x.flip(-1)) for f, x in zip(flips, batch))
    # rotation: torchvision's rotate by the drawn angle (counter-clockwise, black fill)
    rotate = s.model_copy(update={**off, "rotation_degrees": 10.0})
    bar = torch.zeros(1, 64, 64, dtype=torch.uint8)
    bar[0, 16:48, 28:36] = 255
    angle = float((torch.rand(1, generator=torch.Generator().manual_seed(3)) * 2 - 1) * 10)
    ours = augment_batch(bar, rotate, torch.Generator().manual_seed(3))
    ref = TF.rotate(bar, angle, interpolation=TF.InterpolationMode.BILINEAR)
    assert (ours.float() - ref.float()).abs().mean() < 0.5 and not torch.equal(ours, bar)
    normalized = normalize_batch(batch)
    assert normalized.shape == (4, 3, 32, 32)
    assert normalized[:, 0].mul(0.229).add(0.485).mul(255).sub(batch.float()).abs().max() < 1e-3
    sampler = EpochBatchSampler(10, 4, seed=0)
    sampler.set_epoch(0)
    first = [idx for _, idx in sampler]
    assert [len(i) for i in first] == [4, 4, 2] and sorted(sum(first, [])) == list(range(10))
    sampler.set_epoch(1)
    assert [idx for _, idx in sampler] != first
    assert len(EpochBatchSampler(9, 4, seed=0)) == 2  # a last batch of one is dropped (BatchNorm)


# --- metrics ---------------------------------------------------------------------------------


def test_metrics_match_hand_computed_values():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.7, 0.4, 0.9, 0.8, 0.3, 0.6, 0.55, 0.45])
    m = binary_metrics(y, p)
    # predicted PNEUMONIA: indices 2, 4, 5, 7, 8 -> tn 3, fp 1, fn 2, tp 4
    assert m["confusion"] == [[3, 1], [2, 4]]
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["precision"] == pytest.approx(0.8)
    assert m["recall"] == pytest.approx(4 / 6)
    assert m["specificity"] == pytest.approx(0.75)
    assert m["f1"] == pytest.approx(8 / 11)
    # positives beat negatives in 4 + 4 + 2 + 3 + 3 + 3 = 19 of 24 pairs
    assert m["auc"] == pytest.approx(19 / 24)
    for name in ("accuracy", "f1", "auc", "precision", "recall", "specificity"):
        assert metric_value(y, p, name) == pytest.approx(m[name])
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5  # ties count half
    assert np.isnan(roc_auc([1, 1], [0.2, 0.9]))
    undecided = binary_metrics(np.array([0, 1, 1]), np.array([0.5, 0.5, 0.5]))  # 0.5 is NORMAL
    assert undecided["precision"] == 0 and undecided["f1"] == 0 and undecided["specificity"] == 1
    assert undecided["accuracy"] == pytest.approx(1 / 3)


def test_confidence_intervals_and_paired_tests():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    perfect = y.astype(float)
    assert bootstrap_ci(y, perfect, "accuracy", Bootstrap(200)) == (1.0, 1.0, 1.0)
    noisy = np.where(rng.random(200) < 0.8, y, 1 - y).astype(float)
    est, low, high = bootstrap_ci(y, noisy, "accuracy", Bootstrap(500))
    assert low < est < high and high - low < 0.2
    seeds = np.stack([noisy, noisy])
    assert bootstrap_ci(y, seeds, "auc", Bootstrap(100))[0] == pytest.approx(roc_auc(y, noisy))
    same = paired_bootstrap_diff(y, noisy, noisy, boot=Bootstrap(500))
    assert same["diff"] == 0 and same["p_value"] == 1.0
    better = paired_bootstrap_diff(y, noisy, perfect, boot=Bootstrap(500))
    assert better["diff"] == pytest.approx(1 - (noisy == y).mean())
    assert better["ci_low"] > 0 and better["p_value"] <= 2 / 500
    # McNemar: A right on 5 images B gets wrong, never the other way: p = 2 * 0.5 ** 5
    a = np.array([1] * 5 + [1] * 10 + [0] * 3, bool)
    b = np.array([0] * 5 + [1] * 10 + [0] * 3, bool)
    res = mcnemar_exact(a, b)
    assert (res["only_a_correct"], res["only_b_correct"]) == (5, 0)
    assert res["p_value"] == pytest.approx(0.0625)


# --- training --------------------------------------------------------------------------------


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def small(tiny):
    """A few images of the tiny dataset's synth-25 experiment, for fast training runs."""
    d = load_experiment_data(tiny, "synth-25", 0, log=lambda m: None)
    keep = np.r_[0:8, len(d.train_y) - 12 : len(d.train_y)]  # NORMAL real + PNEUMONIA real/synthetic
    return SplitArrays(d.train_x[keep], d.train_y[keep], d.val_x, d.val_y, d.test_x, d.test_y)


def _train(tiny, small, out: Path, test_x=None, log=lambda m: None, **update):
    data = small if test_x is None else dataclasses.replace(small, test_x=test_x)
    return train_classifier(
        data,
        tiny.classifier.model_copy(update={"batch_size": 10, **update}),
        TrainRun(0, "cpu", out, log, prepared=True, experiment="synth-25"),
    )


@pytest.fixture(scope="module")
def honest(tiny, small, tmp_path_factory):
    """One uninterrupted two-epoch run, selected on validation."""
    return _train(tiny, small, tmp_path_factory.mktemp("honest"))


def test_interrupted_training_resumes_where_it_stopped(tiny, small, honest, tmp_path):
    assert honest.resumed_from_epoch == 0 and len(honest.history) == 2
    assert not (Path(honest.weights_path).parent / STATE_FILE).exists()  # removed once finished

    def stop_after_first_epoch(message: str) -> None:
        if "epoch 1/2" in message:
            raise Interrupted

    with pytest.raises(Interrupted):
        _train(tiny, small, tmp_path / "cut", log=stop_after_first_epoch)
    assert (tmp_path / "cut" / STATE_FILE).exists()
    shutil.copytree(tmp_path / "cut", tmp_path / "other")
    resumed = _train(tiny, small, tmp_path / "cut")
    assert resumed.resumed_from_epoch == 1
    for a, b in zip(honest.history, resumed.history):  # as if never interrupted
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert a["val_accuracy"] == b["val_accuracy"]
    assert np.allclose(honest.test_prob_last, resumed.test_prob_last, atol=1e-5)
    # a state saved under other settings is not resumed from
    fresh = _train(tiny, small, tmp_path / "other", epochs=1, learning_rate=3e-4)
    assert fresh.resumed_from_epoch == 0 and len(fresh.history) == 1


def test_test_set_plays_no_part_in_training_or_selection(tiny, small, honest, tmp_path):
    test_x = small.test_x
    blank = _train(tiny, small, tmp_path / "blank", test_x=torch.zeros_like(test_x))
    # same curves and the same chosen epoch whatever the test images are
    assert honest.selected_epoch == blank.selected_epoch
    for a, b in zip(honest.history, blank.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
        assert a["val_accuracy"] == b["val_accuracy"]
    assert "test_accuracy" not in honest.history[0] and honest.selection == "validation"
    assert honest.val_selected["n"] == len(small.val_y) and honest.test_selected["n"] == len(small.test_y)
    # the study's protocol, on request, labelled as such
    study = _train(tiny, small, tmp_path / "study", selection="test")
    assert "test_accuracy" in study.history[0] and "TEST" in study.selection_note
    best = max(range(2), key=lambda i: (study.history[i]["test_accuracy"], -study.history[i]["test_loss"]))
    assert study.selected_epoch == best + 1
    # the selected checkpoint reloads and gives the recorded test probabilities
    model = load_classifier(honest.weights_path, tiny.classifier)
    prob, _ = predict_proba(model, test_x, None, 8, "cpu")
    assert np.allclose(prob, honest.test_prob_selected, atol=1e-5)


def test_imagenet_weights_from_a_local_file(tmp_path):
    from safetensors.torch import save_file
    from torchvision.models import densenet121

    torch.manual_seed(0)
    reference = densenet121(weights=None)
    # torchvision's old key names ("norm.1") are mapped too
    state = {k.replace("norm1", "norm.1"): v.contiguous() for k, v in reference.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pth")
    for file in ("w.safetensors", "w.pth"):
        model = build_densenet121(
            ClassifierSettings(pretrained="imagenet", weights_file=str(tmp_path / file))
        )
        assert torch.equal(model.features.conv0.weight, reference.features.conv0.weight)
        assert model.classifier[0].in_features == 1024 and model.classifier[3].out_features == 2
    with pytest.raises(FileNotFoundError):
        build_densenet121(ClassifierSettings(pretrained="imagenet", weights_file=str(tmp_path / "none.pth")))


# --- the Dagster asset -----------------------------------------------------------------------


def test_classifier_experiment_asset_end_to_end(tiny):
    overrides = json.loads(json.dumps(TINY))
    overrides["classifier"]["num_workers"] = 2  # augmentation in worker processes, as in the profiles
    # The asset as build_defs makes it: partitioned by these settings' experiments x seeds.
    grid = classifier_assets.build_defs(Settings.for_profile("demo", tiny.data_dir, overrides)).assets
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            list(grid),
            instance=instance,
            partition_key=dg.MultiPartitionKey({"experiment": "synth-50", "seed": "0"}),
            resources={
                "settings": SettingsResource(
                    data_dir=str(tiny.data_dir), overrides_json=json.dumps(overrides)
                ),
                "compute": ComputeResource(device="cpu"),
            },
        )
    assert result.success
    md = result.asset_materializations_for_node("classifier_experiment")[0].metadata
    assert md["experiment"].value == "synth-50" and md["seed"].value == 0
    assert (md["n_real"].value, md["n_synthetic"].value) == (48, 8)
    assert md["selection"].value.startswith("validation")
    assert "random initialisation" in md["initial_weights"].value
    assert 0 <= md["test_accuracy"].value <= 1 and 0 <= md["last_epoch_test_auc"].value <= 1
    assert md["training_curves"].value.startswith("![")
    assert "| NORMAL |" in md["confusion_matrix (rows true, columns predicted)"].value
    assert "| train, synthetic | 4 | 4 |" in md["composition"].value
    assert md["validation_split"].value.startswith("per image (the file names carry no patient)")
    assert md["generators"].value == "study: {'normal': 'normal', 'pneumonia': 'pneumonia'}"
    assert md["balance_control"].value == "no" and md["normal_share"].value == pytest.approx(20 / 56)
    folder = run_dir(tiny.data_dir, "synth-50", 0)
    assert (
        Path(md["checkpoint"].value) == folder / "best.safetensors" and (folder / "last.safetensors").exists()
    )
    assert {c.check_name: c.passed for c in result.get_asset_check_evaluations()} == {
        "no_test_leakage": True,
        "metrics_are_finite": True,
    }
    run = load_run(folder)
    pred = pd.read_parquet(folder / "predictions.parquet")
    assert len(pred) == 16 and set(pred.image_id) == set(
        StandardizedDataset.open(tiny.data_dir / "dataset").rows("test").sha256
    )
    assert run.test_selected["accuracy"] == pytest.approx(md["test_accuracy"].value)
    assert json.loads((folder / RUN_FILE).read_text())["extra"]["n_synthetic"] == 8
    assert len(SyntheticImages.open(synthetic_dir(tiny.data_dir, "normal"))) == SYNTH_PER_CLASS
