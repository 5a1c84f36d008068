"""A run launcher whose run workers the daemon's run monitoring can check on one machine.

Dagster's ``DefaultRunLauncher`` starts each run worker as a process of the code server but
cannot tell whether it is still alive, so a run worker killed by ``kill -9`` or the kernel's
out-of-memory killer leaves its run ``STARTED`` forever, holding its pool slots. This launcher
launches runs exactly as the default one does and adds ``check_run_worker_health``: the process
that executes a run reports its pid as the ``pid`` metadata of a run-level engine event (the code
server's "Started process for run", the executor's "Executing steps in process" or "... parent
process"; step subprocesses report theirs in STEP_WORKER_STARTED events, a different type); the
worker is alive while a process with that pid exists, is not a zombie, and was started before
that event (a newer process with the same pid is another program).
Only runs surely on this host are judged: launched here through a local code server, or, for
runs not launched by this launcher, recorded in a SQLite instance (local to one machine by
construction). Age is never a criterion, so a healthy run of many hours is left alone. (The
code server also fails runs whose worker it started and saw die; this covers what it cannot:
a restarted code server, in-process runs, a killed ``dagster dev``.)

Configured in ``dagster.yaml``::

    run_launcher:
      module: synth_xray_assets.operations.launcher
      class: LocalRunLauncher
    run_monitoring:
      enabled: true

Imports stay light: the daemon and the webserver import this module.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass

import psutil
from dagster import DagsterEventType, DagsterInstance, DagsterRun, DefaultRunLauncher
from dagster._core.launcher import CheckRunHealthResult, LaunchRunContext, WorkerStatus
from dagster._core.storage.dagster_run import DagsterRunStatus
from dagster._core.storage.runs.sqlite.sqlite_run_storage import SqliteRunStorage
from dagster._core.storage.tags import GRPC_INFO_TAG, MAX_RETRIES_TAG

HOST_TAG = "synth_xray/launched_on"
PID_METADATA = "pid"  # EngineEventData.in_process / .multiprocess: the reporting process's pid
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", ""}
# A pid's process must have been created before the worker reported it; this allows for the
# clock granularity of the process start time (jiffies) and of the event timestamp.
START_TIME_SLACK_S = 1.0
NOT_RETRIED = (
    "It is not retried automatically: it was launched from the command line (no code location "
    "origin to re-execute it from); run `make demo` again (with the same SYNTH_XRAY_* settings), "
    "which resumes from what is on disk, checkpoints included"
)


@dataclass(frozen=True)
class WorkerRecord:
    """What the run worker said about itself: its pid and when it said so (epoch seconds)."""

    pid: int
    reported_at: float


def run_worker_record(instance: DagsterInstance, run_id: str) -> WorkerRecord | None:
    """The latest run-level engine event of ``run_id`` that carries a pid: its worker process's."""
    events = instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT)
    for entry in reversed(events):
        event = entry.dagster_event
        if event is None or event.step_key is not None:
            continue
        data = event.engine_event_data  # None for an engine event without data
        pid = data.metadata.get(PID_METADATA) if data else None
        if pid is not None:
            return WorkerRecord(int(pid.value), entry.timestamp)
    return None


def process_alive(pid: int, started_before: float) -> tuple[bool, str]:
    """Whether ``pid`` is a live process created no later than ``started_before``; and why."""
    try:
        proc = psutil.Process(pid)
        status, created = proc.status(), proc.create_time()
    except psutil.NoSuchProcess:
        return False, f"no process with pid {pid}"
    except psutil.AccessDenied:
        return True, f"pid {pid} exists (not ours to inspect)"
    if status == psutil.STATUS_ZOMBIE:
        return False, f"pid {pid} has exited (zombie, not yet reaped)"
    if created > started_before + START_TIME_SLACK_S:
        return False, f"pid {pid} now belongs to a process started after the run worker reported it"
    return True, f"pid {pid} is alive"


def checkable_here(instance: DagsterInstance, run: DagsterRun) -> bool:
    """True when the run's worker surely runs on this host: launched here through a local code
    server, or not launched by this launcher but recorded in a SQLite (one-machine) instance."""
    if HOST_TAG not in run.tags:
        return isinstance(instance.run_storage, SqliteRunStorage)
    if run.tags[HOST_TAG] != socket.gethostname():
        return False
    grpc_host = json.loads(run.tags.get(GRPC_INFO_TAG, "{}")).get("host", "")
    return grpc_host in LOCAL_HOSTS | {socket.gethostname()}


def worker_health(instance: DagsterInstance, run: DagsterRun) -> CheckRunHealthResult:
    """RUNNING unless the run's worker is surely gone (then FAILED, with the reason)."""
    if not checkable_here(instance, run):
        return CheckRunHealthResult(WorkerStatus.RUNNING, "run worker on another host; not checked")
    record = run_worker_record(instance, run.run_id)
    if record is None:
        return CheckRunHealthResult(WorkerStatus.RUNNING, "run worker has not reported its pid yet")
    alive, why = process_alive(record.pid, record.reported_at)
    if alive:
        return CheckRunHealthResult(WorkerStatus.RUNNING, why, run_worker_id=str(record.pid))
    msg = (
        f"the run worker (pid {record.pid} on {socket.gethostname()}) is gone: {why}. It was killed "
        "(kill -9, the out-of-memory killer) or crashed without reporting; its pool slots are freed"
        + (" and run retries apply" if retried_automatically(run) else f". {NOT_RETRIED}")
    )
    return CheckRunHealthResult(WorkerStatus.FAILED, msg, run_worker_id=str(record.pid))


def retried_automatically(run: DagsterRun) -> bool:
    """Whether the daemon's ``run_retries`` can re-execute ``run``: only runs launched from a code
    location (the UI, a schedule, a sensor, a retry) carry the origin it re-executes from; runs of
    ``make demo`` or ``execute_in_process`` do not."""
    return run.remote_job_origin is not None


def promise_no_retry(instance: DagsterInstance, run: DagsterRun) -> None:
    """Tag ``run`` so that its failure says ``dagster/will_retry=false`` (a retry limit of 0):
    call it before failing a run that ``retried_automatically`` says no retry can come for."""
    instance.add_run_tags(run.run_id, {MAX_RETRIES_TAG: "0"})


class LocalRunLauncher(DefaultRunLauncher):
    """``DefaultRunLauncher`` plus a run-worker health check by pid, process start time and host."""

    def launch_run(self, context: LaunchRunContext) -> None:
        self._instance.add_run_tags(context.dagster_run.run_id, {HOST_TAG: socket.gethostname()})
        super().launch_run(context)

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        fresh = self._instance.get_run_by_id(run.run_id) or run  # tags added after the run was read
        if fresh.status != DagsterRunStatus.STARTED:  # ended meanwhile (its code server saw it die)
            return CheckRunHealthResult(WorkerStatus.RUNNING, f"run is {fresh.status.value} now")
        health = worker_health(self._instance, fresh)
        if health.status == WorkerStatus.FAILED and not retried_automatically(fresh):
            promise_no_retry(self._instance, fresh)  # run monitoring fails it next
        return health
