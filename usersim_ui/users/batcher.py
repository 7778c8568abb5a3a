"""User turns that several dialogues ask for at the same time, made in one batched call.

A batch run keeps many dialogues in flight, each in its own thread, all sharing one in-process
model. Serialised, they would take the model one turn at a time; :class:`TurnBatcher` stands in
for the simulator and gathers the turns that are waiting while the model is busy: the thread
that gets the model next makes all of them with
:func:`users.batched.generate_user_turns` (each with the seed, guardrails and p_end it would
have had alone) and hands every waiting thread its own turn. Nothing waits for a timer: a lone
turn goes at once, through the single-dialogue path and its prefix cache; batches form only
from turns that would have queued anyway.

If a batched call fails (a turn that cannot be planned, say a context that cannot fit), its
turns are made again one by one, so that the error lands on the dialogue that caused it and
the others get their turns.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from usersim_ui.core.dialogue import Dialogue, GuardrailSettings, SamplingSettings, Turn
from usersim_ui.core.errors import GenerationCancelled
from usersim_ui.core.protocols import OnDraft
from usersim_ui.users.batched import TurnSettings, generate_user_turns
from usersim_ui.users.local import UserSimulator

MAX_ROWS = 16  # dialogues in one batched call: 16 x retry_cap rows at most in a retry round


@dataclass(eq=False)  # compared by identity: two dialogues may ask for the very same turn
class _Request:
    dialogue: Dialogue
    settings: TurnSettings
    seed: int | None
    stop_event: threading.Event | None
    result: Future = field(default_factory=Future)

    @property
    def stopped(self) -> bool:
        return self.stop_event is not None and self.stop_event.is_set()


class _AllStopped:
    """Stops a batched call only when every dialogue in it has been stopped."""

    def __init__(self, requests: list[_Request]):
        self.requests = requests

    def is_set(self) -> bool:
        return all(r.stopped for r in self.requests)


class TurnBatcher:
    """Drop-in for a :class:`UserSimulator` shared by many threads (``generate_turn`` and every
    other attribute); ``model_lock`` is a lock, or a callable that returns a fresh context
    manager per call, held while the model runs (the assistant's calls take the same one)."""

    def __init__(self, simulator: UserSimulator, model_lock: Any = None, max_rows: int = MAX_ROWS):
        self.simulator = simulator
        self.max_rows = max_rows
        self._model_lock = model_lock if model_lock is not None else threading.Lock()
        self._changed = threading.Condition()  # guards _waiting and _leading; notified when either changes
        self._waiting: list[_Request] = []
        self._leading = False  # a thread is waiting for the model, or using it, on behalf of all waiting turns
        self.calls: list[int] = []  # dialogues per call made, in order (what batching achieved)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.simulator, name)

    def _hold_model(self) -> AbstractContextManager:
        return self._model_lock() if callable(self._model_lock) else self._model_lock

    def generate_turn(self, dialogue: Dialogue, guardrails: GuardrailSettings, sampling: SamplingSettings,
                      context_budget: int = 2048, stop_event: threading.Event | None = None,
                      seed: int | None = None, on_draft: OnDraft | None = None) -> Turn:
        """The turn :meth:`UserSimulator.generate_turn` makes, possibly batched with others.

        One thread at a time leads: it waits for the model and makes every turn waiting by
        then; the others sleep until their turn is made or the lead is free. A caller that
        streams (``on_draft``) gets the single-dialogue path: a batched call has no
        per-dialogue token events.
        """
        if on_draft is not None:
            with self._hold_model():
                return self.simulator.generate_turn(dialogue, guardrails, sampling, context_budget, stop_event,
                                                    seed, on_draft)
        request = _Request(dialogue, TurnSettings(guardrails, sampling, context_budget), seed, stop_event)
        with self._changed:
            self._waiting.append(request)
            while self._leading and not request.result.done():
                self._changed.wait()
            if request.result.done():
                return request.result.result()
            self._leading = True
        try:
            with self._hold_model():
                while not request.result.done():  # oldest first, so ours is in one of these calls
                    with self._changed:
                        taken, self._waiting = self._waiting[: self.max_rows], self._waiting[self.max_rows:]
                    self._make(taken)
                    with self._changed:
                        self._changed.notify_all()
        finally:
            with self._changed:
                if request in self._waiting:  # the model was never ours (a stopped run's slot, say)
                    self._waiting.remove(request)
                self._leading = False
                self._changed.notify_all()
        return request.result.result()

    async def agenerate_turn(self, dialogue: Dialogue, guardrails: GuardrailSettings, sampling: SamplingSettings,
                             context_budget: int = 2048, stop_event: threading.Event | None = None,
                             seed: int | None = None) -> Turn:
        """:meth:`generate_turn` from a worker thread, so that turns awaited together batch."""
        return await asyncio.to_thread(self.generate_turn, dialogue, guardrails, sampling, context_budget,
                                       stop_event, seed)

    def _make(self, requests: list[_Request]) -> None:
        """Every request's future is set when this returns, whatever happens."""
        try:
            self._make_turns(requests)
        finally:
            for r in requests:
                if not r.result.done():
                    r.result.set_exception(RuntimeError("the batched turn was lost (see the log)"))

    def _make_turns(self, requests: list[_Request]) -> None:
        stopped = [r.stopped for r in requests]  # one reading: an event may fire while we look
        live = [r for r, s in zip(requests, stopped) if not s]
        for r, s in zip(requests, stopped):
            if s:
                r.result.set_exception(GenerationCancelled("stopped before the turn"))
        if not live:
            return
        self.calls.append(len(live))
        try:
            if len(live) == 1:
                turns = [self._alone(live[0])]
            else:
                turns = generate_user_turns(self.simulator, [r.dialogue for r in live], [r.settings for r in live],
                                            [r.seed for r in live], stop_event=_AllStopped(live))  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - handed to the callers below
            if len(live) == 1 or isinstance(exc, GenerationCancelled):
                for r in live:
                    r.result.set_exception(exc)
                return
            for r in live:  # one dialogue's bad input must not fail the others
                try:
                    r.result.set_result(self._alone(r))
                except Exception as alone_exc:  # noqa: BLE001
                    r.result.set_exception(alone_exc)
            return
        for r, turn in zip(live, turns):
            if r.stopped:
                r.result.set_exception(GenerationCancelled("stopped during the turn"))
            else:
                r.result.set_result(turn)

    def _alone(self, request: _Request) -> Turn:
        s = request.settings
        return self.simulator.generate_turn(request.dialogue, s.guardrails, s.sampling, s.context_budget,
                                            request.stop_event, request.seed)
