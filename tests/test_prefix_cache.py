"""The per-dialogue prompt KV cache: every way a dialogue changes between two turns gives the
same first-step logits (and so p_end) as a fresh full prefill, while prefilling less."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
import torch
from conftest import biased_userlm

import usersim_ui.users.local as simulator_module
from usersim_ui.core import transitions
from usersim_ui.core.dialogue import (
    Dialogue,
    GuardrailSettings,
    SamplingSettings,
    Turn,
    dialogues_from_jsonl,
    dialogues_to_jsonl,
)
from usersim_ui.core.errors import GenerationCancelled
from usersim_ui.inference.model_loading import LoadedModel
from usersim_ui.inference.prefix_cache import PrefixCache, common_prefix_length
from usersim_ui.prompts.formats import UserLMFormat
from usersim_ui.prompts.userlm import END_CONVERSATION_ID
from usersim_ui.users.local import UserSimulator

OFF = GuardrailSettings(first_token_filter=False, no_early_ending=False, length_thresholds=False,
                        verbatim_repetition=False)
FAST = SamplingSettings(max_new_tokens=5, seed=3)
INTENT = "You want help planning a trip to Kyoto in April, on a budget, with a small child."
REPLIES = ["Sure! When in April are you going, and for how many days?",
           "Great. Kyoto is lovely then: cherry blossoms peak early in the month.",
           "For a small child, the Arashiyama monkey park and the aquarium are popular.",
           "A budget ryokan near Kyoto station runs about 10,000 yen a night."]


@pytest.fixture(scope="module")
def model(llama_tok):
    return biased_userlm(llama_tok, {END_CONVERSATION_ID: 12.0})  # p_end well inside (0, 1)


def make_sim(llama_tok, model, cache=True, **kw):
    return UserSimulator(LoadedModel(model, llama_tok, "tiny-userlm", "cpu"), UserLMFormat(llama_tok),
                         prefix_cache=PrefixCache() if cache else None, **kw)


class Spy:
    """Records what each ``sample`` call of the simulator saw and prefilled."""

    def __init__(self, monkeypatch):
        self.calls: list[dict] = []
        original = simulator_module.sample

        def spy(model, prompt_ids, **kw):
            cached = kw["past_key_values"].get_seq_length() if kw.get("past_key_values") is not None else 0
            result = original(model, prompt_ids, **kw)
            self.calls.append(dict(prompt=list(prompt_ids), cached=cached, logits=result.first_logits,
                                   rows=kw.get("num_samples", 1), prefilled=result.prefilled_tokens))
            return result
        monkeypatch.setattr(simulator_module, "sample", spy)


def fresh_logits(model, prompt):
    with torch.inference_mode():
        return model(input_ids=torch.tensor([prompt])).logits[0, -1].float()


def check_turn(sim, model, spy, dialogue, settings=OFF, budget=2048, expect_reuse=True):
    """Make a turn; its first logits and p_end match a fresh prefill; return it."""
    before = len(spy.calls)
    turn = sim.generate_turn(dialogue, settings, FAST, context_budget=budget)
    first = spy.calls[before]
    reference = fresh_logits(model, first["prompt"])
    torch.testing.assert_close(first["logits"], reference, atol=1e-4, rtol=1e-4)
    expected_p_end = torch.softmax(reference.double(), -1)[END_CONVERSATION_ID].item()
    assert turn.p_end == pytest.approx(expected_p_end, rel=1e-4, abs=1e-6)
    if expect_reuse:
        assert first["cached"] > 0 and first["prefilled"] == len(first["prompt"]) - first["cached"]
    return turn, first


def build(sim, dialogue, turns):
    for reply in REPLIES[:turns]:
        turn = sim.generate_turn(dialogue, OFF, FAST)
        dialogue = dialogue.with_turn(turn).with_turn(Turn(role="assistant", text=reply))
    return dialogue


def test_next_turn_prefills_only_what_was_added(llama_tok, model, monkeypatch):
    sim = make_sim(llama_tok, model)
    spy = Spy(monkeypatch)
    dialogue = Dialogue(intent=INTENT)
    turn, first = check_turn(sim, model, spy, dialogue, expect_reuse=False)  # a miss: all prefilled
    assert first["cached"] == 0
    dialogue = dialogue.with_turn(turn).with_turn(Turn(role="assistant", text=REPLIES[0]))
    _turn, second = check_turn(sim, model, spy, dialogue)
    assert second["cached"] >= len(first["prompt"]) - 1  # the whole previous prompt came from the cache
    added = len(second["prompt"]) - len(first["prompt"])
    assert second["prefilled"] <= added + 1


def test_undo_edit_regenerate_import_and_trimming_match_a_fresh_prefill(llama_tok, model, monkeypatch):
    sim = make_sim(llama_tok, model)
    dialogue = build(sim, Dialogue(intent=INTENT), 3)
    spy = Spy(monkeypatch)
    check_turn(sim, model, spy, dialogue)  # a normal next turn

    undone = transitions.undo(transitions.undo(dialogue))  # back to before the last exchange
    check_turn(sim, model, spy, undone)

    edited = transitions.edit_turn(dialogue, 0, "actually, can we go in May instead?")  # the first user turn
    _t, first = check_turn(sim, model, spy, edited)
    assert first["cached"] < 40  # only the system part and the header survive an edit of turn 1

    regen_turn, regen = check_turn(sim, model, spy, edited)  # regenerate: the very same prompt again
    assert regen["prefilled"] == 1  # all but the last token reused

    imported = dialogues_from_jsonl(dialogues_to_jsonl([edited]))[0]  # same id: its entry is used
    check_turn(sim, model, spy, imported)

    stranger = Dialogue(intent="You want a sourdough recipe.", turns=edited.turns, id=edited.id)  # same id, other text
    _t, first = check_turn(sim, model, spy, stranger, expect_reuse=False)
    assert first["cached"] <= 6  # only the system header and "\nYou want" are shared

    long = build(sim, Dialogue(intent=INTENT), 4)
    full = len(sim.format.prompt_ids(long.intent, long.messages()))
    trimmed, first = check_turn(sim, model, spy, long, budget=full - 20 + FAST.max_new_tokens)
    assert trimmed.context_dropped_turns == 2 and first["cached"] > 0


def test_batched_retries_use_the_prompt_expanded_per_row(llama_tok, monkeypatch):
    sim = make_sim(llama_tok, biased_userlm(llama_tok, {128009: 30.0}))  # every sample empty: all retried
    spy = Spy(monkeypatch)
    settings = replace(OFF, length_thresholds=True, retry_cap=4)
    turn = sim.generate_turn(Dialogue(intent=INTENT), settings, FAST)
    assert len(turn.rejected) == 4
    first, retries = spy.calls
    assert retries["rows"] == 4 and retries["cached"] == len(first["prompt"]) - 1 and retries["prefilled"] == 1
    torch.testing.assert_close(retries["logits"], first["logits"], atol=1e-4, rtol=1e-4)
    assert sim.last_prefilled_tokens == len(first["prompt"]) + 4


def test_sequential_retries_reuse_the_cache_too(llama_tok, monkeypatch):
    sim = make_sim(llama_tok, biased_userlm(llama_tok, {128009: 30.0}), batched_retries=False)
    spy = Spy(monkeypatch)
    sim.generate_turn(Dialogue(intent=INTENT), replace(OFF, length_thresholds=True, retry_cap=3), FAST)
    assert [c["prefilled"] for c in spy.calls[1:]] == [1, 1, 1]


def test_off_switch_and_results_match_without_a_cache(llama_tok, model):
    on, off = make_sim(llama_tok, model), make_sim(llama_tok, model, cache=False)
    assert off.prefix_cache is None and isinstance(on.prefix_cache, PrefixCache)
    dialogue = build(on, Dialogue(intent=INTENT), 2)
    a, b = on.generate_turn(dialogue, OFF, FAST), off.generate_turn(dialogue, OFF, FAST)
    assert a.p_end == pytest.approx(b.p_end, rel=1e-4)
    assert off.last_prefilled_tokens == len(off.format.prompt_ids(INTENT, dialogue.messages()))
    assert on.last_prefilled_tokens < off.last_prefilled_tokens / 3


def test_a_cancelled_turn_leaves_no_entry(llama_tok, model):
    sim = make_sim(llama_tok, model)
    dialogue = build(sim, Dialogue(intent=INTENT), 1)
    assert sim.prefix_cache.peek(dialogue.id) is not None
    stop = threading.Event()
    stop.set()
    with pytest.raises(GenerationCancelled):
        sim.generate_turn(dialogue, OFF, FAST, stop_event=stop)
    assert sim.prefix_cache.peek(dialogue.id) is None  # a half-updated cache is never put back
    sim.generate_turn(dialogue, OFF, FAST)  # and the next turn simply prefills again
    assert sim.prefix_cache.peek(dialogue.id) is not None


def test_lru_eviction_by_dialogues_and_by_tokens(llama_tok, model):
    cache = PrefixCache(max_dialogues=2, max_tokens=10_000)
    sim = make_sim(llama_tok, model)
    sim.prefix_cache = cache
    dialogues = [Dialogue(intent=f"{INTENT} Variant {i}.") for i in range(3)]
    for d in dialogues:
        sim.generate_turn(d, OFF, FAST)
    assert len(cache) == 2 and cache.peek(dialogues[0].id) is None and cache.stats.evictions == 1
    sim.generate_turn(dialogues[1], OFF, FAST)  # touch 1: now 2 is the oldest
    sim.generate_turn(dialogues[0], OFF, FAST)
    assert cache.peek(dialogues[2].id) is None and cache.peek(dialogues[1].id) is not None
    per_entry = cache.peek(dialogues[0].id).tokens
    cache.max_tokens = per_entry + 5  # room for one
    sim.generate_turn(dialogues[2], OFF, FAST)
    assert len(cache) == 1 and cache.total_tokens <= cache.max_tokens


def test_multi_token_marker_p_end_uses_the_cache(smollm2):
    with_cache = UserSimulator.prompted_baseline(smollm2)
    without = UserSimulator(with_cache_loaded(with_cache), with_cache.format, prefix_cache=None)
    dialogue = Dialogue(intent=INTENT, turns=(Turn(role="user", text="hi, trip to kyoto?"),
                                              Turn(role="assistant", text="Sure! When?")))
    a = with_cache.generate_turn(dialogue, OFF, SamplingSettings(max_new_tokens=2, seed=1))
    b = without.generate_turn(dialogue, OFF, SamplingSettings(max_new_tokens=2, seed=1))
    assert a.p_end == pytest.approx(b.p_end, rel=1e-3)


def with_cache_loaded(sim):
    return LoadedModel(sim.model, sim.tokenizer, sim.model_id, sim.device)


def test_common_prefix_length():
    assert common_prefix_length([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_length([], [1]) == 0 and common_prefix_length([1, 2], [1, 2, 3]) == 2


def test_the_default_cache_is_bounded_by_memory(llama_tok, model):
    sim = UserSimulator(LoadedModel(model, llama_tok, "tiny-userlm", "cpu"), UserLMFormat(llama_tok))
    c = model.config
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4
    assert sim.prefix_cache.max_tokens == 64 * 2**20 // per_token  # 64 MiB on a CPU
    assert PrefixCache.for_model(model, max_bytes=per_token * 10).max_tokens == 10
