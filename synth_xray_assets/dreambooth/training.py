"""DreamBooth fine-tuning of Stable Diffusion on one class of chest X-rays: the loop.

By concern:

* ``loss.py``: the loss (``dreambooth_loss``) and its schedule (steps, micro-batches per step).
* ``checkpoints.py``: resumable checkpoints (save, find, prune), the final model
  (it loads back with ``diffusion.pipelines.load_trained_pipeline``).
* ``presets.py``: memory presets chosen from the free GPU memory; 8-bit Adam's requirement.
* ``latents.py``: the small diffusion helpers shared with the tiny model's pre-training in
  ``tiny.py`` (images to tensors, latents, noise), which imports them from there.
* this file: ``train_dreambooth``, the loop: full fine-tuning (UNet and text encoder) or LoRA,
  accelerate for mixed precision, a disk preflight, checkpoints every ``checkpointing_steps``
  and exact resume.
"""

from __future__ import annotations

import contextlib
import gc
import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params

from synth_xray_assets.diffusion.pipelines import LORA_WEIGHTS_NAME, load_pipeline  # noqa: F401
from synth_xray_assets.dreambooth.checkpoints import (  # noqa: F401 (re-exported)
    CHECKPOINT_STATE_NAME,
    TRAINING_INFO_NAME,
    DiskPlan,
    RunInputs,
    checkpoints_due,
    disk_needed_bytes,
    latest_checkpoint,
    list_checkpoints,
    non_weight_bytes,
    our_checkpoints,
    read_json,
    register_trainable_only_state_hooks,
    remove_all_checkpoints,
    run_fingerprint,
    save_checkpoint,
    save_final_model,
)
from synth_xray_assets.dreambooth.latents import (
    encode_latent_distribution,
    encode_tokens,
    noisy_latents_and_target,
    sample_latents,
    step_generator,
    tokenize_prompts,
)
from synth_xray_assets.dreambooth.loss import (  # noqa: F401 (re-exported)
    dreambooth_loss,
    num_train_steps,
    rank_pieces,
    require_world_size,
    step_micro_batches,
    steps_per_epoch,
)
from synth_xray_assets.dreambooth.presets import BITSANDBYTES_HINT, require_bitsandbytes
from synth_xray_assets.hardware import GIB, require_free_space
from synth_xray_assets.operations.faults import fault_point
from synth_xray_assets.settings import DreamBoothSettings

UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
MEMORY_OPTIONS_HINT = (
    "reduce memory with dreambooth.memory_preset='memory-saving' (gradient checkpointing + 8-bit "
    "Adam, needs bitsandbytes) or 'lora', or the settings gradient_checkpointing=true, "
    "use_8bit_adam=true, a smaller train_batch_size (raise gradient_accumulation_steps to keep the "
    "effective batch), mixed_precision='fp16' or 'bf16', method='lora'"
)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What one ``train_dreambooth`` call did; ``losses`` covers every step, resumed ones included."""

    global_step: int
    epochs: int
    losses: list[float]
    wall_s: float
    peak_memory_bytes: int
    resumed_from_step: int
    output_dir: Path
    method: str = "full"
    steps_run: list[int] = field(default_factory=list)  # the 1-based steps this call computed
    instance_losses: list[float] = field(default_factory=list)
    prior_losses: list[float] = field(default_factory=list)
    disk_needed_bytes: int = 0  # the preflight's estimate of what the run writes


@dataclass
class RunDirs:
    """Where a DreamBooth run writes: the final model, and its checkpoints."""

    output_dir: Path
    work_dir: Path


def train_dreambooth(
    inputs: RunInputs,
    settings: DreamBoothSettings,
    dirs: RunDirs,
    device: str,
    log: Callable[[str], None] = print,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Fine-tune the model in ``inputs.base_model_dir`` on ``inputs.instance_images`` (uint8 ``[N, H, W]``).

    ``settings.method`` "full" trains the UNet (and the text encoder when ``train_text_encoder``)
    and saves a whole diffusers pipeline to ``dirs.output_dir``; "lora" trains LoRA adapters and
    saves ``pytorch_lora_weights.safetensors``. Checkpoints go to ``dirs.work_dir/checkpoint-<step>``;
    a new call resumes from the latest one made with the same settings and data.
    ``inputs.class_images`` are used only with ``with_prior_preservation``. ``on_step(step, metrics)``
    is called after each optimizer step (1-based). Before any write, the disk the run needs is
    compared with what is free (``OSError`` naming both when short); ``use_8bit_adam`` without
    bitsandbytes is a ``RuntimeError`` before any work.
    """
    class_images = inputs.class_images
    if settings.with_prior_preservation and (class_images is None or len(class_images) == 0):
        raise ValueError("with_prior_preservation needs class images (made by the base model)")
    if len(inputs.instance_images) == 0:
        raise ValueError("no instance images to train on")
    require_bitsandbytes(settings)
    inputs = RunInputs(
        Path(inputs.base_model_dir),
        inputs.instance_images,
        class_images if settings.with_prior_preservation else None,
        inputs.instance_prompt,
    )
    output_dir, work_dir = Path(dirs.output_dir), Path(dirs.work_dir)
    run = _Run(settings, output_dir, work_dir, log, on_step, time.perf_counter())
    try:
        return _train(inputs, run, device)
    except torch.OutOfMemoryError as exc:
        raise RuntimeError(f"DreamBooth ran out of memory on {device}: {MEMORY_OPTIONS_HINT}") from exc


@dataclass
class _Run:
    """Where a run writes, how it reports, and when it started."""

    settings: DreamBoothSettings
    output_dir: Path
    work_dir: Path
    log: Callable[[str], None]
    on_step: Callable[[int, dict[str, float]], None] | None
    started: float


@dataclass
class _Models:
    """The pipeline's parts on the device; ``trained`` = the UNet (and the text encoder)."""

    accelerator: Any
    tokenizer: Any
    text_encoder: torch.nn.Module | None  # None once a frozen one has encoded the prompts
    vae: torch.nn.Module | None  # None once the images are encoded
    unet: torch.nn.Module
    noise_scheduler: Any
    weight_dtype: torch.dtype
    trained: list[torch.nn.Module]
    lora: bool
    train_text: bool


@dataclass
class _Data:
    """Every image's VAE posterior (computed once) and the two prompts' token ids / embeddings."""

    inst_mean: torch.Tensor
    inst_std: torch.Tensor
    cls_mean: torch.Tensor | None
    cls_std: torch.Tensor | None
    prompt_ids: torch.Tensor
    fixed_embeds: torch.Tensor | None
    scaling: float

    @property
    def n_class(self) -> int:
        return 0 if self.cls_mean is None else len(self.cls_mean)


@dataclass
class _Optimization:
    optimizer: Any
    lr_scheduler: Any
    params: list[torch.nn.Parameter]
    total_steps: int
    per_epoch: int


def _load_models(base_model_dir: Path, settings: DreamBoothSettings, device: str) -> _Models:
    """The base pipeline's parts, frozen or trainable as the method says, on the device."""
    accelerator = _make_accelerator(device, settings)
    device_t = accelerator.device
    if device_t.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device_t)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )
    lora, train_text = settings.method == "lora", settings.train_text_encoder
    torch.manual_seed(settings.seed)  # LoRA's random init is reproducible
    base = load_pipeline(base_model_dir, "cpu", torch.float32)
    text_encoder, vae, unet = base.text_encoder, base.vae, base.unet
    vae.requires_grad_(False)
    unet.requires_grad_(not lora)
    text_encoder.requires_grad_(train_text and not lora)
    if lora:
        _add_lora_adapters(unet, text_encoder if train_text else None, settings.lora_rank)
    vae.to(device_t, dtype=weight_dtype)
    # Trained weights stay float32 (accelerate autocasts); frozen ones take the compute dtype.
    unet.to(device_t, dtype=weight_dtype if lora else torch.float32)
    text_encoder.to(device_t, dtype=torch.float32 if train_text and not lora else weight_dtype)
    trained: list[torch.nn.Module] = [unet] + ([text_encoder] if train_text else [])
    cast_training_params(trained, dtype=torch.float32)  # what is trained stays float32
    if settings.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if train_text:
            # transformers 5 renamed it; the old name still works but warns.
            enable = getattr(text_encoder, "activation_checkpointing_enable", None)
            (enable or text_encoder.gradient_checkpointing_enable)()
    # Attention uses diffusers' default processor, torch's scaled_dot_product_attention.
    return _Models(
        accelerator,
        base.tokenizer,
        text_encoder,
        vae,
        unet,
        DDPMScheduler.from_config(base.scheduler.config),
        weight_dtype,
        trained,
        lora,
        train_text,
    )


def _encode_data(models: _Models, inputs: RunInputs, settings: DreamBoothSettings) -> _Data:
    res, batch = settings.resolution, settings.train_batch_size
    inst_mean, inst_std = encode_latent_distribution(models.vae, inputs.instance_images, res, batch)
    cls_mean = cls_std = None
    if inputs.class_images is not None:
        cls_mean, cls_std = encode_latent_distribution(models.vae, inputs.class_images, res, batch)
    prompt_ids = tokenize_prompts(models.tokenizer, [inputs.instance_prompt, settings.class_prompt])
    fixed_embeds = None
    if not models.train_text:
        with torch.no_grad():
            fixed_embeds = encode_tokens(models.text_encoder, prompt_ids)
    scaling = float(models.vae.config.scaling_factor)
    # The VAE (and a frozen text encoder) did their part: drop them for the loop's sake (SD 2.1:
    # 0.3 + 1.4 GB); the final model takes them from the base model's folder.
    models.vae = None
    if not models.train_text:
        models.text_encoder = None
    gc.collect()
    return _Data(inst_mean, inst_std, cls_mean, cls_std, prompt_ids, fixed_embeds, scaling)


def _prepare_optimization(models: _Models, settings: DreamBoothSettings, n_instance: int) -> _Optimization:
    """Optimizer and schedule, handed to accelerate with the trained models."""
    params = [p for m in models.trained for p in m.parameters() if p.requires_grad]
    optimizer = _make_optimizer(params, settings)
    total_steps = num_train_steps(n_instance, settings)
    per_epoch = steps_per_epoch(n_instance, settings.train_batch_size, settings.gradient_accumulation_steps)
    lr_scheduler = get_scheduler(
        settings.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=settings.lr_warmup_steps,
        num_training_steps=total_steps,
    )
    prepared = models.accelerator.prepare(*models.trained, optimizer, lr_scheduler)
    models.trained = list(prepared[: len(models.trained)])
    models.unet = models.trained[0]
    if models.train_text:
        models.text_encoder = models.trained[1]
    register_trainable_only_state_hooks(models.accelerator)
    return _Optimization(prepared[-2], prepared[-1], params, total_steps, per_epoch)


@dataclass(frozen=True)
class _ResumePoint:
    """Where a run continues: this configuration's latest checkpoint (None: from the start), its step,
    and how many of this run's checkpoints are already on disk."""

    checkpoint: Path | None
    step: int
    on_disk: int


def _resume_point(run: _Run, fingerprint: str) -> _ResumePoint:
    checkpoint = latest_checkpoint(run.work_dir, fingerprint, run.log)
    step = 0 if checkpoint is None else int(read_json(checkpoint / CHECKPOINT_STATE_NAME)["global_step"])
    return _ResumePoint(checkpoint, step, len(our_checkpoints(run.work_dir, fingerprint)))


def estimate_disk_bytes(
    models: _Models,
    optim: _Optimization,
    settings: DreamBoothSettings,
    base_model_dir: Path,
    point: _ResumePoint,
) -> int:
    """What the run still adds to the disk at most (``checkpoints.disk_needed_bytes``, raised by
    ``settings.disk_margin``). A checkpoint holds the trained weights in fp32 and the optimizer's two
    moments (8 bytes a weight for AdamW, 2 for 8-bit Adam); those already on disk at ``point`` are not
    counted again. The final model is the whole pipeline in fp32 and the base model's configs and
    tokenizer files, which the save writes again (LoRA: the adapters in fp32). Every tensor written
    and every checkpoint adds the settings' allowance for headers and small files."""
    per_tensor = settings.disk_bytes_per_tensor
    trained = sum(p.numel() for p in optim.params)
    per_checkpoint = (
        trained * (4 + (2 if settings.use_8bit_adam else 8))
        + len(optim.params) * per_tensor
        + settings.disk_bytes_per_checkpoint
    )
    if models.lora:
        final = trained * 4 + len(optim.params) * per_tensor
    else:
        weights = [p for m in (models.unet, models.text_encoder, models.vae) for p in m.state_dict().values()]
        final = sum(4 * w.numel() + per_tensor for w in weights) + non_weight_bytes(base_model_dir)
    to_write = checkpoints_due(optim.total_steps, settings.checkpointing_steps, point.step)
    plan = DiskPlan(per_checkpoint, final, settings.checkpoints_total_limit, point.on_disk, to_write)
    return disk_needed_bytes(plan, settings.disk_margin)


def _checkpoint_due(global_step: int, total_steps: int, every: int) -> bool:
    return bool(every) and global_step % every == 0 and global_step < total_steps


def _resume(models: _Models, run: _Run, point: _ResumePoint, total_steps: int) -> tuple[int, dict[str, list]]:
    """The step to continue from and the loss history, from the resume point's checkpoint."""
    history: dict[str, list[float]] = {"losses": [], "instance_losses": [], "prior_losses": []}
    if point.checkpoint is None:
        return 0, history
    models.accelerator.load_state(str(point.checkpoint))
    state = read_json(point.checkpoint / CHECKPOINT_STATE_NAME)
    run.log(f"resumed from {point.checkpoint.name}: continuing at step {point.step + 1} of {total_steps}")
    return point.step, {k: list(state[k]) for k in history}


def _train_step(
    models: _Models, data: _Data, optim: _Optimization, settings: DreamBoothSettings, global_step: int
) -> dict[str, float]:
    """One optimizer step (0-based ``global_step``); the step's losses (over all ranks) and lr.

    With several ranks each computes its pieces of the step (``rank_pieces``); its loss is weighted
    by its share of the step's images times the number of ranks, since DDP averages the ranks'
    gradients: the summed gradient is a one-card run's. Gradients are exchanged once per step, at
    the rank's last piece.
    """
    accelerator = models.accelerator
    micro_batches = step_micro_batches(global_step, len(data.inst_mean), data.n_class, settings)
    n_images = sum(len(i) for i, _ in micro_batches)
    pieces = rank_pieces(micro_batches, accelerator.process_index, accelerator.num_processes)
    weight = 1.0
    if not pieces:  # a short last step left this rank nothing: a zero-weight piece keeps DDP in step
        pieces, weight = [(0, np.arange(1))], 0.0
    totals = torch.zeros(3, dtype=torch.float64)  # loss, instance loss, prior loss
    for n, (m, rows) in enumerate(pieces):
        share = weight * len(rows) / n_images  # pieces of unequal size weigh by images
        with _gradient_sync(models, last=n == len(pieces) - 1):
            losses = _piece_losses(models, data, settings, (global_step, m), micro_batches[m], rows)
            accelerator.backward(losses[0] * share * accelerator.num_processes)
        totals += torch.tensor([0.0 if x is None else x.item() for x in losses], dtype=torch.float64) * share
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(totals.to(accelerator.device), "sum").cpu()
    if settings.max_grad_norm:
        accelerator.clip_grad_norm_(optim.params, settings.max_grad_norm)
    optim.optimizer.step()
    optim.lr_scheduler.step()
    optim.optimizer.zero_grad(set_to_none=True)
    loss, instance_loss, prior_loss = (float(x) for x in totals)
    return {
        "loss": loss,
        "instance_loss": instance_loss,
        "prior_loss": prior_loss,
        "lr": float(optim.lr_scheduler.get_last_lr()[0]),
    }


def _piece_losses(
    models: _Models,
    data: _Data,
    settings: DreamBoothSettings,
    at: tuple[int, int],
    micro_batch: tuple[np.ndarray, np.ndarray],
    rows: np.ndarray,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``dreambooth_loss`` on ``rows`` of micro-batch ``at`` = (step, micro-batch index): the noise
    and timesteps are drawn for the whole micro-batch, as a one-card run draws them."""
    inst_idx, cls_idx = micro_batch
    device_t, prior = models.accelerator.device, data.cls_mean is not None
    model_dtype = models.weight_dtype if models.lora else torch.float32
    gen = step_generator(settings.seed, *at)
    mean, std = data.inst_mean[inst_idx], data.inst_std[inst_idx]
    if prior:
        mean = torch.cat([mean, data.cls_mean[cls_idx]])
        std = torch.cat([std, data.cls_std[cls_idx]])
    latents = sample_latents(mean, std, data.scaling, gen)
    noisy, timesteps, target = noisy_latents_and_target(latents, models.noise_scheduler, gen)
    keep = torch.from_numpy(np.concatenate([rows, len(inst_idx) + rows]) if prior else rows)
    noisy, timesteps, target = noisy[keep], timesteps[keep], target[keep]
    embeds = encode_tokens(models.text_encoder, data.prompt_ids) if models.train_text else data.fixed_embeds
    counts = torch.tensor([len(rows), len(rows) if prior else 0])
    encoder_states = embeds.repeat_interleave(counts.to(embeds.device), dim=0)
    pred = models.unet(
        noisy.to(device_t, model_dtype), timesteps.to(device_t), encoder_states.to(model_dtype)
    ).sample
    return dreambooth_loss(pred, target.to(device_t), settings.prior_loss_weight, prior)


def _gradient_sync(models: _Models, last: bool) -> contextlib.AbstractContextManager:
    """Gradients are averaged over the ranks at a rank's last piece of a step; before it, DDP only
    accumulates them (``no_sync``). One rank: nothing to do."""
    stack = contextlib.ExitStack()
    if not last:
        for model in models.trained:
            stack.enter_context(models.accelerator.no_sync(model))
    return stack


def _train(inputs: RunInputs, run: _Run, device: str) -> TrainResult:
    settings, log = run.settings, run.log
    models = _load_models(inputs.base_model_dir, settings, device)
    require_world_size(settings, models.accelerator.num_processes)
    optim = _prepare_optimization(models, settings, len(inputs.instance_images))
    fingerprint = run_fingerprint(inputs, settings, models.accelerator.mixed_precision)
    point = _resume_point(run, fingerprint)
    disk_needed = estimate_disk_bytes(models, optim, settings, inputs.base_model_dir, point)
    require_free_space(run.work_dir, disk_needed, f"DreamBooth {settings.method} (checkpoints + final model)")
    data = _encode_data(models, inputs, settings)
    resumed_from, history = _resume(models, run, point, optim.total_steps)
    log(
        f"DreamBooth {settings.method}: {len(inputs.instance_images)} instance / {data.n_class} class "
        f"images, {optim.total_steps} steps ({optim.per_epoch} per epoch), batch "
        f"{settings.train_batch_size} x {settings.gradient_accumulation_steps} accumulation, precision "
        f"{models.accelerator.mixed_precision}, device {models.accelerator.device}, "
        f"disk needed {disk_needed / GIB:.2f} GiB"
    )
    log_every = max(1, optim.total_steps // 10)
    steps_run: list[int] = []
    for model in models.trained:
        model.train()
    global_step = resumed_from
    while global_step < optim.total_steps:
        metrics = _train_step(models, data, optim, settings, global_step)
        global_step += 1
        fault_point("dreambooth.step", f"{global_step} rank {models.accelerator.process_index}")
        steps_run.append(global_step)
        for key, name in (
            ("losses", "loss"),
            ("instance_losses", "instance_loss"),
            ("prior_losses", "prior_loss"),
        ):
            history[key].append(metrics[name])
        if global_step % log_every == 0 or global_step in (1, optim.total_steps):
            log(
                f"step {global_step}/{optim.total_steps} loss {metrics['loss']:.4f} (instance "
                f"{metrics['instance_loss']:.4f}, prior {metrics['prior_loss']:.4f}) lr {metrics['lr']:.2e}"
            )
        if _checkpoint_due(global_step, optim.total_steps, settings.checkpointing_steps):
            state = {"global_step": global_step, "fingerprint": fingerprint, **history}
            save_checkpoint(
                models.accelerator, run.work_dir, global_step, state, settings.checkpoints_total_limit
            )
            log(f"saved checkpoint-{global_step}")
        if run.on_step is not None:
            run.on_step(global_step, metrics)
    return _finish(
        models,
        inputs,
        run,
        _Progress(global_step, resumed_from, steps_run, history, fingerprint, optim, disk_needed),
    )


@dataclass
class _Progress:
    global_step: int
    resumed_from: int
    steps_run: list[int]
    history: dict[str, list[float]]
    fingerprint: str
    optim: _Optimization
    disk_needed: int


def _finish(models: _Models, inputs: RunInputs, run: _Run, progress: _Progress) -> TrainResult:
    """Save the final model, drop the checkpoints (unless kept), and report."""
    settings, accelerator = run.settings, models.accelerator
    accelerator.wait_for_everyone()
    info = {
        "method": settings.method,
        "base_model_dir": str(inputs.base_model_dir),
        "instance_prompt": inputs.instance_prompt,
        "class_prompt": settings.class_prompt,
        "global_step": progress.global_step,
        "lora_rank": settings.lora_rank if models.lora else None,
        "train_text_encoder": models.train_text,
        "fingerprint": progress.fingerprint,
    }
    _drop_optimizer_state(progress.optim)  # twice the trained weights, no longer needed
    unwrapped = [accelerator.unwrap_model(m) for m in models.trained]
    if accelerator.is_main_process:  # every rank holds the same weights; one writes them
        save_final_model(unwrapped, inputs.base_model_dir, run.output_dir, info, settings.method)
        run.log(f"saved the {settings.method} DreamBooth model to {run.output_dir}")
        if not settings.keep_checkpoints:
            remove_all_checkpoints(run.work_dir)
    accelerator.wait_for_everyone()
    device_t = accelerator.device
    peak = (
        torch.cuda.max_memory_allocated(device_t)
        if device_t.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # process peak RSS (Linux: KiB)
    )
    accelerator.free_memory()
    history = progress.history
    return TrainResult(
        global_step=progress.global_step,
        epochs=math.ceil(progress.optim.total_steps / progress.optim.per_epoch),
        losses=history["losses"],
        wall_s=time.perf_counter() - run.started,
        peak_memory_bytes=int(peak),
        resumed_from_step=progress.resumed_from,
        output_dir=run.output_dir,
        method=settings.method,
        steps_run=progress.steps_run,
        instance_losses=history["instance_losses"],
        prior_losses=history["prior_losses"],
        disk_needed_bytes=progress.disk_needed,
    )


def _drop_optimizer_state(optim: _Optimization) -> None:
    """Free the optimizer's moments and the gradients before the final model is written."""
    inner = getattr(optim.optimizer, "optimizer", optim.optimizer)  # accelerate's wrapper
    inner.zero_grad(set_to_none=True)
    inner.state.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _make_accelerator(device: str, settings: DreamBoothSettings) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DataLoaderConfiguration

    use_cuda = device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asked for, but CUDA is not available")
    kwargs = {
        "mixed_precision": settings.mixed_precision if use_cuda else "no",
        "cpu": not use_cuda,
        # The ranks split one step's global batch (rank_pieces): the schedule steps once per
        # optimizer step, as on one card, not once per rank.
        "dataloader_config": DataLoaderConfiguration(split_batches=True),
    }
    try:
        return Accelerator(**kwargs)
    except ValueError as exc:
        # accelerate keeps one process-wide state; a new precision or device needs a fresh one.
        if "already been initialized" not in str(exc):
            raise
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(**kwargs)


def _add_lora_adapters(unet: torch.nn.Module, text_encoder: torch.nn.Module | None, rank: int) -> None:
    from peft import LoraConfig

    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=UNET_LORA_TARGETS)
    )
    if text_encoder is not None:
        text_encoder.add_adapter(
            LoraConfig(
                r=rank,
                lora_alpha=rank,
                init_lora_weights="gaussian",
                target_modules=TEXT_ENCODER_LORA_TARGETS,
            )
        )


def _make_optimizer(params: list[torch.nn.Parameter], settings: DreamBoothSettings) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW with ``use_8bit_adam`` (a clear error without it)."""
    optimizer_cls: Any = torch.optim.AdamW
    if settings.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise RuntimeError(f"bitsandbytes is not installed: {BITSANDBYTES_HINT}") from exc
        optimizer_cls = bnb.optim.AdamW8bit
    lr = settings.lora_learning_rate if settings.method == "lora" else settings.learning_rate
    # Fused AdamW (CPU and CUDA): one kernel over all tensors and no temporary copies of the
    # parameters (foreach's temporaries are another 3.5 GB on SD 2.1's UNet).
    extra = {"fused": True} if optimizer_cls is torch.optim.AdamW else {}
    return optimizer_cls(
        params,
        **extra,
        lr=lr,
        betas=(settings.adam_beta1, settings.adam_beta2),
        weight_decay=settings.adam_weight_decay,
        eps=settings.adam_epsilon,
    )
