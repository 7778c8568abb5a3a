"""Per-turn and per-dialogue numbers behind the charts, as pandas tables."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import pandas as pd

from usersim_ui.core.guardrails import REPORTED
from usersim_ui.core.dialogue import Dialogue, GuardrailSettings, Turn, count_words

TURN_COLUMNS = ["turn", "role", "author", "words", "tokens", "p_end", "ends", "end_masked", "would_have_ended",
                "resamples", "rejected_words", "truncated", "guardrails", "latency_s"]
GUARDRAIL_COLUMNS = ["turn", "guardrail", "action", "count", "detail", "probability_removed"]

# Readable names, in the order the guardrails act on a user turn (the core's table).
GUARDRAIL_LABELS = {g.name: g.label for g in REPORTED}


def format_probability(p: float | None) -> str:
    """A probability as a person reads it: 3 decimals from 0.001 up, scientific notation below
    (``2.4e-04``), ``0`` for exactly zero and ``n/a`` where there is none. Used by badges and hovers."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "n/a"
    if p == 0:
        return "0"
    if abs(p) < 1e-3:
        return f"{p:.1e}"
    return f"{p:.3f}"


def _settings_mask_end(settings: GuardrailSettings, user_turns_before: int) -> bool:
    # Same rule as guardrails.end_is_masked, restated here so the chart modules stay free of torch.
    if not settings.no_early_ending:
        return False
    minimum = settings.min_user_turns_before_end
    return minimum is None or user_turns_before < minimum


def end_was_masked(turn: Turn, user_turns_before: int) -> bool:
    """Whether the no-early-ending guardrail took the end away from this user turn: it says so in an
    event, or the turn's recorded settings masked the end (the simulator only writes the event when
    the removed probability is at least 0.01, so a tiny P(end) is masked silently)."""
    if turn.role != "user":
        return False
    if any(e.guardrail == "no_early_ending" and e.action == "masked" for e in turn.guardrails):
        return True
    return (turn.p_end is not None and not turn.ends_dialogue and turn.guardrail_settings is not None
            and _settings_mask_end(turn.guardrail_settings, user_turns_before))


def rejected_words(turn: Turn) -> tuple[int, ...]:
    """Word counts of the samples the guardrails threw away for this turn, in order."""
    return tuple(count_words(r.text) for r in turn.rejected)


def turn_table(dialogue: Dialogue) -> pd.DataFrame:
    """One row per turn.

    ``end_masked`` marks user turns where no-early-ending removed the end; ``would_have_ended`` is,
    on user turns with a P(end), the probability that the user would have ended by this turn had the
    end never been masked: ``1 - prod(1 - p_end_i)`` over the user turns so far (turns without a
    P(end), typed by the researcher, count as not ending)."""
    rows = []
    user_before, survive = 0, 1.0
    for number, turn in enumerate(dialogue.turns, 1):
        kinds = [e.guardrail for e in turn.guardrails]
        would = None
        if turn.role == "user" and turn.p_end is not None:
            survive *= 1.0 - turn.p_end
            would = 1.0 - survive
        rows.append({
            "turn": number, "role": turn.role, "author": turn.author, "words": turn.words, "tokens": turn.tokens,
            "p_end": turn.p_end, "ends": turn.ends_dialogue, "end_masked": end_was_masked(turn, user_before),
            "would_have_ended": would, "resamples": len(turn.rejected), "rejected_words": rejected_words(turn),
            "truncated": turn.truncated, "guardrails": ", ".join(kinds), "latency_s": turn.latency_s,
        })
        user_before += turn.role == "user"
    table = pd.DataFrame(rows, columns=TURN_COLUMNS)
    return table.astype({"turn": int, "words": int, "tokens": int, "p_end": float, "ends": bool, "end_masked": bool,
                         "would_have_ended": float, "resamples": int, "truncated": bool})


def guardrail_table(dialogue: Dialogue) -> pd.DataFrame:
    """One row per guardrail action: which guardrail acted on which turn, how, and how many times
    (``count`` is the number of resamples for ``resampled``, 1 otherwise).

    Besides the recorded events, a user turn whose recorded settings masked the end gets a
    ``no_early_ending`` row even where the simulator wrote no event (it only does from P(end) 0.01
    up): on a baseline with P(end) near 1e-4 the end is masked on every turn, and the charts say so."""
    rows, user_before = [], 0
    for number, turn in enumerate(dialogue.turns, 1):
        rows += [{"turn": number, "guardrail": e.guardrail, "action": e.action,
                  "count": e.count if e.action == "resampled" else 1, "detail": e.detail,
                  "probability_removed": e.probability_removed} for e in turn.guardrails]
        if end_was_masked(turn, user_before) and not any(e.guardrail == "no_early_ending" for e in turn.guardrails):
            rows.append({"turn": number, "guardrail": "no_early_ending", "action": "masked", "count": 1,
                         "detail": f"end (p={format_probability(turn.p_end)}), too small for an event; masked by the settings",
                         "probability_removed": turn.p_end})
        user_before += turn.role == "user"
    return pd.DataFrame(rows, columns=GUARDRAIL_COLUMNS).astype({"turn": int, "count": int, "probability_removed": float})


def guardrail_actions(dialogue: Dialogue) -> dict[str, int]:
    """How many times each guardrail acted (a resample counts once per rejected sample, a masked end
    once per turn, recorded or not: see :func:`guardrail_table`), in acting order."""
    table = guardrail_table(dialogue)
    totals = table.groupby("guardrail")["count"].sum().to_dict() if len(table) else {}
    return {k: int(totals[k]) for k in GUARDRAIL_LABELS if k in totals}


def summary(dialogue: Dialogue) -> dict[str, Any]:
    """The numbers of the summary strip.

    ``mean_p_end`` averages over the user turns that have a P(end): researcher-typed turns have none
    and must not pull the mean down. ``guardrail_activations`` counts the recorded events per
    guardrail; ``guardrail_actions`` counts each resample and each masked end (:func:`guardrail_table`)."""
    user = [t for t in dialogue.turns if t.role == "user"]
    scored = [t.p_end for t in user if t.p_end is not None]
    activations = Counter(e.guardrail for t in dialogue.turns for e in t.guardrails)
    return {
        "turns": len(dialogue.turns),
        "user_turns": len(user),
        "ended_by": dialogue.ended_by or "open",
        "guardrail_activations": dict(sorted(activations.items())),
        "guardrail_actions": guardrail_actions(dialogue),
        "mean_resamples_per_user_turn": (sum(len(t.rejected) for t in user) / len(user)) if user else 0.0,
        "mean_p_end": (sum(scored) / len(scored)) if scored else None,
        "context_trims": dialogue.context_trims,
    }
