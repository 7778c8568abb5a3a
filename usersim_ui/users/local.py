"""The simulated user on an in-process transformers model: one guarded user turn per call,
with its end-of-conversation probability read from the generating forward pass.

What a turn means (fitting, masks, rounds, seeds, decoding, events) is ``users.turn``'s; this
module only draws: the first sample alone (through the per-dialogue prefix cache), the
retries of a round as one batch that reuses the prompt's KV cache.
"""

from __future__ import annotations

import asyncio
import copy
import math
import threading
from typing import Any, Sequence

import torch

from usersim_ui.core.dialogue import Dialogue, GuardrailSettings, SamplingSettings, Turn
from usersim_ui.core.protocols import OnDraft
from usersim_ui.inference.generation import OnStep, StopAfterWords, sample
from usersim_ui.inference.masks import FirstTokenFilter, end_suppressor
from usersim_ui.inference.model_loading import LoadedModel, load_smollm2, load_userlm
from usersim_ui.inference.prefix_cache import PrefixCache, crop_to
from usersim_ui.prompts.formats import PromptedUserFormat, PromptFormat, UserLMFormat
from usersim_ui.prompts.userlm import USERLM_MODEL_ID
from usersim_ui.users.turn import Drawn, FirstStep, TurnPlan, TurnRules, assemble

_DEFAULT_CACHE: Any = object()


class UserSimulator:
    """Writes the user's side of a dialogue with an in-process causal LM and the guardrails on
    (a :class:`~usersim_ui.core.protocols.UserModel`)."""

    def __init__(self, loaded: LoadedModel, prompt_format: PromptFormat, batched_retries: bool = True,
                 stop_long_samples: bool = True, prefix_cache: PrefixCache | None = _DEFAULT_CACHE):
        """``prefix_cache``: the per-dialogue prompt KV cache (default: a :class:`PrefixCache` bounded
        by memory, see :meth:`PrefixCache.for_model`; ``None``: every turn prefills its whole prompt).
        ``stop_long_samples``: stop a sample as soon as the length guardrail must reject it."""
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.model_id = loaded.model_id
        self.device = loaded.device
        self.format = prompt_format
        self.rules = TurnRules(loaded.tokenizer, prompt_format, early_stop=stop_long_samples,
                               batched_retries=batched_retries)
        self.prefix_cache: PrefixCache | None = (PrefixCache.for_model(self.model) if prefix_cache is _DEFAULT_CACHE
                                                  else prefix_cache)
        self.last_prefilled_tokens = 0  # prompt tokens the last generate_turn prefilled, over all its rows

    @classmethod
    def from_pretrained(cls, model_id: str = USERLM_MODEL_ID, device: str | None = None,
                        dtype: torch.dtype | None = None) -> "UserSimulator":
        """UserLM-8b (or a local copy), bf16 on CUDA when present."""
        loaded = load_userlm(model_id, device, dtype)
        return cls(loaded, UserLMFormat(loaded.tokenizer))

    @classmethod
    def prompted_baseline(cls, loaded: LoadedModel | None = None, **options: Any) -> "UserSimulator":
        """A chat model prompted to play the user; SmolLM2-135M offline by default. Not UserLM.
        ``options``: the constructor's (``batched_retries``, ``stop_long_samples``, ...)."""
        loaded = loaded or load_smollm2()
        named = LoadedModel(loaded.model, loaded.tokenizer, f"{loaded.model_id} [prompted user baseline]", loaded.device)
        return cls(named, PromptedUserFormat(loaded.tokenizer), **options)

    @property
    def is_prompted_baseline(self) -> bool:
        return isinstance(self.format, PromptedUserFormat)

    @property
    def stop_long_samples(self) -> bool:
        return self.rules.early_stop

    def p_end(self, prompt_ids: Sequence[int], first_logits: torch.Tensor, cache: Any = None) -> float:
        """Probability that the turn is the end marker, from the raw logits of the first step.

        One token (UserLM): read straight from the generating forward pass. Several tokens (a
        prompted marker): the product of their conditional probabilities, the later ones from
        one extra forward pass over the marker: over the marker's tokens alone when ``cache``
        (a one-row KV cache over exactly ``prompt_ids``) is given; it is cropped back after.
        """
        marker = self.format.end_marker_ids()
        logp = torch.log_softmax(first_logits.float(), dim=-1)[marker[0]].item()
        if len(marker) > 1:
            device = next(self.model.parameters()).device
            usable = cache is not None and int(cache.get_seq_length()) == len(prompt_ids)
            with torch.inference_mode():
                if usable:
                    ids = torch.tensor([marker[:-1]], device=device)
                    try:
                        logits = self.model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0].float()
                    finally:
                        crop_to(cache, len(prompt_ids))
                else:
                    ids = torch.tensor([list(prompt_ids) + marker[:-1]], device=device)
                    logits = self.model(input_ids=ids).logits[0, len(prompt_ids):].float()
            logp += torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(marker[1:], device=logits.device)[:, None]).sum().item()
        return math.exp(logp)

    def first_step(self, plan: TurnPlan, first_logits: torch.Tensor, cache: Any = None) -> FirstStep:
        """P(end) and the banned ids' probabilities from the first step's raw logits."""
        probs = torch.softmax(first_logits.float(), dim=-1)
        banned = {t: float(probs[t]) for t in plan.banned}
        return FirstStep(self.p_end(plan.prompt, first_logits, cache=cache), banned, "logits")

    def processors_for(self, plan: TurnPlan) -> list[Any]:
        processors: list[Any] = []
        if plan.banned:
            processors.append(FirstTokenFilter(plan.banned, len(plan.prompt)))
        if plan.masked_end:
            processors.append(end_suppressor(plan.marker, plan.stop_ids))
        return processors

    def _streamer(self, draw: Any, plan: TurnPlan, on_draft: OnDraft | None) -> OnStep | None:
        """The draw's tokens as drafts for the page (a one-sample draw streams its text)."""
        if on_draft is None:
            return None
        decode = lambda ids: self.rules.decode(ids, plan.stop_ids, plan.marker)  # noqa: E731 - as the turn will be
        return lambda ids: on_draft(draw.draft(decode(ids)[0], len(ids)))

    def generate_turn(self, dialogue: Dialogue, guardrails: GuardrailSettings, sampling: SamplingSettings,
                      context_budget: int = 2048, stop_event: threading.Event | None = None,
                      seed: int | None = None, on_draft: OnDraft | None = None) -> Turn:
        """The next user turn, resampled as the guardrails ask, with every decision recorded.

        The draws are :func:`users.turn.assemble`'s: the first sample alone; if a resampling
        guardrail rejects it, the retries as one batch of ``retry_cap`` samples (with
        ``batched_retries``). ``seed`` (default: the scheme's seed for this turn position) is
        recorded on the turn and reproduces it.

        With a ``prefix_cache`` the prompt's KV cache is kept per dialogue (``dialogue.id``):
        the first sample prefills only what the prompt added since the last turn, and the
        retries reuse the whole prompt (expanded per row), prefilling one token each.
        """
        plan = self.rules.plan(dialogue, guardrails, sampling, context_budget, seed)
        prompt, marker = plan.prompt, plan.marker
        processors = self.processors_for(plan)
        stopping = ([StopAfterWords(self.tokenizer, len(prompt), plan.stop_after_words)]
                    if plan.stop_after_words is not None else [])
        store = self.prefix_cache
        held, held_ids = (store.take(dialogue.id, prompt)[0], None) if store is not None else (None, None)
        self.last_prefilled_tokens = 0
        turns = assemble(self.rules, plan, self.model_id)
        draw = next(turns)
        while True:
            if on_draft is not None:
                on_draft(draw.draft())  # a new draw: the guardrails' notes so far, before its first token
            past = held if draw.first else (None if held is None else
                                            (held if draw.size > 1 else copy.deepcopy(held)))  # sample copies for >1
            result = sample(self.model, prompt, stop_ids=plan.stop_ids, temperature=sampling.temperature,
                            top_p=sampling.top_p, max_new_tokens=sampling.max_new_tokens, seed=draw.seed,
                            processors=processors, stop_event=stop_event, num_samples=draw.size, stopping=stopping,
                            keep_ids=marker if len(marker) == 1 else (), past_key_values=past,
                            on_step=self._streamer(draw, plan, on_draft),
                            return_cache=store is not None and draw.first)
            self.last_prefilled_tokens += result.prefilled_tokens * draw.size
            first = None
            if draw.first:
                if store is not None:
                    held, held_ids = result.cache, list(prompt)
                    if held is not None:
                        crop_to(held, len(prompt))
                first = self.first_step(plan, result.first_logits, cache=held)
                if held is not None and len(plan.rounds) > 1:  # retries need one new token to start from
                    crop_to(held, len(prompt) - 1)
                    held_ids = list(prompt[:-1])
            try:
                draw = turns.send(Drawn(list(zip(result.new_ids, result.truncated)), result.latency_s, first))
            except StopIteration as done:
                turn = done.value
                break
        if store is not None and held is not None and held_ids is not None:
            store.put(dialogue.id, held_ids, held)
        return turn

    async def agenerate_turn(self, dialogue: Dialogue, guardrails: GuardrailSettings, sampling: SamplingSettings,
                             context_budget: int = 2048, stop_event: threading.Event | None = None,
                             seed: int | None = None) -> Turn:
        """:meth:`generate_turn` in a worker thread: the model computes, the event loop goes on."""
        return await asyncio.to_thread(self.generate_turn, dialogue, guardrails, sampling, context_budget,
                                       stop_event, seed)
