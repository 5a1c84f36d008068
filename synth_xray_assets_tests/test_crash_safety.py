"""Crash safety: dead run workers are detected, one writer per output, full disks, atomic writes."""

import os
import signal
import subprocess
import sys
import time

import dagster as dg
import psutil
from dagster._core.events import EngineEventData
from dagster._core.launcher import WorkerStatus
from dagster._core.test_utils import create_run_for_test

from synth_xray_assets.operations.launcher import (
    HOST_TAG,
    LocalRunLauncher,
    process_alive,
    worker_health,
)

LAUNCHER = {"module": "synth_xray_assets.operations.launcher", "class": "LocalRunLauncher"}


def _started_run(instance: dg.DagsterInstance, pid: int, host: str | None = None) -> dg.DagsterRun:
    import socket

    run = create_run_for_test(
        instance,
        job_name="any_job",
        tags={HOST_TAG: host or socket.gethostname(), "dagster/grpc_info": '{"host": "localhost"}'},
    )
    instance.report_engine_event(
        f"Started process for run (pid: {pid}).", run, EngineEventData.in_process(pid)
    )
    return instance.get_run_by_id(run.run_id)


def test_a_killed_run_worker_is_reported_failed_and_a_live_one_running():
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    try:
        with dg.instance_for_test(
            overrides={"run_launcher": LAUNCHER, "run_monitoring": {"enabled": True}}
        ) as inst:
            assert isinstance(inst.run_launcher, LocalRunLauncher)
            assert inst.run_launcher.supports_check_run_worker_health
            run = _started_run(inst, worker.pid)
            alive = inst.run_launcher.check_run_worker_health(run)
            assert alive.status == WorkerStatus.RUNNING, alive
            worker.send_signal(signal.SIGKILL)
            worker.wait(timeout=10)
            dead = inst.run_launcher.check_run_worker_health(run)
            assert dead.status == WorkerStatus.FAILED, dead
            assert f"pid {worker.pid}" in dead.msg and "gone" in dead.msg
            print(f"dead worker: {dead}")
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


def test_a_zombie_counts_as_dead_and_a_reused_pid_is_not_the_worker():
    child = subprocess.Popen(["true"])
    deadline = time.time() + 10
    while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE and time.time() < deadline:
        time.sleep(0.05)
    assert process_alive(child.pid, time.time())[0] is False  # exited, not yet reaped
    child.wait()
    me = psutil.Process(os.getpid())
    assert process_alive(os.getpid(), time.time())[0] is True
    # A process created after the worker reported this pid is another program (pid reuse).
    alive, why = process_alive(os.getpid(), me.create_time() - 60)
    assert alive is False and "started after" in why


def test_runs_of_another_host_or_without_a_pid_are_never_failed():
    with dg.instance_for_test() as inst:
        elsewhere = _started_run(inst, 2**22 + 12345, host="another-machine")  # no such pid here
        assert worker_health(inst, elsewhere).status == WorkerStatus.RUNNING
        import socket

        no_pid = create_run_for_test(
            inst, job_name="j", tags={HOST_TAG: socket.gethostname(), "dagster/grpc_info": "{}"}
        )
        assert worker_health(inst, no_pid).status == WorkerStatus.RUNNING


def test_the_shipped_instance_config_monitors_runs(tmp_path):
    from pathlib import Path

    (tmp_path / "dagster.yaml").write_text((Path(__file__).resolve().parents[1] / "dagster.yaml").read_text())
    with dg.DagsterInstance.from_config(str(tmp_path)) as inst:
        assert isinstance(inst.run_launcher, LocalRunLauncher)
        assert inst.run_monitoring_enabled
        assert inst.run_monitoring_settings.get("free_slots_after_run_end_seconds")
        assert not inst.run_monitoring_settings.get("max_runtime_seconds")  # never by age
        assert "MONITORING" in inst.get_required_daemon_types()
        assert inst.run_retries_enabled
