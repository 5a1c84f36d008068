"""The instance's ``gpu`` pool limit follows this machine's cards: one GPU step per card.

``follow_the_cards(instance, cards)`` sets the pool's limit to ``max(1, cards)``, unless a person set
it by hand (``dagster instance concurrency set gpu N``): the limit this code set last is kept in the
instance's key-value store, and a limit that is neither the instance default nor that value is a
person's, left alone. ``make dev`` and the full-study entry point (``demo.py``) call it; on a
PostgreSQL instance run it once by hand where the steps run:
``DAGSTER_HOME=... python -m synth_xray_assets.operations.pools``.

Every GPU step also holds a card lock (``cards.py``), so a limit above the number of cards only
makes steps wait for a card; a limit below it leaves cards idle.
"""

from __future__ import annotations

import dagster as dg

from synth_xray_assets.cards import visible_cards
from synth_xray_assets.deployment import GPU_POOL

MARKER = "synth_xray/gpu_pool_limit_set_by_code"  # the limit follow_the_cards set last


def follow_the_cards(instance: dg.DagsterInstance, cards: int) -> str:
    """Set the gpu pool's limit to ``max(1, cards)`` unless a person set it; say what was done."""
    want = max(1, cards)
    info = instance.event_log_storage.get_concurrency_info(GPU_POOL)
    mine = instance.run_storage.get_cursor_values({MARKER}).get(MARKER)
    if not info.using_default_limit and info.limit is not None and str(info.limit) != mine:
        return f"gpu pool: limit {info.limit} set by hand, left as it is ({cards} cards here)"
    if info.limit != want or info.using_default_limit:
        instance.event_log_storage.set_concurrency_slots(GPU_POOL, want)
    instance.run_storage.set_cursor_values({MARKER: str(want)})
    return f"gpu pool: limit {want} ({cards} cards here)"


def main() -> None:
    with dg.DagsterInstance.get() as instance:
        print(follow_the_cards(instance, len(visible_cards())), flush=True)


if __name__ == "__main__":
    main()
