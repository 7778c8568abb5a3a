"""Plotly figures of a dialogue: turn lengths, P(end) per user turn, and the guardrails per turn.

Every figure is built from the tables in :mod:`usersim_ui.analysis.metrics`, so what the chart shows is
what the turns recorded. Titles sit inside the figure with room above the plot, axis titles are
words, and the legend lies below the x axis title in a bottom margin sized for it.
"""

from __future__ import annotations

import html
import math
import textwrap

import pandas as pd
import plotly.graph_objects as go

from usersim_ui.analysis.metrics import (
    GUARDRAIL_LABELS,
    format_probability,
    guardrail_table,
    turn_table,
)
from usersim_ui.core.dialogue import Dialogue
from usersim_ui.core.guardrails import ACTION_LABELS, count_words

ROLE_COLOURS = {"user": "#2563eb", "assistant": "#f97316"}
MASK_FILL = "rgba(220, 38, 38, 0.13)"
ENDED_COLOUR = "#16a34a"
REJECTED_COLOUR = "#6b7280"
WOULD_HAVE_COLOUR = "#7c3aed"

TOP_MARGIN = 70
MODEBAR_MARGIN = 40  # px at the right for the vertical plot toolbar
LEGEND_ROW_PX = 24
REJECTED_OFFSET = 0.3  # rejected samples sit beside their turn's bar, not on it

P_END_TITLE = "P(end): chance the user ends, per turn"
P_END_Y_TITLE = "Probability the user ends here"
TURN_X_TITLE = "Turn"
MASKED_NAME = "end masked (no-early-ending guardrail)"
WOULD_HAVE_NAME = "would have ended by now (end unmasked)"
P_END_NAME = "P(end) at this user turn"
ENDED_NAME = "user ended here"
REJECTED_NAME = "rejected samples (words)"
ACTION_SYMBOLS = {"masked": "square", "resampled": "circle", "gave_up": "x", "trimmed": "triangle-down"}
ACTION_COLOURS = {"masked": "#dc2626", "resampled": "#2563eb", "gave_up": "#111827", "trimmed": "#9333ea"}


HOVER_CHARS = 28  # per line of a hover label: a 360 px plot shows it whole on either side of a point


def _hover(*lines: str) -> str:
    """A hover label: each line escaped (a record's text is no markup) and wrapped to
    HOVER_CHARS, so that it stays inside a narrow plot instead of running off its edge."""
    return "<br>".join(html.escape(wrapped, quote=False) for line in lines if line
                       for wrapped in textwrap.wrap(line, HOVER_CHARS) or [""])


def _layout(fig: go.Figure, title: str, y_title: str, *, x_title: str = TURN_X_TITLE, legend_rows: int = 2,
            height: int = 360) -> go.Figure:
    """Title inside the figure with a top margin that holds it; the legend pinned to the bottom of the
    figure, under the x axis title, with a bottom margin sized for ``legend_rows`` rows of it."""
    fig.update_layout(
        title=dict(text=title, x=0.02, xanchor="left", y=0.97, yanchor="top", yref="container",
                   font=dict(size=15)),
        height=height, template="plotly_white", hovermode="closest",
        # the toolbar stands down the right edge, in a margin of its own: over the title it hid it
        modebar=dict(orientation="v"), hoverlabel=dict(font=dict(size=11)),
        margin=dict(l=78, r=MODEBAR_MARGIN, t=TOP_MARGIN, b=62 + LEGEND_ROW_PX * legend_rows, autoexpand=True),
        legend=dict(orientation="h", x=0, xanchor="left", y=0.01, yanchor="bottom", yref="container",
                    font=dict(size=11)),
    )
    fig.update_xaxes(title=dict(text=x_title, standoff=8), dtick=1, zeroline=False)
    fig.update_yaxes(title=dict(text=y_title))
    return fig


def _turn_range(dialogue: Dialogue) -> list[float]:
    return [0.4, max(len(dialogue.turns), 1) + 0.6]


def lengths_figure(dialogue: Dialogue, table: pd.DataFrame | None = None) -> go.Figure:
    """Words (bars) and tokens (open diamonds) per turn, user and assistant apart, and beside each
    user turn the word counts of the samples the guardrails rejected (grey open circles)."""
    table = turn_table(dialogue) if table is None else table
    fig = go.Figure()
    for role, colour in ROLE_COLOURS.items():
        rows = table.loc[table["role"] == role]
        hover = [_hover(f"Turn {n} ({role}): {w} words" + (f", cut at {w} words" if cut else ""))
                 for n, w, cut in zip(rows["turn"], rows["words"], rows["truncated"])]
        fig.add_bar(x=rows["turn"].tolist(), y=rows["words"].tolist(), name=f"{role} words", marker_color=colour, width=0.5,
                    hovertext=hover, hovertemplate="%{hovertext}<extra></extra>")
        fig.add_scatter(x=rows["turn"].tolist(), y=rows["tokens"].tolist(), name=f"{role} tokens", mode="markers",
                        marker=dict(color=colour, symbol="diamond-open", size=10),
                        hovertemplate=f"Turn %{{x}} ({role}): %{{y}} tokens<extra></extra>")
    rejected = [(n, count_words(r.text), r.reason) for n, turn in enumerate(dialogue.turns, 1) for r in turn.rejected]
    fig.add_scatter(
        x=[n + REJECTED_OFFSET for n, _, _ in rejected], y=[w for _, w, _ in rejected], name=REJECTED_NAME,
        mode="markers", marker=dict(color=REJECTED_COLOUR, symbol="circle-open", size=9, line=dict(width=1.5)),
        customdata=[n for n, _, _ in rejected],
        hovertext=[_hover(f"Turn {n}: rejected sample of {w} words", why) for n, w, why in rejected],
        hovertemplate="%{hovertext}<extra></extra>")
    fig.update_layout(barmode="overlay")
    fig = _layout(fig, "Turn lengths, with rejected samples", "Words / tokens", legend_rows=2)
    fig.update_xaxes(range=_turn_range(dialogue))
    return fig


def _log_range(values: list[float]) -> list[float]:
    """log10 axis range from below the decade of the smallest value (1e-4 at least) up to just above 1."""
    positive = [v for v in values if v > 0]
    low = math.floor(math.log10(min(positive))) if positive else -4
    return [min(low, -4) - 0.3, 0.15]


def p_end_figure(dialogue: Dialogue, table: pd.DataFrame | None = None, *, log: bool = True) -> go.Figure:
    """P(end) per user turn on a log axis (``log=False`` for a linear one), with exact values on hover.

    Shaded bands mark the user turns where the no-early-ending guardrail masked the end, a star the
    turn that ended the dialogue, and a dashed line the probability that the user would have ended
    by each turn had the end never been masked: ``1 - prod(1 - p_end_i)`` over the user turns so far."""
    table = turn_table(dialogue) if table is None else table
    user = table.loc[(table["role"] == "user") & table["p_end"].notna()]
    turns, p_end = [int(n) for n in user["turn"]], [float(p) for p in user["p_end"]]
    masked, ends = list(user["end_masked"]), list(user["ends"])
    would = [float(v) for v in user["would_have_ended"]]

    y_range = _log_range(p_end + would)
    floor = 10 ** (y_range[0] + 0.1)  # an exact zero is drawn at the bottom of the log axis; its hover says 0

    def shown(values: list[float]) -> list[float]:
        return [v if v > 0 else floor for v in values] if log else values

    fig = go.Figure()
    for k, n in enumerate(n for n, m in zip(turns, masked) if m):
        fig.add_vrect(x0=n - 0.42, x1=n + 0.42, fillcolor=MASK_FILL, line_width=0, layer="below",
                      name=MASKED_NAME, legendgroup="masked", showlegend=k == 0)
    notes = ["end masked by the no-early-ending guardrail" if m else ("the user ended here" if e else "")
             for m, e in zip(masked, ends)]
    fig.add_scatter(
        x=turns, y=shown(p_end), mode="lines+markers", name=P_END_NAME, line=dict(color=ROLE_COLOURS["user"]),
        marker=dict(size=8), hovertext=[_hover(f"Turn {n}: P(end) = {format_probability(p)}", note)
                                        for n, p, note in zip(turns, p_end, notes)],
        hovertemplate="%{hovertext}<extra></extra>")
    fig.add_scatter(
        x=turns, y=shown(would), mode="lines", name=WOULD_HAVE_NAME, line=dict(color=WOULD_HAVE_COLOUR, dash="dash"),
        hovertext=[_hover(f"By turn {n}: {format_probability(w)} chance the user would have ended (end unmasked)")
                   for n, w in zip(turns, would)],
        hovertemplate="%{hovertext}<extra></extra>")
    ended = [(n, p) for n, p, e in zip(turns, p_end, ends) if e]
    fig.add_scatter(
        x=[n for n, _ in ended], y=shown([p for _, p in ended]), mode="markers", name=ENDED_NAME,
        marker=dict(symbol="star", size=17, color=ENDED_COLOUR, line=dict(color="white", width=1)),
        hovertext=[_hover(f"Turn {n}: the user ended the dialogue (P(end) = {format_probability(p)})")
                   for n, p in ended],
        hovertemplate="%{hovertext}<extra></extra>")
    fig = _layout(fig, P_END_TITLE, P_END_Y_TITLE, legend_rows=2, height=380)
    fig.update_xaxes(range=_turn_range(dialogue))
    if log:
        fig.update_yaxes(type="log", range=y_range, exponentformat="power", dtick=1)
    else:
        fig.update_yaxes(type="linear", range=[0, 1.05])
    return fig


def guardrail_figure(dialogue: Dialogue, table: pd.DataFrame | None = None) -> go.Figure:
    """Which guardrail acted on which turn: one row per guardrail, one marker per action (square:
    masked, circle: resampled with the number of resamples written on it, x: gave up at the retry cap),
    with the guardrail's own account of it on hover. ``table`` is :func:`metrics.guardrail_table`."""
    table = guardrail_table(dialogue) if table is None else table
    rows = [k for k in GUARDRAIL_LABELS if k != "context" or (table["guardrail"] == "context").any()]
    fig = go.Figure()
    for action, label in ACTION_LABELS.items():
        events = table.loc[table["action"] == action]
        if action == "trimmed" and events.empty:
            continue
        counts = [int(c) for c in events["count"]]
        hover = [_hover(f"Turn {n} · {GUARDRAIL_LABELS.get(g, g)}: {label}" + (f" {c}x" if action == "resampled" else ""),
                        d)
                 for n, g, c, d in zip(events["turn"], events["guardrail"], counts, events["detail"])]
        fig.add_scatter(
            x=events["turn"].tolist(), y=[GUARDRAIL_LABELS.get(g, g) for g in events["guardrail"]], name=label,
            mode="markers+text" if action == "resampled" else "markers",
            text=[f"{c}x" for c in counts] if action == "resampled" else None, textposition="middle right",
            textfont=dict(size=11, color=ACTION_COLOURS[action]),
            marker=dict(symbol=ACTION_SYMBOLS[action], color=ACTION_COLOURS[action], line=dict(width=2),
                        size=[10 + 3 * min(c, 5) for c in counts] if action == "resampled" else 13),
            customdata=counts, hovertext=hover, hovertemplate="%{hovertext}<extra></extra>")
    fig = _layout(fig, "Guardrails that acted, per turn", "Guardrail", legend_rows=1,
                  height=140 + 34 * len(rows))
    fig.update_xaxes(range=_turn_range(dialogue))
    fig.update_yaxes(type="category", categoryorder="array", categoryarray=[GUARDRAIL_LABELS[k] for k in reversed(rows)],
                     range=[-0.5, len(rows) - 0.5], title=None)
    fig.update_layout(margin=dict(l=130))
    return fig
