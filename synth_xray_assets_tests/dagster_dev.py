"""A live ``dagster dev`` (webserver, daemon, code server) for tests, on a free loopback port.

Started in its own process group with ``DAGSTER_HOME`` and the settings given, importing this
checkout (``PYTHONPATH`` and the working directory are the repository root, whatever the venv's
editable install points to); stopped with SIGTERM to the group, then SIGKILL to the group and to
every process it started (runs included) after a grace period.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import psutil
import pytest
from servers import stop_group

from synth_xray_assets.settings import ENV_PREFIX

REPO = Path(__file__).resolve().parents[1]
STOP_GRACE_S = 20


@dataclass
class DagsterDev:
    """A running ``dagster dev``: its URL, GraphQL endpoint, instance folder and log."""

    port: int
    home: Path
    log: Path
    proc: subprocess.Popen

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        """The ``data`` of a GraphQL answer; a GraphQL error fails the test with its message."""
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        req = urllib.request.Request(
            f"{self.url}/graphql", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=30) as response:
            answer = json.loads(response.read())
        if answer.get("errors"):
            pytest.fail(f"GraphQL error: {answer['errors']}")
        return answer["data"]

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dev_env(home: Path, data_dir: Path, overrides_json: str) -> dict[str, str]:
    """The environment of a process that loads this checkout with these settings: each section
    of ``overrides_json`` as ``SYNTH_XRAY_<SECTION>`` (JSON, read by ``load_settings``)."""
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    sections = {
        f"{ENV_PREFIX}{name.upper()}": json.dumps(v) for name, v in json.loads(overrides_json).items()
    }
    return {
        **env,
        **sections,
        "DAGSTER_HOME": str(home),
        f"{ENV_PREFIX}DATA": str(data_dir),
        "PYTHONPATH": path,
    }


def materialized_instance(root: Path, overrides_json: str) -> tuple[Path, Path]:
    """A Dagster home (the repository's dagster.yaml) under ``root`` with the source observed and
    the dataset materialized, in this process; returns the home and the data folder."""
    from synth_xray_assets.definitions import build_defs
    from synth_xray_assets.resources import SettingsResource

    home, data = root / "dagster_home", root / "data"
    home.mkdir(parents=True)
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    defs = build_defs(SettingsResource(data_dir=str(data), overrides_json=overrides_json))
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert defs.resolve_job_def("observe_source_job").execute_in_process(instance=instance).success
        result = defs.resolve_job_def("prepare_job").execute_in_process(
            instance=instance, asset_selection=[dg.AssetKey("chest_xray_dataset")]
        )
        assert result.success
    return home, data


_READY = """{
  workspaceOrError { ... on Workspace { locationEntries {
    loadStatus locationOrLoadError { __typename } } } }
  instance { daemonHealth { allDaemonStatuses { daemonType healthy } } }
}"""


def _ready(dev: DagsterDev) -> bool:
    try:
        data = dev.graphql(_READY)
    except OSError:
        return False
    entries = data["workspaceOrError"].get("locationEntries") or []
    loaded = bool(entries) and all(
        e["loadStatus"] == "LOADED" and e["locationOrLoadError"]["__typename"] == "RepositoryLocation"
        for e in entries
    )
    daemons = data["instance"]["daemonHealth"]["allDaemonStatuses"]
    return loaded and bool(daemons) and all(d["healthy"] for d in daemons)


@contextmanager
def dagster_dev(
    env: dict[str, str], timeout_s: float = 300, workspace: Path = REPO / "workspace.yaml"
) -> Iterator[DagsterDev]:
    """``dagster dev`` on a free port (the repository's workspace unless ``workspace`` is given),
    yielded once its code location loaded and its daemons are healthy."""
    home = Path(env["DAGSTER_HOME"])
    port = free_port()
    log = home / "dagster-dev.log"
    dagster = Path(sys.executable).with_name("dagster")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(dagster), "dev", "-w", str(workspace), "-h", "127.0.0.1", "-p", str(port)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    dev = DagsterDev(port, home, log, proc)
    try:
        deadline = time.monotonic() + timeout_s
        while not _ready(dev):
            if proc.poll() is not None:
                pytest.fail(f"dagster dev exited with {proc.returncode}:\n{dev.log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"dagster dev not ready in {timeout_s:.0f} s:\n{dev.log_tail()}")
            time.sleep(2)
        yield dev
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, then SIGKILL it and every descendant still alive."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    stop_group(proc, grace_s=STOP_GRACE_S)
    for child in children:  # runs may have left the group (their own sessions)
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(children, timeout=10)
