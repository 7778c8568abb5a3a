"""Shared real models: the Llama-3 tokenizer with UserLM's template over tiny random weights,
and SmolLM2-135M-Instruct from its GGUF. Built once per session: they are slow to make."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from usersim_ui.inference.model_loading import LoadedModel  # noqa: E402
from usersim_ui.inference.tiny_userlm import llama3_userlm_tokenizer, tiny_userlm_model  # noqa: E402
from usersim_ui.prompts.formats import UserLMFormat  # noqa: E402
from usersim_ui.users.local import UserSimulator  # noqa: E402


@pytest.fixture(scope="session")
def llama_tok():
    return llama3_userlm_tokenizer()


def biased_userlm(tokenizer, bias: dict[int, float] | None = None, seed: int = 0):
    """The tiny UserLM-shaped model with an output bias: a real model whose logits favour
    chosen tokens, so that a guardrail has something to push against."""
    model = tiny_userlm_model(seed=seed)
    if bias:
        head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
        with torch.no_grad():
            head.weight.copy_(model.lm_head.weight)
            head.bias.zero_()
            for tid, value in bias.items():
                head.bias[tid] = value
        model.config.tie_word_embeddings = False
        model.lm_head = head
    return model


def userlm_sim(tokenizer, bias: dict[int, float] | None = None, seed: int = 0, batched: bool = True) -> UserSimulator:
    model = biased_userlm(tokenizer, bias, seed)
    return UserSimulator(LoadedModel(model, tokenizer, "tiny-userlm", "cpu"), UserLMFormat(tokenizer), batched_retries=batched)


@pytest.fixture(scope="session")
def tiny_sim(llama_tok) -> UserSimulator:
    return userlm_sim(llama_tok)


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    from usersim_ui.inference.model_loading import offline_chat_model

    return offline_chat_model()
