"""Every folder and file the platform writes under the data root, named once.

Nothing else joins paths onto the data root: code asks ``Layout`` (``settings.layout``) for
the folder it reads or writes. Inside its folder, each store module owns its own files
(``dataset/store.py``: ``arrays/``, ``manifest.parquet``; ``diffusion/image_sets.py``:
``images/``, ``manifest.parquet``; ...). The tree::

    sources/demo-phantoms/                 the demo's phantom radiographs (Hub parquet layout)
    dataset/                               standardized images, arrays, manifest, skipped.csv, dropped.csv
    models/hub/                            the Hub cache of the full profile's base model
    models/base/                           the demo's tiny base model (diffusers layout)
    models/base_model.json                 which folder base_model made, and its version
    models/dreambooth/{class}/             a fine-tuned pipeline (full) or LoRA weights (lora);
                                           {class} is a generator key (normal, normal-r10, ...)
    models/dreambooth/.work-{class}/       resumable training state (checkpoint-<step>/)
    prior/                                 prior-preservation class images (an image set)
    synthetic/{class}/                     synthetic images (an image set)
    evaluation/cxr_feature_extractor/      the chest-X-ray feature space's weights
    evaluation/reference_features/         cached real-image features per dataset version
    evaluation/fid/{class}.json            the scores of fid_scores
    evaluation/memorization/{class}.parquet  nearest real image of every synthetic one
    evaluation/base_model_images/{class}/  base_model_images: the base model's images, generation sampler
    evaluation/class_fidelity/{generator}.json  share of a generator's images called its class
    evaluation/class_fidelity/{generator}.parquet  the extractor's class score of each of them
    export/{generator}/                    the synthetic images as a Hub dataset (parquet + card)
    classifier/cache/                      the classifier's resized image arrays
    classifier/{experiment}/seed-{seed}/   one classifier run
    reports/                               report.md, results.csv, figures, runs.json
    locks/{asset}[@{partition}].lock       one writer per asset partition (operations/locks.py)
    locks/cards/{card}.lock                one GPU step per physical card (cards.py)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


def _folder(path: str) -> property:
    """A ``Layout`` property: ``path`` under the data root."""

    def get(self: Layout) -> Path:
        return self.root / path

    return property(get, doc=f"``{path}`` under the data root")


def _per_key(pattern: str) -> Callable[[Layout, str], Path]:
    """A ``Layout`` method: ``pattern`` with its ``{}`` filled by a key (a class, a generator) under
    the data root."""

    def at(self: Layout, key: str) -> Path:
        return self.root / pattern.format(key)

    at.__doc__ = f"``{pattern}`` under the data root"
    return at


@dataclass(frozen=True)
class Layout:
    """The data root's folders and files (``root``: the settings' ``data_dir``)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # dataset
    demo_phantoms = _folder("sources/demo-phantoms")
    dataset = _folder("dataset")
    # models
    models = _folder("models")
    hub_cache = _folder("models/hub")
    tiny_base_model = _folder("models/base")
    base_model_record = _folder("models/base_model.json")
    dreambooth_checkpoint = _per_key("models/dreambooth/{}")
    dreambooth_work = _per_key("models/dreambooth/.work-{}")
    # generated images
    prior = _folder("prior")
    synthetic = _per_key("synthetic/{}")
    # evaluation
    cxr_feature_extractor = _folder("evaluation/cxr_feature_extractor")
    reference_features = _folder("evaluation/reference_features")
    fid_scores = _per_key("evaluation/fid/{}.json")
    memorization = _per_key("evaluation/memorization/{}.parquet")
    # the base model's images of a class's prompt at the generation sampler (an image set)
    base_model_images = _per_key("evaluation/base_model_images/{}")
    class_fidelity = _per_key("evaluation/class_fidelity/{}.json")
    class_fidelity_images = _per_key("evaluation/class_fidelity/{}.parquet")
    # the synthetic images as a Hugging Face dataset (export/hub.py owns the files inside)
    hub_dataset = _per_key("export/{}")
    # classifier, reports
    classifier_runs = _folder("classifier")
    classifier_cache = _folder("classifier/cache")
    reports = _folder("reports")
    # one lock file per physical GPU card (cards.py)
    card_locks = _folder("locks/cards")

    def classifier_run(self, experiment: str, seed: int | str) -> Path:
        """One classifier run's folder."""
        return self.classifier_runs / experiment / f"seed-{seed}"

    def output_lock(self, asset: str, partition: str | None = None) -> Path:
        """The lock file of one asset partition's writer (file-name-safe)."""
        name = asset + (f"@{partition}" if partition else "")
        return self.root / "locks" / (re.sub(r"[^A-Za-z0-9_.@-]", "_", name) + ".lock")
