"""Every size and time the app accepts, in one place, with the messages that name them.

The numbers are chosen so that one researcher's input can never hold the shared model for
long or exhaust memory: a turn is at most a few thousand tokens, an import a few MB.
"""

from __future__ import annotations

from usersim_ui.core.errors import ContextTooLong

MAX_INTENT_CHARS = 4_000
MAX_TURN_CHARS = 8_000  # a typed, edited or imported turn (~1,600 words)
MAX_TURNS = 200  # turns in one dialogue (typed, imported or generated)
MAX_IMPORT_BYTES = 5 * 1024 * 1024
MAX_IMPORT_DIALOGUES = 1_000
BACKEND_DEADLINE_S = 180.0  # a whole assistant reply from an endpoint, however it trickles
BACKEND_READ_TIMEOUT_S = 60.0  # silence between two chunks of a reply


def check_text(text: str, what: str, limit: int = MAX_TURN_CHARS) -> str:
    """``text`` unchanged if it fits; else a ValueError that names the limit."""
    if len(text) > limit:
        raise ValueError(f"{what} has {len(text):,} characters; the limit is {limit:,}.")
    return text



def check_context(prompt_tokens: int, new_tokens: int, context: int | None, who: str) -> None:
    """Refuse a prompt that would overrun ``who``'s context window, before any compute."""
    if context is not None and prompt_tokens + new_tokens > context:
        raise ContextTooLong(
            f"The dialogue is {prompt_tokens:,} tokens for {who}, whose context holds {context:,} "
            f"including the {new_tokens:,} it may write. Undo or shorten a long turn.")
