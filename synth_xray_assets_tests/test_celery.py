"""Celery on bare servers: a real Redis, two real workers (queues gpu and cpu), the production
Postgres instance, and a small chain of the real assets; the run's events say which worker ran
which step."""

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
from conftest import tiny_settings
from servers import REPO, postgres_server, production_home, redis_server, repo_env, stop_group

from synth_xray_assets.definitions import build_defs
from synth_xray_assets.deployment import GPU_POOL, settings_environment

CHAIN = "chest_xray_dataset,base_model"  # the dataset (and its checks) on cpu, the base model on gpu
BIN = Path(sys.executable).parent


def _worker(queue: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    """``dagster-celery worker start`` as deploy/README.md shows it: one queue, concurrency 1."""
    args = [str(BIN / "dagster-celery"), "worker", "start", "-A", "dagster_celery.app"]
    args += ["-y", str(REPO / "deploy" / "celery.yaml"), "-q", queue, "-n", queue, "--", "--concurrency=1"]
    out = open(log, "wb")  # noqa: SIM115 (the file outlives this function, closed at exit)
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=out, start_new_session=True)


@pytest.mark.slow
def test_gpu_steps_run_on_the_gpu_worker_only(tmp_path, monkeypatch):
    settings = tiny_settings(tmp_path / "data", deployment={"executor": "celery"})
    with postgres_server() as pg, redis_server() as redis_url:
        home = production_home(tmp_path, pg, monkeypatch, {"gpu": 1, "cpu": 1})
        env = repo_env(
            **pg.env(),
            DAGSTER_HOME=str(home),
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # `celery` beside our python
            **settings_environment(settings),  # the same settings in every process
            SYNTH_XRAY_CELERY_BROKER=f"{redis_url}/0",
            SYNTH_XRAY_CELERY_BACKEND=f"{redis_url}/1",
        )
        workers = [_worker(q, env, tmp_path / f"worker-{q}.log") for q in ("gpu", "cpu")]
        try:
            done = subprocess.run(
                [str(BIN / "dagster"), "asset", "materialize", "-m", "synth_xray_assets.definitions"]
                + ["--select", CHAIN],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=900,
            )
        finally:
            for worker in workers:
                stop_group(worker, grace_s=20)
        logs = "".join((tmp_path / f"worker-{q}.log").read_text()[-2000:] for q in ("gpu", "cpu"))
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:] + logs

        with dg.DagsterInstance.from_config(str(home)) as instance:
            (run,) = instance.get_runs()
            assert run.status == dg.DagsterRunStatus.SUCCESS
            workers_by_step = {}
            for record in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
                event = record.dagster_event
                worker = event.engine_event_data.metadata.get("Celery worker")
                if worker is not None:
                    workers_by_step[event.step_key] = worker.value
            succeeded = {
                r.dagster_event.step_key
                for r in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_SUCCESS)
            }

    defs = build_defs(settings)
    job = defs.get_implicit_global_asset_job_def()
    pools = {node.name: node.definition.pool for node in job.graph.nodes}
    assert set(workers_by_step) == succeeded, (workers_by_step, succeeded)
    assert {"chest_xray_dataset", "base_model"} <= succeeded
    for step, worker in workers_by_step.items():
        expected = "gpu@" if pools[step] == GPU_POOL else "cpu@"
        assert worker.startswith(expected), (step, worker)
    print(json.dumps(workers_by_step, indent=1))
