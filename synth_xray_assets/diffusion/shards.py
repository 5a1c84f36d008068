"""One image set split by image index over several devices, one spawned process per device.

Shard ``k`` of ``n`` makes the indices ``i`` with ``i % n == k``. Its process (spawned, so that
CUDA starts fresh in it) runs ``work(device, indices)``, an iterator of batches of manifest rows
(dicts with an ``"index"``), and sends each batch to the parent, which alone writes the manifest.
``work`` must be picklable: a dataclass or a module-level function, not a lambda.

When a shard fails, the others go on to their end; then :class:`ShardFailed` names the shard,
its device and the first image index it had not made. What every shard made stays on disk and
in the rows already handed over, so a re-run makes only the rest.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import queue as queues
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from synth_xray_assets.operations.lifetime import exit_with_parent

Rows = list[dict]
Work = Callable[[str, list[int]], Iterable[Rows]]
POLL_S = 1.0  # how often the parent looks for a shard that died without a word


@dataclass(frozen=True)
class Shard:
    """Shard ``number`` of ``count``, on ``device``."""

    number: int
    count: int
    device: str

    def indices(self, todo: Sequence[int]) -> list[int]:
        return [i for i in todo if i % self.count == self.number]


class ShardFailed(RuntimeError):
    """A shard's process failed; ``index`` is the first image of its share it had not made."""

    def __init__(self, shard: Shard, index: int | None, reason: str):
        self.shard, self.device, self.index, self.reason = shard.number, shard.device, index, reason
        super().__init__(
            f"generation shard {shard.number} of {shard.count} on device {shard.device!r} failed at "
            f"image index {index}: {reason}. What the shards made is kept; run again to make the rest"
        )


def run_shards(
    work: Work, devices: Sequence[str], todo: Sequence[int], on_rows: Callable[[Shard, Rows], None]
) -> None:
    """Run ``work`` on every device's share of ``todo``; ``on_rows`` takes each batch made."""
    _require_picklable(work)
    everyone = [Shard(k, len(devices), device) for k, device in enumerate(devices)]
    shards = {s.number: s for s in everyone if s.indices(todo)}  # a shard with nothing left is not started
    ctx = mp.get_context("spawn")
    inbox = ctx.Queue()
    left = {k: s.indices(todo) for k, s in shards.items()}
    procs = {
        k: ctx.Process(target=_shard_main, args=(work, s, left[k], inbox), name=f"shard-{k}")
        for k, s in shards.items()
    }
    for proc in procs.values():
        proc.start()

    def take(shard: Shard, rows: Rows) -> None:
        made = {int(row["index"]) for row in rows}
        left[shard.number] = [i for i in left[shard.number] if i not in made]
        on_rows(shard, rows)

    try:
        errors = _gather(inbox, procs, shards, take)
    except BaseException:  # the parent was interrupted, or could not take a batch: stop the shards
        for proc in procs.values():
            proc.terminate()
        raise
    finally:
        for proc in procs.values():
            proc.join()
    if errors:
        k = min(errors)
        others = [f"shard {j}: {errors[j]}" for j in sorted(errors) if j != k]
        reason = errors[k] + (f" (also failed: {'; '.join(others)})" if others else "")
        raise ShardFailed(shards[k], (left[k] or [None])[0], reason)


def _require_picklable(work: Work) -> None:
    try:
        pickle.dumps(work)
    except Exception as exc:
        raise TypeError(
            f"generating on several devices needs a picklable pipeline factory (a dataclass or a "
            f"module-level function, not a lambda or a closure): {exc}"
        ) from exc


def _shard_main(work: Work, shard: Shard, indices: list[int], outbox) -> None:
    """The shard's process: its batches to the parent, then its last word (``None``: done)."""
    exit_with_parent()  # a killed step leaves no shard generating behind it
    try:
        for rows in work(shard.device, indices):
            outbox.put(("rows", shard.number, rows))
    except BaseException as exc:
        outbox.put(("end", shard.number, f"{type(exc).__name__}: {exc}"))
        raise  # the traceback goes to the process's stderr, its exit code is not 0
    outbox.put(("end", shard.number, None))


def _gather(
    inbox, procs: dict[int, Any], shards: dict[int, Shard], take: Callable[[Shard, Rows], None]
) -> dict[int, str]:
    """Hand the batches to ``take`` until every shard has ended; the errors by shard number."""
    errors: dict[int, str] = {}
    pending, silent = set(shards), set()
    while pending:
        try:
            kind, k, payload = inbox.get(timeout=POLL_S)
        except queues.Empty:
            # An exited process has flushed all it sent: quiet over two polls, it died without a word.
            gone = {k for k in pending if procs[k].exitcode is not None}
            for k in gone & silent:
                pending.discard(k)
                errors[k] = f"its process ended with exit code {procs[k].exitcode} without a report"
            silent = gone
            continue
        if kind == "rows":
            take(shards[k], payload)
            continue
        pending.discard(k)
        if payload is not None:
            errors[k] = payload
    return errors
