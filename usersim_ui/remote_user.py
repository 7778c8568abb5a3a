"""The simulated user on an OpenAI-style ``/v1/completions`` server (vLLM, llama.cpp's
``llama-server``): the same :class:`~usersim_ui.dialogue.Turn` records as the in-process
:class:`~usersim_ui.simulator.UserSimulator`, from the token ids the core builds.

Why the completions API with token ids: the prompt is built here, exactly as in-process
(special tokens only from the template, content as plain text), so a server's own chat
template never sees the dialogue. What each guardrail costs on the wire:

* **p_end** is the raw probability of the end marker as the turn's first token. Three ways to
  read it, tried in this order on first use and remembered in :attr:`p_end_method`:

  - ``logprob_token_ids``: vLLM >= 0.26 returns the raw logprob of named ids
    (``logprobs=1, logprob_token_ids=[end]``), one 1-token request;
  - ``forced_sample``: a 1-token greedy request with ``logit_bias`` +100 on the end id and
    ``logprobs``; servers that report the sampled token's probability from the raw logits
    (llama-server's default ``post_sampling_probs=false``; vLLM's default
    ``--logprobs-mode raw_logprobs``) then give exactly P(end);
  - ``echo``: score ``ids + [end]`` with ``echo=True`` and read the prompt logprob of the last
    position (older vLLM, llama-cpp-python's server).

  A marker of several tokens (the prompted baseline's ``[END]``) is the product of one query
  per token, each conditioned on the marker's earlier tokens.
* **First-token filter**, at the first position only: one request for the first token with
  ``logit_bias`` -100 on the banned ids (``n`` samples at once), then one request per sample
  continuing from ``ids + [first]``. That is one extra round trip and one extra prefill of
  the prompt per round; with prefix caching (vLLM, llama-server's ``cache_prompt``) the second
  prefill is one token. ``benchmarks/bench_batch_server.py --first-token-cost`` measures it.
* **No early ending**: ``logit_bias`` -100 on the end id at every position (a one-token
  marker); a marker of several tokens goes as ``bad_words`` (vLLM) and any sample that still
  comes back as the bare marker is treated as an empty turn (which the length guardrail
  rejects).
* **Length and repetition** are checked here as in-process; the retries of one round go as
  ``n`` samples in one request (a server that returns fewer choices gets the rest asked one
  by one; one that refuses ``n``, like llama-server beyond its slot count, gets ``n`` requests
  of one sample sent together).

Every failure (connection refused, server killed, timeout, a non-200 answer, a body that is
not JSON, no choices, no token ids) raises :class:`~usersim_ui.backends.BackendError` naming
the server; a turn is returned whole or not at all, so the dialogue is never half-changed.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Generator, Sequence

import httpx

from .backends import BackendError
from .dialogue import Dialogue, GuardrailEvent, GuardrailSettings, RejectedSample, SamplingSettings, Turn, count_words
from .generation import GenerationCancelled
from .guardrails import ACTED_THRESHOLD, banned_first_token_ids, end_is_masked, rejection_reason
from .prompt_formats import PromptFormat, UserLMFormat

P_END_METHODS = ("logprob_token_ids", "forced_sample", "echo")
BAN = -100.0
FORCE = 100.0
TOP_K = 20  # vLLM's default --max-logprobs
SEED_MODULUS = 2**31  # llama-server keeps seeds in uint32 and adds the choice index; vLLM takes any int


def request_seed(base_seed: int, turn_index: int, attempt: int) -> int:
    """A distinct, reproducible seed for every sampling request of every turn."""
    return (base_seed * 1_000_003 + turn_index * 7_919 + attempt) % SEED_MODULUS


@dataclass(frozen=True)
class _Sample:
    ids: list[int]
    cut: bool  # hit max_tokens without a stop token
    seed: int


@dataclass(frozen=True)
class _Failed:
    """A probe that the server refused (HTTP >= 400): a capability it lacks, not an outage."""

    status: int
    text: str


Requests = list[dict[str, Any]]
Protocol = Generator[tuple[Requests, bool], list[Any], Turn]


class CompletionsUserSimulator:
    """A simulated user whose model runs on a completions server.

    ``tokenizer`` and ``prompt_format`` must be the served model's: the ids are built here.
    ``timeout_s`` bounds each request, ``deadline_s`` the whole turn.
    """

    def __init__(self, base_url: str, model: str, tokenizer: Any, prompt_format: PromptFormat | None = None,
                 timeout_s: float = 60.0, deadline_s: float = 300.0, api_key: str = "",
                 p_end_method: str = "auto", transport: httpx.BaseTransport | None = None):
        if p_end_method not in ("auto",) + P_END_METHODS:
            raise ValueError(f"p_end_method must be auto or one of {P_END_METHODS}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.tokenizer = tokenizer
        self.format = prompt_format or UserLMFormat(tokenizer)
        self.timeout_s = timeout_s
        self.deadline_s = deadline_s
        self.api_key = api_key
        self.p_end_method = p_end_method
        self.device = "remote"
        self._transport = transport
        self._client: httpx.Client | None = None
        self._lock = threading.Lock()
        self._banned: dict[tuple[str, ...], list[int]] = {}
        self.requests_sent = 0
        self.n_supported = True  # False once a server refused n > 1

    # ---- identity ------------------------------------------------------------------------

    @property
    def model_id(self) -> str:
        return f"{self.model} @ {self.base_url} [{self.format.name}; p_end via {self.p_end_method}]"

    @property
    def url(self) -> str:
        return f"{self.base_url}/completions"

    def banned_ids(self, words: tuple[str, ...]) -> list[int]:
        if words not in self._banned:
            self._banned[words] = banned_first_token_ids(self.tokenizer, words)
        return self._banned[words]

    def fit_prompt(self, intent: str, messages: Sequence[dict[str, str]], budget: int,
                   max_new_tokens: int) -> tuple[list[int], int]:
        """Drop the oldest whole exchanges until prompt plus turn fit the budget (as in-process)."""
        from .simulator import ContextTooLong

        messages, dropped = list(messages), 0
        while True:
            ids = self.format.prompt_ids(intent, messages)
            if len(ids) + max_new_tokens <= budget:
                return ids, dropped
            if not messages:
                raise ContextTooLong(f"the intent takes {len(ids)} tokens; with {max_new_tokens} new tokens it "
                                     f"exceeds the context budget of {budget}")
            cut = 2 if len(messages) >= 2 else 1
            messages, dropped = messages[cut:], dropped + cut

    # ---- the turn, as a sans-IO protocol -------------------------------------------------
    # The generator yields (payloads, probe) and receives one parsed JSON object (or _Failed for
    # a refused probe) per payload; the sync and async drivers below only move bytes.

    def _base(self, prompt: list[int], **extra: Any) -> dict[str, Any]:
        return {"model": self.model, "prompt": prompt, "stream": False, **extra}

    def _logprob_query(self, prefix: list[int], target: int, method: str, extra_ids: Sequence[int] = ()) -> dict[str, Any]:
        if method == "logprob_token_ids":
            ids = list(dict.fromkeys([*self._sentinels(target), *extra_ids]))
            return self._base(prefix, max_tokens=1, temperature=0.0, logprobs=1,
                              logprob_token_ids=ids, return_tokens_as_token_ids=True)
        if method == "forced_sample":
            return self._base(prefix, max_tokens=1, temperature=0.0, logprobs=1, logit_bias={str(target): FORCE},
                              return_tokens_as_token_ids=True, return_token_ids=True)
        return self._base(prefix + [target], max_tokens=1, temperature=0.0, logprobs=1, echo=True,
                          return_tokens_as_token_ids=True)

    def _sentinels(self, target: int) -> list[int]:
        """Ids asked for beside the target so that an honoured ``logprob_token_ids`` is told apart
        from a top-k that happens to hold the target (two ids are never both top-1)."""
        return [target] + [t for t in self.format.stop_ids() if t != target][:1]

    def _read_logprob(self, response: Any, prefix: list[int], target: int, method: str) -> float | None:
        """The raw logprob of ``target`` after ``prefix``, or None when the server did not give it."""
        if isinstance(response, _Failed):
            return None
        choice = _first_choice(response, self.base_url)
        logprobs = choice.get("logprobs") or {}
        if method == "logprob_token_ids":
            top = _top_at(logprobs, 0)
            asked = self._sentinels(target)
            # a server that ignores logprob_token_ids still lists its top-k: require every id asked for
            return top.get(target) if all(t in top for t in asked) else None
        if method == "forced_sample":
            ids = _choice_ids(choice)
            if not ids or ids[0] != target:
                return None  # the bias was not honoured
            return _token_logprob(logprobs, 0)
        position = len(prefix)  # echo: the prompt's own logprobs, then the generated token's
        return _token_logprob(logprobs, position)

    def _p_end(self, prompt: list[int], banned: list[int]) -> Generator[tuple[Requests, bool], list[Any], tuple[float, float | None]]:
        """P(end) at the first position, and the banned ids' mass where the method gives it exactly."""
        marker = self.format.end_marker_ids()
        auto = self.p_end_method == "auto"
        methods = P_END_METHODS if auto else (self.p_end_method,)
        for method in methods:
            extra = banned if method == "logprob_token_ids" else []
            queries = [self._logprob_query(prompt + marker[:k], marker[k], method, extra if k == 0 else ())
                       for k in range(len(marker))]
            responses = yield queries, auto
            values = [self._read_logprob(r, prompt + marker[:k], marker[k], method) for k, r in enumerate(responses)]
            if all(v is not None for v in values):
                if auto:
                    with self._lock:
                        self.p_end_method = method
                mass = None
                if extra:
                    top = _top_at((_first_choice(responses[0], self.base_url).get("logprobs") or {}), 0)
                    mass = sum(math.exp(top[t]) for t in extra if t in top)
                return math.exp(sum(values)), mass  # type: ignore[arg-type]
            if not auto:
                raise BackendError(f"user simulator server {self.base_url} did not return the end token's "
                                   f"logprob with p_end_method={method!r}")
        raise BackendError(f"user simulator server {self.base_url} gives no way to read P(end): it supports none of "
                           f"{', '.join(P_END_METHODS)} (needs logprobs with logprob_token_ids, logit_bias, or echo)")

    def _sampling(self, sampling: SamplingSettings) -> dict[str, Any]:
        if sampling.temperature > 0:
            return {"temperature": sampling.temperature, "top_p": sampling.top_p}
        return {"temperature": 0.0}

    def _end_ban(self, masked_end: bool) -> tuple[dict[str, float], dict[str, Any]]:
        if not masked_end:
            return {}, {}
        marker = self.format.end_marker_ids()
        if len(marker) == 1:
            return {str(marker[0]): BAN}, {}
        return {}, {"bad_words": [self.format.end_marker]}

    def _draw(self, prompt: list[int], size: int, seed: int, sampling: SamplingSettings, banned: list[int],
              masked_end: bool, want_top: bool) -> Generator[tuple[Requests, bool], list[Any], tuple[list[_Sample], dict[int, float]]]:
        """``size`` samples of the turn: one request with ``n``, or the two-step first-token filter."""
        stop = self.format.stop_ids()
        end_bias, end_extra = self._end_ban(masked_end)
        common = {"stop_token_ids": stop, "return_token_ids": True, "return_tokens_as_token_ids": True,
                  **self._sampling(sampling), **end_extra}
        max_new = sampling.max_new_tokens
        top: dict[int, float] = {}
        if not banned:
            payload = self._base(prompt, max_tokens=max_new, n=size, seed=seed, logprobs=TOP_K if want_top else 1,
                                 **common, **({"logit_bias": end_bias} if end_bias else {}))
            choices = yield from self._choices(payload, size, seed)
            if want_top:
                top = _top_at(choices[0][1].get("logprobs") or {}, 0)
            return [_Sample(_choice_ids_strict(c, self.base_url), _is_cut(c), s) for s, c in choices], top
        # First position only: the first token with the ban, then each sample goes on without it.
        first_bias = {**end_bias, **{str(t): BAN for t in banned}}
        payload = self._base(prompt, max_tokens=1, n=size, seed=seed, logprobs=TOP_K if want_top else 1,
                             logit_bias=first_bias, **common)
        choices = yield from self._choices(payload, size, seed)
        if want_top:
            top = _top_at(choices[0][1].get("logprobs") or {}, 0)
        firsts = [(s, _choice_ids_strict(c, self.base_url)[:1]) for s, c in choices]
        follow = [(s, first) for s, first in firsts if first and first[0] not in stop and max_new > 1
                  and not (len(self.format.end_marker_ids()) == 1 and first[0] == self.format.end_marker_ids()[0])]
        payloads = [self._base(prompt + first, max_tokens=max_new - 1, n=1, seed=s, logprobs=1, **common,
                               **({"logit_bias": end_bias} if end_bias else {})) for s, first in follow]
        responses = yield payloads, False
        rest = {s: _first_choice(r, self.base_url) for (s, _f), r in zip(follow, responses)}
        samples = []
        for s, first in firsts:
            if s in rest:
                samples.append(_Sample(first + _choice_ids_strict(rest[s], self.base_url), _is_cut(rest[s]), s))
            else:
                samples.append(_Sample(first, bool(first) and first[0] not in stop and max_new <= 1, s))
        return samples, top

    def _choices(self, payload: dict[str, Any], size: int, seed: int) -> Generator[tuple[Requests, bool], list[Any], list[tuple[int, dict[str, Any]]]]:
        """The ``size`` choices of one request, asking one by one for what a server without ``n`` left out.

        Each choice is paired with its seed: ``seed + index`` (llama-server's own rule for ``n``).
        A server that refuses ``n`` (llama-server allows at most its slot count) gets ``size``
        requests of one sample each, sent together, and is not asked for ``n`` again.
        """
        if size > 1 and self.n_supported:
            [response] = yield [payload], True
            if isinstance(response, _Failed):
                self.n_supported = False
        if size == 1 or not self.n_supported:
            responses = yield [{**payload, "n": 1, "seed": seed + i} for i in range(size)], False
            return [(seed + i, _first_choice(r, self.base_url)) for i, r in enumerate(responses)]
        choices = response.get("choices") if isinstance(response, dict) else None
        if not isinstance(choices, list) or not choices:
            raise BackendError(f"user simulator server {self.base_url} returned no choices")
        choices = sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0)[:size]
        out = [(seed + i, c) for i, c in enumerate(choices)]
        if len(out) < size:
            missing = list(range(len(out), size))
            extra = yield [{**payload, "n": 1, "seed": seed + i} for i in missing], False
            out += [(seed + i, _first_choice(r, self.base_url)) for i, r in zip(missing, extra)]
        return out

    def decode_turn(self, new_ids: Sequence[int]) -> tuple[str, bool]:
        """Text before the end marker, and whether the turn *is* the end (as in-process)."""
        text = self.tokenizer.decode(list(new_ids), skip_special_tokens=True)
        head, found, _junk = text.partition(self.format.end_marker)
        head = head.strip()
        return head, bool(found) and not head

    def turn_protocol(self, dialogue: Dialogue, guardrails: GuardrailSettings, sampling: SamplingSettings,
                      context_budget: int = 2048, seed: int | None = None) -> Protocol:
        """The whole turn as a generator of requests: drive it with :meth:`generate_turn` or :meth:`agenerate_turn`."""
        prompt, dropped = self.fit_prompt(dialogue.intent, dialogue.messages(), context_budget, sampling.max_new_tokens)
        banned = self.banned_ids(guardrails.banned_first_words) if guardrails.first_token_filter else []
        masked_end = end_is_masked(guardrails, dialogue.user_turns)
        stop = self.format.stop_ids()
        earlier = [t.text for t in dialogue.turns if t.role == "user"]
        resampling = guardrails.length_thresholds or guardrails.verbatim_repetition
        rounds = [1] + ([guardrails.retry_cap] if resampling and guardrails.retry_cap > 0 else [])
        turn_index = len(dialogue.turns)
        started = time.perf_counter()

        p_end, exact_mass = yield from self._p_end(prompt, banned)
        candidates: list[tuple[str, bool, int, int, str | None, bool]] = []
        top: dict[int, float] = {}
        for round_no, size in enumerate(rounds):
            round_seed = ((seed + round_no * 64) if seed is not None
                          else request_seed(sampling.seed, turn_index, round_no)) % SEED_MODULUS
            samples, round_top = yield from self._draw(prompt, size, round_seed, sampling, banned, masked_end,
                                                       want_top=round_no == 0)
            top = top or round_top
            for sample in samples:
                ids = sample.ids
                cut_at = next((i for i, t in enumerate(ids) if t in stop), None)
                ids = ids if cut_at is None else ids[:cut_at]
                text, ends = self.decode_turn(ids)
                if ends and masked_end:
                    ends = False  # a marker of several tokens that slipped past bad_words: an empty turn
                reason = None if ends else rejection_reason(text, earlier, dialogue.intent, guardrails)
                candidates.append((text, ends, len(ids), sample.seed, reason, sample.cut and cut_at is None))
                if reason is None:
                    break
            if candidates[-1][4] is None:
                break
        latency = time.perf_counter() - started

        events: list[GuardrailEvent] = []
        if banned:
            mass = exact_mass if exact_mass is not None else sum(math.exp(top[t]) for t in banned if t in top)
            if mass >= ACTED_THRESHOLD:
                shown = [t for t in banned if t in top] or banned
                best = max(shown, key=lambda t: top.get(t, -math.inf))
                word = self.tokenizer.decode([best]).strip()
                events.append(GuardrailEvent("first_token", "masked", f"'{word}' (p={mass:.2f})", probability_removed=mass))
        if masked_end and p_end >= ACTED_THRESHOLD:
            events.append(GuardrailEvent("no_early_ending", "masked", f"end (p={p_end:.2f})", probability_removed=p_end))
        text, ends, tokens, kept_seed, kept_reason, cut = candidates[-1]
        rejected = tuple(RejectedSample(c[0], c[4] or "") for c in candidates[:-1])
        if kept_reason is not None:
            events.append(GuardrailEvent("retry_cap", "gave_up", f"kept a sample after {len(rejected)} resamples ({kept_reason})"))
        for kind, count in Counter(r.reason.split(":")[0] for r in rejected).items():
            last = next(r.reason for r in reversed(rejected) if r.reason.startswith(kind))
            events.append(GuardrailEvent(kind, "resampled", last.split(": ", 1)[1], count=count))  # type: ignore[arg-type]
        if dropped:
            events.append(GuardrailEvent("context", "trimmed", f"dropped {dropped} oldest turns"))
        return Turn(
            role="user", text=text, tokens=tokens, words=count_words(text), author="model", model_id=self.model_id,
            latency_s=latency, p_end=p_end, ends_dialogue=ends, guardrails=tuple(events), rejected=rejected,
            sampling=sampling, seed=kept_seed, guardrail_settings=guardrails, context_dropped_turns=dropped,
            truncated=cut,
        )

    # ---- drivers -------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _sync_client(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                self._client = httpx.Client(transport=self._transport, headers=self._headers(),
                                            limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))
            return self._client

    def _check(self, response: httpx.Response | Exception, probe: bool, timeout: float) -> Any:
        """Parsed JSON, or :class:`_Failed` for a refused probe; anything else is a BackendError."""
        who = f"user simulator server {self.base_url}"
        if isinstance(response, httpx.TimeoutException):
            raise BackendError(f"{who} did not answer within {timeout:g} s") from response
        if isinstance(response, httpx.HTTPError):
            raise BackendError(f"{who} failed: {type(response).__name__}: {response}") from response
        if isinstance(response, Exception):
            raise response
        if response.status_code >= 400:
            if probe and response.status_code in (400, 404, 422, 500, 501):  # a capability the server lacks
                return _Failed(response.status_code, response.text[:300])
            raise BackendError(f"{who} answered HTTP {response.status_code}: {response.text[:300]}")
        try:
            data = response.json()
        except ValueError as exc:
            raise BackendError(f"{who} returned a body that is not JSON: {response.text[:120]!r}") from exc
        if not isinstance(data, dict):
            raise BackendError(f"{who} returned JSON that is not an object: {str(data)[:120]}")
        if not probe and not data.get("choices"):
            raise BackendError(f"{who} returned no choices: {str(data)[:200]}")
        return data

    def _budget(self, started: float, stop_event: threading.Event | None) -> float:
        if stop_event is not None and stop_event.is_set():
            raise GenerationCancelled("stopped")
        left = self.deadline_s - (time.perf_counter() - started)
        if left <= 0:
            raise BackendError(f"user simulator server {self.base_url}: the turn passed its deadline of {self.deadline_s:g} s")
        return min(self.timeout_s, left)

    def generate_turn(self, dialogue: Dialogue, guardrails: GuardrailSettings, sampling: SamplingSettings,
                      context_budget: int = 2048, stop_event: threading.Event | None = None,
                      seed: int | None = None, on_token: Callable[[], None] | None = None) -> Turn:
        """The next user turn (blocking); the signature of ``UserSimulator.generate_turn``.

        ``on_token`` is accepted for that signature; requests are not streamed, so it is not called.
        """
        client = self._sync_client()
        protocol = self.turn_protocol(dialogue, guardrails, sampling, context_budget, seed)
        started = time.perf_counter()

        def post(payload: dict[str, Any], timeout: float) -> httpx.Response | Exception:
            try:
                return client.post(self.url, json=payload, timeout=timeout)
            except Exception as exc:  # noqa: BLE001 - classified in _check
                return exc

        answers: list[Any] | None = None
        while True:
            try:
                payloads, probe = protocol.send(answers) if answers is not None else next(protocol)
            except StopIteration as done:
                return done.value
            timeout = self._budget(started, stop_event)
            self.requests_sent += len(payloads)
            if len(payloads) == 1:
                raw = [post(payloads[0], timeout)]
            else:
                with ThreadPoolExecutor(max_workers=min(16, len(payloads))) as pool:
                    raw = list(pool.map(lambda p: post(p, timeout), payloads))
            answers = [self._check(r, probe, timeout) for r in raw]
            if stop_event is not None and stop_event.is_set():
                raise GenerationCancelled("stopped")

    async def agenerate_turn(self, dialogue: Dialogue, guardrails: GuardrailSettings, sampling: SamplingSettings,
                             context_budget: int = 2048, stop_event: threading.Event | None = None,
                             seed: int | None = None, client: httpx.AsyncClient | None = None) -> Turn:
        """The same turn with asyncio: many dialogues in flight on one event loop."""
        own = client is None
        client = client or httpx.AsyncClient(headers=self._headers(),
                                             transport=self._transport if isinstance(self._transport, httpx.AsyncBaseTransport) else None)
        protocol = self.turn_protocol(dialogue, guardrails, sampling, context_budget, seed)
        started = time.perf_counter()

        async def post(payload: dict[str, Any], timeout: float) -> httpx.Response | Exception:
            try:
                return await client.post(self.url, json=payload, timeout=timeout)
            except Exception as exc:  # noqa: BLE001 - classified in _check
                return exc

        try:
            answers: list[Any] | None = None
            while True:
                try:
                    payloads, probe = protocol.send(answers) if answers is not None else next(protocol)
                except StopIteration as done:
                    return done.value
                timeout = self._budget(started, stop_event)
                self.requests_sent += len(payloads)
                raw = await asyncio.gather(*(post(p, timeout) for p in payloads))
                answers = [self._check(r, probe, timeout) for r in raw]
        finally:
            if own:
                await client.aclose()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


# ---- response parsing (vLLM and llama-server shapes) -------------------------------------

def _first_choice(response: Any, base_url: str) -> dict[str, Any]:
    choices = response.get("choices") if isinstance(response, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise BackendError(f"user simulator server {base_url} returned no choices")
    return choices[0]


def _as_id(token: Any) -> int | None:
    if isinstance(token, int):
        return token
    if isinstance(token, str) and token.startswith("token_id:"):
        try:
            return int(token.split(":", 1)[1])
        except ValueError:
            return None
    return None


def _choice_ids(choice: dict[str, Any]) -> list[int] | None:
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
            parsed = [_as_id(t) for t in tokens]
            if all(p is not None for p in parsed):
                return parsed  # type: ignore[return-value]
    if choice.get("text") == "":
        return []
    return None


def _choice_ids_strict(choice: dict[str, Any], base_url: str) -> list[int]:
    ids = _choice_ids(choice)
    if ids is None:
        raise BackendError(f"user simulator server {base_url} returned text without token ids "
                           "(needs return_token_ids, return_tokens_as_token_ids or logprobs with ids)")
    return ids


def _is_cut(choice: dict[str, Any]) -> bool:
    return choice.get("finish_reason") == "length"


def _token_logprob(logprobs: dict[str, Any], position: int) -> float | None:
    content = logprobs.get("content")
    if isinstance(content, list):
        if position < len(content) and isinstance(content[position], dict):
            value = content[position].get("logprob")
            return float(value) if isinstance(value, (int, float)) else None
        return None
    values = logprobs.get("token_logprobs")
    if isinstance(values, list) and position < len(values) and isinstance(values[position], (int, float)):
        return float(values[position])
    return None


def _top_at(logprobs: dict[str, Any], position: int) -> dict[int, float]:
    """Token id -> raw logprob among the alternatives reported at ``position``."""
    out: dict[int, float] = {}
    content = logprobs.get("content")
    if isinstance(content, list):
        if position < len(content) and isinstance(content[position], dict):
            for alt in content[position].get("top_logprobs") or []:
                if isinstance(alt, dict) and isinstance(alt.get("id"), int) and isinstance(alt.get("logprob"), (int, float)):
                    out[alt["id"]] = float(alt["logprob"])
        return out
    tops = logprobs.get("top_logprobs")
    if isinstance(tops, list) and position < len(tops) and isinstance(tops[position], dict):
        for token, value in tops[position].items():
            tid = _as_id(token)
            if tid is not None and isinstance(value, (int, float)):
                out[tid] = float(value)
    return out


def make_remote_simulators(urls: Sequence[str], model: str, tokenizer: Any, prompt_format: PromptFormat | None = None,
                           **kwargs: Any) -> list[CompletionsUserSimulator]:
    """One simulator per replica URL (a dialogue stays on one replica for all its turns)."""
    return [CompletionsUserSimulator(u, model, tokenizer, prompt_format, **kwargs) for u in urls]


def replica_index(key: str, replicas: int) -> int:
    """Stable replica for a dialogue key (Python's ``hash`` is salted per process: not that)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % max(1, replicas)

