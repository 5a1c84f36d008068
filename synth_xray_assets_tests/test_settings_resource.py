"""The settings resource's typed launchpad config: sections and fields with the loaded settings as
defaults and the settings' descriptions; wrong fields and values refused by Dagster's config
validation; per-run changes applied on top of the loaded settings; settings fixed at load refused;
every materialization's metadata naming the settings it read."""

import json
from pathlib import Path
from typing import Literal

import dagster as dg
import pytest
from conftest import tiny_settings

from synth_xray_assets.dataset import assets as dataset_assets
from synth_xray_assets.definitions import build_defs
from synth_xray_assets.metadata import settings_metadata
from synth_xray_assets.resources import SettingsResource, config_form
from synth_xray_assets.settings import (
    FIXED_AT_LOAD,
    Settings,
    is_fixed_at_load,
    launchpad_writes,
    setting_fields,
)


def _schema(resource: SettingsResource) -> dict:
    return resource.get_resource_definition().config_schema.as_field().config_type.fields


def _run_config(**sections) -> dict:
    return {"resources": {"settings": {"config": sections}}}


@dg.asset
def settings_probe(settings: SettingsResource) -> dg.MaterializeResult:
    """Records the settings the run handed out, and whether the Hub token arrived (never its value)."""
    s = settings.get()
    return dg.MaterializeResult(
        metadata={
            **settings_metadata(s),
            "settings": dg.MetadataValue.json(s.model_dump(mode="json")),
            "has_token": settings.hf_token == "token-for-the-test",
        }
    )


def _probe(resource: SettingsResource, run_config: dict) -> dg.ExecuteInProcessResult:
    with dg.instance_for_test() as instance:
        return dg.materialize(
            [settings_probe],
            resources={"settings": resource},
            run_config=run_config,
            instance=instance,
            raise_on_error=False,
        )


def test_the_launchpad_schema_has_every_per_run_setting_typed_with_loaded_defaults(tmp_path):
    loaded = tiny_settings(tmp_path, classifier={"epochs": 3})
    fields = _schema(SettingsResource.of(loaded))
    offered = set()
    for name, field in setting_fields():
        section, *rest = name.split(".")
        if not rest:
            continue
        if section not in fields or rest[0] not in fields[section].config_type.fields:
            value = loaded.model_dump(mode="json")[section][rest[0]]
            assert is_fixed_at_load(name) or not launchpad_writes(value), f"{name}: not in the launchpad"
            continue
        assert not is_fixed_at_load(name), f"{name} is fixed at load but the launchpad offers it"
        config = fields[section].config_type.fields[rest[0]]
        assert config.description == field.description
        assert config.default_value == loaded.model_dump(mode="json")[section][rest[0]], name
        offered.add(name)
    assert {"dataset.resolution", "dreambooth.method", "classifier.epochs"} <= offered
    assert fields["dataset"].config_type.fields["resolution"].default_value == 32  # the tiny value
    assert fields["classifier"].config_type.fields["epochs"].default_value == 3
    method = fields["dreambooth"].config_type.fields["method"].config_type
    assert sorted(v.config_value for v in method.enum_values) == ["full", "lora"]
    assert "automation" not in fields and "deployment" not in fields  # every field fixed at load
    assert "adam_epsilon" not in fields["dreambooth"].config_type.fields  # 1e-08: see launchpad_writes


def test_a_token_from_the_environment_shows_by_name_and_survives_a_per_run_change(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "token-for-the-test")
    resource = SettingsResource.of(tiny_settings(tmp_path), dg.EnvVar("HF_TOKEN"))
    assert _schema(resource)["hf_token"].default_value == {"env": "HF_TOKEN"}
    result = _probe(resource, _run_config(dreambooth={"method": "lora"}))
    assert result.success
    assert result.asset_materializations_for_node("settings_probe")[0].metadata["has_token"].value is True


@pytest.mark.parametrize(
    "sections, named",
    [
        ({"dreambooth": {"methd": "lora"}}, 'unexpected config entry "methd"'),
        ({"dreambooth": {"method": "qlora"}}, "dreambooth:method"),
        ({"dataset": {"resolution": "large"}}, "dataset:resolution"),
        ({"classifier": {"seeds": [0, 1]}}, 'unexpected config entry "seeds"'),
        ({"automation": {"eager_through": "reports"}}, 'unexpected config entry "automation"'),
    ],
)
def test_a_wrong_field_or_value_is_refused_before_the_run(tmp_path, sections, named):
    defs = build_defs(tiny_settings(tmp_path))
    job = defs.resolve_job_def("prepare_job")
    with pytest.raises(dg.DagsterInvalidConfigError) as err:
        dg.validate_run_config(job, _run_config(**sections))
    assert named in str(err.value)


def test_a_run_changes_the_fields_it_names_and_keeps_every_other_loaded_setting(tmp_path):
    loaded = tiny_settings(tmp_path, classifier={"seeds": (0, 1)})
    prompts = {"normal": "clear lungs", "pneumonia": "opacity"}
    run_config = _run_config(
        dataset={"verify_sample": 5},
        dreambooth={"instance_prompts": prompts, "max_train_steps": None},
        phantoms={"split_counts": {"train": [3, 4], "validation": [1, 1], "test": [2, 2]}},
    )
    result = _probe(SettingsResource.of(loaded), run_config)
    assert result.success
    metadata = result.asset_materializations_for_node("settings_probe")[0].metadata
    expected = loaded.model_copy(
        update={
            "dataset": loaded.dataset.model_copy(update={"verify_sample": 5}),
            "dreambooth": loaded.dreambooth.model_copy(
                update={"instance_prompts": prompts, "max_train_steps": None}
            ),
            "phantoms": loaded.phantoms.model_copy(
                update={"split_counts": {"train": (3, 4), "validation": (1, 1), "test": (2, 2)}}
            ),
        }
    )
    assert metadata["settings"].value == expected.model_dump(mode="json")
    assert metadata["settings_sha256"].value == expected.digest() != loaded.digest()
    assert metadata["settings_changed"].value["dataset"]["verify_sample"] == 5
    # without run config: the loaded settings, exactly
    result = _probe(SettingsResource.of(loaded), {})
    metadata = result.asset_materializations_for_node("settings_probe")[0].metadata
    assert metadata["settings"].value == loaded.model_dump(mode="json")


def test_overrides_json_given_per_run_applies_over_the_loaded_settings(tmp_path):
    loaded = tiny_settings(tmp_path, dreambooth={"adam_epsilon": 2e-8})
    assert "adam_epsilon" not in _schema(SettingsResource.of(loaded))["dreambooth"].config_type.fields
    overrides = {"evaluation": {"kid_subsets": 7}, "dreambooth": {"adam_epsilon": 1e-7}}
    run_config = _run_config(overrides_json=json.dumps(overrides), dataset={"verify_seed": 3})
    result = _probe(SettingsResource.of(loaded), run_config)
    assert result.success
    got = result.asset_materializations_for_node("settings_probe")[0].metadata["settings"].value
    assert got["evaluation"]["kid_subsets"] == 7 and got["dreambooth"]["adam_epsilon"] == 1e-7
    assert got["dataset"]["verify_seed"] == 3
    # the loaded settings' own overrides (the tiny sizes) stay
    assert got["dataset"]["resolution"] == 32 and got["dreambooth"]["max_train_steps"] == 3
    assert got["data_dir"] == str(tmp_path)


@pytest.mark.parametrize(
    "run_config, named, variable",
    [
        (
            _run_config(overrides_json='{"classifier": {"seeds": [0, 1, 2]}}'),
            "classifier.seeds",
            "CLASSIFIER__SEEDS",
        ),
        (_run_config(profile="full"), "profile", "SYNTH_XRAY_PROFILE"),
        (_run_config(data_dir="/elsewhere"), "data_dir", "SYNTH_XRAY_DATA"),
        (_run_config(overrides_json='{"automation": {"eager_through": "none"}}'), "automation", "AUTOMATION"),
    ],
)
def test_a_setting_fixed_at_load_changed_per_run_is_refused_naming_it(tmp_path, run_config, named, variable):
    result = _probe(SettingsResource.of(tiny_settings(tmp_path)), run_config)
    assert not result.success
    failures = [e for e in result.all_events if e.event_type == dg.DagsterEventType.RESOURCE_INIT_FAILURE]
    message = failures[0].event_specific_data.error.to_string()
    assert f"{named}: loaded" in message and variable in message and "reload the code location" in message
    assert not result.asset_materializations_for_node("settings_probe")


def test_the_dataset_records_the_settings_of_its_run(tmp_path):
    loaded = tiny_settings(tmp_path)
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [dataset_assets.chest_xray_dataset],
            resources={"settings": SettingsResource.of(loaded)},
            run_config=_run_config(dataset={"verify_sample": 7}),
            instance=instance,
        )
    metadata = result.asset_materializations_for_node("chest_xray_dataset")[0].metadata
    changed = loaded.model_copy(update={"dataset": loaded.dataset.model_copy(update={"verify_sample": 7})})
    assert metadata["settings_sha256"].value == changed.digest()
    assert metadata["settings_changed"].value["dataset"]["verify_sample"] == 7


def test_the_settings_hash_follows_every_setting_but_the_data_root(tmp_path):
    a = Settings.for_profile("demo", tmp_path / "a")
    assert a.digest() == Settings.for_profile("demo", tmp_path / "b").digest()
    assert a.digest() != Settings.for_profile("demo", tmp_path / "a", {"dreambooth": {"seed": 1}}).digest()
    assert a.digest() != Settings.for_profile("full", tmp_path / "a").digest()


def test_fixed_at_load_names_real_settings():
    names = {name for name, _ in setting_fields()}
    sections = {name.split(".")[0] for name in names}
    for fixed in FIXED_AT_LOAD:
        assert fixed in names or fixed in sections, fixed


def test_values_the_launchpad_cannot_write_back_are_found():
    assert not launchpad_writes(1e-8) and not launchpad_writes({"a": [1e-7]}) and not launchpad_writes(1e21)
    assert (
        launchpad_writes(1e-6)
        and launchpad_writes(0.0)
        and launchpad_writes([2e-3, 5])
        and launchpad_writes("1e-8")
    )


def test_config_forms_of_tuples_mappings_and_paths():
    assert config_form(tuple[int, ...]) == list[int]
    assert config_form(dict[str, tuple[int, int]]) == dict[str, list[int]]
    assert config_form(Path) is str
    assert config_form(int | None) == int | None
    assert config_form(Literal["a", "b"]) == Literal["a", "b"]
    with pytest.raises(TypeError, match="no config form"):
        config_form(tuple[float, int])
