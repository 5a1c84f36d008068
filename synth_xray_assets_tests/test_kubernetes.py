"""Kubernetes: the Job manifest of every step of the real jobs, built by dagster-k8s and validated
against the Kubernetes 1.37 schema (there is no cluster here: this is what Dagster would submit)."""

import os
import re
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import kubernetes
import kubernetes_validate
import pytest
import yaml
from conftest import tiny_settings
from dagster._core.definitions.job_base import InMemoryJob
from dagster._core.execution.api import create_execution_plan
from dagster._core.executor.init import InitExecutorContext
from dagster._core.system_config.objects import ResolvedRunConfig
from dagster_k8s.job import construct_dagster_k8s_job, get_k8s_job_name

from synth_xray_assets.definitions import build_defs
from synth_xray_assets.deployment import (
    DATA_VOLUME,
    GPU_POOL,
    settings_environment,
)
from synth_xray_assets.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[1]
K8S_VERSION = "1.37.0"
K8S = {"deployment": {"executor": "k8s"}}


def _launcher_config(values: dict) -> dict:
    """The K8sRunLauncher config the chart renders from deploy/values.yaml (the fields we set)."""
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    return {
        "instance_config_map": "dagster-instance",
        "service_account_name": "dagster",
        "dagster_home": "/opt/dagster/dagster_home",
        "postgres_password_secret": values["global"]["postgresqlSecretName"],
        "job_image": "registry.example.org/synth-xray:test",
        "image_pull_policy": launcher["imagePullPolicy"],
        "load_incluster_config": launcher["loadInclusterConfig"],
        "env_vars": launcher["envVars"],
        "volume_mounts": launcher["volumeMounts"],
        "volumes": launcher["volumes"],
    }


@pytest.fixture
def k8s_setup(monkeypatch, tmp_path):
    # No cluster: the launcher and the executor would read the pod's service account here.
    monkeypatch.setattr(kubernetes.config, "load_incluster_config", lambda *a, **k: None)
    values = yaml.safe_load((REPO / "deploy" / "values.yaml").read_text())
    settings = Settings.for_profile("full", "/data", K8S)
    launcher = {"module": "dagster_k8s", "class": "K8sRunLauncher", "config": _launcher_config(values)}
    with dg.instance_for_test(overrides={"run_launcher": launcher}) as instance:
        yield build_defs(settings), settings, instance


def _step_handler(job: dg.JobDefinition, instance: dg.DagsterInstance):
    """The real K8sStepHandler that the job's executor makes for this instance."""
    resolved = ResolvedRunConfig.build(job, {})
    context = InitExecutorContext(
        job=InMemoryJob(job),
        executor_def=job.executor_def,
        executor_config=resolved.execution.execution_engine_config,
        instance=instance,
    )
    return job.executor_def.executor_creation_fn(context)._step_handler  # noqa: SLF001


def _step_manifest(handler, instance, job, step) -> dict:
    """What K8sStepHandler.launch_step submits for ``step``, as a JSON-able manifest."""
    run = dg.DagsterRun(job_name=job.name)
    context = SimpleNamespace(
        execute_step_args=SimpleNamespace(step_keys_to_execute=[step.key]),
        dagster_run=run,
        instance=instance,
        step_tags={step.key: step.tags},
        get_step_context=lambda key: SimpleNamespace(step=step),
    )
    container_context = handler._get_container_context(context)  # noqa: SLF001 (the executor's own merge)
    name = f"dagster-step-{get_k8s_job_name(run.run_id, step.key)}"
    job_manifest = construct_dagster_k8s_job(
        job_config=container_context.get_k8s_job_config(None, instance.run_launcher),
        args=["dagster", "api", "execute_step"],
        job_name=name,
        pod_name=name,
        component="step_worker",
        user_defined_k8s_config=container_context.run_k8s_config,
        labels={"dagster/job": job.name, "dagster/op": step.key},
        env_vars=[{"name": "DAGSTER_RUN_STEP_KEY", "value": step.key}],
    )
    return kubernetes.client.ApiClient().sanitize_for_serialization(job_manifest)


def _loaded_under(env: dict[str, str], monkeypatch) -> Settings:
    """``load_settings()`` in an environment with exactly these SYNTH_XRAY_* variables."""
    for name in [n for n in os.environ if n.startswith("SYNTH_XRAY_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_settings()


def test_every_step_manifest_is_valid_and_places_gpu_steps_on_gpus(k8s_setup, monkeypatch):
    defs, s, instance = k8s_setup
    k = s.deployment.kubernetes
    gpu_steps, cpu_steps, settings_envs = set(), set(), set()
    for job in defs.get_repository_def().get_all_jobs():
        assert job.executor_def.name == "k8s", job.name
        handler = _step_handler(job, instance)
        plan = create_execution_plan(job)
        pools = {node.name: node.definition.pool for node in job.graph.nodes}
        for step in plan.get_all_steps_in_topo_order():
            manifest = _step_manifest(handler, instance, job, step)
            kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
            pod = manifest["spec"]["template"]["spec"]
            (container,) = pod["containers"]
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            # Every step: the shared data claim at the same path, the settings and profile.
            assert {"name": DATA_VOLUME, "mountPath": k.data_mount_path} in container["volumeMounts"]
            assert {"name": DATA_VOLUME, "persistentVolumeClaim": {"claimName": k.data_claim}} in pod[
                "volumes"
            ]
            assert env["SYNTH_XRAY_DATA"] == k.data_mount_path
            assert env["SYNTH_XRAY_PROFILE"] == "full"
            assert env["SYNTH_XRAY_DEPLOYMENT__EXECUTOR"] == "k8s"
            settings_envs.add(tuple(sorted((n, v) for n, v in env.items() if n.startswith("SYNTH_XRAY_"))))
            limits = (container.get("resources") or {}).get("limits") or {}
            if pools[step.node_handle.root.name] == GPU_POOL:
                gpu_steps.add(step.key)
                assert limits == {k.gpu_resource: str(k.gpus_per_step)}, step.key
                assert pod["nodeSelector"] == k.gpu_node_selector, step.key
                assert pod["tolerations"] == [dict(t) for t in k.gpu_tolerations], step.key
            else:
                cpu_steps.add(step.key)
                assert k.gpu_resource not in limits, step.key
                assert "nodeSelector" not in pod and "tolerations" not in pod, step.key
    assert {"base_model", "dreambooth_checkpoint", "synthetic_images", "classifier_experiment"} <= gpu_steps
    assert {"chest_xray_dataset", "study_report"} <= cpu_steps
    # One environment for every step, and in it the settings load as these (data at the mount path).
    (step_env,) = settings_envs
    assert _loaded_under(dict(step_env), monkeypatch) == s.model_copy(update={"data_dir": Path("/data")})
    print(
        f"{len(gpu_steps)} GPU and {len(cpu_steps)} CPU step manifests valid against Kubernetes {K8S_VERSION}"
    )


def test_shipped_manifests_and_values_agree_with_the_settings(k8s_setup):
    _, s, _ = k8s_setup
    k = s.deployment.kubernetes
    claim = yaml.safe_load((REPO / "deploy" / "data-volume.yaml").read_text())
    kubernetes_validate.validate(claim, K8S_VERSION, strict=True)
    assert claim["metadata"]["name"] == k.data_claim
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    values = yaml.safe_load((REPO / "deploy" / "values.yaml").read_text())
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["postgresql"]["postgresqlScheme"] == "postgresql+psycopg2"
    assert values["dagsterDaemon"]["runMonitoring"]["enabled"] is True
    assert values["concurrency"]["enabled"] is True and values["concurrency"]["pools"]["defaultLimit"] >= 1
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    env = {e["name"]: e["value"] for e in deployment["env"]}
    assert env["SYNTH_XRAY_DATA"] == k.data_mount_path
    assert env["SYNTH_XRAY_DEPLOYMENT__EXECUTOR"] == "k8s"
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "synth_xray_assets.definitions"]
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+-runtime-", dockerfile, re.MULTILINE)
    assert "synth_xray_assets.definitions" in dockerfile and "'.[gpu]'" in dockerfile


def test_settings_environment_gives_back_the_settings(tmp_path, monkeypatch):
    changed = {
        "deployment": {"executor": "celery", "kubernetes": {"gpus_per_step": 2}},
        "dreambooth": {"method": "lora", "instance_prompts": {"normal": "n", "pneumonia": "p"}},
    }
    for s in (
        tiny_settings(tmp_path / "data", **changed),
        Settings.for_profile("full", tmp_path / "full", {"classifier": {"seeds": (3, 4)}}),
        Settings.for_profile("demo"),
    ):
        env = settings_environment(s)
        assert all(name.startswith("SYNTH_XRAY_") for name in env)
        assert _loaded_under(env, monkeypatch) == s
