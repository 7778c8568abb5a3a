"""Distributions over many dialogues: how long they run, who ends them, how likely the user is
to leave at each turn, how often each guardrail acts, how diverse the first turns are, and, for
an A/B run, every metric side by side with the difference and a bootstrap 95% interval.

Pure functions over lists of :class:`~usersim_ui.core.dialogue.Dialogue` returning pandas tables and
plotly figures; nothing here runs a model or imports gradio.

Definitions (each metric names what it counts):

* a dialogue's *length* is its number of user turns; *who ended it* is ``ended_by``
  (``user``, ``turn_cap``, ``researcher``, or ``open``);
* *turn index* t is the t-th user turn of a dialogue (1-based);
* *distinct-n* of an intent: unique word n-grams / all word n-grams over the first user turns
  of that intent's dialogues (lowercased, whitespace words), x100 as the UserLM paper reports
  first-turn diversity; averaged over intents;
* *length spread* of an intent: sample variance (ddof=1) and range of its dialogues' lengths;
* *unigram difference* of an intent: mean over pairs of its dialogues of the Jaccard distance
  between the sets of words the simulated user wrote;
* *verbatim-repeat rate*: kept, non-ending user turns that repeat an earlier user turn of the
  same dialogue or contain the intent, word for word after lowercasing and collapsing spaces
  (what the repetition guardrail resamples), per such turn;
* a *guardrail activation* is a turn carrying an event of that guardrail; *resamples* are the
  rejected samples recorded on the turn.

Intervals: the A/B difference and each metric's 95% interval come from a bootstrap over
intents (a cluster bootstrap: the samples of one intent are not independent), the same
resampled intents for both arms, seeded numpy.
"""

from __future__ import annotations

import hashlib
import html
import itertools
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from usersim_ui.analysis.metrics import format_probability
from usersim_ui.core.dialogue import Dialogue, Turn
from usersim_ui.core.guardrails import REPORTED

# Every guardrail a turn may record as acting, from the core's table (a context trim is not a guardrail
# decision about the user's text: it is counted as context_trims).
COUNTED_GUARDRAILS = tuple(g.name for g in REPORTED if g.name != "context")  # what the batch metrics count per guardrail
ARM_COLOURS = ("#2563eb", "#f97316", "#16a34a", "#9333ea")
GROUP_DASH = {"all": "solid", "user": "dash", "turn_cap": "dot", "researcher": "dashdot", "open": "longdash"}


# ---- small helpers ------------------------------------------------------------------------

def user_turns(dialogue: Dialogue) -> list[Turn]:
    return [t for t in dialogue.turns if t.role == "user"]


def length(dialogue: Dialogue) -> int:
    return len(user_turns(dialogue))


def ended_by(dialogue: Dialogue) -> str:
    return dialogue.ended_by or "open"


def words(text: str) -> list[str]:
    return text.lower().split()


def normalise(text: str) -> str:
    return " ".join(words(text))


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Iterable[str], n: int) -> float | None:
    """Unique n-grams / all n-grams over the texts, x100; None when they hold no n-gram."""
    grams = [g for text in texts for g in ngrams(words(text), n)]
    return 100.0 * len(set(grams)) / len(grams) if grams else None


def is_verbatim_repeat(turn: Turn, earlier: Sequence[str], intent: str) -> bool:
    norm = normalise(turn.text)
    if not norm:
        return False
    return any(norm == normalise(e) for e in earlier) or normalise(intent) in norm


def by_intent(dialogues: Iterable[Dialogue]) -> dict[str, list[Dialogue]]:
    groups: dict[str, list[Dialogue]] = {}
    for d in dialogues:
        groups.setdefault(d.intent, []).append(d)
    return groups


def mean_pairwise_jaccard_distance(sets: Sequence[set[str]]) -> float | None:
    pairs = list(itertools.combinations(sets, 2))
    if not pairs:
        return None
    return float(np.mean([1 - len(a & b) / len(a | b) if a | b else 0.0 for a, b in pairs]))


# ---- tables -------------------------------------------------------------------------------

def dialogue_table(arms: Mapping[str, Sequence[Dialogue]]) -> pd.DataFrame:
    """One row per dialogue: its arm, intent, length, who ended it and its per-turn counts."""
    rows = []
    for arm, dialogues in arms.items():
        for d in dialogues:
            users = user_turns(d)
            p = [t.p_end for t in users if t.p_end is not None]
            rows.append({
                "arm": arm, "id": d.id, "intent": d.intent, "user_turns": len(users), "ended_by": ended_by(d),
                "mean_p_end": float(np.mean(p)) if p else math.nan,
                "resamples": sum(len(t.rejected) for t in users),
                **{f"{g}_turns": sum(any(e.guardrail == g and e.acted for e in t.guardrails) for t in users) for g in COUNTED_GUARDRAILS},
                "first_turn": users[0].text if users else "",
            })
    return pd.DataFrame(rows)


def survival_table(dialogues: Sequence[Dialogue]) -> pd.DataFrame:
    """Fraction of dialogues still going at each user turn t (length >= t), overall and per ``ended_by``."""
    rows = []
    groups: dict[str, list[int]] = {"all": [length(d) for d in dialogues]}
    for d in dialogues:
        groups.setdefault(ended_by(d), []).append(length(d))
    horizon = max(groups["all"], default=0)
    for group, lengths in groups.items():
        for t in range(0, horizon + 1):
            alive = sum(n >= t for n in lengths)
            rows.append({"group": group, "turn": t, "dialogues": len(lengths), "surviving": alive,
                         "fraction": alive / len(lengths) if lengths else math.nan})
    return pd.DataFrame(rows, columns=["group", "turn", "dialogues", "surviving", "fraction"])


def p_end_by_turn(dialogues: Sequence[Dialogue]) -> pd.DataFrame:
    """Mean p_end at each user turn index with a normal 95% interval (clipped to [0, 1])."""
    values: dict[int, list[float]] = {}
    for d in dialogues:
        for index, turn in enumerate(user_turns(d), 1):
            if turn.p_end is not None:
                values.setdefault(index, []).append(turn.p_end)
    rows = []
    for index in sorted(values):
        v = np.asarray(values[index], dtype=float)
        half = 1.96 * v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else math.nan
        rows.append({"turn": index, "n": len(v), "mean": v.mean(),
                     "lo": max(0.0, v.mean() - half) if len(v) > 1 else math.nan,
                     "hi": min(1.0, v.mean() + half) if len(v) > 1 else math.nan})
    return pd.DataFrame(rows, columns=["turn", "n", "mean", "lo", "hi"])


def guardrails_by_turn(dialogues: Sequence[Dialogue]) -> pd.DataFrame:
    """Per user turn index: the share of turns each guardrail acted on, and resamples per turn."""
    per: dict[int, list[Turn]] = {}
    for d in dialogues:
        for index, turn in enumerate(user_turns(d), 1):
            per.setdefault(index, []).append(turn)
    rows = []
    for index in sorted(per):
        turns = per[index]
        row = {"turn": index, "n": len(turns)}
        for g in COUNTED_GUARDRAILS:
            row[g] = sum(any(e.guardrail == g and e.acted for e in t.guardrails) for t in turns) / len(turns)
        row["resamples_per_turn"] = sum(len(t.rejected) for t in turns) / len(turns)
        rows.append(row)
    return pd.DataFrame(rows, columns=["turn", "n", *COUNTED_GUARDRAILS, "resamples_per_turn"])


def intent_table(dialogues: Sequence[Dialogue]) -> pd.DataFrame:
    """Per intent: first-turn diversity, the spread of dialogue length, and the unigram difference."""
    rows = []
    for intent, group in by_intent(dialogues).items():
        lengths = [length(d) for d in group]
        firsts = [user_turns(d)[0].text for d in group if user_turns(d)]
        vocab = [set(w for t in user_turns(d) for w in words(t.text)) for d in group]
        rows.append({
            "intent": intent, "dialogues": len(group),
            **{f"distinct_{n}": distinct_n(firsts, n) for n in (1, 2, 3)},
            "length_mean": float(np.mean(lengths)),
            "length_variance": float(np.var(lengths, ddof=1)) if len(lengths) > 1 else None,
            "length_range": float(max(lengths) - min(lengths)) if len(lengths) > 1 else None,
            "unigram_difference": mean_pairwise_jaccard_distance(vocab),
        })
    return pd.DataFrame(rows, columns=["intent", "dialogues", "distinct_1", "distinct_2", "distinct_3", "length_mean",
                                       "length_variance", "length_range", "unigram_difference"])


# ---- scalar metrics with a bootstrap over intents ---------------------------------------------

# name -> (description, kind): "ratio" metrics are sum(num)/sum(den) over the intents' dialogues
# or turns; "intent" metrics are the mean over intents where the value exists.
METRICS: dict[str, str] = {
    "dialogues": "dialogues in the arm",
    "mean_user_turns": "user turns per dialogue",
    "ended_by_user": "share of dialogues the simulated user ended",
    "ended_by_turn_cap": "share of dialogues the turn cap ended",
    "mean_p_end": "mean P(end) over user turns",
    "guardrail_activation": "share of user turns on which any guardrail acted",
    **{f"{g}_activation": f"share of user turns on which {g} acted" for g in COUNTED_GUARDRAILS},
    "resamples_per_user_turn": "rejected samples per user turn",
    "verbatim_repeat_rate": "kept non-ending user turns that repeat an earlier one or the intent",
    "distinct_1": "first-turn distinct-1 x100, mean over intents",
    "distinct_2": "first-turn distinct-2 x100, mean over intents",
    "distinct_3": "first-turn distinct-3 x100, mean over intents",
    "length_variance": "variance of dialogue length within an intent, mean over intents",
    "length_range": "range of dialogue length within an intent, mean over intents",
    "unigram_difference": "mean pairwise Jaccard distance of user words within an intent, mean over intents",
}


@dataclass(frozen=True)
class _Parts:
    """Per-intent numerators and denominators of every metric, for one arm."""

    num: dict[str, np.ndarray]
    den: dict[str, np.ndarray]

    def value(self, metric: str, weights: np.ndarray) -> float:
        den = float(weights @ self.den[metric])
        return float(weights @ self.num[metric]) / den if den else math.nan


def _intent_parts(group: Sequence[Dialogue]) -> dict[str, tuple[float, float]]:
    users = [t for d in group for t in user_turns(d)]
    n_turns = len(users)
    p = [t.p_end for t in users if t.p_end is not None]
    kept: list[bool] = []
    for d in group:
        earlier: list[str] = []
        for t in user_turns(d):
            if not t.ends_dialogue:
                kept.append(is_verbatim_repeat(t, earlier, d.intent))
            earlier.append(t.text)
    info = intent_table(group).iloc[0] if group else None
    out: dict[str, tuple[float, float]] = {
        "dialogues": (len(group), 1.0),  # summed, not averaged: see metric_values
        "mean_user_turns": (sum(length(d) for d in group), len(group)),
        "ended_by_user": (sum(d.ended_by == "user" for d in group), len(group)),
        "ended_by_turn_cap": (sum(d.ended_by == "turn_cap" for d in group), len(group)),
        "mean_p_end": (sum(p), len(p)),
        "guardrail_activation": (sum(any(e.guardrail in COUNTED_GUARDRAILS and e.acted for e in t.guardrails) for t in users), n_turns),
        **{f"{g}_activation": (sum(any(e.guardrail == g and e.acted for e in t.guardrails) for t in users), n_turns)
           for g in COUNTED_GUARDRAILS},
        "resamples_per_user_turn": (sum(len(t.rejected) for t in users), n_turns),
        "verbatim_repeat_rate": (sum(kept), len(kept)),
    }
    for name in ("distinct_1", "distinct_2", "distinct_3", "length_variance", "length_range", "unigram_difference"):
        value = None if info is None else info[name]
        valid = value is not None and not (isinstance(value, float) and math.isnan(value))
        out[name] = (float(value) if valid else 0.0, 1.0 if valid else 0.0)
    return out


def _parts(dialogues: Sequence[Dialogue], intents: Sequence[str]) -> _Parts:
    groups = by_intent(dialogues)
    per = [_intent_parts(groups.get(i, [])) if groups.get(i) else None for i in intents]
    num = {m: np.array([p[m][0] if p else 0.0 for p in per]) for m in METRICS}
    den = {m: np.array([p[m][1] if p else 0.0 for p in per]) for m in METRICS}
    return _Parts(num, den)


def metric_values(dialogues: Sequence[Dialogue]) -> dict[str, float]:
    """Every metric of :data:`METRICS` for one set of dialogues (the point estimates)."""
    intents = list(by_intent(dialogues))
    parts = _parts(dialogues, intents)
    ones = np.ones(len(intents))
    values = {m: parts.value(m, ones) for m in METRICS}
    values["dialogues"] = float(len(dialogues))
    return values


def metrics_table(arms: Mapping[str, Sequence[Dialogue]], n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per metric: each arm's value and 95% interval; with two arms also B - A and its interval.

    The bootstrap resamples intents with replacement (the same draw for every arm), so an A/B
    difference is paired by intent, as the arms share seeds per (intent, sample).
    """
    names = list(arms)
    intents = sorted({d.intent for ds in arms.values() for d in ds})
    parts = {a: _parts(ds, intents) for a, ds in arms.items()}
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(len(intents), np.full(len(intents), 1 / len(intents)), size=n_boot) if intents else np.zeros((0, 0))
    rows = []
    for metric, description in METRICS.items():
        row: dict[str, object] = {"metric": metric, "description": description}
        boots = {}
        for a in names:
            if metric == "dialogues":
                row[a] = float(len(arms[a]))
                row[f"{a}_lo"] = row[f"{a}_hi"] = math.nan
                continue
            row[a] = parts[a].value(metric, np.ones(len(intents)))
            boots[a] = np.array([parts[a].value(metric, w) for w in draws])
            row[f"{a}_lo"], row[f"{a}_hi"] = _interval(boots[a])
        if len(names) >= 2:
            a, b = names[0], names[1]
            row["diff"] = row[b] - row[a]  # type: ignore[operator]
            if metric == "dialogues":
                row["diff_lo"] = row["diff_hi"] = math.nan
            else:
                row["diff_lo"], row["diff_hi"] = _interval(boots[b] - boots[a])
        rows.append(row)
    return pd.DataFrame(rows)


def _interval(values: np.ndarray) -> tuple[float, float]:
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return math.nan, math.nan
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


# ---- what each metric is called where people read it ---------------------------------------

@dataclass(frozen=True)
class MetricInfo:
    """How the report and the Batch tab show a metric: its id stays in the CSV headers."""

    name: str
    unit: str
    panel: str  # which panel of the comparison figure: one scale per panel


PANELS = {  # panel -> (title, axis); P(end) on a log axis as the Studio draws it
    "shares": ("Shares of dialogues or user turns", "share (0-1)"),
    "counts": ("Counts per dialogue or per user turn", "turns / samples"),
    "p_end": ("Mean P(end) (log axis)", "probability"),
    "distinct": ("First-turn diversity: distinct-n", "x100 (0-100)"),
    "distance": ("Vocabulary difference within an intent", "Jaccard distance (0-1)"),
}
METRIC_INFO: dict[str, MetricInfo] = {
    "dialogues": MetricInfo("Dialogues", "count", ""),
    "mean_user_turns": MetricInfo("User turns per dialogue", "turns", "counts"),
    "ended_by_user": MetricInfo("Ended by the simulated user", "share", "shares"),
    "ended_by_turn_cap": MetricInfo("Ended by the turn cap", "share", "shares"),
    "mean_p_end": MetricInfo("Mean P(end)", "probability", "p_end"),
    "guardrail_activation": MetricInfo("Any guardrail acted", "share of user turns", "shares"),
    **{f"{g.name}_activation": MetricInfo(f"{g.label[:1].upper()}{g.label[1:]} acted", "share of user turns", "shares")
       for g in REPORTED if g.name in COUNTED_GUARDRAILS},
    "resamples_per_user_turn": MetricInfo("Resamples per user turn", "samples per turn", "counts"),
    "verbatim_repeat_rate": MetricInfo("Verbatim repeats", "share of kept turns", "shares"),
    "distinct_1": MetricInfo("First-turn distinct-1", "x100", "distinct"),
    "distinct_2": MetricInfo("First-turn distinct-2", "x100", "distinct"),
    "distinct_3": MetricInfo("First-turn distinct-3", "x100", "distinct"),
    "length_variance": MetricInfo("Length variance within an intent", "turns²", "counts"),
    "length_range": MetricInfo("Length range within an intent", "turns", "counts"),
    "unigram_difference": MetricInfo("Unigram difference within an intent", "Jaccard distance", "distance"),
}
# Intervals from a bootstrap over fewer intents than this are flagged: with a handful of clusters
# the percentile bootstrap is too narrow (it never sees the intents that were not run).
MIN_INTENTS_FOR_INTERVALS = 10
ARM_SYMBOLS = ("circle", "diamond", "square", "triangle-up")
ARM_DASHES = ("solid", "dash", "dot", "dashdot")


def metric_name(metric: str) -> str:
    info = METRIC_INFO.get(metric)
    return info.name if info else metric


def format_value(metric: str, value: object) -> str:
    """A metric's value as the report and the tab print it: P(end) always in scientific notation
    (it is often 1e-5, which 4 decimals show as 0), the rest to 4 significant digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    v = float(value)  # type: ignore[arg-type]
    if metric == "mean_p_end" or metric.startswith("p_end"):
        return "0" if v == 0 else f"{v:.2e}"
    return f"{v:.4g}"


def _offset(index: int, count: int, step: float) -> float:
    """Where arm ``index`` of ``count`` sits beside the shared position: arms never draw on top of each other."""
    return (index - (count - 1) / 2) * step


# ---- figures ------------------------------------------------------------------------------

def _layout(fig: go.Figure, title: str, x: str, y: str) -> go.Figure:
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, height=360, template="plotly_white",
                      margin=dict(l=50, r=10, t=50, b=40), legend=dict(orientation="h", y=-0.2))
    return fig


def survival_figure(arms: Mapping[str, Sequence[Dialogue]]) -> go.Figure:
    """Share of dialogues still going at each user turn, split by who ended them. Arms sit a
    little apart on x, with their own markers, so that A shows where it coincides with B."""
    fig = go.Figure()
    for index, (colour, (arm, dialogues)) in enumerate(zip(ARM_COLOURS, arms.items())):
        table = survival_table(dialogues)
        shift = _offset(index, len(arms), 0.08)
        for group, rows in table.groupby("group", sort=False):
            label = f"{arm}: {group} (n={int(rows['dialogues'].iloc[0])})" if len(arms) > 1 else f"{group} (n={int(rows['dialogues'].iloc[0])})"
            fig.add_scatter(x=rows["turn"] + shift, y=rows["fraction"], mode="lines+markers", line_shape="hv", name=label,
                            line=dict(color=colour, dash=GROUP_DASH.get(str(group), "solid"), width=3 - index),
                            marker=dict(symbol=ARM_SYMBOLS[index % 4], size=7),
                            customdata=rows["turn"], hovertemplate=f"{arm} {group}: turn %{{customdata}}, %{{y:.3f}}<extra></extra>")
    fig = _layout(fig, "Survival of dialogue length, by who ended it", "user turn", "share still going")
    fig.update_xaxes(dtick=1)
    fig.update_yaxes(range=[0, 1.05])
    return fig


def p_end_figure(arms: Mapping[str, Sequence[Dialogue]]) -> go.Figure:
    """Mean P(end) per user turn with its 95% interval, on a log axis (P(end) spans 1e-6 to 1)."""
    fig = go.Figure()
    for index, (colour, (arm, dialogues)) in enumerate(zip(ARM_COLOURS, arms.items())):
        t = p_end_by_turn(dialogues)
        t = t[t["mean"] > 0]  # a log axis has no 0
        err = dict(type="data", symmetric=False, array=(t["hi"] - t["mean"]).fillna(0),
                   arrayminus=(t["mean"] - t["lo"]).fillna(0))
        fig.add_scatter(x=t["turn"] + _offset(index, len(arms), 0.1), y=t["mean"], error_y=err, mode="lines+markers",
                        name=arm, line=dict(color=colour, dash=ARM_DASHES[index % 4]),
                        marker=dict(symbol=ARM_SYMBOLS[index % 4], size=8), customdata=t["turn"],
                        hovertemplate=f"{arm}: turn %{{customdata}}, P(end) %{{y:.2e}}<extra></extra>")
    fig = _layout(fig, "P(end) by user turn (mean, 95% interval; log axis)", "user turn", "P(end)")
    fig.update_xaxes(dtick=1)
    fig.update_yaxes(type="log", exponentformat="e", tickformat=".2~e")
    return fig


def guardrail_figure(arms: Mapping[str, Sequence[Dialogue]]) -> go.Figure:
    """By user turn: the share of turns each guardrail acted on (top) and resamples per turn
    (bottom; a count, so on its own axis)."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.12, row_heights=[0.6, 0.4],
                        subplot_titles=("Share of user turns each guardrail acted on", "Resamples per user turn"))
    colours = ["#2563eb", "#dc2626", "#f59e0b", "#9333ea", "#475569"]
    for index, (arm, dialogues) in enumerate(arms.items()):
        t = guardrails_by_turn(dialogues)
        x = t["turn"] + _offset(index, len(arms), 0.1)
        for colour, column in zip(colours, COUNTED_GUARDRAILS):
            name = f"{arm}: {column}" if len(arms) > 1 else column
            fig.add_scatter(x=x, y=t[column], mode="lines+markers", name=name, row=1, col=1,
                            line=dict(color=colour, dash=ARM_DASHES[index % 4]), marker=dict(symbol=ARM_SYMBOLS[index % 4]))
        fig.add_scatter(x=x, y=t["resamples_per_turn"], mode="lines+markers", name=f"{arm}: resamples per turn",
                        row=2, col=1, line=dict(color=ARM_COLOURS[index % 4], dash=ARM_DASHES[index % 4]),
                        marker=dict(symbol=ARM_SYMBOLS[index % 4]))
    fig.update_layout(title="Guardrails by user turn", height=520, template="plotly_white",
                      margin=dict(l=50, r=10, t=70, b=40), legend=dict(orientation="h", y=-0.15))
    fig.update_yaxes(title_text="share (0-1)", range=[0, 1.05], row=1, col=1)
    fig.update_yaxes(title_text="samples per turn", row=2, col=1)
    fig.update_xaxes(dtick=1, title_text="user turn", row=2, col=1)
    return fig


def _arm_columns(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if c not in ("metric", "description") and not c.endswith(("_lo", "_hi"))
            and c != "diff" and not c.startswith("diff_") and "_repeat_" not in c
            and c not in ("noise_floor", "inside_noise")]


def _panel_figure(title: str, panels: list[tuple[str, pd.DataFrame]], height_per_row: int = 34) -> tuple[Any, dict[str, int]]:
    from plotly.subplots import make_subplots

    heights = [max(len(rows), 1) + 1.5 for _, rows in panels]
    fig = make_subplots(rows=len(panels), cols=1, row_heights=[h / sum(heights) for h in heights], vertical_spacing=0.08,
                        subplot_titles=[f"{PANELS[p][0]}<br>{PANELS[p][1]}" for p, _ in panels])
    # each panel's title on two lines from the plot's left edge: centred on one line, a panel in
    # half a page (the batch tab) cut it off at the right
    fig.update_annotations(x=0, xanchor="left", align="left", font=dict(size=12))
    fig.update_layout(title=title, template="plotly_white", height=int(120 + height_per_row * sum(heights)),
                      margin=dict(l=260, r=20, t=80, b=40), legend=dict(orientation="h", y=-0.04))
    return fig, {p: i + 1 for i, (p, _) in enumerate(panels)}


def _panels(table: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    rows = table[table["metric"] != "dialogues"]
    panel = rows["metric"].map(lambda m: METRIC_INFO[m].panel if m in METRIC_INFO else "counts")
    return [(p, rows[panel == p].reset_index(drop=True)) for p in PANELS if (panel == p).any()]


def comparison_figure(table: pd.DataFrame) -> go.Figure:
    """Every metric per arm with its bootstrap 95% interval, one panel per scale (shares, counts,
    P(end) on a log axis, distinct-n x100, a 0-1 distance); arms offset with their own markers."""
    arms = _arm_columns(table)
    panels = _panels(table)
    fig, row_of = _panel_figure("Metrics per arm with bootstrap 95% interval", panels)
    for p, rows in panels:
        ys = list(range(len(rows)))
        for index, arm in enumerate(arms):
            fig.add_scatter(x=rows[arm], y=[y + _offset(index, len(arms), 0.25) for y in ys], mode="markers", name=arm,
                            legendgroup=arm, showlegend=p == panels[0][0], row=row_of[p], col=1,
                            marker=dict(color=ARM_COLOURS[index % 4], symbol=ARM_SYMBOLS[index % 4], size=9),
                            error_x=dict(type="data", symmetric=False, array=(rows[f"{arm}_hi"] - rows[arm]).fillna(0),
                                         arrayminus=(rows[arm] - rows[f"{arm}_lo"]).fillna(0)),
                            customdata=[format_value(m, v) for m, v in zip(rows["metric"], rows[arm])],
                            text=[metric_name(m) for m in rows["metric"]],
                            hovertemplate=f"{arm}: %{{text}} = %{{customdata}}<extra></extra>")
        fig.update_yaxes(tickvals=ys, ticktext=[metric_name(m) for m in rows["metric"]], autorange="reversed",
                         row=row_of[p], col=1)
        if p == "p_end":
            fig.update_xaxes(type="log", exponentformat="e", tickformat=".2~e", nticks=4, row=row_of[p], col=1)
    return fig


def difference_figure(table: pd.DataFrame) -> go.Figure:
    """B - A per metric with its bootstrap 95% interval, one panel per scale, and the noise floor
    (how far the metric moved between repeats of the same arm) as a grey band around 0."""
    arms = _arm_columns(table)
    panels = _panels(table)
    fig, row_of = _panel_figure(f"A/B: {arms[1]} minus {arms[0]} (95% interval; grey: noise floor across repeats)", panels)
    for p, rows in panels:
        ys = list(range(len(rows)))
        if "noise_floor" in rows.columns:
            fig.add_scatter(x=[0] * len(rows), y=ys, mode="markers", name="noise floor (± largest range across repeats)",
                            legendgroup="noise", showlegend=p == panels[0][0], row=row_of[p], col=1,
                            marker=dict(color="rgba(100,116,139,0.0)", size=1),
                            error_x=dict(type="data", symmetric=True, array=rows["noise_floor"].fillna(0), thickness=14,
                                         width=0, color="rgba(100,116,139,0.35)"))
        fig.add_scatter(x=rows["diff"], y=ys, mode="markers", name=f"{arms[1]} - {arms[0]}", legendgroup="diff",
                        showlegend=p == panels[0][0], row=row_of[p], col=1,
                        marker=dict(color="#0f172a", symbol="diamond", size=9),
                        error_x=dict(type="data", symmetric=False, array=(rows["diff_hi"] - rows["diff"]).fillna(0),
                                     arrayminus=(rows["diff"] - rows["diff_lo"]).fillna(0)),
                        customdata=[format_value(m, v) for m, v in zip(rows["metric"], rows["diff"])],
                        text=[metric_name(m) for m in rows["metric"]],
                        hovertemplate="%{text}: %{customdata}<extra></extra>")
        fig.add_vline(x=0, line_color="#64748b", row=row_of[p], col=1)
        fig.update_yaxes(tickvals=ys, ticktext=[metric_name(m) for m in rows["metric"]], autorange="reversed",
                         row=row_of[p], col=1)
        if p == "p_end":
            fig.update_xaxes(exponentformat="e", tickformat=".2~e", row=row_of[p], col=1)
    return fig


def figures(arms: Mapping[str, Sequence[Dialogue]], table: pd.DataFrame | None = None) -> dict[str, go.Figure]:
    table = metrics_table(arms) if table is None else table
    figs = {"survival": survival_figure(arms), "p_end": p_end_figure(arms), "guardrails": guardrail_figure(arms),
            "comparison": comparison_figure(table)}
    if "diff" in table.columns:
        figs["difference"] = difference_figure(table)
    return figs


# ---- the noise floor: the same metrics per repeat ---------------------------------------------

def noise_table(by_repeat: Mapping[int, Mapping[str, Sequence[Dialogue]]]) -> pd.DataFrame:
    """Per metric: each arm's value in every repeat (identical settings, fresh seeds), its SD
    (ddof=1) and range across repeats, the same for B - A, and the noise floor: the largest range
    of any arm, i.e. how far the metric moved between two runs that differ only in their seeds.
    An A-B difference no larger than that is inside the noise."""
    repeats = sorted(by_repeat)
    arms = list(dict.fromkeys(a for r in repeats for a in by_repeat[r]))
    values = {(r, a): metric_values(by_repeat[r][a]) for r in repeats for a in arms if by_repeat[r].get(a)}
    rows = []
    for metric in METRICS:
        row: dict[str, object] = {"metric": metric}
        ranges = []
        for a in arms:
            v = np.array([values[(r, a)][metric] for r in repeats if (r, a) in values], dtype=float)
            v = v[~np.isnan(v)]
            row[f"{a}_repeat_sd"] = float(v.std(ddof=1)) if len(v) > 1 else math.nan
            row[f"{a}_repeat_range"] = float(v.max() - v.min()) if len(v) > 1 else math.nan
            ranges.append(row[f"{a}_repeat_range"])
        if len(arms) >= 2:
            a, b = arms[0], arms[1]
            d = np.array([values[(r, b)][metric] - values[(r, a)][metric] for r in repeats
                          if (r, a) in values and (r, b) in values], dtype=float)
            d = d[~np.isnan(d)]
            row["diff_repeat_sd"] = float(d.std(ddof=1)) if len(d) > 1 else math.nan
            row["diff_repeat_range"] = float(d.max() - d.min()) if len(d) > 1 else math.nan
        known = [x for x in ranges if not (isinstance(x, float) and math.isnan(x))]
        row["noise_floor"] = max(known) if known else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def with_noise(table: pd.DataFrame, noise: pd.DataFrame) -> pd.DataFrame:
    """The metrics table with the noise columns beside it and, for an A/B, ``inside_noise``:
    |B - A| no larger than the noise floor (the metric moved as much between repeats of one arm)."""
    merged = table.merge(noise, on="metric", how="left")
    if "diff" in merged.columns:
        merged["inside_noise"] = [bool(abs(d) <= n) if not (math.isnan(d) or math.isnan(n)) else None
                                  for d, n in zip(merged["diff"].astype(float), merged["noise_floor"].astype(float))]
    return merged


# ---- CSV ----------------------------------------------------------------------------------

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def spreadsheet_safe(value: object) -> object:
    """A text cell that a spreadsheet would run as a formula (``=HYPERLINK(...)``, ``@SUM(...)``,
    ``-2+3``), with a single quote in front (OWASP's advice): shown as the text it is, run as
    nothing. Numbers, and text that is just a number, stay as they are: no spreadsheet runs them."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS) and not _PLAIN_NUMBER.fullmatch(value):
        return "'" + value
    return value


def write_csv(table: pd.DataFrame, path: object) -> None:
    """``table`` as CSV with every text cell :func:`spreadsheet_safe` (intents, first turns and ids
    come from whoever wrote the intents file, or from a model)."""
    safe = table.copy()
    for column in safe.columns:
        if pd.api.types.is_object_dtype(safe[column]) or pd.api.types.is_string_dtype(safe[column]):
            safe[column] = safe[column].map(spreadsheet_safe)
    safe.to_csv(path, index=False)


# ---- report -------------------------------------------------------------------------------

PLOTLY_BUNDLE = Path(__file__).resolve().parent / "vendor" / "plotly-basic.min.js"


def plotly_js() -> str:
    """The plotly.js inlined once into the report: the ``basic`` partial bundle (scatter, bar, pie;
    1.2 MB) of the same plotly.js version plotly.py ships, which is all the report draws; plotly.py's
    full bundle (4.8 MB, what made the report 4.6 MB) only when the partial one is missing."""
    if PLOTLY_BUNDLE.exists():
        return PLOTLY_BUNDLE.read_text(encoding="utf-8")
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


@dataclass(frozen=True)
class Entry:
    """One finished dialogue in the report: its batch record's key, arm, intent, sample, repeat, seed."""

    key: str
    arm: str
    intent_id: str
    sample: int
    repeat: int
    seed: int | None
    dialogue: Dialogue


def anchor(prefix: str, key: str) -> str:
    """An HTML id for a key: readable, and unique however the key's characters were changed."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", key)[:60]
    return f"{prefix}-{slug}-{hashlib.sha1(key.encode('utf-8')).hexdigest()[:8]}"


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _turn_html(turn: Turn, number: int) -> str:
    bits = [f"#{number}", _e(turn.role), f"{turn.words} words"]
    if turn.p_end is not None:
        bits.append(f"P(end) {_e(format_probability(turn.p_end))}")
    acted = sorted({e.guardrail for e in turn.guardrails if e.acted})
    if acted:
        bits.append("guardrails: " + _e(", ".join(acted)))
    if turn.rejected:
        bits.append(f"{len(turn.rejected)} resampled")
    if turn.ends_dialogue:
        bits.append("ends the dialogue")
    if turn.author != "model":
        bits.append(_e(f"by {turn.author}"))
    return (f"<div class='turn {_e(turn.role)}'><div class='meta'>{' · '.join(bits)}</div>"
            f"<pre>{_e(turn.text)}</pre></div>")


def _transcript_html(entry: Entry) -> str:
    d = entry.dialogue
    summary = (f"{_e(entry.key)} · arm {_e(entry.arm)} · {len(user_turns(d))} user turns · ended by {_e(ended_by(d))}"
               f" · seed {_e(entry.seed)}")
    body = "".join(_turn_html(t, n) for n, t in enumerate(d.turns, 1))
    return (f"<details class='dialogue' id='{anchor('t', entry.key)}'><summary>{summary}</summary>"
            f"<p class='intent'><b>Intent:</b> {_e(d.intent)}</p>{body}</details>")


def _pair_key(entry: Entry) -> tuple[str, int, int]:
    return (entry.intent_id, entry.sample, entry.repeat)


def _paired_html(a: Entry, b: Entry) -> str:
    """The same intent and seed in both arms, turn i of A beside turn i of B."""
    rows = []
    for n in range(max(len(a.dialogue.turns), len(b.dialogue.turns))):
        cells = [_turn_html(d.turns[n], n + 1) if n < len(d.turns) else "" for d in (a.dialogue, b.dialogue)]
        rows.append(f"<tr><td>{cells[0]}</td><td>{cells[1]}</td></tr>")
    label = f"{a.intent_id} · sample {a.sample}" + (f" · repeat {a.repeat}" if a.repeat else "") + f" · seed {a.seed}"
    return (f"<details class='pair dialogue' id='{anchor('p', '/'.join(map(str, _pair_key(a))))}'><summary>{_e(label)}"
            f" · {_e(a.arm)}: {len(user_turns(a.dialogue))} user turns, ended by {_e(ended_by(a.dialogue))} · "
            f"{_e(b.arm)}: {len(user_turns(b.dialogue))}, ended by {_e(ended_by(b.dialogue))}</summary>"
            f"<p class='intent'><b>Intent:</b> {_e(a.dialogue.intent)}</p>"
            f"<table class='paired'><tr><th>{_e(a.arm)}</th><th>{_e(b.arm)}</th></tr>{''.join(rows)}</table></details>")


def _settings_html(settings: Mapping[str, Mapping[str, str]]) -> str:
    arms = list(settings)
    names = list(dict.fromkeys(n for s in settings.values() for n in s))
    head = "".join(f"<th>{_e(a)}</th>" for a in arms)
    rows = []
    for name in names:
        values = [settings[a].get(name, "") for a in arms]
        differs = len(set(values)) > 1
        cells = "".join(f"<td>{_e(v)}</td>" for v in values)
        rows.append(f"<tr class='{'differs' if differs else ''}'><th>{_e(name)}</th>{cells}</tr>")
    note = " Rows that differ between the arms are highlighted." if len(arms) > 1 else ""
    return f"<p>{note}</p><table id='settings'><tr><th>setting</th>{head}</tr>{''.join(rows)}</table>"


def _interval_text(row: Mapping[str, object], metric: str, column: str) -> str:
    lo, hi = row.get(f"{column}_lo"), row.get(f"{column}_hi")
    if lo is None or (isinstance(lo, float) and math.isnan(lo)):
        return ""
    return f"[{format_value(metric, lo)}, {format_value(metric, hi)}]"


def _metrics_html(table: pd.DataFrame, arms: Sequence[str], repeats: int) -> str:
    head = ["Metric", "Unit"] + [f"{a} [95% interval]" for a in arms]
    ab = "diff" in table.columns
    noise = "noise_floor" in table.columns
    if ab:
        head += [f"{arms[1]} − {arms[0]} [95% interval]"]
    head += ["Noise floor (range across repeats)"] + (["Verdict"] if ab else [])
    rows = []
    for _, row in table.iterrows():
        m = str(row["metric"])
        info = METRIC_INFO.get(m, MetricInfo(m, "", ""))
        cells = [f"<td><b>{_e(info.name)}</b><div class='def'>{_e(row.get('description', ''))}</div></td>",
                 f"<td>{_e(info.unit)}</td>"]
        cells += [f"<td>{_e(format_value(m, row[a]))} <span class='ci'>{_e(_interval_text(row, m, a))}</span></td>" for a in arms]
        verdict = ""
        if ab:
            cells.append(f"<td>{_e(format_value(m, row['diff']))} <span class='ci'>{_e(_interval_text(row, m, 'diff'))}</span></td>")
        if noise and m != "dialogues":
            nf = row["noise_floor"]
            per = "; ".join(f"{a} SD {format_value(m, row.get(f'{a}_repeat_sd')) or 'n/a'}" for a in arms)
            cells.append(f"<td>{_e(format_value(m, nf) or 'n/a')} <span class='ci'>{_e(per)}</span></td>")
            inside = row.get("inside_noise")
            if ab and inside is not None and not (isinstance(inside, float) and math.isnan(inside)):
                verdict = ("<span class='inside'>inside the noise</span>" if inside
                           else "<span class='outside'>larger than the noise</span>")
        else:
            cells.append("<td class='ci'>" + ("" if m == "dialogues" else
                                             "unknown: one repeat (run with --repeats 2 or more)") + "</td>")
        if ab:
            cells.append(f"<td>{verdict}</td>")
        rows.append(f"<tr id='{anchor('m', m)}' data-metric='{_e(m)}'>{''.join(cells)}</tr>")
    return ("<table id='metrics'><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>" + "".join(rows)
            + "</table>")


def _intents_html(entries: Sequence[Entry], arms: Sequence[str], paired: set[tuple[str, int, int]]) -> str:
    groups: dict[str, list[Entry]] = {}
    for e in entries:
        groups.setdefault(e.intent_id, []).append(e)
    rows = []
    for intent_id, group in groups.items():
        cells = [f"<td>{_e(intent_id)}</td>", f"<td class='intent-text'>{_e(group[0].dialogue.intent)}</td>"]
        for arm in arms:
            mine = [e for e in group if e.arm == arm]
            links = " ".join(f"<a href='#{anchor('t', e.key)}'>s{e.sample}{f'r{e.repeat}' if e.repeat else ''}</a>"
                             for e in mine)
            mean = np.mean([length(e.dialogue) for e in mine]) if mine else math.nan
            cells.append(f"<td>{links}<div class='def'>{'' if math.isnan(mean) else f'{mean:.2g} user turns'}</div></td>")
        if len(arms) > 1:
            keys = sorted({_pair_key(e) for e in group} & paired)
            cells.append("<td>" + " ".join(f"<a href='#{anchor('p', '/'.join(map(str, k)))}'>s{k[1]}"
                                           f"{f'r{k[2]}' if k[2] else ''}</a>" for k in keys) + "</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    head = ["intent id", "intent"] + [f"{a}: transcripts" for a in arms] + (["A/B side by side"] if len(arms) > 1 else [])
    return ("<table id='intents'><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>" + "".join(rows)
            + "</table>")


_STYLE = """body{font-family:system-ui,sans-serif;margin:24px;max-width:1200px;color:#0f172a}
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #cbd5e1;padding:3px 6px;vertical-align:top;text-align:left}
th{background:#f1f5f9}.def{color:#475569;font-size:11px}.ci{color:#475569;font-size:11px}
tr.differs td,tr.differs th{background:#fef3c7}.warn{background:#fef2f2;border:1px solid #fca5a5;padding:8px 12px}
.inside{color:#92400e}.outside{color:#166534;font-weight:600}
details.dialogue{border:1px solid #e2e8f0;margin:4px 0;padding:2px 8px}summary{cursor:pointer}
.turn{margin:4px 0}.turn.user pre{background:#eff6ff}.turn.assistant pre{background:#f8fafc}
pre{white-space:pre-wrap;word-break:break-word;margin:2px 0;padding:4px 6px;font-size:12px}
.meta{font-size:11px;color:#475569}table.paired{width:100%;table-layout:fixed}table.paired td{width:50%}
#filter{width:420px;padding:4px}"""

_FILTER_JS = """(function(){var box=document.getElementById('filter'),n=document.getElementById('shown');
function run(){var q=box.value.toLowerCase(),shown=0,all=document.querySelectorAll('details.dialogue');
all.forEach(function(d){var hit=!q||d.textContent.toLowerCase().indexOf(q)>=0;d.style.display=hit?'':'none';if(hit)shown++;});
n.textContent=shown+' of '+all.length+' shown';}
box.addEventListener('input',run);run();
window.addEventListener('hashchange',function(){var t=document.getElementById(location.hash.slice(1));if(t&&t.tagName==='DETAILS'){t.open=true;}});
var t=location.hash&&document.getElementById(location.hash.slice(1));if(t&&t.tagName==='DETAILS'){t.open=true;}
document.querySelectorAll('a[href^="#"]').forEach(function(a){a.addEventListener('click',function(){var t=document.getElementById(a.getAttribute('href').slice(1));if(t&&t.tagName==='DETAILS'){t.open=true;}});});})();"""


def report_html(title: str, table: pd.DataFrame, figs: Mapping[str, go.Figure], notes: Sequence[str] = (),
                settings: Mapping[str, Mapping[str, str]] | None = None, entries: Sequence[Entry] = (),
                repeats: int = 1) -> str:
    """One self-contained HTML page to publish: plotly.js inline once (:func:`plotly_js`), the
    settings of each arm side by side, every metric by name with its unit, definition, interval,
    the A-B difference and the noise floor beside it, the figures, and every dialogue's
    transcript (searchable, linked from its intent's row) with A and B side by side per intent
    and seed. Every text from a record goes through ``html.escape``: the page renders no markup
    that a model, an intents file or a researcher wrote."""
    arms = _arm_columns(table)
    intents = sorted({e.intent_id for e in entries}) if entries else sorted(set())
    n_intents = len(intents) if entries else None
    parts = [f"<script>{plotly_js()}</script>"]
    for fig in figs.values():
        parts.append(fig.to_html(full_html=False, include_plotlyjs=False, default_width="100%"))
    warn = ""
    if n_intents is not None and n_intents < MIN_INTENTS_FOR_INTERVALS:
        warn = (f"<p class='warn' id='small-sample'><b>Small sample:</b> the 95% intervals come from a bootstrap over "
                f"{n_intents} intent(s), fewer than {MIN_INTENTS_FOR_INTERVALS}. A bootstrap over so few clusters is too "
                "narrow (it never draws the intents that were not run): read the intervals as rough, and run more "
                "intents before publishing a difference.</p>")
    noise = ""
    if "diff" in table.columns:
        noise = ("<p>Repeated identical runs of simulated-user benchmarks flip A-B verdicts often (tau2-bench reports "
                 "32-55%). The <b>noise floor</b> of a metric is the largest range of any arm's value across repeats "
                 "(the same intents and settings, fresh seeds); a difference no larger than it is marked "
                 "<i>inside the noise</i>." + ("" if repeats > 1 else " This run has one repeat, so its noise floor is "
                                               "unknown: run with <code>--repeats 2</code> or more.") + "</p>")
    by_pair: dict[tuple[str, int, int], dict[str, Entry]] = {}
    for e in entries:
        by_pair.setdefault(_pair_key(e), {})[e.arm] = e
    paired = {k for k, v in by_pair.items() if len(arms) > 1 and arms[0] in v and arms[1] in v}
    pairs_html = "".join(_paired_html(by_pair[k][arms[0]], by_pair[k][arms[1]]) for k in sorted(paired, key=str))
    note_html = "".join(f"<li>{_e(n)}</li>" for n in notes)
    sections = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{_e(title)}</h1><ul>{note_html}</ul>{warn}",
        f"<h2 id='settings-h'>Settings</h2>{_settings_html(settings)}" if settings else "",
        f"<h2>Metrics</h2>{noise}{_metrics_html(table, arms, repeats)}",
        f"<h2>Figures</h2>{''.join(parts)}",
    ]
    if entries:
        sections.append(f"<h2>Intents</h2>{_intents_html(entries, arms, paired)}")
        if pairs_html:
            sections.append("<h2 id='paired'>A and B side by side</h2><p>The same intent and seed in both arms, "
                            f"turn by turn.</p>{pairs_html}")
        sections.append("<h2 id='transcripts'>Transcripts</h2><p><input id='filter' type='search' "
                        "placeholder='Filter dialogues by any text (intent, turn, key)'> <span id='shown'></span></p>"
                        + "".join(_transcript_html(e) for e in entries) + f"<script>{_FILTER_JS}</script>")
    sections.append("</body></html>")
    return "".join(sections)


def counts(dialogues: Sequence[Dialogue]) -> Counter:
    """Dialogues per ``ended_by``."""
    return Counter(ended_by(d) for d in dialogues)
