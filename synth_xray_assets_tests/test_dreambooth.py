"""DreamBooth on tiny components: the loss, the loop, checkpoints, resume, full and LoRA."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_settings
from diffusers import DDPMScheduler, StableDiffusionPipeline

from synth_xray_assets.dataset.splits import shared_validation_split
from synth_xray_assets.diffusion.pipelines import load_pipeline
from synth_xray_assets.dreambooth.base_model import fetch_base_model, pretraining_images
from synth_xray_assets.dreambooth.tiny import build_tiny_tokenizer
from synth_xray_assets.dreambooth.training import (
    LORA_WEIGHTS_NAME,
    RunDirs,
    RunInputs,
    dreambooth_loss,
    encode_latent_distribution,
    encode_tokens,
    noisy_latents_and_target,
    num_train_steps,
    sample_latents,
    step_generator,
    tokenize_prompts,
    train_dreambooth,
)
from synth_xray_assets.settings import DreamBoothSettings

PROMPT = "A chest xray showing pneumonia infection, lung opacity"


def images(n: int, seed: int, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    base = 120 + 60 * np.sin(xx / 5.0) * np.cos(yy / 7.0)
    return np.clip(base[None] + rng.normal(0, 20, (n, size, size)), 0, 255).astype(np.uint8)


class Killed(Exception):
    """A run stopped from its step callback, as a kill would stop it."""


def kill_at(step: int):
    """A step callback that stops the run after ``step``."""

    def on_step(done: int, metrics: dict) -> None:
        if done == step:
            raise Killed

    return on_step


def db_settings(tmp_path: Path, **values) -> DreamBoothSettings:
    return tiny_settings(tmp_path).dreambooth.model_copy(update=values)


def train(base: Path, tmp_path: Path, settings: DreamBoothSettings, name: str = "out", **kw):
    return train_dreambooth(
        RunInputs(base, images(6, 1), images(4, 2), PROMPT),
        settings,
        RunDirs(tmp_path / name, tmp_path / f"{name}.work"),
        "cpu",
        log=lambda m: None,
        **kw,
    )


def sample_one(pipe: StableDiffusionPipeline) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        PROMPT,
        num_inference_steps=2,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]


def test_step_count_matches_the_study():
    s = DreamBoothSettings()  # full-profile defaults: batch 8 x accumulation 2, 8 epochs
    assert num_train_steps(1341, s) == 672
    assert num_train_steps(3875, s) == 1944


def test_tiny_tokenizer_keeps_prompt_words_whole(tmp_path):
    tok = build_tiny_tokenizer(tiny_settings(tmp_path).base_model)
    ids = tok("a chest xray image").input_ids
    assert len(ids) == 6  # start, four words, end
    assert tok.decode(ids, skip_special_tokens=True).strip() == "a chest xray image"


def test_full_checkpoint_loads_in_plain_diffusers(tiny_base_model, tmp_path):
    result = train(tiny_base_model, tmp_path, db_settings(tmp_path, max_train_steps=3))
    assert result.global_step == 3 and result.steps_run == [1, 2, 3]
    assert all(np.isfinite(result.losses))
    # Plain diffusers, not this project's loader.
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "out"), safety_checker=None)
    img = sample_one(pipe)
    assert img.shape == (32, 32, 3) and np.isfinite(img).all()
    # The trained UNet differs from the base one.
    base = StableDiffusionPipeline.from_pretrained(str(tiny_base_model), safety_checker=None)
    a, b = base.unet.state_dict(), pipe.unet.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # Checkpoints are removed once the final model is saved (keep_checkpoints=False).
    assert not list((tmp_path / "out.work").glob("checkpoint-*"))


def test_lora_weights_load_into_the_base_model(tiny_base_model, tmp_path):
    s = db_settings(tmp_path, method="lora", max_train_steps=3, lora_rank=4)
    result = train(tiny_base_model, tmp_path, s)
    assert result.method == "lora" and result.global_step == 3
    weights = tmp_path / "out" / LORA_WEIGHTS_NAME
    assert weights.is_file() and weights.stat().st_size < 1_000_000
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_base_model), safety_checker=None)
    before = sample_one(pipe)
    pipe.load_lora_weights(str(tmp_path / "out"), weight_name=LORA_WEIGHTS_NAME)
    after = sample_one(pipe)
    assert np.isfinite(after).all()
    assert not np.allclose(before, after)  # the adapters change the output


def test_kill_and_resume_continues_from_the_saved_step(tiny_base_model, tmp_path):
    s = db_settings(tmp_path, max_train_steps=6, checkpointing_steps=2, keep_checkpoints=True)
    uninterrupted = train(tiny_base_model, tmp_path, s, name="whole")

    with pytest.raises(Killed):
        train(tiny_base_model, tmp_path, s, name="killed", on_step=kill_at(5))
    work = tmp_path / "killed.work"
    assert sorted(p.name for p in work.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (tmp_path / "killed").exists()  # no half-made final model

    resumed = train(tiny_base_model, tmp_path, s, name="killed")
    assert resumed.resumed_from_step == 4
    assert resumed.steps_run == [5, 6]  # step 5 is redone (it was never saved); nothing else
    np.testing.assert_allclose(resumed.losses, uninterrupted.losses, rtol=1e-4, atol=1e-6)


def test_a_checkpoint_from_other_settings_is_not_resumed(tiny_base_model, tmp_path):
    s = db_settings(tmp_path, max_train_steps=3, checkpointing_steps=2, keep_checkpoints=True)
    train(tiny_base_model, tmp_path, s)
    assert (tmp_path / "out.work" / "checkpoint-2").is_dir()
    again = train(tiny_base_model, tmp_path, s.model_copy(update={"learning_rate": 1e-3}))
    assert again.resumed_from_step == 0


def test_half_written_checkpoint_is_ignored(tiny_base_model, tmp_path):
    s = db_settings(tmp_path, max_train_steps=3, checkpointing_steps=2)

    with pytest.raises(Killed):
        train(tiny_base_model, tmp_path, s, on_step=kill_at(3))
    # A crash mid-save leaves only a hidden temporary folder; a folder without state is incomplete.
    (tmp_path / "out.work" / "checkpoint-9").mkdir()
    again = train(tiny_base_model, tmp_path, s)
    assert again.resumed_from_step == 2 and again.steps_run == [3]


def _unet_and_batch(base: Path):
    pipe = load_pipeline(base, "cpu")
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    mean, std = encode_latent_distribution(pipe.vae, np.concatenate([images(2, 1), images(2, 2)]), 32, 4)
    gen = step_generator(0, 0)
    noisy, timesteps, target = noisy_latents_and_target(sample_latents(mean, std, 0.18, gen), scheduler, gen)
    ids = tokenize_prompts(pipe.tokenizer, [PROMPT, "a chest xray image"])
    with torch.no_grad():
        embeds = encode_tokens(pipe.text_encoder, ids).repeat_interleave(2, dim=0)
    return pipe.unet, noisy, timesteps, target, embeds


def test_prior_preservation_term_changes_the_gradient(tiny_base_model):
    unet, noisy, timesteps, target, embeds = _unet_and_batch(tiny_base_model)

    def grads(weight: float) -> torch.Tensor:
        unet.zero_grad()
        pred = unet(noisy, timesteps, embeds).sample
        loss, instance, prior = dreambooth_loss(pred, target, weight, with_prior_preservation=True)
        loss.backward()
        assert prior is not None
        assert torch.isclose(loss, instance + weight * prior)
        return torch.cat([p.grad.flatten() for p in unet.parameters() if p.grad is not None]).clone()

    with_prior, without_prior = grads(0.5), grads(0.0)
    assert not torch.allclose(with_prior, without_prior)
    # With weight 0 the class half contributes nothing: the same as training on the instance half only.
    unet.zero_grad()
    pred = unet(noisy[:2], timesteps[:2], embeds[:2]).sample
    dreambooth_loss(pred, target[:2], 0.5, with_prior_preservation=False)[0].backward()
    instance_only = torch.cat([p.grad.flatten() for p in unet.parameters() if p.grad is not None])
    torch.testing.assert_close(without_prior, instance_only, rtol=1e-4, atol=1e-7)


def test_loss_falls_on_a_fixed_batch(tiny_base_model):
    unet, noisy, timesteps, target, embeds = _unet_and_batch(tiny_base_model)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        pred = unet(noisy, timesteps, embeds).sample
        loss = dreambooth_loss(pred, target, 0.5, with_prior_preservation=True)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_missing_base_model_folder_is_a_clear_error(tmp_path):
    s = tiny_settings(tmp_path).base_model.model_copy(update={"pretrained_model": str(tmp_path / "nope")})
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        fetch_base_model(s, tmp_path / "cache", token=None)
    with pytest.raises(FileNotFoundError, match="no diffusers pipeline"):
        load_pipeline(tmp_path / "nope", "cpu")


def test_hub_layout_folder_loads_like_the_hub(tiny_base_model, tmp_path):
    """A local folder in the Hub's diffusers layout is what from_pretrained gets from the Hub."""
    s = tiny_settings(tmp_path).base_model.model_copy(update={"pretrained_model": str(tiny_base_model)})
    folder = fetch_base_model(s, tmp_path / "cache", token=None)
    assert folder == tiny_base_model.resolve()
    pipe = load_pipeline(folder, "cpu")
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size


def test_no_instance_images_is_a_clear_error(tiny_base_model, tmp_path):
    with pytest.raises(ValueError, match="no instance images"):
        train_dreambooth(
            RunInputs(tiny_base_model, images(0, 1), images(2, 2), PROMPT),
            db_settings(tmp_path),
            RunDirs(tmp_path / "o", tmp_path / "w"),
            "cpu",
        )


class _Dataset:
    """The two reads ``pretraining_images`` makes of a standardized dataset: 10 NORMAL, 30 PNEUMONIA;
    image i is filled with the value i, so the images name their rows."""

    def __init__(self) -> None:
        labels = [0] * 10 + [1] * 30
        self._rows = pd.DataFrame({"label": labels, "source_id": [f"img{i}.jpeg" for i in range(40)]})

    def rows(self, split: str) -> pd.DataFrame:
        return self._rows

    def images(self, split: str) -> np.ndarray:
        return np.arange(40, dtype=np.uint8)[:, None, None] * np.ones((1, 4, 4), np.uint8)


def test_tiny_base_model_pretrains_on_balanced_train_less_validation(tmp_path):
    s = tiny_settings(tmp_path)
    ds = _Dataset()
    rows = pretraining_images(s, ds)[:, 0, 0].astype(int)
    validation = set(shared_validation_split(s, ds.rows("train")).val.tolist())
    assert validation and not validation & set(rows.tolist())  # never the classifiers' validation images
    labels = ds.rows("train")["label"].to_numpy()[rows]
    assert (labels == 0).sum() == (labels == 1).sum() == 27  # 30 PNEUMONIA less 3 validation
    assert len(set(rows[labels == 0].tolist())) == 9  # every kept NORMAL image, repeated
