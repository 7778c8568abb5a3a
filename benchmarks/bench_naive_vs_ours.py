"""The model card's naive loop against ours, in one process, on the same dialogues and seeds.

*naive* (what the UserLM card's snippet grows into): fp32; every user turn re-renders the
whole history with ``apply_chat_template`` and prefills all of it; the guardrails are checked
only after a sample is finished (first word, ending, length, repetition) and a rejected turn is
resampled one at a time, each time re-prefilling the prompt; p_end costs one extra forward pass
over the prompt.

*ours* (``UserSimulator``): the prompt's KV cache kept per dialogue across turns (only what was
said since the last turn is prefilled), logit masks for the first token and the end marker,
an over-long sample stopped at ``max_words``, the retries in one batch that reuses the cached
prompt, p_end read from the generating pass.

The assistant is scripted (``backends.ScriptedAssistant``): only the user side is measured.

    python -m benchmarks.bench_naive_vs_ours --dialogues 3 --turns 10
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import (
    END_CONVERSATION_ID,
    INTENTS,
    add_model_arguments,
    count_forwards,
    kv_bytes,
    machine,
    peak_rss,
    replies,
    userlm_shaped_model,
)
from usersim_ui.assistants.scripted import ScriptedAssistant
from usersim_ui.core.dialogue import (
    Dialogue,
    GuardrailSettings,
    SamplingSettings,
    Turn,
    count_words,
)
from usersim_ui.core.guardrails import normalise, rejection_reason
from usersim_ui.core.seeds import draw_seed, turn_seed
from usersim_ui.core.transitions import RunSettings, assistant_turn
from usersim_ui.inference.model_loading import LoadedModel
from usersim_ui.inference.prefix_cache import PrefixCache
from usersim_ui.inference.tiny_userlm import llama3_userlm_tokenizer
from usersim_ui.prompts.formats import UserLMFormat
from usersim_ui.users.local import UserSimulator


class NaiveUser:
    """The card's loop with the guardrails applied after the fact."""

    def __init__(self, model, tokenizer, guardrails: GuardrailSettings):
        self.model, self.tok, self.g = model, tokenizer, guardrails
        self.newline = tokenizer.encode("\n", add_special_tokens=False)

    def turn(self, dialogue: Dialogue, sampling: SamplingSettings, seed: int) -> tuple[Turn, int]:
        messages = [{"role": "system", "content": dialogue.intent}] + dialogue.messages()
        enc = self.tok.apply_chat_template(messages, return_tensors="pt", add_generation_prompt=True,
                                           return_dict=True).to(self.model.device)
        input_ids = enc["input_ids"]
        with torch.inference_mode():  # p_end: one more pass over the whole prompt and the leading newline
            probe = torch.cat([input_ids, torch.tensor([self.newline], device=input_ids.device)], dim=1)
            p_end = torch.softmax(self.model(input_ids=probe).logits[0, -1].float(), -1)[END_CONVERSATION_ID].item()
        earlier = [t.text for t in dialogue.turns if t.role == "user"]
        samples, text, ends = 0, "", False
        for round_no in range(1 + self.g.retry_cap):
            torch.manual_seed(draw_seed(seed, round_no))
            with torch.inference_mode():
                out = self.model.generate(**enc, do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                                          top_k=None, max_new_tokens=sampling.max_new_tokens + 1,
                                          eos_token_id=[128009, 128001, END_CONVERSATION_ID], pad_token_id=128001)
            samples += 1
            new = out[0, input_ids.shape[1]:].tolist()
            ends = END_CONVERSATION_ID in new
            new = new[:new.index(END_CONVERSATION_ID)] if ends else new
            text = self.tok.decode(new, skip_special_tokens=True).strip()
            if self.acceptable(text, ends, earlier, dialogue.intent):
                break
        return Turn(role="user", text=text, words=count_words(text), p_end=p_end, ends_dialogue=False, seed=seed), samples

    def acceptable(self, text: str, ends: bool, earlier: list[str], intent: str) -> bool:
        if ends and self.g.no_early_ending:
            return False
        words = normalise(text).split()
        if self.g.first_token_filter and words and words[0] in {w.lower() for w in self.g.banned_first_words}:
            return False
        return rejection_reason(text, earlier, intent, self.g) is None


def compare(model, tok, n_dialogues: int, turns: int, max_new_tokens: int) -> tuple[dict, UserSimulator]:
    """Both loops over the same dialogues and seeds, alternating who goes first each turn:
    per variant, each user turn's time, prefill tokens, forward passes, samples and peak RSS
    growth; and ``ours``, whose prefix cache the caller may inspect."""
    counters = count_forwards(model)
    guardrails = GuardrailSettings()
    settings = RunSettings(guardrails=guardrails, sampling=SamplingSettings(max_new_tokens=max_new_tokens, seed=0),
                           max_turns=turns + 1, context_budget=8192)
    ours = UserSimulator(LoadedModel(model, tok, "userlm-shaped", str(model.device)), UserLMFormat(tok),
                         prefix_cache=PrefixCache(max_dialogues=64, max_tokens=10**6))
    naive = NaiveUser(model, tok, guardrails)
    assistant = ScriptedAssistant(replies(turns))

    warm = Dialogue(intent="You want to warm up.", id="warm-up")  # first calls allocate: not measured
    naive.turn(warm, settings.sampling, 0)
    ours.generate_turn(warm, guardrails, settings.sampling, settings.context_budget, seed=0)
    ours.prefix_cache.forget("warm-up")
    counters.reset()
    stats = {name: {"time": [], "prefill": [], "forwards": [], "samples": [], "rss": [], "prefill_at": {}}
             for name in ("naive", "ours")}
    for d in range(n_dialogues):
        dialogues = {name: Dialogue(intent=INTENTS[d % len(INTENTS)], id=f"bench-{d}") for name in stats}
        for t in range(turns):
            for name in ("naive", "ours") if t % 2 == 0 else ("ours", "naive"):  # alternate who goes first
                dialogue = dialogues[name]
                seed = turn_seed(settings.sampling.seed, len(dialogue.turns))
                counters.reset()
                with peak_rss() as rss:
                    started = time.perf_counter()
                    if name == "naive":
                        turn, samples = naive.turn(dialogue, settings.sampling, seed)
                    else:
                        turn = ours.generate_turn(dialogue, guardrails, settings.sampling, settings.context_budget,
                                                  seed=seed)
                        samples = len(turn.rejected) + 1
                    elapsed = time.perf_counter() - started
                forwards, prefill = counters.reset()
                s = stats[name]
                s["time"].append(elapsed), s["prefill"].append(prefill), s["forwards"].append(forwards)
                s["samples"].append(samples), s["rss"].append(rss["peak"])
                s["prefill_at"].setdefault(t + 1, []).append(prefill)
                dialogue = dialogue.with_turn(turn)
                dialogues[name] = assistant_turn(dialogue, assistant, settings)
    return stats, ours


def summary_rows(stats: dict, turns: int) -> list[tuple[str, float, float, str]]:
    """(metric, naive, ours, number format) for the table."""
    mean = lambda xs: statistics.mean(xs)  # noqa: E731
    return [
        ("time per user turn (s)", mean(stats["naive"]["time"]), mean(stats["ours"]["time"]), "{:.3f}"),
        ("prefill tokens per turn (mean)", mean(stats["naive"]["prefill"]), mean(stats["ours"]["prefill"]), "{:.0f}"),
        (f"prefill tokens at turn {turns}", mean(stats["naive"]["prefill_at"][turns]),
         mean(stats["ours"]["prefill_at"][turns]), "{:.0f}"),
        ("forward passes per turn", mean(stats["naive"]["forwards"]), mean(stats["ours"]["forwards"]), "{:.1f}"),
        ("samples per accepted turn", mean(stats["naive"]["samples"]), mean(stats["ours"]["samples"]), "{:.2f}"),
        ("peak RSS growth during a turn (MB)", max(stats["naive"]["rss"]) / 2**20, max(stats["ours"]["rss"]) / 2**20,
         "{:.1f}"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dialogues", type=int, default=3)
    parser.add_argument("--turns", type=int, default=10, help="user turns per dialogue")
    add_model_arguments(parser)
    args = parser.parse_args()

    tok = llama3_userlm_tokenizer()
    model = userlm_shaped_model(args.hidden, args.layers, eot_bias=args.eot_bias)
    stats, ours = compare(model, tok, args.dialogues, args.turns, args.max_new_tokens)
    held = sum(kv_bytes(ours.prefix_cache.peek(f"bench-{d}").cache) for d in range(args.dialogues)
               if ours.prefix_cache.peek(f"bench-{d}") is not None)
    print(f"machine: {machine()}; model: random Llama, hidden {args.hidden}, {args.layers} layers, vocab 128,257, "
          f"fp32, eot bias {args.eot_bias}, real Llama-3 tokenizer + UserLM template; {args.dialogues} dialogues x {args.turns} user turns, "
          f"scripted assistant ({len(REPLY_WORDS())} words a reply); max_new_tokens={args.max_new_tokens}; "
          "guardrails at the paper's defaults")
    rows = summary_rows(stats, args.turns)
    print("| metric | naive (card) | ours | naive / ours |")
    print("|---|---|---|---|")
    for label, a, b, fmt in rows:
        ratio = f"{a / b:.2f}x" if b else "n/a"
        print(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {ratio} |")
    print(f"ours keeps {held / 2**20:.1f} MB of prompt KV cache for {args.dialogues} dialogues between turns "
          f"(cache stats: {ours.prefix_cache.stats})")


def REPLY_WORDS() -> list[str]:
    return replies(1)[0].split()


if __name__ == "__main__":
    main()
