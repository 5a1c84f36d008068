"""The private Dagster names the dead-run detector relies on (``operations/launcher.py``,
``operations/recovery.py``), and the events it reads the run worker's pid from.

Dagster has no public API for a run launcher's health check or for freeing a dead run's pool
slots, so those modules import from ``dagster._core``. A Dagster release that moves one of these
names or changes its shape fails here, naming it, rather than every run silently reading as
alive.
"""

import ast
import importlib
import inspect
import os
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.events import EngineEventData
from dagster._core.launcher import CheckRunHealthResult, LaunchRunContext, RunLauncher, WorkerStatus
from dagster._core.storage.dagster_run import FINISHED_STATUSES, DagsterRunStatus, RunsFilter
from dagster._core.storage.event_log.base import EventLogStorage
from dagster._core.storage.runs.base import RunStorage
from dagster._core.storage.runs.sqlite.sqlite_run_storage import SqliteRunStorage
from dagster._core.storage.tags import GRPC_INFO_TAG, MAX_RETRIES_TAG
from dagster._core.test_utils import create_run_for_test

from synth_xray_assets.operations.launcher import PID_METADATA, run_worker_record

OPERATIONS = Path(__file__).resolve().parents[1] / "synth_xray_assets" / "operations"
USERS = ("launcher.py", "recovery.py")


def _private_imports() -> list[tuple[str, str, str]]:
    """(file, module, name) of every ``from dagster._... import name`` in the modules that use them."""
    found = []
    for file in USERS:
        for node in ast.walk(ast.parse((OPERATIONS / file).read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dagster._"):
                found += [(file, node.module, alias.name) for alias in node.names]
    return found


@pytest.mark.parametrize("file,module,name", _private_imports())
def test_every_private_dagster_name_used_is_still_there(file, module, name):
    try:
        value = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        pytest.fail(f"operations/{file} imports {name} from {module}, which this Dagster lacks: {error}")
    assert value is not None


def _parameters(fn) -> set[str]:
    return set(inspect.signature(fn).parameters)


def test_the_private_names_have_the_shape_the_detector_uses():
    # The health check's result and the statuses it reports.
    assert {"status", "msg", "run_worker_id"} <= set(CheckRunHealthResult._fields)
    assert CheckRunHealthResult._fields[:2] == ("status", "msg")  # built positionally
    assert {WorkerStatus.RUNNING, WorkerStatus.FAILED} <= set(WorkerStatus)
    assert "dagster_run" in LaunchRunContext._fields
    # The launcher API that LocalRunLauncher overrides.
    for member in ("launch_run", "check_run_worker_health", "supports_check_run_worker_health"):
        assert hasattr(RunLauncher, member), member
    assert isinstance(inspect.getattr_static(RunLauncher, "supports_check_run_worker_health"), property)
    assert _parameters(RunLauncher.check_run_worker_health) == {"self", "run"}
    # Run statuses, the runs filter and the tags read or written.
    assert DagsterRunStatus.STARTED.value == "STARTED"
    assert {DagsterRunStatus.FAILURE, DagsterRunStatus.SUCCESS, DagsterRunStatus.CANCELED} <= set(
        FINISHED_STATUSES
    )
    assert {"statuses", "run_ids"} <= _parameters(RunsFilter)
    assert GRPC_INFO_TAG.endswith("dagster/grpc_info") and MAX_RETRIES_TAG == "dagster/max_retries"
    assert issubclass(SqliteRunStorage, RunStorage)
    # What recovery.py calls to free a dead run's pool slots.
    for member in ("supports_global_concurrency_limits", "get_concurrency_run_ids"):
        assert hasattr(EventLogStorage, member), member
    assert _parameters(EventLogStorage.free_concurrency_slots_for_run) == {"self", "run_id"}
    # The pid metadata that run workers report (EngineEventData.in_process / .multiprocess).
    for factory in (EngineEventData.in_process, EngineEventData.multiprocess):
        assert factory(4242).metadata[PID_METADATA].value == "4242"


def test_a_real_run_reports_its_worker_pid_in_the_metadata_read():
    @dg.asset
    def one() -> None:
        pass

    with dg.instance_for_test() as instance:
        result = dg.materialize([one], instance=instance)  # in this process
        record = run_worker_record(instance, result.run_id)
        assert record is not None and record.pid == os.getpid()


def test_the_pid_is_read_from_metadata_whatever_the_message_and_never_from_a_step():
    with dg.instance_for_test() as instance:
        run = create_run_for_test(instance, job_name="j")
        assert run_worker_record(instance, run.run_id) is None
        instance.report_engine_event("any wording at all", run, EngineEventData.in_process(1111))
        assert run_worker_record(instance, run.run_id).pid == 1111
        # An engine event of one step (a step's own process) is not the run worker's.
        instance.report_engine_event("x", run, EngineEventData.in_process(2222), step_key="a_step")
        instance.report_engine_event("no pid here", run, EngineEventData(metadata={}))
        assert run_worker_record(instance, run.run_id).pid == 1111
