"""The UI's own functions called as plain functions over state (no server, no browser)."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr
import pytest

from usersim_ui import ui
from usersim_ui.dialogue import Dialogue, RejectedSample, Turn

SETTINGS = [1.0, 0.8, 6, 0, 3, True, True, 0, True, 1, 1000, True, 2]  # settings_from_inputs order
RESEARCHER = ["researcher", "", 0.7, 16, "", "", ""]
INTENT = "You want a recipe for a chocolate cake."


@pytest.fixture
def tiny_ui(monkeypatch, tiny_sim):
    monkeypatch.setattr(ui, "_simulator", tiny_sim)
    return SimpleNamespace(session_hash="handler-test")


def run_all(gen):
    """All yields of a handler generator, and the gr.Error that ended it (or None)."""
    states, error = [], None
    try:
        for out in gen:
            states.append(out[0])
    except gr.Error as exc:
        error = exc
    return states, error


def test_settings_from_inputs():
    settings = ui.settings_from_inputs(*SETTINGS)
    assert settings.guardrails.min_user_turns_before_end is None and settings.max_turns == 3
    assert ui.settings_from_inputs(*SETTINGS[:7], 2, *SETTINGS[8:]).guardrails.min_user_turns_before_end == 2
    with pytest.raises(ValueError, match="Minimum words"):
        ui.settings_from_inputs(*SETTINGS[:9], 30, 20, *SETTINGS[11:])


def test_auto_run_with_the_researcher_as_assistant_stops_for_their_reply(tiny_ui):
    states, error = run_all(ui._generate(None, INTENT, SETTINGS, RESEARCHER, tiny_ui, None, None))
    assert len(states) == 1 and [t.role for t in states[0].turns] == ["user"]
    assert error is not None and "You are the assistant" in str(error)


def test_bad_intent_and_wrong_role_raise_before_any_change(tiny_ui):
    _states, error = run_all(ui._generate(None, "  ", SETTINGS, RESEARCHER, tiny_ui, None, 1))
    assert error is not None and "intent" in str(error)
    _states, error = run_all(ui._generate(None, INTENT, SETTINGS, RESEARCHER, tiny_ui, "assistant", 1))
    assert error is not None and "user's turn" in str(error)


def test_stop_between_turns_keeps_what_was_made(tiny_ui, smollm2):
    gen = ui._generate(None, INTENT, SETTINGS, ["local", "", 0.7, 4, "", "", ""], tiny_ui, None, None)
    first = next(gen)[0]
    ui._stop_event(tiny_ui.session_hash).set()
    rest = [out[0] for out in gen]
    assert len(first.turns) == 1 and rest and all(state.turns == first.turns for state in rest)


def test_a_guardrail_toggled_mid_run_applies_to_the_next_turn(tiny_ui, smollm2):
    scripted = ["local", "", 0.7, 4, "", "", ""]
    gen = ui._generate(None, INTENT, SETTINGS, scripted, tiny_ui, None, 3)
    first = next(gen)[0]
    ui._live[tiny_ui.session_hash] = ui.settings_from_inputs(*SETTINGS[:5], False, *SETTINGS[6:])
    last = [out[0] for out in gen][-1]
    assert first.turns[0].guardrail_settings.first_token_filter is True
    assert last.turns[2].guardrail_settings.first_token_filter is False


def test_render_shows_badges_rejected_samples_and_the_end():
    dialogue = Dialogue(intent="x", ended_by="user", turns=(
        Turn(role="user", text="a b c", words=3, p_end=0.2, rejected=(RejectedSample("too long text", "length: 40 words"),)),
        Turn(role="assistant", text="ok", words=1),
        Turn(role="user", text="", p_end=0.9, ends_dialogue=True),
    ))
    state, chat, banner, lengths, p_end, summary, transcript = ui.render(dialogue)
    assert state is dialogue and "simulated user ended it" in banner
    assert "#1 · p_end 0.200" in chat[0]["content"]
    assert chat[1]["metadata"]["title"] == "Rejected samples (1)" and "length: 40 words" in chat[1]["content"]
    assert "endconversation" in chat[-1]["content"] and "Ended by** user" in summary


def test_regenerate_draws_a_new_sample_of_the_last_turn(tiny_ui):
    [made], _ = run_all(ui._generate(None, INTENT, SETTINGS, RESEARCHER, tiny_ui, "user", 1))
    from usersim_ui.engine import undo

    [again], _ = run_all(ui._generate(undo(made), INTENT, SETTINGS, RESEARCHER, tiny_ui, None, 1, reseed_from=made))
    assert len(again.turns) == 1 and again.turns[0].seed != made.turns[0].seed
    assert again.turns[0].sampling.seed == made.turns[0].sampling.seed + 2
