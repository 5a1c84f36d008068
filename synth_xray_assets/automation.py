"""Which assets re-run by themselves: declarative automation, chosen per asset group.

The groups up to ``automation.eager_through`` (settings; through ``evaluation``, i.e. FID, by
default) carry ``AutomationCondition.eager()``: when an upstream version changes (a new dataset
source version, a new checkpoint) or the asset is missing, the ``synth_xray_automation`` sensor
requests it. Later groups (the classifier grid, the report) carry none and run on request.
"""

import dagster as dg

from synth_xray_assets.resources import SettingsResource

_AUTOMATION = SettingsResource.from_env().get().automation


def automation_for(group: str) -> dg.AutomationCondition | None:
    """The automation condition of an asset in ``group`` (None: materialized on request only)."""
    return dg.AutomationCondition.eager() if group in _AUTOMATION.eager_groups() else None
