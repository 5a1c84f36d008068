"""Operations: observation -> declarative automation, the definitions, and the webserver's asset graph."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
import numpy as np
from conftest import tiny_overrides_json
from PIL import Image

from synth_xray_assets.definitions import build_defs, defs
from synth_xray_assets.resources import SettingsResource
from synth_xray_assets.settings import Settings

REPO = Path(__file__).resolve().parents[1]


def write_image_folder(root: Path, per_class: int = 3, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for split in ("train", "validation", "test"):
        for c in ("NORMAL", "PNEUMONIA"):
            folder = root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 255, (48, 40), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def requested(result) -> dict[str, int]:
    return {
        key.to_user_string(): result.get_num_requested(key)
        for key in defs.resolve_asset_graph().get_all_asset_keys()
        if result.get_num_requested(key)
    }


def test_changed_source_requests_the_dataset_and_its_dependents(tmp_path):
    source = tmp_path / "source"
    write_image_folder(source)
    settings = SettingsResource(
        data_dir=str(tmp_path / "data"), overrides_json=tiny_overrides_json(dataset={"source": str(source)})
    )
    d = build_defs(settings)
    instance = dg.DagsterInstance.ephemeral()
    observe = d.resolve_job_def("observe_source_job")
    assert observe.execute_in_process(instance=instance).success

    # The dataset is materialized for real; the costly models downstream are recorded as
    # materialized (runless events), so that the evaluation below starts from an up-to-date graph.
    dataset_job = d.resolve_implicit_global_asset_job_def().get_subset(
        asset_selection={dg.AssetKey("chest_xray_dataset")}
    )
    assert dataset_job.execute_in_process(instance=instance).success
    graph = d.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        if not node.is_materializable or key == dg.AssetKey("chest_xray_dataset"):
            continue
        partitions = node.partitions_def.get_partition_keys() if node.partitions_def else [None]
        for partition in partitions:
            instance.report_runless_asset_event(dg.AssetMaterialization(key, partition=partition))

    first = dg.evaluate_automation_conditions(defs=d, instance=instance)
    assert requested(first) == {}

    # Observed again, unchanged: nothing to do.
    assert observe.execute_in_process(instance=instance).success
    unchanged = dg.evaluate_automation_conditions(defs=d, instance=instance, cursor=first.cursor)
    assert requested(unchanged) == {}

    # One more image in the source: a new version, and the dataset and its dependents are requested.
    Image.fromarray(np.full((50, 50), 77, dtype=np.uint8)).save(source / "train" / "NORMAL" / "new.png")
    assert observe.execute_in_process(instance=instance).success
    changed = dg.evaluate_automation_conditions(defs=d, instance=instance, cursor=unchanged.cursor)
    got = requested(changed)
    assert got.get("chest_xray_dataset") == 1
    assert got.get("base_model") == 1  # the demo's tiny base model is pre-trained on the dataset

    # Each tick requests what the previous tick's runs made stale: partitioned assets follow once
    # their unpartitioned parents are done. The runs are simulated by recording materializations.
    ticks, result = [got], changed
    while requested(result) and len(ticks) < 8:
        for key in graph.get_all_asset_keys():
            for subset in result.get_requested_partitions(key) if result.get_num_requested(key) else []:
                instance.report_runless_asset_event(dg.AssetMaterialization(key, partition=subset))
        result = dg.evaluate_automation_conditions(defs=d, instance=instance, cursor=result.cursor)
        ticks.append(requested(result))
    assert ticks[-1] == {}, ticks  # it settles
    union: dict[str, int] = {}
    for tick in ticks:
        for name, n in tick.items():
            union[name] = union.get(name, 0) + n
    assert union.get("dreambooth_checkpoint") == 2, ticks  # both classes, once each
    assert union.get("synthetic_images") == 2, ticks
    assert union.get("base_model_images") == 2, ticks  # per class, beside DreamBooth
    assert union.get("prior_class_images") == 1, ticks
    assert union.get("cxr_feature_extractor") == 1, ticks
    assert union.get("fid_scores") == 2 and union.get("memorization") == 2, ticks
    # Beyond the automation point (evaluation, by default) nothing runs without a request.
    s = settings.get()
    late_groups = set(s.automation.groups) - set(s.automation.eager_groups())
    for key in graph.get_all_asset_keys():
        if graph.get(key).group_name in late_groups:
            assert key.to_user_string() not in union


def test_every_asset_is_described_owned_grouped_and_versioned():
    graph = defs.resolve_asset_graph()
    s = Settings.for_profile("demo")
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        if not node.is_materializable:
            continue
        name = key.to_user_string()
        assert node.description, name
        assert node.owners, name
        assert node.group_name in s.automation.groups, name
        assert node.code_version, name
        assert node.kinds, name
    heavy = ["base_model", "prior_class_images", "dreambooth_checkpoint", "synthetic_images"]
    for name in heavy:
        assert defs.resolve_assets_def(name).op.pool == "gpu", name


def test_schedule_and_sensor_are_defined():
    assert defs.resolve_schedule_def("observe_source_schedule").cron_schedule
    sensor = defs.resolve_sensor_def("synth_xray_automation")
    assert isinstance(sensor, dg.AutomationConditionSensorDefinition)


def test_the_schedule_skips_while_an_observation_run_is_in_flight():
    schedule = defs.resolve_schedule_def("observe_source_schedule")
    job = defs.resolve_job_def("observe_source_job")
    with dg.instance_for_test() as instance:

        def tick():
            return schedule.evaluate_tick(dg.build_schedule_context(instance=instance))

        assert tick().run_requests  # nothing in flight: an observation is requested
        running = instance.create_run_for_job(job, status=dg.DagsterRunStatus.STARTED)
        skipped = tick()
        assert not skipped.run_requests
        assert running.run_id in skipped.skip_message and "STARTED" in skipped.skip_message
        instance.report_run_failed(running)
        assert tick().run_requests  # it ended: the next tick observes again


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _graphql(port: int, query: str) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as response:
        return json.loads(response.read())


def test_webserver_serves_the_asset_graph(tmp_path):
    port = _free_port()
    home = tmp_path / "dagster_home"
    home.mkdir()
    env = {**os.environ, "DAGSTER_HOME": str(home), "SYNTH_XRAY_DATA": str(tmp_path / "data")}
    webserver = Path(sys.executable).with_name("dagster-webserver")
    proc = subprocess.Popen(
        [str(webserver), "-w", str(REPO / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        query = "{ assetNodes { assetKey { path } dependencyKeys { path } groupName isPartitioned } }"
        deadline, nodes = time.time() + 180, None
        while time.time() < deadline:
            assert proc.poll() is None, "the webserver exited"
            try:
                data = _graphql(port, query)
                if data.get("data", {}).get("assetNodes"):
                    nodes = data["data"]["assetNodes"]
                    break
            except OSError:
                pass
            time.sleep(2)
        assert nodes, "no asset graph from the webserver"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    served = {
        "/".join(n["assetKey"]["path"]): {"/".join(d["path"]) for d in n["dependencyKeys"]} for n in nodes
    }
    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        name = key.to_user_string()
        assert name in served, name
        assert served[name] == {p.to_user_string() for p in graph.get(key).parent_keys}, name
    assert "chest_xray_source" in served["chest_xray_dataset"]
    assert "dreambooth_checkpoint" in served["synthetic_images"]
