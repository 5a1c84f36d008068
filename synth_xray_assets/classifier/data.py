"""Experiment composition, the resized-once image cache, and tensor augmentation.

Real images come from the standardized dataset's uint8 arrays, synthetic ones from
``SyntheticImages``; both are resized and center-cropped once (the study's ``Resize(resize)``
+ ``CenterCrop(resolution)``) into uint8 arrays cached on disk per dataset version. Each
training batch is then augmented on tensors (flip, rotation, brightness/contrast jitter) in
worker processes, replicated to three channels and normalised with ImageNet statistics.
Nothing is decoded from an image file during an epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from synth_xray_assets.dataset.splits import class_count, stratified_split  # noqa: F401 (stratified_split re-exported)
from synth_xray_assets.dataset.store import StandardizedDataset
from synth_xray_assets.layout import Layout
from synth_xray_assets.settings import CLASS_KEYS, CLASS_NAMES, ClassifierSettings, Settings
from synth_xray_assets.storage import save_numpy_atomic
from synth_xray_assets.synthesis.store import SyntheticImages, synthetic_dir

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NUM_CLASSES = 2
REAL, SYNTHETIC = "real", "synthetic"


# ---------------------------------------------------------------- composition


def compose_experiment(
    real_labels: np.ndarray,
    synthetic_labels: np.ndarray,
    real_fraction: float,
    n_synthetic: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices ``(real_idx, synth_idx)`` of one experiment's training set.

    Real: ``real_fraction`` of each class (stratified, rounded half up). Synthetic:
    class-balanced, ``n_synthetic // 2`` NORMAL and the rest PNEUMONIA. Both are drawn with
    ``seed`` as prefixes of one permutation per (source, class), so for a given seed a smaller
    subset lies inside a larger one (Limited-10 within Limited-25, Synth-25 within Synth-50).
    Raises ``ValueError`` when a class has too few synthetic images.
    """
    if not 0.0 <= real_fraction <= 1.0:
        raise ValueError(f"real_fraction must be in [0, 1], got {real_fraction}")
    if n_synthetic < 0:
        raise ValueError(f"n_synthetic must be >= 0, got {n_synthetic}")
    real_labels, synthetic_labels = np.asarray(real_labels), np.asarray(synthetic_labels)
    real, synth = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    wanted = (n_synthetic // 2, n_synthetic - n_synthetic // 2)
    for cls in range(NUM_CLASSES):
        idx = np.flatnonzero(real_labels == cls)
        k = class_count(len(idx), real_fraction)
        real.append(np.random.default_rng([seed, 0, cls]).permutation(idx)[:k])
        idx = np.flatnonzero(synthetic_labels == cls)
        if wanted[cls] > len(idx):
            raise ValueError(
                f"the experiment needs {wanted[cls]} synthetic {CLASS_NAMES[cls]} images "
                f"({n_synthetic} class-balanced) but only {len(idx)} exist; generate more or lower "
                "the experiment's synthetic count"
            )
        synth.append(np.random.default_rng([seed, 1, cls]).permutation(idx)[: wanted[cls]])
    return np.sort(np.concatenate(real)).astype(np.int64), np.sort(np.concatenate(synth)).astype(np.int64)


@dataclass
class ExperimentData:
    """One experiment's images at the classifier's size (uint8 ``[N, r, r]``) and labels.

    ``composition`` has one row per image: ``role`` (train / val / test), ``source`` (real /
    synthetic), ``label``, ``image_id`` (the real image's sha256, or ``synthetic/{class}/{index}``)
    and ``position`` (its row within the real split or the synthetic class).
    """

    experiment: str
    seed: int
    train_x: torch.Tensor
    train_y: np.ndarray
    val_x: torch.Tensor
    val_y: np.ndarray
    test_x: torch.Tensor
    test_y: np.ndarray
    composition: pd.DataFrame
    dataset_version: str
    synthetic_versions: dict[str, str] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """Images per role, source and class, e.g. ``train_real_normal``."""
        c = self.composition
        out = {}
        for role in ("train", "val", "test"):
            for source in (REAL, SYNTHETIC):
                for label, key in enumerate(CLASS_KEYS):
                    n = int(((c.role == role) & (c.source == source) & (c.label == label)).sum())
                    if role == "train" or source == REAL:
                        out[f"{role}_{source}_{key}"] = n
        return out


def classifier_cache_dir(data_dir: str | Path) -> Path:
    """Where images prepared at the classifier's size are cached (file names carry data versions)."""
    return Layout(Path(data_dir)).classifier_cache


def load_experiment_data(
    s: Settings, experiment: str, seed: int, log: Callable[[str], object] = print
) -> ExperimentData:
    """Compose ``experiment`` for ``seed`` from the standardized dataset and the synthetic images.

    Validation: ``val_fraction`` of each class of real train, drawn with ``split_seed`` (the same
    split for every experiment and seed). The real training pool is the rest of real train; the
    experiment takes its real fraction of that pool. The dataset's own tiny "validation" split is
    not used. Test: the whole test split, for final scores only.
    """
    c = s.classifier
    if experiment not in c.experiments:
        raise KeyError(f"unknown experiment {experiment!r}; the settings define {sorted(c.experiments)}")
    real_fraction, n_synthetic = c.experiments[experiment]
    if c.val_fraction <= 0:
        raise ValueError("classifier.val_fraction must be > 0: the model is selected on that split")
    ds = StandardizedDataset.open(s.layout.dataset)
    cache = classifier_cache_dir(s.data_dir)
    size = f"{c.resize}-{c.resolution}"

    def real(split: str) -> tuple[torch.Tensor, pd.DataFrame]:
        rows = ds.rows(split)
        x = cached_prepared_images(
            cache / f"real-{ds.version}-{size}" / f"{split}.npy", len(rows), c, lambda: ds.images(split)
        )
        return x, rows

    train_all, train_rows = real("train")
    test_x, test_rows = real("test")
    labels = train_rows.label.to_numpy(np.int64)
    pool, val_idx = stratified_split(labels, c.val_fraction, c.split_seed)

    synth_x, synth_y, synth_ids, versions = [], [], [], {}
    if n_synthetic > 0:
        for label, key in enumerate(CLASS_KEYS):
            images = SyntheticImages.open(synthetic_dir(s.data_dir, key))
            if (images.manifest.label != label).any():
                raise ValueError(f"{images.root}: manifest labels other than {label} for class {key!r}")
            versions[key] = images.version()
            synth_x.append(
                cached_prepared_images(
                    cache / f"synthetic-{key}-{versions[key]}-{size}.npy", len(images), c, images.images
                )
            )
            synth_y.append(np.full(len(images), label, np.int64))
            synth_ids += [f"synthetic/{key}/{i}" for i in images.manifest["index"]]
    synth_y_all = np.concatenate(synth_y) if synth_y else np.zeros(0, np.int64)
    real_sel, synth_idx = compose_experiment(labels[pool], synth_y_all, real_fraction, n_synthetic, seed)
    real_idx = pool[real_sel]

    xs = [train_all[torch.as_tensor(real_idx)]]
    if len(synth_idx):
        xs.append(torch.cat(synth_x)[torch.as_tensor(synth_idx)])
    train_y = np.concatenate([labels[real_idx], synth_y_all[synth_idx]]).astype(np.int64)
    frames = [
        _rows("train", REAL, labels[real_idx], train_rows.sha256.to_numpy()[real_idx], real_idx),
        _rows("train", SYNTHETIC, synth_y_all[synth_idx], np.asarray(synth_ids)[synth_idx], synth_idx),
        _rows("val", REAL, labels[val_idx], train_rows.sha256.to_numpy()[val_idx], val_idx),
        _rows(
            "test", REAL, test_rows.label.to_numpy(), test_rows.sha256.to_numpy(), np.arange(len(test_rows))
        ),
    ]
    log(
        f"{experiment} seed {seed}: train {len(real_idx)} real + {len(synth_idx)} synthetic, "
        f"validation {len(val_idx)} (real train), test {len(test_rows)}"
    )
    return ExperimentData(
        experiment=experiment,
        seed=seed,
        train_x=torch.cat(xs),
        train_y=train_y,
        val_x=train_all[torch.as_tensor(val_idx)],
        val_y=labels[val_idx],
        test_x=test_x,
        test_y=test_rows.label.to_numpy(np.int64),
        composition=pd.concat(frames, ignore_index=True),
        dataset_version=ds.version,
        synthetic_versions=versions,
    )


def _rows(role: str, source: str, labels, ids, positions) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "role": role,
            "source": source,
            "label": np.asarray(labels, np.int64),
            "image_id": np.asarray(ids, dtype=object).astype(str),
            "position": np.asarray(positions, np.int64),
        }
    )


# ---------------------------------------------------------------- image cache


def prepare_images(
    images: np.ndarray | torch.Tensor, resize: int, resolution: int, chunk: int = 256
) -> torch.Tensor:
    """Resize (shorter side to ``resize``, antialiased bilinear) and center-crop to ``resolution``, once.

    ``images`` is uint8 ``[N, H, W]``; returns a contiguous uint8 tensor ``[N, resolution, resolution]``.
    """
    if isinstance(images, np.ndarray) and (images.dtype != np.uint8 or images.ndim != 3):
        raise ValueError(f"expected uint8 images [N, H, W], got {images.dtype} {images.shape}")
    if isinstance(images, torch.Tensor) and (images.dtype != torch.uint8 or images.ndim != 3):
        raise ValueError(f"expected uint8 images [N, H, W], got {images.dtype} {tuple(images.shape)}")
    x = images
    if resolution > resize:
        raise ValueError(f"resolution {resolution} larger than resize {resize}")
    n, h, w = x.shape
    if n == 0:
        return torch.zeros((0, resolution, resolution), dtype=torch.uint8)
    scale = resize / min(h, w)
    new_h, new_w = max(resize, round(h * scale)), max(resize, round(w * scale))
    top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    out = torch.empty((n, resolution, resolution), dtype=torch.uint8)
    for start in range(0, n, chunk):
        block = x[start : start + chunk]  # numpy chunks copied: the source may be a read-only memmap
        block = (block if isinstance(block, torch.Tensor) else torch.from_numpy(np.array(block))).float()
        block = block.unsqueeze(1)
        if (new_h, new_w) != (h, w):
            block = F.interpolate(
                block, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False
            )
        block = block[:, 0, top : top + resolution, left : left + resolution]
        out[start : start + chunk] = block.round().clamp(0, 255).to(torch.uint8)
    return out


def cached_prepared_images(
    path: str | Path, n: int, settings: ClassifierSettings, load: Callable[[], np.ndarray]
) -> torch.Tensor:
    """:func:`prepare_images` of ``load()`` at the classifier's size, cached in ``path`` (``.npy``).

    Name ``path`` after the data version and sizes: a file there with the right shape is
    trusted, and ``load`` (which decodes or reads the source images) is not called.
    """
    path = Path(path)
    shape = (n, settings.resolution, settings.resolution)
    if path.is_file():
        cached = np.load(path, allow_pickle=False)
        if cached.dtype == np.uint8 and cached.shape == shape:
            return torch.from_numpy(cached)
    prepared = prepare_images(load(), settings.resize, settings.resolution)
    if tuple(prepared.shape) != shape:
        raise ValueError(f"expected {n} images, the source gave {len(prepared)}")
    save_numpy_atomic(prepared.numpy(), path)
    return prepared


# ---------------------------------------------------------------- augmentation


def normalize_batch(batch: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, H, W]`` to ImageNet-normalised float ``[B, 3, H, W]`` (gray replicated to RGB)."""
    x = batch.float().div(255.0).unsqueeze(1)
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x.expand(-1, 3, -1, -1) - mean) / std


def augment_batch(
    batch: torch.Tensor, settings: ClassifierSettings, generator: torch.Generator
) -> torch.Tensor:
    """The study's training augmentation on a uint8 batch ``[B, H, W]``, per image; returns uint8.

    Random horizontal flip (p = 0.5) and rotation uniform in +-``rotation_degrees`` (bilinear,
    black fill) in one resampling, then brightness and contrast factors uniform in
    ``1 +- brightness`` / ``1 +- contrast`` (contrast around the image mean), as torchvision's
    RandomHorizontalFlip, RandomRotation and ColorJitter do on PIL images. The result stays
    uint8, like PIL's, so a worker hands back a quarter of a float batch; the training step
    normalises it with :func:`normalize_batch` on its device.
    """
    x = batch.float().unsqueeze(1)
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=generator) < 0.5 if settings.hflip else torch.zeros(b, dtype=torch.bool)
    angle = torch.zeros(b)
    if settings.rotation_degrees > 0:
        angle = (torch.rand(b, generator=generator) * 2 - 1) * math.radians(settings.rotation_degrees)
    if settings.hflip or settings.rotation_degrees > 0:
        # Where each output pixel samples the input: rotate, then mirror x (normalised coordinates).
        gx = ((torch.arange(w) * 2 + 1) / w - 1).view(1, 1, w)
        gy = ((torch.arange(h) * 2 + 1) / h - 1).view(1, h, 1)
        cos, sin = torch.cos(angle).view(b, 1, 1), torch.sin(angle).view(b, 1, 1)
        sign = torch.where(flip, -1.0, 1.0).view(b, 1, 1)
        grid = torch.stack([sign * (cos * gx - sin * gy), sin * gx + cos * gy], dim=-1)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if settings.brightness > 0:
        factor = 1 + (torch.rand(b, generator=generator) * 2 - 1) * settings.brightness
        x = (x * factor.view(b, 1, 1, 1)).clamp(0, 255)
    if settings.contrast > 0:
        factor = (1 + (torch.rand(b, generator=generator) * 2 - 1) * settings.contrast).view(b, 1, 1, 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * factor + mean).clamp(0, 255)
    return x[:, 0].round().to(torch.uint8)


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
    """Cached uint8 images served one augmented uint8 batch per ``(batch_seed, indices)`` item."""

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
    """A DataLoader of augmented uint8 training batches and its sampler (call ``sampler.set_epoch``).

    Batches come out as uint8 ``[B, H, W]``; normalise them with :func:`normalize_batch`.
    """
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
        # Its own generator: creating worker iterators must not draw from torch's global RNG
        # (dropout's), or a resumed run would diverge from an uninterrupted one.
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, sampler
