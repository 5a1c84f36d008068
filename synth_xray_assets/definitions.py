"""The one Dagster entry point: every domain's definitions, plus resources and jobs.

Profile: ``SYNTH_XRAY_PROFILE=demo`` (default) or ``full``; see ``settings.py``.
"""

import dagster as dg

from synth_xray_assets.dataset.assets import defs as dataset_defs
from synth_xray_assets.resources import ComputeResource, SettingsResource

resources = {"settings": SettingsResource.from_env(), "compute": ComputeResource()}

# One job per partitioning, in the order the demo (and a full run) materializes them.
prepare_job = dg.define_asset_job(
    "prepare_job",
    selection=dg.AssetSelection.assets("chest_xray_dataset"),
    description="The unpartitioned upstream assets: dataset, base model, prior images, feature extractor.",
)
PIPELINE_STAGES = ["prepare_job"]

defs = dg.Definitions.merge(
    dataset_defs,
    dg.Definitions(resources=resources, jobs=[prepare_job]),
)
