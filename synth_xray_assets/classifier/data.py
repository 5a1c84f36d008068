"""Experiment composition, the resized-once image cache, and tensor augmentation.

Images are resized and center-cropped once (the study's ``Resize(resize)`` +
``CenterCrop(resolution)``) into a uint8 tensor kept in memory; each training batch is then
augmented on tensors (flip, rotation, brightness/contrast jitter), replicated to three
channels and normalised with ImageNet statistics. Nothing is decoded from disk per epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from synth_xray_assets.settings import ClassifierSettings
from synth_xray_assets.storage import save_numpy_atomic

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NUM_CLASSES = 2


def _class_count(n: int, fraction: float) -> int:
    """``fraction`` of ``n``, rounded half up (so 10% of 3875 is 388, as the study's 522 needs)."""
    return min(n, int(math.floor(fraction * n + 0.5)))


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into ``(keep_idx, val_idx)`` with ``fraction`` of each class in ``val_idx``.

    Each class with at least two images gives at least one to validation when ``fraction > 0``.
    Both index arrays are sorted.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    val: list[np.ndarray] = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        n_val = _class_count(len(idx), fraction)
        if fraction > 0 and n_val == 0 and len(idx) >= 2:
            n_val = 1
        val.append(rng.choice(idx, size=n_val, replace=False))
    val_idx = np.sort(np.concatenate(val)) if val else np.array([], dtype=np.int64)
    keep_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return keep_idx.astype(np.int64), val_idx.astype(np.int64)


def compose_experiment(
    real_labels: np.ndarray,
    synthetic_labels: np.ndarray,
    real_fraction: float,
    n_synthetic: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(real_idx, synth_idx)`` of one experiment's training set.

    Real: ``real_fraction`` of each class (rounded half up), drawn with ``seed``; all of them
    when the fraction is 1. Synthetic: class-balanced, ``n_synthetic // 2`` NORMAL and the rest
    PNEUMONIA, drawn with ``seed``. Raises ``ValueError`` when a class has too few synthetic images.
    """
    if not 0.0 <= real_fraction <= 1.0:
        raise ValueError(f"real_fraction must be in [0, 1], got {real_fraction}")
    if n_synthetic < 0:
        raise ValueError(f"n_synthetic must be >= 0, got {n_synthetic}")
    real_labels = np.asarray(real_labels)
    synthetic_labels = np.asarray(synthetic_labels)
    rng = np.random.default_rng(seed)
    real: list[np.ndarray] = []
    for cls in range(NUM_CLASSES):
        idx = np.flatnonzero(real_labels == cls)
        k = _class_count(len(idx), real_fraction)
        real.append(idx if k == len(idx) else rng.choice(idx, size=k, replace=False))
    synth: list[np.ndarray] = []
    wanted = (n_synthetic // 2, n_synthetic - n_synthetic // 2)
    for cls, k in enumerate(wanted):
        idx = np.flatnonzero(synthetic_labels == cls)
        if k > len(idx):
            raise ValueError(
                f"experiment needs {k} synthetic images of class {cls} ({n_synthetic} class-balanced) "
                f"but only {len(idx)} exist; generate more or lower the experiment's synthetic count"
            )
        synth.append(rng.choice(idx, size=k, replace=False))
    return np.sort(np.concatenate(real)).astype(np.int64), np.sort(np.concatenate(synth)).astype(np.int64)


def assemble_training_set(
    real_x: torch.Tensor,
    real_y: np.ndarray,
    synth_x: torch.Tensor | None,
    synth_y: np.ndarray | None,
    real_idx: np.ndarray,
    synth_idx: np.ndarray,
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """The chosen real and synthetic images together: ``(images, labels, source)`` (source 1 = synthetic)."""
    xs = [real_x[torch.as_tensor(real_idx, dtype=torch.long)]]
    ys = [np.asarray(real_y)[real_idx]]
    if len(synth_idx):
        if synth_x is None or synth_y is None:
            raise ValueError("synthetic indices given without synthetic images")
        xs.append(synth_x[torch.as_tensor(synth_idx, dtype=torch.long)])
        ys.append(np.asarray(synth_y)[synth_idx])
    source = np.concatenate([np.zeros(len(real_idx), np.int64), np.ones(len(synth_idx), np.int64)])
    return torch.cat(xs), np.concatenate(ys).astype(np.int64), source


# ---------------------------------------------------------------- image cache


def prepare_images(
    images: np.ndarray | torch.Tensor, resize: int, resolution: int, chunk: int = 256
) -> torch.Tensor:
    """Resize (shorter side to ``resize``, antialiased bilinear) and center-crop to ``resolution``, once.

    ``images`` is uint8 ``[N, H, W]``; returns a contiguous uint8 tensor ``[N, resolution, resolution]``.
    """
    x = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    if x.dtype != torch.uint8 or x.ndim != 3:
        raise ValueError(f"expected uint8 images [N, H, W], got {x.dtype} {tuple(x.shape)}")
    if resolution > resize:
        raise ValueError(f"resolution {resolution} larger than resize {resize}")
    n, h, w = x.shape
    scale = resize / min(h, w)
    new_h, new_w = max(resize, round(h * scale)), max(resize, round(w * scale))
    top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    out = torch.empty((n, resolution, resolution), dtype=torch.uint8)
    for start in range(0, n, chunk):
        block = x[start : start + chunk].unsqueeze(1).float()
        if (new_h, new_w) != (h, w):
            block = F.interpolate(
                block, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False
            )
        block = block[:, 0, top : top + resolution, left : left + resolution]
        out[start : start + chunk] = block.round().clamp(0, 255).to(torch.uint8)
    return out


def cached_prepared_images(
    images: np.ndarray | torch.Tensor, settings: ClassifierSettings, path: str | Path | None = None
) -> torch.Tensor:
    """:func:`prepare_images` at the classifier's size, reusing ``path`` (``.npy``) when it fits.

    Name ``path`` after the dataset version: a file there with the right shape is trusted.
    """
    n = len(images)
    if path is not None and Path(path).is_file():
        cached = np.load(path, allow_pickle=False)
        if cached.dtype == np.uint8 and cached.shape == (n, settings.resolution, settings.resolution):
            return torch.from_numpy(np.ascontiguousarray(cached))
    prepared = prepare_images(images, settings.resize, settings.resolution)
    if path is not None:
        save_numpy_atomic(prepared.numpy(), path)
    return prepared


# ---------------------------------------------------------------- augmentation


def normalize_batch(batch: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, H, W]`` (or float in [0, 1] ``[B, 1, H, W]``) to ImageNet-normalised ``[B, 3, H, W]``."""
    x = batch.float().div(255.0).unsqueeze(1) if batch.dtype == torch.uint8 else batch
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x.expand(-1, 3, -1, -1) - mean) / std


def augment_batch(
    batch: torch.Tensor, settings: ClassifierSettings, generator: torch.Generator
) -> torch.Tensor:
    """The study's training augmentation on a uint8 batch ``[B, H, W]``, per image, then normalised.

    Random horizontal flip (p = 0.5), rotation uniform in +-``rotation_degrees`` (black fill),
    brightness and contrast factors uniform in ``1 +- brightness`` / ``1 +- contrast``.
    """
    x = batch.float().div(255.0).unsqueeze(1)
    b = x.shape[0]
    if settings.hflip:
        flip = torch.rand(b, generator=generator) < 0.5
        x = torch.where(flip.view(b, 1, 1, 1), x.flip(-1), x)
    if settings.rotation_degrees > 0:
        angle = (torch.rand(b, generator=generator) * 2 - 1) * math.radians(settings.rotation_degrees)
        cos, sin = torch.cos(angle), torch.sin(angle)
        zero = torch.zeros_like(angle)
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if settings.brightness > 0:
        factor = 1 + (torch.rand(b, generator=generator) * 2 - 1) * settings.brightness
        x = (x * factor.view(b, 1, 1, 1)).clamp(0, 1)
    if settings.contrast > 0:
        factor = (1 + (torch.rand(b, generator=generator) * 2 - 1) * settings.contrast).view(b, 1, 1, 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * factor + mean).clamp(0, 1)
    return normalize_batch(x)


class EpochBatchSampler(Sampler[tuple[int, list[int]]]):
    """Yields ``(batch_seed, indices)``; the order and every batch's augmentation follow ``(seed, epoch)``.

    Call :meth:`set_epoch` before each epoch. The same batches come out whatever the number
    of workers, and a run resumed at epoch ``e`` sees what an uninterrupted one would have.
    A trailing batch of one image is dropped (BatchNorm cannot train on it).
    """

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        seeds = rng.integers(0, 2**62, size=len(self))
        for i, start in enumerate(range(0, len(self) * self.batch_size, self.batch_size)):
            yield int(seeds[i]), order[start : start + self.batch_size].tolist()

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (1 if rest > 1 else 0)


class AugmentedBatches(Dataset):
    """Cached uint8 images served one augmented batch per ``(batch_seed, indices)`` item."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray, settings: ClassifierSettings) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.settings = settings

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: tuple[int, list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        batch_seed, indices = item
        idx = torch.as_tensor(indices, dtype=torch.long)
        generator = torch.Generator().manual_seed(batch_seed)
        return augment_batch(self.images[idx], self.settings, generator), self.labels[idx]


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)  # workers augment; the main process keeps the cores for the model


def make_train_loader(
    images: torch.Tensor,
    labels: np.ndarray,
    settings: ClassifierSettings,
    seed: int,
    num_workers: int | None = None,
    pin_memory: bool = False,
) -> tuple[DataLoader, EpochBatchSampler]:
    """A DataLoader of augmented training batches and its sampler (call ``sampler.set_epoch``)."""
    workers = settings.num_workers if num_workers is None else num_workers
    sampler = EpochBatchSampler(len(images), settings.batch_size, seed)
    loader = DataLoader(
        AugmentedBatches(images, labels, settings),
        sampler=sampler,
        batch_size=None,
        num_workers=workers,
        persistent_workers=workers > 0,
        worker_init_fn=_one_thread if workers > 0 else None,
        pin_memory=pin_memory,
    )
    return loader, sampler
