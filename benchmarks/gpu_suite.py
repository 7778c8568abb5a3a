"""The owed GPU numbers in one command, as one table of ratios (ours against a baseline measured
in the same run), on a Llama-3.1-8B-shaped bf16 model with random weights built on the device:

(a) single-stream decode against the memory-bandwidth floor (bytes of weights read per token /
    the peak bandwidth, read from a large device-to-device copy in the same run);
(b) one guarded user turn (the paper's guardrails, prefix cache warm) against one unguarded
    sample of the same prompt and seed: what the guardrails cost;
(c) the model card's naive loop against ours (``bench_naive_vs_ours.compare``);
(d) 16 dialogues' user turns batched against one by one, and the bare model's own batching
    ceiling (``bench_batched.measure``).

    python -m benchmarks.gpu_suite                   # one H100/H200: well under 8 minutes
    python -m benchmarks.gpu_suite --tiny            # the same code on the CPU, tiny shapes (CI)
    python -m benchmarks.gpu_suite --out results.md  # the table's file (default artifacts/)

The random model's output biases are calibrated on its own logits so that a turn ends about
once in 12 tokens and P(end) is about 0.5%, whatever the logit scale of the shape: the length
guardrail then both accepts and rejects, as with a trained model. Every reading of a device
clock is bracketed by ``torch.cuda.synchronize`` (or ends in a host copy of the results).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_batched import (
    bench_dialogues,
    bench_settings,
    decode_step_s,
    measure,
    synchronize,
)
from benchmarks.bench_naive_vs_ours import compare, summary_rows
from benchmarks.common import (
    END_CONVERSATION_ID,
    EOT_ID,
    INTENTS,
    count_forwards,
    machine,
    replies,
    userlm_shaped_model,
)
from usersim_ui.assistants.scripted import ScriptedAssistant
from usersim_ui.core.dialogue import GuardrailSettings, SamplingSettings
from usersim_ui.core.transitions import RunSettings, assistant_turn
from usersim_ui.inference.model_loading import LoadedModel
from usersim_ui.inference.tiny_userlm import llama3_userlm_tokenizer
from usersim_ui.prompts.formats import UserLMFormat
from usersim_ui.users.local import UserSimulator


@dataclass(frozen=True)
class Shape:
    """A model shape and how much of each measurement to run on it."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    dtype: torch.dtype
    copy_bytes: int  # the bandwidth probe's buffer
    decode_steps: int
    turns_b: int  # guarded turns timed in (b)
    naive_dialogues: int  # (c)
    naive_turns: int
    batch_dialogues: int  # (d)
    batch_repeats: int
    max_new_tokens: int


LLAMA_8B = Shape("Llama-3.1-8B-shaped", 4096, 32, 32, 8, 14336, torch.bfloat16, 2 << 30, 32, 3, 2, 4, 16, 2, 48)
TINY = Shape("tiny Llama", 64, 2, 4, 2, 128, torch.float32, 64 << 20, 4, 1, 1, 2, 3, 1, 8)


@dataclass(frozen=True)
class Row:
    key: str
    measurement: str
    ours: float
    baseline: float
    ratio: float
    unit: str
    reading: str  # what the ratio means


def build_model(shape: Shape, device: str) -> torch.nn.Module:
    return userlm_shaped_model(shape.hidden, shape.layers, eot_bias=0.0, end_bias=0.0, intermediate=shape.intermediate,
                               heads=shape.heads, kv_heads=shape.kv_heads, dtype=shape.dtype, device=device)


def calibrate_ends(model: torch.nn.Module, prompt: list[int], eot_rate: float = 1 / 12, p_end: float = 0.005) -> None:
    """Output biases on ``<|eot_id|>`` and ``<|endconversation|>`` such that, at the end of
    ``prompt``, they get ``eot_rate`` and ``p_end`` of the probability: a random model's logit
    scale grows with its width, so a fixed bias would not do for every shape."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        logits = model(torch.tensor([prompt], device=device)).logits[0, -1].float()
        bias = model.lm_head.bias
        raw = logits - bias.float()
        others = raw.clone()
        others[[EOT_ID, END_CONVERSATION_ID]] = -float("inf")
        rest = torch.logsumexp(others, dim=0)
        keep = 1.0 - eot_rate - p_end
        bias[EOT_ID] = rest + math.log(eot_rate / keep) - raw[EOT_ID]
        bias[END_CONVERSATION_ID] = rest + math.log(p_end / keep) - raw[END_CONVERSATION_ID]


def copy_bandwidth(device: str, nbytes: int, repeats: int = 10) -> float:
    """Bytes per second of a large device-to-device copy (read + write counted): the peak
    memory bandwidth the decode floor is measured against."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    synchronize(device)
    return 2 * nbytes * repeats / (time.perf_counter() - started)


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights a decode step reads: all of them but the embedding table, of which it
    reads one row."""
    embedding = model.get_input_embeddings().weight
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not embedding)


def decode_rows(model: torch.nn.Module, shape: Shape, device: str, log: Any) -> tuple[list[Row], float]:
    bandwidth = copy_bandwidth(device, shape.copy_bytes)
    floor_s = weight_bytes_per_token(model) / bandwidth
    step_s = decode_step_s(model, 1, steps=shape.decode_steps)
    log(f"(a) copy bandwidth {bandwidth / 1e9:.0f} GB/s; {weight_bytes_per_token(model) / 1e9:.2f} GB of weights read "
        f"per token; decode {step_s * 1e3:.2f} ms/token, floor {floor_s * 1e3:.2f} ms")
    return [
        Row("a", "single-stream decode (bare model, KV cache, 1 row)", step_s * 1e3, floor_s * 1e3, step_s / floor_s,
            "ms/token", "x the bandwidth floor (target <= 2)"),
        Row("a.tps", "single-stream decode tokens/s", 1 / step_s, 1 / floor_s, floor_s / step_s, "tokens/s",
            "of the floor's tokens/s"),
    ], step_s


def guarded_turn_rows(model: torch.nn.Module, tok: Any, shape: Shape, device: str, step_s: float,
                      log: Any) -> list[Row]:
    """Per dialogue: a first user turn (it fills the prefix cache), a scripted reply, then the
    timed turn, guarded at the paper's defaults. Its baseline: the forward passes it ran, at
    the bare model's single-row decode step (a); the ratio is what the rest costs (prefill of
    the new tokens, sampling, the guardrails' checks, p_end)."""
    sim = UserSimulator(LoadedModel(model, tok, shape.name, device), UserLMFormat(tok))
    guard, sampling = GuardrailSettings(), SamplingSettings(max_new_tokens=shape.max_new_tokens)
    assistant = ScriptedAssistant(replies(2))
    settings = RunSettings(guardrails=guard, sampling=sampling)
    forwards = count_forwards(model)
    took, passes, samples, words = [], [], [], []
    for i, first in enumerate(bench_dialogues(shape.turns_b + 1, 1)):
        dialogue = assistant_turn(first.with_turn(sim.generate_turn(first, guard, sampling)), assistant, settings)
        forwards.reset()
        started = time.perf_counter()
        turn = sim.generate_turn(dialogue, guard, sampling, seed=1000 + i)
        if i > 0:  # the first dialogue warms the path up
            took.append(time.perf_counter() - started)
            passes.append(forwards.reset()[0])
            samples.append(len(turn.rejected) + 1)
            words.append(turn.words)
    latency, steps = sum(took) / len(took), sum(passes) / len(passes)
    log(f"(b) guarded turn {latency:.3f} s: {steps:.1f} forward passes, {sum(samples) / len(samples):.2f} samples, "
        f"{sum(words) / len(words):.1f} words kept, over {len(took)} turns")
    return [Row("b", f"guarded user turn (paper guardrails, <= 25 words, prefix cache warm; {steps:.0f} forward "
                     f"passes, {sum(samples) / len(samples):.1f} samples)", latency, steps * step_s, latency / (steps * step_s),
                "s", "x its forward passes at the bare decode step")]


def naive_rows(model: torch.nn.Module, tok: Any, shape: Shape, log: Any) -> list[Row]:
    stats, _ = compare(model, tok, shape.naive_dialogues, shape.naive_turns, shape.max_new_tokens)
    out = []
    for label, naive, ours, _fmt in summary_rows(stats, shape.naive_turns):
        if label.startswith("peak RSS"):  # host memory: says nothing about a GPU run
            continue
        key = "c." + label.split(" (")[0].replace(" ", "_")
        out.append(Row(key, f"{label}: naive (card) vs ours", ours, naive, naive / ours, "",
                       "naive / ours"))
    log(f"(c) naive vs ours over {shape.naive_dialogues} x {shape.naive_turns} user turns")
    return out


def batched_rows(model: torch.nn.Module, tok: Any, shape: Shape, device: str, log: Any) -> list[Row]:
    sim = UserSimulator(LoadedModel(model, tok, shape.name, device), UserLMFormat(tok), prefix_cache=None)
    n = shape.batch_dialogues
    r = measure(sim, bench_dialogues(n, 2), bench_settings(n, shape.max_new_tokens, 1.0), shape.batch_repeats)
    log(f"(d) {n} dialogues: one by one {r.one_s:.2f} s, batched {r.batch_s:.2f} s, bare ceiling {r.ceiling:.2f}x, "
        f"{r.same_text}/{n} batched turns equal to the one-by-one turn")
    return [
        Row("d", f"{n} dialogues' user turns: batched vs one by one", r.batch_s, r.one_s, r.speedup, "s",
            "x faster batched (target >= 6 on a GPU)"),
        Row("d.ceiling", f"bare model decode step: {n} rows vs 1 row, per row", r.all_rows_step_s / n * 1e3,
            r.one_row_step_s * 1e3, r.ceiling, "ms/row", "x: the most batching can gain"),
        Row("d.share", "batched turns' speed-up / the bare ceiling", r.speedup, r.ceiling, r.speedup / r.ceiling, "x",
            "of the ceiling reached"),
    ]


def table(rows: list[Row], header: str) -> str:
    lines = [header, "", "| key | measurement | ours | baseline | unit | ratio | reading |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.key} | {r.measurement} | {r.ours:.4g} | {r.baseline:.4g} | {r.unit} | {r.ratio:.3f} | "
                     f"{r.reading} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (CI): the same code, no GPU")
    parser.add_argument("--device", default=None, help="default: cuda, or cpu with --tiny")
    parser.add_argument("--out", type=Path, default=None, help="the table's file (default artifacts/gpu_suite[-tiny].md)")
    args = parser.parse_args(argv)
    shape = TINY if args.tiny else LLAMA_8B
    device = args.device or ("cpu" if args.tiny else "cuda")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run with --tiny for the CPU check", file=sys.stderr)
        return 2
    out = args.out or Path("artifacts") / ("gpu_suite-tiny.md" if args.tiny else "gpu_suite.md")
    began = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - began:6.1f} s] {message}", file=sys.stderr, flush=True)

    tok = llama3_userlm_tokenizer()
    model = build_model(shape, device)
    calibrate_ends(model, UserLMFormat(tok).prompt_ids(INTENTS[0], []))
    params = sum(p.numel() for p in model.parameters())
    where = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else machine()
    log(f"{shape.name}: {params / 1e9:.2f}B parameters, {shape.dtype}, on {where}")
    rows, step_s = decode_rows(model, shape, device, log)
    rows += guarded_turn_rows(model, tok, shape, device, step_s, log)
    rows += naive_rows(model, tok, shape, log)
    rows += batched_rows(model, tok, shape, device, log)
    header = (f"gpu_suite{' --tiny' if args.tiny else ''}: {shape.name} (hidden {shape.hidden}, {shape.layers} layers, "
              f"{shape.heads} heads, {shape.kv_heads} KV heads, intermediate {shape.intermediate}, vocab 128,257), "
              f"{params / 1e9:.2f}B parameters, {str(shape.dtype).removeprefix('torch.')}, random weights; device: "
              f"{where}; torch {torch.__version__}; max_new_tokens={shape.max_new_tokens}, temperature 1.0, top_p 0.8; "
              f"{time.perf_counter() - began:.0f} s in all")
    text = table(rows, header)
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
