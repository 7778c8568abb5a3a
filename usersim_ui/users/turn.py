"""The one assembly of a simulated user's turn, shared by every engine.

Everything a user turn *means* is decided here, once: the prompt fitted to the context, the
first-token ids the filter bans (any case included), whether the end is masked, the
resampling rounds and the temperature-0 rule, the seed of every draw, how a sample is
decoded (the end marker found by token id wherever it appears, the text before it kept),
which guardrail rejects it, the events a turn records and the :class:`Turn` itself.

An engine only *draws*: :func:`assemble` is a generator that yields a :class:`Draw` (how many
samples, with which seed) and receives what the engine drew (:class:`Drawn`: the sampled ids,
and for the first draw the raw first-step probabilities as :class:`FirstStep`); it returns
the finished :class:`Turn`. The in-process model (``users.local``), the batched call
(``users.batched``), the turn batcher and the completions-server client (``users.remote``)
all drive this same generator, so they cannot drift apart.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Generator, Mapping, Sequence

from usersim_ui.core.dialogue import (
    Dialogue,
    GuardrailEvent,
    RejectedSample,
    SamplingSettings,
    Turn,
)
from usersim_ui.core.errors import ContextTooLong
from usersim_ui.core.guardrails import (
    GuardrailSettings,
    count_words,
    end_is_masked,
    rejection_reason,
    resamples,
    stop_after_words,
)
from usersim_ui.core.protocols import Draft
from usersim_ui.core.seeds import draw_seed, turn_seed
from usersim_ui.prompts.first_tokens import banned_first_token_ids
from usersim_ui.prompts.formats import PromptFormat


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
    """Everything about the next user turn that is decided before any sampling."""

    dialogue: Dialogue
    guardrails: GuardrailSettings
    sampling: SamplingSettings
    fitted: FittedPrompt
    banned: list[int]  # first tokens the filter forbids ([] when it is off)
    masked_end: bool  # the end marker gets zero probability this turn
    rounds: list[int]  # samples drawn per resampling round
    greedy: bool
    resampling: bool
    seed: int  # the turn's seed, recorded on the turn: it reproduces every draw
    earlier: list[str]  # earlier user turns, for the repetition guardrail
    marker: list[int]  # the end marker's ids
    stop_ids: list[int]
    stop_after_words: int | None = None  # the engine stops a sample past this many words (None: it does not)

    @property
    def prompt(self) -> list[int]:
        return self.fitted.ids

    def draw_seed(self, round_no: int) -> int:
        return draw_seed(self.seed, round_no)


@dataclass(frozen=True)
class Draw:
    """What the assembly asks of an engine: ``size`` samples of round ``round_no``, drawn with
    ``seed``; ``first`` asks for the first step's raw probabilities too."""

    round_no: int
    size: int
    seed: int
    first: bool
    drawn_before: int = 0  # samples this turn drew (and the guardrails rejected) before this draw
    notes: tuple[str, ...] = ()  # why each of them was rejected, for the page's live progress

    def draft(self, text: str = "", tokens: int = 0) -> Draft:
        """What the page shows while this draw is made; a batch of retries shows no text (which
        row will be kept is not known until the guardrails have judged them)."""
        return Draft("user", text if self.size == 1 else "", tokens, self.drawn_before + 1, self.size, self.notes)


@dataclass(frozen=True)
class FirstStep:
    """The raw distribution of the turn's first token, before any mask: P(end), the probability
    of each banned id that the engine could read, and where P(end) was read."""

    p_end: float
    banned_probs: Mapping[int, float]
    source: str  # "logits" in-process; "server:<method>" on a completions server


@dataclass(frozen=True)
class Drawn:
    """What an engine drew for one :class:`Draw`: per sample its new ids (cut at a stop token or
    not) and whether it was cut short (no stop token came)."""

    samples: Sequence[tuple[Sequence[int], bool]]
    latency_s: float
    first_step: FirstStep | None = None


def sampling_rounds(guardrails: GuardrailSettings, sampling: SamplingSettings, batched_retries: bool = True) -> list[int]:
    """How many samples each round of a turn draws: one, then (only if a resampling guardrail is
    on and the temperature is above 0: greedy decoding would give the same sample again) the
    retries, as one round of ``retry_cap`` samples or one round each."""
    if not resamples(guardrails) or guardrails.retry_cap <= 0 or sampling.temperature <= 0:
        return [1]
    return [1] + ([guardrails.retry_cap] if batched_retries else [1] * guardrails.retry_cap)


class TurnRules:
    """The turn's meaning for one user model (its tokenizer and prompt format).

    ``early_stop``: whether the engine stops a sample once it has more words than the length
    guardrail accepts (in-process it does; a server does not), which decides when a sample
    longer than ``max_words`` counts as cut. ``batched_retries``: the retries of a turn go as
    one round of ``retry_cap`` samples (else one sample per round).
    """

    def __init__(self, tokenizer: Any, prompt_format: PromptFormat, early_stop: bool = True,
                 batched_retries: bool = True):
        self.tokenizer, self.format = tokenizer, prompt_format
        self.early_stop, self.batched_retries = early_stop, batched_retries
        self._banned: dict[tuple[tuple[str, ...], bool], list[int]] = {}

    # ---- before sampling -------------------------------------------------------------------

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
        key = (tuple(words), bool(any_case))
        if key not in self._banned:
            self._banned[key] = banned_first_token_ids(self.tokenizer, words, any_case)
        return self._banned[key]

    def plan(self, dialogue: Dialogue, guardrails: GuardrailSettings, sampling: SamplingSettings,
             context_budget: int = 2048, seed: int | None = None) -> TurnPlan:
        """The fitted prompt, the masks, the rounds and the seed (default: the seed scheme's for
        this position). At temperature 0 there is one greedy sample: resampling would give
        the same text again."""
        fitted = self.fit_prompt(dialogue.intent, dialogue.messages(), context_budget, sampling.max_new_tokens)
        banned = (self.banned_ids(guardrails.banned_first_words, guardrails.first_token_any_case)
                  if guardrails.first_token_filter else [])
        seed = turn_seed(sampling.seed, len(dialogue.turns)) if seed is None else seed
        return TurnPlan(dialogue, guardrails, sampling, fitted, banned, end_is_masked(guardrails, dialogue.user_turns),
                        sampling_rounds(guardrails, sampling, self.batched_retries), sampling.temperature <= 0,
                        resamples(guardrails), seed, [t.text for t in dialogue.turns if t.role == "user"],
                        list(self.format.end_marker_ids()), list(self.format.stop_ids()),
                        stop_after_words(guardrails) if self.early_stop else None)

    # ---- after sampling --------------------------------------------------------------------

    def decode(self, new_ids: Sequence[int], stop_ids: Sequence[int] = (), marker: Sequence[int] | None = None
               ) -> tuple[str, bool, int]:
        """The turn's text, whether it ends the dialogue, and its token count.

        The sample ends at its first stop id (not counted). The end marker ends the dialogue
        wherever it appears ("thanks! <|endconversation|>" keeps "thanks!" as the last user
        turn); what follows it is junk, neither shown nor counted. A one-token marker is found
        by its id; a longer one by its ids, or failing that in the text.
        """
        ids = list(new_ids)
        stop = next((i for i, t in enumerate(ids) if t in set(stop_ids)), None)
        ids = ids if stop is None else ids[:stop]
        marker = list(self.format.end_marker_ids()) if marker is None else list(marker)
        at = next((i for i in range(len(ids)) if ids[i:i + len(marker)] == marker), None)
        if at is not None:
            return self.tokenizer.decode(ids[:at], skip_special_tokens=True).strip(), True, at + len(marker)
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if len(marker) > 1 and self.format.end_marker in text:  # the marker spelled by other pieces
            return text.partition(self.format.end_marker)[0].strip(), True, len(ids)
        return text.strip(), False, len(ids)

    def judge(self, plan: TurnPlan, new_ids: Sequence[int], cut: bool) -> Candidate:
        """One sample decoded and checked by the resampling guardrails. ``cut``: no stop token
        came (``max_new_tokens``, or the engine's early stop at ``max_words``)."""
        text, ends, tokens = self.decode(new_ids, plan.stop_ids, plan.marker)
        if ends and plan.masked_end:
            ends = False  # a marker of several tokens that slipped past the mask: not an ending
        reason = None if ends else rejection_reason(text, plan.earlier, plan.dialogue.intent, plan.guardrails)
        # A row of a batch that the word limit stopped is padded with a stop id afterwards, so
        # it looks finished: more words than max_words means the early stop cut it all the same.
        cut_at_words = plan.stop_after_words is not None and count_words(text) > plan.stop_after_words
        return Candidate(text, ends, tokens, reason, truncated=(cut or cut_at_words) and not ends)

    def first_step_events(self, plan: TurnPlan, first: FirstStep) -> list[GuardrailEvent]:
        """What the logit masks removed from the first step's distribution, where it acted
        (``GuardrailEvent.acted``: the one threshold every view counts by)."""
        events = []
        if plan.banned:
            known = {t: p for t, p in first.banned_probs.items() if t in set(plan.banned) and math.isfinite(p)}
            mass = sum(known.values())
            if known:
                top = max(known, key=known.__getitem__)
                word = self.tokenizer.decode([top]).strip()
                events.append(GuardrailEvent("first_token", "masked", f"'{word}' (p={mass:.2f})", probability_removed=mass))
        if plan.masked_end:
            events.append(GuardrailEvent("no_early_ending", "masked", f"end (p={first.p_end:.2f})",
                                         probability_removed=first.p_end))
        return [e for e in events if e.acted]

    def finish(self, plan: TurnPlan, candidates: Sequence[Candidate], first: FirstStep, latency: float,
               model_id: str) -> Turn:
        """The kept sample (the first accepted, else the last drawn) and the record of every decision."""
        kept = candidates[-1]
        rejected = tuple(RejectedSample(c.text, c.reason or "") for c in candidates[:-1])
        events = self.first_step_events(plan, first)
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
            model_id=model_id, latency_s=latency, p_end=first.p_end, ends_dialogue=kept.ends, guardrails=tuple(events),
            rejected=rejected, sampling=plan.sampling, seed=plan.seed, guardrail_settings=plan.guardrails,
            context_dropped_turns=plan.fitted.dropped_turns, truncated=kept.truncated, p_end_source=first.source,
        )


def assemble(rules: TurnRules, plan: TurnPlan, model_id: str) -> Generator[Draw, Drawn, Turn]:
    """The turn as a dialogue with an engine: yields each :class:`Draw`, receives its
    :class:`Drawn`, returns the :class:`Turn`. The first draw is one sample; if a resampling
    guardrail rejects it, the next round's samples are judged in order and the first that
    passes is kept (the same distribution as resampling one at a time); after the last round
    the last sample is kept, flagged."""
    candidates: list[Candidate] = []
    first: FirstStep | None = None
    latency = 0.0
    for round_no, size in enumerate(plan.rounds):
        notes = tuple(f"sample {n} rejected: {c.reason}" for n, c in enumerate(candidates, 1))
        drawn = yield Draw(round_no, size, plan.draw_seed(round_no), first=first is None,
                           drawn_before=len(candidates), notes=notes)
        latency += drawn.latency_s
        first = first or drawn.first_step
        if len(drawn.samples) != size:
            raise RuntimeError(f"the engine drew {len(drawn.samples)} samples where {size} were asked for")
        for ids, cut in drawn.samples:
            candidates.append(rules.judge(plan, ids, cut))
            if candidates[-1].reason is None:
                break
        if candidates[-1].reason is None:
            break
    if first is None:
        raise RuntimeError("the engine reported no first-step probabilities: the turn has no P(end)")
    return rules.finish(plan, candidates, first, latency, model_id)
