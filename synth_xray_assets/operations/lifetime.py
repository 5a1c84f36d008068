"""No process of ours outlives its parent: a step dies with its run worker, a pool worker with its step.

The multiprocess executor runs each step in a child of the run worker (forked by a fork server
the run worker starts, ``deployment.local_executor``). When only the run worker
is killed (``kill -9`` on its pid, or the out-of-memory killer, which picks one process), the step
used to live on as an orphan: it kept training, wrote checkpoints and ``STEP_SUCCESS`` into the
run already marked failed, deleted the checkpoints the retry needed, and held the output's lock
(``locks.py``) while the retry waited for it. ``exit_with_parent`` makes the kernel send this
process SIGKILL the moment its parent exits (``prctl(PR_SET_PDEATHSIG)``, Linux); on other systems
a daemon thread polls ``os.getppid()`` and kills the process when the parent is gone. Where a
fork server stands between (the parent recorded by ``multiprocessing`` is not the current one), a
second thread watches the recorded parent, the run worker, by pid. SIGKILL, not
a polite signal: nothing more is written, and the files on disk stay as the last atomic write
left them (the kernel frees the output lock with the process).

``exit_with_run_worker`` installs it in a step process (``SettingsResource`` calls it as the
step's resources start; every asset and check uses that resource); the pools a step starts call
``exit_with_parent`` in each worker (the standardization pool's initializer, the classifier's
DataLoader ``worker_init_fn``), since the setting is not inherited across ``fork``.

The kernel fires PDEATHSIG when the *thread* that started the process exits, not the whole
parent: every process here is started by the thread that waits for it (the run worker's
executor loop, the step's own thread iterating its pool or loader).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WATCHDOG_POLL_S = 0.5  # where prctl is missing: how often the watchdog thread looks at the parent

_watched: set[int] = set()  # parent pids a watchdog thread already watches in this process
_watched_pids: set[int] = set()  # run workers watched by pid (a fork server between)


def exit_with_parent(parent_pid: int | None = None) -> str:
    """Have this process killed (SIGKILL) as soon as its parent exits; return how ("prctl"/"watchdog").

    ``parent_pid`` is the process that started this one (default: ``multiprocessing``'s record of
    it, else the current parent). If that process is already gone, this process kills itself now.
    """
    if parent_pid is None:
        parent = multiprocessing.parent_process()
        parent_pid = parent.pid if parent is not None and parent.pid else os.getppid()
    ppid = os.getppid()
    if ppid != parent_pid and not _alive(parent_pid):
        _die()  # the parent died before this process got here (it was re-parented)
    how = "prctl" if _set_pdeathsig() else _start_watchdog(ppid)
    if os.getppid() != ppid:
        _die()  # the parent died between reading its pid and the kernel watching it
    if ppid != parent_pid:
        # A fork server between (the multiprocess executor's steps are forked by one): it is not
        # sure to exit the moment the run worker dies, so the run worker itself is watched too.
        _start_pid_watchdog(parent_pid)
        how += "+watchdog"
    return how


def exit_with_run_worker() -> str | None:
    """In a step process of the multiprocess executor (a ``multiprocessing`` child of the run
    worker): ``exit_with_parent()``. Elsewhere (an in-process run, a Kubernetes or Celery step,
    a test) nothing happens and None is returned."""
    if multiprocessing.parent_process() is None:
        return None
    return exit_with_parent()


def _set_pdeathsig() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _start_watchdog(ppid: int) -> str:
    if ppid not in _watched:
        _watched.add(ppid)
        threading.Thread(target=_watch, args=(ppid,), name="exit-with-parent", daemon=True).start()
    return "watchdog"


def _watch(ppid: int) -> None:
    while os.getppid() == ppid:
        time.sleep(WATCHDOG_POLL_S)
    _die()


def _start_pid_watchdog(pid: int) -> None:
    if pid not in _watched_pids:
        _watched_pids.add(pid)
        threading.Thread(target=_watch_pid, args=(pid,), name="exit-with-run-worker", daemon=True).start()


def _watch_pid(pid: int) -> None:
    while _alive(pid) and not _zombie(pid):
        time.sleep(WATCHDOG_POLL_S)
    _die()


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
