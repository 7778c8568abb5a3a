"""Forks, inline edits and the Undo that restores what they replaced, through the page's
handlers on the tiny UserLM (no server, no browser)."""

from __future__ import annotations

import gradio as gr
import pytest

from usersim_ui.app import branches, handlers, zerogpu
from usersim_ui.app.form import settings_from_inputs
from usersim_ui.core import transitions
from usersim_ui.core.dialogue import Dialogue, GuardrailEvent, RejectedSample, Turn
from usersim_ui.core.seeds import alternative_seeds
from usersim_ui.users.batched import alternative_turns

INTENT = "You want a recipe for a chocolate cake."
# temperature 1, top-p 0.8, 12 new tokens; no guardrail resamples, so each alternative is one draw
SETTINGS = settings_from_inputs(1.0, 0.8, 12, 0, 6, False, False, 0, False, 1, 1000, False, 0)
SESSION = "branches-test"


@pytest.fixture
def session(monkeypatch, tiny_sim):
    monkeypatch.setattr(zerogpu, "_simulator", tiny_sim)
    handlers.RUNS.forget(SESSION)
    yield SESSION
    handlers.RUNS.forget(SESSION)


def three_turns() -> Dialogue:
    return Dialogue(intent=INTENT, turns=(
        Turn("user", "hi, I need a cake recipe", p_end=0.01, author="model",
             rejected=(RejectedSample("too long " * 20, "length: 40 words > 25"),),
             guardrails=(GuardrailEvent("length", "resampled", "40 words > 25"),)),
        Turn("assistant", "Sure: flour, eggs, cocoa."),
        Turn("user", "thanks, that is all", p_end=0.4, author="model"),
    ))


def committed(session: str, dialogue: Dialogue) -> Dialogue:
    return handlers.RUNS.transition(session, None, lambda _d: dialogue, "Loading")


def test_alternatives_are_one_batched_call_and_the_first_is_the_turn_step_makes(tiny_sim):
    dialogue = Dialogue(intent=INTENT)
    turns = alternative_turns(tiny_sim, dialogue, SETTINGS, 4)
    assert [t.seed for t in turns] == alternative_seeds(SETTINGS.sampling.seed, 0, 4)
    assert len({t.seed for t in turns}) == 4 and len({t.text for t in turns}) >= 2  # different draws
    step = transitions.user_turn(dialogue, tiny_sim, SETTINGS)
    assert turns[0].text == step.turns[0].text and turns[0].p_end == pytest.approx(step.turns[0].p_end, rel=1e-4)
    assert all(t.p_end == pytest.approx(turns[0].p_end, rel=1e-4) for t in turns)  # same prefix, same P(end)


def test_fork_then_continue_then_undo_restores_the_replaced_turns(session):
    source = committed(session, three_turns())
    outs = list(branches.draw_fork(source, INTENT, 3, 5, SETTINGS, session))
    assert "Drawing 5" in outs[0][1]
    choices = outs[-1][0]["choices"]
    assert len(choices) == 5 and all("P(end)" in label for label, _value in choices)
    fork = handlers.RUNS.session_data(session)["fork"]
    assert fork.number == 3 and handlers.RUNS.dialogue(session) == source  # drawing changes nothing

    made = branches.continue_fork(source, 2, session)[0]
    assert made.turns[:2] == source.turns[:2] and made.turns[2] == fork.turns[2] and len(made.turns) == 3
    restored = branches.undo(made, session)
    assert restored[0] == source and "Restored" in restored[2]
    # the fork is still good for the restored dialogue: another alternative can be tried
    other = branches.continue_fork(source, 0, session)[0]
    assert other.turns[2] == fork.turns[0]
    # an ordinary Undo after that restores the branch point, then drops turns as always
    assert branches.undo(other, session)[0] == source
    assert branches.undo(source, session)[0].turns == source.turns[:2]


def test_a_fork_is_refused_once_the_dialogue_changed(session):
    source = committed(session, three_turns())
    list(branches.draw_fork(source, INTENT, None, 2, SETTINGS, session))  # the last user turn: turn 3
    assert handlers.RUNS.session_data(session)["fork"].number == 3
    changed = committed(session, transitions.undo(source))
    handlers.RUNS.session_data(session)["api"] = True  # refusals raise, as an API caller sees them
    with pytest.raises(gr.Error, match="changed since these alternatives were drawn"):
        branches.continue_fork(changed, 1, session)
    with pytest.raises(gr.Error, match="assistant's"):
        list(branches.draw_fork(changed, INTENT, 2, 3, SETTINGS, session))
    assert handlers.RUNS.dialogue(session) == changed


def test_an_inline_edit_continues_from_the_turn_and_undo_brings_back_the_rest(session):
    source = committed(session, three_turns())
    chat = handlers.chat_messages(source)
    assert chat[0]["metadata"]["title"].startswith("#1 · Simulated user ·") and chat[1]["content"].startswith("hi")
    out = branches.edit_in_chat(source, 1, "hi, I need a *vegan* cake [recipe]", session)
    made = out[0]
    assert len(made.turns) == 1 and made.turns[0].text == "hi, I need a *vegan* cake [recipe]"
    assert made.turns[0].edited and made.turns[0].p_end == 0.01  # P(end) of the position, kept
    assert "guardrail record is of the text it replaced" in out[1][0]["metadata"]["title"]
    assert "Undo brings back" in out[2]
    # the chat hands back the Markdown it showed: an unchanged edit is refused, not applied
    handlers.RUNS.session_data(session)["api"] = True
    with pytest.raises(gr.Error, match="unchanged"):
        branches.edit_in_chat(made, 1, handlers.chat_messages(made)[1]["content"], session)
    with pytest.raises(gr.Error, match="header"):
        branches.edit_in_chat(made, 0, "a badge", session)
    assert branches.undo(made, session)[0] == source


def test_the_stream_of_a_turn_shows_the_speaker_and_the_header_first(session):
    from usersim_ui.core.protocols import Draft

    chat = handlers.draft_messages(three_turns(), Draft("user", "so what", 3, 2, 1, ("sample 1 rejected: length",)))
    header, text = chat[-2], chat[-1]
    assert header["metadata"]["status"] == "pending" and header["metadata"]["title"].startswith(
        "#4 (writing) · Simulated user · sample 2")
    assert "sample 1 rejected: length" in header["content"] and text["content"].startswith("so what")
