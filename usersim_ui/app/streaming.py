"""A run's turns and, while each is made, its newest draft: what the page streams.

A turn is made by blocking code (``engine.run`` calling the GPU function or an endpoint), and a
Gradio handler streams only by yielding. So the turns are made in a thread beside the handler,
which wakes every :data:`DRAFT_EVERY_S` and yields the newest draft if it changed: a slow
client or a fast model never queues up drafts (only the newest is ever sent), and the handler
thread does the committing and rendering as before, one turn at a time.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator

from usersim_ui.core.dialogue import Dialogue
from usersim_ui.core.protocols import Draft

DRAFT_EVERY_S = 0.08  # ~12 updates a second: smooth to the eye, cheap for the server (chat only)
JOIN_S = 5.0  # how long a closed stream waits for its maker to notice Stop


class DraftBox:
    """The newest draft of the turn being made (thread-safe; older ones are simply replaced)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._draft: Draft | None = None
        self._version = 0

    def put(self, draft: Draft) -> None:
        with self._lock:
            self._draft, self._version = draft, self._version + 1

    def clear(self) -> None:
        with self._lock:
            self._draft, self._version = None, self._version + 1

    def newest(self, seen: int) -> tuple[Draft | None, int]:
        """The draft and its version if it changed since ``seen`` (else None and ``seen``)."""
        with self._lock:
            return (self._draft, self._version) if self._version != seen else (None, seen)


_END = object()


def with_drafts(make_turns: Callable[[], Iterator[Dialogue]], box: DraftBox, stop: threading.Event,
                every_s: float | None = None) -> Iterator[Dialogue | Draft]:
    """Yield each dialogue ``make_turns()`` yields, and between them the newest draft in ``box``.

    An exception of the maker is raised here, after the turns it made. Closing this iterator
    (the page went away) sets ``stop``, so the maker ends within a token, and waits for it.
    """
    every_s = DRAFT_EVERY_S if every_s is None else every_s
    out: queue.SimpleQueue[object] = queue.SimpleQueue()

    def work() -> None:
        try:
            for dialogue in make_turns():
                out.put(dialogue)
                box.clear()  # the turn exists now: its draft is spent
        except BaseException as exc:  # noqa: BLE001 - re-raised in the handler's thread
            out.put(exc)
        finally:
            out.put(_END)

    maker = threading.Thread(target=work, name="run-turns", daemon=True)
    maker.start()
    seen = 0
    try:
        while True:
            try:
                item = out.get(timeout=every_s)
            except queue.Empty:
                draft, seen = box.newest(seen)
                if draft is not None:
                    yield draft
                continue
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            seen = box.newest(seen)[1]  # a draft from before this turn is not shown after it
            yield item  # type: ignore[misc]
    finally:
        if maker.is_alive():
            stop.set()
            maker.join(JOIN_S)
