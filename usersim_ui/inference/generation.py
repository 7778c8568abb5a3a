"""One call to ``generate()`` with cancellation, reproducible seeding and the raw logits of
its first step, shared by the user simulator and the local assistant backend."""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from usersim_ui.core.errors import GenerationCancelled
from usersim_ui.core.guardrails import count_words
from usersim_ui.core.protocols import Draft, OnDraft
from usersim_ui.inference.sampling import RowGroup, Sampler

OnStep = Callable[[list[int]], None]  # hears the first row's new ids after each step


def draft_stream(tokenizer: Any, on_draft: OnDraft | None, role: str, stop_ids: Sequence[int] = ()) -> OnStep | None:
    """The ``on_step`` that turns the first row's ids into the :class:`Draft` the page shows
    (decoded as the finished turn will be, cut at its first stop id: a finished row is padded
    with one)."""
    if on_draft is None:
        return None
    stops = set(stop_ids)

    def step(ids: list[int]) -> None:
        end = next((i for i, t in enumerate(ids) if t in stops), len(ids))
        on_draft(Draft(role, tokenizer.decode(ids[:end], skip_special_tokens=True), end))
    return step


class StopOnEvent(StoppingCriteria):
    """Lets another thread stop ``generate()`` between two tokens; ``on_step`` hears the first
    row's new ids after each step (the page streams them; the GPU worker's yields double as the
    heartbeat at which it sees Stop)."""

    def __init__(self, event: threading.Event, on_step: OnStep | None = None, prompt_length: int = 0):
        self.event, self.on_step, self.prompt_length = event, on_step, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        if self.on_step is not None:
            self.on_step(input_ids[0, self.prompt_length:].tolist())
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class StopAfterWords(StoppingCriteria):
    """Stops a sample as soon as it has more words than the length guardrail accepts: it is
    rejected whatever comes next, so its remaining tokens would be wasted compute."""

    def __init__(self, tokenizer: Any, prompt_length: int, max_words: int):
        self.tokenizer, self.prompt_length, self.max_words = tokenizer, prompt_length, max_words

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length:], skip_special_tokens=True)
        return torch.tensor([count_words(t) > self.max_words for t in texts], dtype=torch.bool, device=input_ids.device)


class FirstLogits:
    """The raw logits of a ``generate()`` call's first step (what p_end is read from), taken
    from the model's own output by a forward hook.

    ``generate(output_logits=True)`` would give them too, but keeps a float32 (rows, vocab)
    copy of *every* step: 0.5 MB per row and token at Llama-3's 128k vocabulary, 250 MB for a
    5-row retry round of 96 tokens, gigabytes for a batch of dialogues. The hook keeps one.
    Only calls from the thread that entered are seen, in case another thread uses the model.
    """

    def __init__(self, model: Any):
        self.model, self.value, self._thread = model, None, threading.get_ident()

    def _hook(self, _module: Any, _args: Any, output: Any) -> None:
        if self.value is None and threading.get_ident() == self._thread:
            self.value = output.logits[:, -1, :].float().cpu()

    def __enter__(self) -> "FirstLogits":
        self._handle = self.model.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()
        if exc[0] is None and self.value is None:
            raise RuntimeError("the model's forward never ran in this thread: p_end has no logits to read")


def decoder_layers(model: Any) -> list[Any]:
    """The model's stack of decoder layers (Llama-style ``model.layers`` and the other common
    layouts); the whole model when none is found (then Stop is seen per forward pass only)."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is not None and len(obj) > 0:
            return list(obj)
    return [model]


class StopInForward:
    """Lets Stop end a prompt's read-in (the first forward pass of a call) part-way.

    ``StopOnEvent`` is asked only after each generated token, so a long prompt's read-in (one
    forward over thousands of tokens: 37 s for an 8,000-character turn through SmolLM2-135M on
    a shared 2-core CPU, over a second per decoder layer) could not be stopped, and held the
    shared model that long. During the first forward pass a pre-forward hook on every module
    of every decoder layer (its norms, projections, attention and MLP) raises
    :class:`GenerationCancelled` once the event is set, so Stop takes effect within one matrix
    product. The hooks go when that pass ends: a decode step is one token, and ``StopOnEvent``
    covers it. No computation changes (outputs are the same to the bit), and only calls from the
    thread that entered are stopped, as another thread may use the same model.
    """

    def __init__(self, model: Any, event: threading.Event):
        self.model, self.event, self._thread = model, event, threading.get_ident()
        self._handles: list[Any] = []

    def _check(self, _module: Any, _args: Any) -> None:
        if self.event.is_set() and threading.get_ident() == self._thread:
            raise GenerationCancelled("stopped while reading the prompt in")

    def _first_pass_done(self, _module: Any, _args: Any, _output: Any) -> None:
        if threading.get_ident() == self._thread:
            self._remove()

    def _remove(self) -> None:
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    def __enter__(self) -> "StopInForward":
        self._handles = [module.register_forward_pre_hook(self._check)
                         for layer in decoder_layers(self.model) for module in layer.modules()]
        self._handles.append(self.model.register_forward_hook(self._first_pass_done))
        return self

    def __exit__(self, *exc: Any) -> None:
        self._remove()


@dataclass(frozen=True)
class Sample:
    new_ids: list[list[int]]  # one list per sample drawn, cut before its stop token (a kept id stays)
    first_logits: torch.Tensor  # raw, before any processor or temperature: shape (vocab,)
    latency_s: float
    truncated: list[bool]  # per sample: no stop token came (max_new_tokens or a stopping criterion cut it)
    cache: Any = None  # with ``return_cache``: generate's KV cache (prompt + generated tokens, one row)
    prefilled_tokens: int = 0  # prompt tokens this call had to prefill (the rest came from ``past_key_values``)


def sample(model: Any, prompt_ids: Sequence[int], *, stop_ids: Sequence[int], temperature: float, top_p: float,
           max_new_tokens: int, seed: int, processors: Sequence[LogitsProcessor] = (),
           stop_event: threading.Event | None = None, pad_id: int | None = None, num_samples: int = 1,
           stopping: Sequence[StoppingCriteria] = (), keep_ids: Sequence[int] = (),
           on_step: OnStep | None = None, past_key_values: Any = None,
           return_cache: bool = False) -> Sample:
    """Sample ``num_samples`` continuations of one prompt in one batch (greedy at temperature 0,
    where one sample is all there is).

    ``keep_ids`` also end a sample but stay in it (UserLM's ``<|endconversation|>``: the turn
    ends there and what would follow is junk). Raises :class:`GenerationCancelled` if
    ``stop_event`` fires, within one token or, during the prompt's read-in, one decoder layer.

    ``past_key_values``: a one-row KV cache over a strict prefix of ``prompt_ids`` (see
    ``prefix_cache``); only the rest is prefilled. It is used up (generate grows it); for
    ``num_samples > 1`` a per-row copy is made and the original is left as it was.
    ``return_cache``: hand back generate's cache (one sample only) so that it can be kept.
    ``on_step``: hears the first row's new ids after each token (what streams to the page).
    """
    stop_event = stop_event or threading.Event()
    if stop_event.is_set():
        raise GenerationCancelled("stopped before generating")
    device = next(model.parameters()).device
    input_ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    do_sample = temperature > 0
    if not do_sample and num_samples > 1:
        raise ValueError("greedy decoding gives one sample; ask for num_samples=1 at temperature 0")
    ends = list(stop_ids) + [k for k in keep_ids if k not in stop_ids]
    cached = int(past_key_values.get_seq_length()) if past_key_values is not None else 0
    if cached >= len(prompt_ids):
        raise ValueError(f"the cache covers {cached} tokens of a {len(prompt_ids)}-token prompt; at least one must be new")
    batch_ids = input_ids.repeat_interleave(num_samples, dim=0) if num_samples > 1 else input_ids
    extra: dict[str, Any] = {}
    if past_key_values is not None:
        if num_samples > 1:  # expanded per row like the ids
            past_key_values = copy.deepcopy(past_key_values)
            past_key_values.batch_repeat_interleave(num_samples)
        extra["past_key_values"] = past_key_values
    # The one sampler (inference.sampling), its uniforms from a generator seeded with ``seed``:
    # the batched engine draws each dialogue's rows the same way, so both give the same tokens.
    sampler = [Sampler([RowGroup.seeded(0, num_samples, temperature, top_p, seed, device)])] if do_sample else []
    started = time.perf_counter()
    with torch.inference_mode(), FirstLogits(model) as first, StopInForward(model, stop_event):
        out = model.generate(
            input_ids=batch_ids, attention_mask=torch.ones_like(batch_ids), **extra,
            do_sample=False, temperature=None, top_p=None, top_k=None, max_new_tokens=max_new_tokens,
            eos_token_id=ends, pad_token_id=pad_id if pad_id is not None else stop_ids[0],
            logits_processor=LogitsProcessorList([*processors, *sampler]),
            stopping_criteria=StoppingCriteriaList([StopOnEvent(stop_event, on_step, len(prompt_ids)), *stopping]),
            return_dict_in_generate=True,
        )
    latency = time.perf_counter() - started
    if stop_event.is_set():
        raise GenerationCancelled("stopped during generation")
    rows, truncated = [], []
    for row in out.sequences[:, input_ids.shape[1]:].tolist():
        end = next((i for i, t in enumerate(row) if t in ends), None)
        truncated.append(end is None)
        if end is None:
            rows.append(row)
        else:
            rows.append(row[:end + 1] if row[end] in keep_ids else row[:end])
    cache = getattr(out, "past_key_values", None) if return_cache and num_samples == 1 else None
    return Sample(rows, first.value[0], latency, truncated, cache=cache,
                  prefilled_tokens=len(prompt_ids) - cached)
