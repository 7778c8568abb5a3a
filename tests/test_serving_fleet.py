"""A batch run on a serving fleet: two llama.cpp ``llama-server`` replicas on loopback serving the
SmolLM2 GGUF, driven by the batch CLI (``python -m usersim_ui.batch``) either

* as replicas (``--user-server`` repeated): each dialogue pinned to one replica by sha256 of its
  key, every turn of it there; or
* through a router in front of them: each request carries the dialogue's key in
  ``X-SMG-Routing-Key``, the header sglang-router's ``manual`` policy pins on.

The router here is a few lines of loopback proxy that hashes that header, not sglang-router:
sglang-router 0.3.2 refuses token-id prompts (HTTP 422, "prompt: data did not match any variant
of untagged enum StringOrArray": its CompletionRequest takes a string or a list of strings), and
this client sends token ids. What is tested is what this project owns: that each dialogue sends
one stable key on all its requests and different dialogues send different keys.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from pathlib import Path

import httpx
import pytest
from test_batch import run_cli
from test_remote_user import INTENT, FakeServer, llama_server_binary, start_llama_server, stop

from usersim_ui.batch.cli import server_urls
from usersim_ui.core.dialogue import Dialogue, SamplingSettings
from usersim_ui.core.errors import BackendError
from usersim_ui.core.guardrails import GuardrailSettings
from usersim_ui.prompts.formats import UserLMFormat
from usersim_ui.users.remote import ROUTING_KEY_HEADER, CompletionsUserSimulator, RoutedUser, replica_index

needs_server = pytest.mark.skipif(
    llama_server_binary() is None,
    reason="llama.cpp's llama-server binary not found (build it: .ci/build_llama_server.sh, or set USERSIM_LLAMA_SERVER)")

BATCH = ("--intents", "sample", "--max-intents", "2", "--samples", "2", "--assistant", "scripted", "--max-turns", "2",
         "--max-new-tokens", "12", "--user-model", "baseline", "--concurrency", "4", "--bootstrap", "50")


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def test_user_server_takes_repeats_and_commas_once_each():
    assert server_urls(["http://a/v1,http://b/v1/", " http://c/v1", "http://a/v1"]) == \
        ["http://a/v1", "http://b/v1", "http://c/v1"]
    with pytest.raises(SystemExit):
        server_urls([" , "])


def test_a_routed_dialogue_sends_its_key_on_every_request_and_shares_what_was_learnt(llama_tok):
    server, seen = FakeServer(llama_tok, "llama"), []

    def transport(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get(ROUTING_KEY_HEADER))
        return server(request)

    sim = CompletionsUserSimulator("http://router/v1", "userlm", llama_tok, UserLMFormat(llama_tok),
                                   transport=httpx.MockTransport(transport))
    sampling = SamplingSettings(max_new_tokens=12, seed=3)
    one, two = RoutedUser(sim, "intent-a/0/A"), RoutedUser(sim, "intent-a/1/A")
    first = one.generate_turn(Dialogue(intent=INTENT), GuardrailSettings(), sampling)
    probes = len(seen)
    second = two.generate_turn(Dialogue(intent=INTENT), GuardrailSettings(), sampling)
    assert seen[:probes] == [digest("intent-a/0/A")] * probes
    assert seen[probes:] == [digest("intent-a/1/A")] * (len(seen) - probes)
    assert len(seen) - probes < probes  # the second dialogue did not probe the P(end) method again
    assert sim.p_end_method == "forced_sample" and two.model_id == sim.model_id
    assert (second.text, second.p_end) == (first.text, first.p_end)  # the same turn, only routed
    assert ROUTING_KEY_HEADER not in sim._headers()  # the shared client carries no dialogue's key


def test_a_router_that_refuses_token_ids_is_named_in_the_error(llama_tok):
    """sglang-router 0.3.2's answer to a token-id prompt (measured against it): the client's error
    must quote it, not only say that no P(end) method worked."""
    refusal = ("Failed to deserialize the JSON body into the target type: prompt: data did not match any variant "
               "of untagged enum StringOrArray at line 1 column 29")
    sim = CompletionsUserSimulator("http://router/v1", "userlm", llama_tok, UserLMFormat(llama_tok),
                                   transport=httpx.MockTransport(lambda request: httpx.Response(422, text=refusal)))
    with pytest.raises(BackendError) as info:
        sim.generate_turn(Dialogue(intent=INTENT), GuardrailSettings(), SamplingSettings(max_new_tokens=8))
    assert "http://router/v1" in str(info.value) and "HTTP 422" in str(info.value) and "StringOrArray" in str(info.value)


@pytest.fixture(scope="module")
def replicas():
    from usersim_ui.inference.model_loading import smollm2_gguf_path

    # one thread each (the last -t wins): two servers on two cores, whose threads spin while they
    # wait, made this batch 70 s with two threads each against 8 s with one
    started = [start_llama_server(smollm2_gguf_path(), parallel=2, ctx=4096, extra=("--metrics", "-t", "1"))
               for _ in range(2)]
    yield [url for _proc, url in started]
    for proc, _url in started:
        stop(proc)


def prompt_tokens(url: str) -> float:
    """Prompt tokens a replica has processed (llama-server's /metrics)."""
    text = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("llamacpp:prompt_tokens_total"))


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@needs_server
def test_each_dialogue_stays_on_one_replica_and_both_serve(replicas, tmp_path):
    before = [prompt_tokens(u) for u in replicas]
    out = tmp_path / "fleet.jsonl"
    run_cli(*BATCH, "--user-server", replicas[0], "--user-server", replicas[1], "--out", str(out), timeout=600)
    done = records(out)
    assert len(done) == 4 and all(r["messages"] for r in done)
    for r in done:
        assert r["batch"]["replica"] == replicas[replica_index(r["batch"]["key"], 2)]
    used = {r["batch"]["replica"] for r in done}
    served = [prompt_tokens(u) - b for u, b in zip(replicas, before)]
    assert all((s > 0) == (u in used) for u, s in zip(replicas, served)), (served, used)  # no stray request
    assert len(used) == 2  # these four keys hash to both replicas


class KeyRouter(http.server.BaseHTTPRequestHandler):
    """A router in front of the replicas: the worker is sha256(routing key) mod 2; every request's
    key and worker are recorded."""
    upstreams: list[str] = []
    seen: list[tuple[str | None, int]] = []

    def _forward(self, method: str) -> None:
        key = self.headers.get(ROUTING_KEY_HEADER)
        worker = replica_index(key or "", len(self.upstreams))
        if self.path.endswith("/completions"):
            self.seen.append((key, worker))
        body = self.rfile.read(int(self.headers.get("Content-Length", 0))) if method == "POST" else None
        answer = httpx.request(method, self.upstreams[worker] + self.path.removeprefix("/v1"), content=body,
                               headers={"Content-Type": "application/json"}, timeout=120)
        self.send_response(answer.status_code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer.content)))
        self.end_headers()
        self.wfile.write(answer.content)

    def do_POST(self):  # noqa: N802
        self._forward("POST")

    def do_GET(self):  # noqa: N802
        self._forward("GET")

    def log_message(self, *args):
        pass


@needs_server
def test_through_a_router_each_dialogue_sends_one_key_on_every_request(replicas, tmp_path):
    KeyRouter.upstreams, KeyRouter.seen = replicas, []
    router = http.server.ThreadingHTTPServer(("127.0.0.1", 0), KeyRouter)
    threading.Thread(target=router.serve_forever, daemon=True).start()
    try:
        out = tmp_path / "routed.jsonl"
        run_cli(*BATCH, "--user-server", f"http://127.0.0.1:{router.server_address[1]}/v1", "--out", str(out),
                timeout=600)
    finally:
        router.shutdown()
    done = records(out)
    assert len(done) == 4
    expected = {digest(r["batch"]["key"]) for r in done}
    keys = [key for key, _worker in KeyRouter.seen]
    assert None not in keys and set(keys) == expected  # one key per dialogue, on every request
    turns = sum(1 for r in done for m in r["messages"] if m["role"] == "user")
    assert len(keys) >= 2 * turns  # at least the P(end) query and the sample of each user turn
    assert len({worker for _key, worker in KeyRouter.seen}) == 2  # the keys spread over both replicas
