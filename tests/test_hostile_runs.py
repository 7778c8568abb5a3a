"""The hostile-visitor suite (issue 14, part A): what a stranger on a public Space can do to
runs, and what the app promises back.

* Endpoints on 127.0.0.1 that trickle one byte a second, stay silent, stream a chunk a second,
  or send megabytes (:class:`HostileEndpoint`, started here): Stop cuts them within a second
  and frees the run slot; the silence and deadline limits hold on the wall clock; a reply is
  cut at the turn limit without being buffered.
* gradio_client threads against the launched app (the offline SmolLM2, as in
  ``test_app_client``): one visitor (a client address, sent as X-Forwarded-For, which uvicorn
  trusts from loopback) cannot take every run slot; Send, Edit and Undo racing a run's start
  are never confirmed and then lost; a Stop sent just after a run's request stops it; End
  during the first turn ends the run; a Reset reported as failed never applies later.
* Stop during a long prompt read-in, clear messages for bad input and refusals that reach API
  callers and the host's log.

Every test name starts with ``test_hostile_``; each ran against the code before the change
(``git worktree add /tmp/before 70d416b``) and failed there (docs/benchmarks.md and the commit
message say how).
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
from hostile_endpoint import HostileEndpoint
from loopback_openai import LoopbackOpenAI

from usersim_ui.app.handlers import START_TEXT

gradio_client = pytest.importorskip("gradio_client")
AppError = gradio_client.exceptions.AppError

SETTINGS = dict(temperature=1.0, top_p=0.8, max_new_tokens=16, seed=0, max_turns=3, first_token=True,
                no_early_end=True, min_turns_end=0, length=True, min_words=1, max_words=1000, repetition=True,
                retry_cap=2)
BACKEND = dict(backend_kind="local", system_prompt="Be brief.", a_temperature=0.7, a_max_tokens=16,
               base_url="", model_name="", api_key="")
INTENT = "You want to know how to keep basil alive on a windowsill."
USER_TEXT = "Hi, my basil keeps wilting on the windowsill. What am I doing wrong?"


# ---- endpoints that misbehave (tests/hostile_endpoint.py) -------------------------------------

@pytest.fixture
def endpoint(request):
    server = HostileEndpoint(**request.param)
    yield server
    server.close()


# ---- the launched app -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def app_url(smollm2):
    from usersim_ui.app.studio import build_app

    demo = build_app().queue(default_concurrency_limit=1)
    _app, url, _share = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    yield url
    demo.close()


def visitor(app_url: str, address: str = "192.0.2.10"):
    """A new session from ``address`` (uvicorn trusts X-Forwarded-For from loopback)."""
    return gradio_client.Client(app_url, verbose=False, headers={"X-Forwarded-For": address})


def args(**overrides):
    values = {**SETTINGS, **BACKEND, **overrides}
    return [values[k] for k in SETTINGS], [values[k] for k in BACKEND]


def submit(client, api_name, intent=INTENT, **overrides):
    settings, backend = args(**overrides)
    return client.submit(intent, *settings, *backend, api_name=api_name)


def call(client, api_name, intent=INTENT, **overrides):
    return submit(client, api_name, intent, **overrides).result(timeout=60)


def via(url: str, **extra):
    return dict(backend_kind="openai", base_url=url, model_name="hostile", **extra)


def dialogue_of(client) -> dict | None:
    try:
        return json.loads(Path(client.predict(api_name="/export_jsonl")).read_text().splitlines()[0])
    except AppError as exc:
        assert "Nothing to export" in str(exc)
        return None


def texts(record) -> list[str]:
    return [m["content"] for m in record["messages"]] if record else []


def load(client, tmp_path: Path, *messages: tuple[str, str]) -> None:
    """Start the session from a dialogue with these (role, text) turns, as an import does."""
    path = tmp_path / f"start-{random.randrange(10**9)}.jsonl"
    path.write_text(json.dumps({"intent": INTENT, "messages": [{"role": r, "content": t} for r, t in messages]}))
    client.predict(gradio_client.handle_file(str(path)), api_name="/import_jsonl")


def session_in_flight(client) -> bool:
    from usersim_ui.app.handlers import RUNS

    return RUNS.in_flight(client.session_hash)


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


# ---- item 2: a slow endpoint cannot hold a run --------------------------------------------------

@pytest.mark.parametrize("endpoint", [{"mode": "bytes"}, {"mode": "silent"}], indirect=True, ids=["bytes", "silent"])
def test_hostile_stop_cuts_an_endpoint_wait_within_a_second_and_frees_the_run_slot(app_url, endpoint, tmp_path):
    client = visitor(app_url)
    load(client, tmp_path, ("user", USER_TEXT))
    job = submit(client, "/next_assistant_turn", **via(endpoint.url))
    wait_until(lambda: endpoint.requests and session_in_flight(client))
    time.sleep(1.5)  # the endpoint has trickled (or kept silent) for a while
    stopped = time.monotonic()
    client.predict(api_name="/stop")
    wait_until(lambda: not session_in_flight(client), timeout=10)  # the run slot is free on the server
    took = time.monotonic() - stopped  # Stop's round trip and the release, not the result's delivery
    outputs = job.result(timeout=30)
    assert took < 1.0, f"Stop took {took:.2f} s"
    assert "Stopped" in outputs[1] and texts(dialogue_of(client)) == [USER_TEXT]
    wait_until(lambda: endpoint.closed_at, timeout=2)  # and the connection was cut, not left hanging
    assert endpoint.closed_at[0] - stopped < 1.0


@pytest.mark.parametrize("endpoint, env, message", [
    ({"mode": "bytes"}, {"USERSIM_BACKEND_SILENCE_S": "2"}, r"sent \d+ bytes but no complete chunk for 2 s"),
    ({"mode": "silent"}, {"USERSIM_BACKEND_SILENCE_S": "2"}, r"sent nothing for 2 s"),
    ({"mode": "words", "delay_s": 0.5}, {"USERSIM_BACKEND_DEADLINE_S": "3"}, r"did not finish its reply within 3 s"),
], indirect=["endpoint"], ids=["bytes", "silent", "words"])
def test_hostile_endpoint_limits_hold_on_the_wall_clock(app_url, endpoint, env, message, monkeypatch, tmp_path):
    """The host's limits (here 2 s of silence, a 3 s reply) end the turn on time whatever the
    peer sends: a byte a second, nothing, or a word every half second for ever."""
    import re

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    limit = float(next(iter(env.values())))
    client = visitor(app_url)
    load(client, tmp_path, ("user", USER_TEXT))
    started = time.monotonic()
    outputs = call(client, "/next_assistant_turn", **via(endpoint.url))
    took = time.monotonic() - started
    assert limit - 0.2 < took < limit + 1.5, took
    assert re.search(message, outputs[1]) and "hostile @ http://127.0.0.1" in outputs[1]
    assert "The dialogue so far is kept" in outputs[1] and texts(dialogue_of(client)) == [USER_TEXT]
    assert not session_in_flight(client)


@pytest.mark.parametrize("endpoint", [{"mode": "silent"}], indirect=True)
def test_hostile_one_visitor_cannot_take_every_run_slot_and_stop_releases_them(app_url, endpoint, monkeypatch,
                                                                                tmp_path):
    """Sixteen sessions of one visitor filled every slot before; now one address holds at most
    ``per_visitor`` runs, others are still served, and Stop frees the slots at once."""
    from usersim_ui.app.handlers import RUNS

    monkeypatch.setattr(RUNS, "per_visitor", 3, raising=False)
    monkeypatch.setattr(RUNS, "max_runs", 5)
    hostile = [visitor(app_url, "203.0.113.66") for _ in range(5)]
    for client in hostile:
        load(client, tmp_path, ("user", USER_TEXT))
    held = lambda address: getattr(RUNS, "runs_of", lambda _a: 0)(address)  # noqa: E731 - 0 before the change
    jobs = [submit(client, "/next_assistant_turn", **via(endpoint.url)) for client in hostile]
    wait_until(lambda: sum(j.done() for j in jobs) >= 2 and len(endpoint.requests) >= 3)
    time.sleep(0.3)
    refused = [job for job in jobs if job.done()]
    assert len(refused) == 2 and held("203.0.113.66") == 3
    for job in refused:
        with pytest.raises(AppError, match="the most one visitor may have at once"):
            job.result()
    other = visitor(app_url, "198.51.100.7")  # another visitor is still served
    load(other, tmp_path, ("user", USER_TEXT))
    other_job = submit(other, "/next_assistant_turn", **via(endpoint.url))
    wait_until(lambda: held("198.51.100.7") == 1)
    released_before = len(RUNS.stop_release_s)
    for client in hostile:
        client.predict(api_name="/stop")
    wait_until(lambda: held("203.0.113.66") == 0, timeout=5)
    released = list(RUNS.stop_release_s)[released_before:]
    assert len(released) == 3 and max(released) < 1.0, released  # each slot free within a second of its Stop
    for job in jobs:
        if job not in refused:
            assert "Stopped" in job.result(timeout=5)[1]
    assert held("198.51.100.7") == 1
    other.predict(api_name="/stop")
    assert "Stopped" in other_job.result(timeout=5)[1]


@pytest.mark.parametrize("endpoint", [{"mode": "silent"}], indirect=True)
def test_hostile_starting_and_stopping_runs_in_a_loop_costs_no_drawing(endpoint, monkeypatch):
    """Drawing a dialogue's chat and charts costs ~0.25 s of CPU: a visitor who starts and stops
    runs in a loop made the server draw twice a cycle, starving everyone's model turns (the
    soak's waits for the model were 5x longer). A run that changes nothing draws nothing."""
    from usersim_ui.app import handlers
    from usersim_ui.app.form import Form
    from usersim_ui.core.dialogue import Dialogue, Turn

    session = "hostile-drawing"
    handlers.RUNS.forget(session)
    shown = Dialogue(intent=INTENT, turns=(Turn("user", USER_TEXT),))  # what the page shows (its state)
    drawn: list[int] = []
    real = handlers.render
    monkeypatch.setattr(handlers, "render", lambda *a, **k: drawn.append(1) or real(*a, **k))
    settings, backend = args(**via(endpoint.url))
    try:
        for _cycle in range(3):
            run = handlers.run_turns(shown, INTENT, Form.parse(settings, backend), session, "assistant", 1)
            assert "Writing assistant turn" in next(run)[2]
            handlers.RUNS.stop(session)
            assert "Stopped" in list(run)[-1][2]
    finally:
        handlers.RUNS.forget(session)
    assert drawn == []


def test_hostile_an_action_reported_as_failed_never_applies_later():
    """Reset answered "did not stop" and applied seven minutes later, wiping the dialogue."""
    from usersim_ui.app.run_control import RunControl, RunRefused
    from usersim_ui.core.dialogue import Dialogue, Turn

    runs = RunControl()
    made = Dialogue(intent="x", turns=(Turn("user", "a b c"),))
    result: dict[str, Dialogue] = {}

    def stubborn_run():  # a run that takes 0.6 s to notice Stop
        with runs.start("s") as run:
            run.stop.wait()
            time.sleep(0.6)
            result["final"] = runs.finish(run, made)
    thread = threading.Thread(target=stubborn_run)
    thread.start()
    time.sleep(0.1)
    with pytest.raises(RunRefused, match="did not stop within 0.2 s"):
        runs.cancel_then("s", lambda d: Dialogue(intent="wiped"), timeout_s=0.2)
    thread.join(5)
    assert result["final"] is made and result["final"].turns  # the Reset did not apply afterwards


# ---- item 3: typed work is never confirmed and then lost ---------------------------------------

def bubbles(chat: list[dict]) -> int:
    """The turns a chat output shows (each turn's badge is a separate, titled message)."""
    return sum(1 for m in chat if not (m.get("metadata") or {}).get("title"))


def confirmed(outcome) -> bool:
    """Whether the action was shown to the researcher as done (a refusal raises an error; before
    the change it came back as unchanged outputs)."""
    status, outputs = outcome
    return status == "ok" and isinstance(outputs[0], list)


def race(first, second):
    """Start two calls at the same moment; each result or the exception it raised."""
    barrier = threading.Barrier(2)
    out: list = [None, None]

    def go(i, fn):
        barrier.wait()
        try:
            out[i] = ("ok", fn())
        except AppError as exc:
            out[i] = ("refused", str(exc))
    threads = [threading.Thread(target=go, args=(i, fn)) for i, fn in enumerate((first, second))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_hostile_send_edit_and_undo_racing_a_run_are_never_confirmed_then_lost(app_url, tmp_path):
    fast = LoopbackOpenAI("trickle", delay_s=0.0, words=3)
    try:
        client = visitor(app_url)
        settings, _ = args()
        lost: list[str] = []
        for round_ in range(6):
            # Send: the researcher types the assistant's reply as a run for it starts
            load(client, tmp_path, ("user", USER_TEXT))
            typed = f"typed reply {round_}"
            _run, send = race(lambda: call(client, "/next_assistant_turn", **via(fast.url)),
                             lambda typed=typed: client.predict(INTENT, typed, *settings, api_name="/send_reply"))
            if confirmed(send) and typed not in texts(dialogue_of(client)):
                lost.append(f"send {round_}")
            # Edit: turn 1 is edited as a Regenerate of turn 2 starts
            load(client, tmp_path, ("user", USER_TEXT), ("assistant", "An old reply."))
            edited = f"edited question {round_}"
            _run, edit = race(lambda: call(client, "/regenerate", **via(fast.url)),
                             lambda edited=edited: client.predict(1, edited, api_name="/edit_turn"))
            if confirmed(edit) and texts(dialogue_of(client))[0] != edited:
                lost.append(f"edit {round_}")
            # Undo: the last user turn is undone as a run for its reply starts
            load(client, tmp_path, ("user", USER_TEXT), ("assistant", "An old reply."), ("user", "undo me"))
            _run, undo = race(lambda: call(client, "/next_assistant_turn", **via(fast.url)),
                             lambda: client.predict(api_name="/undo"))
            # an undo applies before the run (which is then refused) or after it; either way the
            # dialogue it showed is the one that stays
            if confirmed(undo) and len(texts(dialogue_of(client))) != bubbles(undo[1][0]):
                lost.append(f"undo {round_}")
        assert lost == []
    finally:
        fast.close()


def test_hostile_a_stop_sent_just_after_a_run_request_stops_it(app_url, tmp_path):
    slow = LoopbackOpenAI("trickle", delay_s=0.1, words=6)  # a 0.6 s reply, if it is not stopped
    try:
        client = visitor(app_url)
        made: list[int] = []
        for round_ in range(6):
            load(client, tmp_path, ("user", USER_TEXT))
            job = submit(client, "/next_assistant_turn", **via(slow.url))
            time.sleep(random.uniform(0, 0.03))
            client.predict(api_name="/stop")
            job.result(timeout=10)
            if len(texts(dialogue_of(client))) != 1:
                made.append(round_)
        assert made == []  # no turn was made after its Stop
    finally:
        slow.close()


# ---- item 6: a reply has a size cap --------------------------------------------------------------

def warm_up_openai_client() -> None:
    """One ordinary reply first, so that the openai client's lazy imports are not counted."""
    from usersim_ui.assistants.openai import OpenAIAssistant

    quick = LoopbackOpenAI("trickle", delay_s=0.0, words=2)
    try:
        OpenAIAssistant(quick.url, "loopback").reply([{"role": "user", "content": "hi"}])
    finally:
        quick.close()


@pytest.mark.parametrize("endpoint", [{"mode": "huge"}], indirect=True)
def test_hostile_a_10_mb_reply_is_cut_at_the_turn_limit_without_being_buffered(endpoint):
    from usersim_ui.assistants.openai import OpenAIAssistant
    from usersim_ui.core.limits import MAX_TURN_CHARS

    warm_up_openai_client()
    tracemalloc.start()
    try:
        reply = OpenAIAssistant(endpoint.url, "hostile", timeout_s=10).reply([{"role": "user", "content": "hi"}])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert getattr(reply, "truncated", False) and len(reply.text) == MAX_TURN_CHARS
    assert peak < 3 * 2**20, f"{peak / 2**20:.1f} MB held while reading"  # the 10 MB were never buffered
    wait_until(lambda: endpoint.closed_at, timeout=5)  # the read stopped and the connection was closed


@pytest.mark.parametrize("endpoint", [{"mode": "giant"}], indirect=True)
def test_hostile_a_10_mb_single_chunk_is_refused_after_the_byte_cap(endpoint):
    from usersim_ui.assistants.openai import OpenAIAssistant
    from usersim_ui.core.errors import BackendError

    warm_up_openai_client()
    tracemalloc.start()
    try:
        with pytest.raises(BackendError, match=r"hostile @ .* sent more than 2 MB without a usable reply"):
            OpenAIAssistant(endpoint.url, "hostile", timeout_s=10).reply([{"role": "user", "content": "hi"}])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 6 * 2**20  # read up to the 2 MB cap, with the SSE decoder's copies


@pytest.mark.parametrize("endpoint", [{"mode": "huge", "size": 300_000}], indirect=True)
def test_hostile_a_cut_reply_is_marked_and_its_export_imports_again(app_url, endpoint, tmp_path):
    from usersim_ui.core.limits import MAX_TURN_CHARS

    client = visitor(app_url)
    load(client, tmp_path, ("user", USER_TEXT))
    outputs = call(client, "/next_assistant_turn", **via(endpoint.url))
    assert "cut at" in json.dumps(outputs[0])  # the badge says the turn was cut
    record = dialogue_of(client)
    assert len(record["messages"][1]["content"]) == MAX_TURN_CHARS and record["turns"][1]["truncated"] is True
    exported = client.predict(api_name="/export_jsonl")
    again = visitor(app_url)
    again.predict(gradio_client.handle_file(exported), api_name="/import_jsonl")  # not refused
    assert dialogue_of(again) == record


# ---- item 9: End during the first turn of an Auto-run -------------------------------------------

def test_hostile_end_during_the_first_turn_of_an_auto_run_ends_the_run(app_url):
    from usersim_ui.app.handlers import RUNS

    client = visitor(app_url)
    with RUNS.start("holds-the-model") as other, RUNS.model_slot(other):  # the first turn waits for the model
        job = submit(client, "/auto_run", max_turns=2)
        wait_until(lambda: session_in_flight(client))
        time.sleep(0.3)
        out = client.predict(api_name="/end_dialogue")  # not refused: there is a run to end
        assert out[1] == START_TEXT
        job.result(timeout=10)
    assert not session_in_flight(client)
    time.sleep(0.5)
    assert dialogue_of(client) is None  # the run did not go on to the turn cap


def test_hostile_end_with_no_run_and_no_dialogue_is_refused_with_its_reason(app_url):
    with pytest.raises(AppError, match="There is no dialogue to end yet"):
        visitor(app_url).predict(api_name="/end_dialogue")


# ---- item 10: Stop during a long prompt read-in -------------------------------------------------

def test_hostile_stop_ends_a_long_prompt_read_in_within_a_second(smollm2):
    """An 8,000-character turn's read-in is one forward pass (37 s through SmolLM2 on this
    shared CPU, over a second per layer): Stop used to wait for all of it and the first token."""
    from usersim_ui.core.errors import GenerationCancelled
    from usersim_ui.inference.generation import sample

    model, tok = smollm2.model, smollm2.tokenizer
    prompt = tok.encode("Tell me about basil. " * 380)  # ~8,000 characters, 1,900 tokens
    layers = model.model.layers
    entered: list[int] = []
    stop = threading.Event()
    stopped_at: list[float] = []
    tokens: list[int] = []

    def spy(index):
        def hook(_module, _args):
            entered.append(index)
            if index == 2:  # Stop arrives while the prompt is being read in
                stopped_at.append(time.perf_counter())
                stop.set()
        return hook
    handles = [layer.register_forward_pre_hook(spy(i)) for i, layer in enumerate(layers)]
    try:
        with pytest.raises(GenerationCancelled):
            sample(model, prompt, stop_ids=[tok.eos_token_id], temperature=0.0, top_p=1.0, max_new_tokens=8, seed=0,
                   stop_event=stop, on_step=lambda ids: tokens.append(1))
        took = time.perf_counter() - stopped_at[0]
    finally:
        for handle in handles:
            handle.remove()
    assert entered == [0, 1, 2] and tokens == [], (entered, tokens)  # stopped in layer 3 of 30, no token made
    assert took < 1.0
    stop.clear()  # and from another thread, at any moment of the read-in
    started = time.perf_counter()
    threading.Timer(0.4, stop.set).start()
    with pytest.raises(GenerationCancelled):
        sample(model, prompt, stop_ids=[tok.eos_token_id], temperature=0.0, top_p=1.0, max_new_tokens=8, seed=0,
               stop_event=stop)
    assert time.perf_counter() - started - 0.4 < 1.0
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == 0  # nothing left on the shared model


def test_hostile_stop_cuts_the_local_assistants_long_read_in_and_frees_the_model(app_url, tmp_path):
    """The same through the app: a run whose local assistant reads in an 8,000-character turn
    (the model turn streams through the ZeroGPU function) stops within a second of Stop and
    gives the shared model back."""
    from usersim_ui.app.handlers import RUNS

    client = visitor(app_url)
    load(client, tmp_path, ("user", "Tell me about basil. " * 380))
    job = submit(client, "/next_assistant_turn", a_max_tokens=16)
    wait_until(lambda: session_in_flight(client))
    time.sleep(1.5)  # well into the read-in
    stopped = time.monotonic()
    client.predict(api_name="/stop")
    outputs = job.result(timeout=60)
    assert time.monotonic() - stopped < 1.0 and "Stopped" in outputs[1]
    with RUNS.start("next-in-line") as run, RUNS.model_slot(run) as waited:  # the model is free
        assert waited < 0.5


def test_hostile_the_stoppable_read_in_changes_no_output(smollm2):
    import torch

    from usersim_ui.inference.generation import sample

    model, tok = smollm2.model, smollm2.tokenizer
    prompt = tok.encode("My basil is wilting. What should I do?")
    ours = sample(model, prompt, stop_ids=[tok.eos_token_id], temperature=0.0, top_p=1.0, max_new_tokens=6, seed=0)
    with torch.inference_mode():
        plain = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                               do_sample=False, max_new_tokens=6, eos_token_id=[tok.eos_token_id],
                               pad_token_id=tok.eos_token_id)
    expected = plain[0, len(prompt):].tolist()
    if tok.eos_token_id in expected:
        expected = expected[:expected.index(tok.eos_token_id)]
    assert ours.new_ids[0] == expected


# ---- item 2 (whole run): a run has a wall-clock limit ---------------------------------------------

def test_hostile_a_run_is_stopped_at_its_wall_clock_limit(app_url, monkeypatch, tmp_path):
    from usersim_ui.app.handlers import RUNS

    steady = LoopbackOpenAI("trickle", delay_s=0.2, words=40)  # an 8 s reply, chunk after chunk
    try:
        monkeypatch.setattr(RUNS, "max_run_s", 1.5, raising=False)
        client = visitor(app_url)
        load(client, tmp_path, ("user", USER_TEXT))
        started = time.monotonic()
        outputs = call(client, "/auto_run", **via(steady.url))
        assert time.monotonic() - started < 3.0
        assert "one run may last" in outputs[1] and texts(dialogue_of(client)) == [USER_TEXT]
    finally:
        steady.close()


# ---- item 12: clear messages, to the page, to API callers and in the host's log -----------------

def test_hostile_bad_input_gets_a_clear_message_not_an_opaque_error(app_url, tmp_path):
    client = visitor(app_url)
    load(client, tmp_path, ("user", USER_TEXT))
    before = dialogue_of(client)
    with pytest.raises(AppError, match=r"'Seed' must be a number; got 'abc'"):
        call(client, "/step", seed="abc")
    with pytest.raises(AppError, match=r"'Turn #' must be a number"):
        client.predict("first", "text", api_name="/edit_turn")
    nested = tmp_path / "nested.jsonl"
    nested.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(AppError, match="nests JSON arrays or objects too deeply"):
        client.predict(gradio_client.handle_file(str(nested)), api_name="/import_jsonl")
    with pytest.raises(AppError, match=r"There is no example 999: the gallery holds \d+"):
        client.predict(999, api_name="/load_example")
    assert dialogue_of(client) == before


def test_hostile_refusals_reach_api_callers_with_their_reason(app_url, tmp_path):
    client = visitor(app_url)
    with pytest.raises(AppError, match="There is no dialogue yet"):
        client.predict(api_name="/undo")
    load(client, tmp_path, ("user", USER_TEXT))
    with pytest.raises(AppError, match="It is the assistant's turn"):
        call(client, "/next_user_turn")
    assert texts(dialogue_of(client)) == [USER_TEXT]


def test_hostile_refusals_are_printed_in_the_hosts_log(monkeypatch, capfd):
    """Python drops INFO lines when nothing configured logging, as in ``python app.py``: the app
    builder now sets it up, so a refusal is one line on stderr."""
    from usersim_ui.app import handlers, studio

    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # as in a plain `python app.py`
    monkeypatch.setattr(handlers.log, "handlers", [])
    studio.build_app()
    with pytest.warns(UserWarning):
        handlers.refuse("Undo is not possible while a run is in flight: press Stop first.", "undo", "abcdef123456")
    err = capfd.readouterr().err
    assert "refused undo (session abcdef12): Undo is not possible while a run is in flight" in err


@pytest.mark.browser
def test_hostile_the_page_still_gets_a_warning_toast_not_an_error(app_url):
    """API callers get an error with the reason; the page (which sends x-gradio-user: app) keeps
    its yellow toast and every output as it was."""
    import shutil

    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("Debian's chromium is not installed")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--headless", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(app_url)
            assert not page.get_by_role("button", name="Step", exact=True).is_enabled()  # no intent yet
            page.locator("#intent textarea").fill(INTENT)
            page.get_by_label("Min words").fill("30")  # above the maximum (25): refused
            page.get_by_label("Min words").blur()
            page.get_by_role("button", name="Step", exact=True).click()
            toast = page.locator(".toast-body.warning", has_text="Minimum words (30) is above maximum words")
            toast.wait_for(timeout=30_000)
            assert page.locator(".toast-body.error").count() == 0
            assert "to start" in page.locator("#banner").inner_text()  # kept as it was
            # a number box out of its bounds is refused the same way, and the run buttons that the
            # click locked come back (an error raised in the box's preprocessing left them locked)
            page.get_by_label("Min words").fill("3")
            page.get_by_label("Min words").blur()
            page.get_by_role("button", name="Simulated user sampling").click()
            page.get_by_label("Seed").fill("-5")
            page.get_by_label("Seed").blur()
            page.get_by_role("button", name="Step", exact=True).click()
            page.locator(".toast-body.warning", has_text="'Seed' must be at least 0").wait_for(timeout=30_000)
            sync_api.expect(page.get_by_role("button", name="Step", exact=True)).to_be_enabled(timeout=10_000)
            sync_api.expect(page.get_by_role("button", name="Stop", exact=True)).to_be_disabled()
            assert page.locator(".toast-body.error").count() == 0
        finally:
            browser.close()
