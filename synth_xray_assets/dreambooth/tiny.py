"""A tiny Stable Diffusion built from config, for the demo profile and the tests.

Same architecture family as SD 2.1 base (AutoencoderKL, UNet2DConditionModel with cross-attention
and linear projections, a CLIP text encoder, epsilon prediction on the scaled-linear schedule), a
thousand times smaller and built offline: the tokenizer's vocabulary is written here. A brief
pre-training on the demo images then lets it play the part SD 2.1 plays in the study.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from synth_xray_assets.dreambooth.latents import (
    encode_latent_distribution,
    encode_tokens,
    images_to_tensor,
    noisy_latents_and_target,
    sample_latents,
    step_generator,
    tokenize_prompts,
)
from synth_xray_assets.dreambooth.loss import dreambooth_loss
from synth_xray_assets.settings import BaseModelSettings, DreamBoothSettings

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_TOKENS = 77  # CLIP's context, as in SD 2.1
VAE_KL_WEIGHT = 1e-6  # keeps the posterior bounded; reconstruction dominates, as for SD's VAE
# The posterior starts narrow (std e^-3): with the default std 1 the decoder sees mostly noise and
# learns a blur for hundreds of steps; SD's trained VAE has a narrow posterior too.
POSTERIOR_LOGVAR_INIT = -6.0
SCALING_FACTOR_INIT = 0.18215  # SD's value; pre-training sets it from the latents' spread


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level BPE alphabet: every byte as a printable character."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def tiny_vocabulary(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """A CLIP BPE vocabulary (token -> id) and merge list: every byte (alone and word-final), plus
    merges that spell each of ``words`` as one token, plus the start and end tokens."""
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[str] = []
    seen = set(tokens)
    for word in sorted({w.lower() for w in words if w.isalpha()}):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        current = symbols[0]
        for symbol in symbols[1:]:
            merge = f"{current} {symbol}"
            current += symbol
            if current not in seen:
                merges.append(merge)
                tokens.append(current)
                seen.add(current)
    tokens += [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}, merges


def _prompt_words(settings: BaseModelSettings) -> list[str]:
    dreambooth = DreamBoothSettings()
    prompts = [settings.tiny_prompt, dreambooth.class_prompt, *dreambooth.instance_prompts.values()]
    return [w.strip(",.").lower() for p in prompts for w in p.split()]


def build_tiny_tokenizer(settings: BaseModelSettings) -> CLIPTokenizer:
    """A CLIP tokenizer made offline; the study prompts' words are single tokens."""
    vocab, merges = tiny_vocabulary(_prompt_words(settings))
    pairs = [tuple(m.split(" ")) for m in merges]  # transformers 5 takes merges as pairs
    return CLIPTokenizer(vocab=vocab, merges=pairs, model_max_length=MAX_TOKENS)


def _norm_groups(channels: tuple[int, ...]) -> int:
    return min(32, math.gcd(*channels))


def _tiny_vae(settings: BaseModelSettings, resolution: int) -> AutoencoderKL:
    """SD's autoencoder with ``tiny_vae_channels``; its posterior starts narrow."""
    channels = tuple(settings.tiny_vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=settings.tiny_layers_per_block,
        latent_channels=4,
        norm_num_groups=_norm_groups(channels),
        sample_size=resolution,
        scaling_factor=SCALING_FACTOR_INIT,
    )
    with torch.no_grad():  # quant_conv outputs (mean, logvar): start the logvar half narrow
        vae.quant_conv.bias[vae.config.latent_channels :] = POSTERIOR_LOGVAR_INIT
    return vae


def _tiny_unet(settings: BaseModelSettings, latent_size: int) -> UNet2DConditionModel:
    """SD 2.1's UNet family (linear projections, heads per level) with ``tiny_unet_channels``."""
    channels = tuple(settings.tiny_unet_channels)
    # Cross-attention on every level but the finest, where attention over all pixels is costly.
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(channels) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(channels) - 1) + ("UpBlock2D",),
        block_out_channels=channels,
        layers_per_block=settings.tiny_layers_per_block,
        norm_num_groups=_norm_groups(channels),
        cross_attention_dim=settings.tiny_text_width,
        attention_head_dim=tuple(max(1, c // 32) for c in channels),  # heads, as SD 2.1 names them
        use_linear_projection=True,
    )


def _tiny_text_encoder(settings: BaseModelSettings, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A CLIP text encoder of ``tiny_text_layers`` layers of width ``tiny_text_width``."""
    width = settings.tiny_text_width
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=settings.tiny_text_layers,
            num_attention_heads=max(1, width // 32),
            max_position_embeddings=MAX_TOKENS,
            hidden_act="gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def build_tiny_pipeline(settings: BaseModelSettings, resolution: int) -> StableDiffusionPipeline:
    """A randomly initialised tiny Stable Diffusion, deterministic from ``settings.seed``."""
    downsample = 2 ** (len(settings.tiny_vae_channels) - 1)
    if resolution % (downsample * 2 ** (len(settings.tiny_unet_channels) - 1)):
        raise ValueError(f"resolution {resolution} does not fit the tiny VAE and UNet downsampling")
    tokenizer = build_tiny_tokenizer(settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        vae = _tiny_vae(settings, resolution)
        unet = _tiny_unet(settings, resolution // downsample)
        text_encoder = _tiny_text_encoder(settings, tokenizer)
    scheduler = DDPMScheduler(  # SD 2.1 base's training schedule
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class _Run:
    """What both pre-training phases share."""

    images: np.ndarray
    settings: BaseModelSettings
    device: str
    rng: np.random.Generator
    log: Callable[[str], None]


def _optimizer(params, lr: float, warmup: int, steps: int):
    """AdamW with a warm-up then cosine learning-rate schedule."""
    optimizer = torch.optim.AdamW(params, lr=lr, foreach=True)
    return optimizer, get_scheduler("cosine", optimizer, num_warmup_steps=warmup, num_training_steps=steps)


def _step(loss: torch.Tensor, module: torch.nn.Module, optimizer, schedule) -> float:
    """One clipped optimizer step; the loss as a float."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def _train_vae(vae: AutoencoderKL, run: _Run) -> float:
    """L1 reconstruction (SD's autoencoder's pixel loss; sharper than MSE) + a very small KL term.
    Returns the last loss."""
    s, resolution = run.settings, vae.config.sample_size
    vae.train().requires_grad_(True)
    batch = min(s.tiny_vae_batch_size, len(run.images))
    optimizer, schedule = _optimizer(
        vae.parameters(), s.tiny_vae_learning_rate, min(10, s.tiny_vae_steps // 10), s.tiny_vae_steps
    )
    loss = float("nan")
    for step in range(s.tiny_vae_steps):
        x = images_to_tensor(run.images[run.rng.choice(len(run.images), batch, replace=False)], resolution)
        x = x.to(run.device)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=step_generator(s.seed, 0, step))).sample
        kl = VAE_KL_WEIGHT * posterior.kl().mean()
        loss = _step(torch.nn.functional.l1_loss(recon, x) + kl, vae, optimizer, schedule)
        if (step + 1) % max(1, s.tiny_vae_steps // 5) == 0:
            run.log(f"tiny VAE step {step + 1}/{s.tiny_vae_steps}: reconstruction loss {loss:.4f}")
    vae.eval().requires_grad_(False)
    return loss


def _scaled_latents(vae: AutoencoderKL, run: _Run, batch: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The posterior (mean, std) of every image; sets the VAE's scaling factor to unit latent
    variance (the rule that gave SD its 0.18215). Returns them with the reconstruction MSE."""
    resolution = vae.config.sample_size
    mean, std = encode_latent_distribution(vae, run.images, resolution, batch)
    with torch.no_grad():
        recon = vae.decode(mean[:batch].to(run.device)).sample.cpu()
    target = images_to_tensor(run.images[:batch], resolution)
    latents = sample_latents(mean, std, 1.0, step_generator(run.settings.seed, 1))
    scaling_factor = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    mse = torch.nn.functional.mse_loss(recon, target).item()
    return mean, std, {"vae_recon_mse": mse, "scaling_factor": scaling_factor}


def _train_unet(
    pipe: StableDiffusionPipeline, latents: tuple[torch.Tensor, torch.Tensor], run: _Run
) -> list[float]:
    """The diffusion loss DreamBooth uses, without the prior term, under ``tiny_prompt`` (dropped to
    "" with ``tiny_uncond_probability``, so guidance has an unconditional branch). Returns the losses."""
    s, unet, (mean, std) = run.settings, pipe.unet, latents
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        embeds = encode_tokens(pipe.text_encoder, tokenize_prompts(pipe.tokenizer, [s.tiny_prompt, ""]))
    unet.train().requires_grad_(True)
    optimizer, schedule = _optimizer(
        unet.parameters(), s.tiny_learning_rate, min(50, s.tiny_unet_steps // 10), s.tiny_unet_steps
    )
    batch, scaling, losses = min(s.tiny_batch_size, len(run.images)), pipe.vae.config.scaling_factor, []
    for step in range(s.tiny_unet_steps):
        gen = step_generator(s.seed, 2, step)
        idx = torch.from_numpy(run.rng.choice(len(run.images), batch, replace=False))
        noisy, timesteps, target = noisy_latents_and_target(
            sample_latents(mean[idx], std[idx], scaling, gen), noise_scheduler, gen
        )
        unconditional = (torch.rand(batch, generator=gen) < s.tiny_uncond_probability).long()
        pred = unet(
            noisy.to(run.device), timesteps.to(run.device), embeds[unconditional.to(run.device)]
        ).sample
        loss, _, _ = dreambooth_loss(pred, target.to(run.device), 0.0, with_prior_preservation=False)
        losses.append(_step(loss, unet, optimizer, schedule))
        if (step + 1) % max(1, s.tiny_unet_steps // 5) == 0:
            run.log(
                f"tiny UNet step {step + 1}/{s.tiny_unet_steps}: diffusion loss {np.mean(losses[-20:]):.4f}"
            )
    unet.eval().requires_grad_(False)
    return losses


def pretrain_tiny_pipeline(
    pipe: StableDiffusionPipeline,
    images: np.ndarray,
    settings: BaseModelSettings,
    device: str,
    log: Callable[[str], None] = print,
) -> dict:
    """Teach the tiny model ``images``, in place: the VAE to reconstruct them, then the UNet to
    denoise their latents under the generic prompt ``tiny_prompt``.

    Returns the final losses, the steps and the wall time of each phase.
    """
    started = time.perf_counter()
    pipe.vae.to(device), pipe.unet.to(device), pipe.text_encoder.to(device).requires_grad_(False)
    run = _Run(images, settings, device, np.random.default_rng(settings.seed), log)
    vae_loss = _train_vae(pipe.vae, run)
    vae_s = time.perf_counter() - started
    mean, std, latent_stats = _scaled_latents(pipe.vae, run, min(settings.tiny_batch_size, len(images)))
    losses = _train_unet(pipe, (mean, std), run) or [float("nan")]
    wall = time.perf_counter() - started
    return {
        "vae_steps": settings.tiny_vae_steps,
        "vae_loss": vae_loss,
        **latent_stats,
        "unet_steps": settings.tiny_unet_steps,
        "unet_loss": float(np.mean(losses[-20:])),
        "unet_loss_first": float(np.mean(losses[:20])),
        "vae_wall_s": vae_s,
        "unet_wall_s": wall - vae_s,
        "wall_s": wall,
    }
