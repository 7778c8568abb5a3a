"""Assistant backends: whatever answers the simulated user.

Each takes the dialogue's messages (user/assistant, OpenAI shape) and returns one reply; the
engine turns it into a :class:`~usersim_ui.dialogue.Turn`. A failing backend raises
:class:`BackendError`, which the UI shows without touching the dialogue.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from .chat_ids import chat_stop_ids, chat_template_ids
from .generation import GenerationCancelled, sample
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

    def reply(self, messages: Sequence[dict[str, str]], stop_event: threading.Event | None = None) -> AssistantReply: ...


@dataclass
class TransformersAssistant:
    """A local chat model through its own chat template (SmolLM2-135M-Instruct offline)."""

    loaded: LoadedModel
    system_prompt: str = "You are a helpful assistant."
    temperature: float = 0.7
    max_new_tokens: int = 128
    top_p: float = 0.95
    seed: int = 0

    @property
    def name(self) -> str:
        return self.loaded.model_id

    def reply(self, messages: Sequence[dict[str, str]], stop_event: threading.Event | None = None) -> AssistantReply:
        prompt = chat_template_ids(self.loaded.tokenizer, with_system(self.system_prompt, messages),
                                   add_generation_prompt=True)
        result = sample(self.loaded.model, prompt, stop_ids=chat_stop_ids(self.loaded.tokenizer), temperature=self.temperature,
                        top_p=self.top_p, max_new_tokens=self.max_new_tokens,
                        seed=self.seed * 1_000_003 + len(messages), stop_event=stop_event)
        new_ids = result.new_ids[0]
        text = self.loaded.tokenizer.decode(new_ids, skip_special_tokens=True).strip()
        return AssistantReply(text, len(new_ids), result.latency_s, self.name)


@dataclass
class ScriptedAssistant:
    """Replays fixed replies in order: the same assistant for every run of an experiment."""

    replies: Sequence[str]
    name: str = "scripted"

    def reply(self, messages: Sequence[dict[str, str]], stop_event: threading.Event | None = None) -> AssistantReply:
        if stop_event is not None and stop_event.is_set():
            raise GenerationCancelled("stopped")
        index = sum(m["role"] == "assistant" for m in messages)
        if index >= len(self.replies):
            raise BackendError(f"the script has {len(self.replies)} replies; reply {index + 1} was asked for")
        text = self.replies[index]
        return AssistantReply(text, len(text.split()), 0.0, self.name)


@dataclass
class OpenAIAssistant:
    """Any OpenAI-compatible chat endpoint (OpenAI, vLLM, TGI, llama.cpp server, Ollama...)."""

    base_url: str
    model: str
    api_key: str = field(default="not-needed", repr=False)  # never exported: not part of the dialogue
    system_prompt: str = "You are a helpful assistant."
    temperature: float = 0.7
    max_tokens: int = 256
    timeout_s: float = 60.0

    @property
    def name(self) -> str:
        return f"{self.model} @ {self.base_url}"

    def _client(self) -> Any:
        from openai import OpenAI

        return OpenAI(base_url=self.base_url, api_key=self.api_key or "not-needed", timeout=self.timeout_s, max_retries=0)

    def reply(self, messages: Sequence[dict[str, str]], stop_event: threading.Event | None = None) -> AssistantReply:
        import openai

        if stop_event is not None and stop_event.is_set():
            raise GenerationCancelled("stopped")
        started = time.perf_counter()
        try:
            stream = self._client().chat.completions.create(
                model=self.model, messages=with_system(self.system_prompt, messages), temperature=self.temperature,
                max_tokens=self.max_tokens, stream=True,
            )
            parts: list[str] = []
            for chunk in stream:  # streamed so that Stop can cut a long reply short
                if stop_event is not None and stop_event.is_set():
                    stream.close()
                    raise GenerationCancelled("stopped during the reply")
                if chunk.choices and chunk.choices[0].delta.content:
                    parts.append(chunk.choices[0].delta.content)
        except openai.APITimeoutError as exc:
            raise BackendError(f"{self.name} did not answer within {self.timeout_s:g} s") from exc
        except openai.APIError as exc:
            raise BackendError(f"{self.name} failed: {exc}") from exc
        text = "".join(parts).strip()
        return AssistantReply(text, len(parts), time.perf_counter() - started, self.name)
