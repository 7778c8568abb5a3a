"""Throughput of user turns: the next turns of N dialogues in one batched ``generate()`` call
(``users.batched.generate_user_turns``) against the same turns made one by one
(``UserSimulator.generate_turn``), same model, dialogues, settings and seeds; the prefix
cache is off in both, so that only batching differs. Beside it, in the same run, the bare
model's own batching ceiling (a decode step at 1 row and at N rows, no sampling, no
guardrails), and the share of it the turns reach.

Two user models: a random-weight UserLM-shaped Llama (vocab 128,257, a nearly flat
distribution: the sampler's fallback path) and SmolLM2-135M-Instruct as the prompted baseline
(a trained model's peaked distribution: the sampler's top-k path).

    python -m benchmarks.bench_batched --dialogues 16 --models random,smollm2
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from benchmarks.common import (
    INTENTS,
    add_model_arguments,
    machine,
    replies,
    userlm_shaped_model,
)
from usersim_ui.core.dialogue import Dialogue, GuardrailSettings, SamplingSettings, Turn
from usersim_ui.core.transitions import RunSettings
from usersim_ui.inference.model_loading import LoadedModel
from usersim_ui.users.batched import generate_user_turns
from usersim_ui.users.local import UserSimulator


def synchronize(device: Any) -> None:
    """Wait for the device's queued work, so that a wall-clock reading covers it (CUDA runs
    asynchronously; on the CPU this does nothing)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def decode_step_s(model: torch.nn.Module, rows: int, prompt: int = 200, steps: int = 6, trials: int = 1,
                  timer: Callable[[], float] = time.perf_counter) -> float:
    """Seconds per decode step of the bare model at ``rows`` rows (no sampling, no guardrails):
    how far batching can go on this machine at all, whatever the turn code does. The best of
    ``trials`` runs of ``steps`` steps (a shared CPU's other jobs only ever add time)."""
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    best = float("inf")
    with torch.inference_mode():
        ids = torch.randint(0, vocab, (rows, prompt), device=device)
        step = torch.randint(0, vocab, (rows, 1), device=device)
        for _ in range(trials):
            past = model(ids, use_cache=True).past_key_values
            model(step, past_key_values=past, use_cache=True)  # warm-up
            synchronize(device)
            started = timer()
            for _ in range(steps):
                past = model(step, past_key_values=past, use_cache=True).past_key_values
            synchronize(device)
            best = min(best, (timer() - started) / steps)
    return best


def ceiling_steps(model: torch.nn.Module, rows: int, trials: int = 5,
                  timer: Callable[[], float] = time.perf_counter) -> tuple[float, float]:
    """The bare decode step at 1 row and at ``rows`` rows, each the best of ``trials``, taken in
    turns so that a change of load touches both."""
    one, many = float("inf"), float("inf")
    for _ in range(trials):
        one = min(one, decode_step_s(model, 1, timer=timer))
        many = min(many, decode_step_s(model, rows, timer=timer))
    return one, many


def bench_dialogues(n: int, history: int) -> list[Dialogue]:
    """``n`` dialogues over the benchmark intents, each with ``history`` exchanges already."""
    said = replies(history)
    out = []
    for i in range(n):
        turns: tuple[Turn, ...] = ()
        for j in range(history):
            turns += (Turn(role="user", text=f"question {j} about it, dialogue {i}"), Turn(role="assistant", text=said[j]))
        out.append(Dialogue(intent=INTENTS[i % len(INTENTS)] + f" (#{i})", turns=turns))
    return out


def bench_settings(n: int, max_new_tokens: int, temperature: float) -> list[RunSettings]:
    """The paper's guardrails and the model card's sampling, one base seed per dialogue."""
    return [RunSettings(guardrails=GuardrailSettings(), sampling=SamplingSettings(
        max_new_tokens=max_new_tokens, seed=i, temperature=temperature)) for i in range(n)]


@dataclass
class BatchedResult:
    n: int  # dialogues
    one_s: float  # best wall time of the N turns one by one
    batch_s: float  # best wall time of the same N turns batched
    one_row_step_s: float  # the bare model's decode step at 1 row
    all_rows_step_s: float  # ... and at N rows
    same_text: int  # batched turns with exactly the one-by-one turn's text
    samples_alone: float  # samples drawn per turn
    samples_batched: float
    calls_alone: int
    calls_batched: int
    padded_tokens: int
    prefill_tokens: int

    @property
    def speedup(self) -> float:
        return self.one_s / self.batch_s

    @property
    def ceiling(self) -> float:
        return self.n * self.one_row_step_s / self.all_rows_step_s


def measure(sim: UserSimulator, dialogues: list[Dialogue], settings: list[RunSettings], repeats: int,
            timer: Callable[[], float] = time.perf_counter) -> BatchedResult:
    """The N turns one by one and batched (best of ``repeats`` each), then the bare model's
    decode step at 1 and N rows. Every reading ends with a host copy of the results (or an
    explicit device synchronisation), so device work is inside it."""
    generate_user_turns(sim, dialogues[:2], settings[:2])  # warm-up, not measured
    sim.generate_turn(dialogues[0], settings[0].guardrails, settings[0].sampling)
    one, batch, stats = [], [], {}
    alone: list[Turn] = []
    together: list[Turn] = []
    for _ in range(repeats):
        started = timer()
        alone = [sim.generate_turn(d, s.guardrails, s.sampling) for d, s in zip(dialogues, settings)]
        one.append(timer() - started)
        started = timer()
        together = generate_user_turns(sim, dialogues, settings, stats=stats)
        batch.append(timer() - started)
    one_row, all_rows = ceiling_steps(sim.model, len(dialogues), timer=timer)
    return BatchedResult(
        len(dialogues), min(one), min(batch), one_row, all_rows, sum(a.text == b.text for a, b in zip(alone, together)),
        sum(len(t.rejected) + 1 for t in alone) / len(alone), sum(len(t.rejected) + 1 for t in together) / len(together),
        sum(1 + (len(t.rejected) > 0) for t in alone), stats["calls"], stats["padded_tokens"], stats["prefill_tokens"])


def print_result(label: str, r: BatchedResult) -> None:
    print(f"{label}: bare model decode step {r.one_row_step_s * 1e3:.1f} ms at 1 row, {r.all_rows_step_s * 1e3:.1f} ms "
          f"at {r.n} rows: batching can gain at most {r.ceiling:.2f}x before sampling and guardrails")
    print("| variant | s for all turns | user turns / s | samples / turn | generate() calls | speed-up | share of the bare ceiling |")
    print("|---|---|---|---|---|---|---|")
    print(f"| one by one (generate_turn) | {r.one_s:.2f} | {r.n / r.one_s:.2f} | {r.samples_alone:.2f} | "
          f"{r.calls_alone} | 1.00x | |")
    print(f"| batched (generate_user_turns) | {r.batch_s:.2f} | {r.n / r.batch_s:.2f} | {r.samples_batched:.2f} | "
          f"{r.calls_batched} | {r.speedup:.2f}x | {r.speedup / r.ceiling:.2f} of {r.ceiling:.2f}x |")
    print(f"{r.same_text}/{r.n} batched turns have exactly the text of the one-by-one turn with the same seed; "
          f"padding: {r.padded_tokens} tokens run for {r.prefill_tokens} real prompt tokens")


def random_user(args: argparse.Namespace) -> tuple[str, UserSimulator]:
    from usersim_ui.inference.tiny_userlm import llama3_userlm_tokenizer
    from usersim_ui.prompts.formats import UserLMFormat

    tok = llama3_userlm_tokenizer()
    model = userlm_shaped_model(args.hidden, args.layers, eot_bias=args.eot_bias)
    params = sum(p.numel() for p in model.parameters())
    label = (f"random UserLM-shaped Llama ({params / 1e6:.0f}M parameters: hidden {args.hidden}, {args.layers} layers, "
             f"vocab 128,257, fp32, eot bias {args.eot_bias})")
    return label, UserSimulator(LoadedModel(model, tok, "userlm-shaped", "cpu"), UserLMFormat(tok), prefix_cache=None)


def smollm2_user(args: argparse.Namespace) -> tuple[str, UserSimulator]:
    from usersim_ui.inference.model_loading import offline_chat_model

    sim = UserSimulator.prompted_baseline(offline_chat_model())
    sim.prefix_cache = None
    return "SmolLM2-135M-Instruct as the prompted user baseline (vocab 49,152, fp32)", sim


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dialogues", type=int, default=16)
    parser.add_argument("--history", type=int, default=2, help="exchanges already in each dialogue")
    add_model_arguments(parser)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=1.0, help="0: greedy, no sampling cost, no retries")
    parser.add_argument("--models", default="random,smollm2", help="comma-separated: random, smollm2")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default); on a CPU "
                        "shared with other jobs one thread keeps the readings from waiting on a busy second one")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: this process's CPU seconds (with --threads 1: the work done, whatever else "
                             "the machine runs); wall: elapsed seconds")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    timer = time.process_time if args.clock == "cpu" else time.perf_counter
    makers = {"random": random_user, "smollm2": smollm2_user}
    print(f"machine: {machine()}; {args.dialogues} dialogues with {args.history} exchanges of history each; "
          f"max_new_tokens={args.max_new_tokens}; temperature {args.temperature}, top_p 0.8; guardrails at the "
          f"paper's defaults; prefix cache off; best of {args.repeats}; {args.clock} clock")
    dialogues = bench_dialogues(args.dialogues, args.history)
    settings = bench_settings(args.dialogues, args.max_new_tokens, args.temperature)
    for name in args.models.split(","):
        label, sim = makers[name.strip()](args)
        print_result(label, measure(sim, dialogues, settings, args.repeats, timer=timer))


if __name__ == "__main__":
    main()
