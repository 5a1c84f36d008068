"""Shared tiny configurations: every model built from config, no network, seconds on a CPU."""

import json
import os
from pathlib import Path

import pytest

from synth_xray_assets.settings import Settings

# A pipeline small enough for unit tests: 32 px images, 16x16 latents, a one-layer text encoder.
TINY_MODEL_OVERRIDES = {
    "phantoms": {
        "split_counts": {"train": (6, 10), "validation": (2, 2), "test": (3, 5)},
        "min_side": 40,
        "max_side": 90,
    },
    "dataset": {"resolution": 32, "workers": 1},
    "base_model": {
        "tiny_vae_channels": (8, 16),
        "tiny_unet_channels": (16, 32),
        "tiny_text_width": 32,
        "tiny_text_layers": 1,
        "tiny_vae_steps": 2,
        "tiny_unet_steps": 2,
        "tiny_batch_size": 4,
    },
    "dreambooth": {
        "resolution": 32,
        "num_class_images": 4,
        "class_image_steps": 2,
        "class_image_batch_size": 4,
        "train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "num_train_epochs": 1,
        "max_train_steps": 3,
        "checkpointing_steps": 2,
        "lr_warmup_steps": 0,
        "sample_images": 2,
        "sample_steps": 2,
    },
    "generation": {
        "images_per_class": 4,
        "study_train_size": None,
        "num_inference_steps": 2,
        "batch_size": 4,
    },
}

# A classifier that trains on the tiny images in seconds; each test adds its experiments and seeds.
TINY_CLASSIFIER = {
    "resolution": 32,
    "resize": 36,
    "batch_size": 16,
    "epochs": 2,
    "val_fraction": 0.2,
    "num_workers": 0,
}


def tiny_settings(data_dir: Path, **overrides) -> Settings:
    merged = json.loads(json.dumps(TINY_MODEL_OVERRIDES))
    for section, values in overrides.items():
        merged.setdefault(section, {}).update(values)
    return Settings.for_profile("demo", data_dir, merged)


def tiny_overrides_json(**overrides) -> str:
    merged = json.loads(json.dumps(TINY_MODEL_OVERRIDES))
    for section, values in overrides.items():
        merged.setdefault(section, {}).update(values)
    return json.dumps(merged)


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No SYNTH_XRAY_* variable but the demo profile on ``tmp_path``."""
    for name in [n for n in os.environ if n.upper().startswith("SYNTH_XRAY_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("SYNTH_XRAY_PROFILE", "demo")
    monkeypatch.setenv("SYNTH_XRAY_DATA", str(tmp_path))


@pytest.fixture(scope="session")
def tiny_base_model(tmp_path_factory) -> Path:
    """A randomly initialised tiny Stable Diffusion saved in the diffusers layout."""
    from synth_xray_assets.dreambooth.tiny import build_tiny_pipeline

    s = tiny_settings(tmp_path_factory.mktemp("unused"))
    path = tmp_path_factory.mktemp("tiny_sd") / "base"
    build_tiny_pipeline(s.base_model, s.dreambooth.resolution).save_pretrained(path, safe_serialization=True)
    return path


# Tests that need most of the machine's memory or CPU for minutes: under `make test` (pytest-xdist,
# two workers) they run one after another on one worker, while the other worker runs the rest
# (much of which waits on servers: the browser, the schedule, Celery, PostgreSQL).
# test_sharded_generation.py and test_data_parallel.py: two spawned processes (ranks), each with
# its own torch and diffusers.
HEAVY_FILES = {
    "test_sd21_shaped.py",
    "test_fault_injection.py",
    "test_sharded_generation.py",
    "test_data_parallel.py",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in HEAVY_FILES:
            item.add_marker(pytest.mark.xdist_group("heavy"))
