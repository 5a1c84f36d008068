"""A classifier run's files, apart from the loop (as timm's CheckpointSaver): best, last, resumable state.

Every file is written to a temporary name and renamed into place. After each epoch the best
weights are written first (when the epoch is the best so far), then the training state; on
resume the state is trusted only when the best-weights file on disk is the state's best epoch,
so a crash between the two writes starts the run afresh instead of mixing epochs.

Files in the run folder::

    best.safetensors    the selected epoch's weights (metadata: experiment, seed, epoch)
    last.safetensors    the last epoch's weights
    train_state.pt      model, optimizer, scheduler, GradScaler, RNG, history (removed at the end)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from synth_xray_assets.classifier.model import classifier_metadata, save_classifier
from synth_xray_assets.storage import atomic_path

BEST_WEIGHTS = "best.safetensors"
LAST_WEIGHTS = "last.safetensors"
STATE_FILE = "train_state.pt"


@dataclass
class TrainingParts:
    """What the training state saves and restores."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any  # MicroBatchStep (its GradScaler's state)
    device: str


@dataclass
class Progress:
    """Where a run stands: finished epochs, their history, the best epoch and its key."""

    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_key: tuple[float, float] | None = None
    best_epoch: int = 0


class CheckpointSaver:
    """Writes and reads one run's best / last weights and its resumable state in ``out_dir``."""

    def __init__(self, out_dir: str | Path, fingerprint: str, meta: dict[str, str]) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.fingerprint, self.meta = fingerprint, dict(meta)
        self.state_path = self.out_dir / STATE_FILE
        self.best_path = self.out_dir / BEST_WEIGHTS
        self.last_path = self.out_dir / LAST_WEIGHTS

    def save_best(self, model: nn.Module, epoch: int) -> None:
        save_classifier(model, self.best_path, {**self.meta, "epoch": str(epoch)})

    def save_last(self, model: nn.Module, epoch: int) -> None:
        save_classifier(model, self.last_path, {**self.meta, "epoch": str(epoch)})

    def load_best(self, model: nn.Module, device: str) -> None:
        model.load_state_dict(load_file(str(self.best_path), device=device))

    def save_state(self, parts: TrainingParts, progress: Progress) -> None:
        """The full training state after ``progress.epoch`` epochs, atomically."""
        cuda = parts.device.startswith("cuda")
        state = {
            "fingerprint": self.fingerprint,
            "epoch": progress.epoch,
            "model": parts.model.state_dict(),
            "optimizer": parts.optimizer.state_dict(),
            "scheduler": parts.scheduler.state_dict(),
            "grad_scaler": parts.scaler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(parts.device) if cuda else None,
            "history": progress.history,
            "best_key": list(progress.best_key or ()),
            "best_epoch": progress.best_epoch,
        }
        with atomic_path(self.state_path) as tmp:
            torch.save(state, tmp)

    def resume(self, parts: TrainingParts, log: Callable[[str], Any]) -> Progress:
        """Restore ``parts`` from a state of this very run (same fingerprint, best weights on disk);
        a fresh ``Progress`` when there is none."""
        if not self.state_path.is_file():
            return Progress()
        state = torch.load(self.state_path, map_location="cpu", weights_only=True)
        best_matches = self.best_path.is_file() and classifier_metadata(self.best_path).get("epoch") == str(
            state.get("best_epoch")
        )
        if state.get("fingerprint") != self.fingerprint or not best_matches:
            log(f"starting afresh: {self.state_path} is for other settings/seed/data or lacks weights")
            return Progress()
        parts.model.load_state_dict(state["model"])
        parts.optimizer.load_state_dict(state["optimizer"])
        parts.scheduler.load_state_dict(state["scheduler"])
        parts.scaler.load_state_dict(state.get("grad_scaler") or {})
        torch.set_rng_state(state["rng_cpu"])
        if parts.device.startswith("cuda") and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"], parts.device)
        return Progress(
            epoch=int(state["epoch"]),
            history=list(state["history"]),
            best_key=tuple(state["best_key"]),
            best_epoch=int(state["best_epoch"]),
        )

    def clear_state(self) -> None:
        self.state_path.unlink(missing_ok=True)
