"""The one Dagster entry point, and the one place that reads the environment.

``build_defs(settings)`` makes everything from the settings object it is given: each domain's
assets (partitions, dependencies), the automation conditions and sensor, the schedules, jobs
and resources. ``defs`` is ``build_defs(load_settings())``: ``SYNTH_XRAY_PROFILE=demo``
(default) or ``full``, ``SYNTH_XRAY_DATA``, ``SYNTH_XRAY_<SECTION>__<FIELD>`` (see
``settings.py``), and the Hugging Face token from ``HF_TOKEN`` through ``dg.EnvVar``.
"""

import dagster as dg

from synth_xray_assets.automation import automation_sensor, with_automation
from synth_xray_assets.classifier import assets as classifier
from synth_xray_assets.dataset import assets as dataset
from synth_xray_assets.deployment import executor_for
from synth_xray_assets.dreambooth import assets as dreambooth
from synth_xray_assets.evaluation import assets as evaluation
from synth_xray_assets.export import assets as export
from synth_xray_assets.reports import assets as reports
from synth_xray_assets.resources import ComputeResource, SettingsResource
from synth_xray_assets.settings import Settings, load_settings
from synth_xray_assets.synthesis import assets as synthesis

DOMAINS = [dataset, dreambooth, synthesis, evaluation, export, classifier, reports]

# One job per partitioning, in the order the demo (and a full run) materializes them.
prepare_job = dg.define_asset_job(
    "prepare_job",
    selection=dg.AssetSelection.assets(
        "chest_xray_dataset", "base_model", "prior_class_images", "cxr_feature_extractor"
    ),
    description="The unpartitioned upstream assets: dataset, base model, prior images, feature extractor.",
)
base_model_images_job = dg.define_asset_job(
    "base_model_images_job",
    selection=dg.AssetSelection.assets("base_model_images"),
    description="Per class: the base model's FID reference images (they need only the base model, so they "
    "can run beside DreamBooth; per class, not per generator, so a job of their own).",
)
per_class_job = dg.define_asset_job(
    "per_class_job",
    selection=dg.AssetSelection.assets(
        "dreambooth_checkpoint",
        "synthetic_images",
        "fid_scores",
        "memorization",
        "class_fidelity",
        "synthetic_hub_dataset",
    ),
    description="Per generator: the DreamBooth checkpoint, its synthetic images, their scores, memorization "
    "and class fidelity, and the images as a Hugging Face dataset.",
)
classifier_job = dg.define_asset_job(
    "classifier_job",
    selection=dg.AssetSelection.assets("classifier_experiment"),
    description="One classifier per experiment x seed (the expensive grid; not automated).",
)
report_job = dg.define_asset_job(
    "report_job",
    selection=dg.AssetSelection.assets("study_report"),
    description="The study's table, statistics and plots from every finished classifier run.",
)
JOBS = [prepare_job, base_model_images_job, per_class_job, classifier_job, report_job]
PIPELINE_STAGES = [
    "observe_source_job",
    "prepare_job",
    "base_model_images_job",
    "per_class_job",
    "classifier_job",
    "report_job",
]


def build_defs(
    settings: Settings | SettingsResource,
    compute: ComputeResource | None = None,
    hf_token: str | dg.EnvVar | None = None,
) -> dg.Definitions:
    """Every definition, made from ``settings`` alone (reads no environment)."""
    resource = settings if isinstance(settings, SettingsResource) else SettingsResource.of(settings, hf_token)
    s = resource.get()
    domains = dg.Definitions.merge(*(d.build_defs(s) for d in DOMAINS))
    return dg.Definitions(
        assets=with_automation(domains.assets or [], s.automation),
        asset_checks=domains.asset_checks,
        schedules=domains.schedules,
        jobs=[*(domains.jobs or []), *JOBS],
        sensors=[automation_sensor(s.automation)],
        resources={"settings": resource, "compute": compute or ComputeResource()},
        executor=executor_for(s),  # settings deployment.executor: multiprocess, k8s or celery
    )


def _hf_token() -> dg.EnvVar | None:
    """``HF_TOKEN`` as a ``dg.EnvVar`` (resolved at run time, never logged), if it is set."""
    token = dg.EnvVar("HF_TOKEN")
    return token if token.get_value() else None


defs = build_defs(load_settings(), hf_token=_hf_token())
