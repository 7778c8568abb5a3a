"""The page's handlers called as plain functions (no server, no browser) on the tiny UserLM."""

from __future__ import annotations

import logging

import pytest

from usersim_ui.app import handlers, zerogpu
from usersim_ui.app.form import Form, settings_from_inputs
from usersim_ui.app.studio import control_states
from usersim_ui.core.dialogue import (
    Dialogue,
    GuardrailEvent,
    GuardrailSettings,
    RejectedSample,
    Turn,
)

SETTINGS = [1.0, 0.8, 6, 0, 3, True, True, 0, True, 1, 1000, True, 2]  # settings_from_inputs order
RESEARCHER = ["researcher", "", 0.7, 16, "", "", ""]
LOCAL = ["local", "", 0.7, 4, "", "", ""]
INTENT = "You want a recipe for a chocolate cake."
SKIP = {"__type__": "update"}


@pytest.fixture
def tiny(monkeypatch, tiny_sim):
    monkeypatch.setattr(zerogpu, "_simulator", tiny_sim)
    handlers.RUNS.forget("handler-test")  # a fresh session: the server holds each session's latest dialogue
    yield "handler-test"
    handlers.RUNS.forget("handler-test")


def dialogues(gen) -> list[Dialogue]:
    return [out[0] for out in gen if isinstance(out[0], Dialogue)]


def next_dialogue(gen) -> Dialogue:
    """The next update that carries a dialogue (drafts of a turn being written carry none)."""
    return next(out[0] for out in gen if isinstance(out[0], Dialogue))


def test_settings_from_inputs_reads_every_box_and_names_the_bad_one():
    settings = settings_from_inputs(*SETTINGS)
    assert settings.guardrails.min_user_turns_before_end is None and settings.max_turns == 3
    assert settings_from_inputs(*SETTINGS[:7], 2, *SETTINGS[8:]).guardrails.min_user_turns_before_end == 2
    with pytest.raises(ValueError, match="Minimum words"):
        settings_from_inputs(*SETTINGS[:9], 30, 20, *SETTINGS[11:])
    with pytest.raises(ValueError, match="'Seed' is empty|seed box is empty"):
        settings_from_inputs(*SETTINGS[:3], None, *SETTINGS[4:])
    with pytest.raises(ValueError, match="'Retry cap' is empty"):
        settings_from_inputs(*SETTINGS[:12], None)
    with pytest.raises(ValueError, match="seed must be a whole number from 0 to"):
        settings_from_inputs(*SETTINGS[:3], 2**60, *SETTINGS[4:])


def test_auto_run_with_the_researcher_as_assistant_stops_for_their_reply(tiny):
    outs = list(handlers.run_turns(None, INTENT, Form.parse(SETTINGS, RESEARCHER), tiny, None, None))
    final = outs[-1]
    assert [t.role for t in final[0].turns] == ["user"]
    assert "You are the assistant" in final[2]  # the banner says why it stopped


def test_refusals_change_no_output_and_log_one_line(tiny, caplog):
    with caplog.at_level(logging.INFO, logger="usersim_ui"):
        outs = list(handlers.run_turns(None, "  ", Form.parse(SETTINGS, RESEARCHER), tiny, None, 1))
        assert outs == [(SKIP,) * handlers.N_VIEW]
        outs = list(handlers.run_turns(None, INTENT, Form.parse(SETTINGS, RESEARCHER), tiny, "assistant", 1))
        assert outs == [(SKIP,) * handlers.N_VIEW]
    lines = [r for r in caplog.records if r.getMessage().startswith("refused")]
    assert len(lines) == 2 and all(r.exc_info is None for r in lines)
    assert "user's turn" in lines[1].getMessage()


def test_stop_between_turns_keeps_what_was_made(tiny):
    gen = handlers.run_turns(None, INTENT, Form.parse(SETTINGS, RESEARCHER[:1] + LOCAL[1:]), tiny, None, None)
    next(gen)  # the run has started (status shown)
    first = next_dialogue(gen)
    handlers.RUNS.stop(tiny)
    rest = dialogues(gen)
    assert len(first.turns) == 1 and rest[-1].turns == first.turns


def test_a_guardrail_toggled_mid_run_applies_to_the_next_turn(tiny, smollm2):
    gen = handlers.run_turns(None, INTENT, Form.parse(SETTINGS, LOCAL), tiny, None, 3)
    next(gen)
    first = next_dialogue(gen)
    handlers.set_live_settings(tiny, settings_from_inputs(*SETTINGS[:5], False, *SETTINGS[6:]))
    last = dialogues(gen)[-1]
    assert first.turns[0].guardrail_settings.first_token_filter is True
    assert last.turns[2].guardrail_settings.first_token_filter is False


def test_regenerate_draws_a_new_seed_each_time(tiny):
    made = dialogues(handlers.run_turns(None, INTENT, Form.parse(SETTINGS, RESEARCHER), tiny, "user", 1))[-1]
    again = dialogues(handlers.run_turns(made, INTENT, Form.parse(SETTINGS, RESEARCHER), tiny, None, 1, regenerate=True))[-1]
    third = dialogues(handlers.run_turns(again, INTENT, Form.parse(SETTINGS, RESEARCHER), tiny, None, 1, regenerate=True))[-1]
    assert len(third.turns) == 1 and len({made.turns[0].seed, again.turns[0].seed, third.turns[0].seed}) == 3


def test_render_shows_text_literally_and_badges_apart():
    nasty = "<script>alert(1)</script><img src=x> and an open fence:\n```python\nprint('x')"
    dialogue = Dialogue(intent="x", ended_by="user", turns=(
        Turn(role="user", text="a b c", words=3, p_end=0.2,
             rejected=(RejectedSample("too <b>long</b> text", "length: 40 words"),),
             guardrails=(GuardrailEvent("length", "resampled", "40 words"),)),
        Turn(role="assistant", text=nasty, words=8),
        Turn(role="user", text="", p_end=0.9, ends_dialogue=True),
    ))
    state, chat, banner, *_rest = handlers.render(dialogue)
    assert state is dialogue and "simulated user ended it" in banner
    # each turn: its header (speaker and badge, folded details), then its text
    assert chat[0]["metadata"]["title"].startswith("#1 · Simulated user · P(end) 0.200")
    assert "too &lt;b&gt;long&lt;/b&gt; text" in chat[0]["content"]
    assert chat[1]["content"] == "a b c" and "metadata" not in chat[1]
    shown = chat[3]["content"]
    assert "<script>" not in shown and "&lt;script&gt;" in shown and "&lt;img src=x&gt;" in shown
    assert shown.endswith("print('x')\n```")  # the open fence is closed inside the message
    assert chat[2]["metadata"]["title"].startswith("#2 · Assistant ·")  # the badge is its own message
    assert "endconversation" in chat[-1]["content"]


def test_buttons_that_cannot_act_are_disabled():
    empty = control_states(None, "local", 3, busy=False)
    assert empty["step"] and not empty["undo"] and not empty["export_jsonl"] and not empty["stop"]
    no_intent = control_states(None, "local", 3, busy=False, intent="  ")  # the first paint: nothing to run on
    assert not no_intent["step"] and not no_intent["auto_run"] and not no_intent["next_user_turn"]
    assert control_states(None, "local", 3, busy=False, intent="You want a cake recipe.")["step"]
    waiting_for_you = Dialogue(intent="x", turns=(Turn("user", "hi there you"),))
    you = control_states(waiting_for_you, "researcher", 3, busy=False)
    assert you["send_reply"] and not you["next_assistant_turn"] and not you["step"] and not you["auto_run"]
    over = control_states(Dialogue(intent="x", turns=waiting_for_you.turns, ended_by="user"), "local", 3, False)
    assert not over["step"] and not over["auto_run"] and over["undo"]
    capped = Dialogue(intent="x", turns=waiting_for_you.turns + (Turn("assistant", "ok"),), ended_by="turn_cap")
    assert not control_states(capped, "local", 1, False)["step"] and control_states(capped, "local", 2, False)["step"]
    busy = control_states(waiting_for_you, "local", 3, busy=True)
    assert {name for name, on in busy.items() if on} == {"stop", "end_dialogue", "reset", "export_jsonl"}


def test_only_local_model_turns_take_a_gpu_slice(tiny, monkeypatch):
    from loopback_openai import LoopbackOpenAI

    calls: list[str] = []
    real = zerogpu.model_turn_stream

    def counted(dialogue, *args):
        calls.append(dialogue.next_role)
        return real(dialogue, *args)
    monkeypatch.setattr(zerogpu, "model_turn_stream", counted)
    server = LoopbackOpenAI("trickle", delay_s=0.0, words=4)
    try:
        endpoint = ["openai", "", 0.7, 16, server.url, "loopback", ""]
        made = dialogues(handlers.run_turns(None, INTENT, Form.parse(SETTINGS, endpoint), tiny, None, 2))[-1]
        assert [t.role for t in made.turns] == ["user", "assistant"] and calls == ["user"]
        typed = handlers.send_reply(made, INTENT, "I typed this user turn myself", settings_from_inputs(*SETTINGS), tiny)[0]
        assert typed.turns[-1].author == "researcher" and calls == ["user"]
        assert typed.turns[-1].tokens == len(zerogpu.simulator().tokenizer.encode("I typed this user turn myself",
                                                                             add_special_tokens=False))
    finally:
        server.close()


def test_a_turn_streams_into_the_chat_and_its_guardrail_story_folds_into_the_badge(tiny, monkeypatch):
    """While a user turn is written the chat shows its text growing and a pending badge with the
    guardrails' story so far (only the chat and the status line are sent); the accepted turn
    replaces both, its badge holding the same rejections."""
    from usersim_ui.app import streaming

    monkeypatch.setattr(streaming, "DRAFT_EVERY_S", 0.001)  # every draft, not ~12 a second
    # 40 tokens a sample; at most 2 words, so the tiny model's first sample is rejected and the
    # retries (2, drawn together) are drawn as one batch
    settings = [1.0, 0.8, 40, 0, 3, False, False, 0, True, 1, 2, False, 2]
    outs = list(handlers.run_turns(None, INTENT, Form.parse(settings, RESEARCHER), tiny, "user", 1))
    drafts = [o for o in outs if o[0] == SKIP and isinstance(o[1], list)]
    assert len(drafts) >= 3
    assert all(o[3:] == (SKIP,) * (handlers.N_VIEW - 3) for o in drafts)  # no chart is drawn per token
    pending = [o[1][-2] for o in drafts]  # the header of the turn being written, then its text
    assert all(m["metadata"]["status"] == "pending" and m["metadata"]["title"].startswith(
        "#1 (writing) · Simulated user · ") for m in pending)
    first_sample = [o[1][-1]["content"] for o in drafts if o[1][-2]["metadata"]["title"].endswith(("sample 1", "tokens"))
                    and "· sample 1" in o[1][-2]["metadata"]["title"]]
    assert len({text for text in first_sample if text != "*…*"}) >= 2  # the text grew, token by token
    retry = [o for o in drafts if "samples 2–3" in o[1][-2]["metadata"]["title"]]
    assert retry and "sample 1 rejected: length" in retry[-1][1][-2]["content"]
    assert "Sample 1 rejected: length" in retry[-1][2]  # the status line tells it too
    final = outs[-1]
    turn = final[0].turns[0]
    assert [r.reason.split(":")[0] for r in turn.rejected][:1] == ["length"]
    assert all(m.get("metadata", {}).get("status") != "pending" for m in final[1])
    assert "rejected" in final[1][-2]["content"]  # the story folded into the accepted turn's badge


@pytest.mark.parametrize("guardrails", [GuardrailSettings(), GuardrailSettings().all_off(),
                                        GuardrailSettings(banned_first_words=("Sure", "Hi"), first_token_any_case=True,
                                                          min_user_turns_before_end=3, min_words=1, max_words=9,
                                                          retry_cap=0, length_thresholds=False)])
def test_the_guardrail_boxes_read_back_as_the_settings_they_show(guardrails):
    """``form.guardrail_boxes`` is the inverse of the form's parsing: the page's first values and
    the MCP tool's settings cannot drift from what the boxes mean."""
    from usersim_ui.app.form import guardrail_boxes

    parsed = settings_from_inputs(temperature=1.0, top_p=0.8, max_new_tokens=64, seed=0, max_turns=4,
                                  **guardrail_boxes(guardrails))
    assert parsed.guardrails == guardrails
