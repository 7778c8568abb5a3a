"""Assistant backends: whatever answers the simulated user.

Each takes the dialogue's messages (user/assistant, OpenAI shape) and returns one reply; the
engine turns it into a :class:`~usersim_ui.dialogue.Turn`. A failing backend raises
:class:`BackendError` naming the backend, which the UI shows without touching the dialogue;
an empty or malformed reply is such a failure, never an empty turn.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from .chat_ids import chat_stop_ids, chat_template_ids
from .generation import GenerationCancelled, sample
from .limits import BACKEND_DEADLINE_S, BACKEND_READ_TIMEOUT_S, check_context
from .model_loading import LoadedModel


class BackendError(RuntimeError):
    """The assistant could not answer (server down, timeout, script exhausted...)."""


@dataclass(frozen=True)
class AssistantReply:
    text: str
    tokens: int
    latency_s: float
    model_id: str


def with_system(system_prompt: str, messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """The assistant's view: its own system prompt (if any) before the dialogue's messages."""
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + list(messages)


class AssistantBackend(Protocol):
    name: str

    def reply(self, messages: Sequence[dict[str, str]], stop_event: threading.Event | None = None,
              seed: int | None = None, on_token: Callable[[], None] | None = None) -> AssistantReply: ...


def _stopped(stop_event: threading.Event | None) -> bool:
    return stop_event is not None and stop_event.is_set()


@dataclass
class TransformersAssistant:
    """A local chat model through its own chat template (SmolLM2-135M-Instruct offline)."""

    loaded: LoadedModel
    system_prompt: str = "You are a helpful assistant."
    temperature: float = 0.7
    max_new_tokens: int = 128
    top_p: float = 0.95
    seed: int = 0  # used when the caller gives no per-turn seed

    @property
    def name(self) -> str:
        return self.loaded.model_id

    @property
    def context(self) -> int | None:
        return getattr(self.loaded.model.config, "max_position_embeddings", None)

    def reply(self, messages: Sequence[dict[str, str]], stop_event: threading.Event | None = None,
              seed: int | None = None, on_token: Callable[[], None] | None = None) -> AssistantReply:
        prompt = chat_template_ids(self.loaded.tokenizer, with_system(self.system_prompt, messages),
                                   add_generation_prompt=True)
        check_context(len(prompt), self.max_new_tokens, self.context, f"the local assistant {self.name}")
        result = sample(self.loaded.model, prompt, stop_ids=chat_stop_ids(self.loaded.tokenizer),
                        temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens,
                        seed=self.seed if seed is None else seed, stop_event=stop_event, on_token=on_token)
        new_ids = result.new_ids[0]
        text = self.loaded.tokenizer.decode(new_ids, skip_special_tokens=True).strip()
        if not text:
            raise BackendError(f"{self.name} wrote an empty reply ({len(new_ids)} tokens); Regenerate or raise "
                               "the assistant temperature.")
        return AssistantReply(text, len(new_ids), result.latency_s, self.name)


@dataclass
class ScriptedAssistant:
    """Replays fixed replies in order: the same assistant for every run of an experiment."""

    replies: Sequence[str]
    name: str = "scripted"

    def reply(self, messages: Sequence[dict[str, str]], stop_event: threading.Event | None = None,
              seed: int | None = None, on_token: Callable[[], None] | None = None) -> AssistantReply:
        if _stopped(stop_event):
            raise GenerationCancelled("stopped")
        index = sum(m["role"] == "assistant" for m in messages)
        if index >= len(self.replies):
            raise BackendError(f"the script has {len(self.replies)} replies; reply {index + 1} was asked for")
        text = self.replies[index]
        return AssistantReply(text, len(text.split()), 0.0, self.name)


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

        if _stopped(stop_event):
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
                    if _stopped(stop_event):
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
