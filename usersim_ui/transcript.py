"""Human-readable renderings of a dialogue: badge lines and Markdown transcripts."""

from __future__ import annotations

from .dialogue import Dialogue, Turn

ENDED_BY_TEXT = {"user": "the simulated user ended it", "turn_cap": "the turn cap was reached",
                 "researcher": "the researcher ended it"}


def badge_line(turn: Turn) -> str:
    """One compact line of what is known about a turn: p_end, size, latency, guardrails."""
    parts = []
    if turn.p_end is not None:
        parts.append(f"p_end {turn.p_end:.3f}")
    parts.append(f"{turn.words} words / {turn.tokens} tokens")
    if turn.latency_s is not None:
        parts.append(f"{turn.latency_s:.2f} s")
    parts += [event.badge() for event in turn.guardrails]
    if turn.author == "researcher":
        parts.append("typed by researcher")
    if turn.edited:
        parts.append("edited")
    return " · ".join(parts)


def end_line(dialogue: Dialogue) -> str:
    return f"Dialogue over: {ENDED_BY_TEXT[dialogue.ended_by]}." if dialogue.ended_by else ""


def to_markdown(dialogue: Dialogue) -> str:
    lines = [f"**Intent:** {dialogue.intent}", ""]
    for number, turn in enumerate(dialogue.turns, 1):
        shown = "<|endconversation|>" if turn.ends_dialogue else turn.text
        lines += [f"**{number}. {turn.role}:** {shown}", f"<sub>{badge_line(turn)}</sub>", ""]
    if dialogue.ended_by:
        lines.append(f"_{end_line(dialogue)}_")
    return "\n".join(lines).rstrip() + "\n"
