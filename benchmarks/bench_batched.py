"""Throughput of user turns: the next turns of N dialogues in one batched ``generate()`` call
(``batched_turns.generate_user_turns``) against the same turns made one by one
(``UserSimulator.generate_turn``), same model, dialogues, settings and seeds; the prefix
cache is off in both, so that only batching differs.

    python -m benchmarks.bench_batched --dialogues 16
"""

from __future__ import annotations

import argparse
import time

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
from usersim_ui.inference.tiny_userlm import llama3_userlm_tokenizer
from usersim_ui.prompts.formats import UserLMFormat
from usersim_ui.users.batched import generate_user_turns
from usersim_ui.users.local import UserSimulator


def decode_step_s(model: torch.nn.Module, rows: int, prompt: int = 200, steps: int = 6) -> float:
    """Seconds per decode step of the bare model at ``rows`` rows (no sampling, no guardrails):
    how far batching can go on this machine at all, whatever the turn code does."""
    with torch.no_grad():
        ids = torch.randint(0, 128000, (rows, prompt))
        past = model(ids, use_cache=True).past_key_values
        step = torch.randint(0, 128000, (rows, 1))
        model(step, past_key_values=past, use_cache=True)  # warm-up
        started = time.perf_counter()
        for _ in range(steps):
            past = model(step, past_key_values=past, use_cache=True).past_key_values
        return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dialogues", type=int, default=16)
    parser.add_argument("--history", type=int, default=2, help="exchanges already in each dialogue")
    add_model_arguments(parser)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=1.0, help="0: greedy, no sampling cost, no retries")
    args = parser.parse_args()

    tok = llama3_userlm_tokenizer()
    model = userlm_shaped_model(args.hidden, args.layers, eot_bias=args.eot_bias)
    sim = UserSimulator(LoadedModel(model, tok, "userlm-shaped", "cpu"), UserLMFormat(tok), prefix_cache=None)
    history = replies(args.history)
    dialogues = []
    for i in range(args.dialogues):
        turns: tuple[Turn, ...] = ()
        for j in range(args.history):
            turns += (Turn(role="user", text=f"question {j} about it, dialogue {i}"), Turn(role="assistant", text=history[j]))
        dialogues.append(Dialogue(intent=INTENTS[i % len(INTENTS)] + f" (#{i})", turns=turns))
    settings = [RunSettings(guardrails=GuardrailSettings(), sampling=SamplingSettings(max_new_tokens=args.max_new_tokens,
                                                                                      seed=i, temperature=args.temperature)) for i in range(args.dialogues)]
    generate_user_turns(sim, dialogues[:2], settings[:2])  # warm-up, not measured
    sim.generate_turn(dialogues[0], settings[0].guardrails, settings[0].sampling)

    one, batch, stats = [], [], {}
    for _ in range(args.repeats):
        started = time.perf_counter()
        alone = [sim.generate_turn(d, s.guardrails, s.sampling) for d, s in zip(dialogues, settings)]
        one.append(time.perf_counter() - started)
        started = time.perf_counter()
        together = generate_user_turns(sim, dialogues, settings, stats=stats)
        batch.append(time.perf_counter() - started)
    one_row, all_rows = decode_step_s(model, 1), decode_step_s(model, args.dialogues)
    same = sum(a.text == b.text for a, b in zip(alone, together))
    samples_alone = sum(len(t.rejected) + 1 for t in alone) / len(alone)
    samples_batch = sum(len(t.rejected) + 1 for t in together) / len(together)
    t1, tb = min(one), min(batch)
    print(f"machine: {machine()}; model: random Llama, hidden {args.hidden}, {args.layers} layers, intermediate {4 * args.hidden}, vocab 128,257, fp32, "
          f"eot bias {args.eot_bias}; {args.dialogues} dialogues with {args.history} exchanges of history each; "
          f"max_new_tokens={args.max_new_tokens}; temperature {args.temperature}; guardrails at the paper's defaults; best of {args.repeats}")
    params = sum(p.numel() for p in model.parameters())
    print(f"bare model ({params / 1e6:.0f}M parameters): a decode step takes {one_row * 1e3:.1f} ms at 1 row and "
          f"{all_rows * 1e3:.1f} ms at {args.dialogues} rows: batching can gain at most "
          f"{args.dialogues * one_row / all_rows:.2f}x on this machine before sampling and guardrails")
    print("| variant | wall s for all turns | user turns / s | samples / turn | generate() calls | speed-up |")
    print("|---|---|---|---|---|---|")
    print(f"| one by one (generate_turn) | {t1:.2f} | {args.dialogues / t1:.2f} | {samples_alone:.2f} | "
          f"{sum(1 + (len(t.rejected) > 0) for t in alone)} | 1.00x |")
    print(f"| batched (generate_user_turns) | {tb:.2f} | {args.dialogues / tb:.2f} | {samples_batch:.2f} | "
          f"{stats['calls']} | {t1 / tb:.2f}x |")
    print(f"{same}/{args.dialogues} batched turns have exactly the text of the one-by-one turn with the same seed; "
          f"padding: {stats['padded_tokens']} tokens run for {stats['prefill_tokens']} real prompt tokens")


if __name__ == "__main__":
    main()
