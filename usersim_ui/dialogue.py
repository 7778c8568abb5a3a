"""The dialogue record: plain dataclasses that survive a JSONL round trip unchanged.

Every field is JSON-native so that ``dialogue_from_json(dialogue_to_json(d)) == d`` holds,
and a dialogue exported from the app can be analysed with pandas alone.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Iterable, Literal

Role = Literal["user", "assistant"]
EndedBy = Literal["user", "turn_cap", "researcher"]


@dataclass(frozen=True)
class GuardrailSettings:
    """The four UserLM guardrails with the paper's defaults (see shared/docs/userlm.md)."""

    first_token_filter: bool = True
    banned_first_words: tuple[str, ...] = ("I", "You", "Here")
    no_early_ending: bool = True
    min_user_turns_before_end: int | None = None  # None: never end while on (the paper's setting)
    length_thresholds: bool = True
    min_words: int = 3
    max_words: int = 25
    verbatim_repetition: bool = True
    retry_cap: int = 5


@dataclass(frozen=True)
class SamplingSettings:
    """Sampling of the simulated user; the model card's values, not generation_config's."""

    temperature: float = 1.0
    top_p: float = 0.8
    max_new_tokens: int = 96
    seed: int = 0


@dataclass(frozen=True)
class GuardrailEvent:
    """One guardrail acting on one turn: which, what it did, and the evidence."""

    guardrail: Literal["first_token", "no_early_ending", "length", "repetition", "retry_cap", "context"]
    action: Literal["masked", "resampled", "gave_up", "trimmed"]
    detail: str
    count: int = 1
    probability_removed: float | None = None

    def badge(self) -> str:
        """Short text for a badge line under the turn."""
        if self.action == "resampled":
            return f"{self.guardrail}: resampled {self.count}x ({self.detail})"
        return f"{self.guardrail}: {self.action} {self.detail}"


@dataclass(frozen=True)
class RejectedSample:
    text: str
    reason: str


@dataclass(frozen=True)
class Turn:
    role: Role
    text: str
    tokens: int = 0
    words: int = 0
    author: Literal["model", "researcher", "script", "import"] = "model"
    model_id: str | None = None
    latency_s: float | None = None
    p_end: float | None = None
    ends_dialogue: bool = False
    guardrails: tuple[GuardrailEvent, ...] = ()
    rejected: tuple[RejectedSample, ...] = ()
    sampling: SamplingSettings | None = None
    seed: int | None = None
    guardrail_settings: GuardrailSettings | None = None
    context_dropped_turns: int = 0
    edited: bool = False
    truncated: bool = False  # kept after the retry cap although generation was cut at max_words/max_new_tokens


@dataclass(frozen=True)
class Dialogue:
    intent: str
    turns: tuple[Turn, ...] = ()
    ended_by: EndedBy | None = None
    user_model: str | None = None
    assistant_model: str | None = None
    context_trims: int = 0  # user turns generated with the oldest exchanges dropped
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    @property
    def user_turns(self) -> int:
        return sum(t.role == "user" for t in self.turns)

    @property
    def next_role(self) -> Role:
        return "assistant" if self.turns and self.turns[-1].role == "user" else "user"

    def with_turn(self, turn: Turn) -> "Dialogue":
        return replace(self, turns=self.turns + (turn,))

    def messages(self) -> list[dict[str, str]]:
        """The turns in OpenAI role/content shape (the intent is not a message: only the user knows it)."""
        return [{"role": t.role, "content": t.text} for t in self.turns]


def count_words(text: str) -> int:
    """Whitespace words, as the paper's length guardrail counts them."""
    return len(text.split())


# ---- JSON -----------------------------------------------------------------------------------

def _turn_from_dict(data: dict[str, Any]) -> Turn:
    data = dict(data)
    data["guardrails"] = tuple(GuardrailEvent(**g) for g in data.get("guardrails", ()))
    data["rejected"] = tuple(RejectedSample(**r) for r in data.get("rejected", ()))
    if data.get("sampling") is not None:
        data["sampling"] = SamplingSettings(**data["sampling"])
    if data.get("guardrail_settings") is not None:
        gs = dict(data["guardrail_settings"])
        gs["banned_first_words"] = tuple(gs.get("banned_first_words", ()))
        data["guardrail_settings"] = GuardrailSettings(**gs)
    known = {f.name for f in fields(Turn)}
    return Turn(**{k: v for k, v in data.items() if k in known})


def dialogue_to_dict(dialogue: Dialogue) -> dict[str, Any]:
    """One JSONL record: ``messages`` for any chat tooling, ``turns`` for the metadata."""
    turns = []
    for turn in dialogue.turns:
        meta = asdict(turn)
        meta.pop("role"), meta.pop("text")
        turns.append(meta)
    return {
        "id": dialogue.id,
        "intent": dialogue.intent,
        "messages": dialogue.messages(),
        "turns": turns,
        "ended_by": dialogue.ended_by,
        "user_model": dialogue.user_model,
        "assistant_model": dialogue.assistant_model,
        "context_trims": dialogue.context_trims,
    }


def dialogue_from_dict(data: dict[str, Any]) -> Dialogue:
    """Inverse of :func:`dialogue_to_dict`; also takes plain ``messages`` without ``turns``."""
    if not isinstance(data, dict) or not isinstance(data.get("intent"), str):
        raise ValueError("a dialogue record needs a string 'intent'")
    messages = data.get("messages")
    if not isinstance(messages, list):
        raise ValueError("a dialogue record needs a 'messages' list")
    metas = data.get("turns") or [{"author": "import"} for _ in messages]
    if len(metas) != len(messages):
        raise ValueError(f"'turns' has {len(metas)} entries for {len(messages)} messages")
    turns = []
    for message, meta in zip(messages, metas):
        if message.get("role") not in ("user", "assistant") or not isinstance(message.get("content"), str):
            raise ValueError(f"bad message {message!r}: role must be user/assistant, content a string")
        meta = {"words": count_words(message["content"]), **meta}
        turns.append(_turn_from_dict({**meta, "role": message["role"], "text": message["content"]}))
    return Dialogue(
        intent=data["intent"], turns=tuple(turns), ended_by=data.get("ended_by"),
        user_model=data.get("user_model"), assistant_model=data.get("assistant_model"),
        context_trims=int(data.get("context_trims", 0)), id=str(data.get("id") or uuid.uuid4().hex[:12]),
    )


def dialogues_to_jsonl(dialogues: Iterable[Dialogue]) -> str:
    return "".join(json.dumps(dialogue_to_dict(d), ensure_ascii=False) + "\n" for d in dialogues)


def dialogues_from_jsonl(text: str) -> list[Dialogue]:
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(dialogue_from_dict(json.loads(line)))
        except (json.JSONDecodeError, TypeError, ValueError) as exc:
            raise ValueError(f"line {lineno}: {exc}") from exc
    return out
