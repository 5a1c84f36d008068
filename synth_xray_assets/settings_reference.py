"""``docs/settings.md``, the settings reference, generated from the typed settings in ``settings.py``.

``python -m synth_xray_assets.settings_reference`` (``make settings-docs``) writes it; ``--check``
exits 1 when the file differs from what the settings give. Per section: each field's type, its
default in the demo and the full profile, whether the launchpad can change it per run, the
environment variable that sets it, and its description (the docstring under the field); then the
``SYNTH_XRAY_*`` variables that are not settings. Plain Python: nothing here knows Dagster.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

from synth_xray_assets.settings import (
    ENV_PREFIX,
    NOT_SETTINGS_USES,
    PROFILE_CLASSES,
    REPO_ROOT,
    Settings,
    dotted_value,
    env_name,
    is_fixed_at_load,
    launchpad_writes,
    section_classes,
    setting_fields,
)
from synth_xray_assets.storage import write_bytes_atomic

DOC_PATH = REPO_ROOT / "docs" / "settings.md"
COMMAND = "make settings-docs"  # or: python -m synth_xray_assets.settings_reference

HEADER = f"""# Settings reference

Generated from `synth_xray_assets/settings.py` by `{COMMAND}`
(`python -m synth_xray_assets.settings_reference`): do not edit it by hand; a test fails when it is
out of date.

Every setting has a default in each profile: **demo** (the default; phantoms and tiny models,
offline on a CPU) and **full** (the study, Stable Diffusion 2.1 on GPUs). `SYNTH_XRAY_PROFILE`
picks the profile and `SYNTH_XRAY_DATA` the data root.

## Changing a setting

- **Environment**, read when the code location loads (restart `make dev`, or reload the code
  location in the UI's Deployment page): `{ENV_PREFIX}<SECTION>__<FIELD>`, e.g.
  `{ENV_PREFIX}DREAMBOOTH__METHOD=lora`. Strings as they are; numbers, booleans, lists and mappings
  as JSON (`{ENV_PREFIX}CLASSIFIER__SEEDS='[0, 1]'`), `null` for None. A mapping given this way
  replaces the profile's whole mapping; `{ENV_PREFIX}<SECTION>` takes a whole section as JSON. An
  unknown `{ENV_PREFIX}*` variable stops loading and names the nearest valid one.
- **Per run, in the launchpad** (column *Per run*: yes): under
  `resources: settings: config: <section>: <field>`, e.g.

  ```yaml
  resources:
    settings:
      config:
        dreambooth:
          method: lora
  ```

  The editor completes sections and fields, shows types, defaults (the loaded settings) and these
  descriptions, and refuses an unknown field or a wrong value before the run starts. Config forms:
  tuples are lists (`[0, 1]`), mappings are maps, paths are strings. Settings marked
  *`overrides_json`* have a default below 1e-6, which the launchpad writes as `1e-8` and its
  webserver then reads as a string (YAML 1.1): they are not typed fields; change them per run in
  the `overrides_json` field (`{{"dreambooth": {{"adam_epsilon": 1e-7}}}}`). Settings marked *no* shape the
  definitions when the code location loads (partitions, the schedule, the automation, the
  executor, where the data lives): they are not in the launchpad's sections, and a run that
  changes one anyway (through `overrides_json`, `profile` or `data_dir`) fails before its first
  step, naming it. Change them through the environment and reload the code location.

Each materialization records the settings it read in its metadata: `settings_sha256` (a hash of
every setting but `data_dir`) and `settings_changed` (the values that differ from the profile's
defaults).
"""


def missing_descriptions(model: type[BaseModel] = Settings) -> list[str]:
    """Dotted names of the settings (sections included) of ``model`` that have no description."""
    missing = [name for name, field in setting_fields(model) if not (field.description or "").strip()]
    for name, section in _sections(model).items():
        if not (model_field(model, name).description or "").strip():
            missing.append(name)
        if not (section.__doc__ or "").strip():
            missing.append(f"{name} (the section's docstring)")
    return missing


def profile_only_fields() -> list[str]:
    """Fields a profile class declares that the full profile does not (the reference would miss them)."""
    full = {name for name, _ in setting_fields(Settings)}
    return sorted({name for cls in PROFILE_CLASSES.values() for name, _ in setting_fields(cls)} - full)


def model_field(model: type[BaseModel], dotted: str):
    """The pydantic field of the dotted name ``dotted`` in ``model``."""
    head, _, rest = dotted.partition(".")
    if not rest:
        return model.model_fields[head]
    return model_field(section_classes(model)[head], rest)


def _sections(model: type[BaseModel], prefix: str = "") -> dict[str, type[BaseModel]]:
    """Every section of ``model``, nested ones too, by dotted name, in order."""
    found: dict[str, type[BaseModel]] = {}
    for name, section in section_classes(model).items():
        found[f"{prefix}{name}"] = section
        found.update(_sections(section, f"{prefix}{name}."))
    return found


def type_name(annotation: Any) -> str:
    """A readable name of a field's type: ``int | None``, ``tuple[int, ...]``, ``"full" | "lora"``."""
    origin = get_origin(annotation)
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in get_args(annotation))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in get_args(annotation))
    if origin is not None:
        args = ", ".join("..." if a is Ellipsis else type_name(a) for a in get_args(annotation))
        return f"{origin.__name__}[{args}]"
    if annotation is type(None):
        return "None"
    return annotation.__name__


def shown(value: Any) -> str:
    """A default as the reference shows it: JSON, with paths under the repository made relative."""
    if isinstance(value, str) and value.startswith(str(REPO_ROOT)):
        value = "<repository>" + value[len(str(REPO_ROOT)) :]
    return json.dumps(value, ensure_ascii=False)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _code(text: str) -> str:
    return f"`{_cell(text)}`"


def _defaults() -> dict[str, dict[str, Any]]:
    """Each profile's default settings as JSON-able data (no environment read)."""
    return {p: cls().model_dump(mode="json") for p, cls in PROFILE_CLASSES.items()}


def _table(model: type[BaseModel], prefix: str, defaults: dict[str, dict[str, Any]]) -> list[str]:
    rows = [
        "| Setting | Type | Demo | Full | Per run | Environment variable | Description |",
        "|---|---|---|---|---|---|---|",
    ]
    sections = section_classes(model)
    for name, field in model.model_fields.items():
        if name in sections:
            continue
        dotted = f"{prefix}{name}"
        values = [_code(shown(dotted_value(defaults[p], dotted))) for p in ("demo", "full")]
        per_run = _per_run(dotted, [dotted_value(defaults[p], dotted) for p in ("demo", "full")])
        cells = [_code(dotted), _code(type_name(field.annotation)), *values, per_run, _code(env_name(dotted))]
        rows.append("| " + " | ".join([*cells, _cell(field.description or "")]) + " |")
    return rows


def _per_run(name: str, defaults: list[Any]) -> str:
    if is_fixed_at_load(name):
        return "no"
    return "yes" if all(launchpad_writes(v) for v in defaults) else "`overrides_json`"


def render() -> str:
    """The whole reference, as Markdown. ``ValueError`` when a setting has no description."""
    missing = missing_descriptions() + profile_only_fields()
    if missing:
        raise ValueError(f"settings without a description (a docstring under the field): {missing}")
    defaults = _defaults()
    lines = [HEADER, "## Top level", "", *_table(Settings, "", defaults), ""]
    for dotted, section in _sections(Settings).items():
        lines += [f"## {dotted}", "", " ".join((section.__doc__ or "").split()), ""]
        lines += [*_table(section, f"{dotted}.", defaults), ""]
    lines += [
        f"## Other {ENV_PREFIX}* variables",
        "",
        "Not settings: each is read by its own code, and loading accepts them "
        "(`settings.NOT_SETTINGS`). The Hugging Face token comes from `HF_TOKEN` (never logged).",
        "",
        "| Variable | What it holds |",
        "|---|---|",
        *(f"| `{name}` | {_cell(use)} |" for name, use in sorted(NOT_SETTINGS_USES.items())),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is out of date")
    parser.add_argument("--output", type=Path, default=DOC_PATH)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is out of date: run `{COMMAND}`", file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(args.output, text.encode())
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
