"""Dialogues in flight on one in-process model: user turns that wait at the same time go as one
batched call, each the turn its dialogue would get alone; errors and Stop stay with their own
dialogue; and the batch CLI uses it."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest
from test_batched_users import decisions, dialogues, settings, sharp  # noqa: F401 - sharp is a fixture

from usersim_ui.core.dialogue import Dialogue
from usersim_ui.core.errors import ContextTooLong, GenerationCancelled
from usersim_ui.users.batcher import TurnBatcher


def queued_turns(batcher: TurnBatcher, model_lock: threading.Lock, work: list[tuple], timeout_s: float = 60.0
                 ) -> list[object]:
    """Each (dialogue, settings, stop) asked for from its own thread while the model is busy (the
    test holds its lock); then the model is free. Returns each thread's turn or exception."""
    results: list[object] = [None] * len(work)

    def ask(i: int, dialogue: Dialogue, s, stop) -> None:
        try:
            results[i] = batcher.generate_turn(dialogue, s.guardrails, s.sampling, s.context_budget, stop)
        except Exception as exc:  # noqa: BLE001 - compared by the test
            results[i] = exc

    threads = [threading.Thread(target=ask, args=(i, *w)) for i, w in enumerate(work)]
    with model_lock:
        for t in threads:
            t.start()
        deadline = time.monotonic() + timeout_s
        while len(batcher._waiting) < len(work):
            assert time.monotonic() < deadline, "the turns never queued"
            time.sleep(0.01)
    for t in threads:
        t.join(timeout_s)
    return results


def test_turns_waiting_together_go_as_one_call_each_its_own_turn(sharp):  # noqa: F811
    lock = threading.Lock()
    batcher = TurnBatcher(sharp, lock)
    turns = queued_turns(batcher, lock, [(d, s, None) for d, s in zip(dialogues(), settings())])
    alone = [sharp.generate_turn(d, s.guardrails, s.sampling) for d, s in zip(dialogues(), settings())]
    assert batcher.calls == [4]
    for b, a in zip(turns, alone):
        assert (b.text, b.seed, b.ends_dialogue, decisions(b)) == (a.text, a.seed, a.ends_dialogue, decisions(a))
        assert b.p_end == pytest.approx(a.p_end, rel=1e-4)


def test_a_lone_turn_goes_at_once_by_the_single_dialogue_path(sharp):  # noqa: F811
    batcher = TurnBatcher(sharp)
    d, s = dialogues()[0], settings()[0]
    turn = batcher.generate_turn(d, s.guardrails, s.sampling)
    assert batcher.calls == [1] and turn.text == sharp.generate_turn(d, s.guardrails, s.sampling).text
    assert batcher.model_id == sharp.model_id  # the rest of the simulator shows through


def test_more_waiting_than_one_call_takes_go_oldest_first_in_several_calls(sharp):  # noqa: F811
    lock = threading.Lock()
    batcher = TurnBatcher(sharp, lock, max_rows=3)
    work = [(d, s, None) for d, s in zip(dialogues(), settings())] * 2
    turns = queued_turns(batcher, lock, work)
    assert sorted(batcher.calls, reverse=True) == [3, 3, 2] and all(not isinstance(t, Exception) for t in turns)
    assert [t.text for t in turns[:4]] == [t.text for t in turns[4:]]  # same dialogue, same seed: same turn


def test_one_dialogues_error_and_another_ones_stop_stay_with_them(sharp):  # noqa: F811
    lock = threading.Lock()
    batcher = TurnBatcher(sharp, lock)
    ds, ss = dialogues(), settings()
    too_long = replace(ss[0], context_budget=8)  # not even the intent fits: the plan fails
    stopped = threading.Event()
    stopped.set()
    turns = queued_turns(batcher, lock, [(ds[0], too_long, None), (ds[1], ss[1], stopped), (ds[2], ss[2], None),
                                         (ds[3], ss[3], None)])
    assert isinstance(turns[0], (ContextTooLong, ValueError)) and isinstance(turns[1], GenerationCancelled)
    alone = [sharp.generate_turn(d, s.guardrails, s.sampling) for d, s in zip(ds[2:], ss[2:])]
    assert [t.text for t in turns[2:]] == [a.text for a in alone]
    assert batcher.calls[0] == 3  # the stopped one never ran; the failed call was redone one by one


def test_a_leader_that_never_gets_the_model_hands_the_lead_on(sharp):  # noqa: F811
    """The app's model slot raises for a run stopped while it waits: the other turns must not hang."""
    lock = threading.Lock()
    refused: list[int] = []

    def slot():
        if not refused:
            refused.append(1)
            raise GenerationCancelled("stopped while waiting for the model")
        return lock

    batcher = TurnBatcher(sharp, slot)
    results: list[object] = [None] * 4

    def ask(i: int) -> None:
        d, s = dialogues()[i], settings()[i]
        try:
            results[i] = batcher.generate_turn(d, s.guardrails, s.sampling)
        except Exception as exc:  # noqa: BLE001
            results[i] = exc

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    with lock:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while not (refused and len(batcher._waiting) == 3):
            assert time.monotonic() < deadline
            time.sleep(0.01)
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert sum(isinstance(r, GenerationCancelled) for r in results) == 1
    assert sum(not isinstance(r, Exception) for r in results) == 3 and batcher.calls == [3]
