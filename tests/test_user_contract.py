"""The user-model contract: every engine gives the same Turn for the same prompt, model and seed.

Engines: in-process (``UserSimulator``), the batched call (``generate_user_turns`` with another
dialogue in the same batch), the turn batcher (two threads queued behind the model), and the
completions client (``CompletionsUserSimulator``) against a server backed by the same model
(``tests/model_server.py``) in three server shapes. They share one turn assembly
(``users.turn``); this suite holds them to it: text, ending, tokens, guardrail decisions,
rejected samples, seed and P(end).

Where the wire must differ it says so: with the first-token filter on and sampling, a server
draws the first token in its own request (the filter acts at position 0 only), so its random
stream differs from one ``generate`` call; there the server is held to the rules (decisions,
P(end), seed, no banned opening), and to exact equality at temperature 0.

The last section pins the six ways the server path had drifted from the in-process one.
"""

from __future__ import annotations

import inspect
import json
import math
import threading
import time
from dataclasses import replace

import httpx
import pytest
from conftest import userlm_sim
from model_server import ModelServer

from usersim_ui.core.dialogue import Dialogue, GuardrailSettings, SamplingSettings, Turn
from usersim_ui.core.errors import BackendError
from usersim_ui.core.protocols import UserModel
from usersim_ui.core.seeds import draw_seed
from usersim_ui.prompts.first_tokens import banned_first_token_ids
from usersim_ui.prompts.formats import UserLMFormat
from usersim_ui.prompts.userlm import END_CONVERSATION_ID, encode_plain
from usersim_ui.users.batched import BatchedUsers, TurnSettings, generate_user_turns
from usersim_ui.users.batcher import TurnBatcher
from usersim_ui.users.remote import (
    ROUTING_KEY_HEADER,
    CompletionsUserSimulator,
    RoutedUser,
)

EOT = 128009
OFF = GuardrailSettings(first_token_filter=False, no_early_ending=False, length_thresholds=False,
                        verbatim_repetition=False)
INTENT = "You want help planning a trip to Kyoto in April."
HISTORY = (Turn(role="user", text="hello there"), Turn(role="assistant", text="Hi! Where would you like to go?"))


@pytest.fixture(scope="module")
def sharp(llama_tok):
    """A tiny UserLM whose distribution sits on a few words, the end of turn, the end marker and
    the banned opening "I": every guardrail has something to act on."""
    words = [encode_plain(llama_tok, w)[0] for w in [" hello", " there", " trip", " kyoto", " budget", "I"]]
    bias = {w: 9 + i * 0.6 for i, w in enumerate(words)}
    bias[EOT], bias[END_CONVERSATION_ID] = 8.6, 9.0
    sim = userlm_sim(llama_tok, bias=bias)
    sim.prefix_cache = None  # every engine prefills in full: the comparison is about the turn, not the cache
    return sim


def remote(sim, kind: str) -> tuple[CompletionsUserSimulator, ModelServer]:
    server = ModelServer(sim.model, kind)
    client = CompletionsUserSimulator("http://model/v1", "tiny-userlm", sim.tokenizer, UserLMFormat(sim.tokenizer),
                                      transport=httpx.MockTransport(server))
    return client, server


def local_turn(sim, dialogue, guard, sampling, seed):
    return sim.generate_turn(dialogue, guard, sampling, seed=seed)


def batched_turn(sim, dialogue, guard, sampling, seed):
    other = Dialogue(intent="You want to fix a bike.", turns=HISTORY)
    settings = [TurnSettings(guard, sampling), TurnSettings(replace(guard, retry_cap=2), replace(sampling, seed=99))]
    return generate_user_turns(sim, [dialogue, other], settings, [seed, None])[0]


def batch_of_one_turn(sim, dialogue, guard, sampling, seed):
    """The batched engine through its UserModel face (``BatchedUsers``): a batch of one."""
    return BatchedUsers(sim).generate_turn(dialogue, guard, sampling, seed=seed)


def batcher_turn(sim, dialogue, guard, sampling, seed):
    """Two dialogues queue while the model is held; the leader makes both in one call."""
    lock = threading.Lock()
    batcher = TurnBatcher(sim, lock)
    other = Dialogue(intent="You want to fix a bike.", turns=HISTORY)
    results: dict[str, Turn] = {}
    lock.acquire()
    threads = [threading.Thread(target=lambda k=k, d=d, s=s: results.__setitem__(k, batcher.generate_turn(d, guard, sampling, seed=s)))
               for k, d, s in (("ours", dialogue, seed), ("other", other, None))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(batcher._waiting) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    lock.release()
    for t in threads:
        t.join(60)
    assert batcher.calls == [2], "both turns should have gone through one batched call"
    return results["ours"]


def remote_turn(kind):
    def make(sim, dialogue, guard, sampling, seed):
        client, _server = remote(sim, kind)
        return client.generate_turn(dialogue, guard, sampling, seed=seed)
    return make


def routed_turn(sim, dialogue, guard, sampling, seed):
    """A dialogue's handle on a shared completions client (a router's session key on each request)."""
    client, server = remote(sim, "vllm")
    turn = RoutedUser(client, "dialogue-7").generate_turn(dialogue, guard, sampling, seed=seed)
    assert server.headers and all(ROUTING_KEY_HEADER.lower() in {k.lower() for k in h} for h in server.headers)
    return turn


ENGINES = {"local": local_turn, "batched": batched_turn, "batched-one": batch_of_one_turn, "batcher": batcher_turn,
           "vllm": remote_turn("vllm"), "llama-server": remote_turn("llama"), "old-server": remote_turn("old"),
           "routed": routed_turn}


def record(turn: Turn) -> dict:
    """What the contract compares: everything but timing, the engine's name and P(end)'s source."""
    return {"text": turn.text, "ends": turn.ends_dialogue, "tokens": turn.tokens, "words": turn.words,
            "decisions": [(e.guardrail, e.action, e.detail, e.count) for e in turn.guardrails],
            "rejected": [(r.text, r.reason) for r in turn.rejected], "seed": turn.seed, "truncated": turn.truncated}


CASES = {
    # paper defaults, greedy: every engine, the wire included, must agree exactly
    "greedy-paper-defaults": (GuardrailSettings(), SamplingSettings(temperature=0.0, max_new_tokens=10, seed=5), ()),
    # sampled, resampling as the guardrails ask (no first-token filter: one request per round on the wire)
    "sampled-resampling": (replace(GuardrailSettings(), first_token_filter=False, min_words=4, retry_cap=4),
                           SamplingSettings(max_new_tokens=10, seed=11), ()),
    "sampled-may-end": (OFF, SamplingSettings(max_new_tokens=8, seed=3, top_p=0.95), HISTORY),
    "sampled-repetition": (replace(OFF, verbatim_repetition=True, no_early_ending=True, retry_cap=3),
                           SamplingSettings(max_new_tokens=4, seed=8), HISTORY),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("engine", list(ENGINES))
def test_every_engine_makes_the_same_turn(sharp, engine, case):
    guard, sampling, history = CASES[case]
    dialogue = Dialogue(intent=INTENT, turns=history)
    seed = 123457
    alone = local_turn(sharp, dialogue, guard, sampling, seed)
    turn = ENGINES[engine](sharp, dialogue, guard, sampling, seed)
    assert record(turn) == record(alone)
    assert turn.p_end == pytest.approx(alone.p_end, rel=1e-4, abs=1e-7)
    assert turn.p_end_source == ("logits" if engine in ("local", "batched", "batched-one", "batcher") else
                                 {"vllm": "server:logprob_token_ids", "llama-server": "server:forced_sample",
                                  "old-server": "server:echo", "routed": "server:logprob_token_ids"}[engine])


@pytest.mark.parametrize("engine", ["batched", "batcher"])
def test_in_process_engines_agree_with_the_first_token_filter_on_while_sampling(sharp, engine):
    guard = replace(GuardrailSettings(), min_words=2, retry_cap=3)
    sampling = SamplingSettings(max_new_tokens=10, seed=21)
    dialogue = Dialogue(intent=INTENT)
    alone = local_turn(sharp, dialogue, guard, sampling, 777)
    assert any(e.guardrail == "first_token" for e in alone.guardrails)  # the filter had something to remove
    turn = ENGINES[engine](sharp, dialogue, guard, sampling, 777)
    assert record(turn) == record(alone) and turn.p_end == pytest.approx(alone.p_end, rel=1e-4)


def test_on_the_wire_the_filter_keeps_the_rules_while_sampling(sharp):
    """Sampled with the filter on: the server's first token comes from its own request, so the
    text may differ; the rules may not."""
    guard = replace(GuardrailSettings(), min_words=2, retry_cap=3)
    sampling = SamplingSettings(max_new_tokens=10, seed=21)
    dialogue = Dialogue(intent=INTENT)
    alone = local_turn(sharp, dialogue, guard, sampling, 777)
    client, server = remote(sharp, "vllm")
    turn = client.generate_turn(dialogue, guard, sampling, seed=777)
    masks = lambda t: [(e.guardrail, e.action, e.detail) for e in t.guardrails if e.action == "masked"]  # noqa: E731
    assert masks(turn) == masks(alone) and turn.p_end == pytest.approx(alone.p_end, rel=1e-4)
    assert turn.seed == alone.seed == 777
    i = encode_plain(sharp.tokenizer, "I")[0]
    assert not turn.text.startswith("I ") and turn.text != "I"
    first = [c for c in server.calls if c.get("max_tokens") == 1 and "logit_bias" in c and "seed" in c]
    assert first and str(i) in first[0]["logit_bias"] and first[0]["seed"] == draw_seed(777, 0)


USER_MODELS = {"local": lambda sim: sim, "batched": lambda sim: BatchedUsers(sim),
               "batcher": lambda sim: TurnBatcher(sim, threading.Lock()),
               "vllm": lambda sim: remote(sim, "vllm")[0], "routed": lambda sim: RoutedUser(remote(sim, "vllm")[0], "k")}


@pytest.mark.parametrize("engine", list(USER_MODELS))
def test_every_engine_is_a_user_model_with_an_async_face(sharp, engine):
    import asyncio

    model = USER_MODELS[engine](sharp)
    assert isinstance(model, UserModel)
    for name in ("generate_turn", "agenerate_turn"):  # the protocol's parameters, in its order
        wanted = list(inspect.signature(getattr(UserModel, name)).parameters)[1:]
        assert list(inspect.signature(getattr(model, name)).parameters)[:len(wanted)] == wanted, (engine, name)
    dialogue, guard, sampling = Dialogue(intent=INTENT), GuardrailSettings(), SamplingSettings(max_new_tokens=8, seed=2)
    sync = model.generate_turn(dialogue, guard, sampling, seed=99)
    other = asyncio.run(model.agenerate_turn(dialogue, guard, sampling, seed=99))
    assert record(other) == record(sync)


@pytest.mark.parametrize("engine", list(USER_MODELS))
def test_every_engine_tells_each_draw_to_on_draft(sharp, engine):
    """The page streams what an engine reports: every engine reports each draw as it starts,
    with the guardrails' story so far; one that streams tokens reports text too."""
    guard = replace(GuardrailSettings(), first_token_filter=False, min_words=9, retry_cap=4)
    sampling = SamplingSettings(max_new_tokens=10, seed=7)  # the first sample is rejected (see the seed test)
    drafts: list = []
    turn = USER_MODELS[engine](sharp).generate_turn(Dialogue(intent=INTENT), guard, sampling, on_draft=drafts.append)
    assert turn.rejected and drafts and all(d.role == "user" for d in drafts)
    starts = [(d.sample, d.samples) for d in drafts if not d.text]
    assert starts[0] == (1, 1) and (2, 4) in starts  # the first sample, then the retries drawn as one batch
    assert any("sample 1 rejected" in n for d in drafts for n in d.notes)
    if engine in ("local", "batcher"):  # in-process, one dialogue: token by token
        assert any(d.text for d in drafts)


def test_a_turns_recorded_seed_reproduces_it_resamples_included(sharp):
    """Made with the scheme's seed (none given), the turn records a seed; replaying that seed on
    the server and in-process gives the same turn, rejected samples and all."""
    guard = replace(GuardrailSettings(), first_token_filter=False, min_words=9, retry_cap=4)
    sampling = SamplingSettings(max_new_tokens=10, seed=7)  # a base seed whose first sample is rejected
    dialogue = Dialogue(intent=INTENT)
    client, server = remote(sharp, "vllm")
    made = client.generate_turn(dialogue, guard, sampling)
    assert made.rejected, "the case must resample for the test to mean anything"
    seeds = [c["seed"] for c in server.calls if "seed" in c]
    assert seeds == [draw_seed(made.seed, r) for r in range(len(seeds))]
    again = remote(sharp, "vllm")[0].generate_turn(dialogue, guard, sampling, seed=made.seed)
    assert record(again) == record(made)
    assert record(sharp.generate_turn(dialogue, guard, sampling, seed=made.seed)) == record(made)


# ---- the six drifts, each pinned -------------------------------------------------------------

class Scripted:
    """A completions server that answers sampling requests from a script of token ids (one sample
    per entry, in order; a request continuing a sample gets its rest) and P(end) queries from ``end_logprob``; ``processed``: its logprobs
    come after logit_bias (vLLM's processed_logprobs mode) and it refuses logprob_token_ids."""

    def __init__(self, script: list[list[int]], end_logprob: float = math.log(0.34), processed: bool = False,
                 ignores_bias: bool = False):
        self.script, self.end_logprob, self.processed, self.ignores_bias = list(script), end_logprob, processed, ignores_bias
        self.calls: list[dict] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.calls.append(body)
        bias = {int(k): v for k, v in (body.get("logit_bias") or {}).items()}
        if "logprob_token_ids" in body:
            if self.processed:
                return httpx.Response(400, json={"error": {"message": "extra_forbidden: logprob_token_ids"}})
            top = {f"token_id:{t}": (self.end_logprob if t == END_CONVERSATION_ID else math.log(0.05))
                   for t in body["logprob_token_ids"]}
            return httpx.Response(200, json={"choices": [{"index": 0, "text": "x", "token_ids": [1],
                                                          "logprobs": {"top_logprobs": [top]}}]})
        if body.get("echo"):
            values = [None] * (len(body["prompt"]) - 1) + [self.end_logprob, -0.1]
            return httpx.Response(200, json={"choices": [{"index": 0, "text": "x", "token_ids": [1],
                                                          "logprobs": {"token_logprobs": values}}]})
        forced = [t for t, b in bias.items() if b > 50]
        if forced:
            raw = {forced[0]: self.end_logprob, 1000: math.log(0.5)}
            shown = ({forced[0]: -1e-6, 1000: math.log(0.5) - 100.0} if self.processed else raw)
            return httpx.Response(200, json={"choices": [{"index": 0, "text": "x", "token_ids": forced[:1], "logprobs": {
                "token_logprobs": [shown[forced[0]]], "top_logprobs": [{f"token_id:{t}": v for t, v in shown.items()}]}}]})
        prompt, base, current = body["prompt"], getattr(self, "base", None), getattr(self, "current", None)
        done = len(prompt) - len(base) if base is not None and prompt[:len(base)] == base else -1
        if current is not None and done > 0 and prompt[len(base):] == current[:done]:
            ids = current[done:]  # the rest of a sample whose first token came in its own request
        else:
            self.current, self.base = self.script.pop(0), prompt
            ids = self.current
        ids = ids[: body["max_tokens"]]
        if not self.ignores_bias:
            assert not any(bias.get(t, 0) < -50 for t in ids[:1]), "the script would break the bias"
        choices = [{"index": k, "text": "t", "token_ids": ids, "finish_reason": "stop"} for k in range(body.get("n", 1))]
        return httpx.Response(200, json={"choices": choices})


def scripted(tok, server) -> CompletionsUserSimulator:
    return CompletionsUserSimulator("http://scripted/v1", "userlm", tok, UserLMFormat(tok), transport=httpx.MockTransport(server))


@pytest.mark.parametrize("first", [END_CONVERSATION_ID, EOT])
def test_1_a_turn_that_ends_at_its_first_token_with_the_filter_on_does_not_crash(llama_tok, first):
    guard = replace(GuardrailSettings(), no_early_ending=False, length_thresholds=False)
    turn = scripted(llama_tok, Scripted([[first]])).generate_turn(Dialogue(intent=INTENT), guard,
                                                                  SamplingSettings(max_new_tokens=12, seed=1))
    assert turn.ends_dialogue is (first == END_CONVERSATION_ID) and turn.text == ""


def test_2_the_end_is_found_by_id_and_the_text_before_it_kept(llama_tok, tiny_sim):
    ok = encode_plain(llama_tok, "ok thanks")
    ids = ok + [END_CONVERSATION_ID] + encode_plain(llama_tok, " junk after") + [EOT]
    guard = replace(GuardrailSettings(), no_early_ending=False)
    server = Scripted([ids])
    turn = scripted(llama_tok, server).generate_turn(Dialogue(intent=INTENT, turns=HISTORY), guard,
                                                     SamplingSettings(max_new_tokens=20, seed=1))
    assert (turn.text, turn.ends_dialogue, turn.tokens, turn.rejected) == ("ok thanks", True, len(ok) + 1, ())
    assert tiny_sim.rules.decode(ids) == (turn.text, True, turn.tokens)  # as in-process decodes it
    assert len([c for c in server.calls if "seed" in c]) == 2  # first token, then the rest: no resampling


def test_3_any_case_bans_every_case_variant_on_the_wire(llama_tok):
    guard = replace(GuardrailSettings(), first_token_any_case=True, length_thresholds=False)
    server = Scripted([encode_plain(llama_tok, "Can") + encode_plain(llama_tok, " you help") + [EOT]])
    scripted(llama_tok, server).generate_turn(Dialogue(intent=INTENT), guard, SamplingSettings(max_new_tokens=12, seed=1))
    first = next(c for c in server.calls if c.get("max_tokens") == 1 and "seed" in c)
    banned = {int(k) for k, v in first["logit_bias"].items() if v < 0} - {END_CONVERSATION_ID}
    expected = set(banned_first_token_ids(llama_tok, ("I", "You", "Here"), any_case=True))
    assert banned == expected and expected > set(banned_first_token_ids(llama_tok, ("I", "You", "Here")))


def test_4_temperature_0_draws_once_and_every_draw_uses_the_seed_scheme(llama_tok):
    short = encode_plain(llama_tok, "Hi") + [EOT]  # one word: the length guardrail rejects it
    server = Scripted([short] * 10)
    turn = scripted(llama_tok, server).generate_turn(Dialogue(intent=INTENT), replace(GuardrailSettings(), first_token_filter=False),
                                                     SamplingSettings(temperature=0.0, max_new_tokens=12, seed=1))
    draws = [c for c in server.calls if "seed" in c]
    assert len(draws) == 1 and draws[0]["seed"] == draw_seed(turn.seed, 0)
    assert [e.action for e in turn.guardrails if e.guardrail == "retry_cap"] == ["gave_up"]


def test_5_a_server_with_processed_logprobs_is_not_trusted_for_a_forced_sample(llama_tok):
    server = Scripted([encode_plain(llama_tok, " fine thanks a lot") + [EOT]], end_logprob=math.log(0.34), processed=True)
    client = scripted(llama_tok, server)
    turn = client.generate_turn(Dialogue(intent=INTENT), replace(GuardrailSettings(), first_token_filter=False),
                                SamplingSettings(max_new_tokens=12, seed=1))
    assert turn.p_end == pytest.approx(0.34) and turn.p_end_source == "server:echo"
    assert "processed" in client.refused_methods["forced_sample"]


def test_5b_a_forced_sample_only_server_with_processed_logprobs_is_refused(llama_tok):
    server = Scripted([], processed=True)
    client = CompletionsUserSimulator("http://scripted/v1", "userlm", llama_tok, p_end_method="forced_sample",
                                      transport=httpx.MockTransport(server))
    with pytest.raises(BackendError, match="processed"):
        client.generate_turn(Dialogue(intent=INTENT), GuardrailSettings(), SamplingSettings(max_new_tokens=12, seed=1))


def test_6_a_server_that_ignores_logit_bias_is_refused_not_trusted(llama_tok):
    opening_i = encode_plain(llama_tok, "I") + encode_plain(llama_tok, " want to go") + [EOT]
    server = Scripted([opening_i], ignores_bias=True)
    with pytest.raises(BackendError, match="ignores logit_bias"):
        scripted(llama_tok, server).generate_turn(Dialogue(intent=INTENT), GuardrailSettings(),
                                                  SamplingSettings(max_new_tokens=12, seed=1))
    server = Scripted([encode_plain(llama_tok, " sure") + [END_CONVERSATION_ID]], ignores_bias=True)
    with pytest.raises(BackendError, match="ignores logit_bias"):
        scripted(llama_tok, server).generate_turn(Dialogue(intent=INTENT), replace(GuardrailSettings(), first_token_filter=False),
                                                  SamplingSettings(max_new_tokens=12, seed=1))
