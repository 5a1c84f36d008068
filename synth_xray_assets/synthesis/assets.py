"""Dagster wiring of the generated image sets: ``synthetic_images``, one partition per generator,
and ``base_model_images``, the untrained base model's FID reference images, one partition per class.

The numerical work lives in ``diffusion/generate.py`` (``generate_set``) and, for the base model's
set, ``base_images.py``."""

import dagster as dg
import numpy as np

from synth_xray_assets.checks import partition_check
from synth_xray_assets.dataset.store import StandardizedDataset
from synth_xray_assets.deployment import gpu_step
from synth_xray_assets.diffusion.generate import GenerationReport, Recipe, generate_set, seed_stream_offset
from synth_xray_assets.diffusion.pipelines import TrainedPipeline
from synth_xray_assets.dreambooth import store as models
from synth_xray_assets.dreambooth.presets import GenerationPlan, Planned, generation_plan
from synth_xray_assets.hardware import least_free_gpu_memory, require_free_space
from synth_xray_assets.metadata import settings_metadata
from synth_xray_assets.operations.locks import one_writer
from synth_xray_assets.operations.refusals import disk_refusal_is_final
from synth_xray_assets.partitions import (
    class_key_of,
    class_label,
    class_partitions,
    generator_partitions,
)
from synth_xray_assets.resources import ComputeResource, SettingsResource, on_a_card, step_holder
from synth_xray_assets.settings import GenerationSettings, Settings
from synth_xray_assets.storage import folder_version, image_grid, png_markdown
from synth_xray_assets.synthesis.base_images import make_base_model_images
from synth_xray_assets.synthesis.store import (
    SyntheticImages,
    images_per_class,
    manifest_version,
    synthetic_dir,
)

OWNERS = ["team:synth-xray"]


def _checkpoint_version(data_dir, key: str) -> str:
    path = models.checkpoint_dir(data_dir, key)
    if not path.is_dir():
        raise FileNotFoundError(
            f"no DreamBooth checkpoint for {key!r} at {path}: materialize dreambooth_checkpoint[{key}] first"
        )
    try:
        return folder_version(path)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"the DreamBooth checkpoint {path} is incomplete: {exc}") from None


# What both generated image sets (synthetic_images, base_model_images) declare alike.
_GENERATED_SET = dict(
    group_name="synthesis",
    kinds={"pytorch", "diffusers"},
    owners=OWNERS,
    retry_policy=dg.RetryPolicy(max_retries=1, delay=10),
)

_SYNTHETIC_IMAGES_ASSET = dict(
    deps=["dreambooth_checkpoint"],
    **_GENERATED_SET,
    code_version="synthetic-images-v2",
    description=(
        "Synthetic chest X-rays from the class's DreamBooth checkpoint: DPM-Solver multistep with "
        "settings generation.* (steps, guidance, batch, images per class). One recorded seed per image; "
        "PNGs and a manifest "
        "(file, class, seed, prompt, checkpoint version) under data/synthetic/{class}/. A re-run makes only "
        "missing images."
    ),
)


def synthetic_images_asset(s: Settings) -> dg.AssetsDefinition:
    """``synthetic_images`` on the settings' generator partitions, a GPU step that samples."""
    return dg.asset(
        **_SYNTHETIC_IMAGES_ASSET, partitions_def=generator_partitions(s), **gpu_step(s, "diffusion")
    )(synthetic_images)


@disk_refusal_is_final
@one_writer
@on_a_card
def synthetic_images(
    context: dg.AssetExecutionContext, settings: SettingsResource, compute: ComputeResource
) -> dg.MaterializeResult:
    s = settings.get()
    # every generator's set may be made at once: each takes its share of the cards at most
    share = compute.share_of_cards(len(generator_partitions(s).get_partition_keys()))
    with compute.generation_devices(s, step_holder(context), share) as devices:
        return _synthetic_images(context, s, devices)


def _synthetic_images(
    context: dg.AssetExecutionContext, s: Settings, devices: tuple[str, ...]
) -> dg.MaterializeResult:
    """``synthetic_images`` split by image index over ``devices`` (one process each when several)."""
    g = s.generation
    key = context.partition_key
    ckpt = models.checkpoint_dir(s.data_dir, key)
    version = _checkpoint_version(s.data_dir, key)
    base = models.base_model_path(s.data_dir)
    prompt = s.dreambooth.instance_prompts[class_key_of(key)]
    out = synthetic_dir(s.data_dir, key)
    first_seed = seed_stream_offset(g, key)  # this set's own seed stream
    count = images_per_class(s)
    plan = generation_plan(g.batch_size, s.dreambooth.resolution, least_free_gpu_memory(devices), g)
    require_free_space(out, count * s.dreambooth.resolution**2, "synthetic images (PNG, at most raw size)")
    report = generate_set(
        Planned(TrainedPipeline(ckpt, base), plan),
        out,
        count,
        Recipe(
            prompt,
            g.num_inference_steps,
            g.guidance_scale,
            s.dreambooth.resolution,
            first_seed,
            {"class_key": key, "label": class_label(key), "checkpoint_version": version},
        ),
        batch_size=plan.batch_size,
        devices=devices,
        log=context.log.info,
    )
    grid = samples_beside_real(SyntheticImages.open(out), s, key)
    return dg.MaterializeResult(
        metadata={
            **generation_metadata(report, plan, g, prompt, f"{first_seed}..{first_seed + count - 1}"),
            "checkpoint_version": version,
            "checkpoint_path": dg.MetadataValue.path(str(ckpt)),
            "path": dg.MetadataValue.path(str(out)),
            "device": ", ".join(devices),
            "samples (top) and real training images of the class (bottom)": dg.MetadataValue.md(
                png_markdown(grid, f"synthetic {key} above real {key}")
            ),
            **settings_metadata(s),
        },
        data_version=dg.DataVersion(manifest_version(report.manifest)),
    )


_BASE_MODEL_IMAGES_ASSET = dict(
    # the dataset: the count is generation.images_per_class scaled to its real training split
    deps=["base_model", "chest_xray_dataset"],
    **_GENERATED_SET,
    code_version="base-model-images-v1",
    description=(
        "The untrained base model's images of the class's instance prompt, made with the fine-tuned sets' "
        "sampler (generation.*: DPM-Solver steps, guidance, batch, images per class) on their own seed "
        "stream: the reference fid_scores compares every generator of the class with (does fine-tuning "
        "move the images toward real ones?). Needs only base_model, so it runs beside DreamBooth. PNGs "
        "and a manifest (file, seed, prompt, base model version) under "
        "data/evaluation/base_model_images/{class}/. A re-run makes only missing images."
    ),
)


def base_model_images_asset(s: Settings) -> dg.AssetsDefinition:
    """``base_model_images`` per class (not per generator: matched generators of a class share it),
    a GPU step that samples the base model."""
    return dg.asset(**_BASE_MODEL_IMAGES_ASSET, partitions_def=class_partitions, **gpu_step(s, "diffusion"))(
        base_model_images
    )


@disk_refusal_is_final
@one_writer
@on_a_card
def base_model_images(
    context: dg.AssetExecutionContext, settings: SettingsResource, compute: ComputeResource
) -> dg.MaterializeResult:
    s = settings.get()
    g = s.generation
    class_key = context.partition_key
    out = s.layout.base_model_images(class_key)
    count = images_per_class(s)
    require_free_space(out, count * s.dreambooth.resolution**2, "base model images (PNG, at most raw size)")
    # One card unless generation.cards says more: these run beside DreamBooth, which wants the free ones.
    with compute.generation_devices(s, step_holder(context), 1) as devices:
        made = make_base_model_images(s, class_key, devices, context.log.info)
    report, first_seed = made.report, made.recipe.seed_offset
    grid = samples_beside_real(SyntheticImages.open(out), s, class_key)
    seeds = f"{first_seed}..{first_seed + count - 1}"
    return dg.MaterializeResult(
        metadata={
            **generation_metadata(report, made.plan, g, made.recipe.prompt, seeds),
            "version": manifest_version(report.manifest),
            "base_model_version": made.base_model_version,
            "path": dg.MetadataValue.path(str(out)),
            "device": ", ".join(devices),
            "samples (top) and real training images of the class (bottom)": dg.MetadataValue.md(
                png_markdown(grid, f"base model {class_key} above real {class_key}")
            ),
            **settings_metadata(s),
        },
        data_version=dg.DataVersion(manifest_version(report.manifest)),
    )


def generation_metadata(
    report: GenerationReport, plan: GenerationPlan, g: GenerationSettings, prompt: str, seeds: str
) -> dict:
    """What a generated set's materialization says of the images and how they were made."""
    return {
        "num_images": len(report.manifest),
        "made_this_run": len(report.generated),
        "kept_from_earlier_runs": report.reused,
        "batch_size": plan.batch_size,  # from free GPU memory, at most generation.batch_size
        "vae_slicing": plan.vae_slicing,
        "prompt": prompt,
        "sampler": f"DPM-Solver multistep, {g.num_inference_steps} steps, guidance {g.guidance_scale}",
        "seeds": f"{seeds} (this set's own stream)",
    }


def samples_beside_real(images: SyntheticImages, s, key: str, columns: int = 8):
    """Two rows of generated images of class ``key`` above a row of its real training images, so a
    glance shows whether the class was learned (as ``dreambooth_checkpoint`` shows its samples)."""
    synthetic = list(images.images(limit=2 * columns))
    real = StandardizedDataset.open(s.layout.dataset).images("train", class_label(key))[:columns]
    blank = np.full((8, 8), 255, np.uint8)  # fills the last synthetic row so real images start a row
    return image_grid(synthetic + [blank] * (-len(synthetic) % columns) + list(real), columns, 96)


# ``no_blank_samples`` on given generator partitions.
no_blank_samples_check = partition_check(
    "synthetic_images",
    "no_blank_samples",
    "The image count equals the setting (scaled to the real training split); no blank or NaN "
    "images; sizes match the resolution.",
    lambda s, key, compute: check_synthetic_set(SyntheticImages.open(synthetic_dir(s.data_dir, key)), s),
)


def check_synthetic_set(images: SyntheticImages, s) -> dict:
    """Count, size and blankness of a synthetic set (PNGs hold no NaN: a NaN image decodes blank)."""
    arr = images.images()
    res = s.dreambooth.resolution
    expected = images_per_class(s)
    count_ok = len(arr) == expected
    size_ok = arr.ndim == 3 and arr.shape[1:] == (res, res)
    stds = arr.reshape(len(arr), -1).std(axis=1) if len(arr) else np.zeros(0)
    blank = [int(i) for i in np.flatnonzero(stds < 1.0)]  # under one grey level of spread
    return {
        "ok": count_ok and size_ok and not blank,
        "num_images": len(arr),
        "expected": expected,
        "shape": list(arr.shape),
        "blank_indices": blank[:20],
    }


def build_defs(s: Settings) -> dg.Definitions:
    """The synthesis domain's definitions: synthetic images per generator of ``s``, the base
    model's reference images per class."""
    return dg.Definitions(
        assets=[synthetic_images_asset(s), base_model_images_asset(s)],
        asset_checks=[no_blank_samples_check(generator_partitions(s))],
    )
