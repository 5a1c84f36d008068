"""docs/settings.md is generated from the typed settings, is up to date, describes every setting,
and names environment variables that really set them."""

from pydantic import BaseModel, ConfigDict

from synth_xray_assets import settings_reference as reference
from synth_xray_assets.settings import (
    NOT_SETTINGS,
    PROFILE_CLASSES,
    Settings,
    dotted_value,
    env_name,
    env_value,
    load_settings,
    setting_fields,
)


def test_docs_settings_md_is_up_to_date():
    current = reference.DOC_PATH.read_text() if reference.DOC_PATH.exists() else ""
    assert current == reference.render(), (
        f"{reference.DOC_PATH} is out of date with synth_xray_assets/settings.py: run `{reference.COMMAND}`"
        " (python -m synth_xray_assets.settings_reference)"
    )


def test_every_setting_has_a_description():
    assert reference.missing_descriptions() == [], "add a docstring under each of these fields"
    assert reference.profile_only_fields() == [], (
        "declare these in the full profile's section, with a docstring"
    )


class _Undocumented(BaseModel):
    """A section with one field described and one not."""

    model_config = ConfigDict(use_attribute_docstrings=True)
    described: int = 1
    """This one has a description."""
    bare: int = 2


class _WithSection(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True)
    part: _Undocumented = _Undocumented()


def test_a_setting_without_a_description_is_found():
    assert reference.missing_descriptions(_Undocumented) == ["bare"]
    assert reference.missing_descriptions(_WithSection) == ["part.bare", "part"]


def test_the_reference_lists_every_setting_with_both_profiles_defaults_and_its_variable():
    text = reference.render()
    demo, full = (cls().model_dump(mode="json") for cls in (PROFILE_CLASSES["demo"], PROFILE_CLASSES["full"]))
    rows = {line.split(" | ")[0].strip("| `"): line for line in text.splitlines() if line.startswith("| `")}
    for name, field in setting_fields():
        row = rows[name]
        assert f"`{env_name(name)}`" in row, name
        assert reference._code(reference.shown(dotted_value(demo, name))) in row, name
        assert reference._code(reference.shown(dotted_value(full, name))) in row, name
        assert reference._cell(field.description) in row, name
    for name in NOT_SETTINGS:
        assert f"| `{name}` |" in text
    assert "| `dreambooth.lora_rank` | `int` | `8` | `8` | yes | `SYNTH_XRAY_DREAMBOOTH__LORA_RANK` |" in text
    assert "| `classifier.seeds` | `tuple[int, ...]` | `[0]` | `[0, 1, 2, 3, 4]` | no |" in text


def test_the_documented_variables_set_their_settings(clean_env, monkeypatch):
    """Under the demo profile, every documented variable set to the full profile's value (in the
    documented encoding) gives the full profile's value: the names and the encoding are right."""
    full = Settings().model_dump(mode="json")
    names = [name for name, _ in setting_fields() if name not in ("profile", "data_dir")]
    for name in names:
        monkeypatch.setenv(env_name(name), env_value(dotted_value(full, name)))
    loaded = load_settings().model_dump(mode="json")
    differ = [name for name in names if dotted_value(loaded, name) != dotted_value(full, name)]
    assert differ == []
    assert loaded["profile"] == "demo"
