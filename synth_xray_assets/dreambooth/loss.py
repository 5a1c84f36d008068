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


# ---------------------------------------------------------------------------------------------
# Data parallelism: which images of a step each rank computes
# ---------------------------------------------------------------------------------------------


def global_batch(settings: DreamBoothSettings) -> int:
    """Instance images per optimizer step (each with its class image): batch x accumulation."""
    return settings.train_batch_size * settings.gradient_accumulation_steps


def valid_world_sizes(settings: DreamBoothSettings) -> list[int]:
    """The numbers of ranks (cards) one DreamBooth run may use: those that divide the global batch,
    so that every rank computes as many images per step and the optimization is a one-card run's."""
    n = global_batch(settings)
    return [k for k in range(1, n + 1) if n % k == 0]


def rank_pieces(
    micro_batches: list[tuple[np.ndarray, np.ndarray]], rank: int, world: int
) -> list[tuple[int, np.ndarray]]:
    """The part of one optimizer step that rank ``rank`` of ``world`` computes: (micro-batch, positions
    in it) pieces.

    The step's instance images, in micro-batch order, are cut into ``world`` runs of equal length
    (``world`` divides the global batch; a short last step of an epoch may leave a rank fewer or
    none); each instance image brings its paired class image. One rank gets every micro-batch whole.
    Each piece still draws the noise of its whole micro-batch (``step_generator(seed, step, m)``) and
    keeps its own rows, so every image sees the noise a one-card run gives it.
    """
    sizes = [len(inst) for inst, _ in micro_batches]
    total = sum(sizes)
    lo, hi = rank * total // world, (rank + 1) * total // world
    pieces, start = [], 0
    for m, size in enumerate(sizes):
        first, last = max(lo, start), min(hi, start + size)
        if first < last:
            pieces.append((m, np.arange(first - start, last - start)))
        start += size
    return pieces


def require_world_size(settings: DreamBoothSettings, world: int) -> None:
    """A clear ``ValueError`` unless ``world`` ranks divide the global batch, naming those that do."""
    if world not in valid_world_sizes(settings):
        raise ValueError(
            f"{world} ranks do not divide the global batch of {global_batch(settings)} "
            f"(dreambooth.train_batch_size x gradient_accumulation_steps): use one of "
            f"{', '.join(map(str, valid_world_sizes(settings)))} cards (dreambooth.data_parallel_cards)"
        )
