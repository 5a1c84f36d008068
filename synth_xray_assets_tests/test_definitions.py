"""The graph is made from the settings object alone: partitions, automation, deps, groups."""

from pathlib import Path

import dagster as dg
import pytest

from synth_xray_assets.definitions import PIPELINE_STAGES, build_defs, per_class_job
from synth_xray_assets.settings import NOT_SETTINGS, DemoSettings, Settings, load_settings

PACKAGE = Path(__file__).resolve().parents[1] / "synth_xray_assets"


@pytest.fixture
def hostile_env(monkeypatch):
    """Environment variables that would change the graph if anything but load_settings read them."""
    monkeypatch.setenv("SYNTH_XRAY_PROFILE", "full")
    monkeypatch.setenv("SYNTH_XRAY_CLASSIFIER__SEEDS", "[7, 8, 9]")
    monkeypatch.setenv("SYNTH_XRAY_AUTOMATION__EAGER_THROUGH", "reports")


def test_other_experiments_and_seeds_are_the_classifier_partitions(tmp_path, hostile_env):
    s = Settings.for_profile(
        "demo",
        tmp_path,
        {"classifier": {"experiments": {"alpha": (1.0, 0), "beta": (0.5, 8)}, "seeds": (3, 11)}},
    )
    job = build_defs(s).resolve_job_def("classifier_job")
    assert sorted(job.partitions_def.get_partition_keys()) == ["alpha|11", "alpha|3", "beta|11", "beta|3"]
    default = build_defs(Settings.for_profile("demo", tmp_path)).resolve_job_def("classifier_job")
    assert "baseline|0" in default.partitions_def.get_partition_keys()


def _eager(defs: dg.Definitions) -> set[str]:
    graph = defs.resolve_asset_graph()
    return {
        k.to_user_string()
        for k in graph.get_all_asset_keys()
        if graph.get(k).is_materializable and graph.get(k).automation_condition is not None
    }


def test_eager_through_changes_the_automation_conditions(tmp_path, hostile_env):
    through_evaluation = _eager(build_defs(Settings.for_profile("demo", tmp_path)))
    assert "fid_scores" in through_evaluation and "classifier_experiment" not in through_evaluation
    only_dataset = _eager(
        build_defs(Settings.for_profile("demo", tmp_path, {"automation": {"eager_through": "dataset"}}))
    )
    assert only_dataset == {"chest_xray_dataset"}
    none = _eager(
        build_defs(Settings.for_profile("demo", tmp_path, {"automation": {"eager_through": "none"}}))
    )
    assert none == set()


def test_base_model_depends_on_the_dataset_only_when_tiny(tmp_path):
    def parents(s: Settings) -> set[str]:
        graph = build_defs(s).resolve_asset_graph()
        return {k.to_user_string() for k in graph.get(dg.AssetKey("base_model")).parent_keys}

    assert parents(Settings.for_profile("demo", tmp_path)) == {"chest_xray_dataset"}
    assert parents(Settings.for_profile("full", tmp_path)) == set()


def test_base_model_images_need_only_the_base_model_and_feed_fid_scores_per_class(tmp_path):
    """The FID reference images wait for no DreamBooth: their parents are the base model and the
    dataset (its train split sets the count); every generator's fid_scores reads its class's set."""
    matched = Settings.for_profile("demo", tmp_path, {"dreambooth": {"generators": "matched"}})
    defs = build_defs(matched)
    graph = defs.resolve_asset_graph()
    ref, fid = dg.AssetKey("base_model_images"), dg.AssetKey("fid_scores")
    assert {k.to_user_string() for k in graph.get(ref).parent_keys} == {"base_model", "chest_xray_dataset"}
    assert graph.get(ref).partitions_def.get_partition_keys() == ["normal", "pneumonia"]
    assert graph.get(ref).group_name == "synthesis" and graph.get(ref).pools == {"gpu"}
    assert ref in graph.get(fid).parent_keys and dg.AssetKey("base_model") not in graph.get(fid).parent_keys
    for generator, class_key in [
        ("normal", "normal"),
        ("normal-r10", "normal"),
        ("pneumonia-r25", "pneumonia"),
    ]:
        upstream = graph.get_parent_partition_keys_for_child(generator, ref, fid)
        assert set(upstream.partitions_subset.get_partition_keys()) == {class_key}, generator
    job = defs.resolve_job_def("base_model_images_job")
    assert job.partitions_def.get_partition_keys() == ["normal", "pneumonia"]
    # per class, not per generator: a job of its own, run before the per-generator stage
    assert ref not in per_class_job.selection.resolve(graph)
    assert PIPELINE_STAGES.index("base_model_images_job") < PIPELINE_STAGES.index("per_class_job")


def test_group_names_are_the_domain_folders(tmp_path):
    defs = build_defs(Settings.for_profile("demo", tmp_path))
    folders = {p.name for p in PACKAGE.iterdir() if (p / "assets.py").is_file()}
    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        group = graph.get(key).group_name
        assert group in folders, (key, group)
        if graph.get(key).is_materializable:
            module = defs.resolve_assets_def(key).op.compute_fn.decorated_fn.__module__
            assert module == f"synth_xray_assets.{group}.assets", (key, module)


def test_load_settings_reads_nested_environment_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("SYNTH_XRAY_PROFILE", "demo")
    monkeypatch.setenv("SYNTH_XRAY_DATA", str(tmp_path))
    monkeypatch.setenv("SYNTH_XRAY_DREAMBOOTH__METHOD", "lora")
    monkeypatch.setenv("SYNTH_XRAY_CLASSIFIER__EXPERIMENTS", '{"only": [1.0, 0]}')
    s = load_settings()
    assert isinstance(s, DemoSettings) and s.data_dir == tmp_path
    assert s.dreambooth.method == "lora" and s.dreambooth.resolution == 64  # the demo's value stays
    assert s.classifier.experiments == {"only": (1.0, 0)}  # a dict is replaced whole
    monkeypatch.setenv("SYNTH_XRAY_DREAMBOOTH__METOD", "lora")
    with pytest.raises(ValueError, match="dreambooth.metod"):
        load_settings()


@pytest.mark.parametrize(
    "name, nearest",
    [
        ("SYNTH_XRAY_PROFIL", "SYNTH_XRAY_PROFILE"),  # a top-level name
        ("SYNTH_XRAY_DREAMBOTH__METHOD", "SYNTH_XRAY_DREAMBOOTH__METHOD"),  # a section
        ("SYNTH_XRAY_CLASIFIER__SEEDS", "SYNTH_XRAY_CLASSIFIER__SEEDS"),
        ("SYNTH_XRAY_CELERY_BROKR", "SYNTH_XRAY_CELERY_BROKER"),  # near an allow-listed one
        ("synth_xray_profil", "SYNTH_XRAY_PROFILE"),  # pydantic-settings reads names in any case
    ],
)
def test_an_unknown_variable_stops_loading_naming_the_nearest(clean_env, monkeypatch, name, nearest):
    monkeypatch.setenv(name, "full")
    with pytest.raises(ValueError) as err:
        load_settings()
    message = str(err.value)
    assert name in message and f"did you mean {nearest}?" in message


def test_variables_on_the_allow_list_and_settings_load(clean_env, monkeypatch, tmp_path):
    assert {
        "SYNTH_XRAY_CELERY_BROKER",
        "SYNTH_XRAY_CELERY_BACKEND",
        "SYNTH_XRAY_FAULT_PLAN",
        "SYNTH_XRAY_FAULT_KILLS",
        "SYNTH_XRAY_CHROMIUM",
        "SYNTH_XRAY_SCREENSHOTS",
    } <= NOT_SETTINGS
    for name in NOT_SETTINGS:
        monkeypatch.setenv(name, "x")
    monkeypatch.setenv("SYNTH_XRAY_DREAMBOOTH__METHOD", "lora")
    monkeypatch.setenv("SYNTH_XRAY_DEPLOYMENT__CELERY__BROKER_ENV", "SYNTH_XRAY_REDIS")
    monkeypatch.setenv("SYNTH_XRAY_REDIS", "redis://elsewhere:6379/0")  # a broker renamed in settings
    s = load_settings()
    assert s.dreambooth.method == "lora" and s.deployment.celery.broker_env == "SYNTH_XRAY_REDIS"
    assert s.profile == "demo" and s.data_dir == tmp_path
    monkeypatch.delenv("SYNTH_XRAY_DEPLOYMENT__CELERY__BROKER_ENV")
    with pytest.raises(ValueError, match="SYNTH_XRAY_REDIS: unknown setting"):
        load_settings()


def test_for_profile_reads_no_environment(monkeypatch, tmp_path, hostile_env):
    s = Settings.for_profile("demo", tmp_path)
    assert s.profile == "demo" and s.classifier.seeds == (0,) and s.automation.eager_through == "evaluation"
    with pytest.raises(ValueError, match="unknown profile"):
        Settings.for_profile("huge", tmp_path)


def _upstream_nodes(job: dg.JobDefinition, node: str) -> set[str]:
    ups = job.graph.dependency_structure.input_to_upstream_outputs_for_node(node)
    return {o.node_name for outputs in ups.values() for o in outputs}


@pytest.mark.parametrize("profile", ["demo", "full"])
def test_jobs_order_base_model_after_the_dataset_only_when_it_trains_on_it(tmp_path, profile):
    """The demo's tiny base model reads the standardized dataset: prepare_job must run it after the
    dataset (an op input, not only an edge in the asset graph); SD 2.1 does not depend on it."""
    defs = build_defs(Settings.for_profile(profile, tmp_path))
    upstream = _upstream_nodes(defs.resolve_job_def("prepare_job"), "base_model")
    graph_parents = defs.resolve_asset_graph().get(dg.AssetKey("base_model")).parent_keys
    if profile == "demo":
        assert "chest_xray_dataset" in upstream
        assert dg.AssetKey("chest_xray_dataset") in graph_parents
    else:
        assert upstream == set() and graph_parents == set()
