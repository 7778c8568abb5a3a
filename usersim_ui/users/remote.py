"""The simulated user on an OpenAI-style ``/v1/completions`` server (vLLM, llama.cpp's
``llama-server``): the same :class:`~usersim_ui.core.dialogue.Turn` as in-process, because the
turn is assembled by the same :func:`usersim_ui.users.turn.assemble`; this module only draws.

Why the completions API with token ids: the prompt is built here, exactly as in-process
(special tokens only from the template, content as plain text), so a server's own chat
template never sees the dialogue. What each guardrail costs on the wire:

* **p_end** is the raw probability of the end marker as the turn's first token. Three ways to
  read it, tried in this order on first use and remembered in :attr:`p_end_method`:

  - ``logprob_token_ids``: vLLM >= 0.26 returns the raw logprob of named ids
    (``logprobs=1, logprob_token_ids=[end, ...]``), one 1-token request; the banned first
    tokens' probabilities come back in the same answer;
  - ``forced_sample``: a 1-token greedy request with ``logit_bias`` +100 on the end id and
    ``logprobs``. Only a server that reports *raw* logprobs (llama-server's default
    ``post_sampling_probs=false``, sent explicitly; vLLM's default ``--logprobs-mode
    raw_logprobs``) gives P(end) this way. A server reporting processed logprobs shows the
    +100 bias: the forced token then stands more than :data:`PROCESSED_GAP` nats above every
    alternative, and the method is refused for that server (P(end) would read ~1.0);
  - ``echo``: score ``ids + [end]`` with ``echo=True`` and read the prompt logprob of the last
    position (older vLLM, llama-cpp-python's server).

  The turn records which one gave its P(end) (``Turn.p_end_source``). A marker of several
  tokens (the prompted baseline's ``[END]``) is the product of one query per token.
* **First-token filter**, at the first position only: one request for the first token with
  ``logit_bias`` -100 on the banned ids (``n`` samples at once), then one request per sample
  continuing from ``ids + [first]``.
* **No early ending**: ``logit_bias`` -100 on the end id at every position (a one-token
  marker); a marker of several tokens goes as ``bad_words`` (vLLM).
* A server that **ignores** ``logit_bias`` (a banned first token or the masked end comes back)
  is refused with a :class:`BackendError` that says so: a guardrail is never dropped silently.
* **Length and repetition** are checked by the shared assembly; the retries of one round go
  as ``n`` samples in one request (seeds ``seed + i``, llama-server's rule; a server that
  refuses ``n`` gets ``n`` requests of one sample sent together).

Behind a **router** in front of several replicas, a dialogue's requests carry its key in
:data:`ROUTING_KEY_HEADER` (:class:`RoutedUser`), so a router that pins a key to one worker
keeps the dialogue's growing prompt on the replica that has its prefix cached.

Every failure (connection refused, timeout, a non-200 answer, a body that is not JSON, no
choices, no token ids, values that are not logprobs or ids outside the vocabulary) raises
:class:`~usersim_ui.core.errors.BackendError` naming the server; a turn is returned whole or
not at all. HTTP 429 and 503 and timeouts are retried with backoff (``Retry-After``
honoured) within the turn's deadline; Stop is seen within :data:`POLL_S` of any wait.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Generator, Sequence

import httpx

from usersim_ui.core.dialogue import Dialogue, SamplingSettings, Turn
from usersim_ui.core.errors import BackendError, GenerationCancelled
from usersim_ui.core.guardrails import GuardrailSettings
from usersim_ui.core.protocols import OnDraft
from usersim_ui.prompts.formats import PromptFormat, UserLMFormat
from usersim_ui.users.remote_wire import (
    Failed,
    choice_ids,
    choice_ids_strict,
    first_choice,
    is_cut,
    token_logprob,
    top_at,
    who,
)
from usersim_ui.users.turn import Draw, Drawn, FirstStep, TurnPlan, TurnRules, assemble

P_END_METHODS = ("logprob_token_ids", "forced_sample", "echo")
BAN = -100.0
FORCE = 100.0
TOP_K = 20  # vLLM's default --max-logprobs
PROCESSED_GAP = 20.0  # nats between a +100-biased token and the best alternative: the bias shows
RAW = {"post_sampling_probs": False}  # llama-server: report probabilities before sampling (its default)
RETRY_STATUSES = (429, 502, 503, 504)
RETRIES = 3
POLL_S = 0.1  # how often a blocked request looks at Stop
REQUEST_BASE_S = 60.0  # a request's own timeout: this plus PER_TOKEN_S per token asked for (a busy server queues)
PER_TOKEN_S = 0.5
# The session key sglang-router's ``manual`` policy (and the SGLang model gateway's
# ``consistent_hashing``) pins to one worker; any router that hashes on a header can use it.
ROUTING_KEY_HEADER = "X-SMG-Routing-Key"

Requests = list[dict[str, Any]]
Protocol = Generator[tuple[Requests, bool], list[Any], Turn]


@dataclass(frozen=True)
class _Sample:
    ids: list[int]
    cut: bool  # hit max_tokens without a stop token


class CompletionsUserSimulator:
    """A simulated user whose model runs on a completions server (a
    :class:`~usersim_ui.core.protocols.UserModel`).

    ``tokenizer`` and ``prompt_format`` must be the served model's: the ids are built here.
    ``timeout_s`` caps one request (it also scales with the tokens asked for), ``deadline_s``
    the whole turn, retries included.
    """

    def __init__(self, base_url: str, model: str, tokenizer: Any, prompt_format: PromptFormat | None = None,
                 timeout_s: float = 120.0, deadline_s: float = 300.0, api_key: str = "",
                 p_end_method: str = "auto", transport: httpx.BaseTransport | None = None,
                 batched_retries: bool = True):
        if p_end_method not in ("auto",) + P_END_METHODS:
            raise ValueError(f"p_end_method must be auto or one of {P_END_METHODS}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.tokenizer = tokenizer
        self.format = prompt_format or UserLMFormat(tokenizer)
        self.rules = TurnRules(tokenizer, self.format, early_stop=False, batched_retries=batched_retries)
        self.vocab = len(tokenizer)
        self.timeout_s = timeout_s
        self.deadline_s = deadline_s
        self.api_key = api_key
        self.p_end_method = p_end_method
        self.refused_methods: dict[str, str] = {}  # method -> why it was not trusted on this server
        self.device = "remote"
        self._transport = transport
        self._client: httpx.Client | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.requests_sent = 0
        self.n_supported = True  # False once a server refused n > 1

    # ---- identity ------------------------------------------------------------------------

    @property
    def model_id(self) -> str:
        return f"{self.model} @ {self.base_url} [{self.format.name}; p_end via {self.p_end_method}]"

    @property
    def url(self) -> str:
        return f"{self.base_url}/completions"

    def banned_ids(self, words: tuple[str, ...], any_case: bool = False) -> list[int]:
        return self.rules.banned_ids(words, any_case)

    # ---- P(end) ----------------------------------------------------------------------------

    def _base(self, prompt: list[int], **extra: Any) -> dict[str, Any]:
        return {"model": self.model, "prompt": prompt, "stream": False, **extra}

    def _sentinels(self, target: int) -> list[int]:
        """Ids asked for beside the target so that an honoured ``logprob_token_ids`` is told apart
        from a top-k that happens to hold the target (two ids are never both top-1)."""
        return [target] + [t for t in self.format.stop_ids() if t != target][:1]

    def _logprob_query(self, prefix: list[int], target: int, method: str, extra_ids: Sequence[int] = ()) -> dict[str, Any]:
        if method == "logprob_token_ids":
            ids = list(dict.fromkeys([*self._sentinels(target), *extra_ids]))
            return self._base(prefix, max_tokens=1, temperature=0.0, logprobs=1, logprob_token_ids=ids,
                              return_tokens_as_token_ids=True, **RAW)
        if method == "forced_sample":
            return self._base(prefix, max_tokens=1, temperature=0.0, logprobs=TOP_K, logit_bias={str(target): FORCE},
                              return_tokens_as_token_ids=True, return_token_ids=True, **RAW)
        return self._base(prefix + [target], max_tokens=1, temperature=0.0, logprobs=1, echo=True,
                          return_tokens_as_token_ids=True, **RAW)

    def _read_logprob(self, response: Any, prefix: list[int], target: int, method: str) -> float | None:
        """The raw logprob of ``target`` after ``prefix``, or None when this method did not give
        one that can be trusted (the reason is kept in :attr:`refused_methods`)."""
        if isinstance(response, Failed):
            return None
        choice = first_choice(response, self.base_url)
        logprobs = choice.get("logprobs") or {}
        if method == "logprob_token_ids":
            top = top_at(logprobs, 0, self.base_url)
            # a server that ignores logprob_token_ids still lists its top-k: require every id asked for
            return top.get(target) if all(t in top for t in self._sentinels(target)) else None
        if method == "forced_sample":
            ids = choice_ids(choice)
            if not ids or ids[0] != target:
                return None  # the bias was not honoured
            value = token_logprob(logprobs, 0, self.base_url)
            others = [v for t, v in top_at(logprobs, 0, self.base_url).items() if t != target]
            if value is None:
                return None
            if not others or value - max(others) > PROCESSED_GAP:
                self.refused_methods[method] = ("its logprobs are processed (after logit_bias), so a forced sample "
                                                "cannot read P(end)" if others else
                                                "it reported no alternatives to check the forced token's logprob against")
                return None
            return value
        return token_logprob(logprobs, len(prefix), self.base_url)  # echo: the prompt's own logprobs first

    def _p_end(self, plan: TurnPlan) -> Generator[tuple[Requests, bool], list[Any], tuple[float, dict[int, float] | None, str]]:
        """P(end) at the first position, the banned ids' probabilities where the method gives
        them exactly, and the method that gave P(end)."""
        marker, prompt, banned = plan.marker, plan.prompt, plan.banned
        auto = self.p_end_method == "auto"
        methods = [m for m in P_END_METHODS if m not in self.refused_methods] if auto else [self.p_end_method]
        answers: dict[str, str] = {}  # what the server said to each refused probe: the error quotes it
        for method in methods:
            extra = banned if method == "logprob_token_ids" else []
            queries = [self._logprob_query(prompt + marker[:k], marker[k], method, extra if k == 0 else ())
                       for k in range(len(marker))]
            responses = yield queries, auto
            answers.update({method: f"HTTP {r.status}: {r.text[:200]}" for r in responses[:1] if isinstance(r, Failed)})
            values = [self._read_logprob(r, prompt + marker[:k], marker[k], method) for k, r in enumerate(responses)]
            if all(v is not None for v in values):
                if auto:
                    with self._lock:
                        self.p_end_method = method
                exact = None
                if extra:
                    top = top_at(first_choice(responses[0], self.base_url).get("logprobs") or {}, 0, self.base_url)
                    exact = {t: math.exp(top[t]) for t in extra if t in top}
                return math.exp(sum(values)), exact, method  # type: ignore[arg-type]
            if not auto:
                why = self.refused_methods.get(method, "it did not return the end token's logprob")
                raise BackendError(f"{who(self.base_url)}: p_end_method={method!r} cannot be used: {why}")
        refused = "; ".join(f"{m}: {why}" for m, why in {**answers, **self.refused_methods}.items())
        raise BackendError(f"{who(self.base_url)} gives no trustworthy way to read P(end): it supports none of "
                           f"{', '.join(P_END_METHODS)} (needs raw logprobs with logprob_token_ids, logit_bias, or echo)"
                           + (f" [{refused}]" if refused else ""))

    # ---- drawing samples -------------------------------------------------------------------

    def _sampling(self, sampling: SamplingSettings) -> dict[str, Any]:
        if sampling.temperature > 0:
            return {"temperature": sampling.temperature, "top_p": sampling.top_p}
        return {"temperature": 0.0}

    def _end_ban(self, plan: TurnPlan) -> tuple[dict[str, float], dict[str, Any]]:
        if not plan.masked_end:
            return {}, {}
        if len(plan.marker) == 1:
            return {str(plan.marker[0]): BAN}, {}
        return {}, {"bad_words": [self.format.end_marker]}

    def _ignored_bias(self, plan: TurnPlan, first_tokens: Sequence[int], samples: Sequence[Sequence[int]]) -> None:
        """Refuse a server that drew what ``logit_bias`` -100 forbade: its guardrails are off."""
        hit = next((t for t in first_tokens if t in set(plan.banned)), None)
        if hit is not None:
            word = self.tokenizer.decode([hit]).strip()
            raise BackendError(f"{who(self.base_url)} ignores logit_bias: it opened a turn with {word!r} (id {hit}), "
                               "which the first-token filter bans. Serve with logit_bias support or switch the filter off.")
        if plan.masked_end and len(plan.marker) == 1 and any(plan.marker[0] in s for s in samples):
            raise BackendError(f"{who(self.base_url)} ignores logit_bias: it drew the end token while the no-early-"
                               "ending guardrail masks it. Serve with logit_bias support or switch the guardrail off.")

    def _draw(self, plan: TurnPlan, draw: Draw, want_top: bool
              ) -> Generator[tuple[Requests, bool], list[Any], tuple[list[_Sample], dict[int, float]]]:
        """``draw.size`` samples: one request with ``n``, or the two-step first-token filter."""
        stop, marker = plan.stop_ids, plan.marker
        end_bias, end_extra = self._end_ban(plan)
        common = {"stop_token_ids": stop, "return_token_ids": True, "return_tokens_as_token_ids": True, **RAW,
                  **self._sampling(plan.sampling), **end_extra}
        max_new = plan.sampling.max_new_tokens
        logprobs = TOP_K if want_top else 1
        if not plan.banned:
            payload = self._base(plan.prompt, max_tokens=max_new, n=draw.size, seed=draw.seed, logprobs=logprobs,
                                 **common, **({"logit_bias": end_bias} if end_bias else {}))
            choices = yield from self._choices(payload, draw.size, draw.seed)
            top = top_at(choices[0][1].get("logprobs") or {}, 0, self.base_url) if want_top else {}
            samples = [_Sample(choice_ids_strict(c, self.base_url, self.vocab), is_cut(c)) for _s, c in choices]
            self._ignored_bias(plan, [], [s.ids for s in samples])
            return samples, top
        # First position only: the first token with the ban, then each sample goes on without it.
        payload = self._base(plan.prompt, max_tokens=1, n=draw.size, seed=draw.seed, logprobs=logprobs,
                             logit_bias={**end_bias, **{str(t): BAN for t in plan.banned}}, **common)
        choices = yield from self._choices(payload, draw.size, draw.seed)
        top = top_at(choices[0][1].get("logprobs") or {}, 0, self.base_url) if want_top else {}
        firsts = [(s, choice_ids_strict(c, self.base_url, self.vocab)[:1]) for s, c in choices]
        self._ignored_bias(plan, [f[0] for _s, f in firsts if f], [f for _s, f in firsts])
        ends_here = set(stop) | ({marker[0]} if len(marker) == 1 else set())
        follow = [(s, first) for s, first in firsts if first and first[0] not in ends_here and max_new > 1]
        rest: dict[int, dict[str, Any]] = {}
        if follow:  # every sample may have ended at its first token: then there is nothing to ask
            payloads = [self._base(plan.prompt + first, max_tokens=max_new - 1, n=1, seed=s, logprobs=1, **common,
                                   **({"logit_bias": end_bias} if end_bias else {})) for s, first in follow]
            responses = yield payloads, False
            rest = {s: first_choice(r, self.base_url) for (s, _f), r in zip(follow, responses)}
        samples = []
        for s, first in firsts:
            if s in rest:
                tail = choice_ids_strict(rest[s], self.base_url, self.vocab)
                self._ignored_bias(plan, [], [tail])
                samples.append(_Sample(first + tail, is_cut(rest[s])))
            else:
                samples.append(_Sample(first, bool(first) and first[0] not in ends_here and max_new <= 1))
        return samples, top

    def _choices(self, payload: dict[str, Any], size: int, seed: int
                 ) -> Generator[tuple[Requests, bool], list[Any], list[tuple[int, dict[str, Any]]]]:
        """The ``size`` choices of one request, asking one by one for what a server without ``n`` left out.

        Each choice is paired with its seed: ``seed + index`` (llama-server's own rule for ``n``).
        A server that refuses ``n`` (llama-server allows at most its slot count) gets ``size``
        requests of one sample each, sent together, and is not asked for ``n`` again.
        """
        if size > 1 and self.n_supported:
            [response] = yield [payload], True
            if isinstance(response, Failed):
                self.n_supported = False
        if size == 1 or not self.n_supported:
            responses = yield [{**payload, "n": 1, "seed": seed + i} for i in range(size)], False
            return [(seed + i, first_choice(r, self.base_url)) for i, r in enumerate(responses)]
        choices = response.get("choices") if isinstance(response, dict) else None
        if not isinstance(choices, list) or not choices:
            raise BackendError(f"{who(self.base_url)} returned no choices")
        choices = sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0)[:size]
        out = [(seed + i, c) for i, c in enumerate(choices)]
        if len(out) < size:
            missing = list(range(len(out), size))
            extra = yield [{**payload, "n": 1, "seed": seed + i} for i in missing], False
            out += [(seed + i, first_choice(r, self.base_url)) for i, r in zip(missing, extra)]
        return out

    # ---- the turn, as a sans-IO protocol -------------------------------------------------
    # The generator yields (payloads, probe) and receives one parsed JSON object (or Failed for
    # a refused probe) per payload; the sync and async drivers below only move bytes.

    def turn_protocol(self, dialogue: Dialogue, guardrails: GuardrailSettings, sampling: SamplingSettings,
                      context_budget: int = 2048, seed: int | None = None, on_draft: OnDraft | None = None) -> Protocol:
        """The whole turn as a generator of requests: drive it with :meth:`generate_turn` or
        :meth:`agenerate_turn`. ``on_draft`` hears each draw as it starts (requests are not
        streamed, so there is no text before the draw returns)."""
        plan = self.rules.plan(dialogue, guardrails, sampling, context_budget, seed)
        started = time.perf_counter()
        p_end, exact, method = yield from self._p_end(plan)
        turns = assemble(self.rules, plan, self.model_id)
        draw = next(turns)
        while True:
            if on_draft is not None:
                on_draft(draw.draft())
            samples, top = yield from self._draw(plan, draw, want_top=draw.first and exact is None)
            first = None
            if draw.first:
                banned = exact if exact is not None else {t: math.exp(top[t]) for t in plan.banned if t in top}
                first = FirstStep(p_end, banned, f"server:{method}")
            now = time.perf_counter()
            try:
                draw = turns.send(Drawn([(s.ids, s.cut) for s in samples], now - started, first))
            except StopIteration as done:
                return done.value
            started = now

    # ---- drivers -------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _sync_client(self) -> tuple[httpx.Client, ThreadPoolExecutor]:
        with self._lock:
            if self._client is None:
                self._client = httpx.Client(transport=self._transport, headers=self._headers(),
                                            limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))
                self._pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="usersim-remote")
            return self._client, self._pool  # type: ignore[return-value]

    def _check(self, response: httpx.Response | Exception, probe: bool, timeout: float) -> Any:
        """Parsed JSON, or :class:`Failed` for a refused probe; anything else is a BackendError."""
        if isinstance(response, httpx.TimeoutException):
            raise BackendError(f"{who(self.base_url)} did not answer within {timeout:g} s") from response
        if isinstance(response, httpx.HTTPError):
            raise BackendError(f"{who(self.base_url)} failed: {type(response).__name__}") from response
        if isinstance(response, Exception):
            raise response
        if response.status_code >= 400:
            if probe and response.status_code in (400, 404, 422, 500, 501):  # a capability the server lacks
                return Failed(response.status_code, response.text[:300])
            raise BackendError(f"{who(self.base_url)} answered HTTP {response.status_code}: {response.text[:300]}")
        try:
            data = response.json()
        except ValueError as exc:
            raise BackendError(f"{who(self.base_url)} returned a body that is not JSON: {response.text[:120]!r}") from exc
        if not isinstance(data, dict):
            raise BackendError(f"{who(self.base_url)} returned JSON that is not an object: {str(data)[:120]}")
        if not probe and not data.get("choices"):
            raise BackendError(f"{who(self.base_url)} returned no choices: {str(data)[:200]}")
        return data

    def _timeout(self, payload: dict[str, Any], started: float, stop_event: threading.Event | None) -> float:
        """This request's timeout: scaled by the tokens it asks for, within the turn's deadline."""
        if stop_event is not None and stop_event.is_set():
            raise GenerationCancelled("stopped")
        left = self.deadline_s - (time.perf_counter() - started)
        if left <= 0:
            raise BackendError(f"{who(self.base_url)}: the turn passed its deadline of {self.deadline_s:g} s")
        tokens = int(payload.get("max_tokens") or 1) * int(payload.get("n") or 1)
        return min(self.timeout_s, REQUEST_BASE_S + PER_TOKEN_S * tokens, left)

    def _retry_after(self, raw: httpx.Response | Exception, attempt: int) -> float | None:
        """Seconds to wait before retrying this answer, or None when it is final."""
        if attempt >= RETRIES:
            return None
        if isinstance(raw, httpx.TimeoutException):
            return 0.5 * 2 ** attempt
        if isinstance(raw, httpx.Response) and raw.status_code in RETRY_STATUSES:
            try:
                return min(30.0, max(0.0, float(raw.headers.get("retry-after", ""))))
            except ValueError:
                return 0.5 * 2 ** attempt
        return None

    def _post_sync(self, payload: dict[str, Any], probe: bool, started: float,
                   stop_event: threading.Event | None, headers: dict[str, str] | None = None) -> Any:
        """One request with retries; Stop is seen within POLL_S of any wait (the request's thread
        is left to finish on its own timeout, the run is released at once)."""
        client, pool = self._sync_client()
        for attempt in range(RETRIES + 1):
            timeout = self._timeout(payload, started, stop_event)
            self.requests_sent += 1
            future: Future = pool.submit(_post, client, self.url, payload, timeout, headers)
            deadline = time.monotonic() + timeout + 1.0
            while True:
                try:
                    raw = future.result(timeout=POLL_S)
                    break
                except FutureTimeout:
                    if stop_event is not None and stop_event.is_set():
                        raise GenerationCancelled("stopped while waiting for the server") from None
                    if time.monotonic() > deadline:
                        raw = httpx.ReadTimeout("the request passed its timeout")
                        break
            wait = self._retry_after(raw, attempt)
            if wait is None:
                return self._check(raw, probe, timeout)
            if stop_event is not None and stop_event.wait(min(wait, max(0.0, self.deadline_s - (time.perf_counter() - started)))):
                raise GenerationCancelled("stopped while waiting to retry")
        raise AssertionError("unreachable")

    def generate_turn(self, dialogue: Dialogue, guardrails: GuardrailSettings, sampling: SamplingSettings,
                      context_budget: int = 2048, stop_event: threading.Event | None = None,
                      seed: int | None = None, on_draft: OnDraft | None = None,
                      headers: dict[str, str] | None = None) -> Turn:
        """The next user turn (blocking). ``on_draft`` hears each draw as it starts (requests are
        not streamed). ``headers`` go with each of the turn's requests."""
        protocol = self.turn_protocol(dialogue, guardrails, sampling, context_budget, seed, on_draft)
        started = time.perf_counter()
        answers: list[Any] | None = None
        while True:
            try:
                payloads, probe = protocol.send(answers) if answers is not None else next(protocol)
            except StopIteration as done:
                return done.value
            if len(payloads) == 1:
                answers = [self._post_sync(payloads[0], probe, started, stop_event, headers)]
            else:  # sent together; each polls Stop, so the pool's exit waits at most POLL_S after one
                with ThreadPoolExecutor(max_workers=len(payloads)) as fan_out:
                    answers = list(fan_out.map(lambda p: self._post_sync(p, probe, started, stop_event, headers),
                                               payloads))
            if stop_event is not None and stop_event.is_set():
                raise GenerationCancelled("stopped")

    async def agenerate_turn(self, dialogue: Dialogue, guardrails: GuardrailSettings, sampling: SamplingSettings,
                             context_budget: int = 2048, stop_event: threading.Event | None = None,
                             seed: int | None = None, client: httpx.AsyncClient | None = None,
                             headers: dict[str, str] | None = None) -> Turn:
        """The same turn with asyncio: many dialogues in flight on one event loop."""
        own = client is None
        client = client or httpx.AsyncClient(headers=self._headers(),
                                             transport=self._transport if isinstance(self._transport, httpx.AsyncBaseTransport) else None)
        protocol = self.turn_protocol(dialogue, guardrails, sampling, context_budget, seed)
        started = time.perf_counter()

        async def post(payload: dict[str, Any], probe: bool) -> Any:
            for attempt in range(RETRIES + 1):
                timeout = self._timeout(payload, started, stop_event)
                self.requests_sent += 1
                try:
                    raw: Any = await client.post(self.url, json=payload, timeout=timeout, headers=headers)
                except Exception as exc:  # noqa: BLE001 - classified in _check
                    raw = exc
                wait = self._retry_after(raw, attempt)
                if wait is None:
                    return self._check(raw, probe, timeout)
                await asyncio.sleep(wait)
            raise AssertionError("unreachable")

        try:
            answers: list[Any] | None = None
            while True:
                try:
                    payloads, probe = protocol.send(answers) if answers is not None else next(protocol)
                except StopIteration as done:
                    return done.value
                answers = list(await asyncio.gather(*(post(p, probe) for p in payloads)))
        finally:
            if own:
                await client.aclose()

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None


def _post(client: httpx.Client, url: str, payload: dict[str, Any], timeout: float,
          headers: dict[str, str] | None = None) -> httpx.Response | Exception:
    try:
        return client.post(url, json=payload, timeout=timeout, headers=headers)
    except Exception as exc:  # noqa: BLE001 - classified in _check
        return exc


class RoutedUser:
    """One dialogue's handle on a shared :class:`CompletionsUserSimulator`: every request of its
    turns carries a digest of ``key`` in ``header`` (a router's session affinity; a digest, since
    a header holds ASCII only and a dialogue key may not). It shares the simulator's connections
    and what it learnt about the server (P(end) method, ``n``); all else is the simulator's."""

    def __init__(self, simulator: CompletionsUserSimulator, key: str, header: str = ROUTING_KEY_HEADER):
        self.simulator = simulator
        self.headers = {header: hashlib.sha256(key.encode()).hexdigest()[:32]}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.simulator, name)

    def generate_turn(self, dialogue: Dialogue, guardrails: GuardrailSettings, sampling: SamplingSettings,
                      context_budget: int = 2048, stop_event: threading.Event | None = None,
                      seed: int | None = None, on_draft: OnDraft | None = None) -> Turn:
        return self.simulator.generate_turn(dialogue, guardrails, sampling, context_budget, stop_event, seed,
                                            on_draft, headers=self.headers)

    async def agenerate_turn(self, dialogue: Dialogue, guardrails: GuardrailSettings, sampling: SamplingSettings,
                             context_budget: int = 2048, stop_event: threading.Event | None = None,
                             seed: int | None = None, client: httpx.AsyncClient | None = None) -> Turn:
        return await self.simulator.agenerate_turn(dialogue, guardrails, sampling, context_budget, stop_event, seed,
                                                   client=client, headers=self.headers)


def make_remote_simulators(urls: Sequence[str], model: str, tokenizer: Any, prompt_format: PromptFormat | None = None,
                           **kwargs: Any) -> list[CompletionsUserSimulator]:
    """One simulator per replica URL (a dialogue stays on one replica for all its turns)."""
    return [CompletionsUserSimulator(u, model, tokenizer, prompt_format, **kwargs) for u in urls]


def replica_index(key: str, replicas: int) -> int:
    """Stable replica for a dialogue key (Python's ``hash`` is salted per process: not that)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % max(1, replicas)
