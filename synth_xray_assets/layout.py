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
    evaluation/base_model_images/{class}/  the base model's images at the generation sampler
    evaluation/class_fidelity/{generator}.json  share of a generator's images called its class
    classifier/cache/                      the classifier's resized image arrays
    classifier/{experiment}/seed-{seed}/   one classifier run
    reports/                               report.md, results.csv, figures, runs.json
    locks/{asset}[@{partition}].lock       one writer per asset partition (operations/locks.py)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    """The data root's folders and files (``root``: the settings' ``data_dir``)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # ------------------------------------------------------------------ dataset
    @property
    def demo_phantoms(self) -> Path:
        return self.root / "sources" / "demo-phantoms"

    @property
    def dataset(self) -> Path:
        return self.root / "dataset"

    # ------------------------------------------------------------------ models
    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def hub_cache(self) -> Path:
        return self.models / "hub"

    @property
    def tiny_base_model(self) -> Path:
        return self.models / "base"

    @property
    def base_model_record(self) -> Path:
        return self.models / "base_model.json"

    def dreambooth_checkpoint(self, class_key: str) -> Path:
        return self.models / "dreambooth" / class_key

    def dreambooth_work(self, class_key: str) -> Path:
        return self.models / "dreambooth" / f".work-{class_key}"

    # ------------------------------------------------------------------ generated images
    @property
    def prior(self) -> Path:
        return self.root / "prior"

    def synthetic(self, class_key: str) -> Path:
        return self.root / "synthetic" / class_key

    # ------------------------------------------------------------------ evaluation
    @property
    def cxr_feature_extractor(self) -> Path:
        return self.root / "evaluation" / "cxr_feature_extractor"

    @property
    def reference_features(self) -> Path:
        return self.root / "evaluation" / "reference_features"

    def fid_scores(self, class_key: str) -> Path:
        return self.root / "evaluation" / "fid" / f"{class_key}.json"

    def memorization(self, class_key: str) -> Path:
        return self.root / "evaluation" / "memorization" / f"{class_key}.parquet"

    def base_model_images(self, class_key: str) -> Path:
        """The base model's images of a class's prompt at the generation sampler (an image set)."""
        return self.root / "evaluation" / "base_model_images" / class_key

    def class_fidelity(self, generator: str) -> Path:
        return self.root / "evaluation" / "class_fidelity" / f"{generator}.json"

    # ------------------------------------------------------------------ classifier, reports
    @property
    def classifier_runs(self) -> Path:
        return self.root / "classifier"

    @property
    def classifier_cache(self) -> Path:
        return self.classifier_runs / "cache"

    def classifier_run(self, experiment: str, seed: int | str) -> Path:
        return self.classifier_runs / experiment / f"seed-{seed}"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    # ------------------------------------------------------------------ operations
    def output_lock(self, asset: str, partition: str | None = None) -> Path:
        """The lock file of one asset partition's writer (file-name-safe)."""
        name = asset + (f"@{partition}" if partition else "")
        return self.root / "locks" / (re.sub(r"[^A-Za-z0-9_.@-]", "_", name) + ".lock")
