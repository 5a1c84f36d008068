"""The instance's ``gpu`` pool limit follows this machine's cards: one GPU step per card.

``follow_the_cards(instance, cards)`` sets the pool's limit to ``max(1, cards)``, unless a person set
it by hand (``dagster instance concurrency set gpu N``): the limit this code set last is kept in the
instance's key-value store, and a limit that is neither the instance default nor that value is a
person's, left alone. ``make dev`` and the full-study entry point (``demo.py``) call it; on a
PostgreSQL instance run it once by hand where the steps run:
``DAGSTER_HOME=... python -m synth_xray_assets.operations.pools``.

Every GPU step also holds a card lock (``cards.py``), so a limit above the number of cards only
makes steps wait for a card; a limit below it leaves cards idle.

``runs_for_the_cards(config, cards)`` does the same for the runs the queue lets start at once
(``concurrency.runs.max_concurrent_runs`` of the instance's ``dagster.yaml``, read when the instance
starts): at least one run per card and one more for the steps on the CPU, so that a backfill of
classifier runs keeps every card busy. It only raises the limit (-1, no limit, stays); ``make dev``
calls it through ``main --runs`` before the instance starts (a shared PostgreSQL instance's file is
left alone: its run limit is the cluster's, not one machine's).
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import dagster as dg

from synth_xray_assets.cards import visible_cards
from synth_xray_assets.deployment import GPU_POOL

MARKER = "synth_xray/gpu_pool_limit_set_by_code"  # the limit follow_the_cards set last
RUN_LIMIT = re.compile(r"^(\s*max_concurrent_runs:\s*)(-?\d+)", re.MULTILINE)


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


def runs_for_the_cards(config: Path, cards: int) -> str:
    """Raise ``max_concurrent_runs`` in the instance file ``config`` to at least ``cards + 1`` (a run
    per card and one on the CPU), keeping the rest of the file; say what was done."""
    text = config.read_text()
    found = RUN_LIMIT.search(text)
    if found is None:
        return f"runs: no max_concurrent_runs in {config}: the queue's default, left as it is"
    now, want = int(found.group(2)), cards + 1
    if now < 0 or now >= want:
        return f"runs: at most {now} at once, left as it is ({cards} cards here)"
    # storage.py imports this package (its fault points): the atomic write is spelled out here
    tmp = config.with_name(f".{config.name}.{os.getpid()}.tmp")
    tmp.write_text(RUN_LIMIT.sub(rf"\g<1>{want}", text, count=1))
    os.replace(tmp, config)
    return f"runs: at most {want} at once in {config} (was {now}; {cards} cards here)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs", action="store_true", help="also raise max_concurrent_runs in $DAGSTER_HOME/dagster.yaml"
    )
    args = parser.parse_args(argv)
    cards = len(visible_cards())
    config = Path(os.environ.get("DAGSTER_HOME", ".")) / "dagster.yaml"
    if args.runs and config.is_file():  # before the instance reads it
        try:
            print(runs_for_the_cards(config, cards), flush=True)
        except OSError as exc:  # a read-only file: the pool is set all the same
            print(f"runs: {config} left as it is ({exc})", flush=True)
    with dg.DagsterInstance.get() as instance:
        print(follow_the_cards(instance, cards), flush=True)


if __name__ == "__main__":
    main()
