"""Issue 11: memory presets, 8-bit Adam's requirement, the disk preflight, checkpoint pruning,
hash-once folder versions and chunked memorization, on this CPU machine."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_settings

from synth_xray_assets import hardware, storage
from synth_xray_assets.diffusion.pipelines import load_pipeline
from synth_xray_assets.dreambooth import checkpoints
from synth_xray_assets.dreambooth.presets import (
    choose_preset,
    generation_plan,
    has_bitsandbytes,
    resolve_preset,
)
from synth_xray_assets.dreambooth.training import RunDirs, RunInputs, train_dreambooth
from synth_xray_assets.evaluation import memorization
from synth_xray_assets.settings import DreamBoothSettings, GenerationSettings

GIB = 1024**3
PROMPT = "A chest xray showing pneumonia infection, lung opacity"


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32), dtype=np.uint8)


def _train(base: Path, tmp_path: Path, settings: DreamBoothSettings, **kw):
    return train_dreambooth(
        RunInputs(base, _images(6, 1), _images(4, 2), PROMPT),
        settings,
        RunDirs(tmp_path / "out", tmp_path / "work"),
        "cpu",
        log=lambda m: None,
        **kw,
    )


# --------------------------------------------------------------------------- presets


@pytest.mark.parametrize(
    "free_gib, preset, checkpointing, adam8, method",
    [
        (79.0, "study", False, False, "full"),  # an 80 GB card: the study as it is
        (47.0, "memory-saving", True, True, "full"),  # 48 GB
        (39.0, "memory-saving", True, True, "full"),  # 40 GB
        (23.0, "memory-saving", True, True, "full"),  # 24 GB
        (15.0, "lora", True, False, "lora"),  # 16 GB
        (11.0, "lora", True, False, "lora"),  # 12 GB
    ],
)
def test_preset_from_free_gpu_memory(free_gib, preset, checkpointing, adam8, method):
    choice = choose_preset(DreamBoothSettings(), int(free_gib * GIB))
    assert choice.name == preset and choice.free_gib == pytest.approx(free_gib)
    assert choice.settings.gradient_checkpointing is checkpointing
    assert choice.settings.use_8bit_adam is adam8 and choice.settings.method == method
    assert choice.settings.learning_rate == 1e-6 and choice.settings.train_batch_size == 8  # the rest stays


def test_too_little_gpu_memory_fails_early_naming_the_options():
    with pytest.raises(RuntimeError, match=r"6\.0 GiB free.*study.*memory-saving.*8-bit|lora") as err:
        choose_preset(DreamBoothSettings(), 6 * GIB)
    assert all(name in str(err.value) for name in ("study", "memory-saving", "lora"))


def test_no_preset_off_cuda_and_named_presets_as_asked():
    assert choose_preset(DreamBoothSettings(), None).name == "none"  # the CPU: settings as given
    none = choose_preset(DreamBoothSettings(memory_preset="none"), 10 * GIB)
    assert none.name == "none" and none.settings == DreamBoothSettings(memory_preset="none")
    asked = choose_preset(DreamBoothSettings(memory_preset="lora"), 80 * GIB)
    assert asked.name == "lora" and asked.settings.method == "lora"
    warned = choose_preset(DreamBoothSettings(memory_preset="study"), 20 * GIB)
    assert warned.name == "study" and "warning" in warned.reason


@pytest.mark.skipif(has_bitsandbytes(), reason="bitsandbytes is installed here")
def test_8bit_adam_without_bitsandbytes_is_a_clear_error(tiny_base_model, tmp_path):
    with pytest.raises(RuntimeError, match=r"bitsandbytes is not installed.*\.\[gpu\]"):
        resolve_preset(DreamBoothSettings(), 30 * GIB, log=lambda m: None)  # memory-saving needs it
    s = tiny_settings(tmp_path).dreambooth.model_copy(update={"use_8bit_adam": True})
    with pytest.raises(RuntimeError, match="bitsandbytes is not installed"):
        _train(tiny_base_model, tmp_path, s)
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


def test_generation_batch_and_vae_slicing_from_free_memory():
    g = GenerationSettings()
    cpu = generation_plan(8, 512, None, g)
    assert cpu.batch_size == 8 and cpu.dtype == torch.float32 and not cpu.vae_slicing
    big = generation_plan(8, 512, 80 * GIB, g)
    assert big.batch_size == 8 and big.dtype == torch.float16 and not big.vae_slicing
    small = generation_plan(8, 512, 5 * GIB, g)  # 2 GiB after the weights: 4 images, decoded one by one
    assert small.batch_size == 4 and small.vae_slicing
    with pytest.raises(RuntimeError, match="does not fit"):
        generation_plan(8, 512, 3 * GIB, g)


# --------------------------------------------------------------------------- disk


def test_disk_preflight_fails_before_any_write(tiny_base_model, tmp_path, monkeypatch):
    monkeypatch.setattr(hardware, "free_disk", lambda path: 2**20)  # 1 MiB free
    s = tiny_settings(tmp_path).dreambooth
    with pytest.raises(OSError, match=r"needs about \d+\.\d MiB, 1\.0 MiB free") as err:
        _train(tiny_base_model, tmp_path, s)
    assert "DreamBooth full" in str(err.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


def test_disk_estimate_counts_checkpoints_and_the_final_model(tiny_base_model, tmp_path):
    """The tiny run's estimate counts its weights the way the study's 14.5 GB checkpoint is counted."""
    s = tiny_settings(tmp_path).dreambooth.model_copy(update={"max_train_steps": 3, "checkpointing_steps": 1})
    result = _train(tiny_base_model, tmp_path, s)
    pipe = load_pipeline(tiny_base_model, "cpu")
    n = {k: sum(p.numel() for p in getattr(pipe, k).parameters()) for k in ("unet", "text_encoder", "vae")}
    trained = n["unet"] + n["text_encoder"]
    # checkpoints at steps 1 and 2 (none at the last step; limit 2) of fp32 weights + AdamW's two
    # moments, beside the whole pipeline in fp32 at the end
    assert result.disk_needed_bytes == 2 * trained * 12 + 4 * sum(n.values())
    stored = storage.folder_version(tmp_path / "out")  # the final model's hash was stored when written
    assert (tmp_path / "out" / storage.VERSION_FILE).is_file()
    assert json.loads((tmp_path / "out" / storage.VERSION_FILE).read_text())["version"] == stored


class FakeAccelerator:
    """Writes a checkpoint's files and records how many complete checkpoints exist meanwhile."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir, self.during = work_dir, []

    def save_state(self, folder: str) -> None:
        self.during.append(len(checkpoints.list_checkpoints(self.work_dir)))
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"x" * 100)


@pytest.mark.parametrize("limit", [1, 2, 3])
def test_at_most_limit_checkpoints_exist_at_any_moment(tmp_path, monkeypatch, limit):
    work = tmp_path / "work"
    acc = FakeAccelerator(work)
    removed: list[tuple[int, int]] = []  # (removed step, newest complete step at that moment)
    real_remove = checkpoints.remove_checkpoint

    def spy(path: Path) -> None:
        steps = [s for s, _ in checkpoints.list_checkpoints(work)]
        removed.append((int(path.name.split("-")[1]), max(steps)))
        assert len(steps) <= max(limit, 2 if limit == 1 else limit)
        real_remove(path)

    monkeypatch.setattr(checkpoints, "remove_checkpoint", spy)
    # a foreign checkpoint (other settings) is never resumable here: pruned
    foreign = work / "checkpoint-99"
    foreign.mkdir(parents=True)
    (foreign / checkpoints.CHECKPOINT_STATE_NAME).write_text(json.dumps({"fingerprint": "other"}))
    after = []
    for step in range(1, 7):
        checkpoints.save_checkpoint(acc, work, step, {"fingerprint": "ours", "global_step": step}, limit)
        after.append([s for s, _ in checkpoints.list_checkpoints(work)])
    assert max(acc.during) <= max(limit - 1, 1)  # pruned before writing (limit 1: write, then replace)
    assert all(len(a) <= limit for a in after)
    assert after[-1] == list(range(7 - limit, 7))
    assert 99 in [r for r, _ in removed] and not foreign.exists()
    # the newest complete checkpoint of this run is never the one removed
    assert all(step < newest or step == 99 for step, newest in removed)
    assert not [p for p in work.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_a_real_run_keeps_one_checkpoint_with_limit_1(tiny_base_model, tmp_path):
    s = tiny_settings(tmp_path).dreambooth.model_copy(
        update={
            "max_train_steps": 3,
            "checkpointing_steps": 1,
            "checkpoints_total_limit": 1,
            "keep_checkpoints": True,
        }
    )
    counts = []
    _train(
        tiny_base_model,
        tmp_path,
        s,
        on_step=lambda step, m: counts.append(len(list((tmp_path / "work").glob("checkpoint-*")))),
    )
    assert counts == [1, 1, 1]
    # none at the last step: the final model is saved there instead
    assert [p.name for p in (tmp_path / "work").glob("checkpoint-*")] == ["checkpoint-2"]


# --------------------------------------------------------------------------- hash once, chunks


def test_a_weights_folder_is_hashed_once(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"w" * 1000)
    (folder / "model_index.json").write_text("{}")
    first = storage.write_folder_version(folder)
    calls = []
    real = storage.sha256_file
    monkeypatch.setattr(storage, "sha256_file", lambda p: calls.append(p) or real(p))
    assert storage.folder_version(folder) == first and calls == []  # read, not re-hashed
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"v" * 1001)
    changed = storage.folder_version(folder)
    assert changed != first and len(calls) == 2  # a changed file: hashed again, and stored
    calls.clear()
    assert storage.folder_version(folder) == changed and calls == []


def test_memorization_pixels_in_chunks_match_all_at_once():
    images = np.random.default_rng(0).integers(0, 256, (11, 40, 40), dtype=np.uint8)
    whole = memorization._pixel_rows(images, 16, chunk=100)
    chunked = memorization._pixel_rows(images, 16, chunk=3)
    assert chunked.shape == (11, 256) and torch.equal(whole, chunked)
