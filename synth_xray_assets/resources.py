"""Dagster resources: the settings of the chosen profile, and the compute device."""

import json

import dagster as dg

from synth_xray_assets.operations.lifetime import exit_with_run_worker
from synth_xray_assets.settings import Settings


class SettingsResource(dg.ConfigurableResource):
    """The study settings of one profile (``demo`` or ``full``), with optional JSON overrides.

    ``definitions.py`` makes it from the settings it loaded (``SettingsResource.of``); every
    number lives in ``synth_xray_assets.settings``. ``overrides_json`` is per-section run
    config (the UI launchpad can change it per run), e.g. ``{"dreambooth": {"method": "lora"}}``.
    ``hf_token`` is set with ``dg.EnvVar("HF_TOKEN")`` and never logged.

    Every asset and check uses it, so its setup is where a step process of the multiprocess
    executor ties its life to the run worker's (``operations/lifetime.py``).
    """

    profile: str = "demo"
    data_dir: str = ""
    overrides_json: str = "{}"
    hf_token: str | None = None

    @classmethod
    def of(cls, settings: Settings, hf_token: str | dg.EnvVar | None = None) -> "SettingsResource":
        """The resource that hands out ``settings`` (its non-default values travel as overrides)."""
        changed = settings.model_dump(mode="json", exclude_defaults=True, exclude={"profile", "data_dir"})
        return cls(
            profile=settings.profile,
            data_dir=str(settings.data_dir),
            overrides_json=json.dumps(changed),
            hf_token=hf_token,
        )

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        exit_with_run_worker()  # a step must not outlive its run worker (a no-op in-process)

    def get(self) -> Settings:
        return Settings.for_profile(
            self.profile, self.data_dir or None, json.loads(self.overrides_json or "{}")
        )


class ComputeResource(dg.ConfigurableResource):
    """Which device the numerical work runs on.

    ``device="auto"`` takes CUDA, then Apple's MPS, then the CPU. The precision is a setting of
    the work (``dreambooth.mixed_precision``), applied on CUDA only; the CPU runs fp32.
    """

    device: str = "auto"
    # Torch threads on the CPU. 0: half the cores (at least one), leaving the rest to data-loader
    # workers and Dagster; on a 2-core machine two threads beside busy workers run far slower
    # than one (OpenMP threads wait on each other when the cores are oversubscribed).
    cpu_threads: int = 0

    def resolve_device(self) -> str:
        import torch

        from synth_xray_assets.hardware import available_cpus  # the pod's CPU limit, not the node's

        torch.set_num_threads(self.cpu_threads or max(1, available_cpus() // 2))
        if self.device != "auto":
            if self.device.startswith("cuda") and not torch.cuda.is_available():
                raise RuntimeError(
                    f"compute device {self.device!r} was asked for, but CUDA is not available here"
                )
            return self.device
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"

    def precision_for(self, device: str, wanted: str) -> str:
        """``wanted`` on CUDA; fp32 ("no") elsewhere."""
        return wanted if device.startswith("cuda") else "no"
