"""Dagster wiring of DreamBooth: ``base_model``, ``prior_class_images``, ``dreambooth_checkpoint``.

The numerical work lives beside this file: the loss and the loop in ``training.py``, the tiny
demo model in ``tiny.py``, the Hub download in ``base_model.py``.
"""

import os
import time
from typing import Any

import dagster as dg
import numpy as np
from PIL import Image

from synth_xray_assets.cards import describe, held_cards, physical_index
from synth_xray_assets.checks import partition_check
from synth_xray_assets.dataset.assets import chest_xray_dataset
from synth_xray_assets.dataset.splits import ValidationSplit, generator_positions
from synth_xray_assets.dataset.store import StandardizedDataset
from synth_xray_assets.deployment import gpu_step
from synth_xray_assets.diffusion.generate import Recipe, generate_set, seed_stream_offset
from synth_xray_assets.diffusion.image_sets import manifest_version
from synth_xray_assets.diffusion.pipelines import (
    SavedPipeline,
    load_pipeline,
    load_trained_pipeline,
    sample_images,
    use_dpm_solver,
)
from synth_xray_assets.dreambooth import store
from synth_xray_assets.dreambooth.base_model import fetch_base_model, pretraining_images
from synth_xray_assets.dreambooth.data_parallel import (
    DataParallelJob,
    launch_command,
    ranks_for,
    read_result,
    write_job,
)
from synth_xray_assets.dreambooth.loss import valid_world_sizes
from synth_xray_assets.dreambooth.presets import Planned, PresetChoice, generation_plan, resolve_preset
from synth_xray_assets.dreambooth.summary import loss_curve, smoothed
from synth_xray_assets.dreambooth.training import (
    RunDirs,
    RunInputs,
    TrainResult,
    num_train_steps,
    train_dreambooth,
)
from synth_xray_assets.hardware import free_gpu_memory, least_free_gpu_memory, require_free_space
from synth_xray_assets.metadata import settings_metadata
from synth_xray_assets.operations.locks import one_writer
from synth_xray_assets.operations.refusals import disk_refusal_is_final
from synth_xray_assets.partitions import (
    class_key_of,
    class_label,
    generator_partitions,
)
from synth_xray_assets.resources import ComputeResource, SettingsResource, on_a_card, step_holder
from synth_xray_assets.settings import DreamBoothSettings, Settings
from synth_xray_assets.storage import folder_version, image_grid, png_markdown, write_json_atomic

OWNERS = ["team:synth-xray"]
RETRY = dg.RetryPolicy(max_retries=1, delay=10)  # transient failures; training resumes from a checkpoint


# base_model's decorator arguments; its dependency on the dataset is chosen by build_defs.
_BASE_MODEL_ASSET = dict(
    group_name="dreambooth",
    kinds={"pytorch", "huggingface", "diffusers"},
    owners=OWNERS,
    code_version="base-model-v2",  # v2: the tiny model pre-trains on balanced train less validation
    retry_policy=RETRY,
    description=(
        "The Stable Diffusion DreamBooth starts from. Full profile: SD 2.1 base from the Hugging Face "
        "Hub (settings base_model.pretrained_model@revision), fetched once into data/models/hub. Demo: "
        "a tiny SD (UNet, VAE, CLIP text encoder and an offline tokenizer) built from config and "
        "briefly pre-trained on the demo images. Standard diffusers layout."
    ),
)


@one_writer
@on_a_card
def _base_model_body(
    context: dg.AssetExecutionContext, settings: SettingsResource, compute: ComputeResource
) -> dg.MaterializeResult:
    s = settings.get()
    bm = s.base_model
    started = time.perf_counter()
    meta: dict = {}
    if bm.tiny:
        from synth_xray_assets.dreambooth.tiny import build_tiny_pipeline, pretrain_tiny_pipeline

        device = compute.resolve_device()
        images = pretraining_images(s, StandardizedDataset.open(s.layout.dataset))
        pipe = build_tiny_pipeline(bm, s.dreambooth.resolution)
        stats = pretrain_tiny_pipeline(pipe, images, bm, device, log=context.log.info)
        path = s.layout.tiny_base_model
        from synth_xray_assets.storage import atomic_path

        with atomic_path(path) as tmp:
            pipe.to("cpu").save_pretrained(tmp, safe_serialization=True)
        meta.update(
            {
                "model": "tiny Stable Diffusion from config (demo), pre-trained on the demo train images",
                "pretraining": dg.MetadataValue.json({k: round(v, 5) for k, v in stats.items()}),
            }
        )
        sample_pipe = pipe.to(device)
    else:
        path = fetch_base_model(bm, s.layout.hub_cache, settings.hf_token, log=context.log.info)
        device = compute.resolve_device()
        sample_pipe = load_pipeline(path, device)
        meta["model"] = f"{bm.pretrained_model}@{bm.revision}"
    version = folder_version(path)
    write_json_atomic(store.base_model_record(s.data_dir), {"path": str(path), "version": version})

    use_dpm_solver(sample_pipe)
    samples = sample_images(
        sample_pipe,
        s.dreambooth.class_prompt,
        list(range(8)),
        s.dreambooth.sample_steps,
        s.generation.guidance_scale,
        s.dreambooth.resolution,
    )
    params = {
        k: sum(p.numel() for p in getattr(sample_pipe, k).parameters())
        for k in ("unet", "vae", "text_encoder")
    }
    return dg.MaterializeResult(
        metadata={
            **meta,
            "path": dg.MetadataValue.path(str(path)),
            "parameters": dg.MetadataValue.json(params),
            "wall_time_s": round(time.perf_counter() - started, 1),
            f"samples ('{s.dreambooth.class_prompt}')": dg.MetadataValue.md(
                png_markdown(image_grid(list(samples), columns=8, cell=96), "base model samples")
            ),
            **settings_metadata(s),
        },
        data_version=dg.DataVersion(version),
    )


def base_model_asset(s: Settings) -> dg.AssetsDefinition:
    """``base_model``; the demo's tiny model is pre-trained on the dataset's images, so it depends on
    the dataset (an op input, so jobs order the two); SD 2.1 comes from the Hub and does not."""
    deps = [chest_xray_dataset] if s.base_model.tiny else []
    return dg.asset(name="base_model", deps=deps, **_BASE_MODEL_ASSET, **gpu_step(s, "diffusion"))(
        _base_model_body
    )


_PRIOR_CLASS_IMAGES_ASSET = dict(
    deps=["base_model"],
    group_name="dreambooth",
    kinds={"pytorch", "diffusers"},
    owners=OWNERS,
    code_version="prior-images-v2",
    retry_policy=RETRY,
    description=(
        "Prior-preservation class images: what the base model makes of dreambooth.class_prompt "
        "(dreambooth.num_class_images images, class_image_steps steps, class_image_guidance). Kept "
        "under data/prior/ so that "
        "re-training does not remake them; an interrupted run makes only the missing ones."
    ),
)


def prior_class_images_asset(s: Settings) -> dg.AssetsDefinition:
    """``prior_class_images``, a GPU step that samples the base model."""
    return dg.asset(**_PRIOR_CLASS_IMAGES_ASSET, **gpu_step(s, "diffusion"))(prior_class_images)


@disk_refusal_is_final
@one_writer
@on_a_card
def prior_class_images(
    context: dg.AssetExecutionContext, settings: SettingsResource, compute: ComputeResource
) -> dg.MaterializeResult:
    s = settings.get()
    with compute.generation_devices(s, step_holder(context), None) as devices:
        return _prior_class_images(context, s, devices)


def _prior_class_images(
    context: dg.AssetExecutionContext, s: Settings, devices: tuple[str, ...]
) -> dg.MaterializeResult:
    """``prior_class_images`` split by image index over ``devices`` (one process each when several)."""
    db = s.dreambooth
    base_path = store.base_model_path(s.data_dir)
    base_version = folder_version(base_path)
    plan = generation_plan(
        db.class_image_batch_size, db.resolution, least_free_gpu_memory(devices), s.generation
    )
    require_free_space(
        store.prior_dir(s.data_dir), db.num_class_images * db.resolution**2, "prior images (PNG, at most raw)"
    )
    report = generate_set(
        Planned(SavedPipeline(base_path), plan),  # float16 on CUDA
        store.prior_dir(s.data_dir),
        db.num_class_images,
        Recipe(
            db.class_prompt,
            db.class_image_steps,
            db.class_image_guidance,
            db.resolution,
            seed_offset=seed_stream_offset(s.generation, "prior"),
            extra_columns={"class_key": "prior", "label": -1, "checkpoint_version": base_version},
        ),
        batch_size=plan.batch_size,
        devices=devices,
        log=context.log.info,
    )
    images = store.prior_images(s.data_dir)
    return dg.MaterializeResult(
        metadata={
            "num_images": len(report.manifest),
            "made_this_run": len(report.generated),
            "kept_from_earlier_runs": report.reused,
            "batch_size": plan.batch_size,  # from free GPU memory, at most class_image_batch_size
            "vae_slicing": plan.vae_slicing,
            "prompt": db.class_prompt,
            "device": ", ".join(devices),
            "base_model_version": base_version,
            "path": dg.MetadataValue.path(str(store.prior_dir(s.data_dir))),
            "images": dg.MetadataValue.md(png_markdown(image_grid(list(images[:16]), 8, 96), "class images")),
            **settings_metadata(s),
        },
        data_version=dg.DataVersion(manifest_version(report.manifest)),
    )


_DREAMBOOTH_CHECKPOINT_ASSET = dict(
    deps=[chest_xray_dataset, "base_model", "prior_class_images"],
    group_name="dreambooth",
    kinds={"pytorch", "diffusers", "accelerate"},
    owners=OWNERS,
    code_version="dreambooth-v2",
    retry_policy=RETRY,
    description=(
        "DreamBooth fine-tuning of the base model on one class's real training images (full "
        "fine-tuning of UNet and text encoder with prior preservation, as the study; or LoRA with "
        "settings dreambooth.method='lora'). Saves a standard diffusers pipeline folder (or "
        "pytorch_lora_weights.safetensors) under data/models/dreambooth/{class}; checkpoints every "
        "dreambooth.checkpointing_steps, and a re-run resumes from the latest one."
    ),
)


def dreambooth_checkpoint_asset(s: Settings) -> dg.AssetsDefinition:
    """``dreambooth_checkpoint`` on the settings' generator partitions, a GPU step that trains."""
    return dg.asset(
        **_DREAMBOOTH_CHECKPOINT_ASSET, partitions_def=generator_partitions(s), **gpu_step(s, "dreambooth")
    )(dreambooth_checkpoint)


@disk_refusal_is_final
@one_writer
@on_a_card
def dreambooth_checkpoint(
    context: dg.AssetExecutionContext, settings: SettingsResource, compute: ComputeResource
) -> dg.MaterializeResult:
    s = settings.get()
    db = s.dreambooth
    key = context.partition_key
    label = class_label(key)
    dataset = StandardizedDataset.open(s.layout.dataset)
    instance_images, split = _instance_images(s, dataset, key)
    class_images = store.prior_images(s.data_dir) if db.with_prior_preservation else None
    base_path = store.base_model_path(s.data_dir)
    device = compute.resolve_device()
    # The memory preset from the free GPU memory (or a clear error naming the options), before any work.
    preset = resolve_preset(db, free_gpu_memory(device), context.log.info)
    settings_used = preset.settings.model_copy(
        update={"mixed_precision": compute.precision_for(device, db.mixed_precision)}
    )
    prompt = db.instance_prompts[class_key_of(key)]
    out = store.checkpoint_dir(s.data_dir, key)
    context.log.info(
        f"{key}: {len(instance_images)} instance images, {num_train_steps(len(instance_images), db)} steps, "
        f"method {settings_used.method}, device {device}"
    )
    inputs = RunInputs(base_path, instance_images, class_images, prompt)
    dirs = RunDirs(out, store.work_dir(s.data_dir, key))
    ranks = ranks_for(key, _steps_by_generator(s, dataset), len(compute.machine_cards()), db)
    if ranks > 1:
        on = "cuda" if device.startswith("cuda") else "cpu"
        job = DataParallelJob(base_path, prompt, settings_used, out, dirs.work_dir, on, preset.name)
        result = _train_on_ranks(context, (s, compute), ranks, job, inputs)
    else:
        result = train_dreambooth(inputs, settings_used, dirs, device, log=context.log.info)
    grid = _samples_grid(s, load_trained_pipeline(out, base_path, device), prompt, instance_images)
    curve = loss_curve(
        result.losses,
        f"DreamBooth {key} ({settings_used.method})",
        result.prior_losses,
        result.resumed_from_step,
    )
    return dg.MaterializeResult(
        metadata={
            **_training_metadata(result, preset, settings_used, device),
            "instance_prompt": prompt,
            "num_instance_images": len(instance_images),
            "instance_images": (
                f"{len(instance_images)} real {s.dataset.class_names[label]} training images: "
                + (
                    "real train less the classifiers' validation split"
                    if key == class_key_of(key)
                    else f"the fixed real subset of generator {key} (matched generators)"
                )
                + f"; validation split {split.describe()}"
            ),
            "generators": s.dreambooth.generators,
            "num_class_images": 0 if class_images is None else len(class_images),
            "base_model_version": folder_version(base_path),
            "dataset_version": dataset.version,
            "path": dg.MetadataValue.path(str(out)),
            "loss_curve": dg.MetadataValue.md(png_markdown(curve, "loss curve")),
            "samples (top) and real training images (bottom)": dg.MetadataValue.md(
                png_markdown(grid, "samples")
            ),
            **settings_metadata(s),
        },
        data_version=dg.DataVersion(folder_version(out)),
    )


def _steps_by_generator(s: Settings, dataset: StandardizedDataset) -> dict[str, int]:
    """Each generator's optimizer steps: what the machine's cards are shared by (``ranks_for``)."""
    rows = dataset.rows("train")
    return {
        key: num_train_steps(len(generator_positions(s, rows, key)[0]), s.dreambooth)
        for key in generator_partitions(s).get_partition_keys()
    }


def _train_on_ranks(
    context: dg.AssetExecutionContext,
    where: tuple[Settings, ComputeResource],
    ranks: int,
    job: DataParallelJob,
    inputs: RunInputs,
) -> TrainResult:
    """Train on ``ranks`` cards: the card this step holds and free ones beside it (fewer when fewer
    are free, rounded down to a count that divides the global batch), through torchrun started by a
    Dagster Pipes client, so rank 0's log lines land on this step and stopping the run stops every
    rank (SIGINT to torchrun; each rank also dies with it)."""
    s, compute = where
    cards = compute.machine_cards()
    if cards and ranks > len(cards):
        raise ValueError(
            f"dreambooth.data_parallel_cards = {ranks}, but this step sees {len(cards)} card(s): "
            + "; ".join(describe(c) for c in cards)
        )
    valid = valid_world_sizes(job.settings)
    with compute.more_cards(s, ranks - 1, step_holder(context), valid):
        held = list(held_cards())  # its own card and the extra ones: a count that divides the batch
        k = len(held) if cards else ranks
        if k < ranks:
            context.log.info(f"{k} card(s) free of the {ranks} wanted: training on {k}")
        folder = job.work_dir / "data-parallel"
        job_file = write_job(folder, job, inputs.instance_images, inputs.class_images)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        env = {"CUDA_VISIBLE_DEVICES": ",".join(physical_index(c.index, visible) for c in held[:k])}
        context.log.info(
            f"data-parallel DreamBooth on {k} ranks ({job.device}"
            + (f": {'; '.join(describe(c) for c in held[:k])})" if cards else ")")
        )
        try:
            dg.PipesSubprocessClient().run(
                command=launch_command(job_file, k), context=context, env=env if job.device == "cuda" else {}
            )
        except Exception:
            read_result(folder)  # a rank's own failure (rank, card, preset, error) when it wrote one
            raise
        finally:
            for copy in ("instance.npy", "class.npy"):  # the training images' copies for the ranks
                (folder / copy).unlink(missing_ok=True)
        context.add_asset_metadata({"data_parallel_ranks": k})
        return read_result(folder)


def _instance_images(
    s: Settings, dataset: StandardizedDataset, key: str
) -> tuple[np.ndarray, ValidationSplit]:
    """Generator ``key``'s training images: real train less the classifiers' validation split (or,
    matched, the limited subset), and that split."""
    positions, split = generator_positions(s, dataset.rows("train"), key)
    instance_images = dataset.images("train")[positions]
    if len(instance_images) == 0:
        raise ValueError(
            f"no {s.dataset.class_names[class_label(key)]} training images for generator {key!r} "
            f"in {dataset.root}"
        )
    return instance_images, split


def _samples_grid(s: Settings, pipe: Any, prompt: str, instance_images: np.ndarray) -> Image.Image:
    """``sample_images`` samples of the trained pipeline above as many real training images."""
    db = s.dreambooth
    use_dpm_solver(pipe)
    samples = sample_images(
        pipe,
        prompt,
        list(range(db.sample_images)),
        db.sample_steps,
        s.generation.guidance_scale,
        db.resolution,
    )
    real = instance_images[: db.sample_images]
    return image_grid(list(samples) + list(real), columns=len(samples), cell=96)


def _training_metadata(
    result: TrainResult, preset: PresetChoice, settings_used: DreamBoothSettings, device: str
) -> dict[str, Any]:
    """What the run did: method and memory options, steps, losses, time, memory, precision."""
    smooth = smoothed(result.losses)
    return {
        "method": settings_used.method,
        "memory_preset": preset.name,
        "memory_preset_reason": preset.reason,
        "gradient_checkpointing": settings_used.gradient_checkpointing,
        "use_8bit_adam": settings_used.use_8bit_adam,
        "disk_needed_gib": round(result.disk_needed_bytes / 2**30, 3),
        "steps": result.global_step,
        "epochs": result.epochs,
        "resumed_from_step": result.resumed_from_step,
        "steps_this_run": len(result.steps_run),
        "final_loss": float(result.losses[-1]),
        "smoothed_loss": float(smooth[-1]),
        "first_smoothed_loss": float(smooth[min(len(smooth) - 1, 9)]),
        "wall_time_s": round(result.wall_s, 1),
        "peak_memory_mb": round(result.peak_memory_bytes / 2**20, 1),
        "device": device,
        "precision": settings_used.mixed_precision if device.startswith("cuda") else "fp32",
    }


# ``checkpoint_loads`` on given generator partitions (a GPU step: it samples the checkpoint).
checkpoint_loads_check = partition_check(
    "dreambooth_checkpoint",
    "checkpoint_loads",
    "The saved checkpoint loads with plain diffusers and makes a finite, non-blank image.",
    lambda s, key, compute: check_checkpoint(s, key, compute.resolve_device()),
)


def check_checkpoint(s, key: str, device: str) -> dict:
    """Load ``key``'s checkpoint as plain diffusers would and sample one image."""
    try:
        pipe = load_trained_pipeline(
            store.checkpoint_dir(s.data_dir, key), store.base_model_path(s.data_dir), device
        )
        use_dpm_solver(pipe)
        import torch

        with torch.no_grad():
            img = pipe(
                s.dreambooth.instance_prompts[class_key_of(key)],
                num_inference_steps=s.dreambooth.sample_steps,
                guidance_scale=s.generation.guidance_scale,
                height=s.dreambooth.resolution,
                width=s.dreambooth.resolution,
                generator=torch.Generator("cpu").manual_seed(0),
                output_type="np",
            ).images[0]
    except Exception as exc:  # a failed load is the check's finding, not a crash
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    finite = bool(np.isfinite(img).all())
    std = float(np.nan_to_num(img).std())
    return {"ok": finite and std > 1e-3, "finite": finite, "pixel_std": round(std, 5)}


def build_defs(s: Settings) -> dg.Definitions:
    """The DreamBooth domain's definitions. The demo's tiny base model is pre-trained on the
    dataset's images (so it depends on it); SD 2.1 comes from the Hub."""
    return dg.Definitions(
        assets=[base_model_asset(s), prior_class_images_asset(s), dreambooth_checkpoint_asset(s)],
        asset_checks=[checkpoint_loads_check(generator_partitions(s), **gpu_step(s, "diffusion"))],
    )
