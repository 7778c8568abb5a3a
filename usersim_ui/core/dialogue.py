"""The dialogue record: plain dataclasses that survive a JSONL round trip unchanged.

Every field is JSON-native so that ``dialogue_from_json(dialogue_to_json(d)) == d`` holds,
and a dialogue exported from the app can be analysed with pandas alone.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Iterable, Literal

from usersim_ui.core.guardrails import (
    ACTED_THRESHOLD,
    GUARDRAIL_ACTIONS,
    GUARDRAIL_NAMES,
    GuardrailSettings,
    count_words,
)

Role = Literal["user", "assistant"]
EndedBy = Literal["user", "turn_cap", "researcher"]


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

    guardrail: str  # a name in core.guardrails.GUARDRAIL_NAMES (the table; an import checks it)
    action: str  # one of core.guardrails.GUARDRAIL_ACTIONS
    detail: str
    count: int = 1
    probability_removed: float | None = None

    @property
    def acted(self) -> bool:
        """Whether the guardrail changed the turn: the one definition that badges, charts, summaries
        and batch reports all count. A resample, a give-up or a trim did; a mask did when it removed
        at least ``ACTED_THRESHOLD`` of the first token's probability (a masked end of P 1e-4
        changed nothing a reader could see); a mask recorded without that number is taken as
        recorded."""
        if self.action != "masked" or self.probability_removed is None:
            return True
        return self.probability_removed >= ACTED_THRESHOLD

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
    p_end_source: str | None = None  # where p_end was read: 'logits' in-process, 'server:<method>' on a server


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


# ---- JSON -----------------------------------------------------------------------------------

ENDED_BY_VALUES = (None, "user", "turn_cap", "researcher")
AUTHORS = ("model", "researcher", "script", "import")


class RecordError(ValueError):
    """A JSONL record that is not a dialogue; the message names the field."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN


def _check(data: dict[str, Any], where: str, key: str, kind: str, optional: bool = True, choices: tuple = (),
           low: float | None = None, high: float | None = None) -> Any:
    """The value at ``key`` if it has the kind asked for; else a RecordError naming it."""
    value = data.get(key)
    if value is None and (optional or None in choices):
        return None
    if choices and value not in choices:
        raise RecordError(f"field '{where}{key}': {value!r} is not one of {', '.join(map(str, filter(None, choices)))}")
    ok = {"str": isinstance(value, str), "bool": isinstance(value, bool), "list": isinstance(value, list),
          "dict": isinstance(value, dict), "number": _is_number(value),
          "int": _is_number(value) and float(value).is_integer()}[kind]
    if not ok:
        raise RecordError(f"field '{where}{key}': expected {'a' if kind != 'int' else 'an'} {kind}, got {value!r:.60}")
    if kind in ("number", "int") and ((low is not None and value < low) or (high is not None and value > high)):
        raise RecordError(f"field '{where}{key}': {value!r} is outside [{low}, {high}]")
    return int(value) if kind == "int" else value


def _settings_from_dict(cls: type, data: Any, where: str) -> Any:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise RecordError(f"field '{where}': expected an object, got {data!r:.60}")
    values = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        kind = {"bool": "bool", "float": "number", "int": "int", "str": "str"}.get(str(f.type).split(" ")[0], None)
        if f.name == "banned_first_words":
            words = _check(data, where + ".", f.name, "list")
            if words is None or not all(isinstance(w, str) for w in words):
                raise RecordError(f"field '{where}.{f.name}': expected a list of strings")
            values[f.name] = tuple(words)
        elif kind is not None:
            values[f.name] = _check(data, where + ".", f.name, kind, optional="None" in str(f.type))
    return cls(**values)


def _turn_from_dict(data: dict[str, Any], where: str = "") -> Turn:
    """One turn's metadata (``role`` and ``text`` merged in), every field type-checked."""
    c = lambda key, kind, **kw: _check(data, where, key, kind, **kw)  # noqa: E731
    events = []
    for i, g in enumerate(c("guardrails", "list") or []):
        if not isinstance(g, dict):
            raise RecordError(f"field '{where}guardrails[{i}]': expected an object")
        at = f"{where}guardrails[{i}]."
        events.append(GuardrailEvent(
            guardrail=_check(g, at, "guardrail", "str", optional=False, choices=GUARDRAIL_NAMES),
            action=_check(g, at, "action", "str", optional=False, choices=GUARDRAIL_ACTIONS),
            detail=_check(g, at, "detail", "str") or "", count=_check(g, at, "count", "int", low=0) or 1,
            probability_removed=_check(g, at, "probability_removed", "number", low=0, high=1)))
    rejected = []
    for i, r in enumerate(c("rejected", "list") or []):
        if not isinstance(r, dict):
            raise RecordError(f"field '{where}rejected[{i}]': expected an object")
        rejected.append(RejectedSample(_check(r, f"{where}rejected[{i}].", "text", "str") or "",
                                       _check(r, f"{where}rejected[{i}].", "reason", "str") or ""))
    return Turn(
        role=data["role"], text=data["text"], tokens=c("tokens", "int", low=0) or 0,
        words=c("words", "int", low=0) if data.get("words") is not None else count_words(data["text"]),
        author=c("author", "str", choices=AUTHORS) or "import", model_id=c("model_id", "str"),
        latency_s=c("latency_s", "number", low=0), p_end=c("p_end", "number", low=0, high=1),
        ends_dialogue=bool(c("ends_dialogue", "bool")), guardrails=tuple(events), rejected=tuple(rejected),
        sampling=_settings_from_dict(SamplingSettings, data.get("sampling"), where + "sampling"),
        seed=c("seed", "int", low=0), guardrail_settings=_settings_from_dict(
            GuardrailSettings, data.get("guardrail_settings"), where + "guardrail_settings"),
        context_dropped_turns=c("context_dropped_turns", "int", low=0) or 0, edited=bool(c("edited", "bool")),
        truncated=bool(c("truncated", "bool")), p_end_source=c("p_end_source", "str"),
    )


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


def dialogue_from_dict(data: Any, max_text_chars: int | None = None, max_turns: int | None = None) -> Dialogue:
    """Inverse of :func:`dialogue_to_dict`; also takes plain ``messages`` without ``turns``.

    Every field is checked; a RecordError names the first bad one. ``max_text_chars`` and
    ``max_turns`` bound what an untrusted file may hold (intent and each message).
    """
    if not isinstance(data, dict):
        raise RecordError(f"a dialogue record is a JSON object, not {type(data).__name__}")
    intent = _check(data, "", "intent", "str", optional=False)
    messages = _check(data, "", "messages", "list", optional=False)
    metas = _check(data, "", "turns", "list") or [{"author": "import"} for _ in messages]
    if len(metas) != len(messages):
        raise RecordError(f"field 'turns': {len(metas)} entries for {len(messages)} messages")
    if max_turns is not None and len(messages) > max_turns:
        raise RecordError(f"field 'messages': {len(messages)} messages; a dialogue holds at most {max_turns}")
    for name, text in [("intent", intent)] + [(f"messages[{i}].content", m.get("content")) for i, m in
                                             enumerate(messages) if isinstance(m, dict)]:
        if max_text_chars is not None and isinstance(text, str) and len(text) > max_text_chars:
            raise RecordError(f"field '{name}': {len(text):,} characters; the limit is {max_text_chars:,}")
    turns = []
    for i, (message, meta) in enumerate(zip(messages, metas)):
        if not isinstance(message, dict):
            raise RecordError(f"field 'messages[{i}]': expected an object with role and content, got {message!r:.60}")
        _check(message, f"messages[{i}].", "role", "str", optional=False, choices=("user", "assistant"))
        _check(message, f"messages[{i}].", "content", "str", optional=False)
        if not isinstance(meta, dict):
            raise RecordError(f"field 'turns[{i}]': expected an object, got {meta!r:.60}")
        turns.append(_turn_from_dict({**meta, "role": message["role"], "text": message["content"]}, f"turns[{i}]."))
    return Dialogue(
        intent=intent, turns=tuple(turns),
        ended_by=_check(data, "", "ended_by", "str", choices=ENDED_BY_VALUES),
        user_model=_check(data, "", "user_model", "str"), assistant_model=_check(data, "", "assistant_model", "str"),
        context_trims=_check(data, "", "context_trims", "int", low=0) or 0,
        id=str(_check(data, "", "id", "str") or uuid.uuid4().hex[:12]),
    )


def dialogues_to_jsonl(dialogues: Iterable[Dialogue]) -> str:
    return "".join(json.dumps(dialogue_to_dict(d), ensure_ascii=False) + "\n" for d in dialogues)


def dialogues_from_jsonl(text: str, max_text_chars: int | None = None, max_turns: int | None = None,
                         max_dialogues: int | None = None) -> list[Dialogue]:
    """Every dialogue of a JSONL text; a ValueError names the line and the field of the first bad one."""
    out = []
    # JSONL lines end at "\n" only: str.splitlines() would also split at U+0085, U+2028 and
    # U+2029, which json.dumps(ensure_ascii=False) leaves raw inside strings.
    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        if max_dialogues is not None and len(out) >= max_dialogues:
            raise ValueError(f"line {lineno}: the file holds more than {max_dialogues} dialogues")
        try:
            out.append(dialogue_from_dict(json.loads(line), max_text_chars, max_turns))
        except json.JSONDecodeError as exc:
            raise ValueError(f"line {lineno}: not JSON ({exc.msg} at column {exc.colno})") from exc
        except (TypeError, ValueError) as exc:
            raise ValueError(f"line {lineno}: {exc}") from exc
    return out
