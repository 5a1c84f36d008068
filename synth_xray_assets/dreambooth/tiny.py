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

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from synth_xray_assets.dreambooth.training import (
    dreambooth_loss,
    encode_latent_distribution,
    encode_tokens,
    images_to_tensor,
    noisy_latents_and_target,
    sample_latents,
    step_generator,
    tokenize_prompts,
)
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


def build_tiny_pipeline(settings: BaseModelSettings, resolution: int) -> StableDiffusionPipeline:
    """A randomly initialised tiny Stable Diffusion, deterministic from ``settings.seed``."""
    vae_channels = tuple(settings.tiny_vae_channels)
    unet_channels = tuple(settings.tiny_unet_channels)
    downsample = 2 ** (len(vae_channels) - 1)
    if resolution % (downsample * 2 ** (len(unet_channels) - 1)):
        raise ValueError(f"resolution {resolution} does not fit the tiny VAE and UNet downsampling")
    tokenizer = build_tiny_tokenizer(settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
            block_out_channels=vae_channels,
            layers_per_block=settings.tiny_layers_per_block,
            latent_channels=4,
            norm_num_groups=_norm_groups(vae_channels),
            sample_size=resolution,
            scaling_factor=SCALING_FACTOR_INIT,
        )
        # Cross-attention on every level but the finest, where attention over all pixels is costly.
        down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(unet_channels) - 1)
        up = ("CrossAttnUpBlock2D",) * (len(unet_channels) - 1) + ("UpBlock2D",)
        unet = UNet2DConditionModel(
            sample_size=resolution // downsample,
            in_channels=4,
            out_channels=4,
            down_block_types=down,
            up_block_types=up,
            block_out_channels=unet_channels,
            layers_per_block=settings.tiny_layers_per_block,
            norm_num_groups=_norm_groups(unet_channels),
            cross_attention_dim=settings.tiny_text_width,
            attention_head_dim=tuple(max(1, c // 32) for c in unet_channels),  # heads, as SD 2.1 names them
            use_linear_projection=True,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=settings.tiny_text_width,
                intermediate_size=4 * settings.tiny_text_width,
                num_hidden_layers=settings.tiny_text_layers,
                num_attention_heads=max(1, settings.tiny_text_width // 32),
                max_position_embeddings=MAX_TOKENS,
                hidden_act="gelu",
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    with torch.no_grad():  # quant_conv outputs (mean, logvar): start the logvar half narrow
        vae.quant_conv.bias[vae.config.latent_channels :] = POSTERIOR_LOGVAR_INIT
    scheduler = DDPMScheduler(
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


def pretrain_tiny_pipeline(
    pipe: StableDiffusionPipeline,
    images: np.ndarray,
    settings: BaseModelSettings,
    device: str,
    log: Callable[[str], None] = print,
) -> dict:
    """Teach the tiny model the demo images, in place: the VAE to reconstruct them, then the UNet to
    denoise their latents under the generic prompt ``tiny_prompt`` (dropped to "" for a tenth of the
    images, so that classifier-free guidance has an unconditional branch to work with).

    Returns the final losses, the steps and the wall time of each phase.
    """
    started = time.perf_counter()
    resolution = pipe.vae.config.sample_size
    vae, unet, text_encoder = pipe.vae.to(device), pipe.unet.to(device), pipe.text_encoder.to(device)
    text_encoder.requires_grad_(False)
    batch = min(settings.tiny_batch_size, len(images))
    rng = np.random.default_rng(settings.seed)

    # 1. The VAE: L1 reconstruction (SD's autoencoder's pixel loss; sharper than MSE) + a very
    # small KL term, cosine learning-rate schedule.
    vae.train().requires_grad_(True)
    vae_batch = min(settings.tiny_vae_batch_size, len(images))
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.tiny_vae_learning_rate, foreach=True)
    vae_schedule = get_scheduler(
        "cosine",
        optimizer,
        num_warmup_steps=min(10, settings.tiny_vae_steps // 10),
        num_training_steps=settings.tiny_vae_steps,
    )
    vae_loss = float("nan")
    for step in range(settings.tiny_vae_steps):
        idx = rng.choice(len(images), vae_batch, replace=False)
        x = images_to_tensor(images[idx], resolution).to(device)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=step_generator(settings.seed, 0, step))).sample
        loss = torch.nn.functional.l1_loss(recon, x) + VAE_KL_WEIGHT * posterior.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        vae_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        vae_loss = loss.item()
        if (step + 1) % max(1, settings.tiny_vae_steps // 5) == 0:
            log(f"tiny VAE step {step + 1}/{settings.tiny_vae_steps}: reconstruction loss {vae_loss:.4f}")
    vae_s = time.perf_counter() - started
    vae.eval().requires_grad_(False)

    # Latent scaling: unit variance, the rule that gave SD its 0.18215.
    mean, std = encode_latent_distribution(vae, images, resolution, batch)
    with torch.no_grad():
        recon = vae.decode(mean[:batch].to(device)).sample.cpu()
    recon_mse = torch.nn.functional.mse_loss(recon, images_to_tensor(images[:batch], resolution)).item()
    latents = sample_latents(mean, std, 1.0, step_generator(settings.seed, 1))
    scaling_factor = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling_factor)

    # 2. The UNet: the diffusion loss DreamBooth uses, without the prior term.
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        embeds = encode_tokens(text_encoder, tokenize_prompts(pipe.tokenizer, [settings.tiny_prompt, ""]))
    unet.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=settings.tiny_learning_rate, foreach=True)
    warmup = min(50, settings.tiny_unet_steps // 10)
    lr_schedule = get_scheduler(
        "cosine", optimizer, num_warmup_steps=warmup, num_training_steps=settings.tiny_unet_steps
    )
    unet_losses: list[float] = []
    for step in range(settings.tiny_unet_steps):
        gen = step_generator(settings.seed, 2, step)
        idx = torch.from_numpy(rng.choice(len(images), batch, replace=False))
        noisy, timesteps, target = noisy_latents_and_target(
            sample_latents(mean[idx], std[idx], scaling_factor, gen), noise_scheduler, gen
        )
        unconditional = (torch.rand(batch, generator=gen) < settings.tiny_uncond_probability).long()
        pred = unet(noisy.to(device), timesteps.to(device), embeds[unconditional.to(device)]).sample
        loss, _, _ = dreambooth_loss(pred, target.to(device), 0.0, with_prior_preservation=False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        unet_losses.append(loss.item())
        if (step + 1) % max(1, settings.tiny_unet_steps // 5) == 0:
            recent = float(np.mean(unet_losses[-20:]))
            log(f"tiny UNet step {step + 1}/{settings.tiny_unet_steps}: diffusion loss {recent:.4f}")
    unet.eval().requires_grad_(False)
    wall = time.perf_counter() - started
    tail = unet_losses[-min(20, len(unet_losses)) :] if unet_losses else [float("nan")]
    return {
        "vae_steps": settings.tiny_vae_steps,
        "vae_loss": vae_loss,
        "vae_recon_mse": recon_mse,
        "scaling_factor": scaling_factor,
        "unet_steps": settings.tiny_unet_steps,
        "unet_loss": float(np.mean(tail)),
        "unet_loss_first": float(np.mean(unet_losses[:20])) if unet_losses else float("nan"),
        "vae_wall_s": vae_s,
        "unet_wall_s": wall - vae_s,
        "wall_s": wall,
    }
