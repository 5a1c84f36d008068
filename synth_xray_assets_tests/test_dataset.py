"""The real-dataset domain: phantoms, standardization, sources, bad input, and the asset."""

import io
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from fixtures import write_image_folder
from PIL import Image

from synth_xray_assets.dataset import assets as dataset_assets
from synth_xray_assets.dataset.phantoms import (
    generate_phantom_split,
    held_out_phantoms,
    phantom_fingerprint,
    write_phantom_dataset,
)
from synth_xray_assets.dataset.sources import (
    SourceError,
    check_splits_and_classes,
    load_source,
    resolve_source,
    source_records,
)
from synth_xray_assets.dataset.standardize import resize_center_crop, standardize_bytes, standardize_many
from synth_xray_assets.dataset.store import StandardizedDataset, build_standardized_dataset
from synth_xray_assets.resources import SettingsResource
from synth_xray_assets.settings import DatasetSettings, PhantomSettings, Settings

SHARED_224 = Path(__file__).resolve().parents[2] / "shared/data/chest-xray-pneumonia-224"
TINY_PHANTOMS = {
    "split_counts": {"train": (6, 10), "validation": (2, 2), "test": (3, 5)},
    "min_side": 40,
    "max_side": 90,
}


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def tiny_settings(tmp_path: Path, **dataset) -> Settings:
    return Settings.for_profile(
        "demo",
        tmp_path / "data",
        {"phantoms": TINY_PHANTOMS, "dataset": {"resolution": 32, "workers": 1, **dataset}},
    )


def build(settings: Settings, origin: dict | None = None):
    resolved = resolve_source(settings)
    dsd = load_source(resolved, settings)
    check_splits_and_classes(dsd, settings, resolved.location)
    records = source_records(dsd, resolved, settings)
    return build_standardized_dataset(
        records, settings.dataset, settings.data_dir / "dataset", log=lambda m: None, origin=origin
    )


def test_the_same_content_from_another_origin_records_the_new_origin(tmp_path):
    s = tiny_settings(tmp_path)
    first = build(s, {"location": "a", "phantoms": True})
    again = build(s, {"location": "b", "phantoms": False})
    assert first.version == again.version  # the same images: the same data version
    assert StandardizedDataset.open(s.data_dir / "dataset").origin == {"location": "b", "phantoms": False}


# --- the demo generator ---------------------------------------------------------------------


def test_phantoms_are_deterministic_and_imbalanced_like_the_study():
    s = PhantomSettings(**TINY_PHANTOMS)
    a_imgs, a_labels = generate_phantom_split(s, "train")
    b_imgs, b_labels = generate_phantom_split(s, "train")
    assert a_imgs == b_imgs and a_labels == b_labels
    assert sorted(a_labels) == [0] * 6 + [1] * 10
    other, _ = generate_phantom_split(PhantomSettings(**{**TINY_PHANTOMS, "seed": 7}), "train")
    assert other != a_imgs
    sizes = {Image.open(io.BytesIO(b)).size for b in a_imgs}
    assert len(sizes) > 8  # varied sizes and aspect ratios, like real scans
    assert all(Image.open(io.BytesIO(b)).mode == "L" for b in a_imgs)


def test_pneumonia_phantoms_have_brighter_lungs_than_normal():
    s = PhantomSettings(split_counts={"train": (20, 20)}, min_side=64, max_side=64)
    imgs, labels = generate_phantom_split(s, "train")
    arrays = np.stack([np.asarray(Image.open(io.BytesIO(b)).resize((64, 64))) for b in imgs]).astype(float)
    lungs = arrays[:, 20:44, 8:24].mean(axis=(1, 2)) + arrays[:, 20:44, 40:56].mean(axis=(1, 2))
    labels = np.array(labels)
    assert lungs[labels == 1].mean() > lungs[labels == 0].mean() + 5


def test_held_out_phantoms_are_their_own_images_standardized_like_the_dataset():
    tiny = PhantomSettings(**TINY_PHANTOMS, held_out_counts=(5, 7))
    dataset = DatasetSettings(resolution=32)
    normal, pneumonia = (held_out_phantoms(tiny, dataset, label) for label in (0, 1))
    assert normal.shape == (5, 32, 32) and pneumonia.shape == (7, 32, 32) and normal.dtype == np.uint8
    assert np.array_equal(normal, held_out_phantoms(tiny, dataset, 0))  # deterministic
    # in no split: no held-out image is any split's image, standardized the same way
    split_pixels = {
        standardize_bytes(b, 32).pixels.tobytes()
        for split in TINY_PHANTOMS["split_counts"]
        for b in generate_phantom_split(tiny, split)[0]
    }
    assert not split_pixels & {img.tobytes() for img in np.concatenate([normal, pneumonia])}
    # the class shows: PNEUMONIA's lungs brighter, as in the splits
    lungs = (slice(None), slice(10, 22), slice(4, 12))
    assert pneumonia[lungs].mean() > normal[lungs].mean()
    # the source's parquet does not hold them: asking for more leaves its version alone
    assert phantom_fingerprint(tiny) == phantom_fingerprint(PhantomSettings(**TINY_PHANTOMS))
    none = PhantomSettings(**TINY_PHANTOMS, held_out_counts=(0, 3))
    assert held_out_phantoms(none, dataset, 0).shape == (0, 32, 32)


def test_phantom_dataset_reads_like_the_hub_dataset(tmp_path):
    import datasets

    folder = write_phantom_dataset(PhantomSettings(**TINY_PHANTOMS), tmp_path / "ph")
    dsd = datasets.load_dataset(str(folder))
    assert set(dsd) == {"train", "validation", "test"}
    assert dsd["train"].features["label"].names == ["NORMAL", "PNEUMONIA"]
    assert dsd["train"].num_rows == 16
    assert "not real patients" in (folder / "README.md").read_text()


# --- standardization ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.new("L", (300, 200), 120),
        lambda: Image.new("RGB", (200, 300), (10, 200, 30)),
        lambda: Image.new("RGBA", (64, 64), (255, 255, 255, 0)),
        lambda: Image.fromarray(np.linspace(0, 4095, 80 * 60).reshape(60, 80).astype(np.uint16)),
        lambda: Image.new("L", (3, 5), 200),
        lambda: Image.new("L", (2000, 20), 50),
        lambda: Image.new("P", (40, 50)),
    ],
    ids=["L", "RGB", "RGBA", "16-bit", "tiny", "very-wide", "palette"],
)
def test_standardizer_gives_square_target_in_one_mode(make):
    img = make()
    out = standardize_bytes(encode(img), 32, "L")
    assert out.reason is None
    assert out.pixels.shape == (32, 32) and out.pixels.dtype == np.uint8
    assert out.original_size == img.size


def test_standardizer_keeps_aspect_and_centers():
    # a wide image with a bright centre stripe: after crop, the stripe fills the middle
    arr = np.zeros((100, 300), np.uint8)
    arr[:, 100:200] = 255
    out = resize_center_crop(Image.fromarray(arr), 50)
    px = np.asarray(out)
    assert out.size == (50, 50) and px.min() > 200  # only the central square survives


def test_sixteen_bit_range_is_stretched_not_clipped():
    arr = np.linspace(0, 4095, 64 * 64).reshape(64, 64).astype(np.uint16)
    out = standardize_bytes(encode(Image.fromarray(arr)), 64, "L")
    assert out.pixels.min() <= 2 and out.pixels.max() >= 253


def test_jpeg_draft_decoding_matches_full_decoding():
    arr = (np.add.outer(np.arange(1200), np.arange(1000)) % 256).astype(np.uint8)
    data = encode(Image.fromarray(arr).convert("L").resize((1000, 1200)), "JPEG")
    fast = standardize_bytes(data, 128, "L").pixels.astype(float)
    full = np.asarray(resize_center_crop(Image.open(io.BytesIO(data)).convert("L"), 128)).astype(float)
    assert np.abs(fast - full).mean() < 6


def test_standardize_many_is_ordered_with_two_processes():
    blobs = [encode(Image.new("L", (40 + i, 40), i * 10)) for i in range(20)]
    one = [r.pixels for r in standardize_many(blobs, 16, workers=1)]
    two = [r.pixels for r in standardize_many(blobs, 16, workers=2, chunk_size=3)]
    assert all(np.array_equal(a, b) for a, b in zip(one, two))
    assert [int(p.mean()) for p in two] == [i * 10 for i in range(20)]


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty file"),
        (b"this is a text file, not an image", "not an image"),
        (encode(Image.new("L", (200, 200), 3), "JPEG")[:300], "corrupt or truncated"),
        (
            encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 90), dtype=np.uint8)))[
                :3000
            ],
            "corrupt or truncated",
        ),
        (encode(Image.new("L", (200, 100))), "over the pixel limit"),
    ],
    ids=["zero-byte", "non-image", "truncated-jpeg", "truncated-png", "bomb"],
)
def test_bad_input_is_reported_not_raised(data, reason):
    out = standardize_bytes(data, 32, "L", max_pixels=10_000)
    assert out.pixels is None and reason in out.reason


# --- sources --------------------------------------------------------------------------------


def make_image_folder(root: Path, bad: bool = True) -> Path:
    write_image_folder(root, 3, (50, 40), 7, "jpeg")
    if bad:
        (root / "train" / "NORMAL" / "empty.jpeg").write_bytes(b"")
        (root / "train" / "NORMAL" / "notes.jpeg").write_bytes(b"not an image at all")
        good = (root / "train" / "PNEUMONIA" / "PNEUMONIA_0.jpeg").read_bytes()
        (root / "train" / "PNEUMONIA" / "cut.jpeg").write_bytes(good[: len(good) // 3])
        (root / "train" / "COVID").mkdir()
        Image.new("L", (40, 40)).save(root / "train" / "COVID" / "x.png")
    return root


def test_image_folder_source_with_bad_files(tmp_path):
    folder = make_image_folder(tmp_path / "folder")
    s = tiny_settings(tmp_path, source=str(folder))
    report = build(s)
    m = report.manifest
    assert m.groupby(["split", "class_name"]).size().to_dict() == {
        (sp, c): 3 for sp in ("test", "train", "validation") for c in ("NORMAL", "PNEUMONIA")
    }
    reasons = dict(zip(report.skipped.source_id.str.split(":").str[-1], report.skipped.reason))
    assert "empty file" in reasons["empty.jpeg"]
    assert "not an image" in reasons["notes.jpeg"]
    assert "truncated" in reasons["cut.jpeg"]
    assert "unknown label 'COVID'" in reasons["x.png"]
    arr = StandardizedDataset.open(s.data_dir / "dataset").images("train")
    assert arr.shape == (6, 32, 32)


def test_parquet_source_and_data_version_is_a_content_hash(tmp_path):
    s = tiny_settings(tmp_path)
    first = build(s)
    assert first.decoded == 28 and first.reused == 0
    again = build(s)
    assert again.version == first.version and again.decoded == 0 and again.reused == 28
    other = build(tiny_settings(tmp_path, resolution=24))
    assert other.version != first.version


def test_missing_split_missing_class_and_bad_paths_are_clear_errors(tmp_path):
    folder = make_image_folder(tmp_path / "f", bad=False)
    import shutil

    shutil.rmtree(folder / "validation")
    with pytest.raises(SourceError, match="split 'validation' is missing"):
        build(tiny_settings(tmp_path, source=str(folder)))
    folder2 = make_image_folder(tmp_path / "g", bad=False)
    shutil.rmtree(folder2 / "test" / "NORMAL")
    with pytest.raises(SourceError, match="class 'NORMAL' is missing from split 'test'"):
        build(tiny_settings(tmp_path, source=str(folder2)))
    with pytest.raises(SourceError, match="does not exist: .*nowhere"):
        build(tiny_settings(tmp_path, source=str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="neither parquet files nor split folders"):
        build(tiny_settings(tmp_path, source=str(tmp_path / "empty")))


def test_hub_source_errors_name_the_dataset(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    # no network here: make the Hub client fail at once instead of retrying
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    s = tiny_settings(tmp_path, source="no-such-owner/no-such-dataset")
    assert resolve_source(s).kind == "hub"
    with pytest.raises(SourceError, match="no-such-owner/no-such-dataset"):
        load_source(resolve_source(s), s)


@pytest.mark.skipif(not SHARED_224.exists(), reason=f"real data mirror absent: {SHARED_224}")
def test_shared_real_mirror_in_hub_layout(tmp_path):
    s = Settings.for_profile("demo", tmp_path, {"dataset": {"source": str(SHARED_224), "resolution": 32}})
    report = build(s)
    counts = report.manifest.groupby(["split", "class_name"]).size().to_dict()
    assert counts[("train", "NORMAL")] == 1341 and counts[("train", "PNEUMONIA")] == 3875
    assert counts[("test", "NORMAL")] == 234 and counts[("test", "PNEUMONIA")] == 390
    assert report.skipped.empty
    assert not set(report.manifest.query("split == 'train'").sha256) & set(
        report.manifest.query("split == 'test'").sha256
    )


# --- the Dagster asset ----------------------------------------------------------------------


def materialize_dataset(settings_resource: SettingsResource):
    checks = [
        dataset_assets.every_class_in_every_split,
        dataset_assets.images_are_square,
        dataset_assets.no_duplicates_across_splits,
        dataset_assets.stored_images_match_their_sources,
        dataset_assets.all_source_images_readable,
    ]
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [dataset_assets.chest_xray_dataset, *checks],
            instance=instance,
            resources={"settings": settings_resource},
            raise_on_error=False,
        )
        return result


def test_asset_materializes_with_metadata_and_checks(tmp_path):
    overrides = (
        '{"phantoms": {"split_counts": {"train": [6, 10], "validation": [2, 2], "test": [3, 5]}}, '
        '"dataset": {"resolution": 32, "workers": 1}}'
    )
    result = materialize_dataset(SettingsResource(data_dir=str(tmp_path), overrides_json=overrides))
    assert result.success
    mat = result.asset_materializations_for_node("chest_xray_dataset")[0]
    md = mat.metadata
    assert md["num_images"].value == 28
    assert "SYNTHETIC PHANTOMS" in md["source"].value
    assert StandardizedDataset.open(tmp_path / "dataset").origin["phantoms"] is True
    counts = {r.data["split"]: r.data for r in md["counts_by_split_and_class"].records}
    assert counts["train"] == {"split": "train", "NORMAL": 6, "PNEUMONIA": 10}
    assert md["thumbnails (top NORMAL, bottom PNEUMONIA)"].value.startswith("![")
    assert mat.tags["dagster/data_version"] == md["data_version"].value
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks == {
        "every_class_in_every_split": True,
        "images_are_square": True,
        "no_duplicates_across_splits": True,
        "stored_images_match_their_sources": True,
        "all_source_images_readable": True,
    }


def test_asset_check_fails_on_train_test_overlap_and_lists_bad_files(tmp_path):
    folder = make_image_folder(tmp_path / "folder")
    leak = next((folder / "train" / "NORMAL").glob("NORMAL_0.jpeg"))
    (folder / "test" / "NORMAL" / "leak.jpeg").write_bytes(leak.read_bytes())
    result = materialize_dataset(
        SettingsResource(
            data_dir=str(tmp_path / "data"),
            overrides_json=f'{{"dataset": {{"source": "{folder}", "resolution": 32}}}}',
        )
    )
    evals = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert not evals["no_duplicates_across_splits"].passed
    assert evals["no_duplicates_across_splits"].metadata["num_shared"].value == 1
    assert not evals["all_source_images_readable"].passed
    assert evals["all_source_images_readable"].metadata["num_skipped"].value == 4
    assert evals["every_class_in_every_split"].passed


def test_skipped_list_is_saved_beside_the_manifest(tmp_path):
    folder = make_image_folder(tmp_path / "folder")
    s = tiny_settings(tmp_path, source=str(folder))
    build(s)
    skipped = pd.read_csv(s.data_dir / "dataset" / "skipped.csv")
    assert len(skipped) == 4 and set(skipped.columns) == {"split", "source_id", "source_path", "reason"}
    assert "train/NORMAL/notes.jpeg" in set(skipped.source_path)


# --- awkward input: EXIF orientation, hidden files, duplicates across splits ----------------


def test_jpeg_with_an_exif_orientation_is_stored_upright():
    upright = np.full((80, 40), 20, np.uint8)  # tall; bright top half
    upright[:40] = 200
    sideways = Image.fromarray(upright).rotate(90, expand=True)  # as a camera stores it: 80 x 40
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    buf = io.BytesIO()
    sideways.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    tagged, plain = standardize_bytes(buf.getvalue(), 32), standardize_bytes(encode(sideways, "JPEG"), 32)
    assert tagged.original_size == (40, 80) and plain.original_size == (80, 40)
    top, bottom = tagged.pixels[:12].mean(), tagged.pixels[-12:].mean()
    assert top > 150 and bottom < 70, (top, bottom)  # upright: bright on top
    left, right = plain.pixels[:, :12].mean(), plain.pixels[:, -12:].mean()
    assert abs(plain.pixels[:12].mean() - plain.pixels[-12:].mean()) < 20 and left > right  # sideways


def test_hidden_files_in_class_folders_are_listed_as_skipped(tmp_path):
    folder = make_image_folder(tmp_path / "folder", bad=False)
    (folder / "validation").rename(folder / "val")  # datasets reads "val" as the validation split
    normal_0 = (folder / "train" / "NORMAL" / "NORMAL_0.jpeg").read_bytes()
    (folder / "train" / "NORMAL" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "train" / "PNEUMONIA" / "._PNEUMONIA_0.jpeg").write_bytes(normal_0)
    (folder / "val" / "NORMAL" / ".ipynb_checkpoints").mkdir()
    (folder / "val" / "NORMAL" / ".ipynb_checkpoints" / "NORMAL_9.jpeg").write_bytes(normal_0)
    report = build(tiny_settings(tmp_path, source=str(folder)))
    assert report.manifest.groupby(["split", "class_name"]).size().eq(3).all()  # nothing hidden read
    hidden = report.skipped.set_index("source_id")
    assert set(hidden.index) == {
        "train/NORMAL/.DS_Store",
        "train/PNEUMONIA/._PNEUMONIA_0.jpeg",
        "val/NORMAL/.ipynb_checkpoints/NORMAL_9.jpeg",
    }
    assert hidden.loc["val/NORMAL/.ipynb_checkpoints/NORMAL_9.jpeg", "split"] == "validation"
    assert hidden.reason.str.startswith("hidden file").all()


def leaky_folder(tmp_path: Path) -> Path:
    """An image folder whose test split holds two copies of one train image under other names."""
    folder = make_image_folder(tmp_path / "folder", bad=False)
    leak = (folder / "train" / "NORMAL" / "NORMAL_0.jpeg").read_bytes()
    (folder / "test" / "NORMAL" / "leak.jpeg").write_bytes(leak)
    (folder / "test" / "NORMAL" / "leak-again.jpeg").write_bytes(leak)
    return folder


def test_train_test_overlap_names_the_files_on_each_side(tmp_path):
    folder = leaky_folder(tmp_path)
    overrides = f'{{"dataset": {{"source": "{folder}", "resolution": 32, "workers": 1}}}}'
    result = materialize_dataset(SettingsResource(data_dir=str(tmp_path / "data"), overrides_json=overrides))
    check = {c.check_name: c for c in result.get_asset_check_evaluations()}["no_duplicates_across_splits"]
    assert not check.passed and check.metadata["num_shared"].value == 1
    (row,) = [r.data for r in check.metadata["shared (files with the same content)"].records]
    assert row["splits"] == "test, train"
    files = row["files"].split("; ")
    assert {"train/NORMAL/NORMAL_0.jpeg", "test/NORMAL/leak.jpeg", "test/NORMAL/leak-again.jpeg"} == set(
        files
    )
    assert "test/NORMAL/leak-again.jpeg" in check.description
    assert check.metadata["duplicates_dropped"].value == 0


def test_drop_cross_split_duplicates_drops_them_from_train_and_records_them(tmp_path):
    folder = leaky_folder(tmp_path)
    overrides = (
        f'{{"dataset": {{"source": "{folder}", "resolution": 32, "workers": 1, '
        '"drop_cross_split_duplicates": true}}'
    )
    result = materialize_dataset(SettingsResource(data_dir=str(tmp_path / "data"), overrides_json=overrides))
    assert result.success
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert checks["no_duplicates_across_splits"].passed
    assert checks["no_duplicates_across_splits"].metadata["duplicates_dropped"].value == 1
    assert checks["all_source_images_readable"].passed  # a deliberate drop is not a bad file
    md = result.asset_materializations_for_node("chest_xray_dataset")[0].metadata
    assert md["duplicates_dropped"].value == 1
    (dropped_row,) = [r.data for r in md["dropped"].records]
    assert dropped_row["source_id"].endswith(":NORMAL_0.jpeg") and "leak.jpeg" in dropped_row["duplicate_of"]
    ds = StandardizedDataset.open(tmp_path / "data" / "dataset")
    train = ds.rows("train")
    assert (train.class_name == "NORMAL").sum() == 2 and not train.source_id.str.contains("NORMAL_0").any()
    assert len(ds.images("train")) == len(train) == 5
    assert len(ds.rows("test")) == 8  # test keeps both copies
    dropped = pd.read_csv(ds.root / "dropped.csv")
    assert list(dropped.columns) == ["split", "source_id", "source_path", "sha256", "duplicate_of", "reason"]
    assert len(dropped) == 1
