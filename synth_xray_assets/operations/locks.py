"""One writer per output: an OS file lock (``fcntl.flock``) per asset partition.

Two runs of the same asset partition (a double click on Materialize, a retry racing a manual
run, more GPU slots than one) would otherwise write the same folder at once. The asset's body
runs holding an exclusive lock on ``locks/{asset}[@{partition}].lock`` (``Layout.output_lock``);
a second writer waits up to ``operations.lock_wait_s`` and then fails naming the holder. The kernel releases
the lock when its process dies, so a killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import inspect
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from synth_xray_assets.layout import Layout
from synth_xray_assets.lockfiles import holder_text, read_holder, try_lock, write_holder

POLL_S = 0.2


class OutputBusyError(RuntimeError):
    """Another process is writing this output."""


def lock_path(data_dir: str | Path, asset: str, partition: str | None = None) -> Path:
    """The lock file of one asset partition under the data folder."""
    return Layout(Path(data_dir)).output_lock(asset, partition)


@contextlib.contextmanager
def output_lock(path: str | Path, wait_s: float, holder: dict[str, Any]) -> Iterator[float]:
    """Hold the exclusive lock at ``path``; yield the seconds waited for it.

    ``holder`` (e.g. the run id) is written into the lock file for whoever waits next. Raises
    ``OutputBusyError`` after ``wait_s`` seconds, naming the process that holds it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        waited = _acquire(fd, path, wait_s)
        write_holder(fd, holder)
        try:
            yield waited
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _acquire(fd: int, path: Path, wait_s: float) -> float:
    start = time.monotonic()
    while not try_lock(fd):
        if time.monotonic() - start >= wait_s:
            raise OutputBusyError(
                f"{path.stem} is being written by another run ({_describe_holder(path)}); waited "
                f"{wait_s:.0f} s (settings operations.lock_wait_s). Let that run finish, or stop "
                "it, then materialize again"
            )
        time.sleep(POLL_S)
    return time.monotonic() - start


def _describe_holder(path: Path) -> str:
    info = read_holder(path)
    return f"run {info.get('run_id', '?')}, {holder_text(info)}" if info else "holder unknown"


def one_writer(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate an asset's function (below ``@dg.asset``) to run holding its partition's lock.

    The asset takes ``context`` first and the ``settings`` resource (``SettingsResource``).
    """

    def lock(context, kwargs: dict[str, Any]) -> contextlib.AbstractContextManager[float]:
        s = kwargs["settings"].get()
        partition = context.partition_key if context.has_partition_key else None
        path = s.layout.output_lock(context.asset_key.to_user_string(), partition)
        return _logged(
            context, path, output_lock(path, s.operations.lock_wait_s, {"run_id": context.run.run_id})
        )

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def generator_wrapper(context, *args: Any, **kwargs: Any) -> Iterator[Any]:
            with lock(context, kwargs):
                yield from fn(context, *args, **kwargs)

        generator_wrapper.holds_output_lock = True  # type: ignore[attr-defined]
        return generator_wrapper

    @functools.wraps(fn)
    def wrapper(context, *args: Any, **kwargs: Any) -> Any:
        with lock(context, kwargs):
            return fn(context, *args, **kwargs)

    wrapper.holds_output_lock = True  # type: ignore[attr-defined]
    return wrapper


@contextlib.contextmanager
def _logged(context, path: Path, held: contextlib.AbstractContextManager[float]) -> Iterator[float]:
    with held as waited:
        context.log.info(f"one writer: holding {path} (waited {waited:.1f} s)")
        try:
            yield waited
        finally:
            context.log.info(f"one writer: releasing {path}")
