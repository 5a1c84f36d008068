"""Where the steps run: the executor chosen by settings, and the step tags Kubernetes and Celery read.

``definitions.build_defs`` calls ``executor_for`` (multiprocess by default,
``dagster_k8s.k8s_job_executor`` or ``dagster_celery.celery_executor``). The domains make their GPU
steps (assets and asset checks) with ``gpu_step(settings, kind)`` as decorator arguments: the
``gpu`` pool and the op tags ``dagster-k8s/config`` (GPU limit, CPU and memory by kind of step,
tolerations, a node selector if set) and the Celery queue ``gpu``. Every other step runs on the
Celery queue ``cpu`` (the executor's default queue) and gets its Kubernetes size from the
executor's ``step_k8s_config``. The asset graph, partitions and automation are the same whatever
the executor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import dagster as dg

from synth_xray_assets.settings import (
    ENV_PREFIX,
    DeploymentSettings,
    KubernetesSettings,
    PodSize,
    Settings,
    env_name,
    env_value,
)

GPU_POOL = "gpu"
K8S_CONFIG_TAG = "dagster-k8s/config"  # read by dagster_k8s.get_user_defined_k8s_config
CELERY_QUEUE_TAG = "dagster-celery/queue"  # read by dagster_celery's execution loop
DATA_VOLUME = "synth-xray-data"
# Kinds of GPU step, each with its row in settings deployment.kubernetes.step_sizes.
GpuStepKind = Literal["diffusion", "dreambooth", "classifier"]


def pod_resources(size: PodSize, gpus: int = 0, gpu_resource: str = "nvidia.com/gpu") -> dict[str, Any]:
    """A container's requests and limits: ``size`` per GPU (once for a step without GPU), requests
    equal to limits (Guaranteed QoS). A GPU count goes in the limits (Kubernetes copies it to the
    requests)."""
    scale = max(gpus, 1)
    host = {"cpu": str(size.cpu * scale), "memory": f"{size.memory_gib * scale}Gi"}
    limits = {**host, **({gpu_resource: str(gpus)} if gpus else {})}
    return {"requests": dict(host), "limits": limits}


def gpu_k8s_config(k: KubernetesSettings, kind: GpuStepKind, gpus: int | None = None) -> dict[str, Any]:
    """The step-level Kubernetes configuration of a GPU step of ``kind``: its CPU, memory and GPUs
    (``gpus``, else ``k.gpus_per_step``), its tolerations, and the node selector when one is set."""
    size = getattr(k.step_sizes, kind)
    pod_spec: dict[str, Any] = {"tolerations": [dict(t) for t in k.gpu_tolerations]}
    if k.gpu_node_selector:
        pod_spec["node_selector"] = dict(k.gpu_node_selector)
    return {
        "container_config": {"resources": pod_resources(size, gpus or k.gpus_per_step, k.gpu_resource)},
        "pod_spec_config": pod_spec,
    }


def gpu_op_tags(d: DeploymentSettings, kind: GpuStepKind, gpus: int | None = None) -> dict[str, str]:
    """Op tags of a GPU step of ``kind`` on ``gpus`` cards (None: ``kubernetes.gpus_per_step``): its
    Kubernetes configuration and its Celery queue."""
    return {
        K8S_CONFIG_TAG: json.dumps(gpu_k8s_config(d.kubernetes, kind, gpus)),
        CELERY_QUEUE_TAG: d.celery.gpu_queue,
    }


def gpu_step(s: Settings, kind: GpuStepKind) -> dict[str, Any]:
    """Decorator arguments (``dg.asset`` / ``dg.asset_check``) of a step that needs a GPU: the gpu
    pool (one such step per card) and the op tags of ``kind``. A DreamBooth step set to train on k
    cards (``dreambooth.data_parallel_cards``) asks Kubernetes for k GPUs and k times the host."""
    gpus = s.dreambooth.data_parallel_cards if kind == "dreambooth" else None
    return {"pool": GPU_POOL, "op_tags": gpu_op_tags(s.deployment, kind, gpus)}


def settings_environment(s: Settings) -> dict[str, str]:
    """The environment under which ``settings.load_settings`` gives back ``s``: the profile, the data
    folder, and ``SYNTH_XRAY_<SECTION>__<FIELD>`` for every field that differs from the profile's
    default (JSON for all but strings). Derived from the settings alone, so it carries no secret."""
    env = {f"{ENV_PREFIX}PROFILE": s.profile, f"{ENV_PREFIX}DATA": str(s.data_dir)}
    for section, fields in s.changes().items():
        for name, value in fields.items():
            env[env_name(f"{section}.{name}")] = env_value(value)
    return env


def every_step_k8s_config(s: Settings) -> dict[str, Any]:
    """Kubernetes configuration of every step pod: the shared data volume (a ReadWriteMany claim)
    mounted at the same path, the environment that gives these settings (``SYNTH_XRAY_DATA`` at
    the mount path), and the size of a step without GPU."""
    k = s.deployment.kubernetes
    in_pod = s.model_copy(update={"data_dir": Path(k.data_mount_path)})
    env = [{"name": n, "value": v} for n, v in sorted(settings_environment(in_pod).items())]
    return {
        "container_config": {
            "env": env,
            # GPU steps' own sizes (gpu_k8s_config) are merged over this one (dagster-k8s merges
            # step tags into the executor's config key by key).
            "resources": pod_resources(k.step_sizes.cpu),
            "volume_mounts": [{"name": DATA_VOLUME, "mount_path": k.data_mount_path}],
        },
        "pod_spec_config": {
            "volumes": [{"name": DATA_VOLUME, "persistent_volume_claim": {"claim_name": k.data_claim}}]
        },
    }


def executor_for(s: Settings) -> dg.ExecutorDefinition:
    """The executor of ``s.deployment.executor``: multiprocess, Kubernetes Jobs, or Celery."""
    d = s.deployment
    if d.executor == "k8s":
        from dagster_k8s import k8s_job_executor

        config: dict[str, Any] = {"step_k8s_config": every_step_k8s_config(s)}
        if d.kubernetes.namespace:
            config["job_namespace"] = d.kubernetes.namespace
        return k8s_job_executor.configured(config, name="k8s")
    if d.executor == "celery":
        from dagster_celery import celery_executor

        return celery_executor.configured(
            {
                "broker": {"env": d.celery.broker_env},
                "backend": {"env": d.celery.backend_env},
                # Steps without a queue tag (everything but the gpu pool) go to the cpu queue.
                "config_source": {"task_default_queue": d.celery.cpu_queue},
            },
            name="celery",
        )
    return local_executor


PRELOADED = "synth_xray_assets.definitions"  # imported once per run, by the fork server


def nvidia_cards_present() -> bool:
    """Whether this host shows NVIDIA cards (device nodes or the driver's /proc entries), found
    without torch: importing diffusers asks torch for the device count, after which a forked
    process cannot initialise CUDA."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return any(Path("/dev").glob("nvidia[0-9]*")) or (gpus.is_dir() and any(gpus.iterdir()))


def _forked_steps(config: dict[str, Any]) -> dict[str, Any]:
    """Multiprocess mode starts its steps from a fork server unless run config names a start method,
    or the host has NVIDIA cards (then Dagster's default, spawn)."""
    if "multiprocess" not in config or nvidia_cards_present():
        return config
    forked = {"forkserver": {"preload_modules": [PRELOADED]}}
    return {"multiprocess": {"start_method": forked, **config["multiprocess"]}}


# Dagster's default executor (one process per step, or all in one process when run config asks:
# `execution: {config: {in_process: {}}}`, as the crash tests and quick debugging do), with its
# step processes forked from a fork server that has imported the code location once per run
# (multiprocessing "forkserver", preloading the definitions). Spawned, every
# step process imported torch, diffusers and the definitions again: 20-30 s per step on a 2-core
# machine, for checks that then run in a second. Only on hosts without NVIDIA cards: importing the
# definitions imports diffusers, which asks torch for the CUDA device count, and a process forked
# after that cannot initialise CUDA ("Cannot re-initialize CUDA in forked subprocess"); GPU hosts
# spawn their steps as before. A step still dies with its run worker (operations/lifetime.py: the
# fork server exits with the run worker, and the step with the fork server).
local_executor = dg.multi_or_in_process_executor.configured(
    _forked_steps,
    name="multi_or_in_process_executor",
    config_schema=dg.Field(
        dg.Selector(
            {
                "multiprocess": dg.Field(dg.Permissive(), is_required=False, default_value={}),
                "in_process": dg.Field(dg.Permissive(), is_required=False, default_value={}),
            }
        ),
        default_value={"multiprocess": {}},
    ),
)
