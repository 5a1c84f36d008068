"""The real floor of the chest-X-ray FD: real training images against real test images of each class.

What "as good as real" scores: a synthetic set cannot be expected to come closer to the training
images than other real patients' images do. The feature space is the one ``fid_scores`` uses, a
DenseNet-121 trained with the classifier recipe on the real training split
(``evaluation.extractor.train_cxr_feature_extractor``), here from random initialisation (no
download) at a CPU-feasible size; the scores go through ``evaluation.fid.score_sets``, the
function the asset calls, with the training images of the class as the reference set.

For scale, the test images of the *other* class are scored against the same reference: a space
that tells the classes apart puts them clearly further away. FD falls as the number of images
grows, so compare figures at similar counts (the test sets have 234 NORMAL and 390 PNEUMONIA).

    .venv/bin/python benchmarks/fid_real_floor.py [--resolution 64] [--epochs 3]
"""

from __future__ import annotations

import argparse
import atexit
import io
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from synth_xray_assets.classifier.data import SplitArrays
from synth_xray_assets.evaluation.extractor import train_cxr_feature_extractor
from synth_xray_assets.evaluation.features import get_feature_space
from synth_xray_assets.evaluation.fid import ReferenceImages, score_sets
from synth_xray_assets.settings import CLASS_NAMES, ClassifierSettings, EvaluationSettings

DATA = Path(__file__).resolve().parents[1].parent / "shared/data/chest-xray-pneumonia-224"


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 grayscale images [N, 224, 224] and labels of one split of the shared parquet mirror."""
    frame = pd.read_parquet(DATA / "data" / f"{split}-00000-of-00001.parquet")
    images = np.stack([np.asarray(Image.open(io.BytesIO(b["bytes"])).convert("L")) for b in frame["image"]])
    return images, frame["label"].to_numpy(np.int64)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f"SKIP: {DATA} is absent (the shared real-data folder)")
        return
    started = time.perf_counter()
    splits = {split: load_split(split) for split in ("train", "validation", "test")}
    print(
        f"data: {DATA.name}, "
        + ", ".join(f"{s} {len(y)} ({np.bincount(y, minlength=2).tolist()})" for s, (_, y) in splits.items())
    )

    classifier = ClassifierSettings(pretrained="none", batch_size=args.batch_size, num_workers=2)
    evaluation = EvaluationSettings(
        feature_resolution=args.resolution, feature_epochs=args.epochs, batch_size=128, kid_subset_size=1000
    )
    work = Path(tempfile.mkdtemp(prefix="fid-floor-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    print(
        f"training the cxr feature extractor: DenseNet-121 from random init, {args.resolution} px, "
        f"{args.epochs} epochs, batch {args.batch_size}, lr {classifier.learning_rate}, on {args.device}"
    )
    info = train_cxr_feature_extractor(
        SplitArrays(*splits["train"], *splits["validation"], *splits["test"]),
        classifier,
        evaluation,
        work,
        device=args.device,
        log=lambda m: print("  ", m),
    )
    print(
        f"extractor: selected epoch {info.selected_epoch}/{info.epochs}, validation accuracy "
        f"{info.validation_accuracy:.3f} ({info.n_validation} images), test accuracy "
        f"{info.test_accuracy:.3f}, test AUC {info.test_auc:.3f}, {info.train_time_s:.0f} s training"
    )
    space = get_feature_space("cxr", evaluation, info.weights_path)
    (train_x, train_y), (test_x, test_y) = splits["train"], splits["test"]
    print(
        "\nchest-X-ray FD (Frechet distance of pooled DenseNet-121 features); reference = real train, class"
    )
    header = ("reference (train)", "scored set", "n", "n_ref", "FD", "KID", "prec", "rec")
    print("{:<22}{:<24}{:>6}{:>7}{:>10}{:>10}{:>7}{:>7}".format(*header))
    for label, name in enumerate(CLASS_NAMES):
        other = CLASS_NAMES[1 - label]
        result = score_sets(
            {f"test {name}": test_x[test_y == label], f"test {other} (other)": test_x[test_y != label]},
            ReferenceImages(train_x[train_y == label], f"floor-train-{name}", work / "cache"),
            space,
            evaluation,
            device=args.device,
        )
        for set_name, sc in result.scores.items():
            print(
                f"{'train ' + name:<22}{set_name:<24}{sc.n_images:>6}{sc.n_reference:>7}"
                f"{sc.fid:>10.2f}{sc.kid_mean:>10.4f}{sc.precision:>7.3f}{sc.recall:>7.3f}"
            )
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
