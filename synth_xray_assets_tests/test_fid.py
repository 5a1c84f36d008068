"""FID / KID / precision-recall through ``score_sets``, the function the ``fid_scores`` asset calls.

Feature networks here have random, seeded weights (no downloads): the scores mean nothing about
chest X-rays, but a set against itself must score ~0, a shifted set must score clearly higher,
and the caching and the fallbacks must behave. Sets are small: FID's cost here is one
eigen-decomposition of a 1024 x 1024 (Inception: 2048 x 2048) matrix per score.
"""

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fixtures import write_random_inception_weights
from safetensors.torch import save_file
from torch_fidelity import calculate_metrics

from synth_xray_assets.classifier.model import build_densenet121, save_classifier
from synth_xray_assets.evaluation.features import (
    CXR_EXTRACTOR,
    GrayImageDataset,
    build_cxr_extractor,
    extract_features,
    get_feature_space,
    load_densenet_features,
    resolve_inception_weights,
)
from synth_xray_assets.evaluation.fid import (
    AWAY_FROM_REAL,
    NOT_MEASURED,
    TOWARD_REAL,
    WITHIN_SPREAD,
    ReferenceImages,
    SetScores,
    cached_reference_features,
    compare_kid,
    fidelity_metrics,
    reference_features_key,
    score_sets,
)
from synth_xray_assets.settings import ClassifierSettings, EvaluationSettings

SETTINGS = EvaluationSettings(
    feature_resolution=64, batch_size=16, kid_subset_size=16, kid_subsets=20, inception_download=False
)


def phantoms(n: int, size: int = 48, seed: int = 0) -> np.ndarray:
    """Chest-X-ray-like uint8 images [n, size, size]: a gradient, two dark lung fields, smooth texture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        img = 0.55 + 0.25 * yy + 0.15 * rng.standard_normal()
        for side in (-1, 1):
            cx, cy = 0.5 + side * rng.uniform(0.15, 0.28), rng.uniform(0.4, 0.6)
            rx, ry = rng.uniform(0.08, 0.2), rng.uniform(0.18, 0.35)
            img = img - rng.uniform(0.2, 0.45) * (((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1)
        texture = torch.from_numpy(rng.standard_normal((1, 1, 6, 6))).float()
        img = img + 0.15 * F.interpolate(texture, size=(size, size), mode="bicubic")[0, 0].numpy()
        out.append(np.clip(img * 255, 0, 255).astype(np.uint8))
    return np.stack(out)


def shifted(images: np.ndarray, strength: float, seed: int = 1) -> np.ndarray:
    """Brightened, blurred and noised copies; ``strength`` 0 returns the images unchanged."""
    x = torch.from_numpy(images).float().unsqueeze(1)
    blurred = F.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=False)
    x = (1 - strength) * x + strength * blurred + 60 * strength
    noise = np.random.default_rng(seed).normal(0, 25 * strength, images.shape)
    return np.clip(x[:, 0].numpy() + noise, 0, 255).astype(np.uint8)


def classifier_file(path: Path, seed: int = 0) -> Path:
    """A randomly initialised classifier (the classifier domain's DenseNet-121 + head) as safetensors."""
    torch.manual_seed(seed)
    return save_classifier(build_densenet121(ClassifierSettings(pretrained="none")), path)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return classifier_file(tmp_path_factory.mktemp("w") / "cxr.safetensors")


@pytest.fixture(scope="module")
def real() -> np.ndarray:
    return phantoms(32, seed=1)


def score(sets, reference, weights, cache_dir, settings=SETTINGS, space="cxr", key="v1-train-normal"):
    return score_sets(
        sets,
        ReferenceImages(reference, key, cache_dir),
        get_feature_space(space, settings, cxr_weights=weights),
        settings,
    )


@pytest.fixture(scope="module")
def scored(weights, real, tmp_path_factory):
    sets = {"same": real, "mild": shifted(real, 0.3), "strong": shifted(real, 1.0)}
    return score(sets, real, weights, tmp_path_factory.mktemp("cache"))


def test_fid_is_zero_for_the_same_set_and_grows_with_the_shift(scored):
    same, mild, strong = (scored.scores[k] for k in ("same", "mild", "strong"))
    assert scored.available and scored.feature_dim == 1024 and scored.fingerprint["feature_resolution"] == 64
    assert (
        scored.fingerprint["feature_extractor"] == CXR_EXTRACTOR and "torch-fidelity" in scored.implementation
    )
    assert abs(same.fid) < 1e-3
    assert mild.fid > 1000 * max(abs(same.fid), 1e-6)
    assert strong.fid > 2 * mild.fid
    assert strong.kid_mean > mild.kid_mean > same.kid_mean
    assert same.precision == same.recall == 1.0
    assert strong.recall < 1.0  # fewer real images lie near a shifted set
    assert (same.n_images, same.n_reference, same.kid_subset_size) == (32, 32, 16)
    assert same.skipped == {}
    assert scored.reference_cache["hit"] is False


def test_scores_match_torch_fidelity_calculate_metrics(scored, weights, real):
    """Our extractor is registered with torch-fidelity: its calculate_metrics gives the same numbers."""
    ours = scored.scores["mild"]
    theirs = calculate_metrics(
        input1=GrayImageDataset(shifted(real, 0.3)),
        input2=GrayImageDataset(real),
        fid=True,
        kid=True,
        prc=True,
        feature_extractor=CXR_EXTRACTOR,
        feature_extractor_weights_path=str(weights),
        cxr_feature_resolution=SETTINGS.feature_resolution,
        kid_subsets=SETTINGS.kid_subsets,
        kid_subset_size=16,
        cuda=False,
        cache=False,
        verbose=False,
        save_cpu_ram=True,
    )
    assert ours.fid == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6)
    assert ours.kid_mean == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-6)
    assert (ours.precision, ours.recall) == (theirs["precision"], theirs["recall"])


def test_reference_features_are_cached_per_key_and_feature_space(weights, real, tmp_path):
    space = get_feature_space("cxr", SETTINGS, cxr_weights=weights)
    extractor = space.build()
    images = real[:16]

    def cached(images, key="v1-train-normal"):
        return cached_reference_features(ReferenceImages(images, key, tmp_path), space, extractor)

    first, first_info = cached(images)
    again, again_info = cached(images)
    assert (first_info["hit"], again_info["hit"]) == (False, True)
    np.testing.assert_array_equal(first, again)
    assert Path(first_info["path"]).is_file() and first_info["path"] == again_info["path"]

    # Another class (key), input resolution or weights file is another entry.
    other_res = get_feature_space("cxr", SETTINGS.model_copy(update={"feature_resolution": 32}), weights)
    other_weights = get_feature_space("cxr", SETTINGS, classifier_file(tmp_path / "w1.safetensors", seed=1))
    keys = {
        reference_features_key("v1-train-normal", space),
        reference_features_key("v1-train-pneumonia", space),
        reference_features_key("v1-train-normal", other_res),
        reference_features_key("v1-train-normal", other_weights),
    }
    assert len(keys) == 4 and Path(first_info["path"]).stem in keys

    # The same key over other images is not trusted: recomputed.
    stale, stale_info = cached(images[:12])
    assert not stale_info["hit"] and "stale" in stale_info["note"] and len(stale) == 12


def test_small_sets_skip_what_cannot_be_computed():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(10, 8)).astype(np.float32)
    three = fidelity_metrics(rng.normal(size=(3, 8)), reference, SETTINGS)
    assert three.fid is not None and three.kid_subset_size == 3
    assert three.precision is None and "prc" in three.skipped
    one = fidelity_metrics(rng.normal(size=(1, 8)), reference, SETTINGS)
    assert one.fid is None and one.kid_mean is None and set(one.skipped) == {"fid", "kid", "prc"}


def test_fid_below_the_spaces_minimum_is_marked_biased_and_kid_stays_unbiased():
    """FID of two draws of one distribution grows as n falls (its bias); KID's mean does not."""
    rng = np.random.default_rng(1)
    dim = 32
    reference = rng.normal(size=(400, dim))
    small, large = (fidelity_metrics(rng.normal(size=(n, dim)), reference, SETTINGS, 64) for n in (20, 400))
    assert small.fid_biased and small.fid_min_images == 64 and not large.fid_biased
    assert small.fid > 2 * large.fid  # the same distribution: all of the difference is bias
    assert abs(small.kid_mean) < 3 * small.kid_std and abs(large.kid_mean) < 3 * large.kid_std
    assert not fidelity_metrics(rng.normal(size=(20, dim)), reference, SETTINGS).fid_biased  # no minimum


def kid(mean: float | None, std: float | None) -> SetScores:
    return SetScores(None, mean, std, None, None, 50, 100, 16, 100, 3)


def test_fine_tuning_moved_images_only_beyond_the_spread():
    assert compare_kid(kid(0.01, 0.005), kid(0.05, 0.01), 1.0).verdict == TOWARD_REAL
    away = compare_kid(kid(0.05, 0.01), kid(0.01, 0.005), 1.0)
    assert away.verdict == AWAY_FROM_REAL and away.difference == pytest.approx(-0.04)
    within = compare_kid(kid(0.03, 0.01), kid(0.045, 0.01), 1.0)  # 0.015 apart, spreads sum to 0.02
    assert within.verdict == WITHIN_SPREAD and within.spread == pytest.approx(0.02)
    assert compare_kid(kid(0.03, 0.01), kid(0.045, 0.01), 0.5).verdict == TOWARD_REAL
    assert compare_kid(kid(None, None), kid(0.05, 0.01), 1.0).verdict == NOT_MEASURED
    assert compare_kid(kid(0.01, 0.005), None, 1.0).verdict == NOT_MEASURED


def test_classifier_files_load_and_wrong_or_missing_files_fail_clearly(weights, real, tmp_path):
    """The classifier's file (DenseNet-121 + Linear-ReLU-Dropout-Linear head) gives its features."""
    torch.manual_seed(3)
    model = build_densenet121(ClassifierSettings(pretrained="none"))
    path = save_classifier(model, tmp_path / "classifier.safetensors")
    loaded = load_densenet_features(path)
    for key, value in model.features.state_dict().items():
        assert torch.equal(loaded.features.state_dict()[key], value)
    from_file = extract_features(real[:4], get_feature_space("cxr", SETTINGS, path).build())
    from_module = extract_features(real[:4], build_cxr_extractor(model, feature_resolution=64))
    np.testing.assert_allclose(from_file, from_module, rtol=1e-5, atol=1e-6)
    assert from_file.shape == (4, 1024)

    save_file({"fc.weight": torch.zeros(2, 2)}, str(tmp_path / "not_densenet.safetensors"))
    with pytest.raises(RuntimeError, match="could not load the cxr feature extractor.*not_densenet"):
        get_feature_space("cxr", SETTINGS, tmp_path / "not_densenet.safetensors").build()
    with pytest.raises(FileNotFoundError, match="materialize cxr_feature_extractor"):
        get_feature_space("cxr", SETTINGS, tmp_path / "missing.safetensors")


def test_inception_with_a_local_weights_file_gives_finite_scores(real, tmp_path):
    """The Inception space with a local file named by ``evaluation.inception_weights``.

    The file is made here by ``write_random_inception_weights``: a RANDOM-WEIGHT state dict of
    torch-fidelity's own ``FeatureExtractorInceptionV3`` module, saved with ``torch.save`` (the
    format ``inception-v3-compat`` loads). We load it with ``weights_only=True`` and strict keys,
    so a wrong format would fail. The score is meaningless; the code path and its finiteness
    are what is tested.
    """
    path = write_random_inception_weights(tmp_path / "inception.pth", seed=0)
    settings = SETTINGS.model_copy(update={"inception_weights": str(path)})
    result = score({"synthetic": shifted(real[:10], 1.0)}, real[:10], None, tmp_path, settings, "inception")
    scores = result.scores["synthetic"]
    assert result.available and result.fingerprint["feature_extractor"] == "inception-v3-compat-local"
    assert result.feature_dim == 2048 and result.fingerprint["feature_resolution"] == 299
    assert math.isfinite(scores.fid) and scores.fid > 0 and math.isfinite(scores.kid_mean)
    assert scores.n_images == scores.n_reference == 10


def test_inception_without_weights_or_network_is_unavailable_with_a_reason(real, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # no cached download
    # A port nothing listens on: the download fails at once, as it does without network.
    failing = SETTINGS.model_copy(
        update={"inception_download": True, "inception_url": "http://127.0.0.1:9/weights-inception.pth"}
    )
    result = score({"synthetic": real}, real, None, tmp_path, failing, "inception")
    assert result.to_dict() == {"available": False, "feature_space": "inception", "reason": result.reason}
    assert "download" in result.reason and "127.0.0.1:9" in result.reason
    assert not any((tmp_path / "hub").rglob("*.pth"))

    missing = SETTINGS.model_copy(update={"inception_weights": str(tmp_path / "nope.pth")})
    result = score({"synthetic": real}, real, None, tmp_path, missing, "inception")
    assert result.available is False and "not found" in result.reason

    result = score({"synthetic": real}, real, None, tmp_path, SETTINGS, "inception")  # download disabled
    assert result.available is False and "disabled" in result.reason


def test_inception_download_checks_the_sha256_prefix_in_its_name(tmp_path, monkeypatch):
    """torch hub's downloader fetches the file (here from a file:// URL) and checks the sha256
    prefix the name carries; a file whose hash does not match is not kept."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    payload = write_random_inception_weights(tmp_path / "w.pth", seed=1).read_bytes()
    good = tmp_path / f"weights-inception-{hashlib.sha256(payload).hexdigest()[:8]}.pth"
    good.write_bytes(payload)
    found = resolve_inception_weights(
        SETTINGS.model_copy(update={"inception_download": True, "inception_url": good.as_uri()})
    )
    assert found.source == "downloaded" and found.path.read_bytes() == payload

    found.path.unlink()
    bad = tmp_path / "weights-inception-00000000.pth"
    bad.write_bytes(payload)
    found = resolve_inception_weights(
        SETTINGS.model_copy(update={"inception_download": True, "inception_url": bad.as_uri()})
    )
    assert found.source == "unavailable" and "hash" in found.reason.lower() and "00000000" in found.reason
    assert not any((tmp_path / "hub").rglob("*.pth"))
