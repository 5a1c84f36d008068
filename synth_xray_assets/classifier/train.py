"""Training one DenseNet-121 classifier: the epoch loop, selection on validation (or test), resume.

The loop only: one optimizer step (mixed precision, channels_last, the out-of-memory fallback)
is ``step.MicroBatchStep``; the files (best / last weights, the resumable state) are
``checkpoint.CheckpointSaver``'s.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from synth_xray_assets.classifier.checkpoint import (  # noqa: F401 (file names re-exported)
    BEST_WEIGHTS,
    LAST_WEIGHTS,
    STATE_FILE,
    CheckpointSaver,
    Progress,
    TrainingParts,
)
from synth_xray_assets.classifier.data import (
    EpochBatchSampler,
    SplitArrays,
    make_train_loader,
    normalize_batch,
    prepare_images,
)
from synth_xray_assets.classifier.model import build_densenet121
from synth_xray_assets.classifier.stats import binary_metrics, roc_auc  # noqa: F401 (re-exported)
from synth_xray_assets.classifier.step import (
    MicroBatchStep,
    Precision,
    choose_precision,
    oom_note,
    prepare_model,
    use_channels_last,
)
from synth_xray_assets.hardware import loader_workers, require_free_space
from synth_xray_assets.operations.faults import fault_point
from synth_xray_assets.settings import ClassifierSettings

SELECTION_LABELS = {
    "validation": "best epoch by accuracy on the validation split (the test set never seen)",
    "test": "best epoch by accuracy on the TEST set (the study's protocol: optimistic)",
}


# ---------------------------------------------------------------- result


@dataclass
class RunExtra:
    """What an experiment run was trained on and under which settings (``None``: not recorded, as
    by an older version or a run outside the experiments, such as the feature extractor's)."""

    n_real: int | None = None
    n_synthetic: int | None = None
    counts: dict[str, int] | None = None  # images per role, source and class (ExperimentData.counts)
    real_fraction: float | None = None
    balance_like: str | None = None  # balance controls: the mix whose class shares they copy
    target_normal_share: float | None = None
    normal_share: float | None = None
    generators: str | None = None  # the arrangement of the settings (study / matched)
    generator_keys: dict[str, str] | None = None  # class -> generator used
    validation_split: dict[str, Any] | None = None  # its summary and "describe"
    settings_fingerprint: str | None = None
    dataset_version: str | None = None
    data_origin: dict[str, Any] | None = None  # the real images' source; "phantoms": the project's
    synthetic_versions: dict[str, str] | None = None  # generator -> image set version
    initial_weights: str | None = None
    profile: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> RunExtra:
        """From a saved run's ``extra`` (keys it does not know are left out)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in known})


@dataclass
class RunResult:
    """One trained classifier: curves, the selected and last epoch's scores, per-image test probabilities."""

    experiment: str
    seed: int
    selection: str
    selection_note: str
    epochs: int
    selected_epoch: int  # 1-based
    history: list[dict[str, Any]]
    val_selected: dict[str, Any]
    test_selected: dict[str, Any]
    test_last: dict[str, Any]
    test_labels: list[int]
    test_prob_selected: list[float]
    test_prob_last: list[float]
    n_train: int
    n_train_per_class: list[int]
    n_val: int
    n_test: int
    weights_path: str
    last_weights_path: str
    resumed_from_epoch: int  # epochs already done when this call started (0: fresh run)
    wall_time_s: float
    train_time_s: float  # summed over epochs, across resumes
    train_images_per_s: float
    device: str
    settings: dict[str, Any]
    extra: RunExtra = field(default_factory=RunExtra)
    precision: str = "fp32"  # fp32, bf16 or fp16 (+ GradScaler): autocast on CUDA only
    # batch_size, micro_batch, gradient_accumulation, oom_events, batchnorm_note, channels_last,
    # augmentation ("gpu" or "N workers")
    compute: dict[str, Any] = field(default_factory=dict)
    test_image_ids: list[str] = field(default_factory=list)  # as a saved run is loaded (not in run.json)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunResult:
        """A run from :meth:`to_dict`'s data (keys it does not know are left out)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        return cls(**{**values, "extra": RunExtra.from_dict(data.get("extra"))})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (NaN kept as float NaN)."""
        return json.loads(json.dumps(asdict(self), default=_jsonable))


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


# ---------------------------------------------------------------- training


def predict_proba(
    model: nn.Module,
    images: torch.Tensor,
    labels: np.ndarray | None,
    batch_size: int,
    device: str,
    channels_last: bool = False,
) -> tuple[np.ndarray, float]:
    """PNEUMONIA probabilities of cached uint8 images ``[N, r, r]`` and the mean loss (NaN without labels).

    Always fp32 (no activations are kept, so it is cheap; probabilities keep their resolution for AUC).
    """
    model.eval()
    probs, loss_sum = [], 0.0
    y = None if labels is None else torch.as_tensor(np.asarray(labels), dtype=torch.long)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = normalize_batch(images[start : start + batch_size].to(device))
            x = x.contiguous(memory_format=memory_format)
            logits = model(x).float()
            if y is not None:
                target = y[start : start + batch_size].to(device)
                loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
            probs.append(torch.softmax(logits, dim=1)[:, 1].cpu())
    prob = torch.cat(probs).numpy().astype(np.float64) if probs else np.zeros(0)
    return prob, (loss_sum / max(len(images), 1) if y is not None else float("nan"))


def _as_prepared(
    images: np.ndarray | torch.Tensor, settings: ClassifierSettings, prepared: bool
) -> torch.Tensor:
    if prepared:
        x = torch.as_tensor(images)
        if x.dtype != torch.uint8 or tuple(x.shape[1:]) != (settings.resolution, settings.resolution):
            raise ValueError(
                f"prepared images must be uint8 [N, {settings.resolution}, {settings.resolution}], "
                f"got {x.dtype} {tuple(x.shape)}"
            )
        return x.contiguous()
    return prepare_images(images, settings.resize, settings.resolution)


# Settings that do not change what one run computes.
_NOT_IN_FINGERPRINT = {"num_workers", "seeds", "bootstrap_samples", "experiments", "gpu_augmentation"}


def _fingerprint(settings: ClassifierSettings, seed: int, *arrays: Any) -> str:
    """What a saved state must match to resume: settings, seed, data (test set only if selecting on it)."""
    relevant = settings.model_dump(mode="json", exclude=_NOT_IN_FINGERPRINT)
    h = hashlib.sha256(json.dumps(relevant, sort_keys=True).encode())
    h.update(str(seed).encode())
    for a in arrays:
        a = np.ascontiguousarray(a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a))
        h.update(str((a.dtype, a.shape)).encode())
        h.update(a)
    return h.hexdigest()


def _better(key: tuple[float, float], best: tuple[float, float] | None) -> bool:
    """Higher accuracy wins; equal accuracy, lower loss wins; otherwise the earlier epoch stays."""
    return best is None or key[0] > best[0] or (key[0] == best[0] and key[1] < best[1])


class TrainBatches:
    """Training batches of one epoch, on the device: uint8 images, labels, and the augmentation seed.

    On CUDA with ``gpu_augmentation`` the cached images move to the GPU once and each batch is
    augmented there by the step (seed given); otherwise worker processes augment (seed None).
    Either way the batches and their augmentation follow ``(seed, epoch)`` only.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: np.ndarray,
        settings: ClassifierSettings,
        seed: int,
        device: str,
        num_workers: int | None,
    ) -> None:
        self.device = device
        self.on_device = device.startswith("cuda") and settings.gpu_augmentation
        if self.on_device:
            self.images = images.to(device)
            self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=device)
            self.sampler = EpochBatchSampler(len(images), settings.batch_size, seed)
            self.loader = None
            self.description = "gpu"
            return
        workers = num_workers if num_workers is not None else settings.num_workers
        if workers is None:
            workers = loader_workers(torch.get_num_threads())
        self.loader, self.sampler = make_train_loader(
            images, labels, settings, seed, num_workers=workers, pin_memory=device.startswith("cuda")
        )
        self.description = f"{workers} workers"

    def epoch(self, epoch: int):
        """Yield ``(x, y, augment_seed)`` for every batch of ``epoch``."""
        self.sampler.set_epoch(epoch)
        if self.loader is None:
            for batch_seed, indices in self.sampler:
                idx = torch.as_tensor(indices, device=self.device)
                yield self.images[idx], self.labels[idx], batch_seed
            return
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), None


def _splits(arrays: SplitArrays, settings: ClassifierSettings, prepared: bool) -> SplitArrays:
    """The splits as uint8 tensors at the classifier's size and int64 labels; checked."""
    ys = [np.asarray(a).astype(np.int64) for a in (arrays.train_y, arrays.val_y, arrays.test_y)]
    xs = [_as_prepared(a, settings, prepared) for a in (arrays.train_x, arrays.val_x, arrays.test_x)]
    for name, x, y in zip(("train", "val", "test"), xs, ys):
        if len(x) != len(y):
            raise ValueError(f"{name}: {len(x)} images but {len(y)} labels")
    if len(xs[0]) < 2 or len(xs[1]) == 0:
        raise ValueError(f"need >= 2 training and >= 1 validation images, got {len(xs[0])} and {len(xs[1])}")
    return SplitArrays(xs[0], ys[0], xs[1], ys[1], xs[2], ys[2])


def _run_epoch(step: MicroBatchStep, batches: TrainBatches, epoch: int) -> dict[str, Any]:
    """One pass over the training batches: loss, accuracy, images and seconds."""
    t0 = time.perf_counter()
    step.model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    for x, y, augment_seed in batches.epoch(epoch):
        out = step(x, y, augment_seed)
        loss_sum, correct, seen = loss_sum + out.loss_sum, correct + out.correct, seen + out.images
    return {
        "train_loss": loss_sum / max(seen, 1),
        "train_accuracy": correct / max(seen, 1),
        "train_images": seen,
        "train_seconds": time.perf_counter() - t0,
    }


def _evaluate_epoch(
    model: nn.Module, data: SplitArrays, settings: ClassifierSettings, device: str, record: dict[str, Any]
) -> tuple[float, float]:
    """Add validation (and, under the study's protocol, test) scores to ``record``; the selection key."""
    cl = use_channels_last(settings, device)
    val_prob, val_loss = predict_proba(model, data.val_x, data.val_y, settings.batch_size, device, cl)
    record["val_loss"] = val_loss
    record["val_accuracy"] = float(((val_prob > 0.5) == data.val_y).mean())
    if settings.selection != "test":
        return record["val_accuracy"], val_loss
    test_prob, test_loss = predict_proba(model, data.test_x, data.test_y, settings.batch_size, device, cl)
    record["test_loss"] = test_loss
    record["test_accuracy"] = float(((test_prob > 0.5) == data.test_y).mean())
    return record["test_accuracy"], test_loss


@dataclass
class _Loop:
    """What the epoch loop drives: the training parts, the step, the batches, the files, a label."""

    parts: TrainingParts
    step: MicroBatchStep
    batches: TrainBatches
    saver: CheckpointSaver
    label: str


def _train_epochs(loop: _Loop, data: SplitArrays, progress: Progress) -> Progress:
    """Epochs ``progress.epoch + 1 ..`` : train, score, keep the best weights, save the state."""
    parts, step, settings = loop.parts, loop.step, loop.step.settings
    for epoch in range(progress.epoch, settings.epochs):
        lr = parts.optimizer.param_groups[0]["lr"]
        record: dict[str, Any] = {"epoch": epoch + 1, "lr": lr, **_run_epoch(step, loop.batches, epoch)}
        parts.scheduler.step()
        key = _evaluate_epoch(parts.model, data, settings, parts.device, record)
        progress.history.append(record)
        fault_point("classifier.epoch", str(epoch + 1))
        progress.epoch = epoch + 1
        if _better(key, progress.best_key):
            progress.best_key, progress.best_epoch = key, epoch + 1
            loop.saver.save_best(parts.model, epoch + 1)
        loop.saver.save_state(parts, progress)
        step.log(
            f"{loop.label} epoch {epoch + 1}/{settings.epochs}: "
            f"loss {record['train_loss']:.4f}, val acc {record['val_accuracy']:.3f}"
            + (f", test acc {record['test_accuracy']:.3f}" if "test_accuracy" in record else "")
            + f" ({record['train_images'] / max(record['train_seconds'], 1e-9):.1f} img/s)"
        )
    return progress


@dataclass
class TrainRun:
    """One classifier run beyond its settings: seed, device, folder, log, and what it is called."""

    seed: int
    device: str
    out_dir: Path
    log: Callable[[str], Any] = print
    prepared: bool = False  # images already at the classifier's size (``cached_prepared_images``)
    experiment: str = ""
    extra: RunExtra = field(default_factory=RunExtra)
    num_workers: int | None = None  # augmentation processes; None: settings.num_workers or the cores
    keep_state: bool = False  # keep train_state.pt after the run


def train_classifier(data: SplitArrays, settings: ClassifierSettings, run: TrainRun) -> RunResult:
    """Train one classifier and score it on the test set at its selected and at its last epoch.

    Images are uint8 ``[N, H, W]`` at the dataset's resolution, resized and cropped here, or
    already at the classifier's size with ``run.prepared`` (see ``cached_prepared_images``).
    AdamW + cosine annealing over ``settings.epochs``; cross-entropy. Selection follows
    ``settings.selection``: ``"validation"`` never lets the test set touch training or the
    choice of epoch (it is scored only after the loop); ``"test"`` reproduces the study.
    After each epoch the full training state goes to ``run.out_dir/train_state.pt``; a later call
    with the same settings, seed and data resumes after the last finished epoch and ends as an
    uninterrupted run would. The state file is removed at the end unless ``run.keep_state``.
    ``run.num_workers`` overrides ``settings.num_workers`` (augmentation processes; None: from the
    cores available). On CUDA: mixed precision (``settings.mixed_precision``), channels_last,
    augmentation on the GPU, and an out-of-memory error halves the micro-batch (see ``step.py``).
    """
    started = time.perf_counter()
    data = _splits(data, settings, run.prepared)
    precision = choose_precision(run.device, settings.mixed_precision)
    cuda = run.device.startswith("cuda")
    rng_devices = [torch.device(run.device).index or 0] if cuda else []
    with torch.random.fork_rng(devices=rng_devices, device_type="cuda" if cuda else "cpu"):
        torch.manual_seed(run.seed)
        loop = _start(data, settings, run, precision)
        progress = loop.saver.resume(loop.parts, run.log)
        resumed_from = progress.epoch
        if resumed_from:
            run.log(f"resuming {loop.label} after epoch {resumed_from}/{settings.epochs}")
        run.log(f"{loop.label}: precision {precision.label}, augmentation on {loop.batches.description}")
        progress = _train_epochs(loop, data, progress)
        description = loop.batches.description
        loop.batches = None  # the loader's worker processes end here

    # Only now, with the epoch chosen, does the test set come in (under "validation").
    probs = _final_scores(loop.parts.model, loop.saver, data, settings, run.device)
    if not run.keep_state:
        loop.saver.clear_state()
    compute = {
        **oom_note(loop.step),
        "channels_last": use_channels_last(settings, run.device),
        "augmentation": description,
    }
    info = _RunInfo(run, settings, started, resumed_from, precision.label, compute)
    return _run_result(info, data, progress, loop.saver, probs)


def _start(data: SplitArrays, settings: ClassifierSettings, run: TrainRun, precision: Precision) -> _Loop:
    """A fresh model, optimizer, schedule, step, batches and checkpoint saver for ``run``."""
    label = f"{run.experiment or 'run'} seed {run.seed}"
    selection_arrays = (data.test_x, data.test_y) if settings.selection == "test" else ()
    fingerprint = _fingerprint(
        settings, run.seed, data.train_x, data.train_y, data.val_x, data.val_y, *selection_arrays
    )
    model = prepare_model(build_densenet121(settings), run.device, use_channels_last(settings, run.device))
    # best + last weights (4 bytes a weight each) and the state (weights + AdamW's 2 moments)
    n_weights = sum(p.numel() for p in model.parameters())
    require_free_space(run.out_dir, n_weights * 4 * 5, f"classifier training of {label}")
    saver = CheckpointSaver(
        run.out_dir,
        fingerprint,
        {"experiment": run.experiment, "seed": str(run.seed), "selection": settings.selection},
    )
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=settings.learning_rate,
        weight_decay=settings.weight_decay,
        foreach=True,  # CUDA's default; on the CPU too it steps DenseNet's 364 tensors faster
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs)
    step = MicroBatchStep(model, optimizer, settings, precision, run.device, run.log)
    parts = TrainingParts(model, optimizer, scheduler, step, run.device)
    batches = TrainBatches(data.train_x, data.train_y, settings, run.seed, run.device, run.num_workers)
    return _Loop(parts, step, batches, saver, label)


def _final_scores(
    model: nn.Module, saver: CheckpointSaver, data: SplitArrays, settings: ClassifierSettings, device: str
) -> dict[str, np.ndarray]:
    """Save the last epoch's weights; test probabilities at the last and the selected epoch, and the
    selected epoch's validation probabilities (the model ends holding the selected weights)."""
    bs, cl = settings.batch_size, use_channels_last(settings, device)
    saver.save_last(model, settings.epochs)
    last, _ = predict_proba(model, data.test_x, data.test_y, bs, device, cl)
    saver.load_best(model, device)
    test, _ = predict_proba(model, data.test_x, data.test_y, bs, device, cl)
    val, _ = predict_proba(model, data.val_x, data.val_y, bs, device, cl)
    return {"last": last, "test": test, "val": val}


@dataclass
class _RunInfo:
    run: TrainRun
    settings: ClassifierSettings
    started: float
    resumed_from: int
    precision: str
    compute: dict[str, Any]


def _run_result(
    info: _RunInfo,
    data: SplitArrays,
    progress: Progress,
    saver: CheckpointSaver,
    probs: dict[str, np.ndarray],
) -> RunResult:
    settings = info.settings
    history = progress.history
    train_time = float(sum(h["train_seconds"] for h in history))
    n_images = int(sum(h["train_images"] for h in history))
    return RunResult(
        experiment=info.run.experiment,
        seed=info.run.seed,
        selection=settings.selection,
        selection_note=SELECTION_LABELS[settings.selection],
        epochs=settings.epochs,
        selected_epoch=progress.best_epoch,
        history=history,
        val_selected=binary_metrics(data.val_y, probs["val"]),
        test_selected=binary_metrics(data.test_y, probs["test"]),
        test_last=binary_metrics(data.test_y, probs["last"]),
        test_labels=data.test_y.tolist(),
        test_prob_selected=probs["test"].tolist(),
        test_prob_last=probs["last"].tolist(),
        n_train=len(data.train_y),
        n_train_per_class=np.bincount(data.train_y, minlength=2).tolist(),
        n_val=len(data.val_y),
        n_test=len(data.test_y),
        weights_path=str(saver.best_path),
        last_weights_path=str(saver.last_path),
        resumed_from_epoch=info.resumed_from,
        wall_time_s=time.perf_counter() - info.started,
        train_time_s=train_time,
        train_images_per_s=n_images / train_time if train_time > 0 else 0.0,
        device=info.run.device,
        settings=settings.model_dump(mode="json"),
        extra=info.run.extra,
        precision=info.precision,
        compute=info.compute,
    )
