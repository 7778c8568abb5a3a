"""The page as a stakeholder sees it, at 1440x900 and on a 400 px phone: what is visible
without scrolling, what comes first, chart titles inside their plots, and controls that
are disabled while a run is in flight. Screenshots land in artifacts/screenshots/."""

from __future__ import annotations

import time

import pytest
from browser_page import wait_for_text
from test_browser import CHROMIUM, INTENT, SHOTS, TURN_TIMEOUT, sync_api

pytestmark = [pytest.mark.browser, pytest.mark.skipif(not CHROMIUM, reason="Debian's chromium is not installed")]

TITLES_INSIDE = """sel => {
  // the visible box: the page's plot container, not plotly's own (possibly wider) SVG
  const plot = document.querySelector(sel + ' .js-plotly-plot');
  if (!plot) return null;
  const box = document.querySelector(sel).getBoundingClientRect();
  const covers = [...document.querySelectorAll(sel + ' label, ' + sel + ' [data-testid="block-label"]')]
    .map(e => e.getBoundingClientRect()).filter(r => r.width > 0);
  return [...plot.querySelectorAll('.gtitle, .g-xtitle text, .g-ytitle text')].map(t => {
    const r = t.getBoundingClientRect();
    const hidden = covers.some(c => c.left < r.right && r.left < c.right && c.top < r.bottom && r.top < c.bottom);
    return {text: t.textContent, inside: r.top >= box.top - 1 && r.left >= box.left - 1 &&
            r.bottom <= box.bottom + 1 && r.right <= box.right + 1 && r.width > 0 && !hidden};
  });
}"""


@pytest.fixture(scope="module")
def app_url(smollm2):
    from usersim_ui.app.studio import build_app

    demo = build_app(max_new_tokens=24, max_turns=3).queue(default_concurrency_limit=1)
    _app, url, _share = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    yield url
    demo.close()


@pytest.fixture(scope="module")
def browser():
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        yield browser
        browser.close()


def open_page(browser, url, width, height):
    page = browser.new_page(viewport={"width": width, "height": height})
    page.goto(url)
    page.get_by_role("button", name="Step", exact=True).wait_for()
    return page


def box(page, selector):
    return page.locator(selector).first.bounding_box()


def test_desktop_shows_toggles_beside_the_dialogue_and_disables_controls_during_a_run(browser, app_url):
    page = open_page(browser, app_url, 1440, 900)
    dialogue, toggle, length = box(page, "#dialogue"), box(page, "#g-first"), box(page, "#g-length")
    assert toggle["x"] > dialogue["x"] + dialogue["width"] - 5  # beside it, to the right
    assert length["y"] + length["height"] <= 900  # in the first viewport, no scrolling
    step, stop = page.get_by_role("button", name="Step", exact=True), page.get_by_role("button", name="Stop", exact=True)
    expect = sync_api.expect
    expect(step).to_be_enabled()
    expect(stop).to_be_disabled()

    page.locator("#intent textarea").fill(INTENT)
    page.get_by_role("button", name="Auto-run", exact=True).click()
    wait_for_text(page, "#banner", "Writing", timeout=30_000)
    expect(step).to_be_disabled()
    expect(stop).to_be_enabled()
    expect(page.get_by_role("button", name="Undo last turn", exact=True)).to_be_disabled()
    page.screenshot(path=SHOTS / "layout-1440-running.png")
    wait_for_text(page, "#dialogue", "#1 ·", timeout=TURN_TIMEOUT)
    stop.click()
    page.get_by_text("Stopped. The dialogue so far is kept.").first.wait_for(timeout=60_000)
    expect(step).to_be_enabled(timeout=30_000)
    expect(stop).to_be_disabled(timeout=30_000)
    expect(page.get_by_role("button", name="Undo last turn", exact=True)).to_be_enabled(timeout=30_000)

    for plot in ("#pend-plot", "#guardrail-plot", "#lengths-plot"):
        page.locator(f"{plot} .js-plotly-plot").wait_for()
        titles = page.evaluate(TITLES_INSIDE, plot)
        assert titles and all(t["inside"] for t in titles), titles
    page.screenshot(path=SHOTS / "layout-1440.png", full_page=True)

    # the chat box's own Clear button clears the dialogue, not just the view
    page.locator("#dialogue button[aria-label='Clear']").first.click()
    wait_for_text(page, "#dialogue", "#1 ·", absent=True)
    expect(page.get_by_role("button", name="Undo last turn", exact=True)).to_be_disabled()  # nothing to undo

    # closing the tab releases what the session held (demo.unload)
    from usersim_ui.app.handlers import RUNS

    forgotten: list[tuple[str, dict]] = []
    release = RUNS.on_forget
    RUNS.on_forget = lambda session, data: (forgotten.append((session, data)), release(session, data))
    try:
        page.close()
        for _ in range(100):
            if forgotten:
                break
            time.sleep(0.1)
    finally:
        RUNS.on_forget = release
    assert len(forgotten) == 1 and "settings" in forgotten[0][1]  # the session that ran, with its data


def test_phone_puts_the_dialogue_first_and_charts_stack(browser, app_url):
    page = open_page(browser, app_url, 400, 900)
    dialogue, intent, guardrail = box(page, "#dialogue"), box(page, "#intent"), box(page, "#g-first")
    assert dialogue["y"] < intent["y"] < guardrail["y"]
    assert dialogue["width"] <= 400
    page.get_by_role("button", name="Example dialogues").click()
    page.locator("#gallery button").first.click()  # one click loads a finished dialogue
    wait_for_text(page, "#dialogue", "#2 ·", timeout=30_000)
    page.locator("#pend-plot .js-plotly-plot").wait_for()
    p_end, lengths = box(page, "#pend-plot"), box(page, "#lengths-plot")
    assert lengths["y"] >= p_end["y"] + p_end["height"] - 5  # stacked, not side by side
    for plot in ("#pend-plot", "#guardrail-plot", "#lengths-plot"):
        titles = page.evaluate(TITLES_INSIDE, plot)
        assert titles and all(t["inside"] for t in titles), titles
    page.screenshot(path=SHOTS / "layout-400.png", full_page=True)
    page.close()
