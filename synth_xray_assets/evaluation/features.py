"""The two feature spaces behind FID / KID / precision-recall and the memorization check.

Both are torch-fidelity feature extractors, so that its own factory, batching loop and metric
functions do the maths:

* ``cxr-densenet121``: the pooled 1024-d features (``classifier.model.pooled_features``) of a
  DenseNet-121 trained on the real training split (the ``cxr_feature_extractor`` asset). Its
  weights come from a safetensors file (``feature_extractor_weights_path``); torch-fidelity
  passes every keyword to the constructor, so the input size comes as ``cxr_feature_resolution``.
* ``inception-v3-compat-local``: torch-fidelity's own ``inception-v3-compat`` network (the
  features of the study's FID), its weights read from a local file with ``weights_only=True``
  (torch-fidelity itself unpickles with ``weights_only=False``). Without a local file the
  download is tried once; when that fails the space is *unavailable*, with the reason, and no
  score is made up.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

from synth_xray_assets.classifier.model import pooled_features, read_state_dict
from synth_xray_assets.settings import EvaluationSettings
from synth_xray_assets.storage import sha256_file

CXR_EXTRACTOR = "cxr-densenet121"
CXR_LAYER = "1024"
INCEPTION_EXTRACTOR = "inception-v3-compat-local"
INCEPTION_LAYER = "2048"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torch-fidelity's Inception file; its name carries the first 8 hex digits of its sha256 (checked).
INCEPTION_FILE_NAME = URL_INCEPTION_V3.rsplit("/", 1)[-1]


class GrayImageDataset(Dataset):
    """uint8 images ``[N, H, W]`` (or ``[N, H, W, 3]``) as torch-fidelity wants them: uint8 ``[3, H, W]``."""

    def __init__(self, images: np.ndarray) -> None:
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise TypeError(f"images must be uint8, got {images.dtype}")
        if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
            raise ValueError(f"images must be [N, H, W] or [N, H, W, 3], got shape {images.shape}")
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(self.images[i]))
        return x.expand(3, -1, -1).contiguous() if x.ndim == 2 else x.permute(2, 0, 1).contiguous()


# --------------------------------------------------------------------------- chest-X-ray space


def load_densenet_features(weights_path: str | Path) -> nn.Module:
    """torchvision's DenseNet-121 with the ``features.*`` tensors of ``weights_path`` loaded strictly.

    The head in the file (the classifier's Linear-ReLU-Dropout-Linear, or any other) is ignored;
    a missing or mismatched feature tensor raises, so a wrong file never gives random features.
    """
    state = read_state_dict(weights_path)
    features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    if not features:
        raise ValueError(f"no 'features.*' tensors in {weights_path}: not a DenseNet-121 state dict")
    model = torchvision.models.densenet121(weights=None)
    model.features.load_state_dict(features, strict=True)
    return model


class CXRDenseNetFeatures(FeatureExtractorBase):
    """torch-fidelity extractor: pooled 1024-d DenseNet-121 features of uint8 ``[N, 3, H, W]`` images.

    Images are resized (bilinear, antialiased) to ``cxr_feature_resolution`` and normalised with
    the ImageNet mean and std, as the classifier saw them in training. Weights come from
    ``feature_extractor_weights_path`` or an in-memory ``cxr_model`` (copied; the caller's module
    is left alone).
    """

    def __init__(
        self,
        name: str,
        features_list: list[str] | tuple[str, ...],
        feature_extractor_weights_path: str | None = None,
        cxr_feature_resolution: int = 224,
        cxr_model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, features_list)
        if cxr_model is not None:
            model = copy.deepcopy(cxr_model)
        elif feature_extractor_weights_path is not None:
            model = load_densenet_features(feature_extractor_weights_path)
        else:
            raise ValueError(f"{name} needs trained weights: feature_extractor_weights_path or cxr_model")
        self.features = model.features.float()
        self.resolution = int(cxr_feature_resolution)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255, persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3):
            raise ValueError(f"expected uint8 [N, 3, H, W], got {getattr(x, 'dtype', type(x))} {x.shape}")
        x = x.float()
        if x.shape[-2:] != (self.resolution, self.resolution):
            size = (self.resolution, self.resolution)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return (pooled_features(self, (x - self.mean) / self.std).float(),)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return (CXR_LAYER,)

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return CXR_LAYER

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)


# --------------------------------------------------------------------------- Inception space


class LocalInceptionV3(FeatureExtractorInceptionV3):
    """torch-fidelity's ``inception-v3-compat`` network, its weights read with ``weights_only=True``.

    ``feature_extractor_weights_path`` holds the state dict of ``FeatureExtractorInceptionV3``
    (torch-fidelity's ``.pth``, or the same as safetensors). Never downloads:
    :func:`resolve_inception_weights` finds or fetches the file first.
    """

    def __init__(
        self,
        name: str,
        features_list: list[str] | tuple[str, ...],
        feature_extractor_weights_path: str | None = None,
        **kwargs: Any,
    ) -> None:
        if feature_extractor_weights_path is None:
            raise ValueError(f"{name} needs a local weights file (feature_extractor_weights_path)")
        super().__init__(
            name,
            features_list,
            feature_extractor_weights_path=trusted_state_buffer(feature_extractor_weights_path),
            **kwargs,
        )


def trusted_state_buffer(path: str | Path) -> io.BytesIO:
    """The adapter to torch-fidelity, which unpickles its weights file with ``weights_only=False``:
    the state dict read safely (safetensors or ``weights_only=True``) and re-serialized in memory,
    so what torch-fidelity unpickles is tensors this process wrote."""
    buffer = io.BytesIO()
    torch.save(read_state_dict(path), buffer)
    buffer.seek(0)
    return buffer


@dataclass(frozen=True)
class InceptionWeights:
    """Where the Inception weights are (``path``), or why there are none (``reason``)."""

    path: Path | None
    source: str  # "settings", "torch-hub-cache", "downloaded" or "unavailable"
    reason: str | None = None


def resolve_inception_weights(settings: EvaluationSettings) -> InceptionWeights:
    """torch-fidelity's Inception weights: ``settings.inception_weights``, else torch hub's cache,
    else one download (when ``settings.inception_download``), else unavailable with the reason."""
    if settings.inception_weights:
        if Path(settings.inception_weights).is_file():
            return InceptionWeights(Path(settings.inception_weights), "settings")
        reason = (
            f"Inception weights file not found: {settings.inception_weights} (evaluation.inception_weights)"
        )
        return InceptionWeights(None, "unavailable", reason)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE_NAME
    if cached.is_file():
        return InceptionWeights(cached, "torch-hub-cache")
    if not settings.inception_download:
        reason = (
            "no local Inception weights (evaluation.inception_weights is unset) and downloading is disabled"
        )
        return InceptionWeights(None, "unavailable", reason)
    try:
        _download(settings.inception_url, cached, settings.inception_download_timeout_s)
    except Exception as exc:  # no network, a proxy, a bad file: all mean "no Inception score"
        reason = (
            "no local Inception weights (evaluation.inception_weights is unset) and the download of "
            f"{settings.inception_url} failed: {type(exc).__name__}: {exc}"
        )
        return InceptionWeights(None, "unavailable", reason)
    return InceptionWeights(cached, "downloaded")


def _download(url: str, path: Path, timeout: float) -> None:
    """``url`` to ``path`` with torch hub's downloader (temporary file, then rename), checking the
    sha256 prefix that torch-fidelity's file name carries (``...-<sha256 prefix>.pth``)."""
    match = re.search(r"-([0-9a-f]{8,})\.\w+$", url)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)  # download_url_to_file takes no timeout of its own
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(
            url, str(path), hash_prefix=match.group(1) if match else None, progress=False
        )
    finally:
        socket.setdefaulttimeout(previous)


# --------------------------------------------------------------------------- registry and spaces


def register_extractors() -> None:
    """Register our extractors with torch-fidelity (idempotent, also after a module reload)."""
    for name, cls in ((CXR_EXTRACTOR, CXRDenseNetFeatures), (INCEPTION_EXTRACTOR, LocalInceptionV3)):
        known = FEATURE_EXTRACTORS_REGISTRY.get(name)
        if known is None:
            register_feature_extractor(name, cls)
        elif (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"torch-fidelity extractor {name!r} is already taken by {known!r}")
        else:
            FEATURE_EXTRACTORS_REGISTRY[name] = cls  # this module was reloaded


register_extractors()


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def weights_sha256(path: str | Path) -> str:
    """sha256 of a weights file (memoised per path, size and modification time)."""
    stat = Path(path).stat()
    return _file_sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@dataclass(frozen=True)
class FeatureSpace:
    """One feature space, ready to build its torch-fidelity extractor."""

    name: str  # "cxr" or "inception"
    extractor: str  # torch-fidelity registry name
    layer: str
    weights_path: Path
    weights_sha256: str
    resolution: int  # the network's input size
    extractor_kwargs: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the features (cache keys and metadata)."""
        return {
            "feature_space": self.name,
            "feature_extractor": self.extractor,
            "feature_layer": self.layer,
            "weights_sha256": self.weights_sha256,
            "feature_resolution": self.resolution,
        }

    def build(self, device: str | torch.device = "cpu") -> FeatureExtractorBase:
        """The torch-fidelity extractor, through torch-fidelity's own factory, on ``device``."""
        device = torch.device(device)
        try:
            with _cuda_device(device):
                return create_feature_extractor(
                    self.extractor,
                    [self.layer],
                    cuda=device.type == "cuda",
                    feature_extractor_weights_path=str(self.weights_path),
                    verbose=False,
                    **self.extractor_kwargs,
                )
        except Exception as exc:
            raise RuntimeError(
                f"could not load the {self.name} feature extractor from {self.weights_path}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc


@dataclass(frozen=True)
class Unavailable:
    """A feature space that cannot be used here, and why."""

    name: str
    reason: str


def get_feature_space(
    name: str, settings: EvaluationSettings, cxr_weights: str | Path | None = None
) -> FeatureSpace | Unavailable:
    """The ``"cxr"`` space (``cxr_weights``: the trained DenseNet-121, safetensors) or the
    ``"inception"`` space (weights from :func:`resolve_inception_weights`; may be :class:`Unavailable`)."""
    if name == "cxr":
        if cxr_weights is None:
            raise ValueError(
                "the cxr feature space needs cxr_weights (the trained DenseNet-121, safetensors)"
            )
        if not Path(cxr_weights).is_file():
            raise FileNotFoundError(
                f"chest-X-ray feature extractor weights not found at {cxr_weights}: "
                "materialize cxr_feature_extractor first"
            )
        return FeatureSpace(
            name="cxr",
            extractor=CXR_EXTRACTOR,
            layer=CXR_LAYER,
            weights_path=Path(cxr_weights),
            weights_sha256=weights_sha256(cxr_weights),
            resolution=settings.feature_resolution,
            extractor_kwargs={"cxr_feature_resolution": settings.feature_resolution},
        )
    if name == "inception":
        found = resolve_inception_weights(settings)
        if found.path is None:
            return Unavailable("inception", found.reason or "Inception weights unavailable")
        return FeatureSpace(
            name="inception",
            extractor=INCEPTION_EXTRACTOR,
            layer=INCEPTION_LAYER,
            weights_path=found.path,
            weights_sha256=weights_sha256(found.path),
            resolution=FeatureExtractorInceptionV3.INPUT_IMAGE_SIZE,
        )
    raise ValueError(f"unknown feature space {name!r}; use 'cxr' or 'inception'")


def build_cxr_extractor(
    model: nn.Module, feature_resolution: int, device: str | torch.device = "cpu"
) -> FeatureExtractorBase:
    """The chest-X-ray extractor around an in-memory DenseNet-121 (copied), through torch-fidelity."""
    device = torch.device(device)
    with _cuda_device(device):
        return create_feature_extractor(
            CXR_EXTRACTOR,
            [CXR_LAYER],
            cuda=device.type == "cuda",
            verbose=False,
            cxr_model=model,
            cxr_feature_resolution=feature_resolution,
        )


def extract_features(
    images: np.ndarray,
    extractor: FeatureExtractorBase,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Features ``[N, D]`` (float32) of uint8 images ``[N, H, W]``, with torch-fidelity's batching loop.

    The extractor must already sit on ``device`` (``FeatureSpace.build`` puts it there).
    """
    if len(images) == 0:
        raise ValueError("no images to extract features from")
    device = torch.device(device)
    with _cuda_device(device):
        out = get_featuresdict_from_dataset(
            GrayImageDataset(images),
            extractor,
            batch_size,
            device.type == "cuda",
            True,  # save_cpu_ram: no DataLoader worker processes for arrays already in memory
            False,  # verbose
        )
    return out[extractor.features_list[0]].numpy().astype(np.float32, copy=False)


def _cuda_device(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """torch-fidelity moves things with ``.cuda()``: select the right GPU for that."""
    if device.type == "cuda" and device.index is not None:
        return torch.cuda.device(device.index)
    return contextlib.nullcontext()
