"""Classifier input pipeline and training throughput: our way against the plain way, in one run.

Plain way: ``torchvision.datasets.ImageFolder`` over JPEG files, PIL decoding every image every
epoch, then the study's torchvision transforms (Resize, CenterCrop, RandomHorizontalFlip,
RandomRotation, ColorJitter, ToTensor, Normalize), in DataLoader worker processes.
Our way (``synth_xray_assets.classifier.data``): images standardized once into uint8 arrays
(what ``chest_xray_dataset`` stores per dataset version), resized once to the classifier's size
and cached, then augmented per batch on tensors in worker processes.

Printed: (1) loader-only images/s at the study's 224 px, and at 224 px from full-size originals
(``../shared/data/chest-xray-originals-sample``, when present; our cache is the same whatever
the source size); (2) DenseNet-121 training images/s with each loader at a CPU-sized
resolution (64 px by default); (3) the one-off cost of our cache.

    .venv/bin/python benchmarks/classifier.py [--images 512] [--train-resolution 64] \
        [--source ../shared/data/chest-xray-pneumonia-224] [--threads 0] [--workers 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from synth_xray_assets.classifier.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    make_train_loader,
    normalize_batch,
    prepare_images,
)
from synth_xray_assets.classifier.model import build_densenet121
from synth_xray_assets.dataset.standardize import standardize_many
from synth_xray_assets.settings import CLASS_NAMES, ClassifierSettings, PhantomSettings

SHARED = Path(__file__).resolve().parents[1].parent / "shared/data"
DEFAULT = SHARED / "chest-xray-pneumonia-224"
ORIGINALS = SHARED / "chest-xray-originals-sample" / "train"  # full-size JPEGs, as on the Hub


def read_images(source: Path, n: int) -> tuple[list[bytes], list[int], str]:
    """``n`` train images (JPEG bytes) and labels from the shared mirror, else demo phantoms."""
    parquet = source / "data" / "train-00000-of-00001.parquet"
    if parquet.is_file():
        import pyarrow.parquet as pq

        table = pq.read_table(parquet)
        rows = np.random.default_rng(0).choice(table.num_rows, size=min(n, table.num_rows), replace=False)
        picked = table.take(sorted(rows.tolist())).to_pylist()
        return [r["image"]["bytes"] for r in picked], [int(r["label"]) for r in picked], str(source)
    print(f"NOTE: {parquet} is absent (the shared real-data folder); using demo phantoms instead")
    from synth_xray_assets.dataset.phantoms import generate_phantom_split

    phantoms = PhantomSettings(split_counts={"train": (n // 4, n - n // 4)}, min_side=200, max_side=260)
    blobs, labels = generate_phantom_split(phantoms, "train")
    return blobs, labels, "demo phantoms (synthetic, not patients)"


def plain_loader(folder: Path, s: ClassifierSettings, workers: int) -> DataLoader:
    tf = transforms.Compose(
        [
            transforms.Resize(s.resize),
            transforms.CenterCrop(s.resolution),
            transforms.RandomHorizontalFlip(),
            transforms.RandomRotation(s.rotation_degrees),
            transforms.ColorJitter(brightness=s.brightness, contrast=s.contrast),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    return DataLoader(
        datasets.ImageFolder(str(folder), transform=tf),
        batch_size=s.batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        drop_last=True,
    )


def our_loader(arrays: np.ndarray, labels: np.ndarray, s: ClassifierSettings, workers: int):
    """The cached arrays at the classifier's size, and the loader the pipeline trains with."""
    t = time.perf_counter()
    prepared = prepare_images(arrays, s.resize, s.resolution)
    prep_s = time.perf_counter() - t
    loader, sampler = make_train_loader(prepared, labels, s, seed=0, num_workers=workers)
    return loader, sampler, prep_s


def loader_rate(loader, batches: int, post=lambda x: x) -> float:
    """Images/s out of ``loader``, ready for the model (``post``: what the training step adds)."""
    it = iter(loader)
    next(it)  # workers started, first batch out
    t, n = time.perf_counter(), 0
    for _ in range(batches):
        x, _ = next(it)
        n += len(post(x))
    return n / (time.perf_counter() - t)


def train_rate(loader, s: ClassifierSettings, batches: int, post=lambda x: x) -> float:
    torch.manual_seed(0)
    model = build_densenet121(s)
    opt = torch.optim.AdamW(model.parameters(), lr=s.learning_rate, weight_decay=s.weight_decay, foreach=True)
    model.train()
    it = iter(loader)
    t, n = None, 0
    for step in range(batches + 1):
        x, y = next(it)
        loss = F.cross_entropy(model(post(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 0:
            t = time.perf_counter()  # the first step warms up the kernels
        else:
            n += len(y)
    return n / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", type=Path, default=DEFAULT)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--train-resolution", type=int, default=64)
    parser.add_argument("--train-batches", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    blobs, labels, origin = read_images(args.source, args.images)
    y = np.asarray(labels, np.int64)
    print(
        f"{len(blobs)} train images from {origin}; {args.workers} loader workers, "
        f"{torch.get_num_threads()} torch threads"
    )

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "imagefolder"
        for i, (b, label) in enumerate(zip(blobs, labels)):
            (folder / CLASS_NAMES[label]).mkdir(parents=True, exist_ok=True)
            (folder / CLASS_NAMES[label] / f"{i:05d}.jpeg").write_bytes(b)
        study = ClassifierSettings(pretrained="none", batch_size=32)
        small = study.model_copy(
            update={"resolution": args.train_resolution, "resize": round(args.train_resolution * 256 / 224)}
        )

        # the one-off step our way pays once per dataset version: decode + standardize, 2 processes
        t = time.perf_counter()
        arrays = np.stack([r.pixels for r in standardize_many(blobs, study.resize, "L", workers=2)])
        standardize_s = time.perf_counter() - t

        rows, prep = [], {}
        for label, s in (("224 px (study)", study), (f"{small.resolution} px", small)):
            ours, _, prep[label] = our_loader(arrays, y, s, args.workers)
            plain = plain_loader(folder, s, args.workers)
            batches = max(2, len(blobs) // s.batch_size - 2)
            rows.append(
                (
                    f"loader only, {label}",
                    loader_rate(plain, batches),
                    loader_rate(ours, batches, normalize_batch),
                )
            )
            if s is small:
                rows.append(
                    (
                        f"DenseNet-121 training, {label}",
                        train_rate(plain, s, args.train_batches),
                        train_rate(ours, s, args.train_batches, normalize_batch),
                    )
                )
            del ours, plain
        if ORIGINALS.is_dir():
            # The Hub's images are full size (about 1000-2000 px): what plain decoding costs there.
            # Ours does not change: its cache holds the images at the classifier's size already.
            n_orig = sum(1 for _ in ORIGINALS.rglob("*.jpeg"))
            batches = max(2, n_orig // study.batch_size - 2)
            plain_rate = loader_rate(plain_loader(ORIGINALS, study, args.workers), batches)
            rows.append((f"loader only, 224 px, {n_orig} originals", plain_rate, rows[0][2]))

    print(f"{'':36s} {'plain ImageFolder':>18s} {'ours (cached)':>15s} {'speed-up':>9s}")
    for name, plain_r, ours_r in rows:
        print(f"{name:36s} {plain_r:13.1f} im/s {ours_r:10.1f} im/s {ours_r / plain_r:8.2f}x")
    print(
        f"one-off cost of our cache: standardize {len(blobs)} images {standardize_s:.2f} s "
        f"({len(blobs) / standardize_s:.0f} images/s); resize to the classifier's size: "
        + ", ".join(f"{k} {v:.2f} s" for k, v in prep.items())
    )
    print(f"benchmark wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
