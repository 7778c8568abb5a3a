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

import html
import itertools
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from usersim_ui.core.dialogue import Dialogue, Turn
from usersim_ui.core.guardrails import REPORTED

# Every guardrail a turn may record as acting, from the core's table (a context trim is not a guardrail
# decision about the user's text: it is counted as context_trims).
GUARDRAILS = tuple(g.name for g in REPORTED if g.name != "context")
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
                **{f"{g}_turns": sum(any(e.guardrail == g for e in t.guardrails) for t in users) for g in GUARDRAILS},
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
        for g in GUARDRAILS:
            row[g] = sum(any(e.guardrail == g for e in t.guardrails) for t in turns) / len(turns)
        row["resamples_per_turn"] = sum(len(t.rejected) for t in turns) / len(turns)
        rows.append(row)
    return pd.DataFrame(rows, columns=["turn", "n", *GUARDRAILS, "resamples_per_turn"])


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
    **{f"{g}_activation": f"share of user turns on which {g} acted" for g in GUARDRAILS},
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
        "guardrail_activation": (sum(any(e.guardrail in GUARDRAILS for e in t.guardrails) for t in users), n_turns),
        **{f"{g}_activation": (sum(any(e.guardrail == g for e in t.guardrails) for t in users), n_turns)
           for g in GUARDRAILS},
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


# ---- figures ------------------------------------------------------------------------------

def _layout(fig: go.Figure, title: str, x: str, y: str) -> go.Figure:
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, height=360, template="plotly_white",
                      margin=dict(l=50, r=10, t=50, b=40), legend=dict(orientation="h", y=-0.2))
    return fig


def survival_figure(arms: Mapping[str, Sequence[Dialogue]]) -> go.Figure:
    """Share of dialogues still going at each user turn, split by who ended them."""
    fig = go.Figure()
    for colour, (arm, dialogues) in zip(ARM_COLOURS, arms.items()):
        table = survival_table(dialogues)
        for group, rows in table.groupby("group", sort=False):
            label = f"{arm}: {group} (n={int(rows['dialogues'].iloc[0])})" if len(arms) > 1 else f"{group} (n={int(rows['dialogues'].iloc[0])})"
            fig.add_scatter(x=rows["turn"], y=rows["fraction"], mode="lines", line_shape="hv", name=label,
                            line=dict(color=colour, dash=GROUP_DASH.get(str(group), "solid")))
    fig = _layout(fig, "Survival of dialogue length, by who ended it", "user turn", "share still going")
    fig.update_xaxes(dtick=1)
    fig.update_yaxes(range=[0, 1.05])
    return fig


def p_end_figure(arms: Mapping[str, Sequence[Dialogue]]) -> go.Figure:
    """Mean P(end) per user turn with its 95% interval."""
    fig = go.Figure()
    for colour, (arm, dialogues) in zip(ARM_COLOURS, arms.items()):
        t = p_end_by_turn(dialogues)
        err = dict(type="data", symmetric=False, array=(t["hi"] - t["mean"]).fillna(0), arrayminus=(t["mean"] - t["lo"]).fillna(0))
        fig.add_scatter(x=t["turn"], y=t["mean"], error_y=err, mode="lines+markers", name=arm, line=dict(color=colour))
    fig = _layout(fig, "P(end) by user turn (mean, 95% interval)", "user turn", "P(end)")
    fig.update_xaxes(dtick=1)
    return fig


def guardrail_figure(arms: Mapping[str, Sequence[Dialogue]]) -> go.Figure:
    """Share of user turns each guardrail acted on, and resamples per turn, by turn index."""
    fig = go.Figure()
    dashes = ["solid", "dash", "dot", "dashdot"]
    for dash, (arm, dialogues) in zip(dashes, arms.items()):
        t = guardrails_by_turn(dialogues)
        for colour, column in zip(["#2563eb", "#dc2626", "#f59e0b", "#9333ea", "#475569", "#16a34a"],
                                  [*GUARDRAILS, "resamples_per_turn"]):
            name = f"{arm}: {column}" if len(arms) > 1 else column
            fig.add_scatter(x=t["turn"], y=t[column], mode="lines+markers", name=name,
                            line=dict(color=colour, dash=dash))
    fig = _layout(fig, "Guardrail activation and resamples by user turn", "user turn", "share of turns / resamples per turn")
    fig.update_xaxes(dtick=1)
    return fig


def comparison_figure(table: pd.DataFrame) -> go.Figure:
    """B - A per metric with its bootstrap 95% interval (one arm: each metric's value and interval)."""
    arms = [c for c in table.columns if c not in ("metric", "description") and not c.endswith(("_lo", "_hi"))
            and c != "diff"]
    rows = table[table["metric"] != "dialogues"]
    fig = go.Figure()
    if "diff" in table.columns:
        fig.add_scatter(x=rows["diff"], y=rows["metric"], mode="markers", name=f"{arms[1]} - {arms[0]}",
                        error_x=dict(type="data", symmetric=False, array=(rows["diff_hi"] - rows["diff"]).fillna(0),
                                     arrayminus=(rows["diff"] - rows["diff_lo"]).fillna(0)))
        fig.add_vline(x=0, line_color="#64748b")
        title, x = f"A/B: {arms[1]} minus {arms[0]} with bootstrap 95% interval", "difference"
    else:
        a = arms[0]
        fig.add_scatter(x=rows[a], y=rows["metric"], mode="markers", name=a,
                        error_x=dict(type="data", symmetric=False, array=(rows[f"{a}_hi"] - rows[a]).fillna(0),
                                     arrayminus=(rows[a] - rows[f"{a}_lo"]).fillna(0)))
        title, x = "Metrics with bootstrap 95% interval", "value"
    fig = _layout(fig, title, x, "")
    fig.update_layout(height=40 + 26 * len(rows))
    fig.update_xaxes(type="linear")
    return fig


def figures(arms: Mapping[str, Sequence[Dialogue]], table: pd.DataFrame | None = None) -> dict[str, go.Figure]:
    table = metrics_table(arms) if table is None else table
    return {"survival": survival_figure(arms), "p_end": p_end_figure(arms), "guardrails": guardrail_figure(arms),
            "comparison": comparison_figure(table)}


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

def report_html(title: str, table: pd.DataFrame, figs: Mapping[str, go.Figure], notes: Sequence[str] = ()) -> str:
    """A self-contained HTML page: plotly.js inline once, then every figure and the metrics table."""
    parts = []
    for index, fig in enumerate(figs.values()):
        parts.append(fig.to_html(full_html=False, include_plotlyjs=(index == 0), default_width="100%"))
    shown = table.copy()
    for column in shown.columns:
        if shown[column].dtype.kind == "f":
            shown[column] = shown[column].map(lambda v: "" if pd.isna(v) else f"{v:.4g}")
    note_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:system-ui,sans-serif;margin:24px;max-width:1100px}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #cbd5e1;padding:3px 6px}"
        "th{background:#f1f5f9}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><ul>{note_html}</ul>"
        f"<h2>Metrics</h2>{shown.to_html(index=False, escape=True, table_id='metrics')}"
        f"<h2>Figures</h2>{''.join(parts)}</body></html>"
    )


def counts(dialogues: Sequence[Dialogue]) -> Counter:
    """Dialogues per ``ended_by``."""
    return Counter(ended_by(d) for d in dialogues)
