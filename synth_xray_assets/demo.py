"""Materialize every asset of the current profile, in dependency order, into ``$DAGSTER_HOME``.

``make demo`` runs this (demo profile). Each stage is one of the jobs of ``definitions.py``,
run once per partition against the persistent instance, so that ``dagster dev`` then shows every
materialization, check and lineage edge. With one card or none (the CPU demo) the partitions run
one after another in this process (in-process execution); with N cards a stage's partitions run N
at a time, each in its own process (``python -m synth_xray_assets.demo --partition JOB KEY``), and
each GPU step holds a card of its own (``cards.py``). Assets resume their own work, so running this
again continues rather than starting over, also after ``kill -9``: runs whose process is gone are
failed first and their pool slots freed (``operations/recovery.py``).
"""

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import dagster as dg
from dagster._core.storage.tags import MAX_RETRIES_TAG

from synth_xray_assets.cards import visible_cards
from synth_xray_assets.definitions import PIPELINE_STAGES, defs
from synth_xray_assets.operations.lifetime import exit_with_parent
from synth_xray_assets.operations.pools import follow_the_cards
from synth_xray_assets.operations.recovery import recover_dead_runs

QUIET = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
# Runs executed here have no code location origin: the daemon cannot retry them, so they must not
# promise it (dagster/will_retry=false when they fail). Running the demo again is the retry.
NO_AUTOMATIC_RETRY = {MAX_RETRIES_TAG: "0"}


def stage_keys(instance: dg.DagsterInstance, name: str) -> list[str | None]:
    """The partition keys of stage job ``name`` ([None] when it is not partitioned)."""
    job = defs.resolve_job_def(name)
    if not job.partitions_def:
        return [None]
    return list(job.partitions_def.get_partition_keys(dynamic_partitions_store=instance))


def run_partition(instance: dg.DagsterInstance, name: str, key: str | None) -> str | None:
    """Run stage ``name`` for partition ``key`` in this process; the reason it failed, or None."""
    label = f"{name}" + (f" [{key}]" if key else "")
    print(f"==> {label}", flush=True)
    result = defs.resolve_job_def(name).execute_in_process(
        instance=instance, partition_key=key, raise_on_error=False, run_config=QUIET, tags=NO_AUTOMATIC_RETRY
    )
    if not result.success:
        return f"stage {label} failed: see the run {result.run_id} in `make dev`"
    failed = [c.check_name for c in result.get_asset_check_evaluations() if not c.passed]
    if failed:
        print(f"    {label}: checks not passed: {', '.join(failed)}", flush=True)
    return None


def run_in_child(name: str, key: str | None) -> str | None:
    """Run stage ``name`` for ``key`` in a child process (its own card); the failure, or None."""
    argv = [sys.executable, "-m", "synth_xray_assets.demo", "--partition", name, key or ""]
    code = subprocess.run(argv, check=False).returncode
    return None if code == 0 else f"stage {name} [{key}] failed (exit code {code}): see its run in `make dev`"


def run_stage(instance: dg.DagsterInstance, name: str, parallel: int) -> list[str]:
    """Every partition of stage ``name``, ``parallel`` at a time; the failures (every partition is tried)."""
    keys = stage_keys(instance, name)
    if parallel <= 1 or len(keys) <= 1:
        for key in keys:
            failure = run_partition(instance, name, key)
            if failure:
                return [failure]  # one process, one card: stop at the first failure
        return []
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        return [f for f in pool.map(lambda k: run_in_child(name, k), keys) if f]


def run_pipeline(
    instance: dg.DagsterInstance, stages: list[str] | None = None, parallel: int = 1
) -> dict[str, float]:
    """Run every stage job for every partition, ``parallel`` partitions at a time; seconds per stage."""
    timings: dict[str, float] = {}
    for name in stages or PIPELINE_STAGES:
        start = time.perf_counter()
        failures = run_stage(instance, name, parallel)
        if failures:
            raise SystemExit(
                "\n".join(failures)
                + "\nit is not retried automatically: run `make demo` again, which resumes"
            )
        timings[name] = time.perf_counter() - start
        print(f"    {name}: {timings[name]:.1f} s", flush=True)
    return timings


def main() -> None:
    if sys.argv[1:2] == ["--partition"]:  # a child of run_in_child: one stage, one partition
        exit_with_parent(os.getppid())  # a killed demo leaves no partition running, holding its locks
        with dg.DagsterInstance.get() as instance:
            failure = run_partition(instance, sys.argv[2], sys.argv[3] or None)
        raise SystemExit(failure)
    start = time.perf_counter()
    with dg.DagsterInstance.get() as instance:
        recover_dead_runs(instance)  # a killed earlier demo must not hold the gpu slot for ever
        cards = len(visible_cards())
        print(follow_the_cards(instance, cards), flush=True)  # one GPU step per card
        timings = run_pipeline(instance, sys.argv[1:] or None, parallel=cards)
    total = time.perf_counter() - start
    print("stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    print(f"all assets materialized in {total:.0f} s; see them with `make dev` (http://127.0.0.1:3000)")


if __name__ == "__main__":
    main()
