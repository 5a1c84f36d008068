"""What the evaluation assets read: the real reference sets, the generated image sets (the
synthetic images and the base model's images of each class, ``base_model_images``), and the
feature extractor as a predictor."""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from synth_xray_assets.dataset.phantoms import held_out_phantoms
from synth_xray_assets.dataset.splits import ValidationSplit, generator_positions
from synth_xray_assets.dataset.store import StandardizedDataset
from synth_xray_assets.evaluation.extractor import extractor_weights
from synth_xray_assets.partitions import class_key_of, class_label
from synth_xray_assets.settings import Settings
from synth_xray_assets.synthesis.store import MANIFEST, SyntheticImages, synthetic_dir


def open_dataset(s: Settings) -> StandardizedDataset:
    """The standardized dataset the settings point at."""
    return StandardizedDataset.open(s.layout.dataset)


def class_reference(s: Settings, class_key: str) -> tuple[StandardizedDataset, np.ndarray, pd.DataFrame, str]:
    """The real standardized training images of the class, their manifest rows, and the cache key."""
    ds = open_dataset(s)
    label = class_label(class_key)
    rows = ds.rows("train")
    rows = rows[rows.label == label].reset_index(drop=True)
    images = ds.images("train", label)
    if len(images) == 0:
        raise ValueError(f"chest_xray_dataset has no {class_key} training images to compare with")
    return ds, images, rows, f"{ds.version}-train-{class_key}"


@dataclass(frozen=True)
class FidReferences:
    """One generator's reference sets: its own training images, held-out real images of its class
    (never seen by any generator), and a real set disjoint from the held-out one for the floor."""

    train: np.ndarray
    train_note: str
    held_out: np.ndarray
    held_out_note: str
    floor_pool: np.ndarray
    cache_key: str


def fid_references(s: Settings, ds: StandardizedDataset, key: str) -> FidReferences:
    """Generator ``key``'s FID reference sets (see :class:`FidReferences`)."""
    rows = ds.rows("train")
    positions, split = generator_positions(s, rows, key)
    label, name = class_label(key), s.dataset.class_names[class_label(key)]
    train_all = ds.images("train")
    same_class = split.keep[rows.label.to_numpy()[split.keep] == label]
    held_out, held_note = held_out_reference(s, ds, label, split)
    train_note = (
        f"generator {key}'s own {len(positions)} {name} training images "
        f"(dataset version {ds.version}, {s.dataset.resolution} px, {s.dataset.mode})"
    )
    return FidReferences(
        train=train_all[positions],
        train_note=train_note,
        held_out=held_out,
        held_out_note=held_note,
        floor_pool=train_all[same_class],
        cache_key=f"{ds.version}-{key}-{split.unit}-{s.classifier.split_seed}",
    )


def held_out_reference(
    s: Settings, ds: StandardizedDataset, label: int, split: ValidationSplit
) -> tuple[np.ndarray, str]:
    """Real-distribution images of class ``label`` that no generator sees, and what they are: the
    held-out phantoms made for the reference (the project's phantoms, ``phantoms.held_out_counts``),
    else the classifiers' validation split carved from real train, else (nothing carved, the
    study's protocol) the dataset's own validation split."""
    name = s.dataset.class_names[label]
    n_phantoms = s.phantoms.held_out_counts[label]
    if (ds.origin or {}).get("phantoms") and n_phantoms:
        return held_out_phantoms(s.phantoms, s.dataset, label), (
            f"{n_phantoms} held-out {name} phantoms made for the reference alone (phantoms.held_out_counts; "
            "their own seed stream, in no split: seen by no generator and no classifier), standardized "
            f"like the dataset ({s.dataset.resolution} px, {s.dataset.mode})"
        )
    held = split.val[ds.rows("train").label.to_numpy()[split.val] == label]
    if len(held):
        return ds.images("train")[held], (
            f"the {len(held)} {name} images of the classifiers' validation split of real train "
            f"({split.describe()}), never seen by a generator"
        )
    images = ds.images("validation", label)
    return images, f"the {len(images)} {name} images of the dataset's own validation split (nothing carved)"


def image_set(asset: str, root: Path, read: Callable[[], np.ndarray]) -> tuple[np.ndarray, SyntheticImages]:
    """A generated image set (``SyntheticImages`` layout); clear errors name the asset that makes it."""
    if not (root / MANIFEST).is_file():
        raise FileNotFoundError(f"no {asset} at {root} (no {MANIFEST}): materialize {asset} first")
    try:
        opened, images = SyntheticImages.open(root), read()
    except Exception as exc:
        raise RuntimeError(f"could not read {asset} at {root}: {type(exc).__name__}: {exc}") from exc
    if len(images) == 0:
        raise ValueError(f"{asset} at {root} holds no images: materialize {asset} again")
    return images, opened


def synthetic_set(s: Settings, class_key: str) -> tuple[np.ndarray, SyntheticImages]:
    """Generator ``class_key``'s synthetic images and their set."""
    root = synthetic_dir(s.data_dir, class_key)
    return image_set(f"synthetic_images[{class_key}]", root, lambda: SyntheticImages.open(root).images())


def base_model_set(s: Settings, key: str) -> tuple[np.ndarray, SyntheticImages]:
    """The base model's images of generator ``key``'s class (made by ``base_model_images``, per class)."""
    class_key = class_key_of(key)
    root = s.layout.base_model_images(class_key)
    return image_set(f"base_model_images[{class_key}]", root, lambda: SyntheticImages.open(root).images())


def real_test_images(s: Settings, label: int) -> np.ndarray:
    """The real test images of class ``label``: where the extractor's recall is read beside class fidelity."""
    return open_dataset(s).images("test", label)


def checkpoint_versions(manifest: pd.DataFrame) -> str:
    """The checkpoint versions a generated set's manifest names, joined."""
    return ", ".join(sorted(map(str, manifest["checkpoint_version"].unique())))


def reference_note(s: Settings, ds: StandardizedDataset, class_key: str, n: int) -> str:
    """What the real reference set of ``class_key`` is, in words."""
    return (
        f"all {n} {s.dataset.class_names[class_label(class_key)]} images of the chest_xray_dataset train "
        f"split (standardized to {s.dataset.resolution} px, {s.dataset.mode}), dataset version {ds.version}"
    )


def extractor_predictor(s: Settings, device: str) -> Callable[[np.ndarray], np.ndarray]:
    """Images (uint8 ``[N, H, W]``) to the chest-X-ray feature extractor's PNEUMONIA probabilities."""
    from synth_xray_assets.classifier.data import prepare_images
    from synth_xray_assets.classifier.model import load_classifier
    from synth_xray_assets.classifier.train import predict_proba
    from synth_xray_assets.evaluation.extractor import extractor_settings

    c = extractor_settings(s.classifier, s.evaluation)
    model = load_classifier(extractor_weights(s.data_dir), c, device)

    def predict(images: np.ndarray) -> np.ndarray:
        x = prepare_images(np.ascontiguousarray(images), c.resize, c.resolution)
        return predict_proba(model, x, None, s.evaluation.batch_size, device)[0]

    return predict
