"""Dialogue transitions: every function takes a dialogue and returns a new one.

The UI and the command line call only these, so a turn made in a browser and one made in a
script are the same record. A failure raises before anything is returned: the caller's
dialogue is never half-changed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

from .backends import AssistantBackend, ScriptedAssistant
from .dialogue import Dialogue, GuardrailSettings, SamplingSettings, Turn, count_words
from .simulator import UserSimulator

MAX_INTENT_CHARS = 4000


class DialogueOver(RuntimeError):
    """No more turns: the user ended it, the turn cap was hit, or the researcher ended it."""


class NeedsResearcher(RuntimeError):
    """The assistant's turn is the researcher's to type ("You are the assistant")."""


@dataclass(frozen=True)
class RunSettings:
    guardrails: GuardrailSettings = field(default_factory=GuardrailSettings)
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    max_turns: int = 8  # user turns; the assistant answers the last one, then the cap ends it
    context_budget: int = 2048


def validate_intent(intent: str) -> str:
    """The intent is UserLM's only conditioning: it must say something, and fit."""
    intent = (intent or "").strip()
    if not intent:
        raise ValueError("Write a task intent first: the simulated user has nothing else to go on.")
    if len(intent) > MAX_INTENT_CHARS:
        raise ValueError(f"The intent has {len(intent)} characters; keep it under {MAX_INTENT_CHARS}.")
    return intent


def new_dialogue(intent: str, simulator: UserSimulator | None = None, backend: AssistantBackend | None = None) -> Dialogue:
    return Dialogue(intent=validate_intent(intent), user_model=simulator.model_id if simulator else None,
                    assistant_model=backend.name if backend else None)


def ensure_open(dialogue: Dialogue, settings: RunSettings) -> Dialogue:
    """Raise if the dialogue has ended or the next turn would pass the turn cap."""
    ended_by = close_at_cap(dialogue, settings).ended_by
    if ended_by:
        raise DialogueOver(f"The dialogue is over ({ended_by}). Undo, Reset or raise the turn cap to go on.")
    return dialogue


def close_at_cap(dialogue: Dialogue, settings: RunSettings) -> Dialogue:
    if not dialogue.ended_by and dialogue.next_role == "user" and dialogue.user_turns >= settings.max_turns:
        return replace(dialogue, ended_by="turn_cap")
    return dialogue


def user_turn(dialogue: Dialogue, simulator: UserSimulator, settings: RunSettings,
              stop_event: threading.Event | None = None) -> Dialogue:
    """The simulated user's next turn, made with the guardrails as they are set right now."""
    ensure_open(dialogue, settings)
    if dialogue.next_role != "user":
        raise RuntimeError("the assistant has not answered the last user turn yet")
    turn = simulator.generate_turn(dialogue, settings.guardrails, settings.sampling, settings.context_budget, stop_event)
    out = replace(dialogue.with_turn(turn), user_model=simulator.model_id,
                  context_trims=dialogue.context_trims + (turn.context_dropped_turns > 0))
    return replace(out, ended_by="user") if turn.ends_dialogue else out


def assistant_turn(dialogue: Dialogue, backend: AssistantBackend | None, settings: RunSettings,
                   stop_event: threading.Event | None = None) -> Dialogue:
    """The backend's reply; with no backend the researcher must type it."""
    ensure_open(dialogue, settings)
    if dialogue.next_role != "assistant":
        raise RuntimeError("it is the user's turn")
    if backend is None:
        raise NeedsResearcher("You are the assistant: type the reply and press Send.")
    reply = backend.reply(dialogue.messages(), stop_event)
    turn = Turn(role="assistant", text=reply.text, tokens=reply.tokens, words=count_words(reply.text),
                author="script" if isinstance(backend, ScriptedAssistant) else "model", model_id=reply.model_id,
                latency_s=reply.latency_s)
    return close_at_cap(replace(dialogue.with_turn(turn), assistant_model=backend.name), settings)


def researcher_turn(dialogue: Dialogue, text: str, settings: RunSettings) -> Dialogue:
    """A turn typed by the researcher, in whichever role is next."""
    ensure_open(dialogue, settings)
    text = (text or "").strip()
    if not text:
        raise ValueError("The turn is empty.")
    turn = Turn(role=dialogue.next_role, text=text, tokens=0, words=count_words(text), author="researcher")
    return close_at_cap(dialogue.with_turn(turn), settings)


def next_turn(dialogue: Dialogue, simulator: UserSimulator, backend: AssistantBackend | None, settings: RunSettings,
              stop_event: threading.Event | None = None) -> Dialogue:
    if dialogue.next_role == "user":
        return user_turn(dialogue, simulator, settings, stop_event)
    return assistant_turn(dialogue, backend, settings, stop_event)


def run(dialogue: Dialogue, make_turn: Callable[[Dialogue, RunSettings], Dialogue],
        settings_now: Callable[[], RunSettings], max_new_turns: int | None = None) -> Iterator[Dialogue]:
    """Yield the dialogue after each new turn until it ends or ``max_new_turns`` pass.

    ``settings_now`` is asked before every turn, so that a guardrail toggled during an
    auto-run applies to the very next turn; ``make_turn`` lets the UI route turns through
    its GPU-scheduled function.
    """
    made = 0
    while not dialogue.ended_by and (max_new_turns is None or made < max_new_turns):
        settings = settings_now()
        closed = close_at_cap(dialogue, settings)
        if closed.ended_by:
            yield closed
            return
        dialogue = make_turn(dialogue, settings)
        made += 1
        yield dialogue


def auto_run(dialogue: Dialogue, simulator: UserSimulator, backend: AssistantBackend | None, settings: RunSettings,
             stop_event: threading.Event | None = None, max_new_turns: int | None = None) -> Iterator[Dialogue]:
    """:func:`run` with fixed settings and the given models: what scripts want."""
    return run(dialogue, lambda d, s: next_turn(d, simulator, backend, s, stop_event), lambda: settings, max_new_turns)


def undo(dialogue: Dialogue) -> Dialogue:
    """Drop the last turn and reopen the dialogue."""
    if not dialogue.turns:
        raise ValueError("Nothing to undo.")
    return replace(dialogue, turns=dialogue.turns[:-1], ended_by=None)


def regenerate(dialogue: Dialogue, simulator: UserSimulator, backend: AssistantBackend | None, settings: RunSettings,
               stop_event: threading.Event | None = None) -> Dialogue:
    """A new sample of the last turn with the current settings (the seed moves on so it differs)."""
    return next_turn(undo(dialogue), simulator, backend, regeneration_settings(dialogue, settings), stop_event)


def regeneration_settings(dialogue: Dialogue, settings: RunSettings) -> RunSettings:
    """The settings with the seed moved on, so that regenerating gives a new sample."""
    return replace(settings, sampling=replace(settings.sampling, seed=settings.sampling.seed + 1 + len(dialogue.turns)))


def edit_turn(dialogue: Dialogue, index: int, text: str) -> Dialogue:
    """Replace a turn's text by hand; an edited ending turn no longer ends the dialogue."""
    if not 0 <= index < len(dialogue.turns):
        raise ValueError(f"There is no turn {index + 1}.")
    text = (text or "").strip()
    if not text:
        raise ValueError("An edited turn cannot be empty; use Undo to remove it.")
    old = dialogue.turns[index]
    turn = replace(old, text=text, words=count_words(text), edited=True, ends_dialogue=False)
    turns = dialogue.turns[:index] + (turn,) + dialogue.turns[index + 1:]
    ended_by = None if old.ends_dialogue and dialogue.ended_by == "user" else dialogue.ended_by
    return replace(dialogue, turns=turns, ended_by=ended_by)


def end_by_researcher(dialogue: Dialogue) -> Dialogue:
    return dialogue if dialogue.ended_by else replace(dialogue, ended_by="researcher")
