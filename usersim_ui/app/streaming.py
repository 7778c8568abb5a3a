"""Blocking model work, streamed: its results and, while each is made, its newest draft.

A turn is made by blocking code (``transitions.run`` calling the GPU function or an endpoint,
``generate()`` inside the GPU worker), and a Gradio handler or a ZeroGPU function streams only
by yielding. So the work runs in a thread beside the generator, which yields what the work
yields and, between those, the newest draft it reported: a slow client or a fast model never
queues up drafts (only the newest is ever sent). :func:`with_drafts` is that one pattern,
used on both sides of ZeroGPU:

* the page's run (``handlers._run``): drafts at most every :data:`DRAFT_EVERY_S`, the handler
  thread committing and rendering each turn as before;
* the GPU worker (``zerogpu._in_worker``): every draft as it comes (the page throttles), and a
  heartbeat ``None`` every 20 ms, since the worker sees Stop only when the function yields.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Iterator, TypeVar

from usersim_ui.core.protocols import Draft, OnDraft

DRAFT_EVERY_S = 0.08  # ~12 updates a second: smooth to the eye, cheap for the server (chat only)
JOIN_S = 5.0  # how long a closed stream waits for its maker to notice Stop

T = TypeVar("T")
_DRAFT, _ITEM, _ERROR, _END = "draft", "item", "error", "end"


def with_drafts(make: Callable[[OnDraft], Iterator[T]], stop: threading.Event, every_s: float | None = None,
                heartbeat_s: float | None = None, join_s: float | None = JOIN_S) -> Iterator[T | Draft | None]:
    """Run ``make(on_draft)`` in a thread beside the caller; yield each item it yields and,
    between them, the newest draft it handed ``on_draft`` (at most one per ``every_s``; 0: as
    they come, drafts that queued up meanwhile folded into the newest). A draft still waiting
    when an item arrives is dropped: the item is what it led to. With ``heartbeat_s``, ``None``
    whenever nothing else was yielded for that long.

    An exception of the maker is raised here, after the items it made. Closing this iterator
    (the page went away, Stop) sets ``stop``, so the maker ends within a token, and waits for
    it ``join_s`` (None: until it has ended).
    """
    every_s = DRAFT_EVERY_S if every_s is None else every_s
    out: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()

    def work() -> None:
        try:
            for item in make(lambda draft: out.put((_DRAFT, draft))):
                out.put((_ITEM, item))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            out.put((_ERROR, exc))
        finally:
            out.put((_END, None))

    maker = threading.Thread(target=work, name="model-work", daemon=True)
    maker.start()
    pending: Draft | None = None
    drafted, yielded = -float("inf"), time.monotonic()
    finished = False
    try:
        while True:
            now = time.monotonic()
            waits = ([drafted + every_s - now] if pending is not None else []) + (
                [yielded + heartbeat_s - now] if heartbeat_s is not None else [])
            try:
                tag, value = out.get(timeout=max(0.0, min(waits)) if waits else None)
            except queue.Empty:
                now = time.monotonic()
                if pending is not None and now >= drafted + every_s:
                    yield pending
                    pending, drafted, yielded = None, time.monotonic(), time.monotonic()
                elif heartbeat_s is not None and now >= yielded + heartbeat_s:
                    yield None  # nothing new (a long prefill, a slow step): still a chance to stop
                    yielded = time.monotonic()
                continue
            if tag == _DRAFT:
                pending = value  # type: ignore[assignment]
            elif tag == _ITEM:
                pending = None
                yield value  # type: ignore[misc]
                yielded = time.monotonic()
            elif tag == _ERROR:
                raise value  # type: ignore[misc]
            else:
                finished = True
                return
    finally:
        if maker.is_alive() and not finished:  # closed early (Stop, the page went away) or failed
            stop.set()
            maker.join(join_s)
