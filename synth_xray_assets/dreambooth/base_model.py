"""The model DreamBooth starts from: Stable Diffusion 2.1 base from the Hub (full profile) or a
local diffusers folder (for example the tiny model of the demo); ``diffusion.pipelines`` loads it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from synth_xray_assets.dataset.splits import shared_validation_split
from synth_xray_assets.dataset.store import StandardizedDataset
from synth_xray_assets.settings import BaseModelSettings, Settings
from synth_xray_assets.storage import write_json_atomic

# Only the diffusers layout (configs, tokenizer files, safetensors weights in component folders):
# not the single-file checkpoints at the top of SD repositories, nor fp16 / EMA variants.
ALLOW_PATTERNS = ["model_index.json", "*/*.json", "*/*.txt", "*/*.safetensors"]
IGNORE_PATTERNS = ["*.fp16.*", "*.ema.*", "*.non_ema.*", "*/*.ckpt", "*/*.bin"]
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder")


def pretraining_images(s: Settings, dataset: StandardizedDataset) -> np.ndarray:
    """The tiny base model's pre-training images: real train less the shared validation split (no
    generator sees what classifiers are validated on), every class repeated up to the largest one's
    count, so that the stand-in for SD 2.1 (which has seen few X-rays of either class) favours neither."""
    rows = dataset.rows("train")
    labels = rows["label"].to_numpy(np.int64)
    keep = shared_validation_split(s, rows).keep
    per_class = [keep[labels[keep] == label] for label in np.unique(labels[keep])]
    count = max(len(positions) for positions in per_class)
    rng = np.random.default_rng(s.base_model.seed)
    chosen = np.concatenate([np.resize(rng.permutation(p), count) for p in per_class])
    return dataset.images("train")[np.sort(chosen)]


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", ".", "~")) or Path(spec).expanduser().exists()


def fetch_base_model(
    settings: BaseModelSettings,
    cache_dir: Path,
    token: str | None,
    log: Callable[[str], None] = print,
) -> Path:
    """The folder of the base model, downloading ``pretrained_model``@``revision`` once into ``cache_dir``.

    A local folder given as ``pretrained_model`` is used as is. The token goes to the Hub only.
    """
    spec = settings.pretrained_model
    if _looks_like_path(spec):
        folder = Path(spec).expanduser().resolve()
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(
                f"base model folder {folder} (settings base_model.pretrained_model) has no model_index.json"
            )
        return folder

    cache_dir = Path(cache_dir)
    marker = cache_dir / f"{spec.replace('/', '--')}@{settings.revision}.json"
    if marker.is_file():
        folder = Path(json.loads(marker.read_text())["path"])
        if (folder / "model_index.json").is_file():
            return folder

    from huggingface_hub import snapshot_download

    log(f"downloading base model {spec}@{settings.revision} into {cache_dir}")
    try:
        folder = Path(
            snapshot_download(
                repo_id=spec,
                revision=settings.revision,
                cache_dir=str(cache_dir),
                token=token,
                allow_patterns=ALLOW_PATTERNS,
                ignore_patterns=IGNORE_PATTERNS,
            )
        )
    except Exception as exc:
        message = str(exc)
        if token:
            message = message.replace(token, "***")
        raise RuntimeError(
            f"could not download base model {spec}@{settings.revision} from the Hugging Face Hub "
            f"({type(exc).__name__}: {message}). Check the id and revision, the network, and that "
            f"the token (if the model is gated) is set in the environment."
        ) from None
    missing = [c for c in WEIGHT_COMPONENTS if not any((folder / c).glob("*.safetensors"))]
    if not (folder / "model_index.json").is_file() or missing:
        raise RuntimeError(
            f"base model {spec}@{settings.revision} is not a diffusers Stable Diffusion repository with "
            f"safetensors weights (downloaded to {folder}; "
            f"missing weights for {missing or 'model_index.json'})"
        )
    write_json_atomic(marker, {"repo_id": spec, "revision": settings.revision, "path": str(folder)})
    return folder
