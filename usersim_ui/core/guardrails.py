"""The four UserLM guardrails: one table, their settings, and the rules that need no model.

``GUARDRAILS`` is the one list every view reads (the page's toggles, both CLIs' spec strings,
the batch tab, charts, badges and reports), so a new guardrail is a row here, its settings
field, its rule, and where it acts (a logit mask in ``inference.masks`` or a resampling
check below). Masks act inside sampling so that the sampled distribution is the guarded
one; checks run after a sample and ask for another, as the paper does (shared/docs/userlm.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Sequence

# A logit mask is reported as having acted when it removed at least this much probability.
ACTED_THRESHOLD = 0.01


Check = Callable[[str, Sequence[str], str, "GuardrailSettings"], "str | None"]


@dataclass(frozen=True)
class Guardrail:
    """One row of the table: its id in records and spec strings, what people read, its switch,
    and how it acts: a ``check`` of a finished sample (a reason to resample it, or None) for a
    resampling guardrail; a logit mask (``acts="mask"``) is applied in sampling by every engine
    from the turn's plan (``users.turn.TurnPlan``)."""

    name: str  # id in GuardrailEvent.guardrail, CLI specs and reports
    label: str  # what a person reads in charts, badges and reports
    field: str | None  # its on/off switch in GuardrailSettings (None: always on, reported only)
    default: bool  # the paper's setting
    help: str  # one line on what it does
    toggle: str = ""  # the switch's label on the page
    acts: str = "reported"  # "mask" (in sampling), "resample" (after a sample), "reported" (a record only)
    check: Check | None = None  # a resampling guardrail's rule: why to resample the sample, or None


# ---- rules ----------------------------------------------------------------------------------

def end_is_masked(settings: GuardrailSettings, user_turns_so_far: int) -> bool:
    """Whether the no-early-ending guardrail forbids ending the next user turn: the user must
    have written ``min_user_turns_before_end`` turns first (None: never, the paper's setting)."""
    if not settings.no_early_ending:
        return False
    minimum = settings.min_user_turns_before_end
    return minimum is None or user_turns_so_far < minimum


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def length_violation(text: str, earlier_user_turns: Sequence[str], intent: str,
                     settings: GuardrailSettings) -> str | None:
    """Reason to resample when the turn is too short or too long, else None."""
    words = count_words(text)
    if words < settings.min_words or words > settings.max_words:
        return f"{words} words"
    return None


def repetition_violation(text: str, earlier_user_turns: Sequence[str], intent: str,
                         settings: GuardrailSettings) -> str | None:
    """Reason to resample when the turn repeats an earlier user turn or copies the intent."""
    norm = normalise(text)
    if not norm:
        return None
    for index, earlier in enumerate(earlier_user_turns, 1):
        if norm == normalise(earlier):
            return f"repeats user turn {index}"
    if norm == normalise(intent) or normalise(intent) in norm:
        return "copies the intent"
    return None



# ---- the table ------------------------------------------------------------------------------

GUARDRAILS: tuple[Guardrail, ...] = (
    Guardrail("first_token", "first-token filter", "first_token_filter", True,
              "The user's turn may not open like an assistant's.", "First-token filter", acts="mask"),
    Guardrail("no_early_ending", "no early ending", "no_early_ending", True,
              "P(end) is still measured; the end token just cannot be drawn.", "No early ending", acts="mask"),
    Guardrail("length", "length", "length_thresholds", True,
              "Resample a turn shorter than min words or longer than max words.", "Length thresholds",
              acts="resample", check=length_violation),
    Guardrail("repetition", "repetition", "verbatim_repetition", True,
              "Resample a turn that repeats an earlier user turn or copies the intent.", "Verbatim repetition",
              acts="resample", check=repetition_violation),
)
# What else a turn's record may say acted on it: not switches, but reported beside them.
REPORTED: tuple[Guardrail, ...] = GUARDRAILS + (
    Guardrail("retry_cap", "retry cap", None, True, "No sample passed within the retry cap: the last one was kept."),
    Guardrail("context", "context trim", None, True, "The oldest exchanges were dropped to fit the context."),
)
for _row in REPORTED:  # a resampling row is one with a check, and only such a row has one
    if (_row.acts == "resample") != (_row.check is not None) or _row.acts not in ("mask", "resample", "reported"):
        raise ValueError(f"guardrail {_row.name!r}: acts={_row.acts!r} does not match its check")
BY_NAME = {g.name: g for g in REPORTED}
GUARDRAIL_NAMES = tuple(g.name for g in REPORTED)
GUARDRAIL_ACTIONS = ("masked", "resampled", "gave_up", "trimmed")
ACTION_LABELS = {"masked": "masked", "resampled": "resampled", "gave_up": "gave up", "trimmed": "trimmed"}
_DEFAULT = {g.field: g.default for g in GUARDRAILS}


@dataclass(frozen=True)
class GuardrailSettings:
    """The four UserLM guardrails with the paper's defaults (see shared/docs/userlm.md)."""

    first_token_filter: bool = _DEFAULT["first_token_filter"]
    banned_first_words: tuple[str, ...] = ("I", "You", "Here")
    first_token_any_case: bool = False  # the published rule bans the words as written (+ leading space)
    no_early_ending: bool = _DEFAULT["no_early_ending"]
    min_user_turns_before_end: int | None = None  # None: never end while on (the paper's setting)
    length_thresholds: bool = _DEFAULT["length_thresholds"]
    min_words: int = 3
    max_words: int = 25
    verbatim_repetition: bool = _DEFAULT["verbatim_repetition"]
    retry_cap: int = 5

    def is_on(self, name: str) -> bool:
        """Whether the guardrail named ``name`` (a table id) is switched on."""
        row = BY_NAME[name]
        return True if row.field is None else bool(getattr(self, row.field))

    def all_off(self) -> "GuardrailSettings":
        return replace(self, **{g.field: False for g in GUARDRAILS if g.field is not None})


def count_words(text: str) -> int:
    """Whitespace words, as the paper's length guardrail counts them."""
    return len(text.split())


# ---- spec strings (CLIs, batch arms) --------------------------------------------------------

ALIASES = {**{g.name: g.field for g in GUARDRAILS if g.field is not None}, "min_turns": "min_user_turns_before_end"}


def parse_guardrails(spec: str | None, base: GuardrailSettings | None = None) -> GuardrailSettings:
    """``off``, ``on``/``default``, or ``name=value,...`` over ``base`` (names: a table id such
    as ``first_token``, ``min_turns``, or any GuardrailSettings field)."""
    base = base or GuardrailSettings()
    spec = (spec or "").strip()
    if spec in ("", "on", "default"):
        return base
    if spec == "off":
        return base.all_off()
    known = {f.name for f in fields(GuardrailSettings)}
    changes: dict[str, Any] = {}
    for item in spec.split(","):
        name, eq, value = item.strip().partition("=")
        name = ALIASES.get(name.strip(), name.strip())
        if not eq or name not in known:
            raise ValueError(f"bad guardrail setting {item!r}; use off, or name=value with name in "
                             f"{', '.join(sorted(set(ALIASES) | known))}")
        value = value.strip()
        current = getattr(base, name)
        try:
            if isinstance(current, bool):
                changes[name] = value.lower() in ("1", "true", "on", "yes")
            elif name == "banned_first_words":
                changes[name] = tuple(w for w in value.split("|") if w)
            elif name == "min_user_turns_before_end":
                changes[name] = None if value.lower() in ("", "none") else int(value)
            else:
                changes[name] = int(value)
        except ValueError:
            raise ValueError(f"bad guardrail setting {item!r}: {value!r} is not a whole number") from None
    return replace(base, **changes)


def switched_off(settings: GuardrailSettings) -> list[str]:
    """Table ids of the guardrails that ``settings`` switches off."""
    return [g.name for g in GUARDRAILS if not settings.is_on(g.name)]



# ---- rules over the table ----------------------------------------------------------------

def rejection_reason(text: str, earlier_user_turns: Sequence[str], intent: str,
                     settings: GuardrailSettings) -> str | None:
    """``"<guardrail>: <why>"`` for the first resampling guardrail (in the table's order) that is
    on and rejects the sample, else None."""
    for g in GUARDRAILS:
        if g.check is not None and settings.is_on(g.name):
            why = g.check(text, earlier_user_turns, intent, settings)
            if why:
                return f"{g.name}: {why}"
    return None


def resamples(settings: GuardrailSettings) -> bool:
    """Whether any resampling guardrail is on: only then may a turn draw more than one sample."""
    return any(g.check is not None and settings.is_on(g.name) for g in GUARDRAILS)


def stop_after_words(settings: GuardrailSettings) -> int | None:
    """The word count past which a sample is certain to be rejected (None: no such limit), so
    an engine may stop drawing it early."""
    return settings.max_words if settings.is_on("length") else None
