"""The user simulator on a tiny random-weight UserLM-shaped model with the real tokenizer."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from conftest import userlm_sim

from usersim_ui.core.dialogue import Dialogue, GuardrailSettings, SamplingSettings, Turn
from usersim_ui.core.errors import ContextTooLong
from usersim_ui.prompts.userlm import (
    END_CONVERSATION_ID,
    encode_plain,
    userlm_prompt_ids,
)
from usersim_ui.users.local import UserSimulator

OFF = GuardrailSettings(first_token_filter=False, no_early_ending=False, length_thresholds=False,
                        verbatim_repetition=False)
FAST = SamplingSettings(max_new_tokens=6, seed=1)
EOT = 128009
INTENT = "You want help planning a trip to Kyoto in April."


def test_first_token_filter_keeps_a_model_that_favours_I_from_starting_with_it(llama_tok):
    i_id = encode_plain(llama_tok, "I")[0]
    sim = userlm_sim(llama_tok, bias={i_id: 30.0})
    dialogue = Dialogue(intent=INTENT)
    for seed in range(4):
        sampling = replace(FAST, seed=seed, max_new_tokens=1)  # the turn is its first token
        off = sim.generate_turn(dialogue, OFF, sampling)
        on = sim.generate_turn(dialogue, replace(OFF, first_token_filter=True), sampling)
        assert off.text == "I"
        assert on.tokens == 1 and on.text.lower() not in {"i", "you", "here"}
        [event] = on.guardrails
        assert event.guardrail == "first_token" and event.action == "masked" and "'I'" in event.detail
        assert event.probability_removed > 0.99
        assert off.guardrails == ()


def test_no_early_ending_stops_a_model_that_wants_to_leave(llama_tok):
    sim = userlm_sim(llama_tok, bias={END_CONVERSATION_ID: 30.0})
    dialogue = Dialogue(intent=INTENT)
    ended = sim.generate_turn(dialogue, OFF, FAST)
    assert ended.ends_dialogue and ended.text == "" and ended.p_end > 0.5
    guarded = sim.generate_turn(dialogue, replace(OFF, no_early_ending=True), FAST)
    assert not guarded.ends_dialogue and guarded.p_end > 0.5
    [event] = guarded.guardrails
    assert event.guardrail == "no_early_ending" and event.probability_removed == pytest.approx(guarded.p_end)


def test_minimum_user_turns_before_ending(llama_tok):
    sim = userlm_sim(llama_tok, bias={END_CONVERSATION_ID: 30.0})
    settings = replace(OFF, no_early_ending=True, min_user_turns_before_end=2)
    dialogue = Dialogue(intent=INTENT)
    for _ in range(2):  # the user must write two turns before it may leave
        turn = sim.generate_turn(dialogue, settings, FAST)
        assert not turn.ends_dialogue
        dialogue = dialogue.with_turn(turn).with_turn(Turn(role="assistant", text="Sure, what dates?"))
    assert sim.generate_turn(dialogue, settings, FAST).ends_dialogue


def test_length_thresholds_resample_then_give_up_at_the_retry_cap(llama_tok):
    sim = userlm_sim(llama_tok, bias={EOT: 30.0})  # every sample is an empty turn: 0 words
    dialogue = Dialogue(intent=INTENT)
    off = sim.generate_turn(dialogue, OFF, FAST)
    assert off.words == 0 and off.rejected == () and off.guardrails == ()
    on = sim.generate_turn(dialogue, replace(OFF, length_thresholds=True, retry_cap=3), FAST)
    assert len(on.rejected) == 3 and all(r.reason == "length: 0 words" for r in on.rejected)
    kinds = {e.guardrail: e for e in on.guardrails}
    assert kinds["length"].count == 3 and kinds["retry_cap"].action == "gave_up"


def test_length_guardrail_accepts_a_turn_in_range_without_resampling(llama_tok):
    sim = userlm_sim(llama_tok)
    settings = replace(OFF, length_thresholds=True, min_words=1, max_words=1000)
    turn = sim.generate_turn(Dialogue(intent=INTENT), settings, replace(FAST, max_new_tokens=12))
    assert turn.words >= 1 and turn.rejected == () and turn.guardrails == ()


def test_verbatim_repetition_resamples_a_repeated_turn(llama_tok):
    word = encode_plain(llama_tok, " hello")[0]
    sim = userlm_sim(llama_tok, bias={word: 40.0})  # always " hello hello ..."
    probe = sim.generate_turn(Dialogue(intent=INTENT), OFF, FAST)
    assert probe.text == "hello hello hello hello hello hello"
    history = Dialogue(intent=INTENT, turns=(probe, Turn(role="assistant", text="Hello! How can I help?")))
    off = sim.generate_turn(history, OFF, FAST)
    assert off.text == probe.text and off.rejected == ()
    on = sim.generate_turn(history, replace(OFF, verbatim_repetition=True, retry_cap=2), FAST)
    assert [r.reason for r in on.rejected] == ["repetition: repeats user turn 1"] * 2
    copy_intent = Dialogue(intent="HELLO   hello hello hello hello hello")
    copied = sim.generate_turn(copy_intent, replace(OFF, verbatim_repetition=True, retry_cap=1), FAST)
    assert copied.rejected[0].reason == "repetition: copies the intent"


def test_p_end_is_the_raw_softmax_of_the_generating_pass(llama_tok):
    sim = userlm_sim(llama_tok, bias={END_CONVERSATION_ID: 12.0})
    dialogue = Dialogue(intent=INTENT, turns=(Turn(role="user", text="hi, trip to kyoto?"),
                                              Turn(role="assistant", text="Sure! When?")))
    prompt = sim.format.prompt_ids(dialogue.intent, dialogue.messages())
    with torch.no_grad():
        logits = sim.model(input_ids=torch.tensor([prompt])).logits[0, -1]
    expected = torch.softmax(logits.double(), dim=-1)[END_CONVERSATION_ID].item()
    calls = []
    original = sim.model.forward
    sim.model.forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        turn = sim.generate_turn(dialogue, replace(OFF, no_early_ending=True, first_token_filter=True), FAST)
    finally:
        del sim.model.forward
    assert 0.01 < expected < 0.99
    assert turn.p_end == pytest.approx(expected, rel=1e-4)  # read before the mask removed it
    generated = turn.tokens + (1 if turn.tokens < FAST.max_new_tokens else 0)
    assert len(calls) == generated  # one forward per generated token, none extra for p_end


def test_multi_token_marker_p_end_is_the_product_of_conditionals(smollm2):
    sim = UserSimulator.prompted_baseline(smollm2)
    marker = sim.format.end_marker_ids()
    assert len(marker) > 1
    dialogue = Dialogue(intent=INTENT)
    prompt = sim.format.prompt_ids(dialogue.intent, [])
    expected = 1.0
    for k, tid in enumerate(marker):  # one forward per marker token: independent of the product code
        with torch.no_grad():
            logits = sim.model(input_ids=torch.tensor([prompt + marker[:k]])).logits[0, -1]
        expected *= torch.softmax(logits.double(), dim=-1)[tid].item()
    turn = sim.generate_turn(dialogue, OFF, replace(FAST, max_new_tokens=4))
    assert turn.p_end == pytest.approx(expected, rel=1e-3)
    assert "prompted user baseline" in turn.model_id


def test_context_budget_drops_oldest_exchanges_and_keeps_the_intent(tiny_sim):
    turns = []
    for i in range(6):
        turns += [Turn(role="user", text=f"question number {i} " * 8), Turn(role="assistant", text=f"answer {i} " * 20)]
    dialogue = Dialogue(intent=INTENT, turns=tuple(turns))
    full = tiny_sim.format.prompt_ids(INTENT, dialogue.messages())
    fitted = tiny_sim.rules.fit_prompt(INTENT, dialogue.messages(), budget=len(full) - 1, max_new_tokens=0)
    assert fitted.dropped_turns == 2
    fitted = tiny_sim.rules.fit_prompt(INTENT, dialogue.messages(), budget=len(full) // 2, max_new_tokens=8)
    assert fitted.dropped_turns % 2 == 0 and fitted.dropped_turns > 2 and len(fitted.ids) + 8 <= len(full) // 2
    intent_part = tiny_sim.format.prompt_ids(INTENT, [])[:-4]  # system header + intent + <|eot_id|>
    assert fitted.ids[: len(intent_part)] == intent_part
    kept = tiny_sim.tokenizer.decode(fitted.ids)
    assert "answer 5" in kept and "question number 0" not in kept
    turn = tiny_sim.generate_turn(dialogue, OFF, FAST, context_budget=len(full) // 2)
    assert turn.context_dropped_turns == fitted.dropped_turns
    assert any(e.guardrail == "context" for e in turn.guardrails)
    with pytest.raises(ContextTooLong):
        tiny_sim.rules.fit_prompt("a very long intent " * 200, [], budget=256, max_new_tokens=8)


def test_seed_makes_a_turn_reproducible(tiny_sim):
    dialogue = Dialogue(intent=INTENT)
    settings = GuardrailSettings(min_words=1, max_words=1000)
    a = tiny_sim.generate_turn(dialogue, settings, replace(FAST, seed=7))
    b = tiny_sim.generate_turn(dialogue, settings, replace(FAST, seed=7))
    c = tiny_sim.generate_turn(dialogue, settings, replace(FAST, seed=8))
    assert (a.text, a.seed, a.p_end) == (b.text, b.seed, b.p_end)
    assert c.text != a.text


def test_batched_and_sequential_retries_record_the_same_decisions(llama_tok):
    batched = userlm_sim(llama_tok, bias={EOT: 30.0}, batched=True)
    sequential = userlm_sim(llama_tok, bias={EOT: 30.0}, batched=False)
    settings = replace(OFF, length_thresholds=True, retry_cap=4)
    a = batched.generate_turn(Dialogue(intent=INTENT), settings, FAST)
    b = sequential.generate_turn(Dialogue(intent=INTENT), settings, FAST)
    assert [e.badge() for e in a.guardrails] == [e.badge() for e in b.guardrails]
    assert len(a.rejected) == len(b.rejected) == 4
    assert math.isclose(a.p_end, b.p_end)


def test_from_pretrained_loads_a_userlm_checkpoint_from_a_path(tmp_path, llama_tok):
    from conftest import biased_userlm

    biased_userlm(llama_tok).save_pretrained(tmp_path)
    llama_tok.save_pretrained(tmp_path)
    sim = UserSimulator.from_pretrained(str(tmp_path), device="cpu")
    # bf16 on the CPU too: UserLM-8b's stored fp32 weights would need 32 GB
    assert sim.device == "cpu" and sim.model.dtype == torch.bfloat16 and not sim.is_prompted_baseline
    assert sim.format.stop_ids() == [128009, 128001] and sim.format.end_marker_ids() == [END_CONVERSATION_ID]
    ids = sim.format.prompt_ids(INTENT, [])
    assert ids == userlm_prompt_ids(sim.tokenizer, INTENT, []) + encode_plain(sim.tokenizer, "\n")
    turn = sim.generate_turn(Dialogue(intent=INTENT), OFF, FAST)
    assert turn.model_id == str(tmp_path) and turn.p_end is not None


def test_the_end_marker_anywhere_ends_the_turn_and_what_follows_is_neither_kept_nor_counted(tiny_sim):
    tok = tiny_sim.tokenizer
    words = encode_plain(tok, "thanks, bye")
    junk = encode_plain(tok, " trailing junk")
    assert tiny_sim.rules.decode(words + [END_CONVERSATION_ID] + junk) == ("thanks, bye", True, len(words) + 1)
    assert tiny_sim.rules.decode([END_CONVERSATION_ID] + junk) == ("", True, 1)
    assert tiny_sim.rules.decode(words) == ("thanks, bye", False, len(words))
    # the literal text of the marker (not its id) is plain text and ends nothing
    literal = encode_plain(tok, "I typed <|endconversation|> here")
    assert END_CONVERSATION_ID not in literal and tiny_sim.rules.decode(literal)[1] is False


def test_a_turn_that_says_something_then_ends_keeps_the_text_and_ends_the_dialogue(llama_tok, monkeypatch):
    import transformers

    from usersim_ui.core.transitions import RunSettings, user_turn
    from usersim_ui.users import local as sim_module

    sim = userlm_sim(llama_tok)
    script = encode_plain(llama_tok, "ok thanks") + [END_CONVERSATION_ID]
    prompt_len = len(sim.format.prompt_ids(INTENT, []))

    class Follow(transformers.LogitsProcessor):
        """Steers the real model through "ok thanks<|endconversation|>", then leaves it free."""

        def __call__(self, input_ids, scores):
            step = input_ids.shape[1] - prompt_len
            if step < len(script):
                scores[:, script[step]] += 1000.0
            return scores

    real_sample = sim_module.sample
    monkeypatch.setattr(sim_module, "sample", lambda *a, processors=(), **k: real_sample(
        *a, processors=[*processors, Follow()], **k))
    out = user_turn(Dialogue(intent=INTENT), sim, RunSettings(guardrails=OFF, sampling=replace(FAST, max_new_tokens=12)))
    turn = out.turns[-1]
    assert out.ended_by == "user" and turn.ends_dialogue and turn.text == "ok thanks"
    assert turn.tokens == len(script)  # generation stopped at the marker: no junk made or counted


def test_userlm_on_a_cpu_without_room_refuses_before_loading(monkeypatch):
    from usersim_ui.inference import model_loading

    monkeypatch.setattr(model_loading, "available_memory_bytes", lambda: 8 * 2**30)
    monkeypatch.setattr(model_loading, "load_chat_model", lambda *a, **k: pytest.fail("must not load"))
    with pytest.raises(RuntimeError, match="needs about 15 GiB in bfloat16 on the CPU"):
        model_loading.load_userlm("microsoft/UserLM-8b", device="cpu")


def test_temperature_zero_is_greedy_with_no_batched_retries(llama_tok):
    sim = userlm_sim(llama_tok, bias={EOT: 30.0})  # every sample is empty: the length guardrail rejects it
    settings = replace(OFF, length_thresholds=True, retry_cap=4)
    turn = sim.generate_turn(Dialogue(intent=INTENT), settings, replace(FAST, temperature=0.0))
    again = sim.generate_turn(Dialogue(intent=INTENT), settings, replace(FAST, temperature=0.0, seed=99))
    assert turn.rejected == () and (turn.text, turn.tokens) == (again.text, again.tokens)
    gave_up = [e for e in turn.guardrails if e.action == "gave_up"]
    assert gave_up and "greedy" in gave_up[0].detail


def test_the_recorded_seed_reproduces_the_turn(tiny_sim):
    settings = GuardrailSettings(min_words=1, max_words=1000)
    dialogue = Dialogue(intent=INTENT)
    made = tiny_sim.generate_turn(dialogue, settings, replace(FAST, seed=3))
    again = tiny_sim.generate_turn(dialogue, settings, replace(FAST, seed=12345), seed=made.seed)
    assert made.seed is not None and (again.text, again.tokens, again.seed) == (made.text, made.tokens, made.seed)


def test_a_turn_kept_after_the_retry_cap_says_it_was_cut_even_from_a_padded_batch_row(llama_tok):
    sim = userlm_sim(llama_tok)  # random weights: far more than 2 words before any stop token
    settings = replace(OFF, length_thresholds=True, min_words=1, max_words=2, retry_cap=3)
    turn = sim.generate_turn(Dialogue(intent=INTENT), settings, replace(FAST, max_new_tokens=40))
    assert any(e.action == "gave_up" for e in turn.guardrails) and len(turn.rejected) == 3
    assert turn.words > 2 and turn.truncated  # stopped early at the word limit, and the record says so


def test_a_new_resampling_guardrail_is_one_row_of_the_table(tiny_sim, monkeypatch):
    """A row with a check is all the turn assembly needs: the turn gets retry rounds, its
    samples are judged by the row, and the record names it, in every engine that assembles."""
    from usersim_ui.core import guardrails as table

    asks = table.Guardrail("question", "question", None, True, "Resample a turn that asks nothing.",
                           acts="resample", check=lambda text, earlier, intent, s: None if "?" in text else "no question")
    monkeypatch.setattr(table, "GUARDRAILS", table.GUARDRAILS + (asks,))
    monkeypatch.setattr(table, "BY_NAME", {**table.BY_NAME, "question": asks})
    only_it = replace(GuardrailSettings().all_off(), retry_cap=3)
    sampling = SamplingSettings(max_new_tokens=8, seed=4)
    assert table.resamples(only_it) and table.rejection_reason("fine", [], "x", only_it) == "question: no question"
    turn = tiny_sim.generate_turn(Dialogue(intent="You want help."), only_it, sampling)
    assert [r.reason for r in turn.rejected][:1] == ["question: no question"]  # a random model never asks
    assert {e.guardrail for e in turn.guardrails} >= {"question", "retry_cap"}


def test_a_row_that_resamples_carries_its_check():
    from usersim_ui.core.guardrails import REPORTED

    assert {g.name for g in REPORTED if g.check is not None} == {g.name for g in REPORTED if g.acts == "resample"} \
        == {"length", "repetition"}


def test_resampling_rounds_come_from_the_table_and_greedy_draws_once():
    from usersim_ui.app.zerogpu import gpu_seconds
    from usersim_ui.assistants.registry import BackendSpec
    from usersim_ui.core.transitions import RunSettings
    from usersim_ui.users.turn import sampling_rounds

    masks_only = GuardrailSettings(length_thresholds=False, verbatim_repetition=False)
    sampled, greedy = SamplingSettings(max_new_tokens=100), SamplingSettings(max_new_tokens=100, temperature=0.0)
    assert sampling_rounds(GuardrailSettings(), sampled) == [1, 5]
    assert sampling_rounds(GuardrailSettings(), sampled, batched_retries=False) == [1] * 6
    assert sampling_rounds(masks_only, sampled) == sampling_rounds(GuardrailSettings(), greedy) == [1]
    slice_s = lambda g, s: gpu_seconds(Dialogue(intent="x"), RunSettings(guardrails=g, sampling=s), BackendSpec(), None)  # noqa: E731
    assert slice_s(GuardrailSettings(), sampled) > slice_s(GuardrailSettings(), greedy) == slice_s(masks_only, sampled)
