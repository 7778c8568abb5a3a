"""One call to ``generate()`` with cancellation, reproducible seeding and the raw logits of
its first step, shared by the user simulator and the local assistant backend."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList


class GenerationCancelled(RuntimeError):
    """The researcher pressed Stop; the partial turn is discarded, the dialogue kept."""


class StopOnEvent(StoppingCriteria):
    """Lets a UI thread stop ``generate()`` between two tokens."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class StopAfterWords(StoppingCriteria):
    """Stops a sample as soon as it has more words than the length guardrail accepts: it is
    rejected whatever comes next, so its remaining tokens would be wasted compute."""

    def __init__(self, tokenizer: Any, prompt_length: int, max_words: int):
        self.tokenizer, self.prompt_length, self.max_words = tokenizer, prompt_length, max_words

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length:], skip_special_tokens=True)
        return torch.tensor([len(t.split()) > self.max_words for t in texts], dtype=torch.bool, device=input_ids.device)


@dataclass(frozen=True)
class Sample:
    new_ids: list[list[int]]  # one list per sample drawn
    first_logits: torch.Tensor  # raw, before any processor or temperature: shape (vocab,)
    latency_s: float


def sample(model: Any, prompt_ids: Sequence[int], *, stop_ids: Sequence[int], temperature: float, top_p: float,
           max_new_tokens: int, seed: int, processors: Sequence[LogitsProcessor] = (),
           stop_event: threading.Event | None = None, pad_id: int | None = None, num_samples: int = 1,
           stopping: Sequence[StoppingCriteria] = ()) -> Sample:
    """Sample ``num_samples`` continuations of one prompt in one batch.

    Raises :class:`GenerationCancelled` if ``stop_event`` fires.
    """
    stop_event = stop_event or threading.Event()
    if stop_event.is_set():
        raise GenerationCancelled("stopped before generating")
    device = next(model.parameters()).device
    input_ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    do_sample = temperature > 0
    torch.manual_seed(seed)
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
            do_sample=do_sample, temperature=temperature if do_sample else None, top_p=top_p if do_sample else None,
            top_k=None, max_new_tokens=max_new_tokens, eos_token_id=list(stop_ids),
            pad_token_id=pad_id if pad_id is not None else stop_ids[0],
            logits_processor=LogitsProcessorList(processors),
            stopping_criteria=StoppingCriteriaList([StopOnEvent(stop_event), *stopping]),
            num_return_sequences=num_samples, return_dict_in_generate=True, output_logits=True,
        )
    latency = time.perf_counter() - started
    if stop_event.is_set():
        raise GenerationCancelled("stopped during generation")
    rows = []
    for row in out.sequences[:, input_ids.shape[1]:].tolist():
        end = next((i for i, t in enumerate(row) if t in stop_ids), len(row))
        rows.append(row[:end])
    return Sample(rows, out.logits[0][0].float().cpu(), latency)
