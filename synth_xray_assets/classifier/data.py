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

from synth_xray_assets.dataset.splits import (
    ValidationSplit,
    class_count,
    real_subset,
    shared_validation_split,
    subset_seed,
)
from synth_xray_assets.dataset.store import StandardizedDataset
from synth_xray_assets.layout import Layout
from synth_xray_assets.operations.lifetime import exit_with_parent
from synth_xray_assets.partitions import generator_for
from synth_xray_assets.settings import CLASS_KEYS, CLASS_NAMES, ClassifierSettings, Settings
from synth_xray_assets.storage import save_numpy_atomic
from synth_xray_assets.synthesis.store import SyntheticImages, synthetic_dir

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NUM_CLASSES = 2
REAL, SYNTHETIC = "real", "synthetic"


# ---------------------------------------------------------------- composition

REAL_COPY = "real_copy"  # a duplicate of a real training image (the balance control's oversampling)


@dataclass(frozen=True)
class ExperimentSpec:
    """One classifier experiment: ``real_fraction`` of the real pool plus ``n_synthetic`` images,
    or (``balance_like`` set) a real-only control with the class shares of that mix."""

    name: str
    real_fraction: float
    n_synthetic: int
    balance_like: str | None = None


def experiment_spec(c: ClassifierSettings, name: str) -> ExperimentSpec:
    """The spec of ``name`` (an experiment or a balance control) under the classifier settings."""
    if name in c.experiments:
        fraction, n_synthetic = c.experiments[name]
        return ExperimentSpec(name, float(fraction), int(n_synthetic))
    if name in c.balance_controls:
        like = c.balance_controls[name]
        if like not in c.experiments:
            raise KeyError(f"balance control {name!r} copies {like!r}, which is not an experiment")
        return ExperimentSpec(name, 1.0, 0, balance_like=like)
    raise KeyError(f"unknown experiment {name!r}; the settings define {c.all_experiments()}")


def mix_normal_share(pool_labels: np.ndarray, real_fraction: float, n_synthetic: int) -> float:
    """The NORMAL share of a mix's training set (real fraction of the pool + class-balanced synthetic)."""
    labels = np.asarray(pool_labels)
    n_real = [class_count(int((labels == c).sum()), real_fraction) for c in range(NUM_CLASSES)]
    synth = (n_synthetic // 2, n_synthetic - n_synthetic // 2)
    total = sum(n_real) + sum(synth)
    return (n_real[0] + synth[0]) / total if total else float("nan")


def oversample_to_share(labels: np.ndarray, normal_share: float, seed: int) -> np.ndarray:
    """Positions (with repeats, sorted) to add to ``labels`` so that NORMAL makes ``normal_share`` of
    the whole: seeded draws with replacement from the under-represented class."""
    labels = np.asarray(labels)
    if not 0.0 < normal_share < 1.0:
        raise ValueError(f"the NORMAL share to reach must be in (0, 1), got {normal_share}")
    n, n_normal = len(labels), int((labels == 0).sum())
    if n_normal / n <= normal_share:  # add NORMAL copies: (n_normal + k) / (n + k) = share
        cls, k = 0, (normal_share * n - n_normal) / (1 - normal_share)
    else:  # add PNEUMONIA copies: n_normal / (n + k) = share
        cls, k = 1, n_normal / normal_share - n
    idx = np.flatnonzero(labels == cls)
    k = int(round(k))
    if k <= 0 or len(idx) == 0:
        return np.zeros(0, np.int64)
    return np.sort(np.random.default_rng([seed, 2, cls]).choice(idx, size=k, replace=True)).astype(np.int64)


def compose_experiment(
    real_labels: np.ndarray,
    synthetic_labels: np.ndarray,
    real_fraction: float,
    n_synthetic: int,
    seed: int,
    subset_seed: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices ``(real_idx, synth_idx)`` of one experiment's training set.

    Real: ``real_fraction`` of each class (stratified, rounded half up), drawn with ``subset_seed``
    (default ``seed``; matched generators fix it across seeds). Synthetic: class-balanced,
    ``n_synthetic // 2`` NORMAL and the rest PNEUMONIA, drawn with ``seed``. Both are prefixes of
    one permutation per (source, class), so a smaller subset lies inside a larger one (Limited-10
    within Limited-25, Synth-25 within Synth-50). Raises ``ValueError`` when a class has too few
    synthetic images.
    """
    if n_synthetic < 0:
        raise ValueError(f"n_synthetic must be >= 0, got {n_synthetic}")
    real = real_subset(real_labels, real_fraction, seed if subset_seed is None else subset_seed)
    synthetic_labels = np.asarray(synthetic_labels)
    synth = [np.zeros(0, np.int64)]
    wanted = (n_synthetic // 2, n_synthetic - n_synthetic // 2)
    for cls in range(NUM_CLASSES):
        idx = np.flatnonzero(synthetic_labels == cls)
        if wanted[cls] > len(idx):
            raise ValueError(
                f"the experiment needs {wanted[cls]} synthetic {CLASS_NAMES[cls]} images "
                f"({n_synthetic} class-balanced) but only {len(idx)} exist; generate more or lower "
                "the experiment's synthetic count"
            )
        synth.append(np.random.default_rng([seed, 1, cls]).permutation(idx)[: wanted[cls]])
    return real, np.sort(np.concatenate(synth)).astype(np.int64)


@dataclass
class SplitArrays:
    """Images and int64 labels of the three splits (train, validation, test)."""

    train_x: torch.Tensor
    train_y: np.ndarray
    val_x: torch.Tensor
    val_y: np.ndarray
    test_x: torch.Tensor
    test_y: np.ndarray


@dataclass
class ExperimentData(SplitArrays):
    """One experiment's images at the classifier's size (uint8 ``[N, r, r]``) and labels.

    ``composition`` has one row per image: ``role`` (train / val / test), ``source`` (real /
    synthetic), ``label``, ``image_id`` (the real image's sha256, or ``synthetic/{class}/{index}``)
    and ``position`` (its row within the real split or the synthetic class).
    """

    experiment: str
    seed: int
    composition: pd.DataFrame
    dataset_version: str
    data_origin: dict | None = None  # the real images' source (StandardizedDataset.origin)
    synthetic_versions: dict[str, str] = field(default_factory=dict)
    split: ValidationSplit | None = None
    spec: ExperimentSpec | None = None
    generators: dict[str, str] = field(default_factory=dict)  # class -> generator key used
    target_normal_share: float | None = None  # balance controls: the mix's NORMAL share

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
            if role == "train":
                for label, key in enumerate(CLASS_KEYS):
                    out[f"train_real_copy_{key}"] = int(
                        ((c.role == role) & (c.source == REAL_COPY) & (c.label == label)).sum()
                    )
        return out

    def normal_share(self) -> float:
        """The NORMAL share of the training set (copies included)."""
        return float((self.train_y == 0).mean()) if len(self.train_y) else float("nan")


def classifier_cache_dir(data_dir: str | Path) -> Path:
    """Where images prepared at the classifier's size are cached (file names carry data versions)."""
    return Layout(Path(data_dir)).classifier_cache


def load_experiment_data(
    s: Settings, experiment: str, seed: int, log: Callable[[str], object] = print
) -> ExperimentData:
    """Compose ``experiment`` for ``seed`` from the standardized dataset and the synthetic images.

    Validation: :func:`shared_validation_split` of real train (by patient, ``val_fraction`` of each class,
    drawn with ``split_seed``: the same for every experiment and seed). The real training pool is
    the rest of real train; the experiment takes its real fraction of that pool. Under
    ``selection="test"`` (the study's protocol) nothing is carved: the pool is all of real train
    and the test set is what selects the epoch. Balance controls take the whole pool and oversample
    it to the class shares of their mix. Test: the whole test split, for scores only.
    """
    c = s.classifier
    spec = experiment_spec(c, experiment)
    ds = StandardizedDataset.open(s.layout.dataset)
    cache = _ImageCache(classifier_cache_dir(s.data_dir), f"{c.resize}-{c.resolution}", c)
    train_all, train_rows = cache.real(ds, "train")
    n_synthetic = s.synthetic_count(spec.n_synthetic, len(train_rows))  # the study's count, to this dataset
    test_x, test_rows = cache.real(ds, "test")
    labels = train_rows.label.to_numpy(np.int64)
    split = shared_validation_split(s, train_rows)
    pool, val_idx = split.keep, split.val
    synth = _synthetic_pool(s, spec, cache) if n_synthetic > 0 else _SyntheticPool()
    real_sel, synth_idx = compose_experiment(
        labels[pool], synth.y, spec.real_fraction, n_synthetic, seed, subset_seed(s, seed)
    )
    real_idx = pool[real_sel]
    copies, target = _balance_copies(s, spec, labels, _Subset(pool, real_idx, len(train_rows)), seed)

    xs = [train_all[torch.as_tensor(real_idx)], train_all[torch.as_tensor(copies)]]
    if len(synth_idx):
        xs.append(torch.cat(synth.x)[torch.as_tensor(synth_idx)])
    train_y = np.concatenate([labels[real_idx], labels[copies], synth.y[synth_idx]]).astype(np.int64)
    sha = train_rows.sha256.to_numpy()
    frames = [
        _rows("train", REAL, labels[real_idx], sha[real_idx], real_idx),
        _rows("train", REAL_COPY, labels[copies], sha[copies], copies),
        _rows("train", SYNTHETIC, synth.y[synth_idx], np.asarray(synth.ids)[synth_idx], synth_idx),
        _rows("val", REAL, labels[val_idx], sha[val_idx], val_idx),
        _rows(
            "test", REAL, test_rows.label.to_numpy(), test_rows.sha256.to_numpy(), np.arange(len(test_rows))
        ),
    ]
    # The study's protocol: no validation split; the test set stands in for it (labelled as such).
    val_x, val_y = (
        (train_all[torch.as_tensor(val_idx)], labels[val_idx])
        if len(val_idx)
        else (test_x, test_rows.label.to_numpy(np.int64))
    )
    log(
        f"{experiment} seed {seed}: train {len(real_idx)} real (+{len(copies)} copies) + "
        f"{len(synth_idx)} synthetic, validation {len(val_idx)} ({split.describe()}), test {len(test_rows)}"
    )
    return ExperimentData(
        experiment=experiment,
        seed=seed,
        train_x=torch.cat(xs),
        train_y=train_y,
        val_x=val_x,
        val_y=val_y,
        test_x=test_x,
        test_y=test_rows.label.to_numpy(np.int64),
        composition=pd.concat(frames, ignore_index=True),
        dataset_version=ds.version,
        data_origin=ds.origin,
        synthetic_versions=synth.versions,
        split=split,
        spec=spec,
        generators=synth.used,
        target_normal_share=target,
    )


@dataclass
class _ImageCache:
    """The cache folder of images prepared at the classifier's size (``size`` is ``resize-resolution``)."""

    folder: Path
    size: str
    settings: ClassifierSettings

    def real(self, ds: StandardizedDataset, split: str) -> tuple[torch.Tensor, pd.DataFrame]:
        """One real split's prepared images and its rows."""
        rows = ds.rows(split)
        path = self.folder / f"real-{ds.version}-{self.size}" / f"{split}.npy"
        return cached_prepared_images(path, len(rows), self.settings, lambda: ds.images(split)), rows


@dataclass
class _SyntheticPool:
    """The synthetic images of both classes at the classifier's size, with labels and ids."""

    x: list[torch.Tensor] = field(default_factory=list)
    y: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    ids: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)  # generator key -> image set version
    used: dict[str, str] = field(default_factory=dict)  # class -> generator key


def _synthetic_pool(s: Settings, spec: ExperimentSpec, cache: _ImageCache) -> _SyntheticPool:
    """Each class's synthetic images from the generator the experiment's real fraction selects."""
    pool, ys = _SyntheticPool(), []
    for label, key in enumerate(CLASS_KEYS):
        used = pool.used[key] = generator_for(key, spec.real_fraction, s.dreambooth.generators)
        images = SyntheticImages.open(synthetic_dir(s.data_dir, used))
        if (images.manifest.label != label).any():
            raise ValueError(f"{images.root}: manifest labels other than {label} for class {key!r}")
        pool.versions[used] = images.version()
        path = cache.folder / f"synthetic-{used}-{pool.versions[used]}-{cache.size}.npy"
        pool.x.append(cached_prepared_images(path, len(images), cache.settings, images.images))
        ys.append(np.full(len(images), label, np.int64))
        pool.ids += [f"synthetic/{used}/{i}" for i in images.manifest["index"]]
    pool.y = np.concatenate(ys)
    return pool


@dataclass
class _Subset:
    """Positions in real train: the training pool, the experiment's real images, and the train size."""

    pool: np.ndarray
    chosen: np.ndarray
    n_train: int


def _balance_copies(
    s: Settings, spec: ExperimentSpec, labels: np.ndarray, subset: _Subset, seed: int
) -> tuple[np.ndarray, float | None]:
    """A balance control's oversampled copies (positions in real train) and the NORMAL share they reach."""
    if spec.balance_like is None:
        return np.zeros(0, np.int64), None
    like = experiment_spec(s.classifier, spec.balance_like)
    like_synthetic = s.synthetic_count(like.n_synthetic, subset.n_train)
    target = mix_normal_share(labels[subset.pool], like.real_fraction, like_synthetic)
    return subset.chosen[oversample_to_share(labels[subset.chosen], target, seed)], target


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
    normalises it with :func:`normalize_batch` on its device. Runs on ``batch``'s device (the GPU
    when training on one), with the same draws from ``generator`` (a CPU one) everywhere.
    """
    x = batch.float().unsqueeze(1)
    b, _, h, w = x.shape
    dev = x.device  # the random draws stay on the CPU generator: the same on every device

    def uniform() -> torch.Tensor:
        return (torch.rand(b, generator=generator) * 2 - 1).to(dev)

    flip = torch.rand(b, generator=generator) < 0.5 if settings.hflip else torch.zeros(b, dtype=torch.bool)
    angle = torch.zeros(b, device=dev)
    if settings.rotation_degrees > 0:
        angle = uniform() * math.radians(settings.rotation_degrees)
    if settings.hflip or settings.rotation_degrees > 0:
        # Where each output pixel samples the input: rotate, then mirror x (normalised coordinates).
        gx = ((torch.arange(w, device=dev) * 2 + 1) / w - 1).view(1, 1, w)
        gy = ((torch.arange(h, device=dev) * 2 + 1) / h - 1).view(1, h, 1)
        cos, sin = torch.cos(angle).view(b, 1, 1), torch.sin(angle).view(b, 1, 1)
        sign = torch.where(flip, -1.0, 1.0).to(dev).view(b, 1, 1)
        grid = torch.stack([sign * (cos * gx - sin * gy), sin * gx + cos * gy], dim=-1)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if settings.brightness > 0:
        factor = 1 + uniform() * settings.brightness
        x = (x * factor.view(b, 1, 1, 1)).clamp(0, 255)
    if settings.contrast > 0:
        factor = (1 + uniform() * settings.contrast).view(b, 1, 1, 1)
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
    exit_with_parent()  # and die with it: a killed step leaves no augmenting worker behind


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
