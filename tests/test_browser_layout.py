"""The page as a stakeholder sees it, at 1440x900 and on a 400 px phone: the story on one screen,
guidance on a first visit, streaming seen as growing text, fork and continue, inline edit, one
guardrail accounting across views, contrast, focus and touch targets measured from computed
styles, chart titles and hover labels inside their plots. Screenshots land in
artifacts/screenshots/ (the README's come from here)."""

from __future__ import annotations

import re
import time

import pytest
from browser_page import wait_for_text
from test_browser import CHROMIUM, SHOTS, TURN_TIMEOUT, sync_api

pytestmark = [pytest.mark.browser, pytest.mark.skipif(not CHROMIUM, reason="Debian's chromium is not installed")]
SAMPLE = "Caffeine and sleep"  # a sample intent's title, as the empty chat offers it

TITLES_INSIDE = """sel => {
  // the visible box: the page's plot container, not plotly's own (possibly wider) SVG
  const plot = document.querySelector(sel + ' .js-plotly-plot');
  if (!plot) return null;
  const box = document.querySelector(sel).getBoundingClientRect();
  const covers = [...document.querySelectorAll(sel + ' label, ' + sel + ' [data-testid="block-label"], '
                  + sel + ' .modebar')].map(e => e.getBoundingClientRect()).filter(r => r.width > 0);
  return [...plot.querySelectorAll('.gtitle, .g-xtitle text, .g-ytitle text')].map(t => {
    const r = t.getBoundingClientRect();
    const hidden = covers.some(c => c.left < r.right && r.left < c.right && c.top < r.bottom && r.top < c.bottom);
    return {text: t.textContent, inside: r.top >= box.top - 1 && r.left >= box.left - 1 &&
            r.bottom <= box.bottom + 1 && r.right <= box.right + 1 && r.width > 0 && !hidden};
  });
}"""

# WCAG contrast of an element's text against the first opaque background behind it
CONTRAST = """el => {
  const rgb = s => (s.match(/[\\d.]+/g) || []).map(Number);
  const lum = c => { const [r, g, b] = c.slice(0, 3).map(v => { v /= 255;
    return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); }); return 0.2126 * r + 0.7152 * g + 0.0722 * b; };
  let fg = rgb(getComputedStyle(el).color), node = el, bg = null;
  while (node && node.nodeType === 1) {
    const c = rgb(getComputedStyle(node).backgroundColor);
    if (c.length === 3 || (c.length === 4 && c[3] > 0.9)) { bg = c; break; }
    node = node.parentElement;
  }
  bg = bg || [255, 255, 255];
  const [a, b] = [lum(fg), lum(bg)].sort((x, y) => y - x);
  return (a + 0.05) / (b + 0.05);
}"""


@pytest.fixture(scope="module")
def app_url(smollm2):
    from usersim_ui.app.studio import build_app

    demo = build_app(max_new_tokens=24, assistant_max_tokens=24, max_turns=3).queue(default_concurrency_limit=1)
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
    page.wait_for_timeout(500)  # the load events (button states, the phone's sidebar) have run
    return page


def box(page, selector):
    return page.locator(selector).first.bounding_box()


def button(page, name):
    return page.get_by_role("button", name=name, exact=True)


def in_viewport(rect, height) -> bool:
    return rect is not None and rect["y"] >= 0 and rect["y"] + rect["height"] <= height and rect["width"] > 0


def chat_text(page) -> str:
    return page.locator("#dialogue").inner_text()


def watch_stream(page, timeout_s: float = 120) -> tuple[float | None, list[str]]:
    """Poll the chat until the turn being written is accepted: the seconds to the first visible
    token (a draft's text, marked by its cursor) and each distinct draft text seen."""
    started, first, seen = time.perf_counter(), None, []
    while time.perf_counter() - started < timeout_s:
        text = chat_text(page)
        if "▍" in text:
            first = first or time.perf_counter() - started
            draft = text.rsplit("▍", 1)[0].rsplit("\n", 1)[-1]
            if not seen or seen[-1] != draft:
                seen.append(draft)
        elif re.search(r"#1 · Simulated user · P\(end\)", text):
            break
        time.sleep(0.02)
    return first, seen


def test_desktop_tells_the_story_on_one_screen(browser, app_url):
    page = open_page(browser, app_url, 1440, 900)
    expect = sync_api.expect
    # first paint: nothing can run without an intent, and the page says what to do
    for name in ("Step", "Auto-run", "Next user turn", "Undo last turn", "Regenerate last turn", "End dialogue",
                 "Stop"):
        expect(button(page, name)).to_be_disabled()
    assert "click a sample intent" in page.locator("#banner").inner_text()
    page.screenshot(path=SHOTS / "layout-1440-first-visit.png")

    # one click on a sample intent starts a dialogue; the user turn streams in as it is written
    clicked = time.perf_counter()
    page.locator("#dialogue .example", has_text=SAMPLE).click()
    first_token, drafts = watch_stream(page)
    assert first_token is not None and len(drafts) >= 2, drafts  # growing text before the turn ended
    assert all(a != b for a, b in zip(drafts, drafts[1:]))
    print(f"\nclick to first visible token: {first_token:.2f} s ({time.perf_counter() - clicked:.1f} s to the "
          f"accepted turn, {len(drafts)} drafts seen)")
    expect(button(page, "Step")).to_be_enabled(timeout=TURN_TIMEOUT)
    assert "sleep" in page.locator("#intent textarea").input_value().lower()
    page.locator("#pend-plot .js-plotly-plot").wait_for()
    page.screenshot(path=SHOTS / "layout-1440.png")

    # the intent, the dialogue, the run controls and the P(end) chart together, no scrolling
    assert page.evaluate("() => window.scrollY") == 0
    for selector in ("#intent", "#dialogue", "#run-controls", "#pend-plot", "#g-first"):
        assert in_viewport(box(page, selector), 900), (selector, box(page, selector))
    assert box(page, "#g-first")["x"] < box(page, "#dialogue")["x"]  # the guardrails beside, in the sidebar

    # one guardrail accounting: the turn's header, the summary and the chart count the same turns
    header = re.search(r"#1 · Simulated user · ([^\n]*)", chat_text(page)).group(1)
    summary = page.locator("#summary").inner_text()
    acted_in_badge = {g for g in ("first_token", "no_early_ending", "length", "repetition") if g in header}
    for guardrail in ("first_token", "no_early_ending"):
        counted = re.search(rf"{guardrail}[^\n]*?(\d+)", summary)
        if counted:
            assert (int(counted.group(1)) > 0) == (guardrail in acted_in_badge), (guardrail, header, summary)

    # a hover label stays inside its plot (checked first, while nothing has scrolled)
    point = box(page, "#pend-plot .scatterlayer .point")
    page.mouse.move(5, 5)
    page.mouse.move(point["x"] + point["width"] / 2, point["y"] + point["height"] / 2, steps=8)  # as a pointer does
    page.locator("#pend-plot .hoverlayer .hovertext").first.wait_for(timeout=5_000)
    page.screenshot(path=SHOTS / "hover-1440.png")
    label, plot_box = box(page, "#pend-plot .hoverlayer .hovertext"), box(page, "#pend-plot")
    assert label is not None, "no hover label"
    assert label["x"] >= plot_box["x"] - 1 and label["x"] + label["width"] <= plot_box["x"] + plot_box["width"] + 1

    # chart titles are not covered by the plot's toolbar (shown on hover) or its label
    for plot in ("#pend-plot", "#guardrail-plot", "#lengths-plot"):
        page.locator(f"{plot} .js-plotly-plot").wait_for()
        page.hover(f"{plot} .js-plotly-plot")
        titles = page.evaluate(TITLES_INSIDE, plot)
        assert titles and all(t["inside"] for t in titles), titles
    # contrast of secondary text, measured from computed styles
    for selector in ("#g-first .info-text", "#g-length .info-text", "#banner p", "#intent label span",
                     "#model-info p"):
        ratio = page.locator(selector).first.evaluate(CONTRAST)
        assert ratio >= 4.5, (selector, ratio)
    # a visible focus ring on a guardrail switch reached by the keyboard
    page.locator("#g-first input").focus()
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Tab")
    ring = page.locator("#g-first input").evaluate(
        "e => [document.activeElement === e, getComputedStyle(e).outlineStyle, parseFloat(getComputedStyle(e).outlineWidth)]")
    assert ring[0] and ring[1] != "none" and ring[2] >= 2, ring
    page.close()


def test_fork_continue_inline_edit_and_undo_in_the_browser(browser, app_url):
    page = open_page(browser, app_url, 1440, 900)
    expect = sync_api.expect
    page.locator("#intent textarea").fill("You want to plan a dinner party for eight people on a budget.")
    button(page, "Next user turn").click()
    wait_for_text(page, "#dialogue", "#1 · Simulated user", timeout=TURN_TIMEOUT)
    expect(button(page, "Step")).to_be_enabled(timeout=TURN_TIMEOUT)
    first = chat_text(page).strip().rsplit("\n", 1)[-1]  # the user turn's text, under its header

    # what else could the user say at turn 1? four alternatives from one batched call
    page.locator("#fork-box .label-wrap").first.click()  # open the fork's settings
    page.locator("#fork-n input[type=number]").fill("4")
    page.locator("#fork-n input[type=number]").press("Enter")
    page.locator("button#fork").click()
    choices = page.locator("#fork-choices label")
    try:
        expect(choices).to_have_count(4, timeout=TURN_TIMEOUT)
    finally:
        page.screenshot(path=SHOTS / "fork-1440.png", full_page=True)
    labels = choices.all_inner_texts()
    assert all("P(end)" in label for label in labels) and len(set(labels)) >= 2
    page.screenshot(path=SHOTS / "fork-1440.png", full_page=True)
    choices.nth(2).click()
    button(page, "Continue from this one").click()
    chosen_text = labels[2].split("“", 1)[1].rsplit("”", 1)[0]
    wait_for_text(page, "#banner", "Continued from alternative 3")
    assert chosen_text[:30] in chat_text(page)

    # Undo brings back the turn the fork replaced
    button(page, "Undo last turn").click()
    wait_for_text(page, "#banner", "Restored")
    assert first in chat_text(page) and (chosen_text[:30] not in chat_text(page) or chosen_text[:30] in first)

    # inline edit: the user turn's text, edited in the chat, and the dialogue continues from it
    page.locator("#dialogue button[aria-label='Edit']").first.click()  # turn 1: its header, then its text
    editor = page.locator("#dialogue textarea").last
    editor.fill("I need a menu for eight that costs under 100 dollars.")
    page.locator("#dialogue").get_by_role("button", name="Submit").click()
    wait_for_text(page, "#banner", "Turn 1 edited")
    assert "I need a menu for eight that costs under 100 dollars." in chat_text(page)
    assert "edited" in re.search(r"#1 · Simulated user · ([^\n]*)", chat_text(page)).group(1)
    button(page, "Undo last turn").click()
    wait_for_text(page, "#banner", "Restored")
    assert "under 100 dollars" not in chat_text(page)
    page.close()


def test_phone_puts_intent_dialogue_and_controls_first_with_44px_targets(browser, app_url):
    page = open_page(browser, app_url, 400, 900)
    intent, dialogue, controls = box(page, "#intent"), box(page, "#dialogue"), box(page, "#run-controls")
    p_end = box(page, "#pend-plot")
    assert intent["y"] < 400 and intent["y"] < dialogue["y"] < controls["y"] < p_end["y"]
    assert box(page, "#settings")["x"] < 0  # the sidebar starts closed: it would cover the page
    small = page.evaluate("""() => [...document.querySelectorAll('button')]
        .filter(b => b.offsetParent !== null && b.getBoundingClientRect().width > 0 && !b.closest('#settings')
                && !b.closest('footer'))  // gradio's own footer lies outside the page's stylesheet
        .map(b => [b.innerText.trim() || b.getAttribute('aria-label'), b.getBoundingClientRect().height])
        .filter(([name, h]) => h < 44)""")
    assert small == [], small
    page.locator("#settings .toggle-button").click()
    page.wait_for_timeout(500)
    toggle = box(page, "#g-first label.checkbox-container")
    assert toggle["height"] >= 44 and toggle["x"] >= 0
    page.locator("#settings .toggle-button").click()
    page.wait_for_timeout(500)
    page.screenshot(path=SHOTS / "layout-400.png", full_page=True)
    page.close()


def test_controls_during_a_run_the_chats_clear_and_closing_the_tab(browser, app_url):
    from test_browser import INTENT

    page = open_page(browser, app_url, 1440, 900)
    expect = sync_api.expect
    step, stop = button(page, "Step"), button(page, "Stop")
    page.locator("#intent textarea").fill(INTENT)
    expect(step).to_be_enabled()
    expect(stop).to_be_disabled()
    button(page, "Auto-run").click()
    wait_for_text(page, "#banner", "Writing", timeout=30_000)
    expect(step).to_be_disabled()
    expect(stop).to_be_enabled()
    expect(button(page, "Undo last turn")).to_be_disabled()
    page.screenshot(path=SHOTS / "layout-1440-running.png")
    wait_for_text(page, "#dialogue", "#1 ·", timeout=TURN_TIMEOUT)
    stop.click()
    page.get_by_text("Stopped. The dialogue so far is kept.").first.wait_for(timeout=60_000)
    expect(step).to_be_enabled(timeout=30_000)
    expect(stop).to_be_disabled(timeout=30_000)
    expect(button(page, "Undo last turn")).to_be_enabled(timeout=30_000)

    # the chat box's own Clear button clears the dialogue, not just the view
    page.locator("#dialogue button[aria-label='Clear']").first.click()
    wait_for_text(page, "#dialogue", "#1 ·", absent=True)
    expect(button(page, "Undo last turn")).to_be_disabled()  # nothing to undo

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


def test_an_example_asks_before_replacing_the_dialogue_shown(browser, app_url):
    page = open_page(browser, app_url, 1440, 900)
    page.get_by_role("button", name="Example dialogues").click()
    page.locator("#gallery button").first.click()  # nothing shown yet: no question
    wait_for_text(page, "#dialogue", "#2 ·")
    page.wait_for_timeout(800)  # the chat has drawn every message
    shown = chat_text(page)
    asked: list[str] = []
    page.once("dialog", lambda d: (asked.append(d.message), d.dismiss()))  # "keep mine"
    page.locator("#gallery button").nth(1).click()
    wait_for_text(page, "#banner", "Kept the dialogue shown")
    assert asked and "Export it first" in asked[0] and chat_text(page) == shown
    page.once("dialog", lambda d: d.accept())
    page.locator("#gallery button").nth(1).click()
    page.wait_for_function("s => document.querySelector('#dialogue')?.innerText !== s", arg=shown)
    page.close()
