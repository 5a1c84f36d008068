"""A refusal for lack of disk is final: neither the step's ``RetryPolicy`` nor ``run_retries`` repeats it.

The disk preflight (``hardware.require_free_space``) compares what a step will write with what is
free; a retry a few seconds later finds the same disk and refuses again. Step retries stop on
``dg.Failure(allow_retries=False)``. Run retries are decided when the run fails, from its tags
(``auto_reexecution_should_retry_run``): a step failure is not retried when the run's
``dagster/retry_on_asset_or_op_failure`` tag is false, so the refusal sets that tag on its run
first, and the run ends tagged ``dagster/will_retry=false``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import dagster as dg

from synth_xray_assets.hardware import NotEnoughDiskError

# Dagster's run tag (dagster._core.storage.tags.RETRY_ON_ASSET_OR_OP_FAILURE_TAG)
RETRY_ON_STEP_FAILURE_TAG = "dagster/retry_on_asset_or_op_failure"


def disk_refusal_is_final(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate an asset's function (below ``@dg.asset``; it takes ``context`` first) so that a
    ``NotEnoughDiskError`` fails the step and its run for good, saying so."""

    @functools.wraps(fn)
    def wrapper(context, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(context, *args, **kwargs)
        except NotEnoughDiskError as exc:
            context.instance.add_run_tags(context.run.run_id, {RETRY_ON_STEP_FAILURE_TAG: "false"})
            raise dg.Failure(
                description=f"{exc}. Not retried (the same disk would refuse again); run again once "
                "there is room.",
                allow_retries=False,
            ) from exc

    wrapper.disk_refusal_is_final = True  # type: ignore[attr-defined]
    return wrapper
