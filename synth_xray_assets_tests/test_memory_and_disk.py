"""Memory presets, 8-bit Adam's requirement, the disk preflight, checkpoint pruning,
hash-once folder versions and chunked memorization, on this CPU machine."""

import json
import math
import subprocess
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import torch
from conftest import tiny_settings

from synth_xray_assets import hardware, storage
from synth_xray_assets.classifier import assets as classifier_assets
from synth_xray_assets.diffusion.pipelines import load_pipeline
from synth_xray_assets.dreambooth import assets as dreambooth_assets
from synth_xray_assets.dreambooth import checkpoints
from synth_xray_assets.dreambooth.assets import RETRY
from synth_xray_assets.dreambooth.presets import (
    choose_preset,
    generation_plan,
    has_bitsandbytes,
    resolve_preset,
)
from synth_xray_assets.dreambooth.training import RunDirs, RunInputs, train_dreambooth
from synth_xray_assets.evaluation import memorization
from synth_xray_assets.operations.refusals import RETRY_ON_STEP_FAILURE_TAG, disk_refusal_is_final
from synth_xray_assets.settings import DreamBoothSettings, GenerationSettings, Settings
from synth_xray_assets.synthesis import assets as synthesis_assets

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
    parts = ("unet", "text_encoder", "vae")
    state = [t for k in parts for t in getattr(pipe, k).state_dict().values()]
    trained = [p for k in ("unet", "text_encoder") for p in getattr(pipe, k).parameters()]
    per_tensor = s.disk_bytes_per_tensor
    per_checkpoint = (
        sum(p.numel() for p in trained) * 12 + len(trained) * per_tensor + s.disk_bytes_per_checkpoint
    )
    final = sum(4 * t.numel() + per_tensor for t in state) + checkpoints.non_weight_bytes(tiny_base_model)
    # checkpoints at steps 1 and 2 (none at the last step; limit 2) of fp32 weights + AdamW's two
    # moments, beside the whole pipeline in fp32 and its configs and tokenizer at the end; plus the margin
    assert result.disk_needed_bytes == math.ceil((2 * per_checkpoint + final) * (1 + s.disk_margin))
    assert checkpoints.non_weight_bytes(tiny_base_model) > 0  # configs and tokenizer files are counted
    stored = storage.folder_version(tmp_path / "out")  # the final model's hash was stored when written
    assert (tmp_path / "out" / storage.VERSION_FILE).is_file()
    assert json.loads((tmp_path / "out" / storage.VERSION_FILE).read_text())["version"] == stored


@pytest.mark.parametrize(
    "limit, on_disk, to_write, added_while_training, added_beside_final",
    [
        (2, 0, 3, 2, 2),  # a fresh run: two checkpoints, kept beside the final model
        (1, 0, 3, 2, 1),  # limit 1: two for a moment (the new one, then the old one goes)
        (2, 2, 1, 0, 0),  # resumed with two on disk: the next one replaces the oldest
        (1, 1, 2, 1, 0),  # resumed, limit 1: the new one before the old one goes
        (2, 1, 0, 0, 0),  # resumed after the last checkpoint: only the final model is left to write
        (3, 1, 5, 2, 2),  # resumed with one of three: two more
    ],
)
def test_the_disk_estimate_counts_only_what_is_still_to_be_written(
    limit, on_disk, to_write, added_while_training, added_beside_final
):
    per, final = 6000, 5000  # a checkpoint larger than the final model (LoRA with Adam's moments)
    plan = checkpoints.DiskPlan(per, final, limit, on_disk, to_write)
    expected = max(added_while_training * per, added_beside_final * per + final)
    assert checkpoints.disk_needed_bytes(plan, 0.0) == expected
    assert checkpoints.disk_needed_bytes(plan, 0.1) == math.ceil(1.1 * expected)  # the stated margin
    fresh = checkpoints.DiskPlan(per, final, limit, 0, on_disk + to_write)
    assert checkpoints.disk_needed_bytes(plan, 0.0) <= checkpoints.disk_needed_bytes(fresh, 0.0)


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(size)``: a tmpfs of ``size`` bytes (as the full-disk tests use), or None where this
    machine cannot mount one (not root)."""
    mounted = []

    def mount(size: int) -> Path | None:
        path = tmp_path / f"tmpfs{len(mounted)}"
        path.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
        )
        if done.returncode != 0:
            print(f"no tmpfs ({done.stderr.strip() or 'mount failed'})")
            return None
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], check=False)


def test_a_run_fits_a_disk_of_its_estimate_and_its_resume_fits_what_is_left(tiny_base_model, tmp_path, tmpfs):
    """A tmpfs exactly as large as the fresh run's estimate holds the whole run (checkpoints and the
    final model with its configs and tokenizer); interrupted after two checkpoints, the resume counts
    only what it still writes, so it fits in what is left there."""
    s = tiny_settings(tmp_path).dreambooth.model_copy(
        update={"max_train_steps": 4, "checkpointing_steps": 1, "keep_checkpoints": True}
    )
    fresh = _train(tiny_base_model, tmp_path / "measured", s)
    written = _tree_bytes(tmp_path / "measured" / "out") + _tree_bytes(tmp_path / "measured" / "work")
    print(f"estimate {fresh.disk_needed_bytes} bytes, written {written} (final model + 2 checkpoints)")
    assert fresh.disk_needed_bytes >= written
    disk = tmpfs(fresh.disk_needed_bytes) or tmp_path / "disk"

    def stop_at_2(step: int, metrics: dict) -> None:
        if step == 2:
            raise KeyboardInterrupt("killed after checkpoint-2")

    with pytest.raises(KeyboardInterrupt):
        _train(tiny_base_model, disk, s, on_step=stop_at_2)
    assert [step for step, _ in checkpoints.list_checkpoints(disk / "work")] == [1, 2]
    on_disk = _tree_bytes(disk / "work")
    resumed = _train(tiny_base_model, disk, s)  # on the tmpfs, the old estimate refused here
    assert resumed.resumed_from_step == 2 and resumed.steps_run == [3, 4]
    assert resumed.disk_needed_bytes < fresh.disk_needed_bytes - on_disk / 2
    assert (disk / "out" / storage.VERSION_FILE).is_file()


class FakeAccelerator:
    """Writes a checkpoint's files and records how many complete checkpoints exist meanwhile.

    One process, as ``accelerate.Accelerator`` without a launcher: main, world of 1.
    """

    is_main_process, num_processes = True, 1

    def __init__(self, work_dir: Path) -> None:
        self.work_dir, self.during = work_dir, []

    def wait_for_everyone(self) -> None:
        pass

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


# --------------------------------------------------------------------------- a disk refusal is final


def _runs_with_retries(asset: dg.AssetsDefinition) -> tuple[list, dict]:
    """Materialize ``asset`` on an instance with run retries on; its step events and run tags."""
    with dg.instance_for_test(overrides={"run_retries": {"enabled": True, "max_retries": 2}}) as instance:
        result = dg.materialize([asset], instance=instance, raise_on_error=False)
        assert not result.success
        events = [e.event_type_value for e in result.all_events]
        return events, dict(instance.get_run_by_id(result.run_id).tags)


def test_a_disk_refusal_is_retried_neither_as_a_step_nor_as_a_run(tmpfs, tmp_path):
    disk = tmpfs(2**20) or tmp_path  # 1 MiB

    @dg.asset(retry_policy=RETRY)
    @disk_refusal_is_final
    def too_big(context: dg.AssetExecutionContext) -> None:
        hardware.require_free_space(disk, 2**50, "a petabyte")

    events, tags = _runs_with_retries(too_big)
    assert events.count("STEP_START") == 1 and "STEP_UP_FOR_RETRY" not in events
    assert tags.get("dagster/will_retry") == "false"
    assert tags.get(RETRY_ON_STEP_FAILURE_TAG) == "false"

    attempts = []

    @dg.asset(retry_policy=dg.RetryPolicy(max_retries=1))
    @disk_refusal_is_final
    def flaky(context: dg.AssetExecutionContext) -> None:
        attempts.append(1)
        raise RuntimeError("a transient failure")

    events, tags = _runs_with_retries(flaky)  # the control: other failures are retried as before
    assert len(attempts) == 2 and "STEP_UP_FOR_RETRY" in events and tags.get("dagster/will_retry") == "true"


def test_the_assets_that_check_the_disk_make_its_refusal_final():
    s = Settings.for_profile("full")
    dreambooth = dreambooth_assets.dreambooth_checkpoint_asset(s)
    prior = dreambooth_assets.prior_class_images_asset(s)
    for asset in (dreambooth, prior):
        assert asset.op.retry_policy == RETRY
    for asset in (
        dreambooth,
        prior,
        synthesis_assets.synthetic_images_asset(s),
        synthesis_assets.base_model_images_asset(s),
        classifier_assets.classifier_experiment_asset(s),
    ):
        assert getattr(asset.op.compute_fn.decorated_fn, "disk_refusal_is_final", False), asset.key
