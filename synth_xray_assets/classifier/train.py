"""Training one DenseNet-121 classifier: the epoch loop, selection on validation (or test), resume."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from synth_xray_assets.classifier.data import make_train_loader, normalize_batch, prepare_images
from synth_xray_assets.classifier.model import build_densenet121, classifier_metadata, save_classifier
from synth_xray_assets.classifier.stats import binary_metrics, roc_auc  # noqa: F401 (re-exported)
from synth_xray_assets.operations.faults import fault_point
from synth_xray_assets.settings import ClassifierSettings
from synth_xray_assets.storage import atomic_path

BEST_WEIGHTS = "best.safetensors"
LAST_WEIGHTS = "last.safetensors"
STATE_FILE = "train_state.pt"
SELECTION_LABELS = {
    "validation": "best epoch by accuracy on the validation split (the test set never seen)",
    "test": "best epoch by accuracy on the TEST set (the study's protocol: optimistic)",
}


# ---------------------------------------------------------------- result


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
    extra: dict[str, Any] = field(default_factory=dict)

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
    model: nn.Module, images: torch.Tensor, labels: np.ndarray | None, batch_size: int, device: str
) -> tuple[np.ndarray, float]:
    """PNEUMONIA probabilities of cached uint8 images ``[N, r, r]`` and the mean loss (NaN without labels)."""
    model.eval()
    probs, loss_sum = [], 0.0
    y = None if labels is None else torch.as_tensor(np.asarray(labels), dtype=torch.long)
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = normalize_batch(images[start : start + batch_size].to(device))
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
_NOT_IN_FINGERPRINT = {"num_workers", "seeds", "bootstrap_samples", "experiments"}


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


def _save_state(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def train_classifier(
    train_x: np.ndarray | torch.Tensor,
    train_y: np.ndarray,
    val_x: np.ndarray | torch.Tensor,
    val_y: np.ndarray,
    test_x: np.ndarray | torch.Tensor,
    test_y: np.ndarray,
    settings: ClassifierSettings,
    seed: int,
    device: str,
    out_dir: Path,
    log: Callable[[str], Any] = print,
    *,
    prepared: bool = False,
    experiment: str = "",
    extra: dict[str, Any] | None = None,
    num_workers: int | None = None,
    keep_state: bool = False,
) -> RunResult:
    """Train one classifier and score it on the test set at its selected and at its last epoch.

    Images are uint8 ``[N, H, W]`` at the dataset's resolution, resized and cropped here, or
    already at the classifier's size with ``prepared=True`` (see ``cached_prepared_images``).
    AdamW + cosine annealing over ``settings.epochs``; cross-entropy. Selection follows
    ``settings.selection``: ``"validation"`` never lets the test set touch training or the
    choice of epoch (it is scored only after the loop); ``"test"`` reproduces the study.
    After each epoch the full training state goes to ``out_dir/train_state.pt``; a later call
    with the same settings, seed and data resumes after the last finished epoch and ends as an
    uninterrupted run would. The state file is removed at the end unless ``keep_state``.
    ``num_workers`` overrides ``settings.num_workers`` (augmentation processes).
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_y, val_y, test_y = (np.asarray(a).astype(np.int64) for a in (train_y, val_y, test_y))
    train_t, val_t, test_t = (_as_prepared(a, settings, prepared) for a in (train_x, val_x, test_x))
    for name, x, y in (("train", train_t, train_y), ("val", val_t, val_y), ("test", test_t, test_y)):
        if len(x) != len(y):
            raise ValueError(f"{name}: {len(x)} images but {len(y)} labels")
    if len(train_t) < 2 or len(val_t) == 0:
        raise ValueError(
            f"need >= 2 training and >= 1 validation images, got {len(train_t)} and {len(val_t)}"
        )
    use_test_for_selection = settings.selection == "test"
    fingerprint = _fingerprint(
        settings, seed, train_t, train_y, val_t, val_y, *((test_t, test_y) if use_test_for_selection else ())
    )
    state_path, best_path, last_path = out_dir / STATE_FILE, out_dir / BEST_WEIGHTS, out_dir / LAST_WEIGHTS
    meta = {"experiment": experiment, "seed": str(seed), "selection": settings.selection}

    cuda = device.startswith("cuda")
    rng_devices = [torch.device(device).index or 0] if cuda else []
    with torch.random.fork_rng(devices=rng_devices, device_type="cuda" if cuda else "cpu"):
        torch.manual_seed(seed)
        model = build_densenet121(settings).to(device)
        optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=settings.learning_rate,
            weight_decay=settings.weight_decay,
            foreach=True,  # CUDA's default; on the CPU too it steps DenseNet's 364 tensors faster
        )
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs)
        history: list[dict[str, Any]] = []
        best_key: tuple[float, float] | None = None
        best_epoch = 0
        start_epoch = 0
        if state_path.is_file():
            state = torch.load(state_path, map_location="cpu", weights_only=True)
            # The best weights are written before the state: after a crash between the two, the
            # file on disk is a later epoch than the state's best, and the run starts afresh.
            best_matches = best_path.is_file() and classifier_metadata(best_path).get("epoch") == str(
                state.get("best_epoch")
            )
            if state.get("fingerprint") == fingerprint and best_matches:
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
                torch.set_rng_state(state["rng_cpu"])
                if cuda and state.get("rng_cuda") is not None:
                    torch.cuda.set_rng_state(state["rng_cuda"], device)
                history = list(state["history"])
                best_key, best_epoch = tuple(state["best_key"]), int(state["best_epoch"])
                start_epoch = int(state["epoch"])
                log(f"resuming {experiment or 'run'} seed {seed} after epoch {start_epoch}/{settings.epochs}")
            else:
                log(f"starting afresh: {state_path} is for other settings/seed/data or lacks weights")

        loader, sampler = make_train_loader(
            train_t, train_y, settings, seed, num_workers=num_workers, pin_memory=cuda
        )
        for epoch in range(start_epoch, settings.epochs):
            t0 = time.perf_counter()
            sampler.set_epoch(epoch)
            model.train()
            loss_sum, correct, seen = 0.0, 0, 0
            for x, y in loader:
                x = normalize_batch(x.to(device, non_blocking=True))
                y = y.to(device, non_blocking=True)
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += float(loss.detach()) * len(y)
                correct += int((logits.argmax(1) == y).sum())
                seen += len(y)
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            train_seconds = time.perf_counter() - t0
            val_prob, val_loss = predict_proba(model, val_t, val_y, settings.batch_size, device)
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "lr": lr,
                "train_loss": loss_sum / max(seen, 1),
                "train_accuracy": correct / max(seen, 1),
                "val_loss": val_loss,
                "val_accuracy": float(((val_prob > 0.5) == val_y).mean()),
                "train_images": seen,
                "train_seconds": train_seconds,
            }
            if use_test_for_selection:
                test_prob, test_loss = predict_proba(model, test_t, test_y, settings.batch_size, device)
                record["test_loss"] = test_loss
                record["test_accuracy"] = float(((test_prob > 0.5) == test_y).mean())
                key = (record["test_accuracy"], test_loss)
            else:
                key = (record["val_accuracy"], val_loss)
            history.append(record)
            fault_point("classifier.epoch", str(epoch + 1))
            if _better(key, best_key):
                best_key, best_epoch = key, epoch + 1
                save_classifier(model, best_path, {**meta, "epoch": str(epoch + 1)})
            _save_state(
                state_path,
                {
                    "fingerprint": fingerprint,
                    "epoch": epoch + 1,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng_cpu": torch.get_rng_state(),
                    "rng_cuda": torch.cuda.get_rng_state(device) if cuda else None,
                    "history": history,
                    "best_key": list(best_key),
                    "best_epoch": best_epoch,
                },
            )
            log(
                f"{experiment or 'run'} seed {seed} epoch {epoch + 1}/{settings.epochs}: "
                f"loss {record['train_loss']:.4f}, val acc {record['val_accuracy']:.3f}"
                + (f", test acc {record['test_accuracy']:.3f}" if use_test_for_selection else "")
                + f" ({seen / max(train_seconds, 1e-9):.1f} img/s)"
            )
        del loader

    # Only now, with the epoch chosen, does the test set come in (under "validation").
    save_classifier(model, last_path, {**meta, "epoch": str(settings.epochs)})
    last_prob, _ = predict_proba(model, test_t, test_y, settings.batch_size, device)
    model.load_state_dict(load_file(str(best_path), device=device))
    sel_test_prob, _ = predict_proba(model, test_t, test_y, settings.batch_size, device)
    sel_val_prob, _ = predict_proba(model, val_t, val_y, settings.batch_size, device)
    if not keep_state:
        state_path.unlink(missing_ok=True)
    train_time = float(sum(h["train_seconds"] for h in history))
    n_images = int(sum(h["train_images"] for h in history))
    return RunResult(
        experiment=experiment,
        seed=seed,
        selection=settings.selection,
        selection_note=SELECTION_LABELS[settings.selection],
        epochs=settings.epochs,
        selected_epoch=best_epoch,
        history=history,
        val_selected=binary_metrics(val_y, sel_val_prob),
        test_selected=binary_metrics(test_y, sel_test_prob),
        test_last=binary_metrics(test_y, last_prob),
        test_labels=test_y.tolist(),
        test_prob_selected=sel_test_prob.tolist(),
        test_prob_last=last_prob.tolist(),
        n_train=len(train_y),
        n_train_per_class=np.bincount(train_y, minlength=2).tolist(),
        n_val=len(val_y),
        n_test=len(test_y),
        weights_path=str(best_path),
        last_weights_path=str(last_path),
        resumed_from_epoch=start_epoch,
        wall_time_s=time.perf_counter() - started,
        train_time_s=train_time,
        train_images_per_s=n_images / train_time if train_time > 0 else 0.0,
        device=device,
        settings=settings.model_dump(mode="json"),
        extra=dict(extra or {}),
    )
