"""The OpenAI-compatible backend against servers that fail: each failure is a BackendError
that names the endpoint, never an empty turn."""

from __future__ import annotations

import threading
import time

import pytest
from loopback_openai import LoopbackOpenAI

from usersim_ui.assistants.openai import OpenAIAssistant
from usersim_ui.core.errors import BackendError, GenerationCancelled

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def server(request):
    srv = LoopbackOpenAI(**getattr(request, "param", {}))
    yield srv
    srv.close()


@pytest.mark.parametrize("server", [{"mode": "trickle", "delay_s": 0.0, "words": 5}], indirect=True)
def test_a_reply_counts_tokens_from_the_servers_usage_and_sends_the_seed(server):
    reply = OpenAIAssistant(server.url, "loopback").reply(MESSAGES, seed=1234)
    assert reply.text == "w0 w1 w2 w3 w4" and reply.tokens == 10  # usage says 10; 5 chunks came
    assert server.requests[-1]["seed"] == 1234 and server.requests[-1]["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("server", [{"mode": "trickle", "delay_s": 0.3, "words": 50}], indirect=True)
def test_a_trickling_server_hits_the_overall_deadline(server):
    started = time.perf_counter()
    with pytest.raises(BackendError, match=r"loopback @ .* did not finish its reply within 1 s"):
        OpenAIAssistant(server.url, "loopback", timeout_s=5, deadline_s=1).reply(MESSAGES)
    assert time.perf_counter() - started < 6  # not the 15 s the reply would take


@pytest.mark.parametrize("server", [{"mode": "garbage"}], indirect=True)
def test_a_garbage_body_is_an_error_naming_the_backend(server):
    with pytest.raises(BackendError, match=r"loopback @ http://127\.0\.0\.1:\d+/v1 sent (a malformed|an empty) reply"):
        OpenAIAssistant(server.url, "loopback", timeout_s=5).reply(MESSAGES)


@pytest.mark.parametrize("server", [{"mode": "empty"}], indirect=True)
def test_an_empty_reply_is_an_error_not_an_empty_turn(server):
    with pytest.raises(BackendError, match="sent an empty reply"):
        OpenAIAssistant(server.url, "loopback", timeout_s=5).reply(MESSAGES)


@pytest.mark.parametrize("server", [{"mode": "trickle", "delay_s": 0.2, "words": 50}], indirect=True)
def test_stop_cuts_a_streamed_reply_short(server):
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    started = time.perf_counter()
    with pytest.raises(GenerationCancelled):
        OpenAIAssistant(server.url, "loopback", timeout_s=5).reply(MESSAGES, stop)
    assert time.perf_counter() - started < 4  # not the 10 s the reply would take


def test_a_local_assistant_refuses_a_prompt_longer_than_its_context_before_any_compute(smollm2):
    from usersim_ui.assistants.local import TransformersAssistant
    from usersim_ui.core.errors import ContextTooLong

    context = smollm2.model.config.max_position_embeddings
    assistant = TransformersAssistant(smollm2, max_new_tokens=256)
    long_turn = [{"role": "user", "content": "coffee " * (context - 100)}]
    started = time.perf_counter()
    with pytest.raises(ContextTooLong, match=rf"whose context holds {context:,} including the 256"):
        assistant.reply(long_turn)
    assert time.perf_counter() - started < 5  # refused from the token count, no forward pass
