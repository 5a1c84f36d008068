"""Where the steps run: the executor chosen by settings, and the step tags Kubernetes and Celery read.

``definitions.build_defs`` calls two functions: ``executor_for`` (multiprocess by default,
``dagster_k8s.k8s_job_executor`` or ``dagster_celery.celery_executor``) and ``with_step_tags``,
which gives every GPU step (``pool="gpu"``: assets and asset checks) the ``dagster-k8s/config``
tag (GPU limit, node selector, tolerations) and the Celery queue ``gpu``; every other step runs
on the Celery queue ``cpu`` (the executor's default queue) and carries no Kubernetes
configuration. The asset graph, partitions and automation are the same whatever the executor.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dagster as dg

from synth_xray_assets.settings import (
    ENV_PREFIX,
    DeploymentSettings,
    KubernetesSettings,
    Settings,
    env_name,
    env_value,
)

GPU_POOL = "gpu"
K8S_CONFIG_TAG = "dagster-k8s/config"  # read by dagster_k8s.get_user_defined_k8s_config
CELERY_QUEUE_TAG = "dagster-celery/queue"  # read by dagster_celery's execution loop
DATA_VOLUME = "synth-xray-data"


def gpu_k8s_config(k: KubernetesSettings) -> dict[str, Any]:
    """The step-level Kubernetes configuration of a GPU step: a GPU limit, node selector, tolerations."""
    gpus = str(k.gpus_per_step)
    return {
        "container_config": {"resources": {"limits": {k.gpu_resource: gpus}}},
        "pod_spec_config": {
            "node_selector": dict(k.gpu_node_selector),
            "tolerations": [dict(t) for t in k.gpu_tolerations],
        },
    }


def gpu_step_tags(d: DeploymentSettings) -> dict[str, str]:
    """Op tags of every step in the gpu pool."""
    return {K8S_CONFIG_TAG: json.dumps(gpu_k8s_config(d.kubernetes)), CELERY_QUEUE_TAG: d.celery.gpu_queue}


def _with_op_tags(assets_def: dg.AssetsDefinition, tags: Mapping[str, str]) -> dg.AssetsDefinition:
    """The same asset(s) with ``tags`` added to the op that computes them."""
    op = assets_def.op
    tagged = dg.OpDefinition.dagster_internal_init(
        compute_fn=op.compute_fn,
        name=op.name,
        ins={d.name: dg.In.from_definition(d) for d in op.input_defs},
        outs={d.name: dg.Out.from_definition(d) for d in op.output_defs},
        description=op.description,
        config_schema=op.config_schema,
        required_resource_keys=op.required_resource_keys,
        tags={**op.tags, **tags},
        version=None,
        retry_policy=op.retry_policy,
        code_version=op._version,  # what OpDefinition.with_replaced_properties copies
        pool=op.pool,
    )
    attributes = assets_def.get_attributes_dict()
    if isinstance(assets_def, dg.AssetChecksDefinition):
        return dg.AssetChecksDefinition.create(
            keys_by_input_name=attributes["keys_by_input_name"],
            node_def=tagged,
            check_specs_by_output_name=attributes["check_specs_by_output_name"],
            can_subset=attributes["can_subset"],
            resource_defs=attributes["resource_defs"],
        )
    return dg.AssetsDefinition.dagster_internal_init(**{**attributes, "node_def": tagged})


def _is_gpu_step(item: object) -> bool:
    return (
        isinstance(item, dg.AssetsDefinition)
        and item.is_executable
        and isinstance(item.node_def, dg.OpDefinition)
        and item.op.pool == GPU_POOL
    )


def with_step_tags(defs: dg.Definitions, d: DeploymentSettings) -> dg.Definitions:
    """``defs`` with the GPU steps tagged for Kubernetes and Celery (see the module's docstring)."""
    tags = gpu_step_tags(d)
    return dg.Definitions(
        assets=[_with_op_tags(a, tags) if _is_gpu_step(a) else a for a in defs.assets or []],
        asset_checks=[_with_op_tags(c, tags) if _is_gpu_step(c) else c for c in defs.asset_checks or []],
        schedules=defs.schedules,
        sensors=defs.sensors,
        jobs=defs.jobs,
        resources=defs.resources,
        executor=defs.executor,
        loggers=defs.loggers,
        metadata=defs.metadata,
        component_tree=defs.component_tree,
    )


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
    mounted at the same path, and the environment that gives these settings, with
    ``SYNTH_XRAY_DATA`` at the mount path."""
    k = s.deployment.kubernetes
    in_pod = s.model_copy(update={"data_dir": Path(k.data_mount_path)})
    env = [{"name": n, "value": v} for n, v in sorted(settings_environment(in_pod).items())]
    return {
        "container_config": {
            "env": env,
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
    # Dagster's default: one process per step, or all in one process when run config asks
    # (`execution: {config: {in_process: {}}}`, as the crash tests and quick debugging do).
    return dg.multi_or_in_process_executor
