"""The two contracts the dialogue core talks to: a simulated user and an assistant.

Every user engine (in-process, batched, the turn batcher, a completions server) implements
:class:`UserModel`, and every assistant backend :class:`AssistantBackend`; the transitions in
``core.transitions`` know nothing else about them. Stdlib only: no model needed to read them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from usersim_ui.core.dialogue import Dialogue, SamplingSettings, Turn
from usersim_ui.core.guardrails import GuardrailSettings


@runtime_checkable
class UserModel(Protocol):
    """A simulated user: the next user turn of a dialogue, with its P(end) and guardrail record.

    Both methods return the same :class:`Turn` for the same arguments (``seed`` default: the
    seed scheme's for the turn's position); ``stop_event`` cancels with
    ``GenerationCancelled``; ``on_token`` hears each generated token where the engine streams.
    """

    model_id: str
    tokenizer: Any

    def generate_turn(self, dialogue: Dialogue, guardrails: GuardrailSettings, sampling: SamplingSettings,
                      context_budget: int = 2048, stop_event: threading.Event | None = None,
                      seed: int | None = None, on_token: Callable[[], None] | None = None) -> Turn: ...

    async def agenerate_turn(self, dialogue: Dialogue, guardrails: GuardrailSettings, sampling: SamplingSettings,
                             context_budget: int = 2048, stop_event: threading.Event | None = None,
                             seed: int | None = None) -> Turn: ...


@dataclass(frozen=True)
class AssistantReply:
    text: str
    tokens: int
    latency_s: float
    model_id: str
    truncated: bool = False  # the text was cut at the turn limit (core.limits.MAX_TURN_CHARS)


class AssistantBackend(Protocol):
    """Whatever answers the simulated user: one reply to the dialogue's messages (OpenAI shape)."""

    name: str

    def reply(self, messages: Sequence[dict[str, str]], stop_event: threading.Event | None = None,
              seed: int | None = None, on_token: Callable[[], None] | None = None) -> AssistantReply: ...
