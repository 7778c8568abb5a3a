"""The assistant on any OpenAI-compatible chat endpoint, streamed, with limits that hold on the
wall clock whatever the peer does.

A public Space talks to endpoints its visitors name, so the peer may trickle one byte a second,
accept the connection and say nothing, or send megabytes. The HTTP exchange therefore runs in
a worker thread while the caller watches the clock and the Stop event every ``POLL_S``: Stop,
the whole-reply deadline and the silence limit each end the reply within a poll, and cut the
connection (the socket is shut down, so the worker's blocked read returns at once). The reply's
text stops at ``MAX_TURN_CHARS`` (the turn is marked ``truncated``) and the bytes read at
``MAX_REPLY_BYTES``, so a huge reply is never buffered.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from usersim_ui.assistants.base import stopped, with_system
from usersim_ui.core.errors import BackendError, GenerationCancelled
from usersim_ui.core.limits import (
    BACKEND_DEADLINE_S,
    BACKEND_READ_TIMEOUT_S,
    MAX_TURN_CHARS,
)
from usersim_ui.core.protocols import AssistantReply, Draft, OnDraft

POLL_S = 0.05  # how often the caller looks at Stop and the clock while the endpoint is awaited
CONNECT_TIMEOUT_S = 10.0  # a TCP connect that takes longer is a dead endpoint
MAX_REPLY_BYTES = 2 * 2**20  # bytes read for one reply: far above MAX_TURN_CHARS of streamed chunks


def _limit(value: float | None, env: str, default: float) -> float:
    """An explicit limit, else the host's (``env``, README: Hosting in public), else the core's."""
    if value is not None:
        return value
    raw = os.environ.get(env, "").strip()
    return float(raw) if raw else default


class _TooBig(Exception):
    """The endpoint sent more than MAX_REPLY_BYTES."""


class _Wire:
    """One reply's connection as the watching thread sees it: progress, and a way to cut it."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes_read = 0
        self.chunks = 0
        self.last_chunk = time.monotonic()  # the last complete stream chunk (or the start)
        self.bytes_at_last_chunk = 0
        self.cut_reason: str | None = None
        self._stream: Any = None  # httpcore's network stream, once connected
        self._lock = threading.Lock()

    def trace(self, event: str, info: dict[str, Any]) -> None:
        """httpcore's trace hook: keep the connection's stream as soon as TCP is up."""
        if event == "connection.connect_tcp.complete":
            with self._lock:
                self._stream = info.get("return_value")
                cut = self.cut_reason is not None
            if cut:
                self._shutdown()

    def chunk(self) -> None:
        self.chunks += 1
        self.last_chunk, self.bytes_at_last_chunk = time.monotonic(), self.bytes_read

    def cut(self, reason: str) -> None:
        """End the exchange now: a read blocked in the worker returns at once."""
        with self._lock:
            self.cut_reason = self.cut_reason or reason
        self._shutdown()

    def _shutdown(self) -> None:
        with self._lock:
            stream = self._stream
        sock = stream.get_extra_info("socket") if stream is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed


@functools.lru_cache(maxsize=1)
def _tls() -> Any:
    """httpx's default TLS context, made once: making it loads the CA bundle, ~30 ms of CPU a
    reply otherwise, which a visitor starting and stopping runs in a loop would make us spend."""
    import httpx

    return httpx.create_ssl_context()


def _transport(wire: _Wire) -> Any:
    """An httpx transport that lets ``wire`` see the socket and counts (and caps) the bytes read."""
    import httpx

    class CountedStream(httpx.SyncByteStream):
        def __init__(self, inner: Any):
            self.inner = inner

        def __iter__(self) -> Iterator[bytes]:
            for part in self.inner:
                wire.bytes_read += len(part)
                if wire.bytes_read > wire.max_bytes:
                    raise _TooBig()
                yield part

        def close(self) -> None:
            self.inner.close()

    class Transport(httpx.HTTPTransport):
        def handle_request(self, request: Any) -> Any:
            request.extensions["trace"] = wire.trace
            response = super().handle_request(request)
            response.stream = CountedStream(response.stream)
            return response

    return Transport(verify=_tls())


@dataclass
class OpenAIAssistant:
    """Any OpenAI-compatible chat endpoint (OpenAI, vLLM, TGI, llama.cpp server, Ollama...).

    Streamed, so that Stop cuts a long reply short. ``timeout_s`` bounds the time without a
    complete chunk (default: ``USERSIM_BACKEND_SILENCE_S`` or 60 s), ``deadline_s`` the whole
    reply (``USERSIM_BACKEND_DEADLINE_S`` or 180 s), both on the wall clock.
    """

    base_url: str
    model: str
    api_key: str = field(default="not-needed", repr=False)  # never exported: not part of the dialogue
    system_prompt: str = "You are a helpful assistant."
    temperature: float = 0.7
    max_tokens: int = 256
    timeout_s: float | None = None
    deadline_s: float | None = None
    max_chars: int = MAX_TURN_CHARS
    max_bytes: int = MAX_REPLY_BYTES

    @property
    def name(self) -> str:
        return f"{self.model} @ {self.base_url}"

    def reply(self, messages: Sequence[dict[str, str]], stop_event: threading.Event | None = None,
              seed: int | None = None, on_draft: OnDraft | None = None) -> AssistantReply:
        if stopped(stop_event):
            raise GenerationCancelled("stopped")
        silence = _limit(self.timeout_s, "USERSIM_BACKEND_SILENCE_S", BACKEND_READ_TIMEOUT_S)
        deadline = _limit(self.deadline_s, "USERSIM_BACKEND_DEADLINE_S", BACKEND_DEADLINE_S)
        wire = _Wire(self.max_bytes)
        outcome: dict[str, Any] = {}
        done = threading.Event()

        def work() -> None:
            try:
                outcome["reply"] = self._exchange(messages, seed, on_draft, wire, silence)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller below
                outcome["error"] = exc
            finally:
                done.set()

        started = time.monotonic()
        threading.Thread(target=work, name="endpoint-reply", daemon=True).start()
        while not done.wait(POLL_S):
            now = time.monotonic()
            if stopped(stop_event):
                wire.cut("stopped")
                raise GenerationCancelled("stopped during the reply")
            if now - started > deadline:
                wire.cut("deadline")
                raise BackendError(f"{self.name} did not finish its reply within {deadline:g} s "
                                   f"({wire.chunks} chunks so far)")
            if now - wire.last_chunk > silence:
                wire.cut("silence")
                trickled = wire.bytes_read - wire.bytes_at_last_chunk
                if trickled:
                    raise BackendError(f"{self.name} sent {trickled} bytes but no complete chunk for {silence:g} s")
                raise BackendError(f"{self.name} sent nothing for {silence:g} s")
        if stopped(stop_event):
            raise GenerationCancelled("stopped during the reply")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["reply"]

    def _exchange(self, messages: Sequence[dict[str, str]], seed: int | None, on_draft: OnDraft | None,
                  wire: _Wire, silence: float) -> AssistantReply:
        """The HTTP exchange, in the worker thread: the reply, or the error to raise."""
        import httpx
        import openai

        started = time.perf_counter()
        parts: list[str] = []
        chars, truncated = 0, False
        usage_tokens: int | None = None
        timeout = httpx.Timeout(silence, connect=min(CONNECT_TIMEOUT_S, silence))
        http = httpx.Client(transport=_transport(wire), timeout=timeout, follow_redirects=False)
        try:
            client = openai.OpenAI(base_url=self.base_url, api_key=self.api_key or "not-needed", timeout=timeout,
                                   max_retries=0, http_client=http)
            stream = client.chat.completions.create(
                model=self.model, messages=with_system(self.system_prompt, messages), temperature=self.temperature,
                max_tokens=self.max_tokens, stream=True, stream_options={"include_usage": True},
                **({"seed": seed} if seed is not None else {}),
            )
            with stream:
                for chunk in stream:
                    wire.chunk()
                    if getattr(chunk, "usage", None) is not None and chunk.usage.completion_tokens is not None:
                        usage_tokens = int(chunk.usage.completion_tokens)
                    if chunk.choices and chunk.choices[0].delta.content:
                        text = chunk.choices[0].delta.content
                        if chars + len(text) > self.max_chars:  # the turn limit: keep what fits, read no more
                            parts.append(text[:self.max_chars - chars])
                            truncated = True
                            break
                        parts.append(text)
                        chars += len(text)
                        if on_draft is not None:  # the reply so far, as the page streams it
                            on_draft(Draft("assistant", "".join(parts), len(parts)))
        except _TooBig:
            if not parts:
                raise BackendError(f"{self.name} sent more than {self.max_bytes / 2**20:g} MB without a usable "
                                   "reply") from None
            truncated = True
        except (GenerationCancelled, BackendError):
            raise
        except Exception as exc:
            if wire.cut_reason is not None:  # the caller has already raised; this only ends the thread
                raise GenerationCancelled(wire.cut_reason) from exc
            if isinstance(exc, openai.APITimeoutError):
                raise BackendError(f"{self.name} sent nothing for {silence:g} s") from exc
            if isinstance(exc, openai.APIError):
                raise BackendError(f"{self.name} failed: {exc}") from exc
            # a body that is not an OpenAI stream: bad JSON, wrong shapes
            raise BackendError(f"{self.name} sent a malformed reply ({type(exc).__name__}: {exc})") from exc
        finally:
            http.close()
        text = "".join(parts).strip()
        if not text:
            raise BackendError(f"{self.name} sent an empty reply")
        # The server's own count where it gives one; else one token per streamed chunk (servers
        # stream one token a chunk; an estimate, not a tokenizer's count).
        tokens = usage_tokens if usage_tokens is not None and not truncated else len(parts)
        return AssistantReply(text, tokens, time.perf_counter() - started, self.name, truncated=truncated)
