"""Other paths through a dialogue: a fork ("what else could the user say here?"), an inline
edit that continues from the edited turn, and the Undo that brings back what they replaced.

Both fork-and-continue and edit-and-continue replace the turns after a point. What they
replaced is kept per session as a *branch*: ``(after, before)``, the dialogue the change made
and the one it replaced. Undo on exactly ``after`` restores ``before``; on anything else it
drops the last turn as always (so turns made after a branch are undone one by one first).
A fork is drawn like a run (registered, stoppable, in the model slot, the GPU function on
ZeroGPU); continuing from one of its turns is a quick transition, refused if the dialogue
changed since the fork was drawn.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

import gradio as gr

from usersim_ui.analysis.safe_text import plain_text
from usersim_ui.app.form import number_input
from usersim_ui.app.handlers import (
    RUNS,
    USER_ERRORS,
    begin,
    guarded,
    refuse,
    stopped_text,
)
from usersim_ui.app.run_control import RunRefused
from usersim_ui.app.zerogpu import run_fork
from usersim_ui.core import transitions
from usersim_ui.core.dialogue import Dialogue, Turn
from usersim_ui.core.errors import GenerationCancelled
from usersim_ui.core.transitions import RunSettings

FORK_DEFAULT = 8
FORK_MAX = 16  # rows of one batched call a visitor may ask for
MAX_BRANCHES = 20  # replaced branches kept per session for Undo
LABEL_CHARS = 240  # of an alternative's text in its card


@dataclass(frozen=True)
class Fork:
    """Alternatives drawn for user turn ``number`` of ``source`` (the dialogue as it was)."""

    source: Dialogue
    number: int
    turns: tuple[Turn, ...]


# ---- branches and Undo --------------------------------------------------------------------

def _branches(session: str) -> list[tuple[Dialogue, Dialogue]]:
    return RUNS.session_data(session).setdefault("branches", [])  # type: ignore[return-value]


def _keep_branch(session: str, after: Dialogue, before: Dialogue) -> None:
    branches = _branches(session)
    branches.append((after, before))
    del branches[:-MAX_BRANCHES]


def _keeping_branch(session: str, change: Callable[[Dialogue], Dialogue]) -> Callable[[Dialogue], Dialogue]:
    """``change`` as a quick transition that keeps what it replaced for Undo."""
    def apply(latest: Dialogue) -> Dialogue:
        made = change(latest)
        _keep_branch(session, made, latest)
        return made
    return apply


def undo(dialogue: Dialogue | None, session: str) -> tuple[Any, ...]:
    """Undo: bring back the turns a fork or an edit replaced if that change is the last thing
    that happened, else drop the last turn."""
    restored: list[bool] = []

    def apply(latest: Dialogue) -> Dialogue:
        branches = _branches(session)
        if branches and branches[-1][0] == latest:
            restored.append(True)
            return branches.pop()[1]
        return transitions.undo(latest)
    return guarded("undo", session, dialogue, apply, "Undo",
                   notice=lambda _made: "Restored the turns the last branch replaced." if restored else None)


# ---- inline edits -------------------------------------------------------------------------

def turn_of_message(index: int) -> int:
    """The turn a chat message belongs to: each turn is its badge, then its text."""
    return index // 2


def edit_and_continue(dialogue: Dialogue | None, number: int, text: str, session: str,
                      count_tokens: Any = None) -> tuple[Any, ...]:
    """Turn ``number`` (1-based) takes the new text and the dialogue continues from it; the turns
    after it are kept as a branch that Undo restores. The edited turn keeps its P(end) (the
    chance of ending *at this position*, which its text does not change) and says that its
    guardrail record belongs to the text it replaced. The one edit, from the chat or the API."""
    def edit(latest: Dialogue) -> Dialogue:
        if not 1 <= number <= len(latest.turns):
            raise ValueError(f"There is no turn {number} to edit.")
        if text.strip() == latest.turns[number - 1].text.strip():
            raise ValueError("The text is unchanged.")
        edited = transitions.edit_turn(latest, number - 1, text, count_tokens)
        return replace(edited, turns=edited.turns[:number],
                       ended_by=None if len(edited.turns) > number else edited.ended_by)
    return guarded("edit_turn", session, dialogue, _keeping_branch(session, edit), "Editing a turn",
                   notice=lambda _made: f"Turn {number} edited. Step continues from it; Undo brings back what it "
                                        "replaced.")


def edit_in_chat(dialogue: Dialogue | None, index: int, value: str, session: str,
                 count_tokens: Any = None) -> tuple[Any, ...]:
    """An edit made in the chat (message ``index``): see :func:`edit_and_continue`."""
    if int(index) % 2 == 0:
        return refuse("That line is the turn's header: edit the text under it.", "edit_turn", session)
    return edit_and_continue(dialogue, turn_of_message(int(index)) + 1, plain_text(strip_speaker(value or "")),
                             session, count_tokens)


_SPEAKER_LINE = re.compile(r"^\*\*[^*\n]{1,40}\*\*\n\n")


def strip_speaker(value: str) -> str:
    """The message text without a speaker line, if an edit kept one."""
    return _SPEAKER_LINE.sub("", value, count=1)


# ---- forks --------------------------------------------------------------------------------

def fork_number(dialogue: Dialogue, asked: Any) -> int:
    """The user turn to fork: the one asked for, else the next turn when the user is next, else
    the last user turn."""
    if asked not in (None, "", 0):
        return int(number_input(asked, "Fork at turn #", 1, 10**6))
    if dialogue.next_role == "user" and not dialogue.ended_by:
        return len(dialogue.turns) + 1
    users = [n for n, t in enumerate(dialogue.turns, 1) if t.role == "user"]
    if not users:
        raise ValueError("There is no user turn to fork yet: press Step first.")
    return users[-1]


def alternative_label(k: int, turn: Turn) -> str:
    """One alternative as its card says it: the text (cut), P(end), and what the guardrails did."""
    text = " ".join(turn.text.split())
    text = text if len(text) <= LABEL_CHARS else text[:LABEL_CHARS - 1] + "…"
    facts = [f"P(end) {turn.p_end:.3g}" if turn.p_end is not None else "P(end) unknown"]
    if turn.ends_dialogue:
        facts.append("ends the dialogue")
    if turn.rejected:
        facts.append(f"{len(turn.rejected)} sample{'s' * (len(turn.rejected) > 1)} rejected")
    acted = [e.guardrail for e in turn.guardrails if e.acted and e.action != "resampled"]
    if acted:
        facts.append("guardrails: " + ", ".join(acted))
    if not turn.rejected and not acted:
        facts.append("no guardrail acted")
    return f"{k}. “{text or '(empty)'}” · {' · '.join(facts)}"


def fork_choices(fork: Fork) -> list[tuple[str, int]]:
    return [(alternative_label(k, t), k - 1) for k, t in enumerate(fork.turns, 1)]


def draw_fork(dialogue: Dialogue | None, intent: str, asked: Any, n: Any, settings: RunSettings, session: str,
              visitor: str | None = None) -> Iterator[tuple[Any, Any]]:
    """Draw ``n`` alternatives of a user turn in one batched call; yields (choices, status). On a
    dialogue with no turn yet it forks the first user turn of the intent in the box."""
    try:
        count = int(number_input(n, "Alternatives", 2, FORK_MAX))
        with RUNS.start(session, visitor) as run:
            latest = begin(RUNS.dialogue(session, dialogue), intent)
            number = fork_number(latest, asked)
            prefix = transitions.fork_point(latest, number)
            yield gr.update(choices=[], value=None), f"Drawing {count} things the user could say at turn {number}…"
            try:
                with RUNS.model_slot(run):
                    turns = run_fork(prefix, settings, count, run.stop)
            except GenerationCancelled:
                RUNS.finish(run, latest)
                yield gr.skip(), stopped_text(run).replace("The dialogue so far is kept.", "Nothing was changed.")
                return
            RUNS.finish(run, latest)
            fork = Fork(latest, number, tuple(turns))
            RUNS.session_data(session)["fork"] = fork
            yield (gr.update(choices=fork_choices(fork), value=None),
                   f"{count} things the user could say at turn {number}, from one batched call. "
                   "Pick one and press **Continue from this one**.")
    except (RunRefused, *USER_ERRORS) as exc:
        refuse(str(exc), "fork", session)
        yield gr.skip(), gr.skip()


def continue_fork(dialogue: Dialogue | None, choice: Any, session: str) -> tuple[Any, ...]:
    """The dialogue continued from the chosen alternative; what it replaced is kept for Undo."""
    fork = RUNS.session_data(session).get("fork")
    if not isinstance(fork, Fork):
        return refuse("Draw alternatives first: press **What else could the user say here?**", "continue_fork",
                      session)
    if choice is None or isinstance(choice, bool) or not isinstance(choice, int) or \
            not 0 <= choice < len(fork.turns):
        return refuse("Pick one of the alternatives first.", "continue_fork", session)

    def take(latest: Dialogue) -> Dialogue:
        if latest != fork.source:
            raise ValueError("The dialogue changed since these alternatives were drawn: draw them again.")
        return transitions.with_user_turn(transitions.fork_point(latest, fork.number), fork.turns[choice])
    replaced = len(fork.source.turns) >= fork.number
    return guarded("continue_fork", session, dialogue, _keeping_branch(session, take),
                   "Continuing from an alternative",
                   notice=lambda _made: f"Continued from alternative {choice + 1} at turn {fork.number}."
                                        + (" Undo brings back the turns it replaced." if replaced else ""))
