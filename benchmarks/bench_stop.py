"""How fast Stop ends a model turn: in-process and through a ZeroGPU-style forked worker.

Runs the same long user turn (the tiny UserLM-shaped model, no stop token reachable) and
presses Stop after N heartbeats, R times each way; prints the time from Stop to the turn's
return (generation stopped and, for the fork, the worker idle again), with the ratio.

    python -m benchmarks.bench_stop --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def measure(stream_fn, repeats: int, after: int) -> tuple[list[float], list[float]]:
    """Seconds from Stop to the stream's close returning, and seconds per token, per turn."""
    from usersim_ui.assistants.registry import BackendSpec
    from usersim_ui.core import transitions
    from usersim_ui.core.dialogue import Dialogue, GuardrailSettings, SamplingSettings

    off = GuardrailSettings(first_token_filter=False, no_early_ending=False, length_thresholds=False,
                            verbatim_repetition=False)
    settings = transitions.RunSettings(guardrails=off, sampling=SamplingSettings(max_new_tokens=3000), context_budget=4096)
    latencies, per_token = [], []
    for seed in range(repeats):
        stream = stream_fn(Dialogue(intent="You want a cake recipe."), settings, BackendSpec(), seed)
        first = None
        for made in stream:
            first = first or (time.perf_counter(), made)
            if made >= after:
                pressed = time.perf_counter()
                per_token.append((pressed - first[0]) / max(1, made - first[1]))
                stream.close()
                latencies.append(time.perf_counter() - pressed)
                break
    return latencies, per_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--after", type=int, default=20, help="heartbeats before Stop")
    args = parser.parse_args()

    import test_zerogpu_worker as zg  # the same wrapper setup the test uses
    from conftest import userlm_sim

    from usersim_ui.app import zerogpu
    from usersim_ui.inference.tiny_userlm import llama3_userlm_tokenizer

    zerogpu._simulator = userlm_sim(llama3_userlm_tokenizer())
    local = measure(zerogpu.model_turn_stream, args.repeats, args.after)
    wrappers = zg.wrappers
    schedule = type("S", (), dict(allowToken="t", nvidiaIndex=0, nvidiaUUID="cpu", idle=True))()
    wrappers.client.schedule = lambda **kwargs: schedule
    wrappers.client.release = lambda *a, **k: None
    wrappers.client.get_duration_seconds = lambda *a: 60
    wrappers.worker_init = lambda **kwargs: None
    forked_fn = wrappers.generator_function_wrapper(zerogpu.model_turn_stream, zerogpu.gpu_seconds, None)
    forked = measure(forked_fn, args.repeats, args.after)
    print(f"Stop after {args.after} heartbeats, {args.repeats} turns each, tiny UserLM-shaped model, {os.cpu_count()} CPUs")
    print(f"{'path':<26}{'median stop→return (ms)':>26}{'max (ms)':>10}{'ms per token':>14}{'tokens':>8}")
    for name, (lat, tok) in (("in-process generator", local), ("forked worker (spaces)", forked)):
        median, per = statistics.median(lat), statistics.median(tok)
        print(f"{name:<26}{median * 1e3:>26.1f}{max(lat) * 1e3:>10.1f}{per * 1e3:>14.1f}{median / per:>8.1f}")
    print(f"ratio forked / in-process (median): {statistics.median(forked[0]) / statistics.median(local[0]):.1f}x")


if __name__ == "__main__":
    main()
