"""A UserLM-shaped model built offline: the real Llama-3 tokenizer plus UserLM's template and
end token, over a tiny random-weight ``LlamaForCausalLM``.

Its text is noise, but its ids, vocabulary and code paths are UserLM-8b's: tests and
benchmarks use it where the 16 GB model cannot be downloaded.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from usersim_ui.prompts.userlm import (
    END_CONVERSATION,
    END_CONVERSATION_ID,
    USERLM_CHAT_TEMPLATE,
)


@functools.lru_cache(maxsize=1)
def llama3_userlm_tokenizer() -> PreTrainedTokenizerFast:
    """The Llama-3 BPE from the ``llama-models`` package, with UserLM's specials and template."""
    from llama_models.llama3 import tokenizer as llama_tok
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import TikTokenConverter

    model_path = Path(llama_tok.__file__).with_name("tokenizer.model")
    pattern = llama_tok.Tokenizer.pat_str
    backend = TikTokenConverter(vocab_file=str(model_path), pattern=pattern).converted()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    specials = [
        "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
        "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
        "<|python_tag|>", "<|image|>",
    ]
    specials += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(specials))]
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials], special_tokens=True)
    tok.add_tokens([AddedToken(END_CONVERSATION, special=False, normalized=False)])
    assert tok.convert_tokens_to_ids(END_CONVERSATION) == END_CONVERSATION_ID
    tok.bos_token, tok.eos_token = "<|begin_of_text|>", "<|eot_id|>"
    tok.pad_token = "<|end_of_text|>"
    tok.chat_template = USERLM_CHAT_TEMPLATE
    return tok


def tiny_userlm_model(seed: int = 0, hidden_size: int = 64, layers: int = 2) -> LlamaForCausalLM:
    """Random weights, seeded; vocab 128,257 like UserLM-8b."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=END_CONVERSATION_ID + 1, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=128000, eos_token_id=[128001, 128009], pad_token_id=128001, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    model.generation_config.pad_token_id = 128001
    return model
