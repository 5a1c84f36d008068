"""The one Dagster entry point: every domain's definitions, plus resources, jobs and automation.

Profile: ``SYNTH_XRAY_PROFILE=demo`` (default) or ``full``; see ``settings.py``. ``build_defs``
makes the same definitions with other resources (the tests use it with tiny settings).
"""

import dagster as dg

from synth_xray_assets.classifier import assets as classifier
from synth_xray_assets.dataset import assets as dataset
from synth_xray_assets.dreambooth import assets as dreambooth
from synth_xray_assets.evaluation import assets as evaluation
from synth_xray_assets.reports import assets as reports
from synth_xray_assets.resources import ComputeResource, SettingsResource
from synth_xray_assets.synthesis import assets as synthesis

DOMAINS = [dataset, dreambooth, synthesis, evaluation, classifier, reports]

# One job per partitioning, in the order the demo (and a full run) materializes them.
prepare_job = dg.define_asset_job(
    "prepare_job",
    selection=dg.AssetSelection.assets(
        "chest_xray_dataset", "base_model", "prior_class_images", "cxr_feature_extractor"
    ),
    description="The unpartitioned upstream assets: dataset, base model, prior images, feature extractor.",
)
per_class_job = dg.define_asset_job(
    "per_class_job",
    selection=dg.AssetSelection.assets(
        "dreambooth_checkpoint", "synthetic_images", "fid_scores", "memorization", "class_fidelity"
    ),
    description="Per generator: the DreamBooth checkpoint, its synthetic images, their scores, memorization "
    "and class fidelity.",
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
JOBS = [prepare_job, per_class_job, classifier_job, report_job]
PIPELINE_STAGES = ["observe_source_job", "prepare_job", "per_class_job", "classifier_job", "report_job"]


def build_defs(
    settings: SettingsResource | None = None, compute: ComputeResource | None = None
) -> dg.Definitions:
    settings = settings or SettingsResource.from_env()
    s = settings.get()
    merged = dg.Definitions.merge(*(d.defs for d in DOMAINS))
    running = s.automation.running_by_default
    automation_sensor = dg.AutomationConditionSensorDefinition(
        "synth_xray_automation",
        target=dg.AssetSelection.all(),
        default_status=dg.DefaultSensorStatus.RUNNING if running else dg.DefaultSensorStatus.STOPPED,
        minimum_interval_seconds=s.automation.sensor_interval_s,
        description=(
            "Evaluates the assets' automation conditions: when the dataset source's observed version "
            f"changes, re-materializes the groups {', '.join(s.automation.eager_groups()) or '(none)'} "
            "(settings automation.eager_through); the rest runs on request."
        ),
    )
    return dg.Definitions.merge(
        merged,
        dg.Definitions(
            resources={"settings": settings, "compute": compute or ComputeResource()},
            jobs=JOBS,
            schedules=[dataset.observe_source_schedule(s.dataset.observe_cron, running)],
            sensors=[automation_sensor],
        ),
    )


defs = build_defs()
