"""The next user turns of several dialogues in one ``generate()`` call.

Each dialogue is planned exactly as :meth:`UserSimulator.generate_turn` plans it (fitted
prompt, masks, early stop, resampling rounds, seed); then the first sample of every dialogue
goes through one batched call, the guardrails judge each row, and the dialogues that need
retries go through a second batched call (each with its ``retry_cap`` rows, or one row per
round without ``batched_retries``), and so on until every dialogue has its turn.

Inside a call:

* prompts are **left-padded** with an attention mask (position ids follow the mask);
* the **first-token filter** acts only at the first generated position, per row, with each
  dialogue's own banned words (or none);
* the **end marker** is masked only in the rows whose dialogue masks it;
* **p_end** is read per row from the raw logits of the first step (``generation.FirstLogits``),
  before any mask;
* rows **stop** on their own: at a stop token, past their own ``max_words`` (early stop), or
  at their own ``max_new_tokens``;
* **sampling is per dialogue, in one call for all rows**: each dialogue's rows have their own
  temperature, top-p and ``torch.Generator`` seeded with the same seed the single-dialogue
  path uses, and every row is drawn by the one sampler that path uses too
  (``inference.sampling``: a top-k prefilter, exact, with a fallback for flat rows). A row's
  token depends only on its logits, settings and generator, so a batched turn is the turn
  ``generate_turn`` would make with that seed, up to float noise from the padded batch
  (which can, rarely, flip a draw that lands on a boundary). The sampler is a logits
  processor that returns a one-hot score, and ``generate()`` runs greedy over it.

The first call prefills every row in full (the per-dialogue prefix cache is not used here:
rows have different cached lengths); its KV cache is then kept, cut to the padded prompts
(``PromptCache``), and every retry round starts its rows from their dialogue's row in it,
prefilling one token each.
"""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from dataclasses import dataclass
from typing import Any, Generator, Sequence

import torch
from transformers import (
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from usersim_ui.core.dialogue import Dialogue, GuardrailSettings, SamplingSettings, Turn
from usersim_ui.core.errors import GenerationCancelled
from usersim_ui.core.guardrails import count_words
from usersim_ui.core.protocols import OnDraft
from usersim_ui.core.seeds import alternative_seeds
from usersim_ui.inference.generation import FirstLogits, StopOnEvent
from usersim_ui.inference.masks import RowEndSuppressor, RowFirstTokenFilter
from usersim_ui.inference.prefix_cache import crop_to
from usersim_ui.inference.sampling import RowGroup, Sampler
from usersim_ui.users.local import UserSimulator
from usersim_ui.users.turn import Draw, Drawn, TurnPlan, assemble


@dataclass
class Group:
    """The rows of one dialogue in one batched call."""

    plan: TurnPlan
    rows: int
    seed: int
    start: int = 0  # first row in the batch


@dataclass
class SampledRows:
    """What one batched generate() call drew: per row its new ids and whether it was cut, the first
    step's logits, and what the call cost (not a batch *run*: that is ``batch.runner.BatchResult``)."""

    new_ids: list[list[int]]  # per row, cut like ``generation.sample`` cuts it
    truncated: list[bool]
    first_logits: torch.Tensor  # (rows, vocab), raw
    latency_s: float
    prefill_tokens: int  # real (unpadded) prompt tokens prefilled
    padded_tokens: int  # what the batch actually ran, padding included
    cache: "PromptCache | None" = None


class GroupSampler(Sampler):
    """Each dialogue's rows drawn with its own settings and a generator seeded with its draw's
    seed: what ``generation.sample`` does for that dialogue alone, in one call for all rows."""

    def __init__(self, groups: Sequence[Group], device: Any):
        super().__init__([RowGroup.seeded(g.start, g.rows, g.plan.sampling.temperature, g.plan.sampling.top_p,
                                          g.seed, device) for g in groups])


class RowStops(StoppingCriteria):
    """Per-row early stop (more words than the row's ``max_words``) and per-row
    ``max_new_tokens``; remembers where each row was stopped."""

    def __init__(self, tokenizer: Any, prompt_length: int, max_words: Sequence[int | None], max_new: Sequence[int]):
        self.tokenizer, self.prompt_length = tokenizer, prompt_length
        self.max_words, self.max_new = list(max_words), list(max_new)
        self.stopped_at: dict[int, int] = {}

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        made = input_ids.shape[1] - self.prompt_length
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        wordy = [i for i, w in enumerate(self.max_words) if w is not None and i not in self.stopped_at]
        texts = self.tokenizer.batch_decode(input_ids[wordy, self.prompt_length:], skip_special_tokens=True) \
            if wordy else []
        for i, text in zip(wordy, texts):
            if count_words(text) > self.max_words[i]:
                self.stopped_at[i] = made
        for i, limit in enumerate(self.max_new):
            if made >= limit and i not in self.stopped_at:
                self.stopped_at[i] = made
        for i in self.stopped_at:
            done[i] = True
        return done


def batched_sample(simulator: UserSimulator, groups: list[Group], stop_event: threading.Event | None = None,
                   prompt_cache: "PromptCache | None" = None, keep_cache: bool = False) -> SampledRows:
    """One ``generate()`` call for every row of ``groups`` (see the module docstring).

    ``prompt_cache``: the first call's prompts, already prefilled: each row starts from its
    dialogue's row there and prefills one token. ``keep_cache``: return this call's cache as one.
    """
    stop_event = stop_event or threading.Event()
    if stop_event.is_set():
        raise GenerationCancelled("stopped before generating")
    model, fmt = simulator.model, simulator.format
    device = next(model.parameters()).device
    marker, stop_ids = fmt.end_marker_ids(), fmt.stop_ids()
    keep = marker if len(marker) == 1 else []
    ends = list(stop_ids) + [k for k in keep if k not in stop_ids]
    pad = stop_ids[0]
    rows: list[list[int]] = []
    banned, masked, max_words, max_new = [], [], [], []
    for g in groups:
        g.start = len(rows)
        for _ in range(g.rows):
            if g.plan.masked_end:
                masked.append(len(rows))
            rows.append(g.plan.prompt)
            banned.append(g.plan.banned)
            max_words.append(g.plan.stop_after_words)
            max_new.append(g.plan.sampling.max_new_tokens)
    length = prompt_cache.width if prompt_cache is not None else max(len(r) for r in rows)
    extra: dict[str, Any] = {}
    if prompt_cache is not None:
        extra["past_key_values"] = prompt_cache.rows_for(groups)
    input_ids = torch.tensor([[pad] * (length - len(r)) + r for r in rows], dtype=torch.long, device=device)
    attention = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows], dtype=torch.long, device=device)
    stops = RowStops(simulator.tokenizer, length, max_words, max_new)
    processors = [RowFirstTokenFilter(banned, length), RowEndSuppressor(marker, masked), GroupSampler(groups, device)]
    started = time.perf_counter()
    with torch.inference_mode(), FirstLogits(model) as first:
        out = model.generate(
            input_ids=input_ids, attention_mask=attention, do_sample=False, temperature=None, top_p=None, top_k=None,
            max_new_tokens=max(max_new), eos_token_id=ends, pad_token_id=pad, **extra,
            logits_processor=LogitsProcessorList(processors),
            stopping_criteria=StoppingCriteriaList([StopOnEvent(stop_event), stops]),
            return_dict_in_generate=True,
        )
    latency = time.perf_counter() - started
    if stop_event.is_set():
        raise GenerationCancelled("stopped during generation")
    new_ids, truncated = [], []
    for i, row in enumerate(out.sequences[:, length:].tolist()):
        row = row[:stops.stopped_at.get(i, len(row))]
        end = next((j for j, t in enumerate(row) if t in ends), None)
        truncated.append(end is None)
        new_ids.append(row if end is None else (row[:end + 1] if row[end] in keep else row[:end]))
    kept = PromptCache.from_call(out.past_key_values, length, groups) if keep_cache else None
    if prompt_cache is not None:  # every row prefilled its last prompt token only
        prefilled, ran = len(rows), len(rows)
    else:
        prefilled, ran = sum(len(r) for r in rows), length * len(rows)
    return SampledRows(new_ids, truncated, first.value, latency, prefill_tokens=prefilled, padded_tokens=ran,
                       cache=kept)


@dataclass
class PromptCache:
    """The first call's KV cache, cut to its left-padded prompts less their last token, and the
    row each dialogue had there: a retry round starts every row from it and prefills one token
    (as the single-dialogue path's retries do), instead of its dialogue's whole prompt again."""

    cache: Any
    width: int  # the first call's padded prompt length
    row_of: dict[int, int]  # id(plan) -> its first row in the first call

    @classmethod
    def from_call(cls, cache: Any, width: int, groups: Sequence[Group]) -> "PromptCache":
        crop_to(cache, width - 1)
        for layer in cache.layers:  # a crop is a view: copy, so that the generated tokens' storage is freed
            layer.keys, layer.values = layer.keys.contiguous(), layer.values.contiguous()
        return cls(cache, width, {id(g.plan): g.start for g in groups})

    def rows_for(self, groups: Sequence[Group]) -> Any:
        """A new cache with each group's dialogue row repeated once per row of the group (indexed
        straight from the kept one: no copy of the whole cache first)."""
        rows = torch.tensor([self.row_of[id(g.plan)] for g in groups for _ in range(g.rows)], dtype=torch.long)
        out = copy.copy(self.cache)
        out.layers = []
        for layer in self.cache.layers:
            picked = copy.copy(layer)
            picked.keys, picked.values = layer.keys[rows.to(layer.keys.device)], layer.values[rows.to(layer.values.device)]
            out.layers.append(picked)
        return out


@dataclass
class _Pending:
    """One dialogue's turn in flight: its assembly and the draw it waits for."""

    plan: TurnPlan
    turns: Generator[Draw, Drawn, Turn]
    draw: Draw | None = None
    turn: Turn | None = None
    on_draft: OnDraft | None = None


def generate_user_turns(simulator: UserSimulator, dialogues: Sequence[Dialogue], settings_list: Sequence[Any],
                        seeds: Sequence[int | None] | None = None, stop_event: threading.Event | None = None,
                        stats: dict[str, Any] | None = None,
                        on_drafts: Sequence[OnDraft | None] | None = None) -> list[Turn]:
    """The next user turn of each dialogue, the first samples of all of them in one batch.

    ``settings_list``: per dialogue, a ``RunSettings`` (anything with ``guardrails``,
    ``sampling`` and ``context_budget``). ``seeds``: per dialogue, the turn's seed (default: the
    seed scheme's). Each dialogue's turn is assembled by ``users.turn.assemble``, as alone;
    its latency is the wall time of the batched calls it took part in. ``stats`` (a dict)
    receives the number of calls and rows and the tokens prefilled. ``on_drafts``: per dialogue,
    who hears each of its draws as it starts (a batched call has no per-dialogue tokens).
    """
    if len(dialogues) != len(settings_list):
        raise ValueError(f"{len(dialogues)} dialogues but {len(settings_list)} settings")
    seeds = list(seeds) if seeds is not None else [None] * len(dialogues)
    rules = simulator.rules
    pending = []
    listeners = list(on_drafts) if on_drafts is not None else [None] * len(dialogues)
    if len(listeners) != len(dialogues):
        raise ValueError(f"{len(dialogues)} dialogues but {len(listeners)} draft listeners")
    for d, s, seed, on_draft in zip(dialogues, settings_list, seeds, listeners):
        plan = rules.plan(d, s.guardrails, s.sampling, getattr(s, "context_budget", 2048), seed)
        turns = assemble(rules, plan, simulator.model_id)
        pending.append(_Pending(plan, turns, next(turns), on_draft=on_draft))
    stats = stats if stats is not None else {}
    stats.update(calls=0, rows=0, prefill_tokens=0, padded_tokens=0, per_call=[])
    prompts: PromptCache | None = None
    while True:
        active = [p for p in pending if p.turn is None]
        if not active:
            break
        for p in active:
            if p.on_draft is not None:
                p.on_draft(p.draw.draft())  # type: ignore[union-attr]
        groups = [Group(p.plan, p.draw.size, p.draw.seed) for p in active]  # type: ignore[union-attr]
        retries_follow = any(len(p.plan.rounds) > 1 for p in active)
        result = batched_sample(simulator, groups, stop_event, prompt_cache=prompts,
                                keep_cache=prompts is None and retries_follow)
        prompts = prompts or result.cache
        stats["calls"] += 1
        stats["rows"] += len(result.new_ids)
        stats["prefill_tokens"] += result.prefill_tokens
        stats["padded_tokens"] += result.padded_tokens
        stats["per_call"].append((len(result.new_ids), result.prefill_tokens))
        for p, g in zip(active, groups):
            rows = range(g.start, g.start + g.rows)
            first = simulator.first_step(p.plan, result.first_logits[g.start]) if p.draw.first else None  # type: ignore[union-attr]
            drawn = Drawn([(result.new_ids[i], result.truncated[i]) for i in rows], result.latency_s, first)
            try:
                p.draw = p.turns.send(drawn)
            except StopIteration as done:
                p.turn = done.value
    return [p.turn for p in pending]  # type: ignore[misc]


def alternative_turns(simulator: UserSimulator, dialogue: Dialogue, settings: Any, n: int,
                      stop_event: threading.Event | None = None) -> list[Turn]:
    """``n`` next user turns of one dialogue, each with its own seed, in one batched call (a
    fork: "what else could the user say here?"). The first is the turn Step would make there
    (``core.seeds.alternative_seeds``); each is guarded and recorded as any turn is."""
    seeds = alternative_seeds(settings.sampling.seed, len(dialogue.turns), n)
    return generate_user_turns(simulator, [dialogue] * n, [settings] * n, seeds, stop_event)


class BatchedUsers:
    """The batched engine as a :class:`~usersim_ui.core.protocols.UserModel`: ``generate_turns``
    makes many dialogues' turns in one call; ``generate_turn`` is a batch of one."""

    def __init__(self, simulator: UserSimulator):
        self.simulator = simulator

    def __getattr__(self, name: str) -> Any:
        return getattr(self.simulator, name)

    def generate_turns(self, dialogues: Sequence[Dialogue], settings_list: Sequence[Any],
                       seeds: Sequence[int | None] | None = None, stop_event: threading.Event | None = None) -> list[Turn]:
        return generate_user_turns(self.simulator, dialogues, settings_list, seeds, stop_event)

    def generate_turn(self, dialogue: Dialogue, guardrails: GuardrailSettings, sampling: SamplingSettings,
                      context_budget: int = 2048, stop_event: threading.Event | None = None,
                      seed: int | None = None, on_draft: OnDraft | None = None) -> Turn:
        settings = TurnSettings(guardrails, sampling, context_budget)
        return generate_user_turns(self.simulator, [dialogue], [settings], [seed], stop_event, on_drafts=[on_draft])[0]

    async def agenerate_turn(self, dialogue: Dialogue, guardrails: GuardrailSettings, sampling: SamplingSettings,
                             context_budget: int = 2048, stop_event: threading.Event | None = None,
                             seed: int | None = None) -> Turn:
        return await asyncio.to_thread(self.generate_turn, dialogue, guardrails, sampling, context_budget,
                                       stop_event, seed)


@dataclass(frozen=True)
class TurnSettings:
    """What a user turn reads of a run's settings (a ``RunSettings`` has these and more)."""

    guardrails: GuardrailSettings
    sampling: SamplingSettings
    context_budget: int = 2048
