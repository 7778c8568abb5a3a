"""Shared pieces of the speed benchmarks: a UserLM-shaped random model a bit larger than the
test one, forward-pass and prefill counters, an RSS sampler, and the scripted assistant."""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from transformers import LlamaConfig, LlamaForCausalLM

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

END_CONVERSATION_ID = 128256
EOT_ID = 128009

INTENTS = [
    "You want help planning a five-day trip to Kyoto in April with a small child, on a budget.",
    "You want to understand why your sourdough starter smells like acetone and how to fix it.",
    "You want a Python function that merges overlapping intervals, and you want it explained.",
    "You want advice on asking your manager for a raise after your first year at the company.",
    "You want to know how long before bedtime you should stop drinking coffee.",
    "You want to choose between a used hybrid and a new petrol car for a 40 km daily commute.",
]
REPLY = ("That is a good question, and there are a few things worth weighing before you decide. "
         "First, think about what matters most to you here: cost, time, or simplicity. Second, it "
         "helps to look at one concrete example and work through it step by step. Tell me a bit more "
         "about your situation and I can make this specific. Reply {n}.")


def add_model_arguments(parser: Any, max_new_tokens: int = 64) -> None:
    """The UserLM-shaped model's size and sampling arguments every speed benchmark takes."""
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--eot-bias", type=float, default=8.3, help="sets the random model's mean turn length")


def replies(n: int) -> list[str]:
    return [REPLY.format(n=i + 1) for i in range(n)]


def userlm_shaped_model(hidden: int = 256, layers: int = 4, seed: int = 0, eot_bias: float = 9.0,
                        end_bias: float = 6.0, *, intermediate: int | None = None, heads: int | None = None,
                        kv_heads: int | None = None, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> LlamaForCausalLM:
    """Random Llama weights, vocab 128,257 (the real Llama-3 tokenizer + UserLM's end token).

    An output bias on ``<|eot_id|>`` makes turns end at random lengths (about 1 in 12 steps) and one on
    ``<|endconversation|>`` gives p_end around 0.5%: so that the length guardrail both accepts and
    rejects, as it does with a real model. The text is noise; only ids, counts and times are measured.
    ``intermediate``, ``heads``, ``kv_heads`` (default: 4x hidden, hidden/64, hidden/128) give
    other shapes (Llama-3.1-8B's: 14336, 32, 8); the weights are made on ``device`` in ``dtype``.
    """
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=END_CONVERSATION_ID + 1, hidden_size=hidden, intermediate_size=intermediate or hidden * 4,
        num_hidden_layers=layers, num_attention_heads=heads or max(4, hidden // 64),
        num_key_value_heads=kv_heads or max(2, hidden // 128),
        max_position_embeddings=8192, bos_token_id=128000, eos_token_id=[128001, EOT_ID], pad_token_id=128001,
        tie_word_embeddings=False,
    )
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype).eval()
        head = torch.nn.Linear(hidden, config.vocab_size, bias=True, dtype=dtype)
    model.generation_config.pad_token_id = 128001
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[EOT_ID] = eot_bias
        head.bias[END_CONVERSATION_ID] = end_bias
    model.lm_head = head
    return model


@dataclass
class Counters:
    forwards: int = 0
    prefill_tokens: int = 0  # tokens in forward calls with more than one new token per row

    def reset(self) -> tuple[int, int]:
        out = (self.forwards, self.prefill_tokens)
        self.forwards = self.prefill_tokens = 0
        return out


def count_forwards(model: Any) -> Counters:
    counters = Counters()

    def hook(_module: Any, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        counters.forwards += 1
        if ids is not None and ids.shape[1] > 1:
            counters.prefill_tokens += int(ids.shape[0] * ids.shape[1])

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return counters


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_rss(interval_s: float = 0.002) -> Iterator[dict[str, int]]:
    """Peak RSS above the RSS at entry, sampled every ``interval_s`` while the block runs."""
    out = {"start": rss_bytes(), "peak": 0}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            out["peak"] = max(out["peak"], rss_bytes() - out["start"])
            time.sleep(interval_s)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        done.set()
        thread.join()
        out["peak"] = max(out["peak"], rss_bytes() - out["start"])


def kv_bytes(cache: Any) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


def machine() -> str:
    return f"{os.cpu_count()}-core CPU, torch {torch.__version__}, {torch.get_num_threads()} threads"
