"""Dagster resources: the settings of the chosen profile, and the compute device.

The settings resource's config has a typed schema in the UI's launchpad: ``SettingsResource.of``
makes, from the settings the code location loaded, a subclass with one ``dg.Config`` section per
settings section and one field per setting that may change per run (types, descriptions, and the
loaded values as defaults). Settings fixed at load (``settings.FIXED_AT_LOAD``) are left out of
the sections, and a run that changes one anyway is refused naming it. A setting whose loaded value
the launchpad cannot write back (``settings.launchpad_writes``) is left out too; ``overrides_json``
still changes it per run.
"""

import contextlib
import functools
import json
import types
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

import dagster as dg
from pydantic import BaseModel, Field, create_model

from synth_xray_assets.cards import CardConfig, CardLocks, card_record, cards_used, held_cards, visible_cards
from synth_xray_assets.operations.lifetime import exit_with_run_worker
from synth_xray_assets.settings import (
    Settings,
    env_name,
    is_fixed_at_load,
    launchpad_writes,
    section_classes,
)


class SettingsResource(dg.ConfigurableResource):
    """The study settings of one profile (``demo`` or ``full``), with optional JSON overrides.

    ``definitions.py`` makes it from the settings it loaded (``SettingsResource.of``: a subclass
    whose typed sections the launchpad edits per run); every number lives in
    ``synth_xray_assets.settings``. ``hf_token`` is set with ``dg.EnvVar("HF_TOKEN")`` and never logged.

    Every asset and check uses it, so its setup is where a step process of the multiprocess
    executor ties its life to the run worker's (``operations/lifetime.py``).
    """

    profile: str = Field(default="demo", description="The profile, demo or full (fixed at load).")
    data_dir: str = Field(
        default="", description="The data root (fixed at load); empty: the repository's data/."
    )
    overrides_json: str = Field(
        default="{}",
        description='Per-section JSON overrides, e.g. {"dreambooth": {"method": "lora"}}, under the '
        "typed sections' per-run changes; prefer the typed fields.",
    )
    hf_token: str | None = Field(
        default=None, description="The Hugging Face token (from HF_TOKEN; never logged)."
    )

    @classmethod
    def of(cls, settings: Settings, hf_token: str | dg.EnvVar | None = None) -> "SettingsResource":
        """The resource that hands out ``settings``, with a typed section per settings section."""
        return loaded_settings_class(settings, hf_token)(hf_token=hf_token)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        exit_with_run_worker()  # a step must not outlive its run worker (a no-op in-process)

    def run_changes(self) -> dict[str, Any]:
        """The typed sections' per-run changes, per section (none here: see ``LoadedSettingsResource``)."""
        return {}

    def get(self) -> Settings:
        """The settings: the class's default overrides (the loaded ones), then this instance's
        ``overrides_json`` section by section, then the typed sections' per-run changes."""
        overrides = json.loads(type(self).model_fields["overrides_json"].default or "{}")
        _merge(overrides, json.loads(self.overrides_json or "{}"))
        _merge(overrides, self.run_changes())
        return Settings.for_profile(self.profile, self.data_dir or None, overrides)


class LoadedSettingsResource(SettingsResource):
    """The base of the classes ``SettingsResource.of`` makes: its typed sections' defaults are the
    loaded settings, so a value that differs from its default is a per-run change."""

    def run_changes(self) -> dict[str, Any]:
        return {
            name: changes
            for name in type(self).model_fields
            if isinstance(section := getattr(self, name), dg.Config) and (changes := _changes(section))
        }

    def loaded(self) -> Settings:
        """The settings the code location loaded (the class's defaults)."""
        default = {name: field.default for name, field in type(self).model_fields.items()}
        overrides = json.loads(default["overrides_json"] or "{}")
        return Settings.for_profile(default["profile"], default["data_dir"] or None, overrides)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        refuse_fixed_changes(self.loaded(), self.get())
        super().setup_for_execution(context)


def refuse_fixed_changes(loaded: Settings, run: Settings) -> None:
    """``ValueError`` naming every setting fixed at load whose value in ``run`` differs from ``loaded``."""
    was, now = loaded.fixed_values(), run.fixed_values()
    changed = [name for name in was if was[name] != now[name]]
    if changed:
        details = "; ".join(
            f"{n}: loaded {json.dumps(was[n])}, this run {json.dumps(now[n])}" for n in changed
        )
        raise ValueError(
            f"settings fixed when the code location loads cannot change per run ({details}): set them "
            f"in the environment ({', '.join(env_name(n) for n in changed)}) and reload the code location"
        )


def loaded_settings_class(
    settings: Settings, hf_token: str | dg.EnvVar | None = None
) -> type[SettingsResource]:
    """A ``LoadedSettingsResource`` whose defaults are ``settings``: a typed section per settings
    section (settings fixed at load left out) and these values as every field's default. A token
    given as ``dg.EnvVar`` is a default too (the launchpad shows its variable's name, not its value)."""
    sections: dict[str, Any] = {}
    for name, cls in section_classes(Settings).items():
        config = section_config_class(cls, getattr(settings, name), f"{name}.")
        if config is not None:
            sections[name] = (
                config,
                Field(default_factory=config, description=Settings.model_fields[name].description),
            )
    token = hf_token if isinstance(hf_token, dg.EnvVar) else None
    return create_model(
        "SettingsResource",
        __base__=LoadedSettingsResource,
        __doc__=SettingsResource.__doc__,
        profile=(str, Field(default=settings.profile, description=_described("profile"))),
        data_dir=(str, Field(default=str(settings.data_dir), description=_described("data_dir"))),
        overrides_json=(
            str,
            Field(default=json.dumps(settings.changes()), description=_described("overrides_json")),
        ),
        hf_token=(Optional[str], Field(default=token, description=_described("hf_token"))),  # noqa: UP045
        **sections,
    )


def section_config_class(section: type[BaseModel], values: BaseModel, prefix: str) -> type[dg.Config] | None:
    """The launchpad's form of one settings section: its per-run fields in their config form, with
    ``values`` as defaults and the settings' descriptions; None when every field is fixed at load."""
    nested = section_classes(section)
    fields: dict[str, Any] = {}
    for name, field in section.model_fields.items():
        if is_fixed_at_load(prefix + name):
            continue
        if name in nested:
            inner = section_config_class(nested[name], getattr(values, name), f"{prefix}{name}.")
            if inner is not None:
                fields[name] = (inner, Field(default_factory=inner, description=field.description))
            continue
        default = values.model_dump(mode="json", include={name})[name]
        if not launchpad_writes(default):
            continue
        fields[name] = (config_form(field.annotation), Field(default=default, description=field.description))
    if not fields:
        return None
    title = "".join(part.title() for part in prefix.strip(".").replace(".", "_").split("_"))
    return create_model(f"{title}Config", __base__=dg.Config, __doc__=section.__doc__, **fields)


def config_form(annotation: Any) -> Any:
    """The type a setting takes in Dagster config: tuples as lists, mappings as ``dict[str, ...]``,
    paths as strings; literals, numbers, strings, booleans and ``X | None`` as they are."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal or annotation in (int, float, str, bool):
        return annotation
    if annotation is Path:
        return str
    if origin in (Union, types.UnionType) and type(None) in args and len(args) == 2:
        return Optional[config_form(next(a for a in args if a is not type(None)))]  # noqa: UP045
    if origin is tuple and (args[1:] == (Ellipsis,) or len(set(args)) == 1):
        return list[config_form(args[0])]
    if origin is dict and args[0] is str:
        return dict[str, config_form(args[1])]
    raise TypeError(f"no config form for a setting of type {annotation!r}")


def _described(name: str) -> str | None:
    return SettingsResource.model_fields[name].description


def _changes(section: dg.Config) -> dict[str, Any]:
    """The fields of ``section`` (nested sections included) whose values differ from their defaults."""
    changes: dict[str, Any] = {}
    for name, field in type(section).model_fields.items():
        value = getattr(section, name)
        if isinstance(value, dg.Config):
            if inner := _changes(value):
                changes[name] = inner
        elif value != field.default:
            changes[name] = value
    return changes


def _merge(base: dict[str, Any], changes: dict[str, Any], model: type[BaseModel] = Settings) -> None:
    """Apply ``changes`` onto ``base`` in place: sections merged field by field, any other value
    (a mapping-valued setting too) replaced whole."""
    sections = section_classes(model)
    for name, value in changes.items():
        if name in sections and isinstance(base.get(name), dict):
            _merge(base[name], value, sections[name])
        else:
            base[name] = value


class ComputeResource(dg.ConfigurableResource):
    """Which device the numerical work runs on, and which card of this machine.

    ``device="auto"`` takes CUDA, then Apple's MPS, then the CPU. The precision is a setting of
    the work (``dreambooth.mixed_precision``), applied on CUDA only; the CPU runs fp32.

    A GPU step (``on_a_card``) holds one card of ``cards`` for its life (``cards.py``); while it
    does, ``resolve_device`` gives that card (``cuda:N``, made torch's current device). ``cards``
    None asks torch for the cards this process sees (none without CUDA: no lock, the CPU as before);
    tests inject fake ones.
    """

    device: str = "auto"
    # Torch threads on the CPU. 0: half the cores (at least one), leaving the rest to data-loader
    # workers and Dagster; on a 2-core machine two threads beside busy workers run far slower
    # than one (OpenMP threads wait on each other when the cores are oversubscribed).
    cpu_threads: int = 0
    cards: list[CardConfig] | None = None

    def resolve_device(self) -> str:
        import torch

        from synth_xray_assets.hardware import available_cpus  # the pod's CPU limit, not the node's

        torch.set_num_threads(self.cpu_threads or max(1, available_cpus() // 2))
        if self.device not in ("auto", "cuda"):
            if self.device.startswith("cuda") and not torch.cuda.is_available():
                raise RuntimeError(
                    f"compute device {self.device!r} was asked for, but CUDA is not available here"
                )
            return self.device
        if torch.cuda.is_available():
            return _held_card_device(torch)
        if self.device == "cuda":
            raise RuntimeError("compute device 'cuda' was asked for, but CUDA is not available here")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"

    def precision_for(self, device: str, wanted: str) -> str:
        """``wanted`` on CUDA; fp32 ("no") elsewhere."""
        return wanted if device.startswith("cuda") else "no"

    def machine_cards(self) -> list[CardConfig]:
        """The cards a GPU step may take: the injected ones, else torch's; none when the device is
        set to something other than CUDA."""
        if self.device != "auto" and not self.device.startswith("cuda"):
            return []
        return list(self.cards) if self.cards is not None else visible_cards()

    @contextlib.contextmanager
    def holding_a_card(
        self, s: Settings, holder: dict[str, Any], log: Callable[[str], None]
    ) -> Iterator[list[CardConfig]]:
        """Hold a free card of this machine (``cards.CardLocks``) for the ``with`` block; yield the
        cards held (none on a machine without cards: nothing is locked)."""
        cards = self.machine_cards()
        if not cards:
            yield []
            return
        locks = CardLocks(s.layout.card_locks, s.operations.card_wait_s, s.operations.card_poll_s, log)
        with locks.hold(cards, holder) as held:
            yield held

    @contextlib.contextmanager
    def more_cards(
        self, s: Settings, count: int, holder: dict[str, Any], totals: Sequence[int] | None = None
    ) -> Iterator[list[CardConfig]]:
        """Inside ``holding_a_card``: up to ``count`` more cards free now, as many as one of the
        usable ``totals`` allows (``CardLocks.more``)."""
        cards = self.machine_cards()
        if not cards or count <= 0:
            yield []
            return
        locks = CardLocks(s.layout.card_locks, s.operations.card_wait_s, s.operations.card_poll_s)
        with locks.more(cards, count, holder, totals) as taken:
            yield taken

    @contextlib.contextmanager
    def generation_devices(
        self, s: Settings, holder: dict[str, Any], most: int | None
    ) -> Iterator[tuple[str, ...]]:
        """Inside ``holding_a_card``: the devices a generation step splits its set over by image
        index, its own card's first, then the cards free beside it, at most ``generation.cards`` in
        all, else the step's own ``most`` (every free one when None; see ``share_of_cards``); its one
        device on a machine without cards."""
        device = self.resolve_device()
        most = s.generation.cards or most
        extra = (len(self.machine_cards()) if most is None else most) - 1
        with self.more_cards(s, extra, holder) as taken:
            on_cuda = device.startswith("cuda")
            yield (device, *(f"cuda:{c.index}" if on_cuda else device for c in taken))

    def share_of_cards(self, steps: int) -> int:
        """The cards of this machine one of ``steps`` like steps may take when they run side by side
        (at least one): the other class's generation step is not left one card."""
        return max(1, len(self.machine_cards()) // max(1, steps))


def step_holder(context: Any) -> dict[str, Any]:
    """What a card's lock file says of the step that holds it: the run and the step."""
    return {"run_id": context.run.run_id, "step": _step_name(context)}


def _held_card_device(torch: Any) -> str:
    """``cuda:N`` of the card this process holds (made torch's current device), else ``cuda``."""
    held = held_cards()
    if not held:
        return "cuda"
    torch.cuda.set_device(held[0].index)
    return f"cuda:{held[0].index}"


def on_a_card(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a GPU step's function (below ``@one_writer``, so the output lock is taken first) to
    run holding a card of this machine, and record it in the materialization's metadata
    (``gpu_cards``: index, name, key, total and peak GiB; ``ran_on``).

    The function takes ``context`` first and the ``settings`` and ``compute`` resources.
    """

    @functools.wraps(fn)
    def wrapper(context, *args: Any, **kwargs: Any) -> Any:
        s, compute = kwargs["settings"].get(), kwargs["compute"]
        with compute.holding_a_card(s, step_holder(context), context.log.info) as held:
            result = fn(context, *args, **kwargs)
            if held:
                device = compute.resolve_device()
                context.add_asset_metadata(card_metadata(list(cards_used()), device))
            return result

    wrapper.holds_a_card = True  # type: ignore[attr-defined]
    return wrapper


def card_metadata(held: list[CardConfig], device: str) -> dict[str, Any]:
    """A step's ``gpu_cards`` (one record per card: its own first, then the extra ones its shards or
    ranks ran on, whose peak memory this process cannot see) and ``ran_on`` (device, card names)."""
    names = ", ".join(f"{c.name} ({c.key})" for c in held)
    return {
        "gpu_cards": dg.MetadataValue.json(
            [card_record(c, device if i == 0 else "another process") for i, c in enumerate(held)]
        ),
        "ran_on": f"{device}: {names}",
    }


def _step_name(context: Any) -> str:
    key = context.asset_key.to_user_string()
    return key + (f"[{context.partition_key}]" if context.has_partition_key else "")
