"""DreamBooth's files: resumable checkpoints (save, find, prune) and the final model.

The final model loads back with ``diffusion.pipelines.load_trained_pipeline``.

Checkpoints are ``accelerate`` states in ``work_dir/checkpoint-<step>``, each written to a
temporary folder and renamed; a folder counts as complete once its ``training_state.json`` is
there. At most ``checkpoints_total_limit`` complete checkpoints exist at any moment: older ones
are pruned *before* a new one is written (limit 1: the new one is written, then replaces the
old), so the newest complete checkpoint is never removed before a newer one is complete.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from synth_xray_assets.diffusion.pipelines import LORA_WEIGHTS_NAME, load_pipeline
from synth_xray_assets.settings import DreamBoothSettings
from synth_xray_assets.storage import atomic_path, sha256_bytes, write_folder_version, write_json_atomic

TRAINING_INFO_NAME = "dreambooth.json"  # beside the saved model: method, base, prompt, steps
CHECKPOINT_STATE_NAME = "training_state.json"  # inside each checkpoint-<step> folder
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
DDP_PREFIX = "module."  # what DistributedDataParallel puts before the model's names


# ---------------------------------------------------------------- what a checkpoint holds


def trainable_names(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def register_trainable_only_state_hooks(accelerator: Any) -> None:
    """Checkpoints hold only the trained weights: all of them for full fine-tuning, the adapters for
    LoRA (megabytes instead of the whole frozen UNet). The rest comes from the base model.

    Names are those of the bare model (DDP's ``module.`` prefix dropped), so a checkpoint written by
    k ranks resumes on any number of ranks: every rank holds the same weights and optimizer state.
    """
    from safetensors.torch import load_file

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        for i, model in enumerate(models):
            names = trainable_names(accelerator.unwrap_model(model))
            bare = {k.removeprefix(DDP_PREFIX): v for k, v in weights[i].items()}
            weights[i] = {k: v for k, v in bare.items() if k in names}

    def load_hook(models: list, input_dir: str) -> None:
        for i, model in enumerate(list(models)):
            model = accelerator.unwrap_model(model)
            path = Path(input_dir) / (f"model_{i}.safetensors" if i else "model.safetensors")
            state = load_file(str(path))
            missing, unexpected = model.load_state_dict(state, strict=False)
            lost = trainable_names(model) & set(missing)
            if lost or unexpected:
                raise RuntimeError(
                    f"checkpoint {input_dir} does not match the model: missing {sorted(lost)[:5]}, "
                    f"unexpected {sorted(unexpected)[:5]}"
                )
        models.clear()  # loaded here; accelerate loads optimizer, scheduler and RNG state

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


@dataclass(frozen=True)
class RunInputs:
    """What a DreamBooth run trains on: the base model, the images and the instance prompt."""

    base_model_dir: Path
    instance_images: np.ndarray
    class_images: np.ndarray | None
    instance_prompt: str


# Settings that leave the numbers alone: checkpointing, memory options, sampling for the UI.
_NOT_IN_FINGERPRINT = {
    "checkpointing_steps",
    "checkpoints_total_limit",
    "data_parallel_cards",  # the ranks change the speed, not the optimization
    "gradient_checkpointing",
    "sample_images",
    "sample_steps",
    "num_class_images",
    "class_image_steps",
    "class_image_guidance",
    "class_image_batch_size",
    "instance_prompts",
    "keep_checkpoints",
    "disk_margin",
    "disk_bytes_per_tensor",
    "disk_bytes_per_checkpoint",
    "memory_preset",
    "preset_min_free_gib",
}


def run_fingerprint(inputs: RunInputs, settings: DreamBoothSettings, mixed_precision: str) -> str:
    """What a checkpoint must share with this run to be resumed: data, prompt, base and the settings
    that change the numbers (not checkpointing or memory options that leave them alone)."""
    parts = {
        "settings": {
            k: v for k, v in settings.model_dump(mode="json").items() if k not in _NOT_IN_FINGERPRINT
        },
        "precision": mixed_precision,
        "base": str(Path(inputs.base_model_dir).resolve()),
        "prompt": inputs.instance_prompt,
        "instance": sha256_bytes(np.ascontiguousarray(inputs.instance_images).tobytes()),
        "class": None
        if inputs.class_images is None
        else sha256_bytes(np.ascontiguousarray(inputs.class_images).tobytes()),
    }
    return sha256_bytes(repr(sorted(parts.items())).encode())[:16]


# ---------------------------------------------------------------- find, save, prune


def list_checkpoints(work_dir: Path) -> list[tuple[int, Path]]:
    """Complete ``checkpoint-<step>`` folders in ``work_dir`` (with their state file), oldest first."""
    work_dir = Path(work_dir)
    if not work_dir.is_dir():
        return []
    found = []
    for path in work_dir.iterdir():
        match = _CHECKPOINT_RE.match(path.name)
        if match and (path / CHECKPOINT_STATE_NAME).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def latest_checkpoint(work_dir: Path, fingerprint: str, log: Callable[[str], None] = print) -> Path | None:
    """The newest complete ``checkpoint-<step>`` in ``work_dir`` made by a run with ``fingerprint``."""
    for _step, path in reversed(list_checkpoints(Path(work_dir))):
        if read_json(path / CHECKPOINT_STATE_NAME).get("fingerprint") == fingerprint:
            return path
        log(f"ignoring {path.name}: made with other data or settings")
    return None


def remove_checkpoint(path: Path) -> None:
    """Hide the folder first (one rename: it stops counting as complete), then delete it."""
    hidden = path.with_name(f".{path.name}.removing")
    shutil.rmtree(hidden, ignore_errors=True)
    os.replace(path, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def prune_checkpoints(work_dir: Path, fingerprint: str, keep: int) -> None:
    """Remove other runs' checkpoints (never resumable here) and all but this run's newest ``keep``."""
    ours = []
    for _, path in list_checkpoints(work_dir):
        if read_json(path / CHECKPOINT_STATE_NAME).get("fingerprint") == fingerprint:
            ours.append(path)
        else:
            remove_checkpoint(path)
    for path in ours[: max(len(ours) - keep, 0)]:
        remove_checkpoint(path)


def save_checkpoint(accelerator: Any, work_dir: Path, step: int, state: dict, limit: int) -> Path:
    """``accelerator.save_state`` into ``work_dir/checkpoint-<step>``, keeping at most ``limit``.

    Prunes to ``limit - 1`` before writing, so that with the new one there are ``limit``; with
    ``limit`` 1 the new one is written first and then the old one removed.

    Every rank of a data-parallel run calls it: the main rank makes the temporary folder and tells
    the others, all save into it (the main rank the weights, optimizer and schedule; each rank its
    random state), and once all are done the main rank completes and renames it. The same
    collectives run on every rank, so none waits on one that skipped them.
    """
    limit = max(int(limit), 1)
    fingerprint = state["fingerprint"]
    path = Path(work_dir) / f"checkpoint-{step}"
    if not accelerator.is_main_process:
        _save_every_rank(accelerator, None)
        return path
    if limit > 1:
        prune_checkpoints(work_dir, fingerprint, keep=limit - 1)
    with atomic_path(path) as tmp:
        _save_every_rank(accelerator, tmp)
        write_json_atomic(tmp / CHECKPOINT_STATE_NAME, state)
    prune_checkpoints(work_dir, fingerprint, keep=limit)
    return path


def _save_every_rank(accelerator: Any, folder: Path | None) -> None:
    """All ranks save their state into the main rank's ``folder``, then wait for each other."""
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        box = [str(folder) if folder is not None else None]
        broadcast_object_list(box, from_process=0)
        folder = Path(box[0])
    accelerator.save_state(str(folder))
    accelerator.wait_for_everyone()


def our_checkpoints(work_dir: Path, fingerprint: str) -> list[tuple[int, Path]]:
    """This run's complete checkpoints (made with ``fingerprint``), oldest first."""
    return [
        (step, path)
        for step, path in list_checkpoints(work_dir)
        if read_json(path / CHECKPOINT_STATE_NAME).get("fingerprint") == fingerprint
    ]


def checkpoints_due(total_steps: int, every: int, after_step: int = 0) -> int:
    """Checkpoints a run still writes after ``after_step``: every ``every`` steps, but not at the last
    step, where the final model is saved instead."""
    if not every:
        return 0
    return max((total_steps - 1) // every - after_step // every, 0)


# ---------------------------------------------------------------- disk


# What a weights file is called; the base model's other files (configs, tokenizer, scheduler) are
# written again by the final save.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".onnx", ".h5")


def non_weight_bytes(model_dir: Path) -> int:
    """Bytes of the files of a diffusers folder other than weights: configs, tokenizer files."""
    return sum(
        p.stat().st_size
        for p in Path(model_dir).rglob("*")
        if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES) and not p.name.startswith(".")
    )


@dataclass(frozen=True)
class DiskPlan:
    """What a run still writes: checkpoints of ``per_checkpoint`` bytes (``on_disk`` of this run's
    already there, ``to_write`` still due, at most ``limit`` kept), then ``final_model`` bytes."""

    per_checkpoint: int
    final_model: int
    limit: int
    on_disk: int
    to_write: int


def disk_needed_bytes(plan: DiskPlan, margin: float) -> int:
    """The most the run adds to the disk at one moment, times ``1 + margin``.

    Checkpoints already on disk are not counted again. During training this run's checkpoints grow to
    at most ``limit`` (two for a moment with a limit of 1: the new one is written, then replaces the
    old); at the end, those kept sit beside the final model until it is saved.
    """
    limit = max(plan.limit, 1)  # save_checkpoint always keeps the newest
    at_most = 2 if limit == 1 else limit
    total = plan.on_disk + plan.to_write
    while_training = max(min(total, at_most) - plan.on_disk, 0) * plan.per_checkpoint
    kept = min(total, limit) if plan.to_write else plan.on_disk  # pruning happens only when saving
    at_the_end = (kept - plan.on_disk) * plan.per_checkpoint + plan.final_model
    return math.ceil(max(while_training, at_the_end) * (1 + margin))


def remove_all_checkpoints(work_dir: Path) -> None:
    for _, path in list_checkpoints(work_dir):
        remove_checkpoint(path)


# ---------------------------------------------------------------- the final model


def save_final_model(
    trained: list[torch.nn.Module],
    base_model_dir: Path,
    output_dir: Path,
    info: dict,
    method: str,
) -> None:
    """The trained model as a diffusers pipeline folder (full) or LoRA weights, with its content
    hash stored beside it (read later instead of re-hashing gigabytes)."""
    unet = trained[0]
    text_encoder = trained[1] if len(trained) > 1 else None
    with atomic_path(output_dir) as tmp:
        if method == "lora":
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            def lora_layers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
                state = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
                return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}

            StableDiffusionPipeline.save_lora_weights(
                tmp,
                unet_lora_layers=lora_layers(unet),
                text_encoder_lora_layers=lora_layers(text_encoder) if text_encoder is not None else None,
                weight_name=LORA_WEIGHTS_NAME,
            )
        else:
            parts: dict[str, Any] = {"unet": unet.float()}
            if text_encoder is not None:
                parts["text_encoder"] = text_encoder.float()
            pipe = load_pipeline(base_model_dir, "cpu", torch.float32, **parts)
            pipe.save_pretrained(tmp, safe_serialization=True)
        write_json_atomic(tmp / TRAINING_INFO_NAME, info)
        write_folder_version(tmp)
