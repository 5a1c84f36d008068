"""The one Dagster entry point: every domain's definitions, plus resources and jobs.

Profile: ``SYNTH_XRAY_PROFILE=demo`` (default) or ``full``; see ``settings.py``.
"""

import dagster as dg

from synth_xray_assets.dataset import assets as dataset
from synth_xray_assets.dreambooth import assets as dreambooth
from synth_xray_assets.resources import ComputeResource, SettingsResource
from synth_xray_assets.synthesis import assets as synthesis

resources = {"settings": SettingsResource.from_env(), "compute": ComputeResource()}

# One job per partitioning, in the order the demo (and a full run) materializes them.
prepare_job = dg.define_asset_job(
    "prepare_job",
    selection=dg.AssetSelection.assets("chest_xray_dataset", "base_model", "prior_class_images"),
    description="The unpartitioned upstream assets: dataset, base model, prior images.",
)
per_class_job = dg.define_asset_job(
    "per_class_job",
    selection=dg.AssetSelection.assets("dreambooth_checkpoint", "synthetic_images"),
    description="Per class: the DreamBooth checkpoint and its synthetic images.",
)
PIPELINE_STAGES = ["observe_source_job", "prepare_job", "per_class_job"]

defs = dg.Definitions.merge(
    dataset.defs,
    dreambooth.defs,
    synthesis.defs,
    dg.Definitions(resources=resources, jobs=[prepare_job, per_class_job]),
)
