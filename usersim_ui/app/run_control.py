"""Run control: what happens when a researcher's actions overlap, and what one visitor may hold.

The design, in full:

* **The session's dialogue lives here.** Every handler that changes a dialogue commits the
  result (:meth:`RunControl.transition`, :meth:`RunControl.commit`), and reads the dialogue to
  change from here (:meth:`RunControl.dialogue`), not from the page's state, which an overlapping
  event may have made stale. Each commit bumps the session's *version*; a run writes only while
  the version is the one it last wrote, so nothing confirmed to the researcher is overwritten.
* **One run per session.** A *run* is any event that makes model turns (next user/assistant
  turn, step, auto-run, regenerate). :meth:`RunControl.start` registers it *before* it reads
  the dialogue; a second run in the same session is refused.
* **Every other event that changes the dialogue** either
  - is **refused** with a message while a run is in flight (edit, undo, send reply, import,
    and any second run): it never applies to a dialogue that the run would then overwrite.
    Registration and quick transitions take the session's lock, so one of the two always
    sees the other; or
  - **cancels the run and then applies** (End, Reset, the chat box's Clear): the run stops,
    and its last yield is the dialogue with the transition applied
    (:meth:`RunControl.cancel_then`), so nothing lands after it. A transition that was
    reported as not applied (the run did not stop in time) is detached: it never applies later.
  Stop, live guardrail toggles and export never conflict: they change no dialogue.
* **Stop** sets the run's event. It is seen while the run waits for the model (the wait polls
  it), between turns, within one token or one layer's forward pass during a model turn, and
  within a poll (50 ms) while an endpoint is awaited (``assistants/openai.py`` cuts the
  connection). A Stop that comes when no run is registered is remembered for
  ``stop_grace_s``: the run that registers in that time (it was sent just before the Stop but
  reached the server after it) starts stopped. A new click on the page clears it.
* **The model** is one shared resource: model turns take a FIFO slot (:meth:`model_slot`), so
  sessions take turns fairly; turns that do not use the local model take no slot.
* **Bounds, on the wall clock.** At most ``max_runs`` runs at once, at most ``per_visitor`` of
  them from one visitor (a client address as uvicorn resolves it; see README "Hosting in
  public"), each at most ``max_run_s`` seconds (then it is stopped as by Stop, keeping its
  turns). A run gives its slot back the moment it has decided its last dialogue
  (:meth:`finish`), before that dialogue is rendered and sent, which on a loaded server takes
  a while; its session stays busy until it is sent, so nothing can slip in before it. Waits for
  the model and Stop-to-release times are recorded (for the soak); a session's entries are
  dropped by :meth:`forget` (page unload) or after ``idle_ttl_s`` without a run.

This module holds no gradio: the UI maps :class:`RunRefused` to a toast or an API error.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

from usersim_ui.core.dialogue import Dialogue
from usersim_ui.core.errors import GenerationCancelled

Transition = Callable[[Dialogue], Dialogue]


def _env_number(name: str, default: float) -> float:
    """A host setting from the environment (README: Hosting in public); a bad value is an error at start."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise ValueError(f"{name}={raw!r} is not a number") from exc
    if value < 0:
        raise ValueError(f"{name}={raw!r} must be 0 or more")
    return value


MAX_RUNS = int(_env_number("USERSIM_MAX_RUNS", 16))  # runs in flight on the whole server
RUNS_PER_VISITOR = int(_env_number("USERSIM_RUNS_PER_VISITOR", 4))  # of them from one client address; 0: no cap
MAX_RUN_S = _env_number("USERSIM_MAX_RUN_S", 900.0)  # one run's wall-clock limit; 0: none
STOP_GRACE_S = 5.0  # a Stop with no run registered stops a run that registers this soon after (a
# run's request can wait that long in gradio's queue on a saturated CPU)


class RunRefused(RuntimeError):
    """An expected refusal: the action cannot apply now (a run is in flight, the server is full)."""


@dataclass(eq=False)
class Run:
    session: str
    visitor: str | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    then: Transition | None = None  # applied by the run as it winds down (End, Reset)
    closing: bool = False  # its final dialogue is being decided: too late to attach ``then``
    outcome: Dialogue | None = None  # the dialogue it ended with, once finished
    version: int = 0  # the session's version this run last read or wrote
    stopped_early: bool = False  # a Stop came just before it registered
    timed_out: bool = False  # stopped by ``max_run_s``
    stop_requested: float | None = None  # time.monotonic() of the first Stop
    released: bool = False  # its run slot is free: it has decided its last dialogue and only shows it


@dataclass
class _Session:
    lock: threading.Lock = field(default_factory=threading.Lock)  # registration and quick transitions
    dialogue: Dialogue | None = None  # the latest dialogue confirmed to the researcher
    version: int = 0
    stop_requested: float | None = None  # time.monotonic() of a Stop that found no run


class RunControl:
    """Per-session runs, dialogues and the shared model slot; one instance per app."""

    def __init__(self, model_slots: int = 1, max_runs: int = MAX_RUNS, idle_ttl_s: float = 3600.0,
                 poll_s: float = 0.05, on_forget: Callable[[str, dict[str, object]], None] | None = None,
                 per_visitor: int = RUNS_PER_VISITOR, max_run_s: float = MAX_RUN_S,
                 stop_grace_s: float = STOP_GRACE_S):
        """``on_forget(session, data)`` releases what a session left behind (its export folder)."""
        self.max_runs, self.idle_ttl_s, self.poll_s, self.on_forget = max_runs, idle_ttl_s, poll_s, on_forget
        self.per_visitor, self.max_run_s, self.stop_grace_s = per_visitor, max_run_s, stop_grace_s
        self._lock = threading.Lock()  # the tables below; never held while waiting
        self._runs: dict[str, Run] = {}
        self._slots = threading.Semaphore(model_slots)
        self._fifo: deque[Run] = deque()
        self._fifo_changed = threading.Condition()
        self._last_seen: dict[str, float] = {}
        self._session_data: dict[str, dict[str, object]] = {}
        self._sessions: dict[str, _Session] = {}
        self.waits_s: deque[float] = deque(maxlen=10_000)
        self.stop_release_s: deque[float] = deque(maxlen=10_000)  # Stop -> the run's slot free

    def _session(self, session: str) -> _Session:
        with self._lock:
            self._last_seen[session] = time.monotonic()
            return self._sessions.setdefault(session, _Session())

    # ---- runs -----------------------------------------------------------------------------

    @contextmanager
    def start(self, session: str, visitor: str | None = None) -> Iterator[Run]:
        """Register a run for ``session`` (from ``visitor``) for the duration of the block.

        Refused: a second run in the session, the server's ``max_runs``, the visitor's
        ``per_visitor``. Registration waits for a quick transition of the same session that is
        being applied, so the run then reads (:meth:`dialogue`) what that transition committed.
        """
        state = self._session(session)
        with state.lock, self._lock:
            self._expire_idle(keep=session)
            if session in self._runs:
                raise RunRefused("A run is already in flight in this session: wait for it to finish or press Stop.")
            holding = [r for r in self._runs.values() if not r.released]
            if len(holding) >= self.max_runs:
                raise RunRefused(f"The server is running {len(holding)} dialogues, its limit; try again shortly.")
            if visitor is not None and self.per_visitor > 0:
                mine = sum(r.visitor == visitor for r in holding)
                if mine >= self.per_visitor:
                    raise RunRefused(f"Your address already has {mine} runs in flight, the most one visitor may "
                                     "have at once: stop one or wait for it to finish.")
            run = self._runs[session] = Run(session, visitor, version=state.version)
            self._last_seen[session] = time.monotonic()
            asked, state.stop_requested = state.stop_requested, None
            if asked is not None and time.monotonic() - asked <= self.stop_grace_s:
                run.stopped_early = True
                run.stop.set()
        timer = None
        if self.max_run_s > 0:
            timer = threading.Timer(self.max_run_s, self._time_out, (run,))
            timer.daemon = True
            timer.start()
        try:
            yield run
        finally:
            if timer is not None:
                timer.cancel()
            run.stop.set()  # anything still working for it (a worker, a stream) winds down
            self._release(run)
            with self._lock:
                if self._runs.get(session) is run:
                    del self._runs[session]
                self._last_seen[session] = time.monotonic()
            with state.lock:
                if run.outcome is None:
                    run.closing = True
            run.finished.set()

    def _release(self, run: Run) -> None:
        """Give the run's slot back (its session stays busy until the run ends)."""
        with self._lock:
            if run.released:
                return
            run.released = True
        if run.stop_requested is not None:
            self.stop_release_s.append(time.monotonic() - run.stop_requested)

    def _time_out(self, run: Run) -> None:
        run.timed_out = True
        self._wake(run)

    def _wake(self, run: Run) -> None:
        run.stop.set()
        with self._fifo_changed:
            self._fifo_changed.notify_all()

    def commit(self, run: Run, dialogue: Dialogue) -> bool:
        """Record what the run shows now as the session's dialogue; False (nothing written) if
        anything else wrote since the run last did, which the rules above should never allow."""
        state = self._session(run.session)
        with state.lock:
            if state.version != run.version:
                return False
            state.dialogue, state.version = dialogue, state.version + 1
            run.version = state.version
            return True

    def finish(self, run: Run, dialogue: Dialogue) -> Dialogue:
        """The run's final dialogue: ``dialogue`` with any transition End or Reset asked for,
        committed as the session's dialogue."""
        state = self._session(run.session)
        with state.lock:
            run.closing = True
            then = run.then
            run.outcome = then(dialogue) if then is not None else dialogue
            if state.version == run.version:
                state.dialogue, state.version = run.outcome, state.version + 1
                run.version = state.version
        self._release(run)
        return run.outcome

    def in_flight(self, session: str) -> bool:
        with self._lock:
            return session in self._runs

    def runs_of(self, visitor: str) -> int:
        """The visitor's runs holding a slot."""
        with self._lock:
            return sum(r.visitor == visitor and not r.released for r in self._runs.values())

    def runs_in_flight(self) -> int:
        """Runs holding a slot (a run that has decided its last dialogue no longer does)."""
        with self._lock:
            return sum(not r.released for r in self._runs.values())

    def refuse_if_running(self, session: str, action: str) -> None:
        """For events that change the dialogue and cannot wait for a run."""
        if self.in_flight(session):
            raise RunRefused(f"{action} is not possible while a run is in flight: press Stop first.")

    def stop(self, session: str) -> bool:
        """Stop the session's run, whether it waits for the model, runs a turn, or is between
        turns. With no run registered, remember the Stop for ``stop_grace_s`` (False)."""
        with self._lock:
            run = self._runs.get(session)
            if run is None:
                self._sessions.setdefault(session, _Session()).stop_requested = time.monotonic()
                self._last_seen.setdefault(session, time.monotonic())
                return False
            if run.stop_requested is None:
                run.stop_requested = time.monotonic()
        self._wake(run)
        return True

    def clear_stop(self, session: str) -> None:
        """A new click supersedes a Stop that found no run (the page calls this on every run click)."""
        with self._lock:
            state = self._sessions.get(session)
            if state is not None:
                state.stop_requested = None

    def cancel_then(self, session: str, transition: Transition, timeout_s: float = 10.0) -> Dialogue | None:
        """Stop the session's run and have it end on ``transition(its dialogue)``.

        Returns that final dialogue, or None when the transition was not attached to a run (no
        run was in flight, or it was already deciding its last dialogue): the caller then applies
        it to the session's dialogue (:meth:`apply_after_runs` does both). If the run does not
        stop within ``timeout_s`` the transition is detached, so it never applies later, and
        RunRefused says so.
        """
        state = self._session(session)
        with state.lock:
            with self._lock:
                run = self._runs.get(session)
            if run is None:
                return None
            attached = not run.closing
            if attached:
                run.then = transition
        self._wake(run)
        if not run.finished.wait(timeout_s):
            with state.lock:
                if not run.closing:
                    run.then = None  # reported as not applied: it must never apply afterwards
                    raise RunRefused(f"The run did not stop within {timeout_s:g} s, so this was not applied; "
                                     "it is still stopping: try again in a moment.")
            run.finished.wait()  # deciding its last dialogue: a quick transition, not a model call
        if not attached or run.outcome is None:  # not ours, or it ended before deciding a dialogue
            return None
        return run.outcome

    def apply_after_runs(self, session: str, fallback: Dialogue | None,
                         transition: Callable[[Dialogue | None], Dialogue], timeout_s: float = 10.0,
                         on_run: Transition | None = None) -> Dialogue:
        """End and Reset: stop any run and make ``on_run`` (default ``transition``) its last
        word, or apply ``transition`` to the session's dialogue when no run takes it; the
        result is committed either way."""
        for _attempt in range(3):
            final = self.cancel_then(session, on_run or transition, timeout_s)
            if final is not None:
                return final
            try:
                return self.transition(session, fallback, transition, "This")
            except RunRefused:
                continue  # a run registered in between: cancel that one
        raise RunRefused("Runs keep starting in this session; press Stop, then try again.")

    # ---- the session's dialogue -----------------------------------------------------------

    def dialogue(self, session: str, fallback: Dialogue | None = None) -> Dialogue | None:
        """The latest dialogue confirmed to the session; ``fallback`` (the page's state) if none
        was committed here yet (a new session, or one whose entries expired)."""
        state = self._session(session)
        with state.lock:
            return state.dialogue if state.dialogue is not None else fallback

    def version(self, session: str) -> int:
        return self._session(session).version

    def transition(self, session: str, fallback: Dialogue | None, fn: Callable[[Dialogue | None], Dialogue],
                   action: str) -> Dialogue:
        """A quick transition (send, edit, undo, import): refused while a run is in flight, else
        ``fn(latest dialogue)`` committed, all under the session's lock (so a run that registers
        at the same moment reads the result, and two transitions never lose one another)."""
        state = self._session(session)
        with state.lock:
            self.refuse_if_running(session, action)
            new = fn(state.dialogue if state.dialogue is not None else fallback)
            state.dialogue, state.version = new, state.version + 1
        with self._lock:
            self._last_seen[session] = time.monotonic()
        return new

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
        with self._lock:
            run = self._runs.get(session)
        if run is not None:
            self._wake(run)
        with self._lock:
            self._last_seen.pop(session, None)
            self._sessions.pop(session, None)
            data = self._session_data.pop(session, {})
        if self.on_forget is not None:
            self.on_forget(session, data)
        return data

    def sessions(self) -> int:
        with self._lock:
            return len(self._session_data)

    def _expire_idle(self, keep: str | None = None) -> None:
        """Sessions never closed (API clients have no unload) are dropped after ``idle_ttl_s``."""
        now = time.monotonic()
        for session, seen in list(self._last_seen.items()):
            if now - seen > self.idle_ttl_s and session not in self._runs and session != keep:
                self._last_seen.pop(session, None)
                self._sessions.pop(session, None)
                data = self._session_data.pop(session, {})
                if self.on_forget is not None:
                    self.on_forget(session, data)
