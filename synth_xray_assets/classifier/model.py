"""DenseNet-121 with the study's two-layer head, its pooled features, and safetensors I/O."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision.models import DenseNet121_Weights, densenet121

from synth_xray_assets.settings import ClassifierSettings
from synth_xray_assets.storage import atomic_path

FEATURE_DIM = 1024  # DenseNet-121's pooled feature width
NUM_CLASSES = 2

# Old torchvision checkpoints name layers "norm.1"; the model names them "norm1".
_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def build_densenet121(settings: ClassifierSettings) -> nn.Module:
    """DenseNet-121 with head Linear(1024, hidden) -> ReLU -> Dropout -> Linear(hidden, 2).

    ``settings.pretrained == "imagenet"`` loads ImageNet weights into the feature layers, from
    ``settings.weights_file`` when set, else through torchvision's download; ``"none"`` keeps
    torchvision's random initialisation (seed torch first for a reproducible model).
    """
    model = densenet121(weights=None)
    if settings.pretrained == "imagenet":
        load_imagenet_features(model, settings.weights_file)
    elif settings.pretrained != "none":
        raise ValueError(f"unknown pretrained={settings.pretrained!r}; use 'imagenet' or 'none'")
    model.classifier = nn.Sequential(
        nn.Linear(FEATURE_DIM, settings.hidden_units),
        nn.ReLU(inplace=True),
        nn.Dropout(settings.dropout),
        nn.Linear(settings.hidden_units, NUM_CLASSES),
    )
    return model


def describe_weights(settings: ClassifierSettings) -> str:
    """Where the initial weights come from, in words (for metadata and reports)."""
    if settings.pretrained == "none":
        return "none: random initialisation (torchvision's default init, seeded)"
    if settings.weights_file:
        return f"ImageNet DenseNet-121 features from {settings.weights_file}"
    return "ImageNet DenseNet-121 features (torchvision IMAGENET1K_V1)"


def load_imagenet_features(model: nn.Module, weights_file: str | Path | None) -> None:
    """Copy ImageNet DenseNet-121 weights into ``model.features`` (the 1000-class head is dropped)."""
    if weights_file:
        state = read_state_dict(weights_file)
    else:
        try:
            state = DenseNet121_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
        except Exception as exc:  # no network, no cache
            raise RuntimeError(
                "could not download torchvision's ImageNet DenseNet-121 weights "
                f"({type(exc).__name__}: {exc}). Set classifier.weights_file to a local copy "
                "(.pth or .safetensors) or classifier.pretrained='none'."
            ) from exc
    state = {_OLD_KEY.sub(r"\1\2", key): value for key, value in state.items()}
    features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    if not features:
        raise ValueError(f"no 'features.*' tensors in {weights_file}: not a DenseNet-121 state dict")
    model.features.load_state_dict(features, strict=True)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file, loaded with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def pooled_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Global-average-pooled DenseNet features ``[N, 1024]`` (features -> ReLU -> avg pool).

    ``x`` is a normalised ``[N, 3, H, W]`` batch; call ``model.eval()`` first for stable features.
    """
    with torch.no_grad():
        maps = F.relu(model.features(x))
        return F.adaptive_avg_pool2d(maps, 1).flatten(1)


def save_classifier(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write the model's weights as safetensors, atomically (tensors copied to CPU)."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return Path(path)


def load_classifier(path: str | Path, settings: ClassifierSettings, device: str = "cpu") -> nn.Module:
    """Build the architecture of ``settings`` (no download) and load saved weights into it."""
    model = build_densenet121(settings.model_copy(update={"pretrained": "none"}))
    model.load_state_dict(load_file(str(path), device="cpu"), strict=True)
    return model.to(device)


def classifier_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata stored in a safetensors file."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
