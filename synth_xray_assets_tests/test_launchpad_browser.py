"""Typed settings in the launchpad, in a real browser (Chromium driven by Playwright).

Against ``dagster dev`` over the tiny phantoms' instance (as ``test_ui_browser.py``): the dataset's
launchpad opens with the settings as typed fields (sections, fields, the loaded values), refuses a
wrong value before anything runs, and launches with one field changed; the materialization's
metadata then holds that value and the hash of the settings the run read.
"""

from __future__ import annotations

import json
import re

import dagster as dg
import pytest
from dagster_dev import dagster_dev, dev_env
from test_ui_browser import (
    _dismiss_community_dialog,
    _shot,
    _wait_for_run,
    browser_page,
    tiny_ui_instance,
)

from synth_xray_assets.settings import Settings

EDITOR = "document.querySelector('.CodeMirror').CodeMirror"
_LATEST = """query ($key: AssetKeyInput!) { assetOrError(assetKey: $key) { ... on Asset {
    assetMaterializations(limit: 1) { runId metadataEntries { label
      ... on TextMetadataEntry { text } ... on JsonMetadataEntry { jsonString } } } } } }"""


def _editor_text(page) -> str:
    return page.evaluate(f"() => {EDITOR}.getValue()")


def _set_editor_text(page, text: str) -> None:
    page.evaluate(f"text => {EDITOR}.setValue(text)", text)


def _launchpad_materialize(page):
    return page.get_by_role("dialog").locator("button").filter(has_text=re.compile(r"^\s*Materialize\s*$"))


@pytest.mark.slow
def test_the_launchpad_edits_typed_settings_and_the_run_records_them(tmp_path):
    shots, overrides, home, data = tiny_ui_instance(tmp_path)
    from playwright.sync_api import expect, sync_playwright

    loaded = Settings.for_profile("demo", data, json.loads(overrides))
    expected = loaded.model_copy(update={"dataset": loaded.dataset.model_copy(update={"verify_sample": 7})})

    with dagster_dev(dev_env(home, data, overrides)) as dev, sync_playwright() as p:
        with browser_page(p) as page:
            page.goto(f"{dev.url}/assets/chest_xray_dataset")
            _dismiss_community_dialog(page)

            # Shift-click on Materialize opens the launchpad, filled with the settings' typed fields.
            materialize = page.locator("button").filter(has_text=re.compile(r"^\s*Materialize\s*$")).first
            page.keyboard.down("Shift")
            materialize.click()
            page.keyboard.up("Shift")
            expect(page.get_by_text("Launchpad (configure assets)")).to_be_visible()
            page.wait_for_function(f"() => document.querySelector('.CodeMirror') && {EDITOR}.getValue()")
            scaffold = _editor_text(page)
            for line in ("settings:", "dataset:", "verify_sample: 48", "resolution: 32", "method: full"):
                assert re.search(rf"^\s+{re.escape(line)}$", scaffold, re.M), f"{line!r} not in:\n{scaffold}"
            assert "seeds:" not in scaffold and "automation:" not in scaffold  # fixed at load
            launch = _launchpad_materialize(page)
            expect(launch).to_be_enabled()
            _shot(page, shots, "launchpad-1-typed-settings")

            # A wrong value is refused in the editor: the launch button is disabled, the error named.
            _set_editor_text(page, scaffold.replace("verify_sample: 48", "verify_sample: many"))
            expect(
                page.get_by_text(re.compile(r"root:resources:settings:config:dataset:verify_sample"))
            ).to_be_visible()
            expect(launch).to_be_disabled()
            _shot(page, shots, "launchpad-2-wrong-value")

            # One field changed: the run is launched and succeeds.
            _set_editor_text(page, scaffold.replace("verify_sample: 48", "verify_sample: 7"))
            expect(launch).to_be_enabled()
            launch.click()
            page.wait_for_url(re.compile(r"/runs/[0-9a-f-]{36}"))  # the launchpad opens the run's page
            run_id = re.search(r"/runs/([0-9a-f-]{36})", page.url).group(1)
            _shot(page, shots, "launchpad-3-run-launched")
            run = _wait_for_run(dev, run_id)
            assert run["status"] == "SUCCESS", f"run {run['runId']}: {run['status']}\n{dev.log_tail()}"

            # The asset's page shows the settings hash of that run.
            page.goto(f"{dev.url}/assets/chest_xray_dataset")
            expect(page.get_by_text(expected.digest()).first).to_be_visible()
            _shot(page, shots, "launchpad-4-settings-in-metadata")
        latest = dev.graphql(_LATEST, {"key": {"path": ["chest_xray_dataset"]}})["assetOrError"]

    entry = latest["assetMaterializations"][0]
    assert entry["runId"] == run["runId"]
    metadata = {e["label"]: e.get("text") or e.get("jsonString") for e in entry["metadataEntries"]}
    assert metadata["settings_sha256"] == expected.digest() != loaded.digest()
    assert json.loads(metadata["settings_changed"])["dataset"]["verify_sample"] == 7
    with dg.DagsterInstance.from_config(str(home)) as instance:
        record = instance.get_run_by_id(run["runId"])
    assert record.run_config["resources"]["settings"]["config"]["dataset"]["verify_sample"] == 7
