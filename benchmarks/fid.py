"""FID throughput: feature extraction images/s, and the time the cached reference features save.

Two figures, in one run:

1. Feature extraction (torch-fidelity's batching loop through our registered extractors):
   images/s of the chest-X-ray DenseNet-121 at the demo's and the full profile's input sizes,
   and of Inception (``inception-v3-compat``, 299 px).
2. Scoring one synthetic set against a real reference set, three ways: the plain way
   (torch-fidelity's ``calculate_metrics`` with ``cache=False``: the reference features are
   extracted on every call), our first call (reference features extracted and stored), and our
   later calls (reference features read back from disk). The difference is the time saved per
   call, for instance for each re-materialization of ``fid_scores`` and for ``memorization``.

Network weights are random (seeded): a DenseNet-121 as the classifier domain builds it and a
random-weight Inception file. Speed does not depend on the weights, and no download is needed.
Images are real radiographs from ``../shared/data/chest-xray-pneumonia-224`` when present,
random otherwise (speed does not depend on the content either).

    .venv/bin/python benchmarks/fid.py [--n-reference 512] [--n-synthetic 64] [--resolution 64]
"""

from __future__ import annotations

import argparse
import atexit
import io
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch_fidelity import calculate_metrics

from synth_xray_assets.classifier.model import build_densenet121, save_classifier

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "synth_xray_assets_tests"))
from fixtures import write_random_inception_weights  # noqa: E402 (test fixtures shared with the tests)

from synth_xray_assets.evaluation.features import (
    CXR_EXTRACTOR,
    GrayImageDataset,
    extract_features,
    get_feature_space,
)
from synth_xray_assets.evaluation.fid import ReferenceImages, score_sets
from synth_xray_assets.settings import ClassifierSettings, EvaluationSettings

SHARED = Path(__file__).resolve().parents[1].parent / "shared/data/chest-xray-pneumonia-224/data"


def load_images(n: int) -> tuple[np.ndarray, str]:
    path = SHARED / "train-00000-of-00001.parquet"
    if not path.is_file():
        rng = np.random.default_rng(0)
        return rng.integers(0, 256, (n, 224, 224), dtype=np.uint8), "random uint8 (shared data absent)"
    frame = pd.read_parquet(path).iloc[:n]
    images = np.stack([np.asarray(Image.open(io.BytesIO(b["bytes"])).convert("L")) for b in frame["image"]])
    return images, f"real train images from {path.parent.parent.name} (224 px)"


def throughput(images: np.ndarray, space, settings: EvaluationSettings, device: str) -> float:
    extractor = space.build(device)
    extract_features(images[: settings.batch_size], extractor, settings.batch_size, device)  # warm-up
    start = time.perf_counter()
    extract_features(images, extractor, settings.batch_size, device)
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n-reference", type=int, default=512)
    parser.add_argument("--n-synthetic", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=64, help="cxr input size for part 2")
    parser.add_argument("--n-throughput", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    images, source = load_images(args.n_reference + args.n_synthetic)
    reference, synthetic = images[: args.n_reference], images[args.n_reference :]
    print(f"images: {source}; device {args.device}, {torch.get_num_threads()} torch threads")
    work = Path(tempfile.mkdtemp(prefix="fid-bench-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    torch.manual_seed(0)
    weights = save_classifier(
        build_densenet121(ClassifierSettings(pretrained="none")), work / "cxr.safetensors"
    )
    inception = write_random_inception_weights(work / "inception.pth")

    print("\n1. feature extraction (torch-fidelity batching loop, batch 64)")
    sample = images[: args.n_throughput]
    for resolution in (64, 224):
        settings = EvaluationSettings(feature_resolution=resolution)
        rate = throughput(sample, get_feature_space("cxr", settings, weights), settings, args.device)
        print(f"   cxr DenseNet-121 @ {resolution:3d} px: {rate:8.1f} images/s ({len(sample)} images)")
    settings = EvaluationSettings(inception_weights=str(inception))
    rate = throughput(sample[:64], get_feature_space("inception", settings), settings, args.device)
    print(f"   Inception v3 (compat) @ 299 px: {rate:8.1f} images/s (64 images)")

    settings = EvaluationSettings(feature_resolution=args.resolution, kid_subset_size=args.n_synthetic)
    space = get_feature_space("cxr", settings, weights)
    print(
        f"\n2. one score (FID + KID + precision/recall, cxr @ {args.resolution} px): "
        f"{args.n_synthetic} synthetic vs {args.n_reference} reference images"
    )
    start = time.perf_counter()
    plain = calculate_metrics(
        input1=GrayImageDataset(synthetic),
        input2=GrayImageDataset(reference),
        fid=True,
        kid=True,
        prc=True,
        feature_extractor=CXR_EXTRACTOR,
        feature_extractor_weights_path=str(weights),
        cxr_feature_resolution=args.resolution,
        kid_subset_size=args.n_synthetic,
        cuda=args.device.startswith("cuda"),
        cache=False,
        verbose=False,
        save_cpu_ram=True,
    )
    plain_s = time.perf_counter() - start
    times, results = [], []
    for _ in range(3):
        start = time.perf_counter()
        results.append(
            score_sets(
                {"synthetic": synthetic},
                ReferenceImages(reference, "bench-train-normal", work / "cache"),
                space,
                settings,
                device=args.device,
            )
        )
        times.append(time.perf_counter() - start)
    fid = results[-1].scores["synthetic"].fid
    assert abs(fid - plain["frechet_inception_distance"]) < 1e-3 * max(1.0, abs(fid)), "scores differ"
    hits = [r.reference_cache["hit"] for r in results]
    print(f"   plain (calculate_metrics, cache=False, recomputes the reference): {plain_s:6.2f} s")
    print(f"   ours, first call (reference extracted and stored, hit={hits[0]}):  {times[0]:6.2f} s")
    warm = min(times[1:])
    print(f"   ours, later calls (reference read from disk, hit={hits[1]}):      {warm:6.2f} s")
    print(
        f"   saved per later call: {plain_s - warm:6.2f} s ({plain_s / warm:.1f}x faster than the plain way)"
    )
    print(f"   (same FID both ways: {fid:.4f}; timing breakdown of a later call: {results[-1].seconds})")


if __name__ == "__main__":
    main()
