"""The production instance (deploy/dagster.yaml) against a real PostgreSQL 15 server."""

import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import sqlalchemy
from servers import REPO, postgres_server, production_home, repo_env, stop_group

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
            info = instance.event_log_storage.get_concurrency_info("gpu")
            assert (info.slot_count, info.claimed_slots, info.pending_steps) == (1, [], [])
        print(
            f"run overlap {first['STEP_SUCCESS'] - second['RUN_START']:.1f} s; "
            f"gpu steps {first['STEP_START']:.1f}-{first['STEP_SUCCESS']:.1f} and "
            f"{second['STEP_START']:.1f}-{second['STEP_SUCCESS']:.1f}"
        )
