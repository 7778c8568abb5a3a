"""The guardrails that act inside sampling, as transformers ``LogitsProcessor``s: the
first-token filter and the end mask, for one prompt and per row of a batch."""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import LogitsProcessor, NoBadWordsLogitsProcessor


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


def end_suppressor(marker_ids: Sequence[int], stop_ids: Sequence[int]) -> NoBadWordsLogitsProcessor:
    """Zero probability for the end marker (its last token once the rest is written)."""
    return NoBadWordsLogitsProcessor(bad_words_ids=[list(marker_ids)], eos_token_id=list(stop_ids))


class RowFirstTokenFilter(LogitsProcessor):
    """Per-row banned first tokens, only at the first generated position (``prompt_length``)."""

    def __init__(self, banned: Sequence[Sequence[int]], prompt_length: int):
        self.prompt_length = prompt_length
        self.rows = [(i, torch.tensor(sorted(set(b)), dtype=torch.long)) for i, b in enumerate(banned) if b]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] != self.prompt_length or not self.rows:
            return scores
        scores = scores.clone()
        for row, ids in self.rows:
            scores[row, ids.to(scores.device)] = -float("inf")
        return scores


class RowEndSuppressor(LogitsProcessor):
    """Zero probability for the end marker in the rows that mask it (its last token once the
    rest of it is written, as ``NoBadWordsLogitsProcessor`` does)."""

    def __init__(self, marker: Sequence[int], masked_rows: Sequence[int]):
        self.marker, self.rows = list(marker), list(masked_rows)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.rows:
            return scores
        scores = scores.clone()
        head, last = self.marker[:-1], self.marker[-1]
        for row in self.rows:
            if not head or input_ids[row, -len(head):].tolist() == head:
                scores[row, last] = -float("inf")
        return scores
