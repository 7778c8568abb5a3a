"""The four UserLM guardrails: two logit masks (transformers ``LogitsProcessor``s) and two
resampling checks on the finished text.

Masks act inside ``generate()`` so that the sampled distribution is the guarded one; checks
run after a sample and ask for another, as the paper does.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import torch
from transformers import LogitsProcessor, NoBadWordsLogitsProcessor

from .dialogue import GuardrailSettings, count_words
from .userlm_format import encode_plain

# A logit mask is reported as having acted when it removed at least this much probability.
ACTED_THRESHOLD = 0.01


class FirstTokenFilter(LogitsProcessor):
    """Forbid assistant-like openings ("I", "You", "Here") as the first token of a user turn."""

    def __init__(self, banned_ids: Sequence[int], prompt_length: int):
        self.banned_ids = torch.tensor(sorted(set(banned_ids)), dtype=torch.long)
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] != self.prompt_length or self.banned_ids.numel() == 0:
            return scores
        scores = scores.clone()
        scores[:, self.banned_ids.to(scores.device)] = -float("inf")
        return scores


def banned_first_token_ids(tokenizer: Any, words: Sequence[str], any_case: bool = False) -> list[int]:
    """Single-token spellings of the banned words, with and without a leading space: as written
    (the published rule: "I", "You", "Here"), or also lower, upper and capitalised with ``any_case``."""
    ids: set[int] = set()
    for word in words:
        variants = {word, word.lower(), word.upper(), word.capitalize()} if any_case else {word}
        for variant in variants:
            for spelled in (variant, " " + variant):
                pieces = encode_plain(tokenizer, spelled)
                if len(pieces) == 1:
                    ids.add(pieces[0])
    return sorted(ids)


def end_suppressor(marker_ids: Sequence[int], stop_ids: Sequence[int]) -> NoBadWordsLogitsProcessor:
    """Zero probability for the end marker (its last token once the rest is written)."""
    return NoBadWordsLogitsProcessor(bad_words_ids=[list(marker_ids)], eos_token_id=list(stop_ids))


def end_is_masked(settings: GuardrailSettings, user_turns_so_far: int) -> bool:
    """Whether the no-early-ending guardrail forbids ending the next user turn: the user must
    have written ``min_user_turns_before_end`` turns first (None: never, the paper's setting)."""
    if not settings.no_early_ending:
        return False
    minimum = settings.min_user_turns_before_end
    return minimum is None or user_turns_so_far < minimum


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def length_violation(text: str, settings: GuardrailSettings) -> str | None:
    """Reason to resample when the turn is too short or too long, else None."""
    if not settings.length_thresholds:
        return None
    words = count_words(text)
    if words < settings.min_words or words > settings.max_words:
        return f"{words} words"
    return None


def repetition_violation(text: str, earlier_user_turns: Sequence[str], intent: str,
                         settings: GuardrailSettings) -> str | None:
    """Reason to resample when the turn repeats an earlier user turn or copies the intent."""
    if not settings.verbatim_repetition:
        return None
    norm = normalise(text)
    if not norm:
        return None
    for index, earlier in enumerate(earlier_user_turns, 1):
        if norm == normalise(earlier):
            return f"repeats user turn {index}"
    if norm == normalise(intent) or normalise(intent) in norm:
        return "copies the intent"
    return None


def rejection_reason(text: str, earlier_user_turns: Sequence[str], intent: str,
                     settings: GuardrailSettings) -> str | None:
    """``"<guardrail>: <why>"`` for the first resampling guardrail the turn fails, else None."""
    why = length_violation(text, settings)
    if why:
        return f"length: {why}"
    why = repetition_violation(text, earlier_user_turns, intent, settings)
    return f"repetition: {why}" if why else None
