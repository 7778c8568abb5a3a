"""Which simulated user runs when nobody says otherwise.

With a GPU the simulated user is UserLM-8b. Without one (this repo's CI, a laptop, a CPU
Space) the user is SmolLM2-135M-Instruct, clearly named a prompted baseline (the assistant too:
see ``assistants.registry``).
``USERSIM_USER_MODEL`` overrides: ``userlm``, ``baseline``, or a model id/path in UserLM's format.
"""

from __future__ import annotations

import functools
import os

import torch

from usersim_ui.inference.model_loading import offline_chat_model
from usersim_ui.prompts.userlm import USERLM_MODEL_ID
from usersim_ui.users.local import UserSimulator


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
