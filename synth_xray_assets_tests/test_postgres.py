"""The production instance (deploy/dagster.yaml) against a real PostgreSQL 15 server."""

import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import psutil
import pytest
import sqlalchemy
from servers import LAUNCH_RUN, REPO, postgres_server, production_home, repo_env, stop_group

POOL_DEFS = Path(__file__).with_name("gpu_pool_defs.py")
# The event log stores run events under their historical names (PIPELINE_START, ...).
RUN_START, RUN_SUCCESS = dg.DagsterEventType.RUN_START.value, dg.DagsterEventType.RUN_SUCCESS.value
_NAMES = {RUN_START: "RUN_START", RUN_SUCCESS: "RUN_SUCCESS"}


def _materialize(home: Path, env: dict[str, str], asset: str) -> subprocess.Popen:
    dagster = Path(sys.executable).with_name("dagster")
    return subprocess.Popen(
        [str(dagster), "asset", "materialize", "-f", str(POOL_DEFS), "--select", asset],
        cwd=REPO,
        env={**env, "DAGSTER_HOME": str(home)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _step_intervals(pg) -> dict[str, dict[str, float]]:
    """Per run, the timestamps of its step's start and success and of its own success, from Postgres."""
    conn = pg.connect()
    try:
        cur = conn.cursor()
        cur.execute(
            "SELECT run_id, dagster_event_type, extract(epoch from timestamp) FROM event_logs "
            "WHERE dagster_event_type IN (%s, %s, %s, %s)",
            [RUN_START, "STEP_START", "STEP_SUCCESS", RUN_SUCCESS],
        )
        runs: dict[str, dict[str, float]] = {}
        for run_id, kind, ts in cur.fetchall():
            runs.setdefault(run_id, {})[_NAMES.get(kind, kind)] = float(ts)
        return runs
    finally:
        conn.close()


def _wait_for_run_starts(pg, n: int, procs: list[subprocess.Popen], timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while len([r for r in _step_intervals(pg).values() if "RUN_START" in r]) < n:
        if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
            raise AssertionError(f"{n} runs did not start: {_step_intervals(pg)}")
        time.sleep(0.3)


def test_pool_limit_holds_across_runs_in_postgres(tmp_path, monkeypatch):
    with postgres_server() as pg:
        home = production_home(tmp_path, pg, monkeypatch, {"gpu": 1})
        release = tmp_path / "release"
        env = repo_env(**pg.env(), GPU_POOL_HOLD_S="2", GPU_POOL_RELEASE_FILE=str(release))

        # The configured driver is psycopg2 (SQLAlchemy 2.1's default for postgresql:// is psycopg 3).
        with dg.DagsterInstance.from_config(str(home)) as instance:
            url = instance.run_storage.postgres_url
            assert sqlalchemy.engine.make_url(url).get_dialect().driver == "psycopg2"
            assert pg.password not in repr(instance.get_settings("storage"))  # env references, not values

        # Two runs at once, each with one step in the gpu pool (limit 1).
        procs = [_materialize(home, env, a) for a in ("gpu_step_a", "gpu_step_b")]
        outputs = []
        try:
            # Once both runs have started, the step holding the pool may finish.
            _wait_for_run_starts(pg, 2, procs)
            release.touch()
            for proc in procs:
                outputs.append(proc.communicate(timeout=300)[0])
        finally:
            for proc in procs:
                stop_group(proc)
        assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)

        runs = _step_intervals(pg)
        assert len(runs) == 2, runs
        for events in runs.values():
            assert {"RUN_START", "STEP_START", "STEP_SUCCESS", "RUN_SUCCESS"} <= set(events), events
        first, second = sorted(runs.values(), key=lambda e: e["STEP_START"])
        # Both runs were going at the same time...
        assert second["RUN_START"] < first["STEP_SUCCESS"], runs
        # ...yet their gpu steps did not overlap: the second started after the first had finished.
        assert second["STEP_START"] >= first["STEP_SUCCESS"], runs
        # The pool's slots live in Postgres: one slot (deploy/dagster.yaml), none left claimed.
        with dg.DagsterInstance.from_config(str(home)) as instance:
            _assert_one_free_gpu_slot(instance)
        print(
            f"run overlap {first['STEP_SUCCESS'] - second['RUN_START']:.1f} s; "
            f"gpu steps {first['STEP_START']:.1f}-{first['STEP_SUCCESS']:.1f} and "
            f"{second['STEP_START']:.1f}-{second['STEP_SUCCESS']:.1f}"
        )


# ----------------------------------------------------------- a killed run worker, with the daemon

# deploy/dagster.yaml as shipped (launcher, monitoring, slot freeing, retries), with its polling
# intervals shortened so that the test takes seconds (shipped: 120 s, 60 s, the coordinator's
# default); the connection comes from the DAGSTER_PG_* variables it reads.
TEST_INTERVALS = {
    "run_monitoring": {"poll_interval_seconds": 1, "free_slots_after_run_end_seconds": 1},
}
LOCATION = "gpu_pool"


def _with_test_intervals(config: dict) -> dict:
    """``config`` with only TEST_INTERVALS' values replaced (each must be in the shipped file)."""
    for section, values in TEST_INTERVALS.items():
        missing = set(values) - set(config[section])
        assert not missing, f"deploy/dagster.yaml lacks {section}.{missing}"
        config[section].update(values)
    config["run_coordinator"]["config"] = {"dequeue_interval_seconds": 1}
    return config


def _dead_run_home(tmp_path: Path, pg, monkeypatch) -> Path:
    import yaml

    home = production_home(tmp_path, pg, monkeypatch, {"gpu": 1})  # the gpu limit, set explicitly
    shipped = yaml.safe_load((home / "dagster.yaml").read_text())
    (home / "dagster.yaml").write_text(yaml.safe_dump(_with_test_intervals(shipped)))
    (tmp_path / "workspace.yaml").write_text(
        yaml.safe_dump(
            {
                "load_from": [
                    {
                        "python_file": {
                            "relative_path": str(POOL_DEFS),
                            "location_name": LOCATION,
                            "working_directory": str(POOL_DEFS.parent),
                        }
                    }
                ]
            }
        )
    )
    return home


def test_the_shipped_configs_detect_dead_runs_and_free_their_slots(tmp_path, monkeypatch):
    """deploy/dagster.yaml (Celery, bare servers) and deploy/values.yaml (Kubernetes) as shipped:
    a launcher that checks run workers, run monitoring, slot freeing, retries, nothing by age."""
    import kubernetes
    import yaml
    from dagster_k8s import K8sRunLauncher

    from synth_xray_assets.operations.launcher import LocalRunLauncher

    shipped = yaml.safe_load((REPO / "deploy" / "dagster.yaml").read_text())
    assert "postgres" in shipped["storage"]
    # Loaded as an instance with only the storage swapped for SQLite (no server needed here).
    (tmp_path / "dagster.yaml").write_text(
        yaml.safe_dump({**shipped, "storage": {"sqlite": {"base_dir": str(tmp_path)}}})
    )
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert isinstance(instance.run_launcher, LocalRunLauncher)
        assert instance.run_launcher.supports_check_run_worker_health
        assert instance.run_monitoring_enabled and "MONITORING" in instance.get_required_daemon_types()
        monitoring = instance.run_monitoring_settings
        assert 0 < monitoring["free_slots_after_run_end_seconds"] <= 300
        assert not monitoring.get("max_runtime_seconds")  # never by age
        assert instance.run_retries_enabled and instance.run_retries_max_retries >= 1

    values = yaml.safe_load((REPO / "deploy" / "values.yaml").read_text())
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    monkeypatch.setattr(kubernetes.config, "load_incluster_config", lambda *a, **k: None)
    launcher = K8sRunLauncher(
        service_account_name="dagster",
        instance_config_map="dagster-instance",
        dagster_home="/opt/dagster/dagster_home",
        load_incluster_config=True,
    )
    assert launcher.supports_check_run_worker_health  # it reads each run's Job and pod
    daemon = values["dagsterDaemon"]
    assert daemon["enabled"] and daemon["runMonitoring"]["enabled"] and daemon["runRetries"]["enabled"]
    assert 0 < daemon["runMonitoring"]["freeSlotsAfterRunEndSeconds"] <= 300
    assert "maxRuntimeSeconds" not in daemon["runMonitoring"]


def _wait(what: str, condition, timeout_s: float = 120.0, every_s: float = 0.3):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _assert_one_free_gpu_slot(instance: dg.DagsterInstance) -> None:
    """The gpu pool has one slot (deploy/dagster.yaml), none claimed and no step waiting."""
    info = instance.event_log_storage.get_concurrency_info("gpu")
    assert (info.slot_count, info.claimed_slots, info.pending_steps) == (1, [], [])


def _gpu_claims(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    info = instance.event_log_storage.get_concurrency_info("gpu")
    return [slot.step_key for slot in info.claimed_slots if slot.run_id == run_id]


def _launch(dev, asset: str) -> str:
    params = {
        "selector": {
            "repositoryLocationName": LOCATION,
            "repositoryName": "__repository__",
            "jobName": "__ASSET_JOB",
            "assetSelection": [{"path": [asset]}],
        },
        "runConfigData": {"execution": {"config": {"in_process": {}}}},
    }
    result = dev.graphql(LAUNCH_RUN, {"params": params})["launchRun"]
    assert result["__typename"] == "LaunchRunSuccess", result
    return result["run"]["runId"]


def _status_in_postgres(pg, run_id: str) -> tuple[str, dict[str, str]]:
    """The run's status and tags as the runs and run_tags tables hold them."""
    conn = pg.connect()
    try:
        cur = conn.cursor()
        cur.execute("SELECT status FROM runs WHERE run_id = %s", [run_id])
        (status,) = cur.fetchone()
        cur.execute("SELECT key, value FROM run_tags WHERE run_id = %s", [run_id])
        return status, dict(cur.fetchall())
    finally:
        conn.close()


def _retry_of(pg, run_id: str) -> str | None:
    conn = pg.connect()
    try:
        cur = conn.cursor()
        cur.execute(
            "SELECT run_id FROM run_tags WHERE key = 'dagster/parent_run_id' AND value = %s", [run_id]
        )
        row = cur.fetchone()
        return row[0] if row else None
    finally:
        conn.close()


@pytest.mark.slow
def test_a_killed_run_worker_is_failed_by_monitoring_its_slot_freed_and_the_retry_finishes(
    tmp_path, monkeypatch
):
    """SIGKILL the run worker of a gpu-pool step mid-step, with ``dagster dev`` (daemon included)
    on the Postgres instance. Its code server is paused meanwhile (as after a code server restart,
    which forgets the workers it started), so only the daemon's run monitoring can notice."""
    from dagster_dev import dagster_dev
    from dagster_postgres import PostgresRunStorage

    from synth_xray_assets.operations.launcher import run_worker_record

    with postgres_server() as pg:
        home = _dead_run_home(tmp_path, pg, monkeypatch)
        release = tmp_path / "release"
        env = repo_env(
            **pg.env(), DAGSTER_HOME=str(home), GPU_POOL_HOLD_S="1", GPU_POOL_RELEASE_FILE=str(release)
        )
        with (
            dagster_dev(env, workspace=tmp_path / "workspace.yaml") as dev,
            dg.DagsterInstance.from_config(str(home)) as instance,
        ):
            assert isinstance(instance.run_storage, PostgresRunStorage)
            run_id = _launch(dev, "gpu_step_a")
            _wait("the step to hold the gpu slot", lambda: _gpu_claims(instance, run_id))
            worker = _wait("the worker's pid", lambda: run_worker_record(instance, run_id))
            code_server = psutil.Process(worker.pid).parent()
            held = _gpu_claims(instance, run_id)
            code_server.suspend()
            try:
                victims = [*psutil.Process(worker.pid).children(recursive=True), psutil.Process(worker.pid)]
                for victim in victims:
                    victim.kill()
                t0 = time.monotonic()
                _wait("the run to be marked failed", lambda: _status_in_postgres(pg, run_id)[0] == "FAILURE")
                failed_s = time.monotonic() - t0
            finally:
                code_server.resume()
            reasons = [
                e.message
                for e in instance.all_logs(run_id)
                if e.dagster_event and e.dagster_event.event_type_value == "PIPELINE_FAILURE"
            ]
            assert any("is gone" in m and str(worker.pid) in m for m in reasons), reasons  # monitoring
            _wait("the gpu slot to be freed", lambda: not _gpu_claims(instance, run_id))
            freed_s = time.monotonic() - t0
            release.touch()  # the retry's step may finish
            retry = _wait("the retry run", lambda: _retry_of(pg, run_id))
            _wait("the retry to end", lambda: _status_in_postgres(pg, retry)[0] in ("SUCCESS", "FAILURE"))
            done_s = time.monotonic() - t0
            status, tags = _status_in_postgres(pg, retry)
            assert status == "SUCCESS", dev.log_tail()
            assert (tags["dagster/parent_run_id"], tags["dagster/retry_number"]) == (run_id, "1")
            _assert_one_free_gpu_slot(instance)
        print(
            f"killed worker pid {worker.pid} of run {run_id[:8]} holding gpu slot {held}; "
            f"FAILURE after {failed_s:.1f} s ({reasons[-1][:90]}...); slot free after {freed_s:.1f} s; "
            f"retry {retry[:8]} SUCCESS after {done_s:.1f} s"
        )
