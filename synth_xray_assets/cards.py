"""One GPU step per card: an OS file lock (``fcntl.flock``) per physical card, held for the step's life.

Every GPU step (the ``gpu`` pool) takes a free card of its machine before its work and keeps it
until it ends: ``CardLocks.hold`` locks ``locks/cards/{card}.lock`` (``Layout.card_locks``) without
blocking, polling every ``operations.card_poll_s``; while every card is busy the step logs one line
naming the busy cards and their holders, and after ``operations.card_wait_s`` it fails naming them
(``CardsBusyError``). The kernel frees a lock when its process dies (``kill -9`` included), so a
killed step frees its card without a person.

A lock file names the physical card, not the index this process sees: its UUID when torch gives one,
else the host and the physical index (``CUDA_VISIBLE_DEVICES`` maps local indices to physical ones),
so that steps started with different visible cards (Celery workers, Kubernetes pods) still agree.

Plain code: ``CardConfig`` is a ``dg.Config`` only so that ``ComputeResource`` can take injected
cards (tests fake cards on the CPU); ``resources.py`` wires this to the assets.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg

from synth_xray_assets.lockfiles import holder_text, read_holder, try_lock, write_holder

GIB = 1024**3


class CardConfig(dg.Config):
    """One GPU card this process sees."""

    index: int
    """torch's index of the card in this process (``cuda:{index}``)."""
    name: str
    """The card's name, e.g. NVIDIA H100 80GB HBM3."""
    total_memory: int
    """The card's memory in bytes."""
    key: str
    """The physical card's identity, the same in every process: ``GPU-{uuid}`` or ``{host}-gpu{n}``."""


class CardsBusyError(RuntimeError):
    """Every card of this machine stayed held by other steps for ``operations.card_wait_s``."""


def card_key(uuid: str | None, host: str, physical_index: str) -> str:
    """The physical card's identity: its UUID when there is one, else the host and physical index."""
    if uuid:
        return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
    return f"{host}-gpu{physical_index}"


def physical_index(local: int, visible: str | None) -> str:
    """The physical card behind local index ``local`` under ``CUDA_VISIBLE_DEVICES=visible``
    (``"2,3"``: local 1 is ``"3"``); an entry may be a UUID, which names the card as well."""
    entries = [e.strip() for e in (visible or "").split(",") if e.strip()]
    return entries[local] if local < len(entries) else str(local)


def card_of(props: Any, index: int) -> CardConfig:
    """The card at local ``index`` from torch's device properties (``name``, ``total_memory``, ``uuid``)."""
    uuid = getattr(props, "uuid", None)
    visible = physical_index(index, os.environ.get("CUDA_VISIBLE_DEVICES"))
    key = card_key(str(uuid) if uuid else None, socket.gethostname(), visible)
    return CardConfig(index=index, name=props.name, total_memory=int(props.total_memory), key=key)


def visible_cards() -> list[CardConfig]:
    """The CUDA cards this process sees (none without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [card_of(torch.cuda.get_device_properties(i), i) for i in range(torch.cuda.device_count())]


def lock_file(folder: Path, card: CardConfig) -> Path:
    """The lock file of ``card`` under ``folder`` (file-name-safe)."""
    return Path(folder) / (re.sub(r"[^A-Za-z0-9_.@-]", "_", card.key) + ".lock")


_held: list[CardConfig] = []  # the cards this process holds now (one step per process)
_last: list[str] = []  # the key of the card this process held last (its CUDA context is there)
_used: list[CardConfig] = []  # every card of this process's current (or last) step, extras too


def held_cards() -> tuple[CardConfig, ...]:
    """The cards this process holds now (``CardLocks.hold``)."""
    return tuple(_held)


def cards_used() -> tuple[CardConfig, ...]:
    """The cards of this process's current step: the one it holds first, then every extra one it
    took meanwhile (``CardLocks.more``), also those given back already."""
    return tuple(_used)


@dataclass(frozen=True)
class CardLocks:
    """The card locks of one data root: ``folder`` (``Layout.card_locks``), the settings'
    ``operations.card_wait_s`` and ``card_poll_s``, and where the waiting line goes."""

    folder: Path
    wait_s: float = 900.0
    poll_s: float = 2.0
    log: Callable[[str], None] = print

    @contextlib.contextmanager
    def hold(self, cards: Sequence[CardConfig], holder: dict[str, Any]) -> Iterator[list[CardConfig]]:
        """Hold one free card of ``cards`` (waiting for one); yield it in a list.

        ``holder`` (e.g. the run id and step) is written into the lock file for whoever waits next.
        Re-entrant: a process that holds a card already gets it again.
        """
        if _held:
            yield list(_held)
            return
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as stack:
            fds = {c.key: stack.enter_context(_opened(lock_file(self.folder, c))) for c in cards}
            card = self._take(sorted(cards, key=lambda c: c.key not in _last), fds)
            write_holder(fds[card.key], holder)
            _held[:], _last[:], _used[:] = [card], [card.key], [card]
            _reset_peak(card)
            try:
                yield [card]
            finally:
                _held.clear()
                _free_cached_memory()  # what this step cached is not left on a card another may take
                os.ftruncate(fds[card.key], 0)

    @contextlib.contextmanager
    def more(
        self,
        cards: Sequence[CardConfig],
        count: int,
        holder: dict[str, Any],
        totals: Sequence[int] | None = None,
    ) -> Iterator[list[CardConfig]]:
        """Up to ``count`` more cards of ``cards`` that are free now (none waited for), held with
        the one this process holds, for a step that runs on several (data-parallel DreamBooth,
        generation). ``totals``: the counts the step can use, its own card included (ranks that
        divide the global batch): cards taken beyond the largest one reached are given back."""
        got: list[tuple[CardConfig, int]] = []
        with contextlib.ExitStack() as stack:
            for card in cards:
                if len(got) >= count or card.key in {c.key for c in _held}:
                    continue
                with contextlib.ExitStack() as attempt:
                    fd = attempt.enter_context(_opened(lock_file(self.folder, card)))
                    if try_lock(fd):
                        write_holder(fd, holder)
                        stack.enter_context(attempt.pop_all())  # held until the step ends
                        got.append((card, fd))
            if totals:
                usable = max(n for n in totals if n <= 1 + len(got)) - 1
                for _, fd in got[usable:]:
                    os.ftruncate(fd, 0)
                    fcntl.flock(fd, fcntl.LOCK_UN)  # free at once for another step
                got = got[:usable]
            taken = [card for card, _ in got]
            _held.extend(taken)
            _used.extend(c for c in taken if c not in _used)
            try:
                yield taken
            finally:
                del _held[len(_held) - len(taken) :]
                for _, fd in got:
                    os.ftruncate(fd, 0)  # no stale holder for whoever looks next

    def _take(self, cards: Sequence[CardConfig], fds: dict[str, int]) -> CardConfig:
        start, logged = time.monotonic(), False
        while True:
            for card in cards:
                if try_lock(fds[card.key]):
                    if logged:
                        self.log(f"cards: took {describe(card)} after {time.monotonic() - start:.1f} s")
                    return card
            if time.monotonic() - start >= self.wait_s:
                raise CardsBusyError(
                    f"no free GPU card after {self.wait_s:.0f} s (settings operations.card_wait_s): "
                    f"{self.busy(cards)}. Let those steps finish, or stop them, then materialize again"
                )
            if not logged:
                self.log(
                    f"cards: waiting for a free card (up to {self.wait_s:.0f} s, settings "
                    f"operations.card_wait_s): {self.busy(cards)}"
                )
                logged = True
            time.sleep(self.poll_s)

    def busy(self, cards: Sequence[CardConfig]) -> str:
        """Each card of ``cards`` with who holds it and since when."""
        return "; ".join(f"{describe(c)} held by {_holder(lock_file(self.folder, c))}" for c in cards)


def describe(card: CardConfig) -> str:
    """``card 1 (NVIDIA H100, GPU-...)``."""
    return f"card {card.index} ({card.name}, {card.key})"


def card_record(card: CardConfig, device: str) -> dict[str, Any]:
    """What a step's metadata says of its card: index, name, key, total and peak GiB used (peak
    only where the step ran on CUDA)."""
    return {
        "index": card.index,
        "name": card.name,
        "key": card.key,
        "total_gib": round(card.total_memory / GIB, 2),
        "peak_gib": _peak_gib(device),
    }


def _peak_gib(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    import torch

    return round(torch.cuda.max_memory_allocated(torch.device(device)) / GIB, 2)


def _cuda_in_use() -> Any:
    """torch, when this process has initialised CUDA (else None: nothing to reset or free)."""
    torch = sys.modules.get("torch")
    return torch if torch is not None and torch.cuda.is_initialized() else None


def _reset_peak(card: CardConfig) -> None:
    """A step's peak memory is its own, not that of earlier steps of this process."""
    if torch := _cuda_in_use():
        torch.cuda.reset_peak_memory_stats(card.index)


def _free_cached_memory() -> None:
    if torch := _cuda_in_use():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        yield fd
    finally:
        os.close(fd)  # closing the only descriptor frees its lock


def _holder(path: Path) -> str:
    info = read_holder(path)
    if not info:
        return "a step (holder unknown)"
    return f"run {info.get('run_id', '?')} step {info.get('step', '?')}, {holder_text(info)}"
