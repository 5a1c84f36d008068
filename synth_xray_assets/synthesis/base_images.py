"""The untrained base model's images of a class's instance prompt, made with the fine-tuned sets'
sampler (generation.*: steps, guidance, count): the set ``fid_scores`` compares the fine-tuned
images with. They need only the base model, so ``base_model_images`` makes them beside DreamBooth.
No Dagster here."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from synth_xray_assets.diffusion.generate import GenerationReport, Recipe, generate_set, seed_stream_offset
from synth_xray_assets.diffusion.pipelines import SavedPipeline
from synth_xray_assets.dreambooth.presets import GenerationPlan, Planned, generation_plan
from synth_xray_assets.dreambooth.store import base_model_path
from synth_xray_assets.hardware import least_free_gpu_memory
from synth_xray_assets.settings import Settings
from synth_xray_assets.storage import folder_version
from synth_xray_assets.synthesis.store import images_per_class


@dataclass(frozen=True)
class BaseModelImages:
    """What ``make_base_model_images`` did: where the set is, the generation report, the base
    model's version, the recipe and the plan it sampled with."""

    root: Path
    report: GenerationReport
    base_model_version: str
    recipe: Recipe
    plan: GenerationPlan


def base_model_recipe(s: Settings, class_key: str, base_model_version: str) -> Recipe:
    """The class's instance prompt with the sampler of the fine-tuned sets, on the set's own seed
    stream (``base-{class}``); the base model's version is in every manifest row."""
    g = s.generation
    return Recipe(
        s.dreambooth.instance_prompts[class_key],
        g.num_inference_steps,
        g.guidance_scale,
        s.dreambooth.resolution,
        seed_offset=seed_stream_offset(g, f"base-{class_key}"),
        extra_columns={
            "class_key": f"base-{class_key}",
            "label": -1,
            "checkpoint_version": base_model_version,
        },
    )


def make_base_model_images(
    s: Settings, class_key: str, devices: Sequence[str], log: Callable[[str], object]
) -> BaseModelImages:
    """Make (or complete: ``generate_set`` keeps intact images of the same recipe) the base model's
    ``images_per_class`` images of ``class_key``'s instance prompt under ``s.layout.base_model_images``,
    split by image index over ``devices`` (one process each when several)."""
    base = base_model_path(s.data_dir)
    version = folder_version(base)
    root = s.layout.base_model_images(class_key)
    recipe = base_model_recipe(s, class_key, version)
    plan = generation_plan(
        s.generation.batch_size, s.dreambooth.resolution, least_free_gpu_memory(devices), s.generation
    )
    report = generate_set(
        Planned(SavedPipeline(base, half_on_cuda=False), plan),
        root,
        images_per_class(s),
        recipe,
        batch_size=plan.batch_size,
        devices=tuple(devices),
        log=log,
    )
    return BaseModelImages(root, report, version, recipe, plan)
