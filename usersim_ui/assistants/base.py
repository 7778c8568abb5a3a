"""What every assistant backend shares: the assistant's view of the dialogue and Stop."""

from __future__ import annotations

import threading
from typing import Sequence


def with_system(system_prompt: str, messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """The assistant's view: its own system prompt (if any) before the dialogue's messages."""
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + list(messages)


def stopped(stop_event: threading.Event | None) -> bool:
    return stop_event is not None and stop_event.is_set()
