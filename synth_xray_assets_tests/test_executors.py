"""The executor by deployment: the same graph, partitions and automation under each executor, and
Dagster's own validation of the definitions for each choice."""

import subprocess
import sys
from pathlib import Path

import dagster as dg
from servers import REPO, repo_env, stop_group

from synth_xray_assets.definitions import build_defs
from synth_xray_assets.deployment import CELERY_QUEUE_TAG, GPU_POOL, K8S_CONFIG_TAG
from synth_xray_assets.settings import Settings

EXECUTORS = ("multiprocess", "k8s", "celery")


def _settings(executor: str) -> Settings:
    return Settings.for_profile("demo", overrides={"deployment": {"executor": executor}})


def _shape(defs: dg.Definitions) -> dict:
    """Everything that must not depend on the executor: assets, deps, partitions, automation, pools,
    step tags, jobs, schedules and sensors."""
    repo = defs.get_repository_def()
    graph = defs.resolve_asset_graph()
    assets = {}
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        partitions = node.partitions_def
        assets[key.to_user_string()] = (
            sorted(p.to_user_string() for p in node.parent_keys),
            partitions.get_partition_keys() if partitions else None,
            str(node.automation_condition),
            node.group_name,
        )
    steps = {}
    for job in repo.get_all_jobs():
        for node in job.graph.nodes:
            steps[(job.name, node.name)] = (node.definition.pool, dict(node.tags))
    return {
        "assets": assets,
        "steps": steps,
        "schedules": sorted(s.name for s in repo.schedule_defs),
        "sensors": sorted(s.name for s in repo.sensor_defs),
    }


def test_graph_partitions_and_automation_are_the_same_under_every_executor():
    built = {e: build_defs(_settings(e)) for e in EXECUTORS}
    for executor, defs in built.items():
        for job in defs.get_repository_def().get_all_jobs():
            expected = {"multiprocess": "multi_or_in_process_executor"}.get(executor, executor)
            if job.name == "observe_source_job":  # one small step: in the run worker everywhere
                expected = "in_process"
            assert job.executor_def.name == expected, (executor, job.name)
    shapes = [_shape(d) for d in built.values()]
    assert shapes[0] == shapes[1] == shapes[2]
    gpu = [tags for (pool, tags) in shapes[0]["steps"].values() if pool == GPU_POOL]
    other = [tags for (pool, tags) in shapes[0]["steps"].values() if pool != GPU_POOL]
    assert gpu and all(t[CELERY_QUEUE_TAG] == "gpu" and K8S_CONFIG_TAG in t for t in gpu)
    assert other and not any(CELERY_QUEUE_TAG in t or K8S_CONFIG_TAG in t for t in other)


def test_dagster_definitions_validate_passes_for_k8s_and_celery(tmp_path):
    # multiprocess (the default) is validated by .ci/run itself. Both at once: each is mostly imports.
    dagster = Path(sys.executable).with_name("dagster")
    procs = {}
    for executor in ("k8s", "celery"):
        home = tmp_path / executor  # one instance each: two processes creating one SQLite db race
        home.mkdir()
        env = repo_env(DAGSTER_HOME=str(home), SYNTH_XRAY_DEPLOYMENT__EXECUTOR=executor)
        procs[executor] = subprocess.Popen(
            [str(dagster), "definitions", "validate", "-w", str(REPO / "workspace.yaml")],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    for executor, proc in procs.items():
        try:
            out, _ = proc.communicate(timeout=300)
        finally:
            stop_group(proc)
        assert proc.returncode == 0, (executor, out[-3000:])
        assert "Validation successful" in out, (executor, out[-3000:])


def test_steps_fork_from_a_preloaded_server_only_without_nvidia_cards(monkeypatch):
    from synth_xray_assets import deployment

    monkeypatch.setattr(deployment, "nvidia_cards_present", lambda: False)
    forked = deployment._forked_steps({"multiprocess": {"max_concurrent": 2}})
    assert forked == {
        "multiprocess": {
            "start_method": {"forkserver": {"preload_modules": ["synth_xray_assets.definitions"]}},
            "max_concurrent": 2,
        }
    }
    assert deployment._forked_steps({"in_process": {}}) == {"in_process": {}}
    # With NVIDIA cards: Dagster's default (spawn); a process forked after diffusers' import
    # could not initialise CUDA.
    monkeypatch.setattr(deployment, "nvidia_cards_present", lambda: True)
    assert deployment._forked_steps({"multiprocess": {}}) == {"multiprocess": {}}
