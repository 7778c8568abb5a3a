"""Memory of p_end's input: ``generate(output_logits=True)`` (keeps every step's float32 (rows,
vocab) logits) against ``generation.FirstLogits`` (a forward hook that keeps the first step's),
on a 5-row retry round of 64 tokens over the 128k Llama-3 vocabulary, interleaved.

    python -m benchmarks.bench_first_logits
"""

from __future__ import annotations

import argparse
import gc

import torch

from benchmarks.common import machine, peak_rss, userlm_shaped_model
from usersim_ui.inference.generation import FirstLogits


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    model = userlm_shaped_model(256, 4, eot_bias=-100.0)  # no early end: every row makes all its tokens
    ids = torch.randint(0, 128000, (args.rows, 300))

    def run(keep_all: bool) -> float:
        gc.collect()
        torch.manual_seed(0)
        with peak_rss() as peak, torch.inference_mode(), FirstLogits(model):
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_p=0.8,
                                 max_new_tokens=args.tokens, min_new_tokens=args.tokens, pad_token_id=128001,
                                 return_dict_in_generate=True, output_logits=keep_all)
            del out
        return peak["peak"] / 2**20

    run(False)  # warm-up: the allocator's pools
    kept, hooked = [], []
    for _ in range(args.repeats):
        kept.append(run(True))
        hooked.append(run(False))
    print(f"machine: {machine()}; {args.rows} rows x {args.tokens} tokens, vocab 128,257; peak RSS growth during "
          f"generate(), max of {args.repeats}")
    print("| p_end's logits from | peak RSS growth (MB) |")
    print("|---|---|")
    print(f"| generate(output_logits=True) | {max(kept):.1f} |")
    print(f"| FirstLogits forward hook (ours) | {max(hooked):.1f} |")
    print(f"expected from the shapes alone: {args.rows * args.tokens * 128257 * 4 / 2**20:.1f} MB of kept logits")


if __name__ == "__main__":
    main()
