"""Asset-check wiring shared by the domains: a blocking check on an asset's partitions from a
plain function that returns its findings.

No ``from __future__ import annotations`` here: Dagster reads the check's annotations as types.
"""

from collections.abc import Callable
from typing import Any

import dagster as dg

from synth_xray_assets.deployment import GPU_POOL
from synth_xray_assets.resources import ComputeResource, SettingsResource, card_metadata
from synth_xray_assets.settings import Settings

Findings = Callable[[Settings, str, ComputeResource], dict[str, Any]]


def partition_check(
    asset: str, name: str, description: str, find: Findings
) -> Callable[..., dg.AssetChecksDefinition]:
    """A factory of the blocking check ``name`` on the asset ``asset`` for given partitions.

    ``find(settings, partition_key, compute)`` returns the findings: ``ok`` is the verdict and
    every finding shows as text metadata. The factory's ``options`` go to ``dg.asset_check`` (e.g.
    ``pool`` and ``op_tags``); a check in the gpu pool holds a card of this machine while it runs
    (``resources.ComputeResource.holding_a_card``).
    """

    def on_partitions(partitions_def: dg.PartitionsDefinition, **options: Any) -> dg.AssetChecksDefinition:
        @dg.asset_check(
            asset=asset,
            name=name,
            partitions_def=partitions_def,
            blocking=True,
            description=description,
            **options,
        )
        def check(
            context: dg.AssetCheckExecutionContext, settings: SettingsResource, compute: ComputeResource
        ) -> dg.AssetCheckResult:
            s = settings.get()
            if options.get("pool") != GPU_POOL:
                found = find(s, context.partition_key, compute)
            else:  # a GPU step: it holds a card of this machine while it runs
                holder = {"run_id": context.run.run_id, "step": f"{name}[{context.partition_key}]"}
                with compute.holding_a_card(s, holder, context.log.info) as held:
                    found = find(s, context.partition_key, compute)
                    if held:
                        found = {**found, "ran_on": card_metadata(held, compute.resolve_device())["ran_on"]}
            return dg.AssetCheckResult(passed=found["ok"], metadata={k: str(v) for k, v in found.items()})

        return check

    return on_partitions
