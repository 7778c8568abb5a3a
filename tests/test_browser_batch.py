"""The Batch tab in a real browser (Debian's chromium via Playwright): tick two sample intents,
read the plan line, start, watch progress by user turns, press Stop, and find the finished
dialogues kept. The user is the tiny UserLM-shaped model and the assistant a loopback
completions server that answers one word every 0.15 s, so that the batch is still running when
Stop is pressed."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from browser_page import wait_for_text
from loopback_openai import LoopbackOpenAI
from test_browser import SHOTS

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.browser, pytest.mark.skipif(not CHROMIUM, reason="Debian's chromium is not installed")]
TICKED = ("coding · Remove duplicates keeping order", "coding · Debounce a search box")


@pytest.fixture(scope="module")
def batch_app(tiny_sim, tmp_path_factory):
    from usersim_ui.app import batch_tab, zerogpu
    from usersim_ui.app.studio import build_app

    out = tmp_path_factory.mktemp("batch-out")
    server = LoopbackOpenAI("trickle", delay_s=0.15, words=8)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(zerogpu, "_simulator", tiny_sim)
        mp.setattr(batch_tab, "output_dir", lambda: out)
        demo = build_app(max_new_tokens=8, assistant_max_tokens=8, max_turns=3).queue(default_concurrency_limit=1)
        _app, url, _share = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
        try:
            yield url, server, out
        finally:
            demo.close()
            server.close()


def set_slider(page, elem_id: str, value: int) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def test_tick_two_intents_plan_start_watch_turns_stop_and_keep_what_finished(batch_app):
    url, server, out = batch_app
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--headless", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        page.goto(url)
        page.get_by_role("tab", name="Batch runs").click()
        plan = page.locator("#batch-plan")
        plan.get_by_text("15 intents (all sample intents)").wait_for(timeout=30_000)
        for label in TICKED:
            page.locator("#batch-intents").get_by_label(label, exact=True).check()
        set_slider(page, "batch-samples", 2)
        set_slider(page, "batch-turns", 2)
        plan.get_by_text("2 intents (the ticked sample intents)").wait_for(timeout=30_000)
        wait_for_text(page, "#batch-plan", "4 dialogues", timeout=30_000)
        text = plan.inner_text()
        assert "at most 8 user turns" in text and re.search(r"estimated at most [\d.]+ (s|min|h)", text), text
        page.locator("#batch-assistant input").fill("openai")
        page.locator("#batch-assistant input").press("Enter")
        page.locator("#batch-url textarea, #batch-url input").first.fill(server.url)
        page.locator("#batch-model textarea, #batch-model input").first.fill("loopback")
        page.screenshot(path=SHOTS / "batch-01-plan.png", full_page=True)

        page.locator("#batch-run").click()
        # progress by user turns, naming the current dialogue and its turn
        page.wait_for_function(
            "() => /user turns: \\d+ made \\(at most 8\\) · dialogue \\d\\/4 \\(.+\\) at user turn [12]\\/2/"
            ".test(document.body.innerText)", timeout=300_000)
        page.wait_for_function("() => /[123]\\/4 dialogues done/.test(document.body.innerText)", timeout=300_000)
        page.screenshot(path=SHOTS / "batch-02-running.png", full_page=True)
        page.locator("#batch-stop").click()
        status = page.locator("#batch-status")
        status.get_by_text("Stopped:").wait_for(timeout=60_000)
        said = status.inner_text()
        kept = int(re.search(r"Stopped: (\d+) of 4 dialogues finished and kept", said).group(1))
        assert 1 <= kept < 4, said
        page.locator("#batch-files a").first.wait_for(timeout=30_000)
        page.screenshot(path=SHOTS / "batch-03-stopped.png", full_page=True)
        # the session's batch folder lives as long as the session: read it before the page closes
        jsonl = list(out.glob("*/batch-*.jsonl"))
        assert len(jsonl) == 1
        records = [json.loads(line) for line in jsonl[0].read_text().splitlines()]
        report = jsonl[0].with_suffix(".html").read_text(encoding="utf-8")
        browser.close()
    assert len(records) == kept
    assert {r["batch"]["intent_id"] for r in records} <= {"code-python-dedupe", "code-js-debounce"}
    assert all(r["ended_by"] in ("user", "turn_cap") for r in records)  # only finished dialogues
    assert report.count("<details class='dialogue'") == kept
