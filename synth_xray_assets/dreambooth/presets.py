"""Memory presets for DreamBooth and image generation, chosen from the GPU's free memory.

DreamBooth (``DreamBoothSettings.memory_preset``):

======================  ==================================================  ====================
preset                  what changes                                        free GPU memory
======================  ==================================================  ====================
``study``               nothing: the study's settings (80 GB cards)         ``preset_min_free_gib``
``memory-saving``       gradient checkpointing + 8-bit Adam (24-40 GB)      idem
``lora``                LoRA adapters + gradient checkpointing (below)      idem
======================  ==================================================  ====================

``auto`` takes the first preset whose minimum fits the free memory on CUDA, and fails before
any work with a message naming the options when none fits; off CUDA no preset applies. The
figures are estimates from the architecture (SD 2.1 base, 8 + 8 images of 512 px, fp16
autocast), not measurements: see docs/benchmarks.md.

Generation (prior images, synthetic images): :func:`generation_plan` picks the batch from free
memory, fp16 on CUDA, and VAE slicing when decoding the whole batch at once would not fit.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from synth_xray_assets.hardware import GIB
from synth_xray_assets.settings import DreamBoothSettings, GenerationSettings

PRESET_UPDATES: dict[str, dict[str, Any]] = {
    "study": {},
    "memory-saving": {"gradient_checkpointing": True, "use_8bit_adam": True},
    "lora": {"method": "lora", "gradient_checkpointing": True},
}
PRESET_ORDER = ("study", "memory-saving", "lora")
BITSANDBYTES_HINT = (
    "use_8bit_adam needs bitsandbytes (CUDA only): install the gpu extra, "
    "pip install -e '.[gpu]', or set dreambooth.use_8bit_adam=false / memory_preset='lora'"
)


@dataclass(frozen=True)
class PresetChoice:
    """The preset used, the settings it gives, and why (for metadata)."""

    name: str
    settings: DreamBoothSettings
    free_gib: float | None
    reason: str


def has_bitsandbytes() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def require_bitsandbytes(settings: DreamBoothSettings) -> None:
    """A clear error, before any work, when 8-bit Adam is asked for without bitsandbytes."""
    if settings.use_8bit_adam and not has_bitsandbytes():
        raise RuntimeError(f"bitsandbytes is not installed: {BITSANDBYTES_HINT}")


def _options(settings: DreamBoothSettings) -> str:
    return "; ".join(
        f"{name} needs about {settings.preset_min_free_gib[name]:g} GiB free"
        + (
            f" ({', '.join(f'{k}={v}' for k, v in PRESET_UPDATES[name].items())})"
            if PRESET_UPDATES[name]
            else ""
        )
        for name in PRESET_ORDER
    )


def choose_preset(settings: DreamBoothSettings, free_bytes: int | None) -> PresetChoice:
    """The preset for ``free_bytes`` of free GPU memory (``None``: not on CUDA).

    ``memory_preset`` "auto" picks the first preset that fits; a named one is applied as asked;
    "none" leaves the settings alone. Raises ``RuntimeError`` naming the options when "auto"
    finds none that fits.
    """
    wanted = settings.memory_preset
    free_gib = None if free_bytes is None else free_bytes / GIB
    if wanted == "none" or (wanted == "auto" and free_gib is None):
        return PresetChoice("none", settings, free_gib, "settings as given (no GPU memory to size for)")
    if wanted != "auto":
        if wanted not in PRESET_UPDATES:
            raise ValueError(f"unknown memory_preset {wanted!r}; choose auto, none or one of {PRESET_ORDER}")
        reason, need = "asked for", settings.preset_min_free_gib[wanted]
        if free_gib is not None and free_gib < need:
            reason += f" (warning: {free_gib:.1f} GiB free, it needs about {need:g})"
        return PresetChoice(wanted, settings.model_copy(update=PRESET_UPDATES[wanted]), free_gib, reason)
    for name in PRESET_ORDER:
        if free_gib >= settings.preset_min_free_gib[name]:
            return PresetChoice(
                name,
                settings.model_copy(update=PRESET_UPDATES[name]),
                free_gib,
                f"{free_gib:.1f} GiB free >= {settings.preset_min_free_gib[name]:g} GiB",
            )
    raise RuntimeError(
        f"DreamBooth does not fit this GPU: {free_gib:.1f} GiB free. Options: {_options(settings)}; "
        "or free the GPU, lower train_batch_size (raising gradient_accumulation_steps), or resolution"
    )


def resolve_preset(
    settings: DreamBoothSettings, free_bytes: int | None, log: Callable[[str], Any] = print
) -> PresetChoice:
    """:func:`choose_preset`, then the bitsandbytes check: both fail before any training work."""
    choice = choose_preset(settings, free_bytes)
    require_bitsandbytes(choice.settings)
    log(f"DreamBooth memory preset {choice.name}: {choice.reason}")
    return choice


# ---------------------------------------------------------------- generation


@dataclass(frozen=True)
class GenerationPlan:
    """How to sample: images per batch, dtype, and whether the VAE decodes one image at a time."""

    batch_size: int
    dtype: torch.dtype
    vae_slicing: bool
    free_gib: float | None


def generation_plan(
    wanted_batch: int, resolution: int, free_bytes: int | None, settings: GenerationSettings
) -> GenerationPlan:
    """The batch that fits ``free_bytes`` (at most ``wanted_batch``; ``None``: not on CUDA, fp32).

    Per image at 512 px in fp16 (scaled by area): ``gib_per_image_512`` for the UNet with
    classifier-free guidance, ``vae_decode_gib_per_image_512`` for the VAE decoder; the
    weights take ``generation_weights_gib``. VAE slicing turns on when decoding the batch at
    once would not fit.
    """
    if free_bytes is None:
        return GenerationPlan(wanted_batch, torch.float32, False, None)
    free_gib = free_bytes / GIB
    scale = (resolution / 512) ** 2
    budget = free_gib - settings.generation_weights_gib
    per_image = settings.gib_per_image_512 * scale
    if budget < per_image:
        raise RuntimeError(
            f"image generation does not fit this GPU: {free_gib:.1f} GiB free, it needs about "
            f"{settings.generation_weights_gib + per_image:.1f} GiB for one {resolution} px image; "
            "free the GPU"
        )
    batch = max(1, min(wanted_batch, int(budget // per_image)))
    slicing = batch * settings.vae_decode_gib_per_image_512 * scale > budget
    return GenerationPlan(batch, torch.float16, slicing, free_gib)


def with_plan(pipe: Any, plan: GenerationPlan) -> Any:
    """``pipe`` with the plan's VAE slicing switched on (decode one image at a time) when needed."""
    if plan.vae_slicing:
        pipe.vae.enable_slicing()
    return pipe


@dataclass(frozen=True)
class Planned:
    """A picklable ``make_pipe(device)``: ``load(device)`` with the plan's VAE slicing
    (:func:`with_plan`), so that each generation shard's process builds its own pipeline."""

    load: Callable[[str], Any]
    plan: GenerationPlan

    def __call__(self, device: str) -> Any:
        return with_plan(self.load(device), self.plan)
