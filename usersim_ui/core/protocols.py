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


@dataclass(frozen=True)
class Draft:
    """A turn while it is being made: what the page streams before the turn exists.

    ``text``: the sample being drawn, so far; empty while a round of retries is drawn as one
    batch (which row the guardrails will keep is not known until they judge them all).
    ``sample``: the number of the first sample in the draw (1-based), ``samples`` how many
    the draw makes at once. ``notes``: the guardrails' story so far, one line per rejected
    sample ("sample 1 rejected: length: 26 words > 25"); it folds into the turn's badge.
    Plain data: it crosses the ZeroGPU process boundary pickled.
    """

    role: str
    text: str = ""
    tokens: int = 0
    sample: int = 1
    samples: int = 1
    notes: tuple[str, ...] = ()


OnDraft = Callable[[Draft], None]  # hears the draft after each token (and each new draw), where the engine streams


@runtime_checkable
class UserModel(Protocol):
    """A simulated user: the next user turn of a dialogue, with its P(end) and guardrail record.

    Both methods return the same :class:`Turn` for the same arguments (``seed`` default: the
    seed scheme's for the turn's position); ``stop_event`` cancels with
    ``GenerationCancelled``; ``on_draft`` hears the turn's :class:`Draft` after each token where
    the engine streams (once per draw where it cannot).
    """

    model_id: str
    tokenizer: Any

    def generate_turn(self, dialogue: Dialogue, guardrails: GuardrailSettings, sampling: SamplingSettings,
                      context_budget: int = 2048, stop_event: threading.Event | None = None,
                      seed: int | None = None, on_draft: OnDraft | None = None) -> Turn: ...

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
    """Whatever answers the simulated user: one reply to the dialogue's messages (OpenAI shape);
    ``on_draft`` hears the reply so far as it streams (role ``assistant``)."""

    name: str

    def reply(self, messages: Sequence[dict[str, str]], stop_event: threading.Event | None = None,
              seed: int | None = None, on_draft: OnDraft | None = None) -> AssistantReply: ...
