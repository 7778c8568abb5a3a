"""Dialogue transitions: every function takes a dialogue and returns a new one.

The UI and the command line call only these, so a turn made in a browser and one made in a
script are the same record. A failure raises before anything is returned: the caller's
dialogue is never half-changed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

from usersim_ui.core.dialogue import (
    Dialogue,
    GuardrailSettings,
    SamplingSettings,
    Turn,
    count_words,
)
from usersim_ui.core.errors import DialogueOver, NeedsResearcher
from usersim_ui.core.limits import MAX_INTENT_CHARS, MAX_TURNS, check_text
from usersim_ui.core.protocols import AssistantBackend, OnDraft, UserModel
from usersim_ui.core.seeds import regenerated_seed, turn_seed

TokenCounter = Callable[[str], int]



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
    return check_text(intent, "The intent", MAX_INTENT_CHARS)


def new_dialogue(intent: str, simulator: UserModel | None = None, backend: AssistantBackend | None = None) -> Dialogue:
    return Dialogue(intent=validate_intent(intent), user_model=simulator.model_id if simulator else None,
                    assistant_model=backend.name if backend else None)


def ensure_open(dialogue: Dialogue, settings: RunSettings) -> Dialogue:
    """The dialogue ready for another turn (reopened if the cap that ended it was raised);
    raise if it has ended or the next turn would pass the turn cap."""
    dialogue = reopen_if_cap_raised(dialogue, settings)
    ended_by = close_at_cap(dialogue, settings).ended_by
    if ended_by == "turn_cap":
        raise DialogueOver(f"The dialogue reached the turn cap ({settings.max_turns} user turns). "
                           "Raise the cap, Undo or Reset to go on.")
    if ended_by:
        who = "the simulated user" if ended_by == "user" else "the researcher"
        raise DialogueOver(f"The dialogue is over: {who} ended it. Undo or Reset to go on.")
    if len(dialogue.turns) >= MAX_TURNS:
        raise DialogueOver(f"The dialogue has {MAX_TURNS} turns, the most one dialogue may hold.")
    return dialogue


def reopen_if_cap_raised(dialogue: Dialogue, settings: RunSettings) -> Dialogue:
    """A dialogue the turn cap ended goes on once the cap is above its user turns."""
    if dialogue.ended_by == "turn_cap" and dialogue.user_turns < settings.max_turns:
        return replace(dialogue, ended_by=None)
    return dialogue


def close_at_cap(dialogue: Dialogue, settings: RunSettings) -> Dialogue:
    if not dialogue.ended_by and dialogue.next_role == "user" and dialogue.user_turns >= settings.max_turns:
        return replace(dialogue, ended_by="turn_cap")
    return dialogue


def user_turn(dialogue: Dialogue, simulator: UserModel, settings: RunSettings,
              stop_event: threading.Event | None = None, seed: int | None = None,
              on_draft: OnDraft | None = None) -> Dialogue:
    """The simulated user's next turn, made with the guardrails as they are set right now.

    ``seed``: the turn's exact seed (default: the seed scheme's for this position).
    """
    dialogue = ensure_open(dialogue, settings)
    if dialogue.next_role != "user":
        raise ValueError("It is the assistant's turn: the last user turn has no reply yet.")
    seed = turn_seed(settings.sampling.seed, len(dialogue.turns)) if seed is None else seed
    turn = simulator.generate_turn(dialogue, settings.guardrails, settings.sampling, settings.context_budget,
                                   stop_event, seed=seed, on_draft=on_draft)
    return with_user_turn(dialogue, turn)


def with_user_turn(dialogue: Dialogue, turn: Turn) -> Dialogue:
    """The dialogue with a simulated user's turn added (made now, or chosen among a fork's
    alternatives): the model that wrote it, a context trim, an ending, all recorded alike."""
    if dialogue.next_role != "user" or dialogue.ended_by:
        raise ValueError("A user turn can only follow an assistant turn of an open dialogue.")
    out = replace(dialogue.with_turn(turn), user_model=turn.model_id or dialogue.user_model,
                  context_trims=dialogue.context_trims + (turn.context_dropped_turns > 0))
    return replace(out, ended_by="user") if turn.ends_dialogue else out


def fork_point(dialogue: Dialogue, turn_number: int) -> Dialogue:
    """The dialogue just before user turn ``turn_number`` (1-based, counting all turns; the
    next turn's number forks there): what a fork draws its alternatives from."""
    index = int(turn_number) - 1
    if not 0 <= index <= len(dialogue.turns):
        raise ValueError(f"There is no turn {turn_number}: the dialogue has {len(dialogue.turns)} turns.")
    prefix = replace(dialogue, turns=dialogue.turns[:index], ended_by=None)
    if prefix.next_role != "user":
        raise ValueError(f"Turn {turn_number} is the assistant's: a fork asks what else the *user* could say.")
    return prefix


def assistant_turn(dialogue: Dialogue, backend: AssistantBackend | None, settings: RunSettings,
                   stop_event: threading.Event | None = None, seed: int | None = None,
                   on_draft: OnDraft | None = None) -> Dialogue:
    """The backend's reply; with no backend the researcher must type it."""
    dialogue = ensure_open(dialogue, settings)
    if dialogue.next_role != "assistant":
        raise ValueError("It is the user's turn: the assistant has answered already.")
    if backend is None:
        raise NeedsResearcher("You are the assistant: type the reply and press Send.")
    seed = turn_seed(settings.sampling.seed, len(dialogue.turns)) if seed is None else seed
    reply = backend.reply(dialogue.messages(), stop_event, seed=seed, on_draft=on_draft)
    turn = Turn(role="assistant", text=reply.text, tokens=reply.tokens, words=count_words(reply.text),
                author=getattr(backend, "author", "model"), model_id=reply.model_id,
                latency_s=reply.latency_s, seed=seed, truncated=reply.truncated)
    return close_at_cap(replace(dialogue.with_turn(turn), assistant_model=backend.name), settings)


def _typed_text(text: str, what: str) -> str:
    text = check_text((text or "").strip(), what)
    if not text:
        raise ValueError(f"{what} is empty.")
    return text


def researcher_turn(dialogue: Dialogue, text: str, settings: RunSettings,
                    count_tokens: TokenCounter | None = None) -> Dialogue:
    """A turn typed by the researcher, in whichever role is next; ``count_tokens`` (the user
    model's tokenizer) gives it a token count comparable with the model's turns."""
    dialogue = ensure_open(dialogue, settings)
    text = _typed_text(text, "The typed turn")
    turn = Turn(role=dialogue.next_role, text=text, tokens=count_tokens(text) if count_tokens else 0,
                words=count_words(text), author="researcher")
    return close_at_cap(dialogue.with_turn(turn), settings)


def next_turn(dialogue: Dialogue, simulator: UserModel, backend: AssistantBackend | None, settings: RunSettings,
              stop_event: threading.Event | None = None, seed: int | None = None,
              on_draft: OnDraft | None = None) -> Dialogue:
    if dialogue.next_role == "user":
        return user_turn(dialogue, simulator, settings, stop_event, seed, on_draft)
    return assistant_turn(dialogue, backend, settings, stop_event, seed, on_draft)


def run(dialogue: Dialogue, make_turn: Callable[[Dialogue, RunSettings], Dialogue],
        settings_now: Callable[[], RunSettings], max_new_turns: int | None = None) -> Iterator[Dialogue]:
    """Yield the dialogue after each new turn until it ends or ``max_new_turns`` pass.

    ``settings_now`` is asked before every turn, so that a guardrail toggled during an
    auto-run applies to the very next turn; ``make_turn`` lets the UI route turns through
    its GPU-scheduled function.
    """
    made = 0
    dialogue = reopen_if_cap_raised(dialogue, settings_now())
    while not dialogue.ended_by and (max_new_turns is None or made < max_new_turns):
        settings = settings_now()
        closed = close_at_cap(dialogue, settings)
        if closed.ended_by:
            yield closed
            return
        dialogue = make_turn(dialogue, settings)
        made += 1
        yield dialogue


def auto_run(dialogue: Dialogue, simulator: UserModel, backend: AssistantBackend | None, settings: RunSettings,
             stop_event: threading.Event | None = None, max_new_turns: int | None = None) -> Iterator[Dialogue]:
    """:func:`run` with fixed settings and the given models: what scripts want."""
    return run(dialogue, lambda d, s: next_turn(d, simulator, backend, s, stop_event), lambda: settings, max_new_turns)


def undo(dialogue: Dialogue) -> Dialogue:
    """Drop the last turn and reopen the dialogue."""
    if not dialogue.turns:
        raise ValueError("Nothing to undo.")
    return replace(dialogue, turns=dialogue.turns[:-1], ended_by=None)


def regenerate(dialogue: Dialogue, simulator: UserModel, backend: AssistantBackend | None, settings: RunSettings,
               stop_event: threading.Event | None = None) -> Dialogue:
    """A new sample of the last turn with the current settings and a new seed."""
    return next_turn(undo(dialogue), simulator, backend, settings, stop_event, regeneration_seed(dialogue, settings))


def regeneration_seed(dialogue: Dialogue, settings: RunSettings) -> int:
    """The seed for a new sample of the last turn: new on every press, recorded on the turn."""
    if not dialogue.turns:
        raise ValueError("Nothing to regenerate.")
    return regenerated_seed(dialogue.turns[-1].seed, settings.sampling.seed, len(dialogue.turns) - 1)


def edit_turn(dialogue: Dialogue, index: int, text: str, count_tokens: TokenCounter | None = None) -> Dialogue:
    """Replace a turn's text by hand; an edited ending turn no longer ends the dialogue.

    Its token count is recounted (``count_tokens``, else 0: unknown) so charts stay honest.
    """
    if not 0 <= index < len(dialogue.turns):
        raise ValueError(f"There is no turn {index + 1}: the dialogue has {len(dialogue.turns)}.")
    text = (text or "").strip()
    if not text:
        raise ValueError("An edited turn cannot be empty; use Undo to remove it.")
    text = check_text(text, "The edited turn")
    old = dialogue.turns[index]
    turn = replace(old, text=text, words=count_words(text), tokens=count_tokens(text) if count_tokens else 0,
                   edited=True, ends_dialogue=False, truncated=False)
    turns = dialogue.turns[:index] + (turn,) + dialogue.turns[index + 1:]
    ended_by = None if old.ends_dialogue and dialogue.ended_by == "user" else dialogue.ended_by
    return replace(dialogue, turns=turns, ended_by=ended_by)


def end_by_researcher(dialogue: Dialogue) -> Dialogue:
    return dialogue if dialogue.ended_by else replace(dialogue, ended_by="researcher")
