"""Per-turn and per-dialogue numbers behind the charts, as pandas tables."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import pandas as pd

from usersim_ui.core.dialogue import Dialogue, Turn, count_words
from usersim_ui.core.guardrails import REPORTED

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


def end_was_masked(turn: Turn) -> bool:
    """Whether the no-early-ending guardrail took the end away from this user turn in a way that
    changed something (``GuardrailEvent.acted``: the one accounting badges, charts, summaries and
    batch reports share). A masked end of P(end) 1e-4 changed nothing and is not counted."""
    return turn.role == "user" and any(e.guardrail == "no_early_ending" and e.acted for e in turn.guardrails)


def rejected_words(turn: Turn) -> tuple[int, ...]:
    """Word counts of the samples the guardrails threw away for this turn, in order."""
    return tuple(count_words(r.text) for r in turn.rejected)


def turn_table(dialogue: Dialogue) -> pd.DataFrame:
    """One row per turn.

    ``end_masked`` marks user turns where no-early-ending acted on the end; ``would_have_ended`` is,
    on user turns with a P(end), the probability that the user would have ended by this turn had the
    end never been masked: ``1 - prod(1 - p_end_i)`` over the user turns so far (turns without a
    P(end), typed by the researcher, count as not ending)."""
    rows = []
    survive = 1.0
    for number, turn in enumerate(dialogue.turns, 1):
        kinds = [e.guardrail for e in turn.guardrails if e.acted]
        would = None
        if turn.role == "user" and turn.p_end is not None:
            survive *= 1.0 - turn.p_end
            would = 1.0 - survive
        rows.append({
            "turn": number, "role": turn.role, "author": turn.author, "words": turn.words, "tokens": turn.tokens,
            "p_end": turn.p_end, "ends": turn.ends_dialogue, "end_masked": end_was_masked(turn),
            "would_have_ended": would, "resamples": len(turn.rejected), "rejected_words": rejected_words(turn),
            "truncated": turn.truncated, "guardrails": ", ".join(kinds), "latency_s": turn.latency_s,
        })
    table = pd.DataFrame(rows, columns=TURN_COLUMNS)
    return table.astype({"turn": int, "words": int, "tokens": int, "p_end": float, "ends": bool, "end_masked": bool,
                         "would_have_ended": float, "resamples": int, "truncated": bool})


def guardrail_table(dialogue: Dialogue) -> pd.DataFrame:
    """One row per guardrail action that changed a turn (``GuardrailEvent.acted``): which guardrail
    acted on which turn, how, and how many times (``count`` is the number of resamples for
    ``resampled``, 1 otherwise). The badge, the charts, the summary and the batch report all
    count these rows' events, so they agree."""
    rows = [{"turn": number, "guardrail": e.guardrail, "action": e.action,
             "count": e.count if e.action == "resampled" else 1, "detail": e.detail,
             "probability_removed": e.probability_removed}
            for number, turn in enumerate(dialogue.turns, 1) for e in turn.guardrails if e.acted]
    return pd.DataFrame(rows, columns=GUARDRAIL_COLUMNS).astype({"turn": int, "count": int, "probability_removed": float})


def guardrail_actions(dialogue: Dialogue) -> dict[str, int]:
    """How many times each guardrail acted (a resample counts once per rejected sample, a mask once
    per turn it acted on: see :func:`guardrail_table`), in acting order."""
    table = guardrail_table(dialogue)
    totals = table.groupby("guardrail")["count"].sum().to_dict() if len(table) else {}
    return {k: int(totals[k]) for k in GUARDRAIL_LABELS if k in totals}


def summary(dialogue: Dialogue) -> dict[str, Any]:
    """The numbers of the summary strip.

    ``mean_p_end`` averages over the user turns that have a P(end): researcher-typed turns have none
    and must not pull the mean down. ``guardrail_activations`` counts the recorded events per
    guardrail; ``guardrail_actions`` counts each resample and each mask that acted (:func:`guardrail_table`)."""
    user = [t for t in dialogue.turns if t.role == "user"]
    scored = [t.p_end for t in user if t.p_end is not None]
    activations = Counter(e.guardrail for t in dialogue.turns for e in t.guardrails if e.acted)
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
