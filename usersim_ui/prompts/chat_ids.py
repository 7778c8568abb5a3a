"""Token ids for any chat template with message content encoded as plain text.

A rendered template tokenized as one string turns ``<|im_end|>`` typed by a user into a real
turn boundary. Rendering with placeholders and encoding only the template's own text with
special-token parsing keeps structure and content apart, whatever the template.
"""

from __future__ import annotations

import uuid
from typing import Any, Sequence

from usersim_ui.prompts.userlm import encode_plain


def chat_template_ids(tokenizer: Any, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
    """``apply_chat_template`` ids, except that message content can never become special tokens."""
    tag = uuid.uuid4().hex
    holders = [f"\u2063{tag}{i}\u2063" for i in range(len(messages))]
    rendered = tokenizer.apply_chat_template(
        [{"role": m["role"], "content": h} for m, h in zip(messages, holders)],
        tokenize=False, add_generation_prompt=add_generation_prompt,
    )
    ids: list[int] = []
    rest = rendered
    for message, holder in zip(messages, holders):
        before, found, rest = rest.partition(holder)
        if not found:
            raise ValueError("chat template dropped or altered a message; cannot encode it safely")
        ids += tokenizer.encode(before, add_special_tokens=False) if before else []
        ids += encode_plain(tokenizer, message["content"])
    ids += tokenizer.encode(rest, add_special_tokens=False) if rest else []
    return ids


def chat_stop_ids(tokenizer: Any) -> list[int]:
    """End-of-turn ids of a chat model: its eos plus whichever common turn terminators it has."""
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end_of_text|>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)
