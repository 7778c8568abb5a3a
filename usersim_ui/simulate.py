"""Run one whole dialogue from the command line and print its transcript.

    python -m usersim_ui.simulate --intent-id math-sequence-sum --max-turns 6
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

from usersim_ui.analysis.transcript import badge_line, end_line
from usersim_ui.assistants.registry import SPEC_FORMS
from usersim_ui.core.dialogue import SamplingSettings, dialogues_to_jsonl
from usersim_ui.core.guardrails import GUARDRAILS, GuardrailSettings
from usersim_ui.core.intents import sample_intent
from usersim_ui.core.transitions import RunSettings, auto_run, new_dialogue


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
    parser.add_argument("--assistant", default="local",
                        help=f"{SPEC_FORMS} (an endpoint's key from OPENAI_API_KEY)")
    for g in (g for g in GUARDRAILS if g.field is not None):
        parser.add_argument(f"--no-{g.field.replace('_', '-')}", action="store_true", dest=f"off_{g.field}",
                            help=f"switch the {g.label} guardrail off ({g.help})")
    parser.add_argument("--jsonl", help="also write the dialogue to this JSONL file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from usersim_ui.assistants.registry import (  # heavy: after argument errors
        BackendSpec,
        make_backend,
        parse_spec,
    )
    from usersim_ui.users.registry import default_simulator

    intent = sample_intent(args.intent_id).intent if args.intent_id else args.intent
    guardrails = replace(GuardrailSettings(), **{g.field: not getattr(args, f"off_{g.field}")
                                                 for g in GUARDRAILS if g.field is not None})
    sampling = SamplingSettings(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                                seed=args.seed)
    settings = RunSettings(guardrails=guardrails, sampling=sampling, max_turns=args.max_turns)
    simulator = default_simulator(args.user_model)
    spec = parse_spec(args.assistant, BackendSpec(max_tokens=args.assistant_max_tokens, seed=args.seed,
                                                  api_key=os.environ.get("OPENAI_API_KEY", "")))
    assistant = make_backend(spec)
    if assistant is None:
        raise SystemExit("--assistant researcher needs the page (python app.py): here nobody would type the replies.")
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
