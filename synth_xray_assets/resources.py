"""Dagster resources: the settings of the chosen profile, and the compute device."""

import json
import os

import dagster as dg

from synth_xray_assets.settings import DATA_DIR_ENV, PROFILE_ENV, Settings


class SettingsResource(dg.ConfigurableResource):
    """The study settings of one profile (``demo`` or ``full``), with optional JSON overrides.

    The profile comes from ``$SYNTH_XRAY_PROFILE`` (demo by default); every number lives in
    ``synth_xray_assets.settings``. Overrides are deep-merged, e.g.
    ``{"dreambooth": {"method": "lora"}}``.
    """

    profile: str = "demo"
    data_dir: str = ""
    overrides_json: str = "{}"

    @classmethod
    def from_env(cls) -> "SettingsResource":
        return cls(
            profile=os.environ.get(PROFILE_ENV, "demo"),
            data_dir=os.environ.get(DATA_DIR_ENV, ""),
            overrides_json=os.environ.get("SYNTH_XRAY_OVERRIDES", "{}"),
        )

    def get(self) -> Settings:
        return Settings.for_profile(
            self.profile, self.data_dir or None, json.loads(self.overrides_json or "{}")
        )


class ComputeResource(dg.ConfigurableResource):
    """Which device the numerical work runs on, at which precision, with which seed.

    ``device="auto"`` takes CUDA, then Apple's MPS, then the CPU. Mixed precision applies on
    CUDA only; the CPU runs fp32.
    """

    device: str = "auto"
    mixed_precision: str = "fp16"
    seed: int = 42
    # Torch threads on the CPU. 0: half the cores (at least one), leaving the rest to data-loader
    # workers and Dagster; on a 2-core machine two threads beside busy workers run far slower
    # than one (OpenMP threads wait on each other when the cores are oversubscribed).
    cpu_threads: int = 0

    def resolve_device(self) -> str:
        import torch

        from synth_xray_assets.deployment import available_cpus  # the pod's CPU limit, not the node's

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

    def precision_for(self, device: str, wanted: str | None = None) -> str:
        """``wanted`` (or this resource's ``mixed_precision``) on CUDA; fp32 ("no") elsewhere."""
        return (wanted or self.mixed_precision) if device.startswith("cuda") else "no"
