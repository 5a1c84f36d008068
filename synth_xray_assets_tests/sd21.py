"""Stable Diffusion 2.1 base's real architecture, from its configuration files, with random weights.

The configurations below are those of ``stabilityai/stable-diffusion-2-1-base`` (``unet/``,
``vae/``, ``text_encoder/`` and ``scheduler/`` ``config.json``), written here so that nothing
is downloaded: a UNet of 866 M parameters with cross-attention width 1024, linear projections
and attention head dims (5, 10, 20, 20); a VAE with channels (128, 256, 512, 512); the
OpenCLIP-H text tower, 23 layers 1024 wide. The tokenizer is the project's offline one (the
prompts' words are single tokens); its ids fit the real vocabulary of 49408.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from synth_xray_assets.dreambooth.tiny import build_tiny_tokenizer
from synth_xray_assets.settings import BaseModelSettings

UNET_CONFIG = {
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "use_linear_projection": True,
}
VAE_CONFIG = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
TEXT_ENCODER_CONFIG = {
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "projection_dim": 512,
    "vocab_size": 49408,
}
SCHEDULER_CONFIG = {  # PNDMScheduler, as in the repository (training uses DDPM with the same betas)
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


def build_sd21_shaped(folder: Path, dtype: torch.dtype = torch.float16, seed: int = 0) -> Path:
    """Save a randomly initialised SD-2.1-base-shaped pipeline to ``folder`` (diffusers layout).

    Weights are stored in ``dtype`` (fp16 halves the 5 GB on disk; loading upcasts). Each part
    is converted right after it is built, so the peak stays near one fp32 UNet (3.5 GB).
    """
    tokenizer = build_tiny_tokenizer(BaseModelSettings())
    torch.manual_seed(seed)
    parts = {
        "unet": UNet2DConditionModel(**UNET_CONFIG).to(dtype),
        "vae": AutoencoderKL(**VAE_CONFIG).to(dtype),
        "text_encoder": CLIPTextModel(
            CLIPTextConfig(
                **TEXT_ENCODER_CONFIG,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        ).to(dtype),
    }
    pipe = StableDiffusionPipeline(
        **parts,
        tokenizer=tokenizer,
        scheduler=PNDMScheduler.from_config(SCHEDULER_CONFIG),  # as from the file: unknown keys ignored,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    del pipe, parts
    gc.collect()
    return Path(folder)
