"""Every number of the study, once, in one typed settings object.

The defaults of each section are the study's values (``../shared/STUDY.md``): they make
the **full** profile. The **demo** profile (the default) overrides sizes only, plus the
few learning rates a tiny model trained for a few dozen steps needs, so that the same
code runs end to end offline on a 2-core CPU.

Profiles are typed objects: ``Settings`` is the full profile, ``DemoSettings`` the demo one
(each demo section subclasses its full section and changes defaults only). Any setting can be
overridden from the environment, read by pydantic-settings in ``load_settings`` only (called by
``definitions.py``, the one entry point): ``SYNTH_XRAY_PROFILE`` picks the profile,
``SYNTH_XRAY_DATA`` the data root, and ``SYNTH_XRAY_<SECTION>__<FIELD>`` any field, e.g.
``SYNTH_XRAY_DREAMBOOTH__METHOD=lora`` or ``SYNTH_XRAY_CLASSIFIER__SEEDS='[0,1]'`` (JSON for
lists and dicts; a dict given this way replaces the profile's whole dict). Nothing is ignored: an
unknown field is refused by pydantic, and any other ``SYNTH_XRAY_*`` variable that is neither a
setting nor on ``NOT_SETTINGS`` (the prefix's variables read elsewhere) stops loading with a message
naming it and the nearest valid name.

Plain pydantic: nothing here knows Dagster. The Dagster resource that hands these to
assets lives in ``resources.py``.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from synth_xray_assets.layout import Layout

ENV_PREFIX = "SYNTH_XRAY_"  # SYNTH_XRAY_PROFILE, SYNTH_XRAY_DATA, SYNTH_XRAY_<SECTION>__<FIELD>
PROFILES = ("demo", "full")
CLASS_NAMES = ("NORMAL", "PNEUMONIA")
# Partition keys of the per-class assets, in label order (0 = NORMAL, 1 = PNEUMONIA).
CLASS_KEYS = ("normal", "pneumonia")
REPO_ROOT = Path(__file__).resolve().parent.parent


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DatasetSettings(_Section):
    """Where the real images come from and how they are standardized."""

    # A Hub id, a local folder in the Hub's parquet layout, an image folder
    # ``{split}/{NORMAL,PNEUMONIA}/*``, or ``"demo"`` for the project's own phantoms.
    source: str = "hf-vision/chest-xray-pneumonia"
    revision: str | None = None
    splits: tuple[str, ...] = ("train", "validation", "test")
    class_names: tuple[str, ...] = CLASS_NAMES
    resolution: int = 512  # shorter side resized (aspect kept), then center crop
    mode: Literal["L", "RGB"] = "L"  # one consistent mode for every stored image
    max_image_pixels: int = 178_956_970  # PIL's decompression-bomb limit (2x its warning)
    workers: int = 2  # processes for standardization
    observe_cron: str = "0 4 * * *"  # when the source's version is observed (daily)
    # Keep an image found (same bytes) in several splits in one only: test first, then validation,
    # train last (never dropped from test); the rest are listed in dropped.csv. Off: the blocking
    # no_duplicates_across_splits check stops the pipeline and names the files instead.
    drop_cross_split_duplicates: bool = False
    # The blocking check stored_images_match_their_sources re-standardizes this many rows (every
    # row of a smaller dataset), drawn with verify_seed, and requires identical pixels.
    verify_sample: int = 48
    verify_seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "drop_train_test_duplicates" in data:
            raise ValueError(
                "dataset.drop_train_test_duplicates was renamed drop_cross_split_duplicates (it now "
                "covers every pair of splits and never drops from test): set that instead"
            )
        return data


class PhantomSettings(_Section):
    """The demo dataset: synthetic chest radiograph phantoms (not real patients)."""

    # images per split as (NORMAL, PNEUMONIA); full sizes mirror the Hub dataset.
    split_counts: dict[str, tuple[int, int]] = {
        "train": (1341, 3875),
        "validation": (8, 8),
        "test": (234, 390),
    }
    min_side: int = 96
    max_side: int = 192
    seed: int = 2026
    # Held-out reference phantoms per class (NORMAL, PNEUMONIA): made apart from every split, seen by
    # no generator and no classifier, read only by the FID / KID references. (0, 0): none, and the
    # references use the classifiers' carved validation split, as for real sources.
    held_out_counts: tuple[int, int] = (0, 0)


class BaseModelSettings(_Section):
    """The model DreamBooth starts from: SD 2.1 base (full) or a tiny one built from config (demo)."""

    pretrained_model: str = "Manojb/stable-diffusion-2-1-base"
    revision: str = "main"
    tiny: bool = False
    # Tiny model (demo only): architecture sizes and its brief pre-training on the demo images.
    tiny_vae_channels: tuple[int, ...] = (32, 64, 64)
    tiny_unet_channels: tuple[int, ...] = (64, 128)
    tiny_text_width: int = 64
    tiny_text_layers: int = 2
    tiny_layers_per_block: int = 1  # resnet layers per UNet / VAE level (SD 2.1 has 2)
    tiny_vae_steps: int = 300
    tiny_vae_batch_size: int = 8
    tiny_vae_learning_rate: float = 2e-3
    tiny_unet_steps: int = 1500
    tiny_batch_size: int = 16  # the UNet's
    tiny_learning_rate: float = 1e-3  # the UNet's
    tiny_prompt: str = "a chest xray image"
    tiny_uncond_probability: float = 0.1  # prompt dropped to "" so guidance has an unconditional branch
    seed: int = 42


class DreamBoothSettings(_Section):
    """Per-class DreamBooth fine-tuning, as the study ran it."""

    method: Literal["full", "lora"] = "full"
    class_prompt: str = "a chest xray image"
    instance_prompts: dict[str, str] = {
        "normal": "A chest xray of healthy normal lungs, clear lung fields",
        "pneumonia": "A chest xray showing pneumonia infection, lung opacity",
    }
    with_prior_preservation: bool = True
    prior_loss_weight: float = 0.5
    num_class_images: int = 200
    class_image_steps: int = 30
    class_image_guidance: float = 7.5
    class_image_batch_size: int = 8
    resolution: int = 512
    train_batch_size: int = 8
    gradient_accumulation_steps: int = 2
    learning_rate: float = 1e-6
    lora_learning_rate: float = 1e-4
    lora_rank: int = 8
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 100
    num_train_epochs: int = 8
    max_train_steps: int | None = None  # None: derived from epochs (672 NORMAL, 1944 PNEUMONIA)
    train_text_encoder: bool = True
    # The one precision setting (ComputeResource has none): used on CUDA only; CPU runs fp32.
    mixed_precision: Literal["no", "fp16", "bf16"] = "fp16"
    seed: int = 42
    checkpointing_steps: int = 500
    checkpoints_total_limit: int = 2
    max_grad_norm: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    keep_checkpoints: bool = False  # keep work_dir/checkpoint-* after the final model is saved
    # The disk preflight (training.estimate_disk_bytes) counts weights and Adam's moments by their
    # sizes, the base model's configs and tokenizer files, and these allowances: per tensor written
    # (a safetensors header entry; torch.save's records of a weight's step and two moments: about
    # 0.9 KB measured), per checkpoint (accelerate's RNG and scheduler files: 16 KB measured). The
    # sum is then raised by disk_margin (a fraction) for what it does not know: the loss history,
    # file-system blocks, library changes.
    disk_bytes_per_tensor: int = 1024
    disk_bytes_per_checkpoint: int = 64 * 1024
    disk_margin: float = 0.05
    # GPU memory presets (issue 11; dreambooth/presets.py): "auto" picks by free GPU memory on CUDA
    # (study >= 50 GiB: the 80 GB cards; memory-saving = gradient checkpointing + 8-bit Adam, 24-40 GB
    # cards; lora below), "none" keeps these settings, or name one. Minimums are estimates.
    memory_preset: Literal["auto", "none", "study", "memory-saving", "lora"] = "auto"
    preset_min_free_gib: dict[str, float] = {"study": 50.0, "memory-saving": 20.0, "lora": 8.0}
    sample_images: int = 8  # for the UI grid
    sample_steps: int = 25
    # Which generators exist (issue 10). "study": one per class, fine-tuned on real train minus the
    # classifiers' validation split. "matched": also one per class and limited real fraction of
    # classifier.experiments (0 < fraction < 1), fine-tuned on exactly that fixed real subset, whose
    # images feed that fraction's experiments (partition keys "normal-r10", "pneumonia-r25", ...).
    generators: Literal["study", "matched"] = "study"


class GenerationSettings(_Section):
    """Synthetic images from each class's checkpoint."""

    images_per_class: int = 1200
    # The synthetic counts (images_per_class here, and the experiments' in classifier.experiments)
    # are the study's, beside its 5,216 real training images: each is scaled by the dataset's real
    # training images / study_train_size (rounded up), so that the mixes keep the study's
    # proportions on any source (Synth-100: 2400 synthetic to 5216 real). None: counts as written.
    study_train_size: int | None = 5216
    num_inference_steps: int = 50
    guidance_scale: float = 4.0
    batch_size: int = 8
    seed_offset: int = 0  # image i of set "name" uses seed seed_offset + crc32(name) * seed_stream_stride + i
    seed_stream_stride: int = 2**20  # each set (normal, pneumonia, prior, ...) its own seed stream
    # GPU memory per image at 512 px in fp16, scaled by area (estimates from SD 2.1's architecture):
    # the batch is cut to what the free memory holds; the VAE decodes one image at a time when
    # the whole batch would not fit (VAE slicing). Used for prior images too.
    generation_weights_gib: float = 3.0
    gib_per_image_512: float = 0.5  # UNet with classifier-free guidance (2 latents per image)
    vae_decode_gib_per_image_512: float = 1.5


class EvaluationSettings(_Section):
    """FID / KID / precision-recall in two feature spaces, and the memorization check."""

    # The study's Inception FID per class (reference set and implementation unstated), for comparison.
    published_fid: dict[str, float] = {"normal": 61.88, "pneumonia": 64.08}
    # Inception (torch-fidelity's inception-v3-compat): a local file of its weights
    # (pt_inception-2015-12-05), else torch hub's cache, else one download, else "unavailable".
    inception_weights: str | None = None
    inception_download: bool = True
    inception_url: str = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
    inception_download_timeout_s: float = 30.0
    # The chest-X-ray space: the classifier's recipe (classifier.*) trained on the real training
    # split at this input size (no crop) for this many epochs, the epoch chosen on the validation split.
    feature_resolution: int = 224
    feature_epochs: int = 20
    feature_seed: int = 0
    batch_size: int = 64  # feature extraction
    kid_subsets: int = 100  # torch-fidelity's default
    kid_subset_size: int = 1000
    # KID leads: fine-tuned images moved toward real (or away) only when their KID and the base
    # model's differ by more than this many KID spreads (std over subsets) summed: mean ± std apart.
    kid_verdict_spreads: float = 1.0
    # FID's bias falls as 1/n and its covariances are rank-deficient below the feature dimension:
    # an FID whose image set or reference holds fewer images than this, per feature space, is shown
    # marked biased and decides nothing (pytorch-fid's advice: at least 2048 for Inception's pool3).
    fid_min_images: dict[str, int] = {"cxr": 1024, "inception": 2048}
    prc_neighborhood: int = 3
    metrics_seed: int = 2020  # KID subset sampling (torch-fidelity's default seed)
    memorization_cosine_threshold: float = 0.02  # cosine distance below this: near-copy
    memorization_pixel_threshold: float = 0.95  # pixel correlation above this: near-copy
    memorization_pixel_size: int = 64  # images compared pixel by pixel at this size (keeps N x M cheap)
    # Compare features minus the real images' mean feature, and pixels minus their mean image:
    # radiographs share their anatomy, so raw pixel correlation between different real patients
    # (nearest neighbours, 64 px) is 0.90-0.96, and raw cosine of ReLU features within ~0.002.
    memorization_centered: bool = True
    memorization_pairs_shown: int = 8  # closest pairs in the side-by-side picture
    # Issue 10: FID also against held-out real images (the classifiers' validation split, never seen
    # by a generator), with the real-vs-real floor: two disjoint real sets of the reference's size.
    floor_seed: int = 7
    # Class fidelity: share of a class's synthetic images the real-trained feature extractor assigns
    # to that class; the check warns below this share.
    class_fidelity_threshold: float = 0.8
    class_fidelity_level: float = 0.95  # Wilson score interval of the share


class ClassifierSettings(_Section):
    """DenseNet-121 pneumonia classifiers on seven mixes of real and synthetic data."""

    resolution: int = 224
    resize: int = 256
    # Images per optimizer step: the article says 512, the author's notebook used 256. 512 at
    # 224 px in fp32 needs about 64 GiB of activations; 256 with mixed precision fits 24 GB cards.
    batch_size: int = 256
    epochs: int = 20
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    hidden_units: int = 512
    dropout: float = 0.5
    hflip: bool = True
    rotation_degrees: float = 10.0
    brightness: float = 0.1
    contrast: float = 0.1
    pretrained: Literal["imagenet", "none"] = "imagenet"
    weights_file: str | None = None  # local ImageNet DenseNet-121 weights, if any
    val_fraction: float = 0.1  # stratified, carved from real train, same for every experiment
    split_seed: int = 42  # the one validation split shared by every experiment and seed
    selection: Literal["validation", "test"] = "validation"  # "test" = the study's own protocol
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    num_workers: int | None = None  # augmentation processes on the CPU path; None: the cores left free
    # GPU (issue 11): autocast "auto" = bf16 where the card supports it, else fp16 + GradScaler;
    # "no" = fp32. The CPU always runs fp32. channels_last speeds up convolutions on tensor cores.
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = "auto"
    channels_last: bool = True
    gpu_augmentation: bool = True  # augment on the GPU when training on one (no CPU workers)
    bootstrap_samples: int = 2000
    # experiment -> (fraction of real train, number of synthetic images, class-balanced)
    experiments: dict[str, tuple[float, int]] = {
        "baseline": (1.0, 0),
        "synth-25": (1.0, 600),
        "synth-50": (1.0, 1200),
        "synth-100": (1.0, 2400),
        "limited-10": (0.1, 2400),
        "limited-25": (0.25, 2400),
        "synth-only": (0.0, 2400),
    }
    # Issue 10: real-only balance controls: control -> the mix whose class shares it copies, on the
    # baseline's real images, by oversampling (seeded duplicates of the under-represented class).
    balance_controls: dict[str, str] = {
        "balance-synth-25": "synth-25",
        "balance-synth-50": "synth-50",
        "balance-synth-100": "synth-100",
    }
    hierarchical_bootstrap: bool = True  # resample seeds, then test images (one seed: images only)
    ci_level: float = 0.95

    def all_experiments(self) -> list[str]:
        """The study's experiments, then the balance controls of those among them (the classifier
        partitions)."""
        controls = [c for c, mix in self.balance_controls.items() if mix in self.experiments]
        return list(self.experiments) + [c for c in controls if c not in self.experiments]


class AutomationSettings(_Section):
    """What re-runs by itself when the dataset source changes (declarative automation)."""

    # Asset groups in pipeline order; those up to ``eager_through`` re-materialize automatically
    # when an upstream version changes (AutomationCondition.eager), the rest only on request.
    # (group names are the domain folders' names).
    groups: tuple[str, ...] = ("dataset", "dreambooth", "synthesis", "evaluation", "classifier", "reports")
    eager_through: Literal[
        "none", "dataset", "dreambooth", "synthesis", "evaluation", "classifier", "reports"
    ] = "evaluation"
    # Whether the automation sensor and the source-observation schedule start switched on.
    running_by_default: bool = False
    sensor_interval_s: int = 60

    def eager_groups(self) -> tuple[str, ...]:
        if self.eager_through == "none":
            return ()
        return self.groups[: self.groups.index(self.eager_through) + 1]


# --- Deployment (issue 12): where the steps run. Fixed when the code loads, like the partitions. ---
class KubernetesSettings(_Section):
    """Step pods on Kubernetes (``deployment.executor = "k8s"``): GPU placement and the shared data."""

    gpu_resource: str = "nvidia.com/gpu"  # the device plugin's resource name
    gpus_per_step: int = 1
    gpu_node_selector: dict[str, str] = {"nvidia.com/gpu.present": "true"}  # NVIDIA GPU operator's label
    gpu_tolerations: tuple[dict[str, str], ...] = (
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
    )
    data_claim: str = "synth-xray-data"  # a ReadWriteMany PersistentVolumeClaim (POSIX: renames, folders)
    data_mount_path: str = "/data"  # where every run and step pod mounts it; SYNTH_XRAY_DATA points here
    namespace: str | None = None  # None: the run launcher's (the chart's release namespace)


class CelerySettings(_Section):
    """Steps as Celery tasks on bare GPU servers (``deployment.executor = "celery"``)."""

    broker_env: str = "SYNTH_XRAY_CELERY_BROKER"  # names the variable holding e.g. redis://host:6379/0
    backend_env: str = "SYNTH_XRAY_CELERY_BACKEND"  # result backend URL (same Redis is fine)
    gpu_queue: str = "gpu"  # one worker per card, concurrency 1
    cpu_queue: str = "cpu"


class DeploymentSettings(_Section):
    """Which executor runs the steps: one process per step here, Kubernetes Jobs, or Celery workers."""

    executor: Literal["multiprocess", "k8s", "celery"] = "multiprocess"
    kubernetes: KubernetesSettings = Field(default_factory=KubernetesSettings)
    celery: CelerySettings = Field(default_factory=CelerySettings)


class OperationsSettings(_Section):
    """Crash safety (issue 13): how long a second writer of one asset partition waits."""

    # A second run of the same asset partition waits this long for the first one's lock, then
    # fails naming it (the kernel frees the lock of a killed run).
    lock_wait_s: float = 120.0


# The study's published classifier results (fractions; ../shared/STUDY.md). "accuracy", "f1",
# "auc": the reported figures, best epoch selected on the test set; "last_*": the same run's
# last epoch. Synth-100 used 2400 synthetic images in the article (2160 in the notebook).
PUBLISHED_RESULTS: dict[str, dict[str, float]] = {
    "baseline": {"accuracy": 0.880, "f1": 0.912, "auc": 0.967, "last_accuracy": 0.832, "last_auc": 0.926},
    "synth-25": {"accuracy": 0.894, "f1": 0.922, "auc": 0.975, "last_accuracy": 0.846, "last_auc": 0.957},
    "synth-50": {"accuracy": 0.902, "f1": 0.927, "auc": 0.973, "last_accuracy": 0.854, "last_auc": 0.963},
    "synth-100": {"accuracy": 0.897, "f1": 0.924, "auc": 0.976, "last_accuracy": 0.856, "last_auc": 0.971},
    "limited-10": {"accuracy": 0.886, "f1": 0.915, "auc": 0.961, "last_accuracy": 0.848, "last_auc": 0.968},
    "limited-25": {"accuracy": 0.877, "f1": 0.910, "auc": 0.965, "last_accuracy": 0.835, "last_auc": 0.967},
    "synth-only": {"accuracy": 0.707, "f1": 0.809, "auc": 0.904, "last_accuracy": 0.646, "last_auc": 0.837},
}


class Settings(_Section):
    """The whole platform's settings: the full profile. ``Settings.for_profile`` builds one."""

    profile: Literal["demo", "full"] = "full"
    data_dir: Path = REPO_ROOT / "data"
    dataset: DatasetSettings = Field(default_factory=DatasetSettings)
    phantoms: PhantomSettings = Field(default_factory=PhantomSettings)
    base_model: BaseModelSettings = Field(default_factory=BaseModelSettings)
    dreambooth: DreamBoothSettings = Field(default_factory=DreamBoothSettings)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)
    classifier: ClassifierSettings = Field(default_factory=ClassifierSettings)
    automation: AutomationSettings = Field(default_factory=AutomationSettings)
    deployment: DeploymentSettings = Field(default_factory=DeploymentSettings)
    operations: OperationsSettings = Field(default_factory=OperationsSettings)

    @classmethod
    def for_profile(
        cls,
        profile: str = "demo",
        data_dir: str | Path | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> Settings:
        """The settings of ``profile`` with ``overrides`` per section on top
        (``{"dreambooth": {"method": "lora"}}``; a dict-valued field is replaced whole).
        Reads no environment: ``load_settings`` does that."""
        if profile not in PROFILE_CLASSES:
            raise ValueError(f"unknown profile {profile!r}; choose one of {PROFILES}")
        values: dict[str, Any] = {**(overrides or {}), "profile": profile}
        if data_dir:
            values["data_dir"] = Path(data_dir)
        return PROFILE_CLASSES[profile].model_validate(values)

    @property
    def layout(self) -> Layout:
        """Every folder and file under ``data_dir``."""
        return Layout(self.data_dir)

    def synthetic_count(self, count: int, n_real_train: int) -> int:
        """A synthetic-image count of the settings (``generation.images_per_class`` or an experiment's)
        for a dataset of ``n_real_train`` real training images: ``ceil(count * n_real_train /
        generation.study_train_size)``, or ``count`` itself when that is None."""
        reference = self.generation.study_train_size
        if reference is None:
            return count
        if reference <= 0 or n_real_train < 0:
            raise ValueError(f"cannot scale {count} synthetic images to {n_real_train} real / {reference}")
        return -(-count * n_real_train // reference)

    def section_json(self, name: str) -> dict[str, Any]:
        """One section as JSON-able data, for asset metadata."""
        return getattr(self, name).model_dump(mode="json")


# The demo profile: sizes only (and the learning rates that tiny, briefly trained models need).
class DemoDatasetSettings(DatasetSettings):
    source: str = "demo"
    resolution: int = 64


class DemoPhantomSettings(PhantomSettings):
    split_counts: dict[str, tuple[int, int]] = {"train": (64, 184), "validation": (8, 8), "test": (32, 48)}
    min_side: int = 80
    max_side: int = 160
    held_out_counts: tuple[int, int] = (120, 120)


class DemoBaseModelSettings(BaseModelSettings):
    tiny: bool = True
    # A factor-4 VAE (64 px -> 16x16 latents): SD's factor 8 left 8x8 latents that decoded to
    # blurred blobs; 300 L1 steps reconstruct the lung fields and opacities (README, demo).
    tiny_vae_channels: tuple[int, ...] = (16, 32, 32)
    tiny_unet_channels: tuple[int, ...] = (32, 64)
    tiny_vae_steps: int = 300
    # 400, not 800: the stand-in for SD 2.1 should know X-rays only roughly (its FD to real NORMAL
    # test 131 against 118), and DreamBooth then teaches the class (NORMAL fidelity 0.91 vs 0.81).
    tiny_unet_steps: int = 400


class DemoDreamBoothSettings(DreamBoothSettings):
    num_class_images: int = 16
    class_image_steps: int = 20
    resolution: int = 64
    train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 6e-4  # 3e-4: 35% of NORMAL samples read as NORMAL; 6e-4: 48% (README)
    # The prior images ("a chest xray image" from the base model, pre-trained on both classes alike)
    # pull NORMAL towards the base model's blotchy, opacity-like lungs: at 0.5 the extractor called
    # 46 of 58 NORMAL samples NORMAL (79%, its recall on real NORMAL test 94%); at 0.25, 51 (88%).
    prior_loss_weight: float = 0.25
    lora_learning_rate: float = 1e-3
    lr_warmup_steps: int = 5
    num_train_epochs: int = 12
    # The same steps for both classes: 12 epochs gave NORMAL 86 and PNEUMONIA 248, and PNEUMONIA's
    # images drifted past the class (FD +30% over the base model's); 120: -2%, NORMAL fidelity 0.97.
    max_train_steps: int | None = 120
    checkpointing_steps: int = 20
    sample_steps: int = 25


class DemoGenerationSettings(GenerationSettings):
    # images_per_class: the study's 1200, scaled to the demo's real train (study_train_size)
    num_inference_steps: int = 25
    batch_size: int = 16


class DemoEvaluationSettings(EvaluationSettings):
    batch_size: int = 32
    kid_subset_size: int = 16
    feature_resolution: int = 64
    # 6 epochs at batch 16 (the classifier's): the extractor separates the demo's test classes
    # (5 epochs at batch 32 called half the real NORMAL test images PNEUMONIA).
    feature_epochs: int = 6


class DemoClassifierSettings(ClassifierSettings):
    # 32 px is DenseNet-121's smallest input (1 x 1 after its last pooling) and what lets all
    # seven experiments train 5 epochs in about 2 minutes on 2 CPU cores.
    resolution: int = 32
    resize: int = 36
    batch_size: int = 16  # twice the steps of 32 for the same images: Synth-Only (115 images) learns
    epochs: int = 5
    pretrained: Literal["imagenet", "none"] = "none"
    seeds: tuple[int, ...] = (0,)
    bootstrap_samples: int = 500
    # experiments: the study's counts, scaled to the demo's real train by generation.study_train_size


class DemoSettings(Settings):
    """The demo profile: the same code offline on a 2-core CPU (phantoms, tiny models)."""

    profile: Literal["demo", "full"] = "demo"
    dataset: DemoDatasetSettings = Field(default_factory=DemoDatasetSettings)
    phantoms: DemoPhantomSettings = Field(default_factory=DemoPhantomSettings)
    base_model: DemoBaseModelSettings = Field(default_factory=DemoBaseModelSettings)
    dreambooth: DemoDreamBoothSettings = Field(default_factory=DemoDreamBoothSettings)
    generation: DemoGenerationSettings = Field(default_factory=DemoGenerationSettings)
    evaluation: DemoEvaluationSettings = Field(default_factory=DemoEvaluationSettings)
    classifier: DemoClassifierSettings = Field(default_factory=DemoClassifierSettings)


PROFILE_CLASSES: dict[str, type[Settings]] = {"demo": DemoSettings, "full": Settings}


class _Choice(BaseSettings):
    """The two top-level environment variables: ``SYNTH_XRAY_PROFILE`` and ``SYNTH_XRAY_DATA``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")
    profile: Literal["demo", "full"] = "demo"
    data: Path | None = None


# Variables that share the prefix but are not settings, each read by its own code. The Celery
# URLs' names are ``deployment.celery.*_env`` (their defaults here; others named there are allowed too).
NOT_SETTINGS = frozenset(
    {
        CelerySettings.model_fields["broker_env"].default,  # deployment.py: the Celery broker URL
        CelerySettings.model_fields["backend_env"].default,  # deployment.py: the Celery result backend
        "SYNTH_XRAY_FAULT_PLAN",  # operations/faults.py: the fault-injection plan file
        "SYNTH_XRAY_FAULT_KILLS",  # test_fault_injection.py: kills per stage
        "SYNTH_XRAY_CHROMIUM",  # test_ui_browser.py: the browser
        "SYNTH_XRAY_SCREENSHOTS",  # test_ui_browser.py: where screenshots go
    }
)
_TOP_LEVEL = ("PROFILE", "DATA")  # _Choice's; every Settings field is a top-level name too


def setting_names() -> list[str]:
    """Every name the prefix may take as a setting: the top-level ones, and ``<SECTION>__`` per section
    (the field after ``__`` is checked by pydantic)."""
    fields = Settings.model_fields
    sections = [
        n for n, f in fields.items() if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)
    ]
    top = [*_TOP_LEVEL, *(name.upper() for name in fields)]
    return [f"{ENV_PREFIX}{name}" for name in dict.fromkeys(top)] + [
        f"{ENV_PREFIX}{name.upper()}__" for name in sections
    ]


def refuse_unknown_variables(environ: Mapping[str, str], allowed: frozenset[str] = NOT_SETTINGS) -> None:
    """``ValueError`` naming every ``SYNTH_XRAY_*`` variable of ``environ`` that is neither a setting
    nor ``allowed``, each with the nearest valid name (pydantic-settings would ignore it)."""
    names = setting_names()
    top = {n for n in names if not n.endswith("__")}
    sections = [n for n in names if n.endswith("__")]
    problems = []
    for raw in sorted(environ):
        name = raw.upper()
        if not name.startswith(ENV_PREFIX) or name in top or name in allowed:
            continue
        if any(name.startswith(section) and len(name) > len(section) for section in sections):
            continue
        problems.append(f"{raw}: {_nearest(name, top | allowed, sections)}")
    if problems:
        raise ValueError(
            "unknown SYNTH_XRAY_* environment variables (neither settings nor on settings.NOT_SETTINGS): "
            + "; ".join(problems)
        )


def _nearest(name: str, top: set[str], sections: list[str]) -> str:
    """What is wrong with ``name`` and the nearest valid name (compared without the prefix)."""
    head, sep, rest = name.removeprefix(ENV_PREFIX).partition("__")
    if sep:  # an unknown section: the same field under the nearest section
        choices = {s.removeprefix(ENV_PREFIX): f"{s}{rest}" for s in sections}
        what = f"unknown section {head.lower()!r}"
    else:
        choices = {t.removeprefix(ENV_PREFIX): t for t in top}
        what = "unknown setting"
    near = difflib.get_close_matches(head + sep, list(choices), n=1)
    if near:
        return f"{what}; did you mean {choices[near[0]]}?"
    return f"{what}; valid names: {', '.join(sorted(choices.values()))}"


def load_settings() -> Settings:
    """The settings the environment asks for (see the module docstring); the one reader of it."""
    refuse_unknown_variables(os.environ, NOT_SETTINGS | _celery_env_names(os.environ))
    choice = _Choice()
    base = PROFILE_CLASSES[choice.profile]
    config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="ignore",
        frozen=True,
        env_parse_none_str="null",  # settings_environment writes None as JSON null
    )
    environment_class = type(
        f"{base.__name__}FromEnvironment", (BaseSettings, base), {"model_config": config}
    )
    values = environment_class(profile=choice.profile, **({"data_dir": choice.data} if choice.data else {}))
    return base.model_validate(values.model_dump())


def _celery_env_names(environ: Mapping[str, str]) -> frozenset[str]:
    """The Celery variables' names when ``deployment.celery.*_env`` is set to other names."""
    keys = {f"{ENV_PREFIX}DEPLOYMENT__CELERY__{field.upper()}" for field in ("broker_env", "backend_env")}
    return frozenset(v.upper() for k, v in environ.items() if k.upper() in keys)
