"""Stable Diffusion pipelines: loading a saved one (base or DreamBooth-trained) and seeded sampling.

Used by DreamBooth (its samples, the prior-preservation images) and synthesis alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def load_pipeline(
    path: Path, device: str, dtype: torch.dtype = torch.float32, **components: Any
) -> StableDiffusionPipeline:
    """``StableDiffusionPipeline.from_pretrained(path)`` on ``device``, without a safety checker.

    ``components`` replace parts of the saved pipeline (for example a trained ``unet``).
    """
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"no diffusers pipeline at {path} (model_index.json missing)")
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            str(path),
            dtype=dtype,
            safety_checker=None,
            requires_safety_checker=False,
            use_safetensors=True,
            **components,
        )
    except Exception as exc:
        raise RuntimeError(f"could not load the Stable Diffusion pipeline at {path}: {exc}") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_trained_pipeline(
    checkpoint_dir: Path, base_model_dir: Path, device: str, dtype: torch.dtype | None = None
) -> StableDiffusionPipeline:
    """The pipeline ``train_dreambooth`` saved in ``checkpoint_dir``: a whole pipeline (full) or the
    base model in ``base_model_dir`` with the LoRA weights loaded. ``dtype`` defaults to float16 on
    CUDA, float32 elsewhere."""
    checkpoint_dir = Path(checkpoint_dir)
    dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"DreamBooth checkpoint {checkpoint_dir} does not exist: train it first")
    if (checkpoint_dir / LORA_WEIGHTS_NAME).is_file():
        pipe = load_pipeline(base_model_dir, device, dtype)
        try:
            pipe.load_lora_weights(str(checkpoint_dir), weight_name=LORA_WEIGHTS_NAME)
        except Exception as exc:
            raise RuntimeError(
                f"could not load the LoRA weights in {checkpoint_dir} into the base model "
                f"{base_model_dir}: {exc}"
            ) from exc
        return pipe
    if (checkpoint_dir / "model_index.json").is_file():
        return load_pipeline(checkpoint_dir, device, dtype)
    raise FileNotFoundError(
        f"{checkpoint_dir} holds no DreamBooth model (neither {LORA_WEIGHTS_NAME} nor model_index.json)"
    )


@dataclass(frozen=True)
class SavedPipeline:
    """A picklable ``make_pipe(device)``: the pipeline saved at ``path``, float16 on CUDA when
    ``half_on_cuda`` (else float32), for generation's shard processes."""

    path: Path
    half_on_cuda: bool = True

    def __call__(self, device: str) -> StableDiffusionPipeline:
        half = self.half_on_cuda and device.startswith("cuda")
        return load_pipeline(self.path, device, torch.float16 if half else torch.float32)


@dataclass(frozen=True)
class TrainedPipeline:
    """A picklable ``make_pipe(device)``: :func:`load_trained_pipeline` of a DreamBooth checkpoint."""

    checkpoint_dir: Path
    base_model_dir: Path

    def __call__(self, device: str) -> StableDiffusionPipeline:
        return load_trained_pipeline(self.checkpoint_dir, self.base_model_dir, device)


# What ``use_dpm_solver`` samples with, in words, for records of how an image was made.
SAMPLER = f"DPM-Solver multistep (diffusers {DPMSolverMultistepScheduler.__name__})"


def use_dpm_solver(pipe: StableDiffusionPipeline) -> StableDiffusionPipeline:
    """Swap the pipeline's scheduler for DPM-Solver multistep with the same noise schedule."""
    if not isinstance(pipe.scheduler, DPMSolverMultistepScheduler):
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    return pipe


@torch.no_grad()
def sample_images(
    pipe: StableDiffusionPipeline,
    prompt: str,
    seeds: Sequence[int],
    num_inference_steps: int,
    guidance_scale: float,
    resolution: int,
) -> np.ndarray:
    """uint8 grayscale ``[len(seeds), resolution, resolution]``; image k from ``seeds[k]`` alone."""
    device = pipe.device
    # Each image gets its own generator: the same seed gives the same image in any batch.
    gen_device = "cpu" if device.type == "mps" else device
    generators = [torch.Generator(gen_device).manual_seed(int(s)) for s in seeds]
    out = pipe(
        prompt=[prompt] * len(seeds),
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        height=resolution,
        width=resolution,
        generator=generators,
        output_type="np",
    ).images
    rgb = np.nan_to_num(np.asarray(out, dtype=np.float32), nan=0.0)
    gray = rgb.mean(axis=-1) if rgb.ndim == 4 else rgb
    return np.clip(np.round(gray * 255.0), 0, 255).astype(np.uint8)
