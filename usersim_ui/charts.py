"""Plotly figures of a dialogue: turn lengths, and p_end per user turn."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from .dialogue import Dialogue
from .metrics import turn_table

ROLE_COLOURS = {"user": "#2563eb", "assistant": "#f97316"}


def _layout(fig: go.Figure, title: str, y_title: str) -> go.Figure:
    fig.update_layout(title=title, xaxis_title="turn", yaxis_title=y_title, height=300,
                      margin=dict(l=40, r=10, t=40, b=30), legend=dict(orientation="h", y=-0.25), template="plotly_white")
    fig.update_xaxes(dtick=1)
    return fig


def lengths_figure(dialogue: Dialogue, table: pd.DataFrame | None = None) -> go.Figure:
    """Words (bars) and tokens (dotted markers) per turn, user and assistant apart."""
    table = turn_table(dialogue) if table is None else table
    fig = go.Figure()
    for role, colour in ROLE_COLOURS.items():
        rows = table.loc[table["role"] == role]
        fig.add_bar(x=rows["turn"], y=rows["words"], name=f"{role} words", marker_color=colour)
        fig.add_scatter(x=rows["turn"], y=rows["tokens"], name=f"{role} tokens", mode="markers",
                        marker=dict(color=colour, symbol="diamond-open", size=10))
    return _layout(fig, "Turn lengths", "words / tokens")


def p_end_figure(dialogue: Dialogue, table: pd.DataFrame | None = None) -> go.Figure:
    """p_end per user turn; an X where the no-early-ending guardrail masked the end."""
    table = turn_table(dialogue) if table is None else table
    user = table.loc[(table["role"] == "user") & table["p_end"].notna()]
    fig = go.Figure()
    fig.add_scatter(x=user["turn"], y=user["p_end"], mode="lines+markers", name="p_end", line=dict(color=ROLE_COLOURS["user"]))
    masked = user.loc[user["end_masked"]]
    fig.add_scatter(x=masked["turn"], y=masked["p_end"], mode="markers", name="end masked by guardrail",
                    marker=dict(symbol="x", size=13, color="#dc2626"))
    ended = user.loc[user["ends"]]
    fig.add_scatter(x=ended["turn"], y=ended["p_end"], mode="markers", name="user ended",
                    marker=dict(symbol="star", size=15, color="#16a34a"))
    fig = _layout(fig, "End-of-conversation probability per user turn", "p_end")
    fig.update_yaxes(range=[0, 1.05])
    return fig
