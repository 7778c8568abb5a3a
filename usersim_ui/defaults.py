"""Which models run when nobody says otherwise.

With a GPU the simulated user is UserLM-8b. Without one (this repo's CI, a laptop, a CPU
Space) both sides are SmolLM2-135M-Instruct, the user side clearly named a prompted baseline.
``USERSIM_USER_MODEL`` overrides: ``userlm``, ``baseline``, or a model id/path in UserLM's format.
"""

from __future__ import annotations

import functools
import os

import torch

from .backends import TransformersAssistant
from .model_loading import LoadedModel, load_smollm2
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


def default_assistant(**settings: object) -> TransformersAssistant:
    return TransformersAssistant(offline_chat_model(), **settings)  # type: ignore[arg-type]
