"""Which models run when nobody says otherwise.

With a GPU the simulated user is UserLM-8b. Without one (this repo's CI, a laptop, a CPU
Space) both sides are SmolLM2-135M-Instruct, the user side clearly named a prompted baseline.
``USERSIM_USER_MODEL`` overrides: ``userlm``, ``baseline``, or a model id/path in UserLM's format.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import torch

from .backends import AssistantBackend, BackendError, OpenAIAssistant, TransformersAssistant
from .model_loading import LoadedModel, load_chat_model, load_smollm2
from .simulator import UserSimulator
from .userlm_format import USERLM_MODEL_ID


@functools.lru_cache(maxsize=1)
def offline_chat_model() -> LoadedModel:
    """One SmolLM2 in memory, shared by the baseline user and the default assistant."""
    return load_smollm2()


def user_model_choice() -> str:
    choice = os.environ.get("USERSIM_USER_MODEL", "").strip()
    if choice:
        return choice
    return "userlm" if torch.cuda.is_available() else "baseline"


@functools.lru_cache(maxsize=4)
def default_simulator(choice: str | None = None) -> UserSimulator:
    choice = choice or user_model_choice()
    if choice == "baseline":
        return UserSimulator.prompted_baseline(offline_chat_model())
    return UserSimulator.from_pretrained(USERLM_MODEL_ID if choice == "userlm" else choice)


@functools.lru_cache(maxsize=2)
def local_chat_model(model_id: str) -> LoadedModel:
    """Any transformers chat model by hub id or path, kept in memory once loaded."""
    return load_chat_model(model_id)


def default_assistant(model_id: str = "", **settings: object) -> TransformersAssistant:
    """The local assistant: ``model_id`` (hub id or path) or, when empty, the offline SmolLM2."""
    try:
        loaded = local_chat_model(model_id.strip()) if model_id.strip() else offline_chat_model()
    except OSError as exc:  # no such path, no hub access, not a model folder
        raise BackendError(f"Could not load the local model {model_id!r}: {exc}") from exc
    return TransformersAssistant(loaded, **settings)  # type: ignore[arg-type]


@dataclass(frozen=True)
class BackendSpec:
    """What the researcher chose as assistant, as plain data (picklable for ZeroGPU workers)."""

    kind: str = "local"  # "local" | "openai" | "researcher"
    system_prompt: str = "You are a helpful assistant."
    temperature: float = 0.7
    max_tokens: int = 128
    base_url: str = ""
    model: str = ""
    api_key: str = field(default="", repr=False)
    seed: int = 0


def make_backend(spec: BackendSpec) -> AssistantBackend | None:
    """The backend for a spec; None means the researcher types the assistant's turns."""
    if spec.kind == "researcher":
        return None
    if spec.kind == "openai":
        if not spec.base_url.strip() or not spec.model.strip():
            raise ValueError("An OpenAI-compatible backend needs a base URL and a model name.")
        return OpenAIAssistant(base_url=spec.base_url.strip(), model=spec.model.strip(), api_key=spec.api_key,
                               system_prompt=spec.system_prompt, temperature=spec.temperature, max_tokens=spec.max_tokens)
    if spec.kind == "local":
        return default_assistant(spec.model, system_prompt=spec.system_prompt, temperature=spec.temperature,
                                 max_new_tokens=spec.max_tokens, seed=spec.seed)
    raise ValueError(f"unknown assistant backend {spec.kind!r}")
