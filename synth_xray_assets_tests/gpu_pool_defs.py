"""Test-only definitions: two steps in the gpu pool, each holding it for a few seconds.

The real GPU assets train models; these stand in for them where only the pool matters. A step
holds the pool at least ``GPU_POOL_HOLD_S`` seconds, and until the file ``GPU_POOL_RELEASE_FILE``
exists (the test creates it once both runs have started, so that they surely overlap).
"""

import os
import time
from pathlib import Path

import dagster as dg

HOLD_S = float(os.environ.get("GPU_POOL_HOLD_S", "3"))
RELEASE_FILE = os.environ.get("GPU_POOL_RELEASE_FILE")
RELEASE_TIMEOUT_S = 240.0


def _hold() -> None:
    time.sleep(HOLD_S)
    deadline = time.monotonic() + RELEASE_TIMEOUT_S
    while RELEASE_FILE and not Path(RELEASE_FILE).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{RELEASE_FILE} did not appear in {RELEASE_TIMEOUT_S:.0f} s")
        time.sleep(0.2)


def _gpu_step(name: str) -> dg.AssetsDefinition:
    @dg.asset(name=name, pool="gpu")
    def _step(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        _hold()
        return dg.MaterializeResult(metadata={"pid": os.getpid()})

    return _step


defs = dg.Definitions(assets=[_gpu_step("gpu_step_a"), _gpu_step("gpu_step_b")])
