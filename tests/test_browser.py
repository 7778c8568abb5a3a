"""A researcher's session in a real browser (Debian's chromium via Playwright) against the
launched app on the offline default models. Screenshots land in artifacts/screenshots/."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from browser_page import wait_for_text

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.browser, pytest.mark.skipif(not CHROMIUM, reason="Debian's chromium is not installed")]
SHOTS = Path(os.environ.get("USERSIM_SCREENSHOTS", Path(__file__).resolve().parent.parent / "artifacts" / "screenshots"))
INTENT = "You want to know how long before bedtime you should stop drinking coffee, because you sleep badly."
TURN_TIMEOUT = 120_000


@pytest.fixture(scope="module")
def app_url(smollm2):
    from usersim_ui.app.studio import build_app

    demo = build_app(max_new_tokens=24, assistant_max_tokens=16, max_turns=4).queue(default_concurrency_limit=1)
    _app, url, _share = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    yield url
    demo.close()


@pytest.fixture(scope="module")
def page(app_url):
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        page.goto(app_url)
        page.get_by_role("button", name="Step", exact=True).wait_for()
        yield page
        browser.close()


def turns(page) -> int:
    """Number of the last turn shown (each turn's badge line starts '#N ·')."""
    numbers = re.findall(r"#(\d+) ·", page.locator("#dialogue").inner_text())
    return max(map(int, numbers), default=0)


def click_and_wait(page, button: str, expected_turns: int) -> None:
    page.get_by_role("button", name=button, exact=True).click()
    page.wait_for_function(
        "n => [...document.querySelectorAll('#dialogue')].some(e => e.innerText.includes('#' + n + ' ·'))",
        arg=expected_turns, timeout=TURN_TIMEOUT)
    page.wait_for_timeout(300)


def badge_of(page, number: int) -> str:
    match = re.search(rf"#{number} · ([^\n]*)", page.locator("#dialogue").inner_text())
    assert match, f"turn {number} not shown"
    return match.group(1)


def show_details(page, number: int, marker: str, shown: bool) -> None:
    """Unfold (``shown``) or fold turn ``number``'s details and wait until ``marker`` is (or is not)
    on the page. A click that lands while the chat re-renders after a turn can be lost (seen on
    CI under load: the details stayed open): it is clicked again, three times at most."""
    for _ in range(3):
        if (marker in page.locator("#dialogue").inner_text()) == shown:
            return
        page.locator("#dialogue").get_by_text(f"#{number} ·").click()
        try:
            wait_for_text(page, "#dialogue", marker, absent=not shown, timeout=3_000)
            return
        except sync_api.TimeoutError:
            continue
    raise AssertionError(f"turn {number}'s details would not {'unfold' if shown else 'fold'}")


def set_number(page, label: str, value: int) -> None:
    box = page.get_by_label(label, exact=True)
    box.fill(str(value))
    box.press("Tab")


def test_a_researcher_session(page, tmp_path):
    page.locator("#intent textarea").fill(INTENT)
    click_and_wait(page, "Step", 2)
    click_and_wait(page, "Step", 4)
    assert "P(end)" in badge_of(page, 3)
    page.screenshot(path=SHOTS / "01-two-steps.png", full_page=True)

    # a guardrail setting changed now applies to the very next turn
    set_number(page, "Retry cap", 1)
    set_number(page, "Max words", 400)
    set_number(page, "Min words", 300)
    click_and_wait(page, "Next user turn", 5)
    assert "length: resampled 1x" in badge_of(page, 5) and "retry_cap: gave_up" in badge_of(page, 5)
    show_details(page, 5, "rejected (", True)  # unfold the turn's details
    assert "rejected (length:" in page.locator("#dialogue").inner_text()
    show_details(page, 5, "rejected (", False)  # fold it again (the page text compared below has it folded)
    page.locator("#g-length input").uncheck()
    page.wait_for_timeout(500)
    click_and_wait(page, "Next assistant turn", 6)
    click_and_wait(page, "Next user turn", 7)
    assert "length" not in badge_of(page, 7)
    page.screenshot(path=SHOTS / "02-guardrail-toggled.png", full_page=True)

    # auto-run to the end (turn cap 4 user turns: one more exchange)
    page.get_by_role("button", name="Auto-run", exact=True).click()
    page.locator("#banner").get_by_text("Dialogue over").wait_for(timeout=TURN_TIMEOUT)
    assert turns(page) == 8
    page.locator("#lengths-plot .js-plotly-plot").wait_for()
    page.locator("#pend-plot .js-plotly-plot").wait_for()
    page.screenshot(path=SHOTS / "03-finished.png", full_page=True)
    finished = page.locator("#dialogue").inner_text()

    # export, reset, re-import: the same dialogue comes back
    page.get_by_role("button", name="Export / import").click()
    page.get_by_role("button", name="Export JSONL", exact=True).click()
    link = page.locator("#export-file a").first
    link.wait_for(timeout=30_000)
    with page.expect_download() as download:
        link.click()
    exported = tmp_path / "dialogue.jsonl"
    download.value.save_as(exported)
    assert '"ended_by": "turn_cap"' in exported.read_text()
    page.get_by_role("button", name="Reset", exact=True).click()
    wait_for_text(page, "#dialogue", "#1 ·", absent=True)
    page.locator("#import-file input[type=file]").set_input_files(str(exported))
    wait_for_text(page, "#dialogue", "#8 ·", timeout=30_000)
    assert page.locator("#dialogue").inner_text() == finished
    page.screenshot(path=SHOTS / "04-reimported.png", full_page=True)


def test_stop_midway_keeps_the_dialogue_and_the_app_usable(page):
    page.get_by_role("button", name="Reset", exact=True).click()
    page.locator("#intent textarea").fill(INTENT)
    page.get_by_role("button", name="Auto-run", exact=True).click()
    wait_for_text(page, "#dialogue", "#2 ·", timeout=TURN_TIMEOUT)
    page.get_by_role("button", name="Stop", exact=True).click()
    page.get_by_text("Stopped. The dialogue so far is kept.").first.wait_for(timeout=60_000)
    kept = turns(page)
    assert 2 <= kept < 8
    assert "Dialogue over" not in page.locator("#banner").inner_text()
    page.screenshot(path=SHOTS / "05-stopped.png", full_page=True)
    click_and_wait(page, "Step", kept + 2)  # usable after a stop


def test_html_and_an_open_fence_in_a_reply_are_shown_as_written(page):
    """Issue 6, case 9: the researcher types markup as the assistant; it shows literally."""
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.get_by_role("button", name="Reset", exact=True).click()
    page.locator("#intent textarea").fill(INTENT)
    page.get_by_label("You are the assistant (type the replies)").check()
    click_and_wait(page, "Next user turn", 1)
    nasty = "<script>alert(1)</script><img src=x> then code:\n```\nunclosed <b>fence</b>"
    page.locator("#your-reply textarea").fill(nasty)
    page.get_by_role("button", name="Send", exact=True).click()
    wait_for_text(page, "#dialogue", "#2 ·", timeout=30_000)
    page.wait_for_timeout(500)
    shown = page.locator("#dialogue").inner_text()
    assert "<script>alert(1)</script><img src=x> then code:" in shown
    assert "unclosed <b>fence</b>" in shown and page.locator("#dialogue img[src=x]").count() == 0
    assert re.search(r"#2 · Assistant · \d+ words / \d+ tokens · typed by researcher", shown), shown[-300:]
    assert dialogs == []
    page.screenshot(path=SHOTS / "06-literal-html.png", full_page=True)
    page.get_by_label("Local model (SmolLM2-135M-Instruct)").check()
