"""Recover from runs killed while no daemon watched: ``make demo`` runs jobs in its own process.

With ``make dev`` the daemon's run monitoring fails a run whose worker is gone and frees the pool
slots it held (``launcher.py``, ``dagster.yaml``). ``make demo`` runs without the daemon, so a demo
killed with ``kill -9`` (or by the out-of-memory killer) in a gpu step left its run STARTED and the
gpu slot taken: the next ``make demo`` then waited for that slot for ever, saying nothing. Before
it starts, ``recover_dead_runs`` does what run monitoring would: fail this machine's runs whose
worker is surely gone (the same check by pid, start time and host) and free their slots, and free
the slots of runs that have ended. Runs whose worker is alive (a ``make dev`` run) are left alone.

A run of ``make demo`` has no code location origin, so the daemon's ``run_retries`` cannot
re-execute it ("Run does not have an external job origin"). Such a run is failed saying so and
tagged ``dagster/will_retry=false``: the next ``make demo`` is its retry, and it resumes.
"""

from __future__ import annotations

from collections.abc import Callable

import dagster as dg
from dagster._core.launcher import WorkerStatus
from dagster._core.storage.dagster_run import FINISHED_STATUSES, DagsterRunStatus, RunsFilter

from synth_xray_assets.operations.launcher import promise_no_retry, retried_automatically, worker_health


def recover_dead_runs(instance: dg.DagsterInstance, log: Callable[[str], None] = print) -> list[str]:
    """Fail the started runs whose worker is gone, free the pool slots of ended runs; the run ids
    failed here."""
    failed = []
    for record in instance.get_run_records(RunsFilter(statuses=[DagsterRunStatus.STARTED])):
        run = record.dagster_run
        health = worker_health(instance, run)
        if health.status != WorkerStatus.FAILED:
            continue
        if not retried_automatically(run):
            promise_no_retry(instance, run)  # before the failure, which computes will_retry
        instance.report_run_failed(run, health.msg)
        log(f"run {run.run_id} ({run.job_name}) marked failed: {health.msg}")
        failed.append(run.run_id)
    _free_slots_of_ended_runs(instance, log)
    return failed


def _free_slots_of_ended_runs(instance: dg.DagsterInstance, log: Callable[[str], None]) -> None:
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return
    run_ids = list(storage.get_concurrency_run_ids())
    if not run_ids:
        return
    ended = instance.get_run_records(RunsFilter(run_ids=run_ids, statuses=list(FINISHED_STATUSES)))
    for record in ended:
        storage.free_concurrency_slots_for_run(record.dagster_run.run_id)
        log(f"freed any pool slots still held by ended run {record.dagster_run.run_id}")
