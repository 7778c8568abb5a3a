"""The assistant on any OpenAI-compatible chat endpoint, streamed, with wall-clock limits."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from usersim_ui.assistants.base import stopped, with_system
from usersim_ui.core.errors import BackendError, GenerationCancelled
from usersim_ui.core.limits import (
    BACKEND_DEADLINE_S,
    BACKEND_READ_TIMEOUT_S,
)
from usersim_ui.core.protocols import AssistantReply


@dataclass
class OpenAIAssistant:
    """Any OpenAI-compatible chat endpoint (OpenAI, vLLM, TGI, llama.cpp server, Ollama...).

    Streamed, so that Stop cuts a long reply short; ``timeout_s`` bounds the silence between
    two chunks and ``deadline_s`` the whole reply, so a server that trickles tokens cannot
    hold a run forever.
    """

    base_url: str
    model: str
    api_key: str = field(default="not-needed", repr=False)  # never exported: not part of the dialogue
    system_prompt: str = "You are a helpful assistant."
    temperature: float = 0.7
    max_tokens: int = 256
    timeout_s: float = BACKEND_READ_TIMEOUT_S
    deadline_s: float = BACKEND_DEADLINE_S

    @property
    def name(self) -> str:
        return f"{self.model} @ {self.base_url}"

    def _client(self) -> Any:
        from openai import OpenAI

        return OpenAI(base_url=self.base_url, api_key=self.api_key or "not-needed", timeout=self.timeout_s, max_retries=0)

    def reply(self, messages: Sequence[dict[str, str]], stop_event: threading.Event | None = None,
              seed: int | None = None, on_token: Callable[[], None] | None = None) -> AssistantReply:
        import openai

        if stopped(stop_event):
            raise GenerationCancelled("stopped")
        started = time.perf_counter()
        parts: list[str] = []
        usage_tokens: int | None = None
        try:
            stream = self._client().chat.completions.create(
                model=self.model, messages=with_system(self.system_prompt, messages), temperature=self.temperature,
                max_tokens=self.max_tokens, stream=True, stream_options={"include_usage": True},
                **({"seed": seed} if seed is not None else {}),
            )
            with stream:
                for chunk in stream:
                    if stopped(stop_event):
                        raise GenerationCancelled("stopped during the reply")
                    if time.perf_counter() - started > self.deadline_s:
                        raise BackendError(f"{self.name} did not finish its reply within {self.deadline_s:g} s "
                                           f"({len(parts)} chunks so far)")
                    if getattr(chunk, "usage", None) is not None and chunk.usage.completion_tokens is not None:
                        usage_tokens = int(chunk.usage.completion_tokens)
                    if chunk.choices and chunk.choices[0].delta.content:
                        parts.append(chunk.choices[0].delta.content)
                        if on_token is not None:
                            on_token()
        except (GenerationCancelled, BackendError):
            raise
        except openai.APITimeoutError as exc:
            raise BackendError(f"{self.name} sent nothing for {self.timeout_s:g} s") from exc
        except openai.APIError as exc:
            raise BackendError(f"{self.name} failed: {exc}") from exc
        except Exception as exc:  # a body that is not an OpenAI stream: bad JSON, wrong shapes
            raise BackendError(f"{self.name} sent a malformed reply ({type(exc).__name__}: {exc})") from exc
        text = "".join(parts).strip()
        if not text:
            raise BackendError(f"{self.name} sent an empty reply")
        # The server's own count where it gives one; else one token per streamed chunk (servers
        # stream one token a chunk; an estimate, not a tokenizer's count).
        tokens = usage_tokens if usage_tokens is not None else len(parts)
        return AssistantReply(text, tokens, time.perf_counter() - started, self.name)
