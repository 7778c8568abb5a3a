"""The assistant on an in-process transformers chat model (SmolLM2-135M-Instruct offline)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Sequence

from usersim_ui.assistants.base import with_system
from usersim_ui.core.errors import BackendError
from usersim_ui.core.limits import (
    MAX_TURN_CHARS,
    check_context,
)
from usersim_ui.core.protocols import AssistantReply, OnDraft
from usersim_ui.inference.generation import draft_stream, sample
from usersim_ui.inference.model_loading import LoadedModel
from usersim_ui.prompts.chat_ids import chat_stop_ids, chat_template_ids


@dataclass
class TransformersAssistant:
    """A local chat model through its own chat template (SmolLM2-135M-Instruct offline)."""

    loaded: LoadedModel
    system_prompt: str = "You are a helpful assistant."
    temperature: float = 0.7
    max_new_tokens: int = 128
    top_p: float = 0.95
    seed: int = 0  # used when the caller gives no per-turn seed

    @property
    def name(self) -> str:
        return self.loaded.model_id

    @property
    def context(self) -> int | None:
        return getattr(self.loaded.model.config, "max_position_embeddings", None)

    def reply(self, messages: Sequence[dict[str, str]], stop_event: threading.Event | None = None,
              seed: int | None = None, on_draft: OnDraft | None = None) -> AssistantReply:
        prompt = chat_template_ids(self.loaded.tokenizer, with_system(self.system_prompt, messages),
                                   add_generation_prompt=True)
        check_context(len(prompt), self.max_new_tokens, self.context, f"the local assistant {self.name}")
        stops = chat_stop_ids(self.loaded.tokenizer)
        result = sample(self.loaded.model, prompt, stop_ids=stops,
                        temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens,
                        seed=self.seed if seed is None else seed, stop_event=stop_event,
                        on_step=draft_stream(self.loaded.tokenizer, on_draft, "assistant", stops))
        new_ids = result.new_ids[0]
        text = self.loaded.tokenizer.decode(new_ids, skip_special_tokens=True).strip()
        if not text:
            raise BackendError(f"{self.name} wrote an empty reply ({len(new_ids)} tokens); Regenerate or raise "
                               "the assistant temperature.")
        # A turn is at most MAX_TURN_CHARS wherever it comes from, so that its export imports again.
        cut = len(text) > MAX_TURN_CHARS
        return AssistantReply(text[:MAX_TURN_CHARS] if cut else text, len(new_ids), result.latency_s, self.name,
                              truncated=cut)
