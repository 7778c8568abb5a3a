"""p_end's input, the first step's raw logits, taken by a forward hook instead of generate()'s
output_logits (which keeps every step's): the same numbers, and only one step kept."""

from __future__ import annotations

import threading

import torch
from conftest import biased_userlm

from usersim_ui.inference.generation import FirstLogits


def test_the_hook_gives_generates_own_first_step_logits_for_a_padded_batch(llama_tok):
    model = biased_userlm(llama_tok, None, 0)
    rows = [[128000, 9906, 1070, 11, 358], [128000, 40, 1390]]
    width = max(map(len, rows))
    ids = torch.tensor([[128001] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.inference_mode(), FirstLogits(model) as first:
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=5, min_new_tokens=5,
                             pad_token_id=128001, return_dict_in_generate=True, output_logits=True)
    assert len(out.logits) == 5  # generate kept five steps; the hook one
    assert first.value.shape == (2, model.config.vocab_size)
    torch.testing.assert_close(first.value, out.logits[0].float(), rtol=0, atol=0)


def test_another_threads_call_is_not_taken(llama_tok):
    model = biased_userlm(llama_tok, None, 0)
    ids = torch.tensor([[128000, 9906, 1070]])
    with torch.inference_mode(), FirstLogits(model) as first:
        other = threading.Thread(target=lambda: model(ids))
        other.start()
        other.join()
        assert first.value is None
        model(ids[:, :2])
    torch.testing.assert_close(first.value, model(ids[:, :2]).logits[:, -1, :].float())
    assert not model._forward_hooks  # removed on exit
