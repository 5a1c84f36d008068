"""Crash safety: dead run workers are detected, one writer per output, full disks, atomic writes."""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import psutil
import pytest
from dagster._core.events import EngineEventData
from dagster._core.launcher import WorkerStatus
from dagster._core.test_utils import create_run_for_test

from synth_xray_assets import storage
from synth_xray_assets.operations.launcher import (
    HOST_TAG,
    LocalRunLauncher,
    process_alive,
    worker_health,
)

REPO = Path(__file__).resolve().parents[1]
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
    (tmp_path / "dagster.yaml").write_text((Path(__file__).resolve().parents[1] / "dagster.yaml").read_text())
    with dg.DagsterInstance.from_config(str(tmp_path)) as inst:
        assert isinstance(inst.run_launcher, LocalRunLauncher)
        assert inst.run_monitoring_enabled
        assert inst.run_monitoring_settings.get("free_slots_after_run_end_seconds")
        assert not inst.run_monitoring_settings.get("max_runtime_seconds")  # never by age
        assert "MONITORING" in inst.get_required_daemon_types()
        assert inst.run_retries_enabled


# --------------------------------------------------------------------------- full disk, atomic writes


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs when this machine lets us mount one (root); else None."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        print(f"no tmpfs ({done.stderr.strip() or 'mount failed'}); the write is made to fail instead")
        yield None
        return
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_leaves_the_earlier_version_and_says_what_was_needed(small_disk, tmp_path, monkeypatch):
    root = small_disk or tmp_path / "small"
    target = root / "manifest.bin"
    storage.write_bytes_atomic(target, b"v1" * 1000)
    folder = root / "model"
    with storage.atomic_path(folder) as tmp:
        tmp.mkdir()
        (tmp / "weights").write_bytes(b"w1" * 1000)
    if small_disk is None:  # no tmpfs: the kernel's answer, ENOSPC, is raised by the write itself
        real_open = open

        def full_open(file, mode="r", *args, **kwargs):
            if "w" in mode and ".tmp" in str(file):
                raise OSError(errno.ENOSPC, "No space left on device", str(file))
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr("builtins.open", full_open)
    with pytest.raises(storage.DiskFullError) as caught:
        storage.write_bytes_atomic(target, os.urandom(2 * 2**20))
    message = str(caught.value)
    print(message)
    assert "no space left on device" in message and str(target) in message
    assert "2.0 MiB (2097152 bytes) needed" in message and "free in" in message
    with pytest.raises(storage.DiskFullError) as caught_folder:
        with storage.atomic_path(folder) as tmp:
            tmp.mkdir()
            with open(tmp / "weights", "wb") as f:
                for _ in range(64):
                    f.write(os.urandom(2**15))
    print(caught_folder.value)
    assert str(folder) in str(caught_folder.value) and "written before the disk filled" in str(
        caught_folder.value
    )
    if small_disk is not None:  # torch reports a full disk as "unexpected pos"; still named as such
        import torch

        with pytest.raises(storage.DiskFullError, match="no space left on device"):
            with storage.atomic_path(root / "state.pt") as tmp:
                torch.save({"w": torch.zeros(2**19)}, tmp)
    monkeypatch.undo()
    assert target.read_bytes() == b"v1" * 1000  # the earlier versions are intact
    assert (folder / "weights").read_bytes() == b"w1" * 1000
    assert sorted(p.name for p in root.iterdir()) == [
        "manifest.bin",
        "model",
    ]  # and no state.pt  # no partial leftovers


def test_leftovers_of_a_killed_writer_are_cleaned_and_a_half_replaced_folder_recovered(tmp_path):
    target = tmp_path / "images"
    code = (
        "import os, sys\nfrom synth_xray_assets.storage import atomic_path\n"
        f"with atomic_path({str(target)!r}) as tmp:\n"
        "    tmp.mkdir(); (tmp / 'a.png').write_bytes(b'x')\n"
        "    os.kill(os.getpid(), 9)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == -signal.SIGKILL
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert not target.exists() and len(leftovers) == 1 and leftovers[0].endswith(".tmp"), leftovers
    # A kill between moving the old folder aside and renaming the new one in: the old one is back.
    old = tmp_path / ".images.old"
    old.mkdir()
    (old / "b.png").write_bytes(b"old")
    with storage.atomic_path(target) as tmp:
        assert (target / "b.png").read_bytes() == b"old"  # recovered before anything else
        tmp.mkdir()
        (tmp / "c.png").write_bytes(b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]  # the dead writer's temp is gone
    assert [p.name for p in target.iterdir()] == ["c.png"]
