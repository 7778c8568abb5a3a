"""Wire shapes of ``/v1/completions`` answers (vLLM and llama-server), parsed and checked.

Kept apart from the turn protocol (as vLLM keeps ``protocol.py`` apart from serving): every
value a server sends is untrusted until it passes here. Token ids must lie in the vocabulary,
logprobs must be finite and at most 0; anything else is a :class:`BackendError` naming the
server, never a crash deep in decoding or a P(end) of NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from usersim_ui.core.errors import BackendError

LOGPROB_SLACK = 1e-4  # servers round; a logprob a hair above 0 is 0


@dataclass(frozen=True)
class Failed:
    """A probe that the server refused (HTTP >= 400): a capability it lacks, not an outage."""

    status: int
    text: str


def who(base_url: str) -> str:
    return f"user simulator server {base_url}"


def checked_logprob(value: Any, base_url: str, what: str) -> float | None:
    """A logprob as a float, None when absent; a BackendError when it is not a log-probability."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BackendError(f"{who(base_url)} returned a logprob that is not a number for {what}: {str(value)[:40]}")
    value = float(value)
    if not math.isfinite(value) and value != -math.inf or value > LOGPROB_SLACK:
        raise BackendError(f"{who(base_url)} returned logprob {value!r} for {what}: a log-probability is finite and <= 0")
    return min(value, 0.0)


def checked_ids(ids: list[int], base_url: str, vocab: int) -> list[int]:
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise BackendError(f"{who(base_url)} returned token id {bad[0]}, outside the model's vocabulary of {vocab}: "
                           "is it serving the same model as the tokenizer here?")
    return ids


def first_choice(response: Any, base_url: str) -> dict[str, Any]:
    choices = response.get("choices") if isinstance(response, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise BackendError(f"{who(base_url)} returned no choices")
    return choices[0]


def as_id(token: Any) -> int | None:
    if isinstance(token, int):
        return token
    if isinstance(token, str) and token.startswith("token_id:"):
        try:
            return int(token.split(":", 1)[1])
        except ValueError:
            return None
    return None


def choice_ids(choice: dict[str, Any]) -> list[int] | None:
    """Generated token ids: vLLM's ``token_ids`` or ``token_id:N`` tokens, llama-server's logprob ids."""
    ids = choice.get("token_ids")
    if isinstance(ids, list) and all(isinstance(t, int) for t in ids):
        return list(ids)
    logprobs = choice.get("logprobs")
    if isinstance(logprobs, dict):
        content = logprobs.get("content")
        if isinstance(content, list) and all(isinstance(c, dict) and isinstance(c.get("id"), int) for c in content):
            return [c["id"] for c in content]
        tokens = logprobs.get("tokens")
        if isinstance(tokens, list):
            parsed = [as_id(t) for t in tokens]
            if all(p is not None for p in parsed):
                return parsed  # type: ignore[return-value]
    if choice.get("text") == "":
        return []
    return None


def choice_ids_strict(choice: dict[str, Any], base_url: str, vocab: int) -> list[int]:
    ids = choice_ids(choice)
    if ids is None:
        raise BackendError(f"{who(base_url)} returned text without token ids "
                           "(needs return_token_ids, return_tokens_as_token_ids or logprobs with ids)")
    return checked_ids(ids, base_url, vocab)


def is_cut(choice: dict[str, Any]) -> bool:
    return choice.get("finish_reason") == "length"


def token_logprob(logprobs: dict[str, Any], position: int, base_url: str = "?") -> float | None:
    content = logprobs.get("content")
    if isinstance(content, list):
        if position < len(content) and isinstance(content[position], dict):
            return checked_logprob(content[position].get("logprob"), base_url, f"position {position}")
        return None
    values = logprobs.get("token_logprobs")
    if isinstance(values, list) and position < len(values):
        return checked_logprob(values[position], base_url, f"position {position}")
    return None


def top_at(logprobs: dict[str, Any], position: int, base_url: str = "?") -> dict[int, float]:
    """Token id -> raw logprob among the alternatives reported at ``position``."""
    out: dict[int, float] = {}
    content = logprobs.get("content")
    if isinstance(content, list):
        if position < len(content) and isinstance(content[position], dict):
            for alt in content[position].get("top_logprobs") or []:
                if isinstance(alt, dict) and isinstance(alt.get("id"), int) and alt.get("logprob") is not None:
                    out[alt["id"]] = checked_logprob(alt["logprob"], base_url, f"token {alt['id']}")  # type: ignore[assignment]
        return out
    tops = logprobs.get("top_logprobs")
    if isinstance(tops, list) and position < len(tops) and isinstance(tops[position], dict):
        for token, value in tops[position].items():
            tid = as_id(token)
            if tid is not None and value is not None:
                out[tid] = checked_logprob(value, base_url, f"token {tid}")  # type: ignore[assignment]
    return out
