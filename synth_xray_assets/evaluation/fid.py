"""FID, KID and precision/recall of image sets against real reference images, with cached reference features.

The study reported one FID per class without saying on what reference set or with what code.
Here both are stated in every result: torch-fidelity's implementation (its extractor factory,
batching loop, ``fid_statistics_to_metric``, ``kid_features_to_metric`` and
``prc_features_to_metric``, the functions ``calculate_metrics`` chains) in a named feature
space, against the reference images the caller passes.

The reference images' features are extracted once per (``reference_cache_key``, feature-space
fingerprint) and kept under ``cache_dir`` as ``.npy`` (written atomically, read with
``allow_pickle=False``; torch-fidelity's own cache unpickles with ``weights_only=False``). A
sidecar JSON records what they are features of, including a hash of the reference images, so
a key reused for other images is recomputed rather than trusted.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

from synth_xray_assets.evaluation.features import FeatureSpace, Unavailable, extract_features
from synth_xray_assets.settings import EvaluationSettings
from synth_xray_assets.storage import save_numpy_atomic, write_json_atomic

IMPLEMENTATION = (
    f"torch-fidelity {torch_fidelity.__version__}: fid_statistics_to_metric, kid_features_to_metric, "
    "prc_features_to_metric (input1 = generated set, input2 = real reference)"
)


@dataclass
class SpaceFeatures:
    """Features of several image sets and of the real reference set, in one feature space."""

    space: FeatureSpace
    sets: dict[str, np.ndarray]  # name -> [N, D]
    reference: np.ndarray  # [M, D]
    reference_cache: dict[str, Any]  # key, hit, path (and a note when a stale entry was replaced)
    seconds: dict[str, float]


@dataclass
class ReferenceImages:
    """Real reference images (uint8 ``[N, H, W]``) and where their features are cached, under what key."""

    images: np.ndarray
    cache_key: str
    cache_dir: str | Path


def features_in_space(
    sets: Mapping[str, np.ndarray],
    reference: ReferenceImages,
    space: FeatureSpace,
    batch_size: int,
    device: str | torch.device = "cpu",
) -> SpaceFeatures:
    """Extract the features of every set in ``sets`` and of ``reference`` (cached), with one extractor."""
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    extractor = space.build(device)
    seconds["build_extractor"] = time.perf_counter() - start
    start = time.perf_counter()
    ref, cache = cached_reference_features(reference, space, extractor, batch_size=batch_size, device=device)
    seconds["reference_features"] = time.perf_counter() - start
    features = {}
    for name, images in sets.items():
        start = time.perf_counter()
        features[name] = extract_features(images, extractor, batch_size, device)
        seconds[f"{name}_features"] = time.perf_counter() - start
    return SpaceFeatures(space, features, ref, cache, seconds)


@dataclass
class SetScores:
    """FID, KID and precision/recall of one image set against the reference; ``None`` where a
    metric cannot be computed, with the reason under ``skipped``."""

    fid: float | None
    kid_mean: float | None
    kid_std: float | None
    precision: float | None
    recall: float | None
    n_images: int
    n_reference: int
    kid_subset_size: int
    kid_subsets: int
    prc_neighborhood: int
    skipped: dict[str, str] = field(default_factory=dict)
    # FID is biased below this many images on either side (evaluation.fid_min_images of the space):
    # ``fid_biased`` then marks it, and it decides nothing.
    fid_min_images: int = 0
    fid_biased: bool = False


@dataclass
class SpaceScores:
    """Every set's scores in one feature space, or (``available`` False) why the space has none."""

    available: bool
    fingerprint: dict[str, Any]  # the space: name, extractor, layer, weights hash, input size
    reason: str = ""
    weights_path: str = ""
    feature_dim: int = 0
    implementation: str = IMPLEMENTATION
    reference_cache: dict[str, Any] = field(default_factory=dict)  # key, hit, path (note)
    scores: dict[str, SetScores] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able data: the fingerprint's keys at the top level beside the scores."""
        if not self.available:
            return {"available": False, **self.fingerprint, "reason": self.reason}
        return {
            "available": True,
            **self.fingerprint,
            "weights_path": self.weights_path,
            "feature_dim": self.feature_dim,
            "implementation": self.implementation,
            "reference_cache": self.reference_cache,
            "scores": {name: asdict(sc) for name, sc in self.scores.items()},
            "seconds": self.seconds,
        }


def score_sets(
    sets: Mapping[str, np.ndarray],
    reference: ReferenceImages,
    space: FeatureSpace | Unavailable,
    settings: EvaluationSettings,
    device: str | torch.device = "cpu",
) -> SpaceScores:
    """FID, KID and precision/recall of every set in ``sets`` against ``reference``.

    The space's fingerprint, the reference cache entry (``hit`` says whether the real images'
    features were reused), ``scores[name]`` from :func:`fidelity_metrics`, and timings. An
    :class:`Unavailable` space gives ``available=False``, the reason and no score.
    """
    if isinstance(space, Unavailable):
        return SpaceScores(False, {"feature_space": space.name}, reason=space.reason)
    feats = features_in_space(sets, reference, space, settings.batch_size, device)
    start = time.perf_counter()
    minimum = settings.fid_min_images.get(space.name, 0)
    scores = {name: fidelity_metrics(f, feats.reference, settings, minimum) for name, f in feats.sets.items()}
    feats.seconds["metrics"] = time.perf_counter() - start
    return SpaceScores(
        True,
        space.fingerprint(),
        weights_path=str(space.weights_path),
        feature_dim=int(feats.reference.shape[1]),
        reference_cache=feats.reference_cache,
        scores=scores,
        seconds={k: round(v, 3) for k, v in feats.seconds.items()},
    )


def fidelity_metrics(
    features: np.ndarray,
    reference_features: np.ndarray,
    settings: EvaluationSettings,
    fid_min_images: int = 0,
) -> SetScores:
    """FID, KID and precision/recall of one set's features against the reference features.

    The FID is marked ``fid_biased`` when either side holds fewer than ``fid_min_images``. KID
    draws ``kid_subsets`` subsets of ``min(kid_subset_size, n, n_reference)`` images;
    precision/recall (Kynkaanniemi et al., k = ``prc_neighborhood``) needs more than k images on
    each side. What cannot be computed is ``None``, with the reason under ``"skipped"``.
    """
    f1 = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    f2 = torch.from_numpy(np.ascontiguousarray(reference_features, dtype=np.float32))
    n1, n2, k = len(f1), len(f2), settings.prc_neighborhood
    subset = min(settings.kid_subset_size, n1, n2)
    out = SetScores(None, None, None, None, None, n1, n2, subset, settings.kid_subsets, k)
    out.fid_min_images, out.fid_biased = fid_min_images, min(n1, n2) < fid_min_images
    skipped = out.skipped
    if min(n1, n2) >= 2:
        stats = fid_features_to_statistics(f1), fid_features_to_statistics(f2)
        out.fid = float(fid_statistics_to_metric(*stats, verbose=False)[KEY_METRIC_FID])
    else:
        skipped["fid"] = f"needs at least 2 images per set (have {n1} and {n2} reference)"
    if subset >= 2:
        kid = kid_features_to_metric(
            f1,
            f2,
            kid_subsets=settings.kid_subsets,
            kid_subset_size=subset,
            rng_seed=settings.metrics_seed,
            verbose=False,
        )
        out.kid_mean, out.kid_std = float(kid[KEY_METRIC_KID_MEAN]), float(kid[KEY_METRIC_KID_STD])
    else:
        skipped["kid"] = f"needs subsets of at least 2 images (have {n1} and {n2} reference)"
    if min(n1, n2) > k:
        prc = prc_features_to_metric(f1, f2, prc_neighborhood=k, verbose=False)
        out.precision, out.recall = float(prc[KEY_METRIC_PRECISION]), float(prc[KEY_METRIC_RECALL])
    else:
        skipped["prc"] = f"needs more than prc_neighborhood={k} images per set (have {n1} and {n2} reference)"
    return out


TOWARD_REAL, AWAY_FROM_REAL, WITHIN_SPREAD, NOT_MEASURED = (
    "toward real",
    "away from real",
    "within the spread",
    "not measured",
)


@dataclass(frozen=True)
class KidComparison:
    """Did fine-tuning move the images toward the real reference? The base model's KID less the
    fine-tuned images' (positive: closer to real) against ``spreads`` times their summed KID spreads."""

    verdict: str  # TOWARD_REAL, AWAY_FROM_REAL, WITHIN_SPREAD or NOT_MEASURED
    difference: float | None  # KID base model - KID fine-tuned
    spread: float | None  # spreads x (std fine-tuned + std base model)


def compare_kid(fine_tuned: SetScores | None, base: SetScores | None, spreads: float) -> KidComparison:
    """The verdict: beyond the spread (mean ± std apart, for ``spreads`` = 1) toward or away from
    real, else within it; not measured when either KID is missing."""
    if fine_tuned is None or base is None or fine_tuned.kid_mean is None or base.kid_mean is None:
        return KidComparison(NOT_MEASURED, None, None)
    difference = base.kid_mean - fine_tuned.kid_mean
    spread = spreads * ((fine_tuned.kid_std or 0.0) + (base.kid_std or 0.0))
    if difference > spread:
        return KidComparison(TOWARD_REAL, difference, spread)
    if -difference > spread:
        return KidComparison(AWAY_FROM_REAL, difference, spread)
    return KidComparison(WITHIN_SPREAD, difference, spread)


def cached_reference_features(
    reference: ReferenceImages,
    space: FeatureSpace,
    extractor: FeatureExtractorBase,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, dict[str, Any]]:
    """Features of the real ``reference`` images in ``space``: from its cache folder when there,
    else extracted with ``extractor`` (already on ``device``) and stored.

    Returns the features and ``{"key", "hit", "path"}`` (plus ``"note"`` when a stale entry, for
    other images under the same key, was replaced).
    """
    cache_key, cache_dir = reference.cache_key, reference.cache_dir
    reference = np.asarray(reference.images)
    full_key = reference_features_key(cache_key, space)
    npy, meta_path = Path(cache_dir) / f"{full_key}.npy", Path(cache_dir) / f"{full_key}.json"
    images_hash = images_sha256(reference)
    info: dict[str, Any] = {"key": full_key, "path": str(npy)}
    if npy.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("images_sha256") == images_hash and meta.get("fingerprint") == space.fingerprint():
            features = np.load(npy, allow_pickle=False)
            if features.shape[0] == len(reference):
                return features, {**info, "hit": True}
        info["note"] = "stale entry (other images under this key) recomputed"
    features = extract_features(reference, extractor, batch_size, device)
    save_numpy_atomic(features, npy)
    write_json_atomic(
        meta_path,
        {
            "cache_key": cache_key,
            "fingerprint": space.fingerprint(),
            "images_sha256": images_hash,
            "images_shape": list(reference.shape),
            "feature_shape": list(features.shape),
            "torch_fidelity": torch_fidelity.__version__,
        },
    )
    return features, {**info, "hit": False}


def reference_features_key(cache_key: str, space: FeatureSpace) -> str:
    """File-name-safe key: the caller's key (dataset version, class), the space, and a digest of its
    fingerprint (extractor, layer, weights hash, input resolution)."""
    digest = hashlib.sha256(json.dumps(space.fingerprint(), sort_keys=True).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", cache_key).strip("._") or "reference"
    return f"{slug[:100]}-{space.name}-{digest}"


def images_sha256(images: np.ndarray) -> str:
    """sha256 of an image array's shape, dtype and bytes."""
    images = np.ascontiguousarray(images)
    h = hashlib.sha256(f"{images.shape}|{images.dtype}".encode())
    h.update(memoryview(images).cast("B"))
    return h.hexdigest()


def real_floor_set(pool: np.ndarray, size: int, seed: int) -> np.ndarray:
    """The real-versus-real floor's set: ``size`` real images (all of ``pool`` when it has fewer)
    drawn without replacement with ``seed`` from ``pool``, which must be disjoint from the reference.

    Scored against the reference like a synthetic set of that size, it gives the FID a set of
    real images reaches: how far from "as good as real" the synthetic images are.
    """
    pool = np.asarray(pool)
    n = min(size, len(pool))
    pick = np.sort(np.random.default_rng(seed).choice(len(pool), size=n, replace=False))
    return pool[pick]
