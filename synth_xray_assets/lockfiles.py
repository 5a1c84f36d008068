"""Lock files that say who holds them: ``fcntl.flock`` on a file whose content names the holder.

The output locks (``operations/locks.py``) and the card locks (``cards.py``) share these: the lock
is the kernel's (freed when the holding process dies, ``kill -9`` included); the file's content
(run, step, pid, host, since when) is only for the message of whoever waits.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any


def try_lock(fd: int) -> bool:
    """Take the exclusive lock on ``fd`` without waiting; whether it was free."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def write_holder(fd: int, holder: dict[str, Any]) -> None:
    """Write ``holder`` with this process's pid, host and the time into the locked file."""
    info = {**holder, "pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)


def read_holder(path: Path) -> dict[str, Any]:
    """What the holder of ``path`` wrote (empty when nothing readable is there)."""
    try:
        return json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def holder_text(info: dict[str, Any]) -> str:
    """``pid 12 on host, since 2026-12-06 05:00:00`` of a holder's record."""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
    return f"pid {info.get('pid')} on {info.get('host')}, since {since}"
