"""Declarative automation, live: ``dagster dev`` with its daemon, the observation schedule and the
automation sensor switched on (``automation.running_by_default``), over an image-folder source.

Adding an image to the source: the schedule (``dataset.observe_cron`` set to every two minutes
here; daily by default) observes the new version, the sensor requests the eager groups, and the dataset
is re-materialized with the new image; nothing downstream of the eager groups is requested. The
eager groups are kept to ``dataset`` (``automation.eager_through``) so that the test is bounded in
minutes: the generation group would pre-train a model. All seen through the webserver's GraphQL.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_MODEL_OVERRIDES
from dagster_dev import dagster_dev, dev_env, materialized_instance
from fixtures import write_image_folder
from PIL import Image

# Every two minutes (daily by default). The eager condition waits while a dependency is in
# progress, and an observation run takes over a minute on a loaded 2-core machine, so observing
# every minute can keep the source in progress for good.
OBSERVE_CRON = "*/2 * * * *"
WAIT_S = 900  # the schedule's minute, the observation run, a sensor tick, the dataset's run
SENSOR = "synth_xray_automation"
SCHEDULE = "observe_source_schedule"
EAGER = {"chest_xray_source", "chest_xray_dataset"}  # the source is observed, the dataset eager

RUNS = """{ runsOrError { ... on Runs { results {
  runId status jobName creationTime assetSelection { path } tags { key value } } } } }"""
MATERIALIZED = """{ assetsOrError { ... on AssetConnection { nodes {
  key { path }
  assetMaterializations(limit: 1) { runId timestamp
    metadataEntries { label ... on IntMetadataEntry { intValue } } } } } } }"""


def overrides(source: Path) -> str:
    merged = json.loads(json.dumps(TINY_MODEL_OVERRIDES))
    merged["dataset"].update({"source": str(source), "observe_cron": OBSERVE_CRON})
    merged["automation"] = {"eager_through": "dataset", "running_by_default": True, "sensor_interval_s": 5}
    return json.dumps(merged)


def latest_materializations(dev) -> dict[str, dict]:
    nodes = dev.graphql(MATERIALIZED)["assetsOrError"]["nodes"]
    return {"/".join(n["key"]["path"]): (n["assetMaterializations"] or [None])[0] for n in nodes}


def num_images(materialization: dict) -> int:
    return next(e["intValue"] for e in materialization["metadataEntries"] if e["label"] == "num_images")


def tag(run: dict, key: str) -> str | None:
    return next((t["value"] for t in run["tags"] if t["key"] == key), None)


def wait_for(dev, what: str, predicate, timeout_s: float = WAIT_S):
    """Poll until ``predicate()`` gives something; fail naming ``what`` (with the runs seen) if not."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(5)
    runs = [(r["jobName"], r["status"], r["tags"]) for r in dev.graphql(RUNS)["runsOrError"]["results"]]
    pytest.fail(f"no {what} in {timeout_s:.0f} s; runs: {runs}\n{dev.log_tail()}")


@pytest.mark.slow
def test_a_new_source_image_is_observed_and_the_eager_groups_rematerialize(tmp_path):
    source = write_image_folder(tmp_path / "source", 2, (40, 36), 5)
    settings_json = overrides(source)
    home, data = materialized_instance(tmp_path, settings_json)

    with dagster_dev(dev_env(home, data, settings_json)) as dev:
        before = latest_materializations(dev)["chest_xray_dataset"]
        assert num_images(before) == 12
        # Wait for the sensor's first tick on the unchanged source, so what follows is the new image.
        wait_for(dev, "first automation tick", lambda: _sensor_ticks(dev))
        Image.fromarray(np.full((44, 40), 128, np.uint8)).save(source / "train" / "NORMAL" / "NORMAL_new.png")
        added_at = time.time()

        def rematerialized():
            latest = latest_materializations(dev)["chest_xray_dataset"]
            return latest if latest and float(latest["timestamp"]) / 1000 > added_at else None

        after = wait_for(dev, "re-materialization of chest_xray_dataset", rematerialized)

        def finished():
            run = next(r for r in dev.graphql(RUNS)["runsOrError"]["results"] if r["runId"] == after["runId"])
            return run if run["status"] in ("SUCCESS", "FAILURE", "CANCELED") else None

        wait_for(dev, f"end of the run {after['runId']}", finished)
        time.sleep(20)  # a few more sensor ticks: anything downstream would be requested now
        runs = dev.graphql(RUNS)["runsOrError"]["results"]
        materialized = latest_materializations(dev)

    assert num_images(after) == 13
    by_id = {r["runId"]: r for r in runs}
    dataset_run = by_id[after["runId"]]
    assert dataset_run["status"] == "SUCCESS"
    assert tag(dataset_run, "dagster/sensor_name") == SENSOR, dataset_run["tags"]
    observed = [r for r in runs if tag(r, "dagster/schedule_name") == SCHEDULE and r["status"] == "SUCCESS"]
    assert observed and min(r["creationTime"] for r in observed) < dataset_run["creationTime"]
    requested = {"/".join(k["path"]) for r in runs for k in r["assetSelection"] or []}
    assert requested <= EAGER, requested - EAGER
    downstream = {name for name, m in materialized.items() if m and name not in EAGER}
    assert not downstream, f"materialized downstream of the eager groups: {downstream}"


def _sensor_ticks(dev) -> list:
    query = """query($selector: SensorSelector!) { sensorOrError(sensorSelector: $selector) {
      ... on Sensor { sensorState { status ticks(limit: 5) { status timestamp } } } } }"""
    selector = {
        "repositoryLocationName": "synth_xray_assets",
        "repositoryName": "__repository__",
        "sensorName": SENSOR,
    }
    state = dev.graphql(query, {"selector": selector})["sensorOrError"]["sensorState"]
    assert state["status"] == "RUNNING", state
    return [t for t in state["ticks"] if t["status"] in ("SUCCESS", "SKIPPED")]
