"""Which token ids the first-token filter bans: the one place a banned word becomes ids."""

from __future__ import annotations

from typing import Any, Sequence

from usersim_ui.prompts.userlm import encode_plain


def banned_first_token_ids(tokenizer: Any, words: Sequence[str], any_case: bool = False) -> list[int]:
    """Single-token spellings of the banned words, with and without a leading space: as written
    (the published rule: "I", "You", "Here"), or also lower, upper and capitalised with ``any_case``."""
    ids: set[int] = set()
    for word in words:
        variants = {word, word.lower(), word.upper(), word.capitalize()} if any_case else {word}
        for variant in variants:
            for spelled in (variant, " " + variant):
                pieces = encode_plain(tokenizer, spelled)
                if len(pieces) == 1:
                    ids.add(pieces[0])
    return sorted(ids)
