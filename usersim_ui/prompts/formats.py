"""How a user simulator sees the dialogue: UserLM's own format, or a chat model prompted to
play the user (the offline baseline).

Both give prompt ids that end exactly where the first real token of the user turn comes, so
the first forward pass of ``generate()`` yields the logits for the first-token filter and for
``p_end`` at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from usersim_ui.prompts.chat_ids import chat_stop_ids, chat_template_ids
from usersim_ui.prompts.userlm import (
    END_CONVERSATION,
    END_OF_TEXT,
    EOT,
    encode_plain,
    token_id,
    userlm_prompt_ids,
)


class PromptFormat(Protocol):
    name: str
    end_marker: str

    def prompt_ids(self, intent: str, messages: Sequence[dict[str, str]]) -> list[int]: ...
    def end_marker_ids(self) -> list[int]: ...
    def stop_ids(self) -> list[int]: ...


@dataclass
class UserLMFormat:
    """UserLM-8b: intent as system, roles unflipped, open user header, then the ``\\n`` the
    model always writes first (forced here so that step 0 is the first real token)."""

    tokenizer: Any
    name: str = "UserLM"
    end_marker: str = END_CONVERSATION

    def prompt_ids(self, intent: str, messages: Sequence[dict[str, str]]) -> list[int]:
        return userlm_prompt_ids(self.tokenizer, intent, messages) + encode_plain(self.tokenizer, "\n")

    def end_marker_ids(self) -> list[int]:
        return [token_id(self.tokenizer, END_CONVERSATION)]

    def stop_ids(self) -> list[int]:
        return [token_id(self.tokenizer, EOT), token_id(self.tokenizer, END_OF_TEXT)]


PROMPTED_USER_SYSTEM = (
    "You are a human user chatting with an AI assistant. You are NOT the assistant: you never "
    "answer, explain or offer help; you ask for it. Your goal in this conversation: {intent}\n"
    "Write only your next message to the assistant: one short, casual message of 3 to 25 words, "
    "in your own words, one step at a time; do not reveal the whole goal at once. When your goal "
    "is met or you want to leave, reply with exactly {marker} and nothing else."
)

# How a first message opens the conversation, shown to the model before its own: user turns
# written for this project (none from the sample intents), each short, in a user's voice,
# none opening with a word the first-token filter bans ("I", "You", "Here").
FIRST_TURN_REQUEST = "My goal: {goal}\nWrite the first message you send to the assistant."
FEW_SHOT_FIRST_TURNS = (
    ("You want to know how long to boil an egg so that the yolk stays runny.",
     "how long do i boil an egg if i want the yolk still runny?"),
    ("You need a Python regular expression that matches dates written like 2024-03-15.",
     "need a python regex that matches dates like 2024-03-15, can you help"),
    ("You are planning a cheap weekend in Lisbon and do not know where to stay.",
     "hey, planning a weekend in lisbon on a tight budget. which area is good to stay in?"),
    ("You want to write a polite email asking your landlord to fix a leaking tap.",
     "can you help me write a short email to my landlord about a leaky tap?"),
    ("You want to understand why your sourdough bread comes out flat.",
     "my sourdough keeps coming out flat. any idea why?"),
)


@dataclass
class PromptedUserFormat:
    """A general chat model told to play the user: roles flipped (its own past turns are
    ``assistant``), the intent in a system prompt, a plain-text end marker of several tokens.
    This is the prompted baseline the UserLM paper compares against, not UserLM."""

    tokenizer: Any
    name: str = "prompted baseline"
    end_marker: str = "[END]"
    system_template: str = field(default=PROMPTED_USER_SYSTEM)

    shots: Sequence[tuple[str, str]] = FEW_SHOT_FIRST_TURNS

    def prompt_ids(self, intent: str, messages: Sequence[dict[str, str]]) -> list[int]:
        """The system prompt; a few goals, each asked for a first message and answered with one
        (so that a small chat model sees what a *user's* message looks like before writing
        one); then this dialogue's goal asked for the same way, and the dialogue with roles
        flipped: the model's own past turns as ``assistant``, the real assistant's as ``user``."""
        system = {"role": "system", "content": self.system_template.format(intent=intent, marker=self.end_marker)}
        shown = []
        for goal, first in self.shots:
            shown += [{"role": "user", "content": FIRST_TURN_REQUEST.format(goal=goal)},
                      {"role": "assistant", "content": first}]
        ask = {"role": "user", "content": FIRST_TURN_REQUEST.format(goal=intent)}
        flipped = [{"role": "assistant" if m["role"] == "user" else "user", "content": m["content"]} for m in messages]
        return chat_template_ids(self.tokenizer, [system, *shown, ask, *flipped], add_generation_prompt=True)

    def end_marker_ids(self) -> list[int]:
        return encode_plain(self.tokenizer, self.end_marker)

    def stop_ids(self) -> list[int]:
        return chat_stop_ids(self.tokenizer)
