"""The one Dagster entry point: every domain's definitions, plus resources and jobs.

Profile: ``SYNTH_XRAY_PROFILE=demo`` (default) or ``full``; see ``settings.py``.
"""

from __future__ import annotations

import dagster as dg

from synth_xray_assets.dataset.assets import defs as dataset_defs
from synth_xray_assets.resources import ComputeResource, SettingsResource

resources = {"settings": SettingsResource.from_env(), "compute": ComputeResource()}

defs = dg.Definitions.merge(
    dataset_defs,
    dg.Definitions(resources=resources),
)
