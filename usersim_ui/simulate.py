"""Run one whole dialogue from the command line and print its transcript.

    python -m usersim_ui.simulate --intent-id math-sequence-sum --max-turns 6
"""

from __future__ import annotations

import argparse
import sys

from .dialogue import GuardrailSettings, SamplingSettings, dialogues_to_jsonl
from .engine import RunSettings, auto_run, new_dialogue
from .intents import sample_intent
from .transcript import badge_line, end_line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--intent-id", help="id of a sample intent (see sample_intents/)")
    source.add_argument("--intent", help="task intent text")
    parser.add_argument("--max-turns", type=int, default=6, help="user turns before the cap ends the dialogue")
    parser.add_argument("--user-model", default=None, help="'userlm', 'baseline' or a model path (default: by device)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=0.8)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--assistant-max-tokens", type=int, default=128)
    for name in ("first-token-filter", "no-early-ending", "length-thresholds", "verbatim-repetition"):
        parser.add_argument(f"--no-{name}", action="store_true", help=f"switch the {name} guardrail off")
    parser.add_argument("--jsonl", help="also write the dialogue to this JSONL file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .defaults import default_assistant, default_simulator  # heavy: after argument errors

    intent = sample_intent(args.intent_id).intent if args.intent_id else args.intent
    guardrails = GuardrailSettings(
        first_token_filter=not args.no_first_token_filter, no_early_ending=not args.no_no_early_ending,
        length_thresholds=not args.no_length_thresholds, verbatim_repetition=not args.no_verbatim_repetition,
    )
    sampling = SamplingSettings(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                                seed=args.seed)
    settings = RunSettings(guardrails=guardrails, sampling=sampling, max_turns=args.max_turns)
    simulator = default_simulator(args.user_model)
    assistant = default_assistant(max_new_tokens=args.assistant_max_tokens, seed=args.seed)
    print(f"user: {simulator.model_id} on {simulator.device}\nassistant: {assistant.name}\nintent: {intent}\n")
    dialogue = new_dialogue(intent, simulator, assistant)
    printed = 0
    for dialogue in auto_run(dialogue, simulator, assistant, settings):
        for turn in dialogue.turns[printed:]:
            printed += 1
            print(f"[{printed}] {turn.role}: {'<|endconversation|>' if turn.ends_dialogue else turn.text}")
            print(f"    {badge_line(turn)}", flush=True)
    print(f"\n{end_line(dialogue)}")
    if args.jsonl:
        with open(args.jsonl, "w", encoding="utf-8") as fh:
            fh.write(dialogues_to_jsonl([dialogue]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
