"""``app.streaming.with_drafts``: the one way blocking model work streams (the page's run and
the ZeroGPU worker). Plain threads, no model: what it yields, how often, and how it stops."""

from __future__ import annotations

import threading
import time

import pytest

from usersim_ui.app.streaming import with_drafts
from usersim_ui.core.protocols import Draft


def drafting(n: int, gap_s: float, result: str = "turn"):
    """A maker that reports ``n`` growing drafts ``gap_s`` apart, then yields its result."""
    def make(on_draft):
        for k in range(1, n + 1):
            on_draft(Draft(role="user", text="w" * k, tokens=k))
            time.sleep(gap_s)
        yield result
    return make


def test_every_draft_as_it_comes_then_the_result():
    out = list(with_drafts(drafting(5, 0.03), threading.Event(), every_s=0.0))
    assert out[-1] == "turn"
    assert [d.tokens for d in out[:-1]] == [1, 2, 3, 4, 5]


def test_drafts_are_throttled_to_the_newest_and_never_out_of_order():
    out = list(with_drafts(drafting(40, 0.005), threading.Event(), every_s=0.05))
    drafts = [d.tokens for d in out if isinstance(d, Draft)]
    assert out[-1] == "turn" and 2 <= len(drafts) <= 12  # ~0.2 s of drafts at most every 50 ms, not 40
    assert drafts == sorted(set(drafts))  # growing: only the newest is ever sent


def test_a_heartbeat_while_nothing_new_comes():
    def slow(on_draft):
        time.sleep(0.2)  # a long prefill: no token yet
        yield "turn"
    out = list(with_drafts(slow, threading.Event(), every_s=0.0, heartbeat_s=0.02))
    assert out[-1] == "turn" and out.count(None) >= 4
    assert list(with_drafts(slow, threading.Event())) == ["turn"]  # no heartbeat unless asked


def test_the_makers_error_comes_after_its_items():
    def failing(on_draft):
        yield "first"
        raise ValueError("the endpoint refused")
    got = []
    with pytest.raises(ValueError, match="refused"):
        for item in with_drafts(failing, threading.Event(), every_s=0.0):
            got.append(item)
    assert got == ["first"]


def test_closing_the_stream_stops_the_maker_and_waits_for_it():
    stop, ended = threading.Event(), threading.Event()

    def endless(on_draft):
        k = 0
        while not stop.is_set():
            k += 1
            on_draft(Draft(role="user", text=str(k), tokens=k))
            time.sleep(0.01)
        ended.set()
        yield "never reached by the caller"

    stream = with_drafts(endless, stop, every_s=0.0, join_s=None)
    assert isinstance(next(stream), Draft)
    stream.close()
    assert stop.is_set() and ended.is_set()  # join_s None: closed only once the maker ended
