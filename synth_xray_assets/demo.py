"""Materialize every asset of the current profile, in dependency order, into ``$DAGSTER_HOME``.

``make demo`` runs this (demo profile). Each stage is one of the jobs of ``definitions.py``,
run once per partition, in-process, against the persistent instance, so that ``dagster dev``
then shows every materialization, check and lineage edge. Assets resume their own work, so
running this again continues rather than starting over, also after ``kill -9``: runs whose
process is gone are failed first and their pool slots freed (``operations/recovery.py``).
"""

import sys
import time

import dagster as dg
from dagster._core.storage.tags import MAX_RETRIES_TAG

from synth_xray_assets.cards import visible_cards
from synth_xray_assets.definitions import PIPELINE_STAGES, defs
from synth_xray_assets.operations.pools import follow_the_cards
from synth_xray_assets.operations.recovery import recover_dead_runs

QUIET = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
# Runs executed here have no code location origin: the daemon cannot retry them, so they must not
# promise it (dagster/will_retry=false when they fail). Running the demo again is the retry.
NO_AUTOMATIC_RETRY = {MAX_RETRIES_TAG: "0"}


def run_pipeline(instance: dg.DagsterInstance, stages: list[str] | None = None) -> dict[str, float]:
    """Run every stage job for every partition; return seconds per stage."""
    timings: dict[str, float] = {}
    for name in stages or PIPELINE_STAGES:
        job = defs.resolve_job_def(name)
        keys = (
            job.partitions_def.get_partition_keys(dynamic_partitions_store=instance)
            if job.partitions_def
            else [None]
        )
        start = time.perf_counter()
        for key in keys:
            label = f"{name}" + (f" [{key}]" if key else "")
            print(f"==> {label}", flush=True)
            result = job.execute_in_process(
                instance=instance,
                partition_key=key,
                raise_on_error=False,
                run_config=QUIET,
                tags=NO_AUTOMATIC_RETRY,
            )
            if not result.success:
                raise SystemExit(
                    f"stage {label} failed: see the run {result.run_id} in `make dev`; it is not retried "
                    "automatically: run `make demo` again, which resumes"
                )
            failed = [c.check_name for c in result.get_asset_check_evaluations() if not c.passed]
            if failed:
                print(f"    checks not passed: {', '.join(failed)}", flush=True)
        timings[name] = time.perf_counter() - start
        print(f"    {name}: {timings[name]:.1f} s", flush=True)
    return timings


def main() -> None:
    start = time.perf_counter()
    with dg.DagsterInstance.get() as instance:
        recover_dead_runs(instance)  # a killed earlier demo must not hold the gpu slot for ever
        print(follow_the_cards(instance, len(visible_cards())), flush=True)  # one GPU step per card
        timings = run_pipeline(instance, sys.argv[1:] or None)
    total = time.perf_counter() - start
    print("stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    print(f"all assets materialized in {total:.0f} s; see them with `make dev` (http://127.0.0.1:3000)")


if __name__ == "__main__":
    main()
