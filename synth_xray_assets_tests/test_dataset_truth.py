"""Every stored image is its own source's: duplicates within and across splits, caches, re-derivation."""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from fixtures import write_image_folder
from PIL import Image, PngImagePlugin

from synth_xray_assets.dataset import assets as dataset_assets
from synth_xray_assets.dataset.sources import load_source, record_at, resolve_source, source_records
from synth_xray_assets.dataset.splits import validation_split
from synth_xray_assets.dataset.standardize import standardize_bytes, standardize_many
from synth_xray_assets.dataset.store import StandardizedDataset, build_standardized_dataset
from synth_xray_assets.dataset.verify import sample_positions, verify_rows
from synth_xray_assets.resources import SettingsResource
from synth_xray_assets.settings import Settings

REPO = Path(__file__).resolve().parents[1]
SHARED_224 = Path(__file__).resolve().parents[2] / "shared/data/chest-xray-pneumonia-224"
CHECKS = [
    dataset_assets.every_class_in_every_split,
    dataset_assets.images_are_square,
    dataset_assets.no_duplicates_across_splits,
    dataset_assets.stored_images_match_their_sources,
    dataset_assets.all_source_images_readable,
]


def settings_for(tmp_path: Path, folder: Path, **dataset) -> Settings:
    over = {"dataset": {"source": str(folder), "resolution": 24, "workers": 1, **dataset}}
    return Settings.for_profile("demo", tmp_path / "data", over)


def build(s: Settings):
    resolved = resolve_source(s)
    records = source_records(load_source(resolved, s), resolved, s)
    return build_standardized_dataset(records, s.dataset, s.layout.dataset, log=lambda m: None)


def copy(folder: Path, src: str, dst: str) -> None:
    shutil.copyfile(folder / src, folder / dst)


def assert_every_row_is_its_source(s: Settings, folder: Path) -> int:
    """Each stored row equals its own source file standardized alone; returns the rows compared."""
    ds = StandardizedDataset.open(s.layout.dataset)
    for split in s.dataset.splits:
        stored = ds.images(split)
        for i, row in enumerate(ds.rows(split).itertuples()):
            alone = standardize_bytes((folder / row.source_path).read_bytes(), s.dataset.resolution)
            assert np.array_equal(stored[i], alone.pixels), f"{row.source_path} holds another image's pixels"
    return len(ds.manifest)


@pytest.mark.parametrize("workers", [1, 2])
def test_byte_identical_files_keep_every_row_its_own_pixels(tmp_path, workers):
    folder = write_image_folder(tmp_path / "src", 4, (30, 26), 5, "png")
    copy(folder, "train/NORMAL/NORMAL_0.png", "train/NORMAL/NORMAL_0_copy.png")  # same split and class
    copy(folder, "train/NORMAL/NORMAL_0.png", "train/NORMAL/NORMAL_0_again.png")
    copy(folder, "train/NORMAL/NORMAL_1.png", "train/PNEUMONIA/PNEUMONIA_x.png")  # across classes
    copy(folder, "validation/PNEUMONIA/PNEUMONIA_0.png", "validation/PNEUMONIA/PNEUMONIA_0b.png")
    (folder / "train/NORMAL/NORMAL_0_z_corrupt.png").write_bytes(
        b"\x89PNG\r\n\x1a\n broken"
    )  # after the pair
    s = settings_for(tmp_path, folder, workers=workers)
    first = build(s)
    assert first.decoded == 4 * 6 + 1 and first.reused == 0  # each distinct file decoded once
    (bad,) = first.skipped.itertuples()
    assert bad.source_path == "train/NORMAL/NORMAL_0_z_corrupt.png" and "0x" not in bad.reason
    assert assert_every_row_is_its_source(s, folder) == 4 * 6 + 4
    again = build(s)  # from the cache
    assert again.decoded == 1 and again.version == first.version  # only the corrupt file: nothing cached
    assert_every_row_is_its_source(s, folder)


def test_a_cached_png_of_another_source_is_never_reused(tmp_path):
    folder = write_image_folder(tmp_path / "src", 2, (30, 26), 5, "png")
    s = settings_for(tmp_path, folder)
    build(s)
    ds = StandardizedDataset.open(s.layout.dataset)
    a, b = ds.rows("train").path[:2]
    # What the faulty version left: a neighbour's pixels under this hash, no source hash recorded.
    info = PngImagePlugin.PngInfo()
    info.add_text("synth_xray", json.dumps({"size": [1, 1], "mode": "L"}))
    Image.open(ds.root / b).save(ds.root / a, pnginfo=info)
    report = build(s)
    assert report.decoded == 1
    assert_every_row_is_its_source(s, folder)


def duplicates_in_every_pair(tmp_path: Path) -> Path:
    folder = write_image_folder(tmp_path / "src", 4, (30, 26), 5, "png")
    copy(folder, "train/NORMAL/NORMAL_0.png", "test/NORMAL/leak_train.png")  # train-test
    copy(folder, "train/PNEUMONIA/PNEUMONIA_1.png", "validation/PNEUMONIA/leak_train.png")  # train-val
    copy(folder, "validation/NORMAL/NORMAL_2.png", "test/NORMAL/leak_val.png")  # val-test
    copy(folder, "train/NORMAL/NORMAL_3.png", "validation/NORMAL/leak_all.png")  # all three
    copy(folder, "train/NORMAL/NORMAL_3.png", "test/NORMAL/leak_all.png")
    info = PngImagePlugin.PngInfo()  # other bytes, the same pixels: a re-encoded copy
    info.add_text("Software", "a re-export")
    Image.open(folder / "train/PNEUMONIA/PNEUMONIA_2.png").save(
        folder / "test/PNEUMONIA/reencoded.png", pnginfo=info
    )
    return folder


def materialize(s: Settings, tmp_path: Path, overrides: dict):
    resource = SettingsResource(data_dir=str(s.data_dir), overrides_json=json.dumps(overrides))
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [dataset_assets.chest_xray_dataset, *CHECKS],
            instance=instance,
            resources={"settings": resource},
            raise_on_error=False,
        )
        errors = [
            e.message
            for e in instance.all_logs(result.run_id)
            if e.level >= 40 and e.message and "two splits" in e.message
        ]
        return result, errors


def test_duplicates_between_every_pair_of_splits_fail_the_check_naming_the_files(tmp_path):
    folder = duplicates_in_every_pair(tmp_path)
    over = {"dataset": {"source": str(folder), "resolution": 24, "workers": 1}}
    result, errors = materialize(settings_for(tmp_path, folder), tmp_path, over)
    assert not result.success
    check = {c.check_name: c for c in result.get_asset_check_evaluations()}["no_duplicates_across_splits"]
    assert not check.passed and check.metadata["num_shared"].value == 5
    assert "test/PNEUMONIA/reencoded.png" in check.description
    for name in (
        "test/NORMAL/leak_train.png",
        "validation/PNEUMONIA/leak_train.png",
        "test/NORMAL/leak_val.png",
    ):
        assert name in check.description and any(name in e for e in errors)
    assert (
        "train/NORMAL/NORMAL_3.png" in check.description and "test/NORMAL/leak_all.png" in check.description
    )
    splits = {r.data["splits"] for r in check.metadata["shared (files with the same content)"].records}
    assert splits == {"test, train", "validation, train", "test, validation", "test, validation, train"}


def test_dropping_keeps_each_shared_image_in_one_split_never_dropping_from_test(tmp_path):
    folder = duplicates_in_every_pair(tmp_path)
    over = {
        "dataset": {
            "source": str(folder),
            "resolution": 24,
            "workers": 1,
            "drop_cross_split_duplicates": True,
        }
    }
    s = settings_for(tmp_path, folder, drop_cross_split_duplicates=True)
    result, _ = materialize(s, tmp_path, over)
    assert result.success
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert all(c.passed for c in checks.values()), {k: c.description for k, c in checks.items()}
    ds = StandardizedDataset.open(s.layout.dataset)
    assert ds.origin == {  # recorded for the report: real files, not the project's phantoms
        "kind": "imagefolder",
        "location": str(folder.resolve()),
        "revision": None,
        "phantoms": False,
    }
    assert len(ds.rows("test")) == 8 + 4  # test keeps every file
    dropped = pd.read_csv(ds.root / "dropped.csv").set_index("source_path")
    assert set(dropped.index) == {
        "train/NORMAL/NORMAL_0.png",
        "train/PNEUMONIA/PNEUMONIA_1.png",
        "validation/NORMAL/NORMAL_2.png",
        "train/NORMAL/NORMAL_3.png",
        "validation/NORMAL/leak_all.png",
        "train/PNEUMONIA/PNEUMONIA_2.png",
    }
    assert dropped.loc["validation/NORMAL/NORMAL_2.png", "duplicate_of"] == "test/NORMAL/leak_val.png"
    assert "test image" in dropped.loc["train/NORMAL/NORMAL_0.png", "reason"]
    assert "validation image" in dropped.loc["train/PNEUMONIA/PNEUMONIA_1.png", "reason"]
    pixels = {split: {img.tobytes() for img in ds.images(split)} for split in s.dataset.splits}
    assert not pixels["train"] & pixels["test"] and not pixels["train"] & pixels["validation"]
    assert not pixels["validation"] & pixels["test"]
    assert_every_row_is_its_source(s, folder)


def test_the_old_option_name_is_refused_naming_the_new_one(tmp_path):
    with pytest.raises(ValueError, match="drop_cross_split_duplicates"):
        Settings.for_profile("demo", tmp_path, {"dataset": {"drop_train_test_duplicates": True}})


def test_copies_in_train_stay_on_one_side_of_the_carved_validation_split():
    # 40 images, each its own patient; 10 pairs of byte-identical copies under other patient ids.
    ids = [f"train/{i}:person{i}_bacteria_{i}.jpeg" for i in range(40)]
    hashes = [f"h{i % 30}" for i in range(40)]
    rows = pd.DataFrame({"label": [i % 2 for i in range(40)], "source_id": ids, "sha256": hashes})
    for seed in range(5):
        split = validation_split(rows, 0.25, seed)
        assert not set(rows.sha256[split.keep]) & set(rows.sha256[split.val])
        plain = validation_split(rows.drop(columns="sha256"), 0.25, seed)
        assert len(plain.keep) + len(plain.val) == 40


def test_the_check_names_stored_rows_that_differ_from_their_source(tmp_path):
    folder = write_image_folder(tmp_path / "src", 3, (30, 26), 5, "png")
    s = settings_for(tmp_path, folder)
    build(s)
    ds = StandardizedDataset.open(s.layout.dataset)
    resolved = resolve_source(s)
    dsd = load_source(resolved, s)

    def fetch(split, i):
        return record_at(dsd, split, i, s.dataset.class_names, resolved)

    everything = sample_positions(len(ds.manifest), 1000, 0)
    assert verify_rows(ds, fetch, s.dataset, everything).empty
    train = np.load(ds.root / "arrays/train.npy")
    np.save(ds.root / "arrays/train.npy", train[[1, 0, *range(2, len(train))]])  # two rows swapped
    bad = verify_rows(ds, fetch, s.dataset, everything)
    assert list(bad.row) == [0, 1] and set(bad.split) == {"train"}
    assert set(bad.file) == set(ds.rows("train").source_path[:2])
    assert bad.problem.str.startswith("stored pixels differ").all()
    assert len(sample_positions(100, 10, 3)) == 10 and list(sample_positions(100, 10, 3)) == list(
        sample_positions(100, 10, 3)
    )


def test_bad_input_messages_name_no_object_and_quote_the_configured_limit():
    text = standardize_bytes(b"plain text", 32)
    assert text.reason.startswith("not an image") and "0x" not in text.reason
    buf = io.BytesIO()
    Image.new("L", (300, 300)).save(buf, format="PNG")
    (bomb,) = standardize_many([buf.getvalue()], 32, max_pixels=10_000, workers=1)  # > 2x the limit
    assert bomb.reason == "over the pixel limit: 90000 pixels > 10000 pixels"


@pytest.mark.skipif(not SHARED_224.exists(), reason=f"real data mirror absent: {SHARED_224}")
def test_every_row_of_the_real_mirror_is_its_source(tmp_path):
    s = Settings.for_profile(
        "demo", tmp_path, {"dataset": {"source": str(SHARED_224), "resolution": 32, "workers": 2}}
    )
    report = build(s)
    m = report.manifest
    assert m.groupby("split").sha256.apply(lambda h: h.duplicated().any()).any()  # the trigger is there
    # The command a user runs, on the folder just built: every row re-derived from the source.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNTH_XRAY_")}
    env |= {
        "SYNTH_XRAY_DATA": str(tmp_path),
        "SYNTH_XRAY_DATASET__SOURCE": str(SHARED_224),
        "SYNTH_XRAY_DATASET__RESOLUTION": "32",
        "PYTHONPATH": str(REPO),
    }
    done = subprocess.run(
        [sys.executable, "-m", "synth_xray_assets.dataset.verify", "--all"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(done.stdout[-2000:], done.stderr[-2000:])
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert (
        done.stdout.strip()
        .splitlines()[-1]
        .endswith(f": {len(m)} stored rows re-derived from their source, 0 differ")
    )
    assert len(m) == 5216 + 16 + 624
