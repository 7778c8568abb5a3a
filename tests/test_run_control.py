"""Run control without gradio: one run per session, Stop while waiting for the model, End and
Reset as a run's last word, fair order, and sessions released."""

from __future__ import annotations

import threading
import time

import pytest

from usersim_ui.app.run_control import RunControl, RunRefused
from usersim_ui.core.dialogue import Dialogue, Turn
from usersim_ui.core.errors import GenerationCancelled

D = Dialogue(intent="x", turns=(Turn("user", "a b c"),))


def test_a_session_has_at_most_one_run_and_the_server_a_bounded_number():
    runs = RunControl(max_runs=2)
    with runs.start("a"):
        with pytest.raises(RunRefused, match="already in flight"):
            with runs.start("a"):
                pass
        with runs.start("b"), pytest.raises(RunRefused, match="its limit"):
            with runs.start("c"):
                pass
        assert runs.in_flight("a")
        with pytest.raises(RunRefused, match="Undo is not possible while a run is in flight"):
            runs.refuse_if_running("a", "Undo")
    assert not runs.in_flight("a")
    runs.refuse_if_running("a", "Undo")  # no run: nothing raised


def test_stop_reaches_a_run_that_waits_for_the_model():
    runs = RunControl()
    outcome: list[str] = []
    with runs.start("holder") as holder, runs.model_slot(holder):
        def waiter():
            with runs.start("queued") as run:
                try:
                    with runs.model_slot(run):
                        outcome.append("got the model")
                except GenerationCancelled:
                    outcome.append("stopped while waiting")
        thread = threading.Thread(target=waiter)
        thread.start()
        time.sleep(0.2)
        assert runs.in_flight("queued") and runs.stop("queued")
        thread.join(2)
        assert not thread.is_alive()
    assert outcome == ["stopped while waiting"]


def test_the_model_slot_serves_runs_in_arrival_order():
    runs = RunControl()
    order: list[str] = []
    with runs.start("first") as first, runs.model_slot(first):
        threads = []
        for name in ["s1", "s2", "s3"]:
            def take(name=name):
                with runs.start(name) as run, runs.model_slot(run):
                    order.append(name)
            threads.append(threading.Thread(target=take))
            threads[-1].start()
            time.sleep(0.1)  # arrive one after another
    for thread in threads:
        thread.join(5)
    assert order == ["s1", "s2", "s3"] and len(runs.waits_s) == 4


def test_cancel_then_makes_the_transition_the_runs_last_word():
    runs = RunControl()
    result: dict[str, Dialogue] = {}

    def run_body():
        with runs.start("s") as run:
            while not run.stop.wait(0.01):
                pass
            result["run"] = runs.finish(run, D)
    thread = threading.Thread(target=run_body)
    thread.start()
    time.sleep(0.1)
    final = runs.cancel_then("s", lambda d: Dialogue(intent=d.intent + "!"))
    thread.join(2)
    assert final.intent == "x!" and result["run"] is final
    assert runs.cancel_then("s", lambda d: d) is None  # no run any more: the caller applies it


def test_forget_releases_a_session_and_idle_sessions_expire():
    released: list[str] = []
    runs = RunControl(idle_ttl_s=0.05, on_forget=lambda session, data: released.append(session))
    runs.session_data("gone")["settings"] = 1
    runs.session_data("idle")["settings"] = 2
    runs.forget("gone")
    time.sleep(0.1)
    with runs.start("new"):
        pass
    assert released == ["gone", "idle"] and runs.sessions() == 0
