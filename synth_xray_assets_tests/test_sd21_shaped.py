"""The real code path on Stable Diffusion 2.1 base's architecture (random weights, no download).

LoRA and full UNet fine-tuning for a couple of steps at 64 px (8 x 8 latents, one instance and
one class image per step): checkpoint, a killed run resumed, the model saved, loaded back with
plain diffusers and sampled. Full fine-tuning of this UNet with AdamW holds its weights,
gradients and two moments in fp32 (about 14 GB; the VAE and the frozen text encoder are dropped
once the images and prompts are encoded); this is the one test that needs that much.
"""

import gc
import resource

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from synth_xray_assets.dreambooth.training import LORA_WEIGHTS_NAME, RunDirs, RunInputs, train_dreambooth
from synth_xray_assets.settings import DreamBoothSettings
from synth_xray_assets_tests.sd21 import build_sd21_shaped

pytestmark = pytest.mark.slow
PROMPT = "A chest xray of healthy normal lungs, clear lung fields"
RESOLUTION = 64  # 8 x 8 latents: the architecture in full, the activations small


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def sd21_base(tmp_path_factory):
    return build_sd21_shaped(tmp_path_factory.mktemp("sd21") / "base")


def _settings(**values) -> DreamBoothSettings:
    return DreamBoothSettings(
        resolution=RESOLUTION,
        train_batch_size=1,
        gradient_accumulation_steps=1,
        max_train_steps=2,
        checkpointing_steps=1,
        checkpoints_total_limit=1,
        lr_warmup_steps=0,
        num_class_images=1,
        memory_preset="none",
        **values,
    )


def _killed_then_resumed(base, tmp_path, settings):
    rng = np.random.default_rng(0)
    instance = rng.integers(0, 256, (2, RESOLUTION, RESOLUTION), dtype=np.uint8)
    prior = rng.integers(0, 256, (1, RESOLUTION, RESOLUTION), dtype=np.uint8)
    args = (
        RunInputs(base, instance, prior, PROMPT),
        settings,
        RunDirs(tmp_path / "out", tmp_path / "work"),
        "cpu",
    )

    def kill_after_step_1(step, metrics):
        assert np.isfinite(metrics["loss"])
        if step == 1:
            raise Killed

    with pytest.raises(Killed):
        train_dreambooth(*args, log=lambda m: None, on_step=kill_after_step_1)
    assert [p.name for p in (tmp_path / "work").glob("checkpoint-*")] == ["checkpoint-1"]
    gc.collect()
    result = train_dreambooth(*args, log=lambda m: None)
    gc.collect()
    assert result.resumed_from_step == 1 and result.steps_run == [2]
    assert len(result.losses) == 2 and np.isfinite(result.losses).all()
    assert not list((tmp_path / "work").glob("checkpoint-*"))  # removed once the model is saved
    return result


def _sample(pipe: StableDiffusionPipeline) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(
            PROMPT,
            num_inference_steps=2,
            guidance_scale=4.0,
            height=RESOLUTION,
            width=RESOLUTION,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images[0]


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def test_sd21_shaped_lora(sd21_base, tmp_path):
    lora = _killed_then_resumed(sd21_base, tmp_path, _settings(method="lora"))
    assert (lora.output_dir / LORA_WEIGHTS_NAME).is_file()
    pipe = StableDiffusionPipeline.from_pretrained(sd21_base, safety_checker=None, dtype=torch.float32)
    assert pipe.unet.config.cross_attention_dim == 1024 and pipe.unet.config.use_linear_projection
    assert tuple(pipe.unet.config.attention_head_dim) == (5, 10, 20, 20)
    assert pipe.text_encoder.config.num_hidden_layers == 23 and pipe.text_encoder.config.hidden_size == 1024
    pipe.load_lora_weights(str(lora.output_dir), weight_name=LORA_WEIGHTS_NAME)
    assert any("lora" in name for name, _ in pipe.unet.named_parameters())
    image = _sample(pipe)
    assert image.shape == (RESOLUTION, RESOLUTION, 3) and np.isfinite(image).all()
    print(f"SD-2.1-shaped LoRA: process peak RSS so far {_peak_gib():.1f} GiB")


def test_sd21_shaped_full_unet_fine_tuning(sd21_base, tmp_path):
    full = _killed_then_resumed(sd21_base, tmp_path, _settings(method="full", train_text_encoder=False))
    pipe = StableDiffusionPipeline.from_pretrained(full.output_dir, safety_checker=None, dtype=torch.float32)
    key = "down_blocks.0.attentions.0.proj_in.weight"
    trained = pipe.unet.state_dict()[key]
    with safe_open(str(sd21_base / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        before = f.get_tensor(key).float()
    assert trained.shape == (320, 320) and not torch.equal(trained, before)  # the UNet was trained
    image = _sample(pipe)
    assert image.shape == (RESOLUTION, RESOLUTION, 3) and np.isfinite(image).all()
    print(f"SD-2.1-shaped full fine-tuning: process peak RSS so far {_peak_gib():.1f} GiB")
