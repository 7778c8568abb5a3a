"""The simulated user: one guarded user turn per call, with its end-of-conversation probability."""

from __future__ import annotations

import copy
import math
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .dialogue import Dialogue, GuardrailEvent, GuardrailSettings, RejectedSample, SamplingSettings, Turn, count_words
from .generation import StopAfterWords, sample
from .limits import ContextTooLong
from .guardrails import (ACTED_THRESHOLD, FirstTokenFilter, banned_first_token_ids, end_is_masked, end_suppressor,
                         rejection_reason)
from .model_loading import LoadedModel, load_smollm2, load_userlm
from .prefix_cache import PrefixCache, crop_to
from .prompt_formats import PromptedUserFormat, PromptFormat, UserLMFormat
from .seeds import round_seed, turn_seed
from .userlm_format import USERLM_MODEL_ID


@dataclass(frozen=True)
class Candidate:
    """One sample of a user turn and why a guardrail rejected it (None: accepted)."""

    text: str
    ends: bool
    tokens: int
    reason: str | None
    truncated: bool = False


@dataclass(frozen=True)
class FittedPrompt:
    ids: list[int]
    dropped_turns: int


@dataclass(frozen=True)
class TurnPlan:
    """What :meth:`UserSimulator.plan_turn` decides before sampling (shared with batched turns)."""

    dialogue: Dialogue
    guardrails: GuardrailSettings
    sampling: SamplingSettings
    fitted: FittedPrompt
    banned: list[int]  # first tokens the filter forbids ([] when it is off)
    masked_end: bool  # the end marker gets zero probability this turn
    rounds: list[int]  # samples drawn per resampling round
    greedy: bool
    resampling: bool
    seed: int
    earlier: list[str]  # earlier user turns, for the repetition guardrail

    @property
    def prompt(self) -> list[int]:
        return self.fitted.ids


_DEFAULT_CACHE: Any = object()


class UserSimulator:
    """Writes the user's side of a dialogue with a causal LM and the guardrails switched on."""

    def __init__(self, loaded: LoadedModel, prompt_format: PromptFormat, batched_retries: bool = True,
                 stop_long_samples: bool = True, prefix_cache: PrefixCache | None = _DEFAULT_CACHE):
        """``prefix_cache``: the per-dialogue prompt KV cache (default: a :class:`PrefixCache` bounded
        by memory, see :meth:`PrefixCache.for_model`; ``None``: every turn prefills its whole prompt)."""
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.model_id = loaded.model_id
        self.device = loaded.device
        self.format = prompt_format
        self.batched_retries = batched_retries
        self.stop_long_samples = stop_long_samples
        self._banned: dict[tuple[tuple[str, ...], bool], list[int]] = {}
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
    def prompted_baseline(cls, loaded: LoadedModel | None = None) -> "UserSimulator":
        """A chat model prompted to play the user; SmolLM2-135M offline by default. Not UserLM."""
        loaded = loaded or load_smollm2()
        named = LoadedModel(loaded.model, loaded.tokenizer, f"{loaded.model_id} [prompted user baseline]", loaded.device)
        return cls(named, PromptedUserFormat(loaded.tokenizer))

    @property
    def is_prompted_baseline(self) -> bool:
        return isinstance(self.format, PromptedUserFormat)

    # ---- prompt ----------------------------------------------------------------------------

    def fit_prompt(self, intent: str, messages: Sequence[dict[str, str]], budget: int, max_new_tokens: int) -> FittedPrompt:
        """Drop the oldest whole exchanges until prompt plus the turn to write fit the budget."""
        messages = list(messages)
        dropped = 0
        while True:
            ids = self.format.prompt_ids(intent, messages)
            if len(ids) + max_new_tokens <= budget:
                return FittedPrompt(ids, dropped)
            if not messages:
                raise ContextTooLong(f"the intent takes {len(ids)} tokens; with {max_new_tokens} new tokens it "
                                     f"exceeds the context budget of {budget}")
            cut = 2 if len(messages) >= 2 else 1
            messages, dropped = messages[cut:], dropped + cut

    def banned_ids(self, words: tuple[str, ...], any_case: bool = False) -> list[int]:
        if (words, any_case) not in self._banned:
            self._banned[(words, any_case)] = banned_first_token_ids(self.tokenizer, words, any_case)
        return self._banned[(words, any_case)]

    # ---- one turn --------------------------------------------------------------------------

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

    def decode_turn(self, new_ids: Sequence[int]) -> tuple[str, bool, int]:
        """The turn's text, whether it ends the dialogue, and its token count.

        The end marker ends the dialogue wherever it appears ("thanks! <|endconversation|>"
        keeps "thanks!" as the last user turn); what follows it is junk, neither shown nor
        counted. A one-token marker is found by its id, a longer one in the text.
        """
        new_ids = list(new_ids)
        marker = self.format.end_marker_ids()
        if len(marker) == 1:
            cut = new_ids.index(marker[0]) if marker[0] in new_ids else None
            text = self.tokenizer.decode(new_ids[:cut], skip_special_tokens=True).strip()
            return text, cut is not None, len(new_ids) if cut is None else cut + 1
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        head, found, _junk = text.partition(self.format.end_marker)
        at = next((i for i in range(len(new_ids)) if new_ids[i:i + len(marker)] == marker), None)
        tokens = at + len(marker) if found and at is not None else len(new_ids)
        return head.strip(), bool(found), tokens

    def plan_turn(self, dialogue: Dialogue, guardrails: GuardrailSettings, sampling: SamplingSettings,
                  context_budget: int = 2048, seed: int | None = None) -> "TurnPlan":
        """Everything about the next user turn that is decided before any sampling: the fitted
        prompt, the logit masks, the early stop, the resampling rounds and the seed."""
        fitted = self.fit_prompt(dialogue.intent, dialogue.messages(), context_budget, sampling.max_new_tokens)
        banned = (self.banned_ids(guardrails.banned_first_words, guardrails.first_token_any_case)
                  if guardrails.first_token_filter else [])
        masked_end = end_is_masked(guardrails, dialogue.user_turns)
        resampling = guardrails.length_thresholds or guardrails.verbatim_repetition
        rounds = [1] + ([guardrails.retry_cap] if self.batched_retries else [1] * guardrails.retry_cap)
        greedy = sampling.temperature <= 0
        rounds = rounds if resampling and guardrails.retry_cap > 0 and not greedy else [1]
        seed = turn_seed(sampling.seed, len(dialogue.turns)) if seed is None else seed
        return TurnPlan(dialogue, guardrails, sampling, fitted, banned, masked_end, rounds, greedy, resampling, seed,
                        [t.text for t in dialogue.turns if t.role == "user"])

    def processors_for(self, plan: "TurnPlan") -> list[Any]:
        processors: list[Any] = []
        if plan.banned:
            processors.append(FirstTokenFilter(plan.banned, len(plan.prompt)))
        if plan.masked_end:
            processors.append(end_suppressor(self.format.end_marker_ids(), self.format.stop_ids()))
        return processors

    def judge(self, plan: "TurnPlan", new_ids: Sequence[int], truncated: bool) -> Candidate:
        """One sample decoded and checked by the resampling guardrails."""
        text, ends, tokens = self.decode_turn(new_ids)
        reason = None if ends else rejection_reason(text, plan.earlier, plan.dialogue.intent, plan.guardrails)
        # A row of a batch that the word limit stopped is padded with a stop id afterwards, so
        # it looks finished: more words than max_words means early stop cut it all the same.
        cut_at_words = (plan.guardrails.length_thresholds and self.stop_long_samples
                        and count_words(text) > plan.guardrails.max_words)
        return Candidate(text, ends, tokens, reason, truncated=(truncated or cut_at_words) and not ends)

    def generate_turn(self, dialogue: Dialogue, guardrails: GuardrailSettings, sampling: SamplingSettings,
                      context_budget: int = 2048, stop_event: threading.Event | None = None,
                      seed: int | None = None, on_token: Callable[[], None] | None = None) -> Turn:
        """The next user turn, resampled as the guardrails ask, with every decision recorded.

        The first sample is drawn alone; if a resampling guardrail rejects it, the remaining
        ``retry_cap`` samples are drawn in one batch (with ``batched_retries``) and the first
        that passes is kept: the same distribution as resampling one at a time, in one round
        instead of up to five. At temperature 0 there is one greedy sample: resampling would
        give the same text. ``seed`` (default: the scheme's seed for this turn position) is
        recorded on the turn and reproduces it.

        With a ``prefix_cache`` the prompt's KV cache is kept per dialogue (``dialogue.id``):
        the first sample prefills only what the prompt added since the last turn, and the
        retries reuse the whole prompt (expanded per row), prefilling one token each.
        """
        plan = self.plan_turn(dialogue, guardrails, sampling, context_budget, seed)
        prompt, marker = plan.prompt, self.format.end_marker_ids()
        processors = self.processors_for(plan)
        stopping = ([StopAfterWords(self.tokenizer, len(prompt), guardrails.max_words)]
                    if guardrails.length_thresholds and self.stop_long_samples else [])
        cache_store = self.prefix_cache
        held, held_ids = (cache_store.take(dialogue.id, prompt)[0], None) if cache_store is not None else (None, None)
        candidates: list[Candidate] = []
        latency, p_end, events = 0.0, None, []
        self.last_prefilled_tokens = 0
        for round_no, size in enumerate(plan.rounds):
            past = held if round_no == 0 else (None if held is None else
                                               (held if size > 1 else copy.deepcopy(held)))  # sample copies for >1
            result = sample(self.model, prompt, stop_ids=self.format.stop_ids(), temperature=sampling.temperature,
                            top_p=sampling.top_p, max_new_tokens=sampling.max_new_tokens,
                            seed=round_seed(plan.seed, round_no), processors=processors, stop_event=stop_event,
                            num_samples=size, stopping=stopping, keep_ids=marker if len(marker) == 1 else (),
                            on_token=on_token, past_key_values=past,
                            return_cache=cache_store is not None and round_no == 0)
            latency += result.latency_s
            self.last_prefilled_tokens += result.prefilled_tokens * size
            if round_no == 0 and cache_store is not None:
                held, held_ids = result.cache, list(prompt)
                if held is not None:
                    crop_to(held, len(prompt))
            if p_end is None:  # same prompt every round: the first step's logits do not change
                p_end = self.p_end(prompt, result.first_logits, cache=held)
                events = self._mask_events(result.first_logits, plan.banned, plan.masked_end, p_end)
                if held is not None and len(plan.rounds) > 1:  # retries need one new token to start from
                    crop_to(held, len(prompt) - 1)
                    held_ids = list(prompt[:-1])
            for new_ids, cut in zip(result.new_ids, result.truncated):
                candidates.append(self.judge(plan, new_ids, cut))
                if candidates[-1].reason is None:
                    break
            if candidates[-1].reason is None:
                break
        if cache_store is not None and held is not None and held_ids is not None:
            cache_store.put(dialogue.id, held_ids, held)
        return self.finish_turn(plan, candidates, p_end, events, latency)

    def finish_turn(self, plan: "TurnPlan", candidates: Sequence[Candidate], p_end: float | None,
                    events: list[GuardrailEvent], latency: float) -> Turn:
        """The kept sample (the first accepted, else the last drawn) and the record of every decision."""
        kept = candidates[-1]
        rejected = tuple(RejectedSample(c.text, c.reason or "") for c in candidates[:-1])
        events = list(events)
        if kept.reason is not None:
            why = "greedy decoding (temperature 0) gives the same sample again" if plan.greedy and plan.resampling \
                else f"kept a sample after {len(rejected)} resamples"
            events.append(GuardrailEvent("retry_cap", "gave_up", f"{why} ({kept.reason})"))
        for kind, count in Counter(r.reason.split(":")[0] for r in rejected).items():
            last = next(r.reason for r in reversed(rejected) if r.reason.startswith(kind))
            events.append(GuardrailEvent(kind, "resampled", last.split(": ", 1)[1], count=count))  # type: ignore[arg-type]
        if plan.fitted.dropped_turns:
            events.append(GuardrailEvent("context", "trimmed", f"dropped {plan.fitted.dropped_turns} oldest turns"))
        return Turn(
            role="user", text=kept.text, tokens=kept.tokens, words=count_words(kept.text), author="model",
            model_id=self.model_id, latency_s=latency, p_end=p_end, ends_dialogue=kept.ends, guardrails=tuple(events),
            rejected=rejected, sampling=plan.sampling, seed=plan.seed, guardrail_settings=plan.guardrails,
            context_dropped_turns=plan.fitted.dropped_turns, truncated=kept.truncated,
        )

    def _mask_events(self, first_logits: torch.Tensor, banned: list[int], masked_end: bool, p_end: float) -> list[GuardrailEvent]:
        """What the logit masks removed from the first step's distribution, where it was worth saying."""
        events = []
        probs = torch.softmax(first_logits.float(), dim=-1)
        if banned:
            banned_probs = probs[banned]
            mass = banned_probs.sum().item()
            if mass >= ACTED_THRESHOLD:
                top = self.tokenizer.decode([banned[int(banned_probs.argmax())]]).strip()
                events.append(GuardrailEvent("first_token", "masked", f"'{top}' (p={mass:.2f})", probability_removed=mass))
        if masked_end and p_end >= ACTED_THRESHOLD:
            events.append(GuardrailEvent("no_early_ending", "masked", f"end (p={p_end:.2f})", probability_removed=p_end))
        return events
