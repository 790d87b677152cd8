"""One real-browser smoke test: every page opened by its URL in headless Chromium on a fresh server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
# A page other than the home page first: on a fresh server, Streamlit's older `pages/` mechanism ran a direct
# link's page without app.py (file names as the menu) until app.py had run once.
PAGES = {"weights": "Weights by segment", "": "Data", "reward": "Reward", "train": "Train", "compare": "Compare",
         "report": "Report"}
WITH_CHARTS = {"", "reward", "weights"}

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser_runs(tmp_path_factory):
    return tmp_path_factory.mktemp("browser_runs")


@pytest.fixture(scope="module")
def server(browser_runs):
    port = _free_port()
    env = {**os.environ, "STREAMLIT_SERVER_HEADLESS": "true", "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false",
           "MTF_RUNS_DIR": str(browser_runs)}
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.port",
                             str(port), "--server.address", "127.0.0.1"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("streamlit did not become healthy within 90 s")
    yield url
    proc.terminate()
    proc.wait(timeout=20)


def test_every_page_renders_in_chromium(server):
    assert Path(CHROMIUM).exists(), "Debian's chromium is needed: apt-get install -y chromium (scripts/test.sh does)"
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1500})
        # Offline use: nothing may be fetched from another host (a favicon from a font CDN was, on every page).
        outside = []
        page.on("request", lambda r: outside.append(r.url) if r.url.startswith("http")
                and not r.url.startswith(server) else None)
        failed = []  # Streamlit probes for a base path under a page's URL (404 by design); nothing else may fail
        page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400
                and not r.url.endswith(("/_stcore/health", "/_stcore/host-config")) else None)
        for path, title in PAGES.items():
            page.goto(f"{server}/{path}", timeout=120_000)
            page.get_by_role("heading", name=title).first.wait_for(timeout=120_000)
            page.wait_for_function("document.querySelector('[data-testid=\"stStatusWidget\"]') === null",
                                   timeout=120_000)
            if path in WITH_CHARTS:
                page.locator(".js-plotly-plot").first.wait_for(timeout=120_000)
            page.wait_for_timeout(800)
            menu = page.locator('[data-testid="stSidebarNav"]')
            assert menu.get_by_text("Weights by segment").count() == 1, f"/{path}: not run through app.py"
            assert menu.get_by_text("app", exact=True).count() == 0, f"/{path}: Streamlit's file-name menu"
            name = path or "data"
            page.screenshot(path=str(ARTIFACTS / f"{name}.png"))
            assert page.locator('[data-testid="stException"]').count() == 0, f"exception on /{path}"
            assert page.locator('[data-testid="stAlertContentError"]').count() == 0, f"error box on /{path}"
            assert page.get_by_role("button", name="Deploy").count() == 0, "Streamlit's Deploy button is shown"
        browser.close()
    assert outside == [], f"fetched from other hosts: {sorted(set(outside))}"
    assert failed == [], failed


def test_two_sessions_train_and_list_at_once_and_the_run_is_recorded(server, browser_runs):
    """Issue 18: Streamlit runs every browser session as a thread of one process. One session trains while the
    other keeps listing runs; the run must land as finished, and neither page may show an error."""
    from playwright.sync_api import sync_playwright

    from mtf_core.runs import RunStore

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            trainer, lister = browser.new_context().new_page(), browser.new_context().new_page()
            trainer.goto(f"{server}/train", timeout=120_000)
            trainer.get_by_role("button", name="Train").wait_for(timeout=120_000)
            for label, value in (("Steps", "40"), ("Warm start steps", "10")):  # a short run: the race, not the fit
                field = trainer.get_by_label(label, exact=True)
                field.fill(value)
                field.press("Tab")
            trainer.get_by_role("button", name="Train").click()
            seen_errors = 0
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                lister.goto(f"{server}/train", timeout=120_000)
                lister.get_by_role("heading", name="Runs").or_(lister.get_by_text("No runs yet")).first.wait_for(
                    timeout=120_000)
                seen_errors += lister.locator('[data-testid="stAlertContentError"]').count()
                seen_errors += lister.locator('[data-testid="stException"]').count()
                if trainer.locator('[data-testid="stAlertContentSuccess"]').count():
                    break
            assert trainer.locator('[data-testid="stAlertContentSuccess"]').first.inner_text().find("finished") >= 0
            assert seen_errors == 0
            assert trainer.locator('[data-testid="stException"]').count() == 0
        finally:
            browser.close()
    runs = RunStore(browser_runs).list_runs()
    assert [r.status for r in runs] == ["finished"], [(r.run_id, r.status) for r in runs]


def test_the_whole_workflow_in_one_session_and_state_that_survives_revisits(server):
    """Data -> reward -> train -> weights -> compare -> report in one browser session, moving by the sidebar as
    an analyst does; then revisiting Data and Compare keeps the log and the comparison (issue 19)."""
    from playwright.sync_api import sync_playwright

    def settle(page) -> None:  # noqa: ANN001 - playwright's Page
        page.wait_for_function("document.querySelector('[data-testid=\"stStatusWidget\"]') === null",
                               timeout=240_000)
        assert page.locator('[data-testid="stException"]').count() == 0
        assert page.locator('[data-testid="stAlertContentError"]').count() == 0

    def go_to(page, title: str) -> None:  # noqa: ANN001
        page.locator('[data-testid="stSidebarNav"]').get_by_role("link", name=title).click()
        page.get_by_role("heading", name=title).first.wait_for(timeout=120_000)
        settle(page)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, timeout=60_000)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.goto(server, timeout=120_000)
            page.get_by_role("heading", name="Data").first.wait_for(timeout=120_000)
            settle(page)
            go_to(page, "Reward")
            page.get_by_role("button", name="Apply to training and comparison").click()
            settle(page)
            page.locator(".js-plotly-plot").first.wait_for(timeout=120_000)
            go_to(page, "Train")
            for label, value in (("Steps", "40"), ("Warm start steps", "10"), ("Run name", "workflow")):
                field = page.get_by_label(label, exact=True)
                field.fill(value)
                field.press("Tab")
            page.get_by_role("button", name="Train").click()
            page.locator('[data-testid="stAlertContentSuccess"]').first.wait_for(timeout=240_000)
            assert "finished" in page.locator('[data-testid="stAlertContentSuccess"]').first.inner_text()
            settle(page)
            go_to(page, "Weights by segment")
            page.locator(".js-plotly-plot").first.wait_for(timeout=120_000)
            go_to(page, "Compare")
            page.get_by_role("button", name="Compare").click()
            page.get_by_text("Evaluated on").first.wait_for(timeout=240_000)
            settle(page)
            go_to(page, "Report")
            page.get_by_role("button", name="Download the report (HTML)").wait_for(timeout=120_000)
            headline = page.locator('[data-testid="stAlertContentInfo"]').first.inner_text()
            # The recommendation first, a trained policy by its name and algorithm (whichever is chosen).
            assert "ecommendation" in headline and ("workflow (grade" in headline or "logging" in headline)
            page.screenshot(path=str(ARTIFACTS / "workflow_report.png"))
            # Revisits change nothing: the log stays, the comparison is still there without a new click.
            go_to(page, "Data")
            go_to(page, "Compare")
            page.get_by_text("Evaluated on").first.wait_for(timeout=60_000)
            assert page.get_by_text("Pick policies and press Compare").count() == 0
        finally:
            browser.close()


def test_the_exported_report_reads_as_a_decision_document_in_chromium(tiny_log, tmp_path):
    """The downloaded HTML opened offline: the recommendation is the first thing on the page, the charts
    render from the inlined plotly.js, and the verdicts, glossary and settings are there as tables."""
    import json

    from playwright.sync_api import sync_playwright

    from mtf_core import plots
    from mtf_core.compare import build_report, ope_frame
    from mtf_core.evaluate import evaluate_policy, prepare, target_actions
    from mtf_core.policies.static import parse_static
    from mtf_core.reward import RewardSpec

    spec = RewardSpec.default(tiny_log.task_names)
    ctx = prepare(tiny_log, spec, outcome_model="linear")
    policy = parse_static("click=0.2,like=0.2,finish=0.2,share=0.2,watch_time=0.2", tiny_log.task_names,
                          tiny_log.segments)
    results = [evaluate_policy(ctx, target_actions(None, tiny_log, "logging"), n_boot=100),
               evaluate_policy(ctx, target_actions(policy, tiny_log, "balanced"), n_boot=100)]
    ope = ope_frame(results)
    figure = plots.forest_plot(ope[ope["segment"].isna()].rename(columns={"estimator": "label"}), "label", "Value")
    report = tmp_path / "report.html"
    report.write_text(build_report("Decision", results, [("Policy value", figure)], json.loads(spec.to_json()),
                                   tiny_log.fingerprint, {"balanced": {"algo": "static", "config": {"seed": 0}}}))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, timeout=60_000)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.goto(report.as_uri(), timeout=60_000)
            headline = page.locator(".headline")
            headline.wait_for(timeout=30_000)
            assert "ecommendation" in headline.inner_text()
            box = headline.bounding_box()
            assert box is not None and box["y"] < 300  # the first thing a reader sees
            page.locator(".js-plotly-plot .main-svg").first.wait_for(timeout=60_000)
            assert page.get_by_text("Glossary").count() == 1
            assert page.locator("th", has_text="setting").count() == 1
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
        finally:
            browser.close()
