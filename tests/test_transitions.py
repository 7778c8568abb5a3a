"""Dialogue record, JSONL, and the engine's transitions over real (tiny and small) models."""

from __future__ import annotations

import json
import threading
from dataclasses import replace

import pytest

from usersim_ui.analysis.transcript import badge_line, to_markdown
from usersim_ui.assistants.local import TransformersAssistant
from usersim_ui.assistants.scripted import ScriptedAssistant
from usersim_ui.core.dialogue import (
    Dialogue,
    GuardrailEvent,
    GuardrailSettings,
    RejectedSample,
    SamplingSettings,
    Turn,
    dialogue_to_dict,
    dialogues_from_jsonl,
    dialogues_to_jsonl,
)
from usersim_ui.core.errors import (
    BackendError,
    DialogueOver,
    GenerationCancelled,
    NeedsResearcher,
)
from usersim_ui.core.intents import load_sample_intents
from usersim_ui.core.transitions import (
    RunSettings,
    assistant_turn,
    auto_run,
    edit_turn,
    end_by_researcher,
    new_dialogue,
    next_turn,
    regenerate,
    researcher_turn,
    run,
    undo,
    user_turn,
)

FAST = RunSettings(sampling=SamplingSettings(max_new_tokens=6, seed=3),
                   guardrails=GuardrailSettings(min_words=1, max_words=1000), max_turns=3)
SCRIPT = ScriptedAssistant(["Sure, what dates?", "April is lovely.", "Anything else?", "Bye!"])


def rich_dialogue() -> Dialogue:
    turn = Turn(role="user", text="hi there, kyoto in april?", tokens=9, words=5, p_end=0.0123456789,
                guardrails=(GuardrailEvent("length", "resampled", "31 words", count=2),
                            GuardrailEvent("first_token", "masked", "'I' (p=0.40)", probability_removed=0.4)),
                rejected=(RejectedSample("I want to go", "length: 4 words"),), sampling=SamplingSettings(seed=5),
                seed=17, guardrail_settings=GuardrailSettings(min_words=2), latency_s=0.5, model_id="m")
    return Dialogue(intent="trip <|eot_id|> ünïcode", turns=(turn, Turn(role="assistant", text="Sure!")),
                    ended_by="researcher", user_model="m", assistant_model="a", context_trims=1)


def test_jsonl_round_trip_is_exact():
    dialogues = [rich_dialogue(), Dialogue(intent="empty one")]
    text = dialogues_to_jsonl(dialogues)
    assert len(text.splitlines()) == 2
    assert dialogues_from_jsonl(text) == dialogues
    record = json.loads(text.splitlines()[0])
    assert record["messages"] == [{"role": "user", "content": "hi there, kyoto in april?"},
                                  {"role": "assistant", "content": "Sure!"}]
    assert record["turns"][0]["guardrails"][0]["count"] == 2 and "text" not in record["turns"][0]


def test_import_of_plain_messages_and_bad_lines():
    [d] = dialogues_from_jsonl(json.dumps({"intent": "x", "messages": [{"role": "user", "content": "a b c"}]}))
    assert d.turns[0].words == 3 and d.turns[0].author == "import"
    with pytest.raises(ValueError, match="line 2"):
        dialogues_from_jsonl('{"intent": "x", "messages": []}\n{not json}')
    with pytest.raises(ValueError, match="role"):
        dialogues_from_jsonl(json.dumps({"intent": "x", "messages": [{"role": "system", "content": "a"}]}))


def test_sample_intents_cover_the_categories():
    intents = load_sample_intents()
    assert len(intents) >= 12 and len({i.id for i in intents}) == len(intents)
    assert {"math", "coding", "writing", "planning", "information seeking"} <= {i.category for i in intents}
    assert any("sequence" in i.intent and "2^15" in i.intent for i in intents)


def test_engine_runs_to_the_turn_cap_with_a_scripted_assistant(tiny_sim):
    dialogue = new_dialogue("You want help planning a trip to Kyoto.", tiny_sim, SCRIPT)
    states = list(auto_run(dialogue, tiny_sim, SCRIPT, FAST))
    final = states[-1]
    assert [t.role for t in final.turns] == ["user", "assistant"] * 3
    assert final.ended_by == "turn_cap" and [t.text for t in final.turns[1::2]] == list(SCRIPT.replies[:3])
    assert all(t.p_end is not None for t in final.turns[::2])
    with pytest.raises(DialogueOver):
        user_turn(final, tiny_sim, FAST)
    reopened = undo(final)
    assert reopened.ended_by is None and len(reopened.turns) == 5


def test_settings_change_between_turns_applies_to_the_next_turn(tiny_sim):
    dialogue = new_dialogue("You want help planning a trip to Kyoto.")
    current = {"settings": FAST}
    seen = []
    make = lambda d, s: next_turn(d, tiny_sim, SCRIPT, s)  # noqa: E731
    for state in run(dialogue, make, lambda: current["settings"], max_new_turns=3):
        seen.append(state)
        current["settings"] = replace(FAST, guardrails=replace(FAST.guardrails, first_token_filter=False))
    assert seen[0].turns[0].guardrail_settings.first_token_filter is True
    assert seen[-1].turns[2].guardrail_settings.first_token_filter is False


def test_failures_leave_the_dialogue_intact(tiny_sim):
    with pytest.raises(ValueError):
        new_dialogue("   ")
    with pytest.raises(ValueError, match="characters"):
        new_dialogue("x" * 5000)
    dialogue = user_turn(new_dialogue("You want a cake recipe."), tiny_sim, FAST)
    before = dialogues_to_jsonl([dialogue])
    with pytest.raises(BackendError):
        assistant_turn(dialogue, ScriptedAssistant([]), FAST)
    with pytest.raises(NeedsResearcher):
        assistant_turn(dialogue, None, FAST)
    stop = threading.Event()
    stop.set()
    with pytest.raises(GenerationCancelled):
        assistant_turn(dialogue, SCRIPT, FAST, stop)
    assert dialogues_to_jsonl([dialogue]) == before


def test_researcher_turns_edits_and_regenerate(tiny_sim):
    dialogue = user_turn(new_dialogue("You want a cake recipe."), tiny_sim, FAST)
    typed = researcher_turn(dialogue, "Chocolate or vanilla?", FAST)
    assert typed.turns[-1].role == "assistant" and typed.turns[-1].author == "researcher"
    edited = edit_turn(typed, 0, "I want a cake recipe please")
    assert edited.turns[0].edited and edited.turns[0].words == 6
    regen = regenerate(dialogue, tiny_sim, None, FAST)
    assert len(regen.turns) == 1 and regen.turns[0].seed != dialogue.turns[0].seed
    assert end_by_researcher(typed).ended_by == "researcher"
    assert "typed by researcher" in badge_line(typed.turns[-1])
    assert "**2. assistant:** Chocolate or vanilla?" in to_markdown(typed)


def test_local_transformers_assistant_answers_on_smollm2(smollm2):
    assistant = TransformersAssistant(smollm2, max_new_tokens=12, seed=1)
    reply = assistant.reply([{"role": "user", "content": "What is the capital of France?"}])
    assert reply.text and 0 < reply.tokens <= 12 and reply.model_id == assistant.name
    again = assistant.reply([{"role": "user", "content": "What is the capital of France?"}])
    assert again.text == reply.text  # seeded


def test_simulate_cli_prints_a_whole_dialogue(smollm2, capsys):
    from usersim_ui import simulate

    assert simulate.main(["--intent-id", "math-sequence-sum", "--max-turns", "1", "--max-new-tokens", "24",
                          "--assistant-max-tokens", "12", "--user-model", "baseline"]) == 0
    out = capsys.readouterr().out
    assert "prompted user baseline" in out and "[1] user:" in out and "[2] assistant:" in out
    assert "P(end)" in out and "Dialogue over: the turn cap was reached." in out


def test_dialogue_dict_has_no_secrets(tiny_sim):
    from usersim_ui.assistants.openai import OpenAIAssistant

    backend = OpenAIAssistant(base_url="http://127.0.0.1:9/v1", model="m", api_key="sk-secret")
    dialogue = new_dialogue("You want a cake recipe.", tiny_sim, backend)
    assert "sk-secret" not in json.dumps(dialogue_to_dict(dialogue)) and "sk-secret" not in repr(backend)


def test_local_backend_by_path_and_a_bad_path(smollm2):
    from usersim_ui.assistants.registry import BackendSpec, make_backend
    from usersim_ui.inference.model_loading import smollm2_cache_path

    backend = make_backend(BackendSpec(kind="local", model=str(smollm2_cache_path()), max_tokens=6))
    assert backend.name == str(smollm2_cache_path()) and backend.reply([{"role": "user", "content": "Hi"}]).text
    with pytest.raises(BackendError, match="Could not load"):
        make_backend(BackendSpec(kind="local", model="/nonexistent/model"))
