"""Run control: what happens when a researcher's actions overlap.

The design, in full:

* **One run per session.** A *run* is any event that makes model turns (next user turn,
  next assistant turn, step, auto-run, regenerate). :meth:`RunControl.start` registers it
  the moment its handler starts; a second run in the same session is refused.
* **Every other event that changes the dialogue** either
  - is **refused** with a message while a run is in flight (edit, undo, send reply,
    import, and any second run): it never applies to a dialogue that the run would then
    overwrite; or
  - **cancels the run and then applies** (End, Reset, the chat box's Clear): the run stops,
    and its last yield is the dialogue with the transition applied
    (:meth:`RunControl.cancel_then`), so nothing lands after it.
  Stop, live guardrail toggles and export never conflict: they change no dialogue.
* **Stop** sets the run's event. It is seen while the run waits for the model (the wait
  polls it), between turns (each turn checks it first) and within one token during a turn
  (the model turn streams a heartbeat per token and is closed on Stop; see ``gpu.py``).
* **The model** is one shared resource: model turns take a FIFO slot
  (:meth:`RunControl.model_slot`), so sessions take turns fairly; turns that do not use the
  local model (an OpenAI-compatible endpoint, the researcher typing) take no slot.
* **Bounds.** At most ``max_runs`` runs at once (then: refused, "busy"); waits are recorded
  (p50/p95 for the soak test); a session's entries are dropped by :meth:`forget`
  (on page unload) or after ``idle_ttl_s`` without a run.

This module holds no gradio: the UI maps :class:`RunRefused` to a toast.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

from usersim_ui.core.dialogue import Dialogue
from usersim_ui.core.errors import GenerationCancelled

Transition = Callable[[Dialogue], Dialogue]


class RunRefused(RuntimeError):
    """An expected refusal: the action cannot apply now (a run is in flight, the server is full)."""


@dataclass(eq=False)
class Run:
    session: str
    stop: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    then: Transition | None = None  # applied by the run as it winds down (End, Reset)
    closing: bool = False  # its final dialogue is being decided: too late to attach ``then``
    outcome: Dialogue | None = None  # the dialogue it ended with, once finished


class RunControl:
    """Per-session runs and the shared model slot; one instance per app."""

    def __init__(self, model_slots: int = 1, max_runs: int = 16, idle_ttl_s: float = 3600.0,
                 poll_s: float = 0.05, on_forget: Callable[[str, dict[str, object]], None] | None = None):
        """``on_forget(session, data)`` releases what a session left behind (its export folder)."""
        self.max_runs, self.idle_ttl_s, self.poll_s, self.on_forget = max_runs, idle_ttl_s, poll_s, on_forget
        self._lock = threading.Lock()
        self._runs: dict[str, Run] = {}
        self._slots = threading.Semaphore(model_slots)
        self._fifo: deque[Run] = deque()
        self._fifo_changed = threading.Condition()
        self._last_seen: dict[str, float] = {}
        self._session_data: dict[str, dict[str, object]] = {}
        self.waits_s: deque[float] = deque(maxlen=10_000)

    # ---- runs -----------------------------------------------------------------------------

    @contextmanager
    def start(self, session: str) -> Iterator[Run]:
        """Register a run for ``session`` for the duration of the block; refuse a second one."""
        with self._lock:
            self._expire_idle()
            if session in self._runs:
                raise RunRefused("A run is already in flight in this session: wait for it to finish or press Stop.")
            if len(self._runs) >= self.max_runs:
                raise RunRefused(f"The server is running {len(self._runs)} dialogues, its limit; try again shortly.")
            run = self._runs[session] = Run(session)
            self._last_seen[session] = time.monotonic()
        try:
            yield run
        finally:
            run.stop.set()  # anything still working for it (a worker, a stream) winds down
            with self._lock:
                if self._runs.get(session) is run:
                    del self._runs[session]
                self._last_seen[session] = time.monotonic()
            if run.outcome is None:
                run.closing = True
            run.finished.set()

    def finish(self, run: Run, dialogue: Dialogue) -> Dialogue:
        """The run's final dialogue: ``dialogue`` with any transition End or Reset asked for."""
        with self._lock:
            run.closing = True
            then = run.then
        run.outcome = then(dialogue) if then is not None else dialogue
        return run.outcome

    def in_flight(self, session: str) -> bool:
        with self._lock:
            return session in self._runs

    def refuse_if_running(self, session: str, action: str) -> None:
        """For events that change the dialogue and cannot wait for a run."""
        if self.in_flight(session):
            raise RunRefused(f"{action} is not possible while a run is in flight: press Stop first.")

    def stop(self, session: str) -> bool:
        """Stop the session's run, whether it waits for the model, runs a turn, or is between turns."""
        with self._lock:
            run = self._runs.get(session)
        if run is None:
            return False
        run.stop.set()
        with self._fifo_changed:
            self._fifo_changed.notify_all()
        return True

    def cancel_then(self, session: str, transition: Transition, timeout_s: float = 30.0) -> Dialogue | None:
        """Stop the session's run and have it end on ``transition(its dialogue)``.

        Returns that final dialogue, or None when no run was in flight (the caller applies the
        transition to the dialogue it has). The run's last yield and this return agree, so
        whichever the page applies last, it shows the same dialogue.
        """
        with self._lock:
            run = self._runs.get(session)
            if run is None:
                return None
            attached = not run.closing
            if attached:
                run.then = transition
        run.stop.set()
        with self._fifo_changed:
            self._fifo_changed.notify_all()
        if not run.finished.wait(timeout_s):
            raise RunRefused(f"The run did not stop within {timeout_s:g} s; try again.")
        if run.outcome is None:  # it ended before deciding a dialogue (refused at its start)
            return None
        return run.outcome if attached else transition(run.outcome)

    # ---- the model slot -------------------------------------------------------------------

    @contextmanager
    def model_slot(self, run: Run) -> Iterator[float]:
        """Hold the shared model for one turn, in arrival order; yields the seconds waited.

        Raises GenerationCancelled if the run is stopped while it waits.
        """
        began = time.perf_counter()
        with self._fifo_changed:
            self._fifo.append(run)
            try:
                while True:
                    if run.stop.is_set():
                        raise GenerationCancelled("stopped while waiting for the model")
                    if self._fifo[0] is run and self._slots.acquire(blocking=False):
                        break
                    self._fifo_changed.wait(self.poll_s)
            finally:
                self._fifo.remove(run)
                self._fifo_changed.notify_all()
        waited = time.perf_counter() - began
        self.waits_s.append(waited)
        try:
            yield waited
        finally:
            self._slots.release()
            with self._fifo_changed:
                self._fifo_changed.notify_all()

    # ---- per-session data -----------------------------------------------------------------

    def session_data(self, session: str) -> dict[str, object]:
        """A small dict that lives as long as the session (live settings, export folder...)."""
        with self._lock:
            self._last_seen[session] = time.monotonic()
            return self._session_data.setdefault(session, {})

    def forget(self, session: str) -> dict[str, object]:
        """Drop everything held for a session that has gone (its run is stopped); returns its data."""
        self.stop(session)
        with self._lock:
            self._last_seen.pop(session, None)
            data = self._session_data.pop(session, {})
        if self.on_forget is not None:
            self.on_forget(session, data)
        return data

    def sessions(self) -> int:
        with self._lock:
            return len(self._session_data)

    def _expire_idle(self) -> None:
        """Sessions never closed (API clients have no unload) are dropped after ``idle_ttl_s``."""
        now = time.monotonic()
        for session, seen in list(self._last_seen.items()):
            if now - seen > self.idle_ttl_s and session not in self._runs:
                self._last_seen.pop(session, None)
                data = self._session_data.pop(session, {})
                if self.on_forget is not None:
                    self.on_forget(session, data)
