"""A short soak of the launched app (the full one: ``python -m benchmarks.soak``): concurrent
sessions auto-run dialogues while the assistant endpoint is killed and restarted."""

from __future__ import annotations

import pytest

pytest.importorskip("gradio_client")


def test_short_soak_loses_nothing_leaks_nothing_and_fails_only_on_the_dead_endpoint(smollm2):
    from benchmarks.soak import check, run_soak, summary

    report = run_soak(sessions=3, duration_s=30, kill_at=0.35, down_s=4, warmup_s=8)
    print(summary(report))
    assert check(report) == []
    assert report["runs"] >= 3 and all(log.runs for log in report["logs"])  # every session made progress
    assert report["waits"] > 0
