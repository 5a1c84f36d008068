"""Test-only definitions: two steps in the gpu pool, each holding it for a few seconds.

The real GPU assets train models; these stand in for them where only the pool matters.
"""

import os
import time

import dagster as dg

HOLD_S = float(os.environ.get("GPU_POOL_HOLD_S", "3"))


def _gpu_step(name: str) -> dg.AssetsDefinition:
    @dg.asset(name=name, pool="gpu")
    def _step(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        time.sleep(HOLD_S)
        return dg.MaterializeResult(metadata={"pid": os.getpid()})

    return _step


defs = dg.Definitions(assets=[_gpu_step("gpu_step_a"), _gpu_step("gpu_step_b")])
