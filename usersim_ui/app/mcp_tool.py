"""The simulated user as one tool for agent developers: the next user turn for an intent and a
history, over the app's API and, with ``USERSIM_MCP=1``, as an MCP tool (gradio builds the
MCP schema from :func:`simulated_user_turn`'s type hints and docstring).

Why a separate endpoint and not the page's ``/next_user_turn``: an agent holds its own history
and wants one stateless call (intent + messages in, the user's turn out), with no page session.
What it shares with the page, so that a turn made here is the turn the page would make:

* every input passes the page's checks: the intent through ``core.transitions.validate_intent``,
  the history through the import's record check (``core.dialogue.dialogue_from_dict``: roles,
  types, ``MAX_TURN_CHARS`` a turn, ``MAX_TURNS`` turns), the numbers through the page's
  settings form (``app.form.settings_from_inputs``);
* the turn is made by the page's own ``handlers.turn_maker`` inside a run registered with
  ``handlers.RUNS`` (the server's run limit, its wall-clock limit), so it waits for the shared
  model slot in line with page runs and runs in the ``@spaces.GPU`` function on ZeroGPU.

Each call is its own run (a fresh session id): two agents' calls never refuse each other as two
runs of one page session would; they queue for the model slot like everybody else.

It returns JSON text, not a dict: gradio's MCP server hands a dict back as its Python ``str()``
(single quotes, ``True``, ``None``), which an agent cannot parse as JSON.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import gradio as gr

from usersim_ui.app.form import guardrail_boxes, settings_from_inputs
from usersim_ui.app.handlers import RUNS, turn_maker, visitor_of
from usersim_ui.app.run_control import RunRefused
from usersim_ui.app.zerogpu import USER_ERRORS, simulator
from usersim_ui.assistants.registry import BackendSpec
from usersim_ui.core import transitions
from usersim_ui.core.dialogue import dialogue_from_dict
from usersim_ui.core.errors import GenerationCancelled
from usersim_ui.core.guardrails import GuardrailSettings
from usersim_ui.core.limits import MAX_IMPORT_BYTES, MAX_TURN_CHARS, MAX_TURNS

API_NAME = "simulated_user_turn"
MAX_HISTORY_CHARS = MAX_IMPORT_BYTES  # a history sent as JSON text: no more than an import file


def parse_history(history: list[dict[str, str]] | str | None) -> list[dict[str, Any]]:
    """The history as a list of ``{role, content}``: given as a list, or as JSON text of one."""
    if history is None or history == "":
        return []
    if isinstance(history, str):
        if len(history) > MAX_HISTORY_CHARS:
            raise ValueError(f"The history has {len(history):,} characters; the limit is {MAX_HISTORY_CHARS:,}.")
        try:
            history = json.loads(history)
        except json.JSONDecodeError as exc:
            raise ValueError(f"The history is not JSON: {exc.msg} at character {exc.pos}.") from None
    if not isinstance(history, list):
        raise ValueError("The history must be a JSON list of {\"role\": \"user\"|\"assistant\", \"content\": \"...\"}.")
    return history


def run_settings(seed: int, temperature: float, top_p: float, max_new_tokens: int, guardrails: bool) -> transitions.RunSettings:
    """The page's settings form with the paper's guardrail values (all on, or all off)."""
    paper = GuardrailSettings()
    return settings_from_inputs(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
                                max_turns=MAX_TURNS // 2, **guardrail_boxes(paper if guardrails else paper.all_off()))


def simulated_user_turn(intent: str, history: list[dict[str, str]] | str = "[]", seed: int = 0,
                        temperature: float = 1.0, top_p: float = 0.8, max_new_tokens: int = 64,
                        guardrails: bool = True, request: gr.Request | None = None) -> str:
    """The simulated user's next turn (UserLM-8b, or offline a prompted SmolLM2 baseline) in a dialogue with your assistant.

    Call it after each assistant reply: it plays a user who wants what the intent says and
    answers the conversation so far. When it returns ends_dialogue=true the user has left.

    Args:
        intent: What the simulated user wants, in the second person, e.g. "You want a Python function that removes duplicates from a list." (at most 4,000 characters).
        history: The conversation so far, oldest first, as a JSON list of {"role": "user" | "assistant", "content": "..."}; empty for the first turn; the last message must be the assistant's. At most 200 messages of 8,000 characters each.
        seed: Base seed (a whole number); the same seed, intent and history give the same turn.
        temperature: Sampling temperature, 0 to 2 (0: greedy).
        top_p: Nucleus sampling mass, 0.01 to 1.
        max_new_tokens: Most tokens the turn may have, 1 to 1024.
        guardrails: Whether UserLM's four guardrails (first-token filter, no early ending, length thresholds, verbatim repetition) are on, at the paper's values.

    Returns:
        JSON text of an object with text (the user's turn), ends_dialogue (whether the user ends the conversation with it), p_end (the probability the user ends it here, read before any guardrail masks the end), seed (the turn's exact seed), guardrails (what each guardrail did) and model (which model played the user).
    """
    try:
        intent = transitions.validate_intent(intent)
        messages = parse_history(history)
        dialogue = dialogue_from_dict({"intent": intent, "messages": messages}, max_text_chars=MAX_TURN_CHARS,
                                      max_turns=MAX_TURNS - 1)
        settings = run_settings(seed, temperature, top_p, max_new_tokens, bool(guardrails))
        if dialogue.next_role != "user":
            raise ValueError("The history ends with a user message: the assistant answers next, not the user.")
        dialogue = transitions.ensure_open(dialogue, settings)
        # each call is its own session, but it counts against its caller's runs like a page's run
        with RUNS.start(f"mcp-{uuid.uuid4().hex}", visitor_of(request)) as run:
            after = turn_maker(BackendSpec(), run, None)(dialogue, settings)
    except GenerationCancelled as exc:
        raise gr.Error(f"The turn was stopped: {exc}", print_exception=False) from None
    except gr.Error:
        raise
    except (RunRefused, *USER_ERRORS) as exc:
        raise gr.Error(str(exc), print_exception=False) from None
    turn = after.turns[-1]
    return json.dumps({"text": turn.text, "ends_dialogue": turn.ends_dialogue, "p_end": turn.p_end, "seed": turn.seed,
                       "guardrails": [e.badge() for e in turn.guardrails],
                       "model": after.user_model or simulator().model_id}, ensure_ascii=False)


def register() -> None:
    """Add the tool, inside a ``gr.Blocks`` being built, as one API endpoint with no component on
    the page (an MCP tool when the app is launched with ``mcp_server=True``). Not queued, like the
    page's runs: the run limit and the model slot bound it, not gradio's queue."""
    gr.api(simulated_user_turn, api_name=API_NAME, queue=False, concurrency_limit=None)
