"""How well the offline prompted baseline plays the user on its first turn: the current prompt
(system prompt + few-shot first turns written for this project) against the plain prompt it
replaced, in the same run, on the 12 sample intents at the paper's guardrails.

Per variant: samples drawn per user turn (sequential retries, so drawn = judged), turns kept
only because the retry cap was reached, the share of accepted turns a simple role check flags
(an assistant's opening or offer of help), and mean words. Run:

    python -m benchmarks.prompted_baseline --seeds 2
"""

from __future__ import annotations

import argparse
import re
import time
from dataclasses import replace

from usersim_ui.core.dialogue import Dialogue, SamplingSettings
from usersim_ui.core.guardrails import GuardrailSettings
from usersim_ui.core.intents import load_sample_intents
from usersim_ui.core.seeds import turn_seed
from usersim_ui.inference.model_loading import load_smollm2
from usersim_ui.prompts.formats import PromptedUserFormat
from usersim_ui.users.local import UserSimulator

# The prompt before 2026-12-06, kept here as the baseline of this comparison only.
PLAIN_SYSTEM = (
    "You are role-playing a human user who is chatting with an AI assistant. You are NOT the "
    "assistant. Your goal in this conversation: {intent}\n"
    "Write only the user's next message: short, casual, one step at a time; do not reveal "
    "the whole goal at once. When your goal is met or you want to leave, reply with exactly "
    "{marker} and nothing else."
)

# An assistant's voice: an offer or a start of help, not a request for it.
ROLE_CHECK = re.compile(
    r"^\W*(sure|certainly|of course|absolutely|great question|glad to|happy to|welcome)\b"
    r"|how (can|may) i (help|assist)|as an ai\b|i'?m here to help|let me (help|explain|walk)"
    r"|^\W*(here'?s|here is)\b|\bi can help you\b|what can i do for you",
    re.IGNORECASE)


def role_flagged(text: str) -> bool:
    return bool(ROLE_CHECK.search(text))


def measure(sim: UserSimulator, intents: list[str], seeds: int, sampling: SamplingSettings) -> dict[str, float]:
    guardrails = GuardrailSettings()  # the paper's defaults
    drawn = capped = flagged = words = turns = 0
    started = time.perf_counter()
    for intent in intents:
        for seed in range(seeds):
            turn = sim.generate_turn(Dialogue(intent=intent), guardrails, replace(sampling, seed=seed),
                                     seed=turn_seed(seed, 0))
            turns += 1
            drawn += 1 + len(turn.rejected)
            capped += any(e.action == "gave_up" for e in turn.guardrails)
            flagged += role_flagged(turn.text)
            words += turn.words
    return {"samples": drawn / turns, "capped": capped / turns, "flagged": flagged / turns,
            "words": words / turns, "turns": turns, "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=2, help="first turns per intent (seeds 0..N-1)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    loaded = load_smollm2()
    intents = [i.intent for i in load_sample_intents()]
    sampling = SamplingSettings(temperature=1.0, top_p=0.8, max_new_tokens=args.max_new_tokens)
    variants = {
        "plain prompt (before)": PromptedUserFormat(loaded.tokenizer, system_template=PLAIN_SYSTEM, shots=()),
        "prompt + few-shot first turns (now)": PromptedUserFormat(loaded.tokenizer),
    }
    rows = {}
    for name, fmt in variants.items():
        sim = UserSimulator(loaded, fmt, batched_retries=False, prefix_cache=None)
        rows[name] = measure(sim, intents, args.seeds, sampling)
    print(f"model: {loaded.model_id}; {len(intents)} sample intents x {args.seeds} seeds, first user turn; "
          f"paper guardrails (first-token filter I/You/Here, 3-25 words, repetition, retry cap 5); "
          f"temperature 1.0, top-p 0.8, max_new_tokens {args.max_new_tokens}; sequential retries")
    print("| prompt | samples drawn / turn | kept at the retry cap | role check flags | mean words | s |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['samples']:.2f} | {r['capped']:.0%} | {r['flagged']:.0%} | {r['words']:.1f} | "
              f"{r['seconds']:.0f} |")
    before, now = rows.values()
    print(f"samples per turn, now / before: {now['samples'] / before['samples']:.2f}x")


if __name__ == "__main__":
    main()
