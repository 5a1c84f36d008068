"""One optimizer step of a classifier: mixed precision, channels_last, and the out-of-memory fallback.

``choose_precision`` picks bf16 autocast where the GPU supports it, else fp16 with a GradScaler;
the CPU runs fp32. ``MicroBatchStep`` runs one batch as micro-batches whose losses are weighted
by their share of the batch, so the gradient is the batch-mean loss's gradient whatever the
micro-batch. On a CUDA out-of-memory error it clears the gradients, halves the micro-batch and
runs the batch again: the effective batch (images per optimizer step) and the loss weighting
stay the same. BatchNorm is the exception: it normalises over each micro-batch, so its batch
statistics (and the running averages) follow the micro-batch, not the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from synth_xray_assets.classifier.data import augment_batch, normalize_batch
from synth_xray_assets.settings import ClassifierSettings

BATCHNORM_NOTE = (
    "BatchNorm normalises over each micro-batch: with a micro-batch smaller than the batch, its "
    "batch statistics and running averages differ from one big batch (the gradient weighting does not)"
)
OOM_HINT = (
    "lower classifier.batch_size, keep classifier.mixed_precision='auto' and channels_last=true, "
    "or free the GPU"
)


@dataclass(frozen=True)
class Precision:
    """How a step computes: ``dtype`` of autocast (None: fp32), whether a GradScaler runs, a label."""

    dtype: torch.dtype | None
    grad_scaler: bool
    label: Literal["fp32", "bf16", "fp16"]


FP32 = Precision(None, False, "fp32")


def choose_precision(device: str, wanted: str, bf16_supported: bool | None = None) -> Precision:
    """``wanted`` ("auto", "bf16", "fp16" or "no") on ``device``: mixed precision on CUDA only.

    "auto" takes bf16 where the card supports it (Ampere and later), else fp16 with a GradScaler.
    ``bf16_supported`` defaults to asking CUDA (given in tests).
    """
    if wanted not in ("auto", "bf16", "fp16", "no"):
        raise ValueError(f"classifier.mixed_precision must be auto, bf16, fp16 or no, not {wanted!r}")
    if not device.startswith("cuda") or wanted == "no":
        return FP32
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    if wanted == "bf16" and not bf16_supported:
        raise ValueError(f"classifier.mixed_precision='bf16' but {device} does not support bf16; use auto")
    if wanted == "bf16" or (wanted == "auto" and bf16_supported):
        return Precision(torch.bfloat16, False, "bf16")
    return Precision(torch.float16, True, "fp16")


def use_channels_last(settings: ClassifierSettings, device: str) -> bool:
    """channels_last on CUDA when the settings ask (on the CPU it brings nothing here)."""
    return settings.channels_last and device.startswith("cuda")


def prepare_model(model: nn.Module, device: str, channels_last: bool) -> nn.Module:
    """The model on ``device``, in channels_last memory format when asked (faster convolutions on
    tensor cores; the numbers are the same)."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


@dataclass
class StepOutcome:
    """One batch's summed loss (over images), correct predictions and image count."""

    loss_sum: float
    correct: int
    images: int


class MicroBatchStep:
    """Runs a batch through ``model`` as micro-batches and steps ``optimizer`` once.

    ``micro_batch`` starts at the batch size and halves on each out-of-memory error (recorded in
    ``self.micro_batch``; ``self.oom_events`` counts them). Inputs are uint8 ``[B, H, W]``; with
    ``augment_on_device`` the batch is augmented here, on the model's device, else it arrives
    augmented from the loader's workers.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        settings: ClassifierSettings,
        precision: Precision,
        device: str,
        log: Callable[[str], Any] = print,
    ) -> None:
        self.model, self.optimizer, self.settings = model, optimizer, settings
        self.precision, self.device, self.log = precision, device, log
        self.channels_last = use_channels_last(settings, device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=precision.grad_scaler)
        self.micro_batch = settings.batch_size
        self.oom_events = 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor, augment_seed: int | None = None) -> StepOutcome:
        """One optimizer step on uint8 ``x`` and labels ``y`` (already on the device).

        ``augment_seed``: augment here with that seed (GPU augmentation), else ``x`` is augmented.
        """
        if augment_seed is not None:
            x = augment_batch(x, self.settings, torch.Generator().manual_seed(augment_seed))
        while True:
            try:
                return self._run(x, y)
            except torch.OutOfMemoryError:
                self._halve()

    def _halve(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        if self.micro_batch <= 1:
            raise torch.OutOfMemoryError(
                f"classifier training ran out of memory on {self.device} even at a micro-batch of 1: "
                + OOM_HINT
            )
        self.micro_batch //= 2
        self.oom_events += 1
        self.log(
            f"out of memory on {self.device}: micro-batch halved to {self.micro_batch}, gradients "
            f"accumulated to keep the batch of {self.settings.batch_size} per optimizer step"
        )

    def _run(self, x: torch.Tensor, y: torch.Tensor) -> StepOutcome:
        self.optimizer.zero_grad(set_to_none=True)
        n = len(y)
        loss_sum, correct = 0.0, 0
        for start in range(0, n, self.micro_batch):
            xb = normalize_batch(x[start : start + self.micro_batch])
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yb = y[start : start + self.micro_batch]
            with torch.autocast(
                device_type="cuda" if self.device.startswith("cuda") else "cpu",
                dtype=self.precision.dtype,
                enabled=self.precision.dtype is not None,
            ):
                logits = self.model(xb)
            summed = F.cross_entropy(logits.float(), yb, reduction="sum")
            self.scaler.scale(summed / n).backward()  # each image weighs 1/n, whatever the micro-batch
            loss_sum += float(summed.detach())
            correct += int((logits.detach().argmax(1) == yb).sum())
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return StepOutcome(loss_sum, correct, n)

    def state_dict(self) -> dict[str, Any]:
        """The GradScaler's state (its scale), saved with the training state."""
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.scaler.load_state_dict(state)


def oom_note(step: MicroBatchStep) -> dict[str, Any]:
    """What the run's metadata says about micro-batching."""
    smaller = step.micro_batch < step.settings.batch_size
    return {
        "batch_size": step.settings.batch_size,
        "micro_batch": step.micro_batch,
        "gradient_accumulation": -(-step.settings.batch_size // step.micro_batch),
        "oom_events": step.oom_events,
        "batchnorm_note": BATCHNORM_NOTE if smaller else "",
    }
