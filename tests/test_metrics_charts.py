"""Chart data from dialogues: what the researcher sees must match the turns."""

from __future__ import annotations

from usersim_ui.analysis.charts import (
    ENDED_NAME,
    P_END_NAME,
    guardrail_figure,
    lengths_figure,
    p_end_figure,
)
from usersim_ui.analysis.metrics import summary, turn_table
from usersim_ui.core.dialogue import Dialogue, GuardrailEvent, RejectedSample, Turn


def dialogue() -> Dialogue:
    masked = GuardrailEvent("no_early_ending", "masked", "end (p=0.62)", probability_removed=0.62)
    return Dialogue(intent="x", ended_by="user", turns=(
        Turn(role="user", text="a b c", words=3, tokens=4, p_end=0.01),
        Turn(role="assistant", text="d e", words=2, tokens=3),
        Turn(role="user", text="f g h i", words=4, tokens=5, p_end=0.62, guardrails=(masked,),
             rejected=(RejectedSample("x", "length: 1 words"), RejectedSample("y", "length: 1 words"))),
        Turn(role="assistant", text="j", words=1, tokens=1),
        Turn(role="user", text="", words=0, tokens=1, p_end=0.9, ends_dialogue=True),
    ))


def test_turn_table_and_summary():
    table = turn_table(dialogue())
    assert list(table["words"]) == [3, 2, 4, 1, 0]
    assert list(table["end_masked"]) == [False, False, True, False, False]
    s = summary(dialogue())
    assert s["ended_by"] == "user" and s["guardrail_activations"] == {"no_early_ending": 1}
    assert s["mean_resamples_per_user_turn"] == 2 / 3


def test_figures_carry_the_numbers_and_survive_an_empty_dialogue():
    lengths = lengths_figure(dialogue())
    user_words = next(t for t in lengths.data if t.name == "user words")
    assert list(user_words.y) == [3, 4, 0] and list(user_words.x) == [1, 3, 5]
    p_end = p_end_figure(dialogue())
    traces = {t.name: t for t in p_end.data}
    assert list(traces[P_END_NAME].y) == [0.01, 0.62, 0.9] and list(traces[P_END_NAME].x) == [1, 3, 5]
    masked_bands = [s for s in p_end.layout.shapes if s.x0 < 3 < s.x1]
    assert len(p_end.layout.shapes) == 1 and len(masked_bands) == 1
    assert list(traces[ENDED_NAME].x) == [5]
    empty = Dialogue(intent="x")
    figures = p_end_figure(empty).data + lengths_figure(empty).data + guardrail_figure(empty).data
    assert figures and all(len(t.x) == 0 for t in figures)
    assert not p_end_figure(empty).layout.shapes
