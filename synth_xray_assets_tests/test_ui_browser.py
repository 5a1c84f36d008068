"""The Dagster UI in a real browser: Chromium (the OS package) driven by Playwright.

Against ``dagster dev`` on a free loopback port over a small materialized instance (the tiny
phantoms' dataset): the lineage graph shows every asset group, the dataset's page shows its
thumbnail image, and clicking Materialize launches a run that the daemon dequeues and that
succeeds. Screenshots go to ``<tmp_path>/screenshots``, or ``$SYNTH_XRAY_SCREENSHOTS`` (printed).
Without Chromium the test skips, or fails under ``CI=true``.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import pytest
from conftest import tiny_overrides_json
from dagster_dev import dagster_dev, dev_env, materialized_instance

from synth_xray_assets.definitions import build_defs
from synth_xray_assets.resources import SettingsResource

CHROMIUM = os.environ.get("SYNTH_XRAY_CHROMIUM", "/usr/bin/chromium")
# Playwright's own browser download is unreachable here: the OS's Chromium, headless, quiet.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
RENDER_TIMEOUT_MS = 60_000  # pages render ~5 s after load on a quiet 2-core machine
RUN_TIMEOUT_S = 600


def _require_browser() -> None:
    missing = None
    if not Path(CHROMIUM).exists():
        missing = f"no Chromium at {CHROMIUM} (install the OS package 'chromium')"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            missing = "playwright is not installed (pip install -e '.[dev]')"
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: {missing}")
        print(f"skipping the browser test: {missing}")
        pytest.skip(missing)


def _dismiss_community_dialog(page) -> None:
    """The first visit opens "Join the Dagster community"; skip it when it comes."""
    skip = page.get_by_role("button", name="Skip")
    try:
        skip.first.wait_for(state="visible", timeout=15_000)
    except Exception:  # noqa: BLE001 - no dialog this time (it is shown once per browser profile)
        return
    skip.first.click()


def _shot(page, folder: Path, name: str) -> None:
    page.screenshot(path=str(folder / f"{name}.png"))


def _wait_for_run(dev, run_prefix: str) -> dict:
    query = """{ runsOrError { ... on Runs { results {
        runId status assetSelection { path } tags { key value } } } } }"""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        runs = [r for r in dev.graphql(query)["runsOrError"]["results"] if r["runId"].startswith(run_prefix)]
        if runs and runs[0]["status"] in ("SUCCESS", "FAILURE", "CANCELED"):
            return runs[0]
        time.sleep(3)
    pytest.fail(f"run {run_prefix} did not finish in {RUN_TIMEOUT_S} s:\n{dev.log_tail()}")


def screenshot_folder(tmp_path: Path) -> Path:
    """``$SYNTH_XRAY_SCREENSHOTS``, or ``<tmp_path>/screenshots`` (made, and printed)."""
    shots = Path(os.environ.get("SYNTH_XRAY_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    print(f"screenshots in {shots}")
    return shots


@contextmanager
def browser_page(playwright) -> Iterator:
    """A page of the OS's headless Chromium, 1600 x 1000, waiting up to ``RENDER_TIMEOUT_MS``."""
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    try:
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.set_default_timeout(RENDER_TIMEOUT_MS)
        yield page
    finally:
        browser.close()


def tiny_ui_instance(tmp_path: Path) -> tuple[Path, str, Path, Path]:
    """After checking the browser: the screenshot folder, the tiny settings' overrides, and a Dagster
    home and data folder with the tiny phantoms' dataset materialized."""
    _require_browser()
    overrides = tiny_overrides_json()
    return screenshot_folder(tmp_path), overrides, *materialized_instance(tmp_path, overrides)


@pytest.mark.slow
def test_the_ui_in_a_real_browser(tmp_path):
    shots, overrides, home, data = tiny_ui_instance(tmp_path)
    from playwright.sync_api import expect, sync_playwright

    defs = build_defs(SettingsResource(data_dir=str(data), overrides_json=overrides))
    groups = sorted({n.group_name for n in defs.resolve_asset_graph().asset_nodes})

    with dagster_dev(dev_env(home, data, overrides)) as dev, sync_playwright() as p, browser_page(p) as page:
        # The lineage graph: one box per asset group (drawn inside the graph's SVG).
        page.goto(f"{dev.url}/asset-groups")
        _dismiss_community_dialog(page)
        graph = page.locator("svg foreignObject")
        for group in groups:
            expect(graph.get_by_text(group, exact=True).first).to_be_visible()
        _shot(page, shots, "1-asset-graph")

        # The dataset's page: its thumbnail grid, a PNG in the metadata, decoded by the browser.
        page.goto(f"{dev.url}/assets/chest_xray_dataset")
        page.get_by_text("[Show Markdown]").first.click()
        image = page.get_by_role("dialog").locator("img").first
        expect(image).to_be_visible()
        assert image.evaluate("img => img.complete && img.naturalWidth") > 0
        _shot(page, shots, "2-asset-metadata-image")
        page.get_by_role("dialog").get_by_role("button", name="Close").click()

        # Materialize from the UI: the run is queued, the daemon launches it, it succeeds.
        page.locator("button").filter(has_text=re.compile(r"^\s*Materialize\s*$")).first.click()
        toast = page.get_by_text(re.compile(r"Launched run [0-9a-f]{8}"))
        expect(toast).to_be_visible()
        run_prefix = re.search(r"Launched run ([0-9a-f]{8})", toast.inner_text()).group(1)
        _shot(page, shots, "3-run-launched")
        run = _wait_for_run(dev, run_prefix)
        assert run["status"] == "SUCCESS", f"run {run['runId']}: {run['status']}\n{dev.log_tail()}"
        page.goto(f"{dev.url}/runs/{run['runId']}")
        expect(page.get_by_text("Success", exact=True).first).to_be_visible()  # the UI's own status
        expect(page.get_by_text("Loading run logs")).to_have_count(0)
        _shot(page, shots, "4-run-page")

    assert run["assetSelection"] == [{"path": ["chest_xray_dataset"]}]
    assert {"key": "dagster/from_ui", "value": "true"} in run["tags"]
    # Queued by the webserver (QueuedRunCoordinator), then launched by the daemon: starting, started.
    with dg.DagsterInstance.from_config(str(home)) as instance:
        events = [e.dagster_event.event_type for e in instance.all_logs(run["runId"]) if e.dagster_event]
    run_events = [e for e in events if e.value.startswith(("PIPELINE_", "RUN_"))]
    assert run_events[:2] == [dg.DagsterEventType.RUN_ENQUEUED, dg.DagsterEventType.RUN_STARTING], run_events
    assert run_events[-1] == dg.DagsterEventType.RUN_SUCCESS
    assert all((shots / f"{n}.png").stat().st_size for n in ("1-asset-graph", "4-run-page"))
