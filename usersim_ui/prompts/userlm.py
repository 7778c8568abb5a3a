"""UserLM-8b's prompt format, token ids and the safe encoding of message content.

Kept separate from the simulator so that the exact prompt ids can be tested on a tokenizer
alone, without any model.
"""

from __future__ import annotations

from typing import Any, Sequence

USERLM_MODEL_ID = "microsoft/UserLM-8b"
END_CONVERSATION = "<|endconversation|>"
END_CONVERSATION_ID = 128256
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
END_OF_TEXT = "<|end_of_text|>"

# The template as UserLM-8b ships it, rendered: intent as the system message, roles as they
# are (not flipped), one newline after each header, no BOS, and always an open user header.
USERLM_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{{ '<|start_header_id|>user<|end_header_id|>' }}"
)


def encode_plain(tokenizer: Any, text: str) -> list[int]:
    """Encode text as ordinary pieces, never as added or special tokens.

    ``split_special_tokens=True`` is not enough: ``<|endconversation|>`` is an added token
    marked non-special and still matches. Going through the fast tokenizer's own
    normaliser, pre-tokeniser and BPE model bypasses every added token, whatever its flag.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # slow tokenizer: the best the library offers
        return list(tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    pieces = backend.pre_tokenizer.pre_tokenize_str(text) if backend.pre_tokenizer else [(text, None)]
    ids: list[int] = []
    for piece, _span in pieces:
        ids.extend(token.id for token in backend.model.tokenize(piece))
    return ids


def token_id(tokenizer: Any, token: str) -> int:
    """Id of one registered token, failing loudly when a tokenizer lacks it."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer has no token {token!r}")
    return int(tid)


def userlm_prompt_ids(tokenizer: Any, intent: str, messages: Sequence[dict[str, str]]) -> list[int]:
    """Prompt ids exactly as UserLM's template renders them, with content kept as plain text.

    Only the template's own structure yields special ids; an assistant reply that contains
    ``<|eot_id|>`` as text cannot forge a turn boundary.
    """
    start, end, eot = (token_id(tokenizer, t) for t in (START_HEADER, END_HEADER, EOT))
    ids: list[int] = []
    for role, content in [("system", intent)] + [(m["role"], m["content"]) for m in messages]:
        ids += [start] + encode_plain(tokenizer, role) + [end] + encode_plain(tokenizer, "\n" + content) + [eot]
    ids += [start] + encode_plain(tokenizer, "user") + [end]
    return ids
