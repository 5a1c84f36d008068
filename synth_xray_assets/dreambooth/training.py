"""DreamBooth fine-tuning of Stable Diffusion on one class of chest X-rays.

Read top to bottom:

* ``dreambooth_loss``: the loss. The batch is ``[instance images; class images]``; the
  instance half teaches the new concept, the class half (images the base model made from the
  class prompt) keeps the model's prior, weighted by ``prior_loss_weight`` (study: 0.5).
* ``train_dreambooth``: the loop. Full fine-tuning (UNet and text encoder) or LoRA, accelerate
  for mixed precision, atomic checkpoints every ``checkpointing_steps`` and exact resume.
* the trained model loads back with ``diffusion.pipelines.load_trained_pipeline``.

The small helpers above them (images to tensors, latents, noise) are shared with the tiny
model's pre-training in ``tiny.py``: the same diffusion loss code trains both.
"""

from __future__ import annotations

import math
import re
import resource
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params

from synth_xray_assets.diffusion.pipelines import LORA_WEIGHTS_NAME, load_pipeline
from synth_xray_assets.settings import DreamBoothSettings
from synth_xray_assets.storage import atomic_path, sha256_bytes, write_json_atomic

TRAINING_INFO_NAME = "dreambooth.json"  # beside the saved model: method, base, prompt, steps
CHECKPOINT_STATE_NAME = "training_state.json"  # inside each checkpoint-<step> folder
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
MEMORY_OPTIONS_HINT = (
    "reduce memory with the DreamBooth settings gradient_checkpointing=true, use_8bit_adam=true "
    "(needs bitsandbytes), a smaller train_batch_size (raise gradient_accumulation_steps to keep the "
    "effective batch), mixed_precision='fp16' or 'bf16', or method='lora'"
)


# ---------------------------------------------------------------------------------------------
# Shared diffusion helpers (also used by the tiny model's pre-training)
# ---------------------------------------------------------------------------------------------


def images_to_tensor(images: np.ndarray, resolution: int) -> torch.Tensor:
    """uint8 grayscale ``[N, H, W]`` -> float ``[N, 3, R, R]`` in [-1, 1], as Stable Diffusion expects."""
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images of shape [N, H, W], got {images.dtype} {images.shape}")
    if images.shape[1] != images.shape[2]:
        raise ValueError(f"expected square images, got {images.shape[1]}x{images.shape[2]}")
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div(127.5).sub(1.0)[:, None]
    if x.shape[-1] != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True)
    return x.expand(-1, 3, -1, -1).contiguous()


def tokenize_prompts(tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    """Token ids ``[len(prompts), max_length]``, padded as the Stable Diffusion pipeline pads them."""
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def encode_tokens(text_encoder: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The text encoder's last hidden state, as ``StableDiffusionPipeline.encode_prompt`` uses it."""
    return text_encoder(input_ids.to(next(text_encoder.parameters()).device))[0]


@torch.no_grad()
def encode_latent_distribution(
    vae: torch.nn.Module, images: np.ndarray, resolution: int, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior (mean, std) of every image, on the CPU in float32.

    The VAE is frozen during diffusion training and there is no augmentation, so drawing
    ``mean + std * noise`` each step is exactly what encoding every step would give, for a
    fraction of the cost.
    """
    param = next(vae.parameters())
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        x = images_to_tensor(images[start : start + batch_size], resolution)
        dist = vae.encode(x.to(param.device, param.dtype)).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def sample_latents(
    mean: torch.Tensor, std: torch.Tensor, scaling_factor: float, generator: torch.Generator
) -> torch.Tensor:
    """Draw scaled latents from the cached VAE posterior."""
    return (mean + std * torch.randn(mean.shape, generator=generator)) * scaling_factor


def noisy_latents_and_target(
    latents: torch.Tensor, noise_scheduler: Any, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward diffusion at a random timestep per image: (noisy latents, timesteps, target).

    The target is the noise for epsilon prediction (SD 2.1 base), the velocity for v-prediction.
    """
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator
    )
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    return noisy, timesteps, target


def step_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, *keys)``: step k's noise does not depend on earlier steps,
    so a resumed run draws exactly what an uninterrupted run would."""
    state = np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


# ---------------------------------------------------------------------------------------------
# The DreamBooth loss
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Step counts and data order
# ---------------------------------------------------------------------------------------------


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
# Training
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


def train_dreambooth(
    base_model_dir: Path,
    instance_images: np.ndarray,
    class_images: np.ndarray | None,
    instance_prompt: str,
    settings: DreamBoothSettings,
    output_dir: Path,
    work_dir: Path,
    device: str,
    log: Callable[[str], None] = print,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Fine-tune the model in ``base_model_dir`` on ``instance_images`` (uint8 ``[N, H, W]``).

    ``settings.method`` "full" trains the UNet (and the text encoder when ``train_text_encoder``)
    and saves a whole diffusers pipeline to ``output_dir``; "lora" trains LoRA adapters and saves
    ``pytorch_lora_weights.safetensors``. Checkpoints go to ``work_dir/checkpoint-<step>``; a new
    call resumes from the latest one made with the same settings and data. ``on_step(step, metrics)``
    is called after each optimizer step (1-based).
    """
    base_model_dir, output_dir, work_dir = Path(base_model_dir), Path(output_dir), Path(work_dir)
    if settings.with_prior_preservation and (class_images is None or len(class_images) == 0):
        raise ValueError("with_prior_preservation needs class images (made by the base model)")
    if len(instance_images) == 0:
        raise ValueError("no instance images to train on")
    class_images = class_images if settings.with_prior_preservation else None
    started = time.perf_counter()
    try:
        return _train(
            base_model_dir,
            instance_images,
            class_images,
            instance_prompt,
            settings,
            output_dir,
            work_dir,
            device,
            log,
            on_step,
            started,
        )
    except torch.OutOfMemoryError as exc:
        raise RuntimeError(f"DreamBooth ran out of memory on {device}: {MEMORY_OPTIONS_HINT}") from exc


def _train(
    base_model_dir: Path,
    instance_images: np.ndarray,
    class_images: np.ndarray | None,
    instance_prompt: str,
    settings: DreamBoothSettings,
    output_dir: Path,
    work_dir: Path,
    device: str,
    log: Callable[[str], None],
    on_step: Callable[[int, dict[str, float]], None] | None,
    started: float,
) -> TrainResult:
    accelerator = _make_accelerator(device, settings)
    device_t = accelerator.device
    if device_t.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device_t)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )
    lora = settings.method == "lora"
    train_text = settings.train_text_encoder

    # Models: the base pipeline's parts, seeded so LoRA's random init is reproducible.
    torch.manual_seed(settings.seed)
    base = load_pipeline(base_model_dir, "cpu", torch.float32)
    tokenizer, text_encoder, vae, unet = base.tokenizer, base.text_encoder, base.vae, base.unet
    noise_scheduler = DDPMScheduler.from_config(base.scheduler.config)
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

    # Data: the VAE posterior of every image, once; token ids of the two prompts.
    scaling = float(vae.config.scaling_factor)
    inst_mean, inst_std = encode_latent_distribution(
        vae, instance_images, settings.resolution, settings.train_batch_size
    )
    if class_images is not None:
        cls_mean, cls_std = encode_latent_distribution(
            vae, class_images, settings.resolution, settings.train_batch_size
        )
    prompt_ids = tokenize_prompts(tokenizer, [instance_prompt, settings.class_prompt])
    if not train_text:
        with torch.no_grad():
            fixed_embeds = encode_tokens(text_encoder, prompt_ids)

    # Optimizer, schedule, accelerate.
    params = [p for m in trained for p in m.parameters() if p.requires_grad]
    optimizer = _make_optimizer(params, settings, log)
    total_steps = num_train_steps(len(instance_images), settings)
    per_epoch = steps_per_epoch(
        len(instance_images), settings.train_batch_size, settings.gradient_accumulation_steps
    )
    lr_scheduler = get_scheduler(
        settings.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=settings.lr_warmup_steps,
        num_training_steps=total_steps,
    )
    prepared = accelerator.prepare(*trained, optimizer, lr_scheduler)
    trained, optimizer, lr_scheduler = list(prepared[: len(trained)]), prepared[-2], prepared[-1]
    unet = trained[0]
    if train_text:
        text_encoder = trained[1]
    _register_trainable_only_state_hooks(accelerator)

    # Resume from the latest checkpoint of this very configuration.
    fingerprint = _run_fingerprint(
        base_model_dir, instance_images, class_images, instance_prompt, settings, accelerator
    )
    history: dict[str, list[float]] = {"losses": [], "instance_losses": [], "prior_losses": []}
    resumed_from = 0
    checkpoint = latest_checkpoint(work_dir, fingerprint, log)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        state = _read_json(checkpoint / CHECKPOINT_STATE_NAME)
        resumed_from = int(state["global_step"])
        history = {k: list(state[k]) for k in history}
        log(f"resumed from {checkpoint.name}: continuing at step {resumed_from + 1} of {total_steps}")

    n_class = 0 if class_images is None else len(class_images)
    log(
        f"DreamBooth {settings.method}: {len(instance_images)} instance / {n_class} class images, "
        f"{total_steps} steps ({per_epoch} per epoch), batch {settings.train_batch_size} x "
        f"{settings.gradient_accumulation_steps} accumulation, precision {accelerator.mixed_precision}, "
        f"device {device_t}"
    )
    log_every = max(1, total_steps // 10)
    steps_run: list[int] = []
    for model in trained:
        model.train()
    global_step = resumed_from
    while global_step < total_steps:
        micro_batches = step_micro_batches(global_step, len(instance_images), n_class, settings)
        n_images = sum(len(i) for i, _ in micro_batches)
        step_loss = step_instance = step_prior = 0.0
        for k, (inst_idx, cls_idx) in enumerate(micro_batches):
            gen = step_generator(settings.seed, global_step, k)
            mean, std = inst_mean[inst_idx], inst_std[inst_idx]
            if class_images is not None:
                mean = torch.cat([mean, cls_mean[cls_idx]])
                std = torch.cat([std, cls_std[cls_idx]])
            latents = sample_latents(mean, std, scaling, gen)
            noisy, timesteps, target = noisy_latents_and_target(latents, noise_scheduler, gen)
            embeds = encode_tokens(text_encoder, prompt_ids) if train_text else fixed_embeds
            counts = torch.tensor([len(inst_idx), len(cls_idx) if class_images is not None else 0])
            encoder_states = embeds.repeat_interleave(counts.to(embeds.device), dim=0)
            model_dtype = weight_dtype if lora else torch.float32
            pred = unet(
                noisy.to(device_t, model_dtype),
                timesteps.to(device_t),
                encoder_states.to(model_dtype),
            ).sample
            loss, instance_loss, prior_loss = dreambooth_loss(
                pred,
                target.to(device_t),
                settings.prior_loss_weight,
                class_images is not None,
            )
            share = len(inst_idx) / n_images  # micro-batches of unequal size weigh by images
            accelerator.backward(loss * share)
            step_loss += loss.item() * share
            step_instance += instance_loss.item() * share
            step_prior += (prior_loss.item() if prior_loss is not None else 0.0) * share
        if settings.max_grad_norm:
            accelerator.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        global_step += 1
        steps_run.append(global_step)
        history["losses"].append(step_loss)
        history["instance_losses"].append(step_instance)
        history["prior_losses"].append(step_prior)
        metrics = {
            "loss": step_loss,
            "instance_loss": step_instance,
            "prior_loss": step_prior,
            "lr": float(lr_scheduler.get_last_lr()[0]),
        }
        if global_step % log_every == 0 or global_step in (1, total_steps):
            log(
                f"step {global_step}/{total_steps} loss {step_loss:.4f} "
                f"(instance {step_instance:.4f}, prior {step_prior:.4f}) lr {metrics['lr']:.2e}"
            )
        if settings.checkpointing_steps and global_step % settings.checkpointing_steps == 0:
            _save_checkpoint(
                accelerator,
                work_dir,
                global_step,
                {"global_step": global_step, "fingerprint": fingerprint, **history},
                settings.checkpoints_total_limit,
            )
            log(f"saved checkpoint-{global_step}")
        if on_step is not None:
            on_step(global_step, metrics)

    accelerator.wait_for_everyone()
    info = {
        "method": settings.method,
        "base_model_dir": str(base_model_dir),
        "instance_prompt": instance_prompt,
        "class_prompt": settings.class_prompt,
        "global_step": global_step,
        "lora_rank": settings.lora_rank if lora else None,
        "train_text_encoder": train_text,
        "fingerprint": fingerprint,
    }
    unwrapped = [accelerator.unwrap_model(m) for m in trained]
    _save_final(unwrapped, base_model_dir, output_dir, info, settings)
    log(f"saved the {settings.method} DreamBooth model to {output_dir}")
    if not settings.keep_checkpoints:
        for _, path in _checkpoints(work_dir):
            shutil.rmtree(path, ignore_errors=True)

    peak = (
        torch.cuda.max_memory_allocated(device_t)
        if device_t.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # process peak RSS (Linux: KiB)
    )
    accelerator.free_memory()
    return TrainResult(
        global_step=global_step,
        epochs=math.ceil(total_steps / per_epoch),
        losses=history["losses"],
        wall_s=time.perf_counter() - started,
        peak_memory_bytes=int(peak),
        resumed_from_step=resumed_from,
        output_dir=output_dir,
        method=settings.method,
        steps_run=steps_run,
        instance_losses=history["instance_losses"],
        prior_losses=history["prior_losses"],
    )


def _make_accelerator(device: str, settings: DreamBoothSettings) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    use_cuda = device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asked for, but CUDA is not available")
    kwargs = {"mixed_precision": settings.mixed_precision if use_cuda else "no", "cpu": not use_cuda}
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


def _make_optimizer(
    params: list[torch.nn.Parameter], settings: DreamBoothSettings, log: Callable[[str], None]
) -> torch.optim.Optimizer:
    optimizer_cls: Any = torch.optim.AdamW
    if settings.use_8bit_adam:
        try:
            import bitsandbytes as bnb

            optimizer_cls = bnb.optim.AdamW8bit
        except ImportError:
            message = "use_8bit_adam is set but bitsandbytes is not installed: using plain AdamW"
            warnings.warn(message, stacklevel=3)
            log(f"WARNING: {message}")
    lr = settings.lora_learning_rate if settings.method == "lora" else settings.learning_rate
    # One kernel per op over all tensors instead of a loop per tensor (torch's CPU default).
    extra = {"foreach": True} if optimizer_cls is torch.optim.AdamW else {}
    return optimizer_cls(
        params,
        **extra,
        lr=lr,
        betas=(settings.adam_beta1, settings.adam_beta2),
        weight_decay=settings.adam_weight_decay,
        eps=settings.adam_epsilon,
    )


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def _trainable_names(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def _register_trainable_only_state_hooks(accelerator: Any) -> None:
    """Checkpoints hold only the trained weights: all of them for full fine-tuning, the adapters for
    LoRA (megabytes instead of the whole frozen UNet). The rest comes from the base model."""
    from safetensors.torch import load_file

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        for i, model in enumerate(models):
            names = _trainable_names(model)
            weights[i] = {k: v for k, v in weights[i].items() if k in names}

    def load_hook(models: list, input_dir: str) -> None:
        for i, model in enumerate(list(models)):
            path = Path(input_dir) / (f"model_{i}.safetensors" if i else "model.safetensors")
            state = load_file(str(path))
            missing, unexpected = model.load_state_dict(state, strict=False)
            lost = _trainable_names(model) & set(missing)
            if lost or unexpected:
                raise RuntimeError(
                    f"checkpoint {input_dir} does not match the model: missing {sorted(lost)[:5]}, "
                    f"unexpected {sorted(unexpected)[:5]}"
                )
        models.clear()  # loaded here; accelerate loads optimizer, scheduler and RNG state

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _run_fingerprint(
    base_model_dir: Path,
    instance_images: np.ndarray,
    class_images: np.ndarray | None,
    instance_prompt: str,
    settings: DreamBoothSettings,
    accelerator: Any,
) -> str:
    """What a checkpoint must share with this run to be resumed: data, prompt, base and the settings
    that change the numbers (not checkpointing or memory options that leave them alone)."""
    ignored = {"checkpointing_steps", "checkpoints_total_limit", "gradient_checkpointing", "sample_images"}
    ignored |= {"sample_steps", "num_class_images", "class_image_steps", "class_image_guidance"}
    ignored |= {"class_image_batch_size", "instance_prompts", "keep_checkpoints"}
    parts = {
        "settings": {k: v for k, v in settings.model_dump(mode="json").items() if k not in ignored},
        "precision": accelerator.mixed_precision,
        "base": str(base_model_dir.resolve()),
        "prompt": instance_prompt,
        "instance": sha256_bytes(np.ascontiguousarray(instance_images).tobytes()),
        "class": None if class_images is None else sha256_bytes(np.ascontiguousarray(class_images).tobytes()),
    }
    return sha256_bytes(repr(sorted(parts.items())).encode())[:16]


_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def _checkpoints(work_dir: Path) -> list[tuple[int, Path]]:
    if not work_dir.is_dir():
        return []
    found = []
    for path in work_dir.iterdir():
        match = _CHECKPOINT_RE.match(path.name)
        if match and (path / CHECKPOINT_STATE_NAME).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(work_dir: Path, fingerprint: str, log: Callable[[str], None] = print) -> Path | None:
    """The newest complete ``checkpoint-<step>`` in ``work_dir`` made by a run with ``fingerprint``."""
    for _step, path in reversed(_checkpoints(Path(work_dir))):
        if _read_json(path / CHECKPOINT_STATE_NAME).get("fingerprint") == fingerprint:
            return path
        log(f"ignoring {path.name}: made with other data or settings")
    return None


def _save_checkpoint(accelerator: Any, work_dir: Path, step: int, state: dict, limit: int) -> Path:
    """``accelerator.save_state`` into a temporary folder renamed to ``checkpoint-<step>``; keep ``limit``."""
    path = work_dir / f"checkpoint-{step}"
    with atomic_path(path) as tmp:
        accelerator.save_state(str(tmp))
        write_json_atomic(tmp / CHECKPOINT_STATE_NAME, state)
    # Checkpoints of other data or settings can never be resumed by this run: drop them, then
    # keep this run's newest ``limit``.
    ours = []
    for _, old in _checkpoints(work_dir):
        if _read_json(old / CHECKPOINT_STATE_NAME).get("fingerprint") == state["fingerprint"]:
            ours.append(old)
        else:
            shutil.rmtree(old, ignore_errors=True)
    for old in ours[: -max(limit, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def _read_json(path: Path) -> dict:
    import json

    return json.loads(Path(path).read_text())


# ---------------------------------------------------------------------------------------------
# Final model
# ---------------------------------------------------------------------------------------------


def _save_final(
    trained: list[torch.nn.Module],
    base_model_dir: Path,
    output_dir: Path,
    info: dict,
    settings: DreamBoothSettings,
) -> None:
    unet = trained[0]
    text_encoder = trained[1] if len(trained) > 1 else None
    with atomic_path(output_dir) as tmp:
        if settings.method == "lora":
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            def lora_layers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
                state = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
                return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}

            StableDiffusionPipeline.save_lora_weights(
                tmp,
                unet_lora_layers=lora_layers(unet),
                text_encoder_lora_layers=lora_layers(text_encoder) if text_encoder is not None else None,
                weight_name=LORA_WEIGHTS_NAME,
            )
        else:
            parts: dict[str, Any] = {"unet": unet.float()}
            if text_encoder is not None:
                parts["text_encoder"] = text_encoder.float()
            pipe = load_pipeline(base_model_dir, "cpu", torch.float32, **parts)
            pipe.save_pretrained(tmp, safe_serialization=True)
        write_json_atomic(tmp / TRAINING_INFO_NAME, info)
