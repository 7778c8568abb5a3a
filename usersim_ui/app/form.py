"""The page's form, parsed in one place: every value a visitor sends with an event becomes a
validated :class:`Form` here (or a ValueError naming the box) before any handler sees it.

The gradio_client API keeps its positional order (``SETTINGS_FIELDS`` then the backend's
``BACKEND_FIELDS``, then ``EXTRA_FIELDS``); handlers receive one object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from usersim_ui.app import trust
from usersim_ui.assistants.registry import BackendSpec
from usersim_ui.core.dialogue import SamplingSettings
from usersim_ui.core.guardrails import GuardrailSettings
from usersim_ui.core.limits import MAX_TURNS
from usersim_ui.core.seeds import validate_seed
from usersim_ui.core.transitions import RunSettings

# The API's order of the settings boxes (a new box goes at the end, never in the middle).
SETTINGS_FIELDS = ("temperature", "top_p", "max_new_tokens", "seed", "max_turns", "first_token", "no_early_end",
                   "min_turns_before_end", "length", "min_words", "max_words", "repetition", "retry_cap")
EXTRA_FIELDS = ("banned_words", "any_case")  # sent after the backend's boxes
BACKEND_FIELDS = ("kind", "system_prompt", "temperature", "max_tokens", "base_url", "model", "api_key")


# Every box goes through the trust boundary (app/trust.py): numbers, text, URLs, keys, model ids.
number_input = trust.number


def banned_words_from_text(text: str | None) -> tuple[str, ...]:
    """The first-token filter's word list from its comma-separated box."""
    words = tuple(w.strip() for w in trust.text(text, "Banned first words", 2000).split(",") if w.strip())
    if len(words) > 50 or any(len(w) > 40 for w in words):
        raise ValueError("The first-token word list takes at most 50 words of at most 40 characters.")
    return words


def settings_from_inputs(temperature: float, top_p: float, max_new_tokens: float, seed: float, max_turns: float,
                         first_token: bool, no_early_end: bool, min_turns_before_end: float, length: bool,
                         min_words: float, max_words: float, repetition: bool, retry_cap: float,
                         banned_words: str = "I, You, Here", any_case: bool = False) -> RunSettings:
    """The run settings as the panel shows them; 0 minimum turns before ending means 'never end'."""
    trust.raise_refused(seed)  # the other numbers go through trust.number, which refuses a Refused itself
    min_w = int(number_input(min_words, "Min words", 0, 1000))
    max_w = int(number_input(max_words, "Max words", 1, 1000))
    if min_w > max_w:
        raise ValueError(f"Minimum words ({min_w}) is above maximum words ({max_w}).")
    guardrails = GuardrailSettings(
        first_token_filter=bool(first_token), banned_first_words=banned_words_from_text(banned_words),
        first_token_any_case=bool(any_case), no_early_ending=bool(no_early_end),
        min_user_turns_before_end=int(number_input(min_turns_before_end, "Min user turns before ending", 0, 100)) or None,
        length_thresholds=bool(length), min_words=min_w, max_words=max_w, verbatim_repetition=bool(repetition),
        retry_cap=int(number_input(retry_cap, "Retry cap", 0, 32)),
    )
    sampling = SamplingSettings(temperature=number_input(temperature, "Temperature", 0, 2, whole=False),
                                top_p=number_input(top_p, "Top-p", 0.01, 1, whole=False),
                                max_new_tokens=int(number_input(max_new_tokens, "Max new tokens", 1, 1024)),
                                seed=validate_seed(seed))
    return RunSettings(guardrails=guardrails, sampling=sampling,
                              max_turns=int(number_input(max_turns, "Max user turns", 1, MAX_TURNS // 2)))


def guardrail_boxes(guardrails: GuardrailSettings | None = None) -> dict[str, Any]:
    """The guardrail boxes' values, by API name, that :func:`settings_from_inputs` reads back as
    ``guardrails`` (default: the paper's): the page's first values and the MCP tool's settings."""
    g = guardrails or GuardrailSettings()
    return {"first_token": g.first_token_filter, "no_early_end": g.no_early_ending,
            "min_turns_before_end": g.min_user_turns_before_end or 0, "length": g.length_thresholds,
            "min_words": g.min_words, "max_words": g.max_words, "repetition": g.verbatim_repetition,
            "retry_cap": g.retry_cap, "banned_words": ", ".join(g.banned_first_words),
            "any_case": g.first_token_any_case}


def backend_from_inputs(kind: str, system_prompt: str, temperature: float, max_tokens: float, base_url: str,
                        model: str, api_key: str) -> BackendSpec:
    """The assistant's boxes through the trust boundary: a local model only from the host's list,
    the host's key only to an endpoint the host trusts (``trust.backend``)."""
    return trust.backend(kind, system_prompt, temperature, max_tokens, base_url, model, api_key)




@dataclass(frozen=True)
class Form:
    """Everything the page sends with a run: the run's settings and the assistant's spec."""

    settings: RunSettings
    backend: BackendSpec

    @classmethod
    def parse(cls, settings_values: Sequence[Any], backend_values: Sequence[Any], extra_values: Sequence[Any] = ()) -> "Form":
        return cls(settings_from_inputs(*settings_values, *extra_values), backend_from_inputs(*backend_values))
