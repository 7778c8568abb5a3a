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


@dataclass(frozen=True)
class Sample:
    new_ids: list[int]
    first_logits: torch.Tensor  # raw, before any processor or temperature: shape (vocab,)
    latency_s: float


def sample(model: Any, prompt_ids: Sequence[int], *, stop_ids: Sequence[int], temperature: float, top_p: float,
           max_new_tokens: int, seed: int, processors: Sequence[LogitsProcessor] = (),
           stop_event: threading.Event | None = None, pad_id: int | None = None) -> Sample:
    """Sample one continuation; raises :class:`GenerationCancelled` if ``stop_event`` fires."""
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
            stopping_criteria=StoppingCriteriaList([StopOnEvent(stop_event)]),
            return_dict_in_generate=True, output_logits=True,
        )
    latency = time.perf_counter() - started
    if stop_event.is_set():
        raise GenerationCancelled("stopped during generation")
    new_ids = out.sequences[0, input_ids.shape[1]:].tolist()
    while new_ids and new_ids[-1] in stop_ids:
        new_ids.pop()
    return Sample(new_ids, out.logits[0][0].float().cpu(), latency)
