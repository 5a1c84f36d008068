"""The small diffusion-training helpers the DreamBooth loop and the tiny model's pre-training
(``tiny.py``) share: images to tensors, prompts to embeddings, the VAE posterior, latents, noise."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


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
