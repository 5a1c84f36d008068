"""The memorization check: nearest real image of every synthetic image, in features and in pixels."""

import numpy as np
import pytest
import torch
from PIL import Image

from synth_xray_assets.classifier.model import build_densenet121
from synth_xray_assets.evaluation.features import build_cxr_extractor, extract_features
from synth_xray_assets.evaluation.memorization import (
    COLUMNS,
    PairsView,
    closest_pairs_image,
    memorization_histogram,
    memorization_summary,
    nearest_real_images,
    real_baseline,
)
from synth_xray_assets.settings import ClassifierSettings, EvaluationSettings
from synth_xray_assets_tests.test_fid import phantoms, shifted

SETTINGS = EvaluationSettings(batch_size=16, memorization_pixel_size=32)


@pytest.fixture(scope="module")
def extractor():
    torch.manual_seed(0)
    return build_cxr_extractor(
        build_densenet121(ClassifierSettings(pretrained="none")), feature_resolution=48
    )


@pytest.fixture(scope="module")
def case(extractor):
    """24 real phantoms; 8 new ones (other seed), one of them replaced by a copy of real image 5."""
    real = phantoms(24, seed=1)
    synthetic = phantoms(8, seed=2)
    synthetic[3] = real[5]
    synthetic[6] = shifted(real[9:10], 0.05, seed=4)[0]  # a lightly altered copy
    feats = extract_features(real, extractor, 16), extract_features(synthetic, extractor, 16)
    return real, synthetic, feats[0], feats[1]


def test_a_planted_copy_of_a_training_image_is_flagged(case):
    real, synthetic, real_f, syn_f = case
    table = nearest_real_images(synthetic, real, syn_f, real_f, SETTINGS)
    assert list(table.columns) == list(COLUMNS) and len(table) == 8
    copy = table.loc[3]
    assert copy.nearest_real_index == 5 and copy.nearest_real_index_pixel == 5
    assert copy.cosine_distance < 1e-6 and copy.pixel_correlation > 0.9999
    assert copy.near_copy_feature and copy.near_copy_pixel and copy.near_copy
    altered = table.loc[6]
    assert altered.nearest_real_index_pixel == 9 and altered.near_copy
    assert table.near_copy.sum() == 2, table  # the fresh images are not flagged

    summary = memorization_summary(table, SETTINGS)
    assert summary["n_near_copies"] == 2 and summary["min_cosine_distance"] < 1e-6


def test_real_baseline_leaves_each_image_out_and_finds_real_duplicates(case):
    real, _, real_f, _ = case
    baseline = real_baseline(real, real_f, SETTINGS)
    assert (baseline.nearest_real_index != baseline.real_index).all()
    assert baseline.near_copy.sum() == 0
    duplicated = np.concatenate([real, real[:1]])  # the dataset has byte-identical duplicates
    dup_f = np.concatenate([real_f, real_f[:1]])
    flagged = real_baseline(duplicated, dup_f, SETTINGS)
    assert set(flagged.index[flagged.near_copy]) == {0, 24}


def test_pictures_for_the_ui(case):
    real, synthetic, real_f, syn_f = case
    table = nearest_real_images(synthetic, real, syn_f, real_f, SETTINGS)
    pairs = closest_pairs_image(synthetic, real, table, PairsView(n=4, cell=40, pairs_per_row=2))
    assert isinstance(pairs, Image.Image) and pairs.size == (4 * 40, 2 * 40)
    top_left = np.asarray(pairs.convert("L"))[:40, :40].astype(int)  # the closest synthetic image: the copy
    expected = np.asarray(Image.fromarray(real[5]).resize((40, 40), Image.Resampling.BILINEAR)).astype(int)
    assert np.abs(top_left - expected).mean() < 2
    by_pixels = closest_pairs_image(synthetic, real, table, PairsView("pixel_correlation", 2, cell=40))
    assert by_pixels.size == (4 * 40, 40)
    histogram = memorization_histogram(table, SETTINGS, real_baseline(real, real_f, SETTINGS))
    assert histogram.size[0] > 400 and histogram.mode == "RGB"
