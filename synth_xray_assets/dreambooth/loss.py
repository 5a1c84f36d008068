"""DreamBooth's loss and its schedule: how many optimizer steps, and which images each step sees."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from synth_xray_assets.settings import DreamBoothSettings


def dreambooth_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    prior_loss_weight: float,
    with_prior_preservation: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """DreamBooth's loss: (total, instance term, prior term or None).

    With prior preservation the batch is ``[instance; class]`` in equal halves:
    ``total = mse(instance) + prior_loss_weight * mse(class)``. Without it, plain MSE.
    """
    model_pred, target = model_pred.float(), target.float()
    if not with_prior_preservation:
        loss = F.mse_loss(model_pred, target)
        return loss, loss, None
    pred_instance, pred_prior = model_pred.chunk(2)
    target_instance, target_prior = target.chunk(2)
    instance_loss = F.mse_loss(pred_instance, target_instance)
    prior_loss = F.mse_loss(pred_prior, target_prior)
    return instance_loss + prior_loss_weight * prior_loss, instance_loss, prior_loss


def steps_per_epoch(num_instance_images: int, train_batch_size: int, gradient_accumulation_steps: int) -> int:
    """Optimizer steps in one pass over the instance images (the last step may be short)."""
    return math.ceil(num_instance_images / (train_batch_size * gradient_accumulation_steps))


def num_train_steps(num_instance_images: int, settings: DreamBoothSettings) -> int:
    """``max_train_steps`` or ceil(n / (batch * accumulation)) * epochs: 672 NORMAL, 1944 PNEUMONIA."""
    if settings.max_train_steps is not None:
        return settings.max_train_steps
    per_epoch = steps_per_epoch(
        num_instance_images, settings.train_batch_size, settings.gradient_accumulation_steps
    )
    return per_epoch * settings.num_train_epochs


def step_micro_batches(
    step: int, n_instance: int, n_class: int, settings: DreamBoothSettings
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (instance indices, class indices) of each micro-batch of optimizer step ``step`` (0-based).

    Epoch e shuffles the instance images with seed (seed, e); class images are shuffled too and
    cycled to pair one class image with each instance image. A pure function of the step, so a
    resumed run skips exactly the batches already done.
    """
    per_epoch = steps_per_epoch(n_instance, settings.train_batch_size, settings.gradient_accumulation_steps)
    epoch, step_in_epoch = divmod(step, per_epoch)
    order = np.random.default_rng([settings.seed, epoch]).permutation(n_instance)
    if n_class:
        class_perm = np.random.default_rng([settings.seed, epoch, 1]).permutation(n_class)
        class_order = np.resize(class_perm, n_instance)
    else:
        class_order = np.zeros(n_instance, dtype=np.int64)
    batch = settings.train_batch_size
    first = step_in_epoch * settings.gradient_accumulation_steps * batch
    out = []
    for k in range(settings.gradient_accumulation_steps):
        start = first + k * batch
        if start >= n_instance:
            break
        out.append((order[start : start + batch], class_order[start : start + batch]))
    return out
