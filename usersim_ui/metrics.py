"""Per-turn and per-dialogue numbers behind the charts, as pandas tables."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pandas as pd

from .dialogue import Dialogue

TURN_COLUMNS = ["turn", "role", "words", "tokens", "p_end", "ends", "end_masked", "resamples", "guardrails", "latency_s"]


def turn_table(dialogue: Dialogue) -> pd.DataFrame:
    """One row per turn; ``end_masked`` marks user turns where no-early-ending removed the end."""
    rows = []
    for number, turn in enumerate(dialogue.turns, 1):
        kinds = [e.guardrail for e in turn.guardrails]
        rows.append({
            "turn": number, "role": turn.role, "words": turn.words, "tokens": turn.tokens,
            "p_end": turn.p_end, "ends": turn.ends_dialogue, "end_masked": "no_early_ending" in kinds,
            "resamples": len(turn.rejected), "guardrails": ", ".join(kinds), "latency_s": turn.latency_s,
        })
    table = pd.DataFrame(rows, columns=TURN_COLUMNS)
    return table.astype({"turn": int, "words": int, "tokens": int, "p_end": float, "ends": bool, "end_masked": bool})


def summary(dialogue: Dialogue) -> dict[str, Any]:
    """The numbers of the summary strip."""
    user = [t for t in dialogue.turns if t.role == "user"]
    activations = Counter(e.guardrail for t in dialogue.turns for e in t.guardrails)
    return {
        "turns": len(dialogue.turns),
        "user_turns": len(user),
        "ended_by": dialogue.ended_by or "open",
        "guardrail_activations": dict(sorted(activations.items())),
        "mean_resamples_per_user_turn": (sum(len(t.rejected) for t in user) / len(user)) if user else 0.0,
        "mean_p_end": (sum(t.p_end for t in user if t.p_end is not None) / len(user)) if user else None,
        "context_trims": dialogue.context_trims,
    }
