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
from dagster._core.storage.dagster_run import DagsterRunStatus
from dagster._core.storage.tags import WILL_RETRY_TAG
from dagster._core.test_utils import create_run_for_test

from synth_xray_assets import storage
from synth_xray_assets.operations.launcher import (
    HOST_TAG,
    LocalRunLauncher,
    process_alive,
    worker_health,
)
from synth_xray_assets.operations.locks import OutputBusyError, lock_path, output_lock
from synth_xray_assets.operations.recovery import recover_dead_runs

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = {"module": "synth_xray_assets.operations.launcher", "class": "LocalRunLauncher"}


def _started_run(instance: dg.DagsterInstance, pid: int, host: str | None = None) -> dg.DagsterRun:
    import socket

    run = create_run_for_test(
        instance,
        job_name="any_job",
        status=DagsterRunStatus.STARTED,
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


def test_an_in_process_run_killed_on_this_machine_is_reported_failed():
    """``make demo`` runs jobs in its own process (execute_in_process): no launcher, no tag."""
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    try:
        with dg.instance_for_test() as inst:  # SQLite: one machine
            run = create_run_for_test(inst, job_name="per_class_job")
            data = EngineEventData.in_process(worker.pid, ["dreambooth_checkpoint"])
            inst.report_engine_event(f"Executing steps in process (pid: {worker.pid})", run, data)
            assert worker_health(inst, run).status == WorkerStatus.RUNNING
            worker.send_signal(signal.SIGKILL)
            worker.wait(timeout=10)
            assert worker_health(inst, run).status == WorkerStatus.FAILED
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


RETRIES = {"run_retries": {"enabled": True, "max_retries": 2}}  # as the shipped dagster.yaml


def _remote_origin(job_name: str):
    from dagster._core.remote_origin import (
        GrpcServerCodeLocationOrigin,
        RemoteJobOrigin,
        RemoteRepositoryOrigin,
    )

    location = GrpcServerCodeLocationOrigin(host="localhost", port=4000, location_name="synth_xray_assets")
    return RemoteJobOrigin(RemoteRepositoryOrigin(location, "__repository__"), job_name)


def _killed_in_process_run(inst: dg.DagsterInstance, remote_origin=None) -> dg.DagsterRun:
    """A STARTED run whose in-process worker was killed (a `make demo` run, or one from the UI)."""
    worker = subprocess.Popen(["true"])
    worker.wait()
    run = create_run_for_test(
        inst, job_name="per_class_job", status=DagsterRunStatus.STARTED, remote_job_origin=remote_origin
    )
    data = EngineEventData.in_process(worker.pid, ["dreambooth_checkpoint"])
    inst.report_engine_event(f"Executing steps in process (pid: {worker.pid})", run, data)
    return inst.get_run_by_id(run.run_id)


def _failure_message(inst: dg.DagsterInstance, run_id: str) -> str:
    (failure,) = inst.all_logs(run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
    return failure.message


def test_a_killed_command_line_run_says_it_will_not_be_retried_and_what_to_run():
    """``make demo`` runs have no code location origin: the daemon cannot retry them (it would log
    "Run does not have an external job origin"), so their failure must not promise a retry."""
    with dg.instance_for_test(overrides=RETRIES) as inst:
        demo_run = _killed_in_process_run(inst)
        assert recover_dead_runs(inst, lambda _: None) == [demo_run.run_id]
        failed = inst.get_run_by_id(demo_run.run_id)
        assert failed.status == DagsterRunStatus.FAILURE
        assert failed.tags[WILL_RETRY_TAG] == "false"
        message = _failure_message(inst, demo_run.run_id)
        print(message)
        assert "not retried automatically" in message and "make demo" in message
        assert "run retries apply" not in message

        ui_run = _killed_in_process_run(inst, _remote_origin("per_class_job"))
        assert recover_dead_runs(inst, lambda _: None) == [ui_run.run_id]
        assert inst.get_run_by_id(ui_run.run_id).tags[WILL_RETRY_TAG] == "true"
        assert "run retries apply" in _failure_message(inst, ui_run.run_id)


def test_run_monitoring_fails_a_killed_command_line_run_without_promising_a_retry():
    """The daemon's path: the launcher's health check, then run monitoring's failure."""
    with dg.instance_for_test(overrides={**RETRIES, "run_launcher": LAUNCHER}) as inst:
        run = _killed_in_process_run(inst)
        health = inst.run_launcher.check_run_worker_health(run)
        assert health.status == WorkerStatus.FAILED and "make demo" in health.msg
        inst.report_run_failed(inst.get_run_by_id(run.run_id), health.msg)  # as run monitoring does
        assert inst.get_run_by_id(run.run_id).tags[WILL_RETRY_TAG] == "false"


def test_a_demo_run_that_fails_promises_no_retry():
    """``demo.py`` tags its runs so that any failure, not only a kill, says will_retry=false."""
    from synth_xray_assets.demo import NO_AUTOMATIC_RETRY

    @dg.op
    def fails() -> None:
        raise RuntimeError("boom")

    @dg.job
    def failing_job():
        fails()

    with dg.instance_for_test(overrides=RETRIES) as inst:
        result = failing_job.execute_in_process(instance=inst, raise_on_error=False, tags=NO_AUTOMATIC_RETRY)
        assert not result.success
        assert inst.get_run_by_id(result.run_id).tags[WILL_RETRY_TAG] == "false"
        plain = failing_job.execute_in_process(instance=inst, raise_on_error=False)
        assert inst.get_run_by_id(plain.run_id).tags[WILL_RETRY_TAG] == "true"  # what the tag prevents


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


# --------------------------------------------------------------------------- one writer per output


def test_a_second_writer_waits_then_fails_naming_the_holder_and_a_killed_holder_frees_the_lock(tmp_path):
    path = lock_path(tmp_path, "dreambooth_checkpoint", "normal")
    code = (
        "import sys, time\nfrom synth_xray_assets.operations.locks import output_lock\n"
        f"with output_lock({str(path)!r}, 5, {{'run_id': 'run-A'}}):\n"
        "    print('held', flush=True); time.sleep(120)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        with pytest.raises(OutputBusyError) as caught:
            with output_lock(path, 1.0, {"run_id": "run-B"}):
                pass
        assert time.monotonic() - start >= 1.0
        message = str(caught.value)
        print(message)
        assert "run run-A" in message and f"pid {holder.pid}" in message and "lock_wait_s" in message
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        with output_lock(path, 5.0, {"run_id": "run-B"}) as waited:  # the kernel released it
            assert waited < 1.0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


RACE = """
import os, sys, time
from pathlib import Path
import dagster as dg
sys.path.insert(0, {tests!r})
from conftest import tiny_overrides_json
from synth_xray_assets.definitions import build_defs
from synth_xray_assets.resources import SettingsResource

settings = SettingsResource(data_dir={data!r}, overrides_json=tiny_overrides_json())
job = build_defs(settings).resolve_implicit_global_asset_job_def().get_subset(
    asset_selection={{dg.AssetKey("chest_xray_dataset")}}
)
go = Path({go!r})
print("ready", flush=True)
while not go.exists():
    time.sleep(0.02)
with dg.DagsterInstance.get() as instance:
    result = job.execute_in_process(instance=instance, raise_on_error=False)
print(result.run_id, result.success, flush=True)
"""


def test_two_runs_of_the_same_partition_write_one_at_a_time(tmp_path):
    home, data, go = tmp_path / "home", tmp_path / "data", tmp_path / "go"
    home.mkdir()
    dg.DagsterInstance.from_config(str(home)).dispose()  # the storage exists before both runs open it
    script = RACE.format(tests=str(REPO / "synth_xray_assets_tests"), data=str(data), go=str(go))
    env = {**os.environ, "PYTHONPATH": str(REPO), "DAGSTER_HOME": str(home)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        go.touch()  # both start at once
        done = [p.communicate(timeout=300) for p in procs]
        outs = [out.split() for out, _ in done]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(o and o[-1] == "True" for o in outs), [err[-3000:] for _, err in done]
    with dg.DagsterInstance.from_config(str(home)) as instance:
        spans = []
        for run_id in (o[-2] for o in outs):
            logs = instance.all_logs(run_id)
            holding = [e for e in logs if e.user_message.startswith("one writer: holding")]
            print(run_id[:8], holding[0].user_message if holding else "never held")
            held = [e.timestamp for e in holding]
            released = [e.timestamp for e in logs if e.user_message.startswith("one writer: releasing")]
            assert len(held) == len(released) == 1, run_id
            spans.append((held[0], released[0]))
    spans.sort()
    rel = [(round(a - spans[0][0], 2), round(b - spans[0][0], 2)) for a, b in spans]
    print(f"writer spans (s from the first): {rel}")
    assert spans[0][1] <= spans[1][0], spans  # the second held the lock only after the first let go


GPU_JOB = """
import os, signal, sys
import dagster as dg

@dg.asset(pool="gpu")
def gpu_step() -> int:
    if os.environ.get("KILL_IN_GPU_STEP"):
        os.kill(os.getpid(), signal.SIGKILL)  # as kill -9 or the out-of-memory killer would
    return 1

defs = dg.Definitions(assets=[gpu_step], jobs=[dg.define_asset_job("gpu_job", selection=[gpu_step])])
job = defs.resolve_job_def("gpu_job")
with dg.DagsterInstance.get() as instance:
    sys.exit(0 if job.execute_in_process(instance=instance).success else 1)
"""


def test_a_demo_killed_in_a_gpu_step_is_recovered_by_the_next_demo(tmp_path):
    """``make demo`` has no daemon: the next demo fails the dead run and frees its gpu slot."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO / "dagster.yaml").read_text())  # gpu pool limit 1
    script = tmp_path / "gpu_job.py"
    script.write_text(GPU_JOB)
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    killed = subprocess.run([sys.executable, str(script)], env={**env, "KILL_IN_GPU_STEP": "1"}, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    with dg.DagsterInstance.from_config(str(home)) as instance:
        (run,) = instance.get_runs()
        assert run.status == DagsterRunStatus.STARTED
        assert len(instance.event_log_storage.get_concurrency_info("gpu").claimed_slots) == 1
        messages = []
        assert recover_dead_runs(instance, messages.append) == [run.run_id]
        assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.FAILURE
        assert "is gone" in messages[0] and run.run_id in messages[0]
        assert instance.event_log_storage.get_concurrency_info("gpu").claimed_slots == []
        assert recover_dead_runs(instance, messages.append) == []  # nothing else to recover
    again = subprocess.run([sys.executable, str(script)], env=env, timeout=120)
    assert again.returncode == 0  # the slot is free: the rerun is not left waiting for it


@pytest.fixture(scope="module")
def asset_graph(tmp_path_factory):
    """The tiny settings' asset graph, built once (building it imports every domain)."""
    from conftest import tiny_settings

    from synth_xray_assets.definitions import build_defs

    return build_defs(tiny_settings(tmp_path_factory.mktemp("graph"))).resolve_asset_graph()


def test_every_asset_that_writes_holds_its_output_lock(asset_graph):
    """Every materializable asset; the observable source (it only reads a version) is not one."""
    graph = asset_graph
    unlocked = {
        key.to_user_string()
        for key in graph.materializable_asset_keys
        if not getattr(graph.get(key).assets_def.op.compute_fn.decorated_fn, "holds_output_lock", False)
    }
    assert unlocked == set(), unlocked


def test_every_gpu_step_holds_a_card(asset_graph):
    """Every asset of the gpu pool runs holding a card of its machine (``resources.on_a_card``)."""
    gpu = [asset_graph.get(k).assets_def for k in asset_graph.materializable_asset_keys]
    gpu = [a for a in gpu if a.op.pool == "gpu"]
    assert len(gpu) >= 9
    without = [a.key for a in gpu if not getattr(a.op.compute_fn.decorated_fn, "holds_a_card", False)]
    assert without == []
