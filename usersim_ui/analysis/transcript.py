"""Human-readable renderings of a dialogue: badge lines, a plain-English summary, Markdown transcripts."""

from __future__ import annotations

from usersim_ui.analysis.metrics import (
    GUARDRAIL_LABELS,
    format_probability,
    rejected_words,
    summary,
)
from usersim_ui.analysis.safe_text import literal_line, literal_markdown
from usersim_ui.core.dialogue import Dialogue, Turn

__all__ = ["ENDED_BY_TEXT", "badge_line", "end_line", "format_probability", "summary_text", "to_markdown"]

ENDED_BY_TEXT = {"user": "the simulated user ended it", "turn_cap": "the turn cap was reached",
                 "researcher": "the researcher ended it"}


def badge_line(turn: Turn) -> str:
    """One compact line of what is known about a turn: P(end), the accepted turn's size and the
    rejected samples' sizes apart, latency, guardrails, authorship.

    ``P(end) 2.4e-04 · 12 words / 17 tokens · rejected: 31, 28 words · cut at 25 words · 0.50 s · ...``

    Returned as inert Markdown (``literal_line``): the page renders it (the chat's folded
    titles, the transcript), and a guardrail's detail may come from an imported file."""
    parts = []
    if turn.p_end is not None:
        parts.append(f"P(end) {format_probability(turn.p_end)}")
    parts.append(f"{turn.words} words / {turn.tokens} tokens")
    if turn.rejected:
        parts.append(f"rejected: {', '.join(str(w) for w in rejected_words(turn))} words")
    if turn.truncated:
        parts.append(f"cut at {turn.words} words")
    if turn.latency_s is not None:
        parts.append(f"{turn.latency_s:.2f} s")
    parts += [event.badge() for event in turn.guardrails if event.acted]
    if turn.author == "researcher":
        parts.append("typed by researcher")
    if turn.edited:
        parts.append("edited: its guardrail record is of the text it replaced" if turn.guardrails or turn.rejected
                     else "edited")
    return literal_line(" · ".join(parts))


def end_line(dialogue: Dialogue) -> str:
    return f"Dialogue over: {ENDED_BY_TEXT[dialogue.ended_by]}." if dialogue.ended_by else ""


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _ending(dialogue: Dialogue, running: bool) -> str:
    if dialogue.ended_by == "user":
        at = next((n for n, t in enumerate(dialogue.turns, 1) if t.ends_dialogue), len(dialogue.turns))
        return f"Ended by the simulated user at turn {at}"
    if dialogue.ended_by == "turn_cap":
        return "Ended by the turn cap"
    if dialogue.ended_by == "researcher":
        return "Ended by the researcher"
    return "Still running" if running else "Not ended yet"


def summary_text(dialogue: Dialogue, running: bool = False) -> str:
    """The dialogue in one Markdown line of plain English, e.g.

    ``**6 turns** (3 user) · **Ended by the turn cap** · guardrails acted 4x (first-token filter 2,
    length 2) · 0.67 resamples per user turn · mean P(end) 3.1e-04``

    A resample counts as one action of its guardrail. ``running`` says an auto-run is under way on a
    dialogue that has not ended."""
    s = summary(dialogue)
    parts = [f"**{_plural(s['turns'], 'turn')}** ({s['user_turns']} user)", f"**{_ending(dialogue, running)}**"]
    actions = s["guardrail_actions"]
    if actions:
        each = ", ".join(f"{GUARDRAIL_LABELS.get(k, k)} {v}" for k, v in actions.items())
        parts.append(f"guardrails acted {sum(actions.values())}x ({each})")
    else:
        parts.append("no guardrail acted")
    if s["user_turns"]:
        parts.append(f"{s['mean_resamples_per_user_turn']:.2f} resamples per user turn")
    if s["mean_p_end"] is not None:
        parts.append(f"mean P(end) {format_probability(s['mean_p_end'])}")
    cut = sum(t.truncated for t in dialogue.turns)
    if cut:
        parts.append(f"{_plural(cut, 'turn')} kept although cut short")
    if s["context_trims"]:
        parts.append(f"context trimmed on {_plural(s['context_trims'], 'user turn')}")
    return " · ".join(parts)


def _after_label(text: str) -> str:
    """Text to follow a bold label, shown literally; a code block starts on a line of its own."""
    shown = literal_markdown(text)
    return "\n" + shown if shown.startswith("<pre>") else shown


def to_markdown(dialogue: Dialogue) -> str:
    """The transcript: intent, every turn with its badge line, and how it ended, as Markdown the
    page renders; every text in it shows as written (no HTML, no image or link)."""
    lines = [f"**Intent:** {_after_label(dialogue.intent)}", ""]
    for number, turn in enumerate(dialogue.turns, 1):
        # the end token as UserLM writes it: our constant, which no renderer reads as a tag
        shown = "<|endconversation|>" if turn.ends_dialogue else _after_label(turn.text)
        lines += [f"**{number}. {turn.role}:** {shown}", f"<sub>{badge_line(turn)}</sub>", ""]
    if dialogue.ended_by:
        lines.append(f"_{end_line(dialogue)}_")
    return "\n".join(lines).rstrip() + "\n"
