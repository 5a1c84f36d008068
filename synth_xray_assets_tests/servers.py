"""Real servers for the scaling-out tests (PostgreSQL 15, Redis), on loopback, stopped by the test.

Each server runs in its own process group and is stopped with a signal to the group, then SIGKILL
after a grace period. Under ``CI=true`` a server that cannot start fails the test; elsewhere it
skips with the reason.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
REPO = Path(__file__).resolve().parents[1]


# The GraphQL mutation that launches a run (``dagster dev``'s webserver), with every failure's message.
LAUNCH_RUN = """
mutation Launch($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}
"""


def unavailable(reason: str) -> None:
    """Fail under CI (the servers must be there), skip with the reason elsewhere."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and {reason}")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace_s: float = 15.0) -> None:
    """``sig`` to the process group, then SIGKILL to what is left after ``grace_s``."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=grace_s)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def repo_env(**extra: str) -> dict[str, str]:
    """This environment with the repository first on PYTHONPATH (our code, not an installed copy)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


@dataclass(frozen=True)
class Postgres:
    host: str
    port: int
    user: str
    password: str
    db: str

    def env(self) -> dict[str, str]:
        """The DAGSTER_PG_* variables that deploy/dagster.yaml reads."""
        return {
            "DAGSTER_PG_HOST": self.host,
            "DAGSTER_PG_PORT": str(self.port),
            "DAGSTER_PG_USERNAME": self.user,
            "DAGSTER_PG_PASSWORD": self.password,
            "DAGSTER_PG_DB": self.db,
        }

    def connect(self, db: str | None = None):
        import psycopg2

        return psycopg2.connect(
            host=self.host, port=self.port, user=self.user, password=self.password, dbname=db or self.db
        )


def _as_postgres_user() -> list[str]:
    # PostgreSQL refuses to run as root: as root, run it as the OS package's `postgres` user.
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


@contextmanager
def postgres_server(timeout_s: float = 60.0) -> Iterator[Postgres]:
    """A fresh PostgreSQL 15 cluster in a temporary folder, password auth, loopback only."""
    if not (PG_BIN / "initdb").exists():
        unavailable(f"PostgreSQL binaries not found in {PG_BIN}")
    root = Path(tempfile.mkdtemp(prefix="synth-xray-pg-"))
    proc = None
    try:
        if os.geteuid() == 0:
            shutil.chown(root, "postgres", "postgres")
        password = "pw-" + os.urandom(6).hex()
        (root / "pw").write_text(password + "\n")
        if os.geteuid() == 0:
            shutil.chown(root / "pw", "postgres", "postgres")
        initdb = [
            str(PG_BIN / "initdb"),
            "-D",
            str(root / "data"),
            "-U",
            "dagster",
            "--pwfile",
            str(root / "pw"),
        ]
        initdb += ["-A", "scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync"]
        done = subprocess.run(_as_postgres_user() + initdb, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            unavailable(f"initdb failed: {done.stderr[-500:]}")
        port = free_port()
        server = [str(PG_BIN / "postgres"), "-D", str(root / "data"), "-p", str(port), "-k", str(root)]
        server += ["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off"]
        log = open(root / "server.log", "wb")  # noqa: SIM115 (closed with the folder)
        proc = subprocess.Popen(_as_postgres_user() + server, stdout=log, stderr=log, start_new_session=True)
        pg = Postgres("127.0.0.1", port, "dagster", password, "postgres")
        _wait_until_ready(pg, proc, root, timeout_s)
        conn = pg.connect()
        conn.autocommit = True
        conn.cursor().execute("CREATE DATABASE dagster")
        conn.close()
        yield Postgres("127.0.0.1", port, "dagster", password, "dagster")
    finally:
        if proc is not None:
            stop_group(proc, signal.SIGINT)  # SIGINT: PostgreSQL's fast shutdown
        shutil.rmtree(root, ignore_errors=True)


def _wait_until_ready(pg: Postgres, proc: subprocess.Popen, root: Path, timeout_s: float) -> None:
    import psycopg2

    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            unavailable(f"postgres exited: {(root / 'server.log').read_text()[-500:]}")
        try:
            pg.connect().close()
            return
        except psycopg2.OperationalError as error:
            if time.monotonic() > deadline:
                unavailable(f"postgres did not accept connections in {timeout_s:.0f} s: {error}")
        time.sleep(0.3)


@contextmanager
def redis_server(timeout_s: float = 30.0) -> Iterator[str]:
    """A Redis server on a free loopback port, nothing persisted; yields its URL (database 0)."""
    binary = shutil.which("redis-server")
    if not binary:
        unavailable("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        import redis

        client = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                unavailable(f"redis-server exited with {proc.returncode}")
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    unavailable(f"redis-server did not answer in {timeout_s:.0f} s")
                time.sleep(0.2)
        yield f"redis://127.0.0.1:{port}"
    finally:
        stop_group(proc)


def production_home(root: Path, pg: Postgres, monkeypatch, pools: dict[str, int]) -> Path:
    """A DAGSTER_HOME with deploy/dagster.yaml on ``pg``, the pools' limits set as deploy/README.md
    says (what `dagster instance concurrency set POOL N` does). ``pg``'s variables stay set here."""
    import dagster as dg

    home = root / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "deploy" / "dagster.yaml", home / "dagster.yaml")
    for key, value in pg.env().items():
        monkeypatch.setenv(key, value)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        for pool, limit in pools.items():
            instance.event_log_storage.set_concurrency_slots(pool, limit)
    return home
