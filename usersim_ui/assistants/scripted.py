"""An assistant that answers from a fixed list: for tests, demos and batch runs without a model."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Sequence

from usersim_ui.assistants.base import stopped
from usersim_ui.core.errors import BackendError, GenerationCancelled
from usersim_ui.core.protocols import AssistantReply, OnDraft


@dataclass
class ScriptedAssistant:
    """Replays fixed replies in order: the same assistant for every run of an experiment."""

    replies: Sequence[str]
    name: str = "scripted"
    author = "script"  # its turns are recorded as scripted, not as a model's

    def reply(self, messages: Sequence[dict[str, str]], stop_event: threading.Event | None = None,
              seed: int | None = None, on_draft: OnDraft | None = None) -> AssistantReply:
        if stopped(stop_event):
            raise GenerationCancelled("stopped")
        index = sum(m["role"] == "assistant" for m in messages)
        if index >= len(self.replies):
            raise BackendError(f"the script has {len(self.replies)} replies; reply {index + 1} was asked for")
        text = self.replies[index]
        return AssistantReply(text, len(text.split()), 0.0, self.name)
