"""Fixtures shared by the tests and the benchmarks (``benchmarks/`` puts this folder on its path)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from synth_xray_assets.evaluation.features import INCEPTION_LAYER
from synth_xray_assets.storage import atomic_path


def write_random_inception_weights(path: str | Path, seed: int = 0) -> Path:
    """Save a *randomly initialised* ``FeatureExtractorInceptionV3`` state dict in torch-fidelity's format.

    For tests and benchmarks only: its scores mean nothing, but the shapes, the loading code and
    the cost are the real ones. Batch-norm statistics come from one pass over noise, so features
    neither vanish nor explode through 90-odd random layers.
    """

    class _Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict: Any, *args: Any, **kwargs: Any) -> Any:
            return None  # keep the random initialisation

    torch.manual_seed(seed)
    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    module = _Unloaded("inception-v3-compat", [INCEPTION_LAYER], feature_extractor_weights_path=empty)
    for layer in module.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.reset_running_stats()
            layer.momentum = None  # cumulative average over the one pass
    module.train()
    with torch.no_grad():
        module(torch.randint(0, 256, (4, 3, 96, 96), dtype=torch.uint8))
    state = {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}
    with atomic_path(path) as tmp:
        if Path(path).suffix == ".safetensors":
            save_file(state, str(tmp))
        else:
            torch.save(state, tmp)
    return Path(path)


def write_image_folder(
    root: Path, per_class: int, first_size: tuple[int, int], grow: int, suffix: str = "png"
) -> Path:
    """An image-folder source (``{split}/{CLASS}/{CLASS}_{i}.{suffix}``) of seeded noise images,
    ``per_class`` per split and class; image ``i`` is ``grow * i`` pixels taller than the first."""
    rng = np.random.default_rng(0)
    for split in ("train", "validation", "test"):
        for name in ("NORMAL", "PNEUMONIA"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                shape = (first_size[0] + i * grow, first_size[1])
                Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(
                    folder / f"{name}_{i}.{suffix}"
                )
    return root
