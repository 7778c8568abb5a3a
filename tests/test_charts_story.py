"""The demo-page story told by one hand-built dialogue: a masked end, a resampled turn, a turn kept
after the retry cap, a researcher-typed user turn and a user who finally ends. Each chart, badge
and summary line must say what the turns recorded, at the scale where P(end) actually lives."""

from __future__ import annotations

import math

import pytest

from usersim_ui.analysis.charts import guardrail_figure, lengths_figure, p_end_figure
from usersim_ui.analysis.metrics import format_probability, summary, turn_table
from usersim_ui.analysis.transcript import (
    badge_line,
    end_line,
    summary_text,
    to_markdown,
)
from usersim_ui.core.dialogue import (
    Dialogue,
    GuardrailEvent,
    GuardrailSettings,
    RejectedSample,
    Turn,
)

P_ENDS = {1: 3e-4, 3: 2.4e-4, 5: 0.04, 9: 0.35}  # turn number -> P(end), user turns the model wrote
MASKED_TURNS = [5]  # turn 1's end was masked too, but at P 3e-4 that changed nothing (GuardrailEvent.acted)


def masked(p: float) -> GuardrailEvent:
    return GuardrailEvent("no_early_ending", "masked", f"end (p={p:.2f})", probability_removed=p)


def words(n: int, letter: str = "w") -> str:
    return " ".join([letter] * n)


def story() -> Dialogue:
    return Dialogue(intent="plan a week in Kyoto", ended_by="user", turns=(
        Turn(role="user", text="kyoto in april, any tips?", words=5, tokens=8, p_end=P_ENDS[1], latency_s=0.5,
             guardrails=(GuardrailEvent("first_token", "masked", "'I' (p=0.40)", probability_removed=0.4), masked(3e-4))),
        Turn(role="assistant", text="Sure, when are you going?", words=5, tokens=7),
        Turn(role="user", text="mid april, what about food", words=5, tokens=6, p_end=P_ENDS[3],
             guardrails=(GuardrailEvent("length", "resampled", "28 words", count=2),),
             rejected=(RejectedSample(words(31, "a"), "length: 31 words"), RejectedSample(words(28, "b"), "length: 28 words"))),
        Turn(role="assistant", text="Try Nishiki market.", words=3, tokens=5),
        Turn(role="user", text=words(25, "c"), words=25, tokens=30, p_end=P_ENDS[5], truncated=True,
             guardrails=(masked(0.04), GuardrailEvent("retry_cap", "gave_up", "kept a sample after 5 resamples (length: 40 words)"),
                         GuardrailEvent("length", "resampled", "34 words", count=5)),
             rejected=tuple(RejectedSample(words(30 + i, "d"), f"length: {30 + i} words") for i in range(5))),
        Turn(role="assistant", text="Anything else?", words=2, tokens=3),
        Turn(role="user", text="what about temples", words=3, tokens=0, author="researcher"),
        Turn(role="assistant", text="Fushimi Inari, early.", words=3, tokens=6),
        Turn(role="user", text="", words=0, tokens=1, p_end=P_ENDS[9], ends_dialogue=True),
    ))


def traces(fig) -> dict[str, dict]:
    return {t["name"]: t for t in fig.to_plotly_json()["data"]}


# ---- P(end) --------------------------------------------------------------------------------

def test_p_end_axis_is_logarithmic_and_reaches_down_to_the_tiny_values():
    layout = p_end_figure(story()).to_plotly_json()["layout"]
    low, high = layout["yaxis"]["range"]  # log10 units on a log axis
    assert layout["yaxis"]["type"] == "log"
    assert low < math.log10(min(P_ENDS.values())) and high >= math.log10(max(P_ENDS.values()))
    assert high <= 0.5  # no decades of empty space above probability 1
    linear = p_end_figure(story(), log=False).to_plotly_json()["layout"]["yaxis"]
    assert linear["type"] == "linear" and list(linear["range"]) == [0, 1.05]


def test_masked_turns_are_shaded_exactly_and_labelled():
    shapes = p_end_figure(story()).to_plotly_json()["layout"]["shapes"]
    centres = sorted((s["x0"] + s["x1"]) / 2 for s in shapes)
    assert centres == pytest.approx(MASKED_TURNS)
    assert all(s["x1"] - s["x0"] < 1 and s["fillcolor"] for s in shapes)
    assert all(s["yref"] in ("paper", "y domain") and (s["y0"], s["y1"]) == (0, 1) for s in shapes)  # full height
    labelled = [s for s in shapes if s.get("showlegend")]
    assert len(labelled) == 1 and "end masked" in labelled[0]["name"]


def test_the_ending_turn_has_a_star_and_the_researcher_turn_has_no_point():
    data = traces(p_end_figure(story()))
    stars = [t for t in data.values() if t.get("marker", {}).get("symbol") == "star"]
    assert len(stars) == 1 and list(stars[0]["x"]) == [9] and list(stars[0]["y"]) == [P_ENDS[9]]
    points = next(t for t in data.values() if t.get("mode") == "lines+markers")
    assert list(points["x"]) == list(P_ENDS) and list(points["y"]) == list(P_ENDS.values())


def test_dashed_line_is_the_probability_of_having_ended_with_the_end_unmasked():
    dashed = [t for t in traces(p_end_figure(story())).values() if t.get("line", {}).get("dash") == "dash"]
    assert len(dashed) == 1 and "would have ended" in dashed[0]["name"] and "unmasked" in dashed[0]["name"]
    expected, survive = [], 1.0
    for p in P_ENDS.values():  # the researcher's turn 7 has no P(end): the user could not have ended there
        survive = survive * (1 - p)
        expected.append(1 - survive)
    assert list(dashed[0]["x"]) == list(P_ENDS)
    assert list(dashed[0]["y"]) == pytest.approx(expected, rel=1e-12)
    assert expected[1] > max(P_ENDS[1], P_ENDS[3])  # cumulative, not the per-turn value again


def test_hover_gives_exact_values_in_scientific_notation_when_tiny():
    data = traces(p_end_figure(story()))
    points = next(t for t in data.values() if t.get("mode") == "lines+markers")
    hover = list(points["hovertext"])
    assert "3.0e-04" in hover[0] and "2.4e-04" in hover[1] and "0.040" in hover[2] and "0.350" in hover[3]
    assert "masked" in hover[2] and "masked" not in hover[0] and "masked" not in hover[1]
    assert "%{hovertext}" in points["hovertemplate"]
    assert not any("0.000" in h for h in hover)


@pytest.mark.parametrize("p, text", [(2.4e-4, "2.4e-04"), (9.99e-4, "1.0e-03"), (1e-9, "1.0e-09"), (0.001, "0.001"),
                                     (0.2, "0.200"), (1.0, "1.000"), (0.0, "0"), (None, "n/a")])
def test_format_probability(p, text):
    assert format_probability(p) == text


def test_one_accounting_a_mask_that_removed_almost_nothing_is_counted_nowhere():
    """Badge, P(end) shading, guardrail chart, summary and the batch report count the same events
    (GuardrailEvent.acted): a masked end of P 1e-4 (an imported record, or settings that masked
    it) changed nothing and appears in none of them; one of P 0.2 appears in all."""
    quiet = GuardrailEvent("no_early_ending", "masked", "end (p=0.00)", probability_removed=1e-4)
    loud = GuardrailEvent("no_early_ending", "masked", "end (p=0.20)", probability_removed=0.2)
    d = Dialogue(intent="x", turns=(
        Turn(role="user", text="a b c", p_end=1e-4, guardrails=(quiet,), guardrail_settings=GuardrailSettings()),
        Turn(role="assistant", text="d"),
        Turn(role="user", text="e f g", p_end=0.2, guardrails=(loud,), guardrail_settings=GuardrailSettings()),
        Turn(role="assistant", text="h"),
        Turn(role="user", text="i j k", p_end=3e-4, guardrail_settings=GuardrailSettings()),
    ))
    assert list(turn_table(d)["end_masked"]) == [False, False, True, False, False]
    shapes = p_end_figure(d).to_plotly_json()["layout"]["shapes"]
    assert [(s["x0"] + s["x1"]) / 2 for s in shapes] == pytest.approx([3])
    marks = [(x, y, t["name"]) for t in guardrail_figure(d).to_plotly_json()["data"] for x, y in zip(t["x"], t["y"])]
    assert marks == [(3, "no early ending", "masked")]
    assert "guardrails acted 1x (no early ending 1)" in summary_text(d)
    badges = [badge_line(t) for t in d.turns]
    assert "no_early_ending" not in badges[0] and "no_early_ending" in badges[2]
    from usersim_ui.analysis.distribution import dialogue_table
    assert dialogue_table({"A": [d]})["no_early_ending_turns"].tolist() == [1]


# ---- guardrails and lengths ----------------------------------------------------------------

def test_guardrail_figure_counts_each_guardrail_on_each_turn():
    fig = guardrail_figure(story()).to_plotly_json()
    seen = {}
    for trace in fig["data"]:
        for x, y, count, hover in zip(trace["x"], trace["y"], trace["customdata"], trace["hovertext"]):
            seen[(x, y, trace["name"])] = count
            assert f"Turn {x}" in hover and y in hover
    assert seen == {(1, "first-token filter", "masked"): 1,
                    (3, "length", "resampled"): 2, (5, "no early ending", "masked"): 1,
                    (5, "length", "resampled"): 5, (5, "retry cap", "gave up"): 1}
    resampled = next(t for t in fig["data"] if t["name"] == "resampled")
    assert list(resampled["text"]) == ["2x", "5x"]
    rows = list(fig["layout"]["yaxis"]["categoryarray"])
    assert sorted(rows) == sorted(["first-token filter", "no early ending", "length", "repetition", "retry cap"])


def test_lengths_figure_puts_rejected_sample_lengths_beside_the_accepted_turn():
    data = traces(lengths_figure(story()))
    assert list(data["user words"]["y"]) == [5, 5, 25, 3, 0] and list(data["user words"]["x"]) == [1, 3, 5, 7, 9]
    rejected = data["rejected samples (words)"]
    assert list(rejected["y"]) == [31, 28, 30, 31, 32, 33, 34]
    assert list(rejected["customdata"]) == [3, 3, 5, 5, 5, 5, 5]
    assert all(0 < x - n < 0.5 for x, n in zip(rejected["x"], rejected["customdata"]))
    assert rejected["marker"]["symbol"].endswith("-open")
    assert "length: 31 words" in rejected["hovertext"][0]


# ---- text --------------------------------------------------------------------------------

def test_badges_say_tiny_p_end_rejected_lengths_and_cuts():
    badges = [badge_line(t) for t in story().turns]
    assert badges[0].startswith("P(end) 3.0e-04 · 5 words / 8 tokens · 0.50 s")
    assert "P(end) 2.4e-04 · 5 words / 6 tokens · rejected: 31, 28 words · length: resampled 2x" in badges[2]
    assert "rejected: 30, 31, 32, 33, 34 words · cut at 25 words" in badges[4]
    assert badges[6] == "3 words / 0 tokens · typed by researcher"
    assert badges[8].startswith("P(end) 0.350 ·")
    assert sum("cut at" in b for b in badges) == 1 and sum("rejected:" in b for b in badges) == 2


def test_summary_text_in_plain_english():
    assert summary_text(story()) == (
        "**9 turns** (5 user) · **Ended by the simulated user at turn 9** · guardrails acted 10x "
        "(first-token filter 1, no early ending 1, length 7, retry cap 1) · 1.40 resamples per user turn · "
        "mean P(end) 0.098 · 1 turn kept although cut short")
    first = GuardrailEvent("first_token", "masked", "'I' (p=0.40)")
    capped = Dialogue(intent="x", ended_by="turn_cap", turns=(
        Turn(role="user", text="a", p_end=2e-4, guardrails=(first,)), Turn(role="assistant", text="b"),
        Turn(role="user", text="c", p_end=3e-4, guardrails=(first, GuardrailEvent("length", "resampled", "30 words", count=2)),
             rejected=(RejectedSample("x", "length: 1 words"), RejectedSample("y", "length: 1 words"))),
        Turn(role="assistant", text="d"), Turn(role="user", text="e", p_end=4e-4), Turn(role="assistant", text="f"),
    ))
    assert summary_text(capped) == ("**6 turns** (3 user) · **Ended by the turn cap** · guardrails acted 4x "
                                    "(first-token filter 2, length 2) · 0.67 resamples per user turn · mean P(end) 3.0e-04")
    open_one = Dialogue(intent="x", turns=capped.turns[:2])
    assert "**Still running**" in summary_text(open_one, running=True)
    assert "**Not ended yet**" in summary_text(open_one) and "running" not in summary_text(open_one)
    researcher = Dialogue(intent="x", ended_by="researcher", turns=(Turn(role="user", text="hi", author="researcher"),))
    assert summary_text(researcher) == ("**1 turn** (1 user) · **Ended by the researcher** · no guardrail acted · "
                                        "0.00 resamples per user turn")


def test_mean_p_end_skips_user_turns_without_one():
    s = summary(story())
    assert s["user_turns"] == 5
    assert s["mean_p_end"] == pytest.approx(sum(P_ENDS.values()) / 4)  # the old code divided by 5
    assert summary(Dialogue(intent="x", turns=(Turn(role="user", text="hi", author="researcher"),)))["mean_p_end"] is None


def test_transcript_keeps_badges_and_the_end_line():
    md = to_markdown(story())
    assert "**9. user:** <|endconversation|>" in md and "<sub>P(end) 3.0e-04 · 5 words / 8 tokens" in md
    assert "cut at 25 words" in md and md.rstrip().endswith("_Dialogue over: the simulated user ended it._")
    assert end_line(Dialogue(intent="x")) == ""


# ---- readability -------------------------------------------------------------------------

@pytest.mark.parametrize("make", [p_end_figure, lengths_figure, guardrail_figure])
def test_titles_fit_and_axes_are_named_in_words(make):
    layout = make(story()).to_plotly_json()["layout"]
    title = layout["title"]
    assert len(title["text"]) > 10 and title["yref"] == "container" and 0 < title["y"] <= 1
    assert layout["margin"]["t"] >= 60
    assert layout["xaxis"]["title"]["text"] == "Turn"
    legend = layout["legend"]
    # legend pinned to the bottom of the figure, inside a bottom margin that also holds the x axis title
    assert legend["yref"] == "container" and legend["yanchor"] == "bottom" and layout["margin"]["b"] >= 80


def test_p_end_axis_title_is_a_sentence():
    layout = p_end_figure(story()).to_plotly_json()["layout"]
    assert layout["yaxis"]["title"]["text"] == "Probability the user ends here"
    assert layout["title"]["text"].startswith("P(end): chance the user ends")  # words, not a symbol alone


def test_an_exact_zero_stays_on_the_log_axis_and_says_zero():
    d = Dialogue(intent="x", turns=(Turn(role="user", text="a", p_end=0.0), Turn(role="assistant", text="b"),
                                    Turn(role="user", text="c", p_end=5e-5)))
    fig = p_end_figure(d).to_plotly_json()
    low, _ = fig["layout"]["yaxis"]["range"]
    points = next(t for t in fig["data"] if t.get("mode") == "lines+markers")
    assert low < math.log10(points["y"][0]) < math.log10(5e-5) and points["y"][1] == 5e-5
    assert "P(end) = 0" in points["hovertext"][0] and low < math.log10(5e-5) - 0.2
