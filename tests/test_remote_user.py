"""The simulated user on a completions server.

Three layers: (1) vLLM-, llama-server- and old-server-shaped answers from an in-memory
transport, to pin the request shapes and the P(end) method each server gets; (2) a tiny
``http.server`` on loopback for the failures (timeout, garbage, no choices, a dropped
connection, nobody listening); (3) llama.cpp's real ``llama-server`` on loopback serving the
SmolLM2 GGUF, compared with the same model in transformers. (3) skips when the binary is
missing (``.ci/build_llama_server.sh`` builds it, and CI runs that first); llama-cpp-python's
own server cannot stand in, as it takes string prompts only (``prompt: str | list[str]``), not
the token ids the core builds.
"""

from __future__ import annotations

import http.server
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import torch

from usersim_ui.core.dialogue import Dialogue, GuardrailSettings, SamplingSettings, Turn
from usersim_ui.core.errors import BackendError
from usersim_ui.core.transitions import RunSettings, user_turn
from usersim_ui.prompts.formats import PromptedUserFormat, UserLMFormat
from usersim_ui.prompts.userlm import END_CONVERSATION_ID, encode_plain
from usersim_ui.users.remote import CompletionsUserSimulator

OFF = GuardrailSettings(first_token_filter=False, no_early_ending=False, length_thresholds=False,
                        verbatim_repetition=False)
EOT = 128009
INTENT = "You want help planning a trip to Kyoto in April."


# ---- (1) server shapes on an in-memory transport ---------------------------------------------

class FakeServer:
    """Answers /completions like vLLM >= 0.26 (``vllm``), llama-server (``llama``: ignores
    ``logprob_token_ids``, honours a +100 bias, reports the chosen token's raw logprob), or an
    old server (``old``: refuses ``logprob_token_ids``, ignores positive bias, has echo)."""

    def __init__(self, tok, kind: str = "vllm", end_logprob: float = -2.0, n_supported: bool = True,
                 end_on_top: bool = False):
        self.kind, self.end_logprob, self.n_supported, self.end_on_top = kind, end_logprob, n_supported, end_on_top
        self.i, self.can = encode_plain(tok, "I")[0], encode_plain(tok, "Can")[0]
        self.rest = encode_plain(tok, " you help me plan a trip") + [EOT]
        self.calls: list[dict] = []

    def lp(self, token: int) -> float:
        return self.end_logprob if token == END_CONVERSATION_ID else math.log(0.3)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.calls.append(body)
        prompt, bias = body["prompt"], {int(k): v for k, v in (body.get("logit_bias") or {}).items()}
        if "logprob_token_ids" in body and self.kind == "vllm":
            top = {f"token_id:{t}": self.lp(t) for t in body["logprob_token_ids"]}
            return httpx.Response(200, json={"choices": [{"index": 0, "text": "x", "token_ids": [self.can],
                                                          "logprobs": {"top_logprobs": [top], "tokens": ["token_id:1"]}}]})
        if "logprob_token_ids" in body and self.kind == "old":
            return httpx.Response(400, json={"error": {"message": "extra_forbidden: logprob_token_ids"}})
        if body.get("echo"):
            if self.kind != "old":
                return httpx.Response(400, json={"error": {"message": "Only no echo is supported"}})
            values = [None] + [-0.5] * (len(prompt) - 2) + [self.lp(prompt[-1]), -0.1]
            return httpx.Response(200, json={"choices": [{"index": 0, "text": "x", "logprobs": {"token_logprobs": values}}]})
        forced = [t for t, b in bias.items() if b > 50]
        if forced and self.kind == "llama":
            raw_top = [{"id": forced[0], "logprob": self.lp(forced[0])}, {"id": self.i, "logprob": math.log(0.6)}]
            content = [{"id": forced[0], "token": "?", "logprob": self.lp(forced[0]), "top_logprobs": raw_top}]
            return httpx.Response(200, json={"choices": [{"index": 0, "text": "?", "logprobs": {"content": content}}]})
        # sampling: a model that wants to open with "I"
        cont = prompt[-1] in (self.i, self.can)
        ids = self.rest if cont else [self.i if bias.get(self.i, 0) > -50 else self.can] + self.rest
        ids = ids[: body["max_tokens"]]
        n = body.get("n", 1) if self.n_supported else 1
        top = [{"id": self.i, "logprob": math.log(0.6)}, {"id": self.can, "logprob": math.log(0.3)}]
        if self.end_on_top:  # the end id happens to be in the server's own top-k
            top = [{"id": END_CONVERSATION_ID, "logprob": self.end_logprob}] + top
        choices = [{"index": k, "text": "t", "finish_reason": "stop" if EOT in ids else "length",
                    "logprobs": {"content": [{"id": t, "logprob": -1.0, "top_logprobs": top if j == 0 else []}
                                             for j, t in enumerate(ids)]}} for k in range(n)]
        return httpx.Response(200, json={"choices": choices})


def fake_sim(tok, server: FakeServer, **kwargs) -> CompletionsUserSimulator:
    return CompletionsUserSimulator("http://fake/v1", "userlm", tok, UserLMFormat(tok),
                                    transport=httpx.MockTransport(server), **kwargs)


@pytest.mark.parametrize("kind,method", [("vllm", "logprob_token_ids"), ("llama", "forced_sample"), ("old", "echo")])
def test_p_end_method_is_found_per_server_and_read_raw(llama_tok, kind, method):
    server = FakeServer(llama_tok, kind, end_logprob=-1.5)
    sim = fake_sim(llama_tok, server)
    turn = sim.generate_turn(Dialogue(intent=INTENT), OFF, SamplingSettings(max_new_tokens=12, seed=3))
    assert sim.p_end_method == method and f"p_end via {method}" in sim.model_id
    assert turn.p_end == pytest.approx(math.exp(-1.5))
    assert turn.text == "I you help me plan a trip" and turn.tokens == 7 and not turn.ends_dialogue
    prompt = UserLMFormat(llama_tok).prompt_ids(INTENT, [])
    assert server.calls[-1]["prompt"] == prompt  # token ids in, exactly the core's
    calls = len(server.calls)
    sim.generate_turn(Dialogue(intent=INTENT), OFF, SamplingSettings(max_new_tokens=12, seed=3))
    assert len(server.calls) - calls == 2  # the method is remembered: one query, one sample


def test_a_server_ignoring_logprob_token_ids_is_not_mistaken_for_one_honouring_it(llama_tok):
    server = FakeServer(llama_tok, "llama", end_logprob=-0.1, end_on_top=True)
    sim = fake_sim(llama_tok, server)
    for _ in range(2):
        turn = sim.generate_turn(Dialogue(intent=INTENT), OFF, SamplingSettings(max_new_tokens=12, seed=3))
        assert sim.p_end_method == "forced_sample" and turn.p_end == pytest.approx(math.exp(-0.1))


def test_first_token_ban_goes_only_on_the_first_position(llama_tok):
    server = FakeServer(llama_tok, "vllm")
    sim = fake_sim(llama_tok, server)
    guard = replace(OFF, first_token_filter=True, no_early_ending=True)
    turn = sim.generate_turn(Dialogue(intent=INTENT), guard, SamplingSettings(max_new_tokens=12, seed=3))
    assert turn.text == "Can you help me plan a trip"
    probe, first, rest = server.calls
    banned = sim.banned_ids(guard.banned_first_words)
    assert server.i in banned and set(probe["logprob_token_ids"]) == {END_CONVERSATION_ID, EOT, *banned}
    assert first["max_tokens"] == 1 and {int(k) for k in first["logit_bias"]} == {*banned, END_CONVERSATION_ID}
    assert rest["prompt"] == first["prompt"] + [server.can]
    assert rest["logit_bias"] == {str(END_CONVERSATION_ID): -100.0}  # no-early-ending stays on, the ban does not
    kinds = {e.guardrail: e for e in turn.guardrails}
    assert kinds["first_token"].probability_removed == pytest.approx(0.3 * len(banned))
    assert kinds["no_early_ending"].probability_removed == pytest.approx(math.exp(-2.0))


def test_retries_go_as_n_samples_in_one_request_or_one_by_one(llama_tok):
    too_long = replace(OFF, length_thresholds=True, max_words=3, retry_cap=4)
    for n_supported, extra in ((True, 0), (False, 3)):
        server = FakeServer(llama_tok, "vllm", n_supported=n_supported)
        turn = fake_sim(llama_tok, server).generate_turn(Dialogue(intent=INTENT), too_long,
                                                          SamplingSettings(max_new_tokens=12, seed=3))
        assert len(turn.rejected) == 4 and any(e.action == "gave_up" for e in turn.guardrails)
        sampling = [c for c in server.calls if "logprob_token_ids" not in c]
        assert [c.get("n") for c in sampling][:2] == [1, 4] and len(sampling) == 2 + extra
        assert len({c["seed"] for c in sampling[1:]}) == len(sampling) - 1


def test_async_variant_gives_the_same_turn(llama_tok):
    import asyncio

    server = FakeServer(llama_tok, "llama")
    sim = fake_sim(llama_tok, server)
    sampling = SamplingSettings(max_new_tokens=12, seed=3)
    sync = sim.generate_turn(Dialogue(intent=INTENT), GuardrailSettings(), sampling)
    sim_async = CompletionsUserSimulator("http://fake/v1", "userlm", llama_tok, transport=httpx.MockTransport(server))

    async def three():
        return await asyncio.gather(*(sim_async.agenerate_turn(Dialogue(intent=INTENT), GuardrailSettings(), sampling)
                                      for _ in range(3)))

    turns = asyncio.run(asyncio.wait_for(three(), 30))
    assert all(replace(t, latency_s=0, model_id="") == replace(sync, latency_s=0, model_id="") for t in turns)


# ---- (2) failures from a loopback http.server ------------------------------------------------

class Misbehaving(http.server.BaseHTTPRequestHandler):
    mode = "garbage"

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.mode == "slow":
            time.sleep(3)
        if self.mode == "drop":
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n{\"choi")
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        body = {"garbage": b"<html>Bad Gateway</html>", "empty": b'{"choices": []}', "slow": b"{}",
                "error": b'{"error": "overloaded"}'}[self.mode]
        self.send_response(503 if self.mode == "error" else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def misbehaving():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Misbehaving)
    server.handle_error = lambda request, address: None  # a client that gave up is the point of some tests
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


@pytest.mark.parametrize("mode,message", [("garbage", "not JSON"), ("empty", "no choices"), ("slow", "did not answer"),
                                          ("drop", "failed"), ("error", "HTTP 503")])
def test_a_failing_server_raises_backend_error_and_keeps_the_dialogue(llama_tok, misbehaving, mode, message):
    Misbehaving.mode = mode
    url = f"http://127.0.0.1:{misbehaving.server_address[1]}/v1"
    sim = CompletionsUserSimulator(url, "userlm", llama_tok, timeout_s=0.5, p_end_method="forced_sample")
    dialogue = Dialogue(intent=INTENT).with_turn(Turn(role="user", text="hi there you")).with_turn(
        Turn(role="assistant", text="Hello! How can I help?"))
    before = repr(dialogue)
    with pytest.raises(BackendError, match=message) as info:
        user_turn(dialogue, sim, RunSettings(guardrails=OFF, sampling=SamplingSettings(max_new_tokens=4)))
    assert url in str(info.value)  # says which server failed
    assert repr(dialogue) == before and len(dialogue.turns) == 2


def test_nobody_listening_is_a_backend_error(llama_tok):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sim = CompletionsUserSimulator(f"http://127.0.0.1:{port}/v1", "userlm", llama_tok, timeout_s=2)
    with pytest.raises(BackendError, match=f"127.0.0.1:{port}"):
        sim.generate_turn(Dialogue(intent=INTENT), OFF, SamplingSettings(max_new_tokens=4))


# ---- (3) llama.cpp's llama-server on loopback --------------------------------------------------

def llama_server_binary() -> str | None:
    for candidate in (os.environ.get("USERSIM_LLAMA_SERVER"), shutil.which("llama-server"),
                      str(Path.home() / ".cache/usersim_wheels/llama.cpp-build/bin/llama-server")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


needs_server = pytest.mark.skipif(
    llama_server_binary() is None,
    reason="llama.cpp's llama-server binary not found (build it: bash .ci/build_llama_server.sh, or set "
           "USERSIM_LLAMA_SERVER). llama-cpp-python's server takes string prompts only, not token ids.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_llama_server(gguf: Path, parallel: int = 2, ctx: int = 4096, extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([llama_server_binary(), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
                             "-c", str(ctx), "-np", str(parallel), "-t", "2", "--no-warmup", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url + "/v1"
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("llama-server did not become healthy in 120 s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def f32_gguf() -> Path:
    """The SmolLM2 GGUF with every tensor dequantised to float32: the weights transformers runs,
    so that llama.cpp and transformers compute the same function (Q4_1 would add llama.cpp's
    8-bit quantisation of the activations on top)."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize

    from usersim_ui.inference.model_loading import cache_dir, smollm2_gguf_path

    target = cache_dir() / "smollm2-135m-instruct-f32.gguf"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    reader = GGUFReader(smollm2_gguf_path())
    partial = target.with_suffix(".partial")
    writer = GGUFWriter(partial, reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        writer.add_key_value(name, field.contents(), vtype, sub_type=field.types[-1] if vtype == GGUFValueType.ARRAY else None)
    writer.add_file_type(0)
    for t in reader.tensors:
        data = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(tuple(int(x) for x in reversed(t.shape.tolist())))
        writer.add_tensor(t.name, data, raw_dtype=GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.rename(target)
    return target


@pytest.fixture(scope="module")
def servers():
    """Two servers on the same SmolLM2: the Q4_1 GGUF as shipped, and its float32 dequantisation
    with a float32 KV cache (llama-server's default f16 cache alone moves P by up to 3e-4)."""
    from usersim_ui.inference.model_loading import smollm2_gguf_path

    if llama_server_binary() is None:
        pytest.skip("no llama-server")
    q4 = start_llama_server(smollm2_gguf_path())
    f32 = start_llama_server(f32_gguf(), extra=("-ctk", "f32", "-ctv", "f32", "-fa", "off"))
    yield {"q4": q4[1], "f32": f32[1]}
    stop(q4[0])
    stop(f32[0])


ENDING = [  # (intent, messages) where a prompted user has reason to leave, and where it has not
    ("You want to know the capital of France.",
     [{"role": "user", "content": "what is the capital of france"},
      {"role": "assistant", "content": "The capital of France is Paris. Anything else I can help with?"},
      {"role": "user", "content": "no thats all thanks"},
      {"role": "assistant", "content": "You're welcome, goodbye!"}]),
    ("You want help planning a trip to Kyoto in April.", []),
    ("You want a vegetarian lasagna recipe.",
     [{"role": "user", "content": "can u give me a veggie lasagna recipe"},
      {"role": "assistant", "content": "Sure! Layer pasta, ricotta, spinach and tomato sauce, then bake 45 minutes."}]),
]


def local_p_end(smollm2, fmt, intent, messages) -> float:
    """P(end) as the in-process simulator computes it, from transformers' logits."""
    from usersim_ui.users.local import UserSimulator

    sim = UserSimulator(smollm2, fmt)
    ids = fmt.prompt_ids(intent, messages)
    with torch.inference_mode():
        logits = smollm2.model(input_ids=torch.tensor([ids])).logits[0, -1]
    return sim.p_end(ids, logits)


def single_token_markers(smollm2, intent, messages, system, k=3) -> list[str]:
    """The k likeliest first tokens of the user turn (that round-trip as one token): markers
    with a P(end) large enough that an absolute 1e-3 means something."""
    tok = smollm2.tokenizer
    ids = PromptedUserFormat(tok, system_template=system).prompt_ids(intent, messages)
    with torch.inference_mode():
        probs = torch.softmax(smollm2.model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
    out = []
    for t in torch.topk(probs, 10).indices.tolist():
        text = tok.decode([t])
        if encode_plain(tok, text) == [t] and text.strip():
            out.append(text)
    return out[:k]


@needs_server
def test_p_end_from_the_server_equals_the_in_process_value(servers, smollm2):
    """Server against transformers on the same prompt ids. With the float32 weights and cache the
    two compute the same function: equal within 1e-3 (measured: within 3e-5). The Q4_1 GGUF as
    shipped cannot meet 1e-3: llama.cpp multiplies Q4_1 weights with activations rounded to 8
    bits (Q8_1), which transformers' dequantised float32 model does not, and that moves P by up
    to 0.025 (0.33 nats) on the one-token markers here, and the three-token "[END]" (P ~ 1e-5)
    by up to 0.6 nats, varying from run to run with the slots' prefix-cache state; for it only
    the log-probability is checked, within 1 nat: the right tokens at the right positions (a
    wrong position or token is off by several nats), not exactness."""
    from usersim_ui.prompts.formats import PROMPTED_USER_SYSTEM

    tok = smollm2.tokenizer
    system = PROMPTED_USER_SYSTEM.split(" When your goal")[0]  # a prompt that does not name the marker
    rows = []
    for intent, messages in ENDING:
        dialogue = Dialogue(intent=intent)
        for m in messages:
            dialogue = dialogue.with_turn(Turn(role=m["role"], text=m["content"]))
        formats = [PromptedUserFormat(tok)]  # the real baseline: "[END]", three tokens
        formats += [PromptedUserFormat(tok, end_marker=m, system_template=system)
                    for m in single_token_markers(smollm2, intent, messages, system)]
        for fmt in formats:
            local = local_p_end(smollm2, fmt, intent, messages)
            remote = {}
            for name, url in servers.items():
                sim = CompletionsUserSimulator(url, "smollm2", tok, fmt)
                remote[name] = sim.generate_turn(dialogue, OFF, SamplingSettings(max_new_tokens=1, temperature=0)).p_end
                assert sim.p_end_method == "forced_sample"
            rows.append((fmt.end_marker, local, remote["f32"], remote["q4"]))
    print("\nmarker, P(end) transformers / llama-server f32 / llama-server Q4_1:")
    for row in rows:
        print("  %-8r %.6g %.6g %.6g" % row)
    assert max(r[1] for r in rows) > 0.1  # markers with a substantial P(end) were compared
    for _marker, local, f32, q4 in rows:
        assert abs(f32 - local) < 1e-3 and abs(f32 - local) <= 2e-3 * local  # absolute and relative
        assert abs(math.log(q4) - math.log(local)) < 1.0


@needs_server
def test_first_token_ban_applies_at_position_zero_only(servers, smollm2):
    tok = smollm2.tokenizer
    sim = CompletionsUserSimulator(servers["f32"], "smollm2", tok, PromptedUserFormat(tok))
    intent, messages = ENDING[2]
    dialogue = Dialogue(intent=intent).with_turn(Turn(role="user", text=messages[0]["content"])).with_turn(
        Turn(role="assistant", text=messages[1]["content"]))
    greedy = SamplingSettings(max_new_tokens=8, temperature=0)
    free = sim.generate_turn(dialogue, OFF, greedy)
    ids = encode_plain(tok, free.text)
    assert len(ids) >= 3
    # ban the greedy second token: position 0 is unaffected, and position 1 still produces it
    second = ids[1]
    if second != ids[0]:
        sim.rules.banned_ids = lambda words, any_case=False: [second]  # type: ignore[method-assign]
        again = sim.generate_turn(dialogue, replace(OFF, first_token_filter=True), greedy)
        assert encode_plain(tok, again.text)[:2] == ids[:2]
    # ban the greedy first token: the turn must open with something else
    sim.rules.banned_ids = lambda words, any_case=False: [ids[0]]  # type: ignore[method-assign]
    banned = sim.generate_turn(dialogue, replace(OFF, first_token_filter=True), greedy)
    assert encode_plain(tok, banned.text)[0] != ids[0]
    [event] = [e for e in banned.guardrails if e.guardrail == "first_token"]
    assert event.probability_removed > 0.01


@needs_server
def test_n_samples_differ_and_the_seed_reproduces_them(servers, smollm2):
    """Retries are distinct samples, and the same seeds give the same samples again. On the float32
    server: with the Q4_1 one, whether a slot reuses a cached prefix or recomputes it changes the
    logits slightly (P moved by ~1% between runs), and at temperature 1 a sample can flip."""
    tok = smollm2.tokenizer
    sim = CompletionsUserSimulator(servers["f32"], "smollm2", tok, PromptedUserFormat(tok))
    strict = replace(OFF, length_thresholds=True, min_words=40, max_words=50, retry_cap=3)  # rejects everything
    sampling = SamplingSettings(max_new_tokens=10, temperature=1.0, seed=11)
    one = sim.generate_turn(Dialogue(intent=INTENT), strict, sampling)
    two = sim.generate_turn(Dialogue(intent=INTENT), strict, sampling)
    texts = [r.text for r in one.rejected] + [one.text]
    assert len(texts) == 4 and len(set(texts)) >= 3
    assert [r.text for r in two.rejected] + [two.text] == texts and two.seed == one.seed  # same seeds, same samples


@needs_server
def test_a_server_killed_mid_turn_raises_and_keeps_the_dialogue(smollm2):
    from usersim_ui.inference.model_loading import smollm2_gguf_path

    proc, url = start_llama_server(smollm2_gguf_path(), parallel=1)
    try:
        tok = smollm2.tokenizer
        sim = CompletionsUserSimulator(url, "smollm2", tok, PromptedUserFormat(tok), timeout_s=30)
        dialogue = Dialogue(intent=INTENT)
        settings = RunSettings(guardrails=OFF, sampling=SamplingSettings(max_new_tokens=400, temperature=1.0))
        box: dict = {}

        def turn():
            try:
                box["turn"] = user_turn(dialogue, sim, settings)
            except Exception as exc:  # noqa: BLE001
                box["error"] = exc

        thread = threading.Thread(target=turn)
        thread.start()
        deadline = time.time() + 30
        while sim.requests_sent < 2 and time.time() < deadline:  # the P(end) query is done, the sample is running
            time.sleep(0.01)
        time.sleep(0.2)
        proc.kill()
        thread.join(60)
        assert isinstance(box.get("error"), BackendError), box
        assert url in str(box["error"]) and dialogue.turns == ()
    finally:
        stop(proc)
