"""The model turn through a real forked worker, the way ZeroGPU runs it: ``spaces``' own
generator wrapper (fork, pickled arguments and yields, its stop protocol), with only the
calls to the ZeroGPU scheduler and its CUDA hand-over replaced, since neither exists off
Hugging Face."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from types import SimpleNamespace

import gradio as gr
import pytest

from usersim_ui.app import zerogpu
from usersim_ui.assistants.registry import BackendSpec
from usersim_ui.core import transitions
from usersim_ui.core.dialogue import Dialogue, GuardrailSettings, SamplingSettings
from usersim_ui.core.errors import GenerationCancelled
from usersim_ui.core.protocols import Draft


def _import_wrappers():
    """spaces.zero.wrappers, on a CPU-only torch too: its CUDA hand-over module
    (spaces.zero.torch) reads torch.version.cuda at import; the wrapper itself only calls its
    ``enter_mode`` on the main side, a no-op without CUDA."""
    import importlib
    import sys
    import types

    import torch

    if torch.version.cuda is None and "spaces.zero.torch" not in sys.modules:
        sys.modules["spaces.zero.torch"] = types.SimpleNamespace(enter_mode=lambda: None)
    return importlib.import_module("spaces.zero.wrappers")


wrappers = _import_wrappers()
INTENT = "You want a recipe for a chocolate cake."
OFF = GuardrailSettings(first_token_filter=False, no_early_ending=False, length_thresholds=False,
                        verbatim_repetition=False)


@pytest.fixture
def forked_sim(monkeypatch, llama_tok):
    """``zerogpu.model_turn_stream`` wrapped by spaces' ZeroGPU generator wrapper, on the tiny UserLM."""
    from conftest import userlm_sim

    sim = userlm_sim(llama_tok)
    monkeypatch.setattr(zerogpu, "_simulator", sim)  # set before the fork: the worker inherits it, as on a Space
    schedule = SimpleNamespace(allowToken="t", nvidiaIndex=0, nvidiaUUID="cpu", idle=True)
    monkeypatch.setattr(wrappers.client, "schedule", lambda **kwargs: schedule)
    monkeypatch.setattr(wrappers.client, "release", lambda *args, **kwargs: None)
    monkeypatch.setattr(wrappers.client, "get_duration_seconds", lambda *args: 60)
    monkeypatch.setattr(wrappers, "worker_init", lambda **kwargs: None)  # no CUDA to hand over here
    wrapped = wrappers.generator_function_wrapper(zerogpu.model_turn_stream, zerogpu.gpu_seconds, None)
    monkeypatch.setattr(zerogpu, "model_turn_stream", wrapped)
    return sim


def long_turn_settings() -> transitions.RunSettings:
    # no stop token can come: the turn runs to max_new_tokens unless stopped
    return transitions.RunSettings(guardrails=OFF, sampling=SamplingSettings(max_new_tokens=3000, seed=1),
                              context_budget=4096)


def test_a_turn_made_in_the_forked_worker_is_the_turn_made_in_process(forked_sim, monkeypatch):
    settings = replace(long_turn_settings(), sampling=SamplingSettings(max_new_tokens=8, seed=3))
    dialogue = Dialogue(intent=INTENT)
    forked = zerogpu.run_model_turn(dialogue, settings, BackendSpec(), 42, threading.Event())
    local = transitions.user_turn(dialogue, forked_sim, settings, seed=42)
    assert forked.turns[0].text == local.turns[0].text and forked.turns[0].seed == 42
    assert forked.turns[0].p_end == pytest.approx(local.turns[0].p_end, rel=1e-6)


def test_the_forked_worker_streams_the_turn_as_it_is_written(forked_sim):
    """Drafts cross the process boundary while the turn is made: the text grows token by token,
    each draft is the start of the text the turn keeps (decoded as it will be). The newest draft
    goes every 20 ms, so the last one may be a few tokens short: the turn itself follows it."""
    settings = replace(long_turn_settings(), sampling=SamplingSettings(max_new_tokens=24, seed=5))
    drafts: list[Draft] = []
    made = zerogpu.run_model_turn(Dialogue(intent=INTENT), settings, BackendSpec(), 11, threading.Event(), drafts.append)
    assert len(drafts) >= 3 and all(d.role == "user" and d.sample == 1 for d in drafts)
    counts = [d.tokens for d in drafts if d.tokens]
    assert counts == sorted(counts) and len(set(counts)) >= 3  # growing, not one final burst
    assert made.turns[0].text != "" and all(made.turns[0].text.startswith(d.text) for d in drafts)


def test_stop_ends_a_turn_in_the_forked_worker_within_a_token(forked_sim):
    ticks: list[float] = []
    stop = threading.Event()
    stream = zerogpu.model_turn_stream(Dialogue(intent=INTENT), long_turn_settings(), BackendSpec(), 7)
    started = time.perf_counter()
    made = 0
    for item in stream:  # what run_model_turn does, with the token counts kept to check the bound
        if not isinstance(item, Draft):
            continue  # a heartbeat between drafts
        ticks.append(time.perf_counter())
        made = item.tokens
        if made >= 20 and not stop.is_set():
            stop.set()
            stopped_at = time.perf_counter()
            stream.close()
            break
    closed = time.perf_counter()
    assert made >= 20
    per_token = (ticks[-1] - ticks[0]) / max(1, len(ticks) - 1)
    # closing returns once the worker has wound down: one more token at most, plus the round trip
    assert closed - stopped_at < max(2.0, 5 * per_token), (closed - stopped_at, per_token)
    assert closed - started < 60  # 3000 tokens would take far longer than this
    # the worker is reused for the next turn, with its own stop event cleared
    again = zerogpu.run_model_turn(Dialogue(intent=INTENT), replace(long_turn_settings(), sampling=SamplingSettings(
        max_new_tokens=4, seed=1)), BackendSpec(), 8, threading.Event())
    assert len(again.turns) == 1


def test_run_model_turn_raises_cancelled_when_stop_is_set_midway(forked_sim):
    stop = threading.Event()
    threading.Timer(1.0, stop.set).start()
    started = time.perf_counter()
    with pytest.raises(GenerationCancelled):
        zerogpu.run_model_turn(Dialogue(intent=INTENT), long_turn_settings(), BackendSpec(), 7, stop)
    assert time.perf_counter() - started < 10


def test_a_backend_error_arrives_from_the_worker_with_its_message(forked_sim):
    dialogue = transitions.researcher_turn(Dialogue(intent=INTENT), "Hello there, I need help", long_turn_settings())
    spec = BackendSpec(kind="local", model="/nonexistent/assistant-model")
    with pytest.raises(gr.Error) as caught:
        zerogpu.run_model_turn(dialogue, long_turn_settings(), spec, 1, threading.Event())
    assert "Could not load the local assistant model" in caught.value.message
    assert "/nonexistent" not in caught.value.message  # the host's paths stay in the host's log
    assert caught.value.title == "Assistant failed"


def test_a_batch_from_the_tab_makes_its_user_turns_in_the_forked_worker(forked_sim, monkeypatch, tmp_path):
    """On a Space CUDA exists only inside @spaces.GPU: a batch's model turns must go there too."""
    import json
    import os
    from pathlib import Path

    from loopback_openai import LoopbackOpenAI

    from usersim_ui.app import batch_tab

    pids = []
    forked = zerogpu.model_turn_stream  # spaces' wrapper: its generator runs in the worker, we see what it yields

    def watched(dialogue, settings, spec, seed):
        for item in forked(dialogue, settings, spec, seed):
            if isinstance(item, Dialogue):
                pids.append(item.turns[-1].role)
            yield item

    monkeypatch.setattr(zerogpu, "model_turn_stream", watched)
    monkeypatch.setattr(batch_tab, "output_dir", lambda: tmp_path)
    monkeypatch.setattr(zerogpu, "_make_turn", _pid_recording(zerogpu._make_turn, tmp_path / "pids"))
    intents = tmp_path / "one.txt"
    intents.write_text("You want a cheap flight to Lisbon.\n")
    server = LoopbackOpenAI("trickle", delay_s=0.0, words=4)
    try:
        status, *_, files = batch_tab.run_batch_ui(str(intents), 2, 2, "openai", server.url, "loopback", [], 6,
                                                   progress=lambda *a, **k: None)
    finally:
        server.close()
    records = [json.loads(line) for line in Path(files[0]).read_text().splitlines()]
    user_turns = sum(m["role"] == "user" for r in records for m in r["messages"])
    assert status.startswith("2 dialogues") and user_turns >= 2 and pids == ["user"] * user_turns
    worker_pid = {int(p) for p in (tmp_path / "pids").read_text().split()}
    assert worker_pid and os.getpid() not in worker_pid  # made in the fork, not in this process


def _pid_recording(make_turn, path):
    """_make_turn, noting the pid of the process it runs in (set before the fork: the worker inherits it)."""
    import os

    def wrapped(*args, **kwargs):
        with open(path, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        return make_turn(*args, **kwargs)
    return wrapped
