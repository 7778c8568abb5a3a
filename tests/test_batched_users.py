"""Next user turns of several dialogues in one generate() call: per-row p_end, masks, stops,
guardrail decisions and seeds are each dialogue's own, as if it had been run alone."""

from __future__ import annotations

from dataclasses import replace

import pytest
from conftest import userlm_sim

from usersim_ui.core.dialogue import Dialogue, GuardrailSettings, SamplingSettings, Turn
from usersim_ui.core.transitions import RunSettings
from usersim_ui.prompts.userlm import END_CONVERSATION_ID, encode_plain
from usersim_ui.users.batched import generate_user_turns

EOT = 128009
OFF = GuardrailSettings(first_token_filter=False, no_early_ending=False, length_thresholds=False,
                        verbatim_repetition=False)


@pytest.fixture(scope="module")
def sharp(llama_tok):
    """A tiny UserLM whose distribution sits on a few words, the end of turn and the end marker:
    sampling is meaningful (several choices) and far from float-noise boundaries."""
    words = [encode_plain(llama_tok, w)[0] for w in [" hello", " there", " trip", " kyoto", " budget", "I"]]
    bias = {w: 9 + i * 0.6 for i, w in enumerate(words)}
    bias[EOT], bias[END_CONVERSATION_ID] = 9.4, 9.0
    sim = userlm_sim(llama_tok, bias=bias)
    sim.prefix_cache = None
    return sim


def dialogues():
    long_history = tuple(t for i in range(3) for t in (Turn(role="user", text=f"question number {i} about bread"),
                                                         Turn(role="assistant", text="Sure, here is more. " * (i + 2))))
    return [
        Dialogue(intent="You want help planning a trip."),
        Dialogue(intent="You want a bread recipe; you are a beginner and you have no stand mixer.", turns=long_history),
        Dialogue(intent="You want to fix a bike.", turns=(Turn(role="user", text="hello there"),
                                                          Turn(role="assistant", text="Hi! What is wrong?"))),
        Dialogue(intent="You want to learn chess openings quickly."),
    ]


def settings():
    return [
        RunSettings(sampling=SamplingSettings(max_new_tokens=12, seed=1)),  # paper defaults
        RunSettings(guardrails=replace(GuardrailSettings(), max_words=4, retry_cap=3),  # mostly too long: retried
                    sampling=SamplingSettings(max_new_tokens=20, seed=2, temperature=0.7)),
        RunSettings(guardrails=OFF, sampling=SamplingSettings(max_new_tokens=6, seed=3, top_p=0.95)),  # may end
        RunSettings(guardrails=replace(OFF, first_token_filter=True, verbatim_repetition=True),
                    sampling=SamplingSettings(max_new_tokens=8, seed=4, temperature=0.0)),  # greedy
    ]


def decisions(turn):
    return [(e.guardrail, e.action, e.detail, e.count) for e in turn.guardrails]


def test_each_row_is_the_turn_its_dialogue_would_get_alone(sharp):
    batch_stats: dict = {}
    batched = generate_user_turns(sharp, dialogues(), settings(), stats=batch_stats)
    alone = [sharp.generate_turn(d, s.guardrails, s.sampling) for d, s in zip(dialogues(), settings())]
    for b, a in zip(batched, alone):
        assert b.p_end == pytest.approx(a.p_end, rel=1e-4)
        assert b.seed == a.seed and decisions(b) == decisions(a)  # masks, resamples, gave-up: the same decisions
        assert [e.probability_removed or 0 for e in b.guardrails] == pytest.approx(
            [e.probability_removed or 0 for e in a.guardrails], rel=1e-4)
        assert [r.reason for r in b.rejected] == [r.reason for r in a.rejected]
        assert (b.text, b.ends_dialogue, b.tokens, b.truncated) == (a.text, a.ends_dialogue, a.tokens, a.truncated)
    assert batch_stats["calls"] >= 2 and batch_stats["rows"] > len(batched)  # the retries went as a second batch
    first_rows, first_prefill = batch_stats["per_call"][0]
    assert first_prefill > 20 * first_rows  # whole prompts, once
    assert all(prefill == rows for rows, prefill in batch_stats["per_call"][1:])  # retries: one token a row


def test_guardrail_decisions_per_row(llama_tok):
    i_id = encode_plain(llama_tok, "I")[0]
    sim = userlm_sim(llama_tok, bias={i_id: 30.0, END_CONVERSATION_ID: 29.0})  # p('I') 0.73, p_end 0.27
    d = Dialogue(intent="You want help planning a trip.")
    greedy = SamplingSettings(max_new_tokens=1, seed=1, temperature=0.0)
    rows = [
        RunSettings(guardrails=replace(OFF, first_token_filter=True, no_early_ending=True), sampling=greedy),  # both
        RunSettings(guardrails=OFF, sampling=greedy),  # neither mask: 'I' wins
        RunSettings(guardrails=replace(OFF, first_token_filter=True), sampling=greedy),  # no 'I': the end wins
        RunSettings(guardrails=replace(OFF, no_early_ending=True), sampling=greedy),
        RunSettings(guardrails=replace(OFF, no_early_ending=True, length_thresholds=True, retry_cap=2, min_words=3),
                    sampling=SamplingSettings(max_new_tokens=1, seed=1)),  # 'I', one word: too short, retried
    ]
    masked, free, ends, no_end, short = generate_user_turns(sim, [d] * 5, rows)
    assert not masked.ends_dialogue and masked.text.lower() not in {"i", "you", "here"}
    assert {e.guardrail for e in masked.guardrails} == {"first_token", "no_early_ending"}
    assert free.text == "I" and free.guardrails == () and not free.ends_dialogue
    assert ends.ends_dialogue and ends.text == "" and [e.guardrail for e in ends.guardrails] == ["first_token"]
    assert no_end.text == "I" and [e.guardrail for e in no_end.guardrails] == ["no_early_ending"]
    assert len(short.rejected) == 2 and short.rejected[0].reason == "length: 1 words"
    assert {e.guardrail: e.action for e in short.guardrails}["retry_cap"] == "gave_up"
    assert masked.p_end == pytest.approx(free.p_end, rel=1e-4) == pytest.approx(no_end.p_end, rel=1e-4)


def test_sequential_retries_and_mismatched_inputs(sharp):
    sharp.batched_retries = False
    try:
        ds, ss = dialogues()[:2], settings()[:2]
        batched = generate_user_turns(sharp, ds, ss)
        alone = [sharp.generate_turn(d, s.guardrails, s.sampling) for d, s in zip(ds, ss)]
        assert [t.text for t in batched] == [t.text for t in alone]
        assert [len(t.rejected) for t in batched] == [len(t.rejected) for t in alone]
    finally:
        sharp.batched_retries = True
    with pytest.raises(ValueError, match="2 dialogues but 1 settings"):
        generate_user_turns(sharp, ds, ss[:1])
