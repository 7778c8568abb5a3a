"""The OpenAI-compatible backend against a real server: ``transformers serve`` hosting the
offline SmolLM2 on loopback, plus a server that never answers and a port nobody listens on."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from usersim_ui.assistants.openai import OpenAIAssistant
from usersim_ui.assistants.registry import BackendSpec, make_backend
from usersim_ui.core.dialogue import Dialogue, Turn
from usersim_ui.core.errors import BackendError, GenerationCancelled
from usersim_ui.core.transitions import RunSettings, assistant_turn
from usersim_ui.inference.model_loading import smollm2_cache_path

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served_smollm2(smollm2):
    cli = shutil.which("transformers", path=str(Path(sys.executable).parent)) or shutil.which("transformers")
    if cli is None:
        pytest.skip("the transformers CLI is not installed")
    port = free_port()
    model = str(smollm2_cache_path())
    proc = subprocess.Popen([cli, "serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", model],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail("transformers serve exited")
                time.sleep(0.5)
        else:
            pytest.fail("transformers serve did not come up in 120 s")
        yield f"{url}/v1", model
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_reply_from_a_real_openai_compatible_server(served_smollm2):
    base_url, model = served_smollm2
    backend = make_backend(BackendSpec(kind="openai", base_url=base_url, model=model, max_tokens=12,
                                       system_prompt="Answer in one short sentence."))
    dialogue = Dialogue(intent="x", turns=(Turn(role="user", text=MESSAGES[0]["content"]),))
    drafts = []
    out = assistant_turn(dialogue, backend, RunSettings(), on_draft=drafts.append)
    reply = out.turns[-1]
    assert reply.role == "assistant" and reply.text and reply.model_id == f"{model} @ {base_url}"
    assert 0 < reply.tokens <= 12 and reply.latency_s > 0
    # the reply streamed: each draft extends the one before, the last is the reply
    assert len(drafts) >= 2 and all(d.role == "assistant" for d in drafts)
    assert all(b.text.startswith(a.text) and len(b.text) > len(a.text) for a, b in zip(drafts, drafts[1:]))
    assert drafts[-1].text.strip() == reply.text


def test_stop_during_a_streamed_reply(served_smollm2):
    base_url, model = served_smollm2
    backend = OpenAIAssistant(base_url=base_url, model=model, max_tokens=200)
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    started = time.perf_counter()
    with pytest.raises(GenerationCancelled):
        backend.reply([{"role": "user", "content": "Write a long story about a dragon."}], stop)
    assert time.perf_counter() - started < 15


def test_server_that_never_answers_times_out_cleanly():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        backend = OpenAIAssistant(base_url=f"http://127.0.0.1:{port}/v1", model="m", timeout_s=1.0)
        started = time.perf_counter()
        with pytest.raises(BackendError, match=r"m @ http://127.0.0.1:\d+/v1 sent nothing for 1 s"):
            backend.reply(MESSAGES)
        assert time.perf_counter() - started < 10


def test_server_down_is_a_backend_error():
    backend = OpenAIAssistant(base_url=f"http://127.0.0.1:{free_port()}/v1", model="m", timeout_s=2.0)
    with pytest.raises(BackendError, match="failed"):
        backend.reply(MESSAGES)
