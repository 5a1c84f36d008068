"""Which assets re-run by themselves: declarative automation, chosen per asset group.

The groups up to ``automation.eager_through`` (settings; through ``evaluation``, i.e. FID, by
default) carry ``AutomationCondition.eager()``: when an upstream version changes (a new dataset
source version, a new checkpoint) or the asset is missing, the ``synth_xray_automation`` sensor
requests it. Later groups (the classifier grid, the report) carry none and run on request.
``build_defs`` applies these over every asset (``with_automation``).
"""

from collections.abc import Iterable
from typing import Any

import dagster as dg

from synth_xray_assets.settings import AutomationSettings


def automation_for(group: str | None, automation: AutomationSettings) -> dg.AutomationCondition | None:
    """The automation condition of an asset in ``group`` (None: materialized on request only)."""
    return dg.AutomationCondition.eager() if group in automation.eager_groups() else None


def with_automation(assets: Iterable[Any], automation: AutomationSettings) -> list[Any]:
    """``assets`` with every materializable asset's condition set from its group."""
    return [
        a.map_asset_specs(
            lambda spec: spec.replace_attributes(
                automation_condition=automation_for(spec.group_name, automation)
            )
        )
        if isinstance(a, dg.AssetsDefinition) and a.is_materializable
        else a
        for a in assets
    ]


def automation_sensor(automation: AutomationSettings) -> dg.AutomationConditionSensorDefinition:
    """The sensor that evaluates the conditions (switched on per ``automation.running_by_default``)."""
    running = automation.running_by_default
    return dg.AutomationConditionSensorDefinition(
        "synth_xray_automation",
        target=dg.AssetSelection.all(),
        default_status=dg.DefaultSensorStatus.RUNNING if running else dg.DefaultSensorStatus.STOPPED,
        minimum_interval_seconds=automation.sensor_interval_s,
        description=(
            "Evaluates the assets' automation conditions: when the dataset source's observed version "
            f"changes, re-materializes the groups {', '.join(automation.eager_groups()) or '(none)'} "
            "(settings automation.eager_through); the rest runs on request."
        ),
    )
