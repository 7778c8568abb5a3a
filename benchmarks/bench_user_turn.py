"""User-turn latency with the length/repetition guardrails on: ours (over-long samples stopped
as soon as they pass max_words, retries drawn in one batch) against the plain loop (each
sample generated to the end, retries one after another), in the same run on the same model.

    python -m benchmarks.bench_user_turn --turns 8
"""

from __future__ import annotations

import argparse
import statistics
import time

from usersim_ui.core.dialogue import Dialogue, GuardrailSettings, SamplingSettings
from usersim_ui.core.intents import load_sample_intents
from usersim_ui.inference.model_loading import offline_chat_model
from usersim_ui.users.local import UserSimulator


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, default=6, help="first user turns timed per variant")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()
    loaded = offline_chat_model()
    variants = {
        "plain loop (baseline)": UserSimulator.prompted_baseline(loaded, batched_retries=False, stop_long_samples=False),
        "early stop only": UserSimulator.prompted_baseline(loaded, batched_retries=False),
        "early stop + batched retries (ours)": UserSimulator.prompted_baseline(loaded),
    }
    guardrails = GuardrailSettings()
    intents = [i.intent for i in load_sample_intents()][: args.turns]
    results: dict[str, list[float]] = {name: [] for name in variants}
    samples: dict[str, list[int]] = {name: [] for name in variants}
    for index, intent in enumerate(intents):
        dialogue = Dialogue(intent=intent)
        for name, sim in variants.items():  # interleaved so that drift hits every variant alike
            sampling = SamplingSettings(max_new_tokens=args.max_new_tokens, seed=index)
            started = time.perf_counter()
            turn = sim.generate_turn(dialogue, guardrails, sampling)
            results[name].append(time.perf_counter() - started)
            samples[name].append(len(turn.rejected) + 1)
    base = statistics.mean(results["plain loop (baseline)"])
    print(f"model: {loaded.model_id} on {loaded.device}; {len(intents)} first user turns each; "
          f"max_new_tokens={args.max_new_tokens}; guardrails at the paper's defaults")
    print("| variant | mean s/turn | median s/turn | mean samples/turn | speed-up vs baseline |")
    print("|---|---|---|---|---|")
    for name, times in results.items():
        print(f"| {name} | {statistics.mean(times):.2f} | {statistics.median(times):.2f} | "
              f"{statistics.mean(samples[name]):.2f} | {base / statistics.mean(times):.2f}x |")


if __name__ == "__main__":
    main()
