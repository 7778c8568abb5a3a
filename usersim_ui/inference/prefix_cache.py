"""The prompt prefix's KV cache, kept per dialogue across turns.

A user turn's prompt is the previous turn's prompt plus what was said since (the user turn
just written, the assistant's reply, a new open user header), so almost all of it was
already prefilled last turn. :class:`PrefixCache` keeps, per dialogue, the prompt ids it
covers and a transformers ``DynamicCache`` over them. The next turn looks up the longest
common prefix (LCP) of the stored ids and its new prompt, crops the cache to it and passes it
to ``generate()``, which then prefills only the tokens after the LCP.

Correctness never depends on the key: the cached keys and values for ``ids[:n]`` are a
function of those ids alone (causal attention, absolute positions from 0), so any stored
entry is valid for whatever prefix it shares with any prompt. Undo, edit, regenerate,
import and context trimming just shorten the common prefix. The key (the dialogue's id)
only decides which entry is tried.

Entries are *taken out* for the duration of a generation and *put back* after it: two
threads working on one dialogue never share a cache object, and an entry whose generation
failed or was cancelled (its tensors possibly half-updated) is simply never put back.

Memory is bounded: least-recently-used entries go first when there are more than
``max_dialogues`` entries or more than ``max_tokens`` cached tokens in all. A cached token
costs ``2 x layers x kv_heads x head_dim x bytes``: 128 KiB for Llama-3-8B in bf16, so the
default 16,000 tokens hold up to 2 GiB beside the 16 GB of weights (the cache lives on the
model's device).

Batched retries (``num_return_sequences > 1``): the cache is *expanded per row* (a copy,
``batch_repeat_interleave``) rather than dropped: the retry round then prefills one token
per row instead of the whole prompt per row. Only the batch-of-one entry is stored.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Hashable, Sequence


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def cache_length(cache: Any) -> int:
    return int(cache.get_seq_length()) if cache is not None else 0


def crop_to(cache: Any, length: int) -> None:
    """Keep the first ``length`` positions (``DynamicCache.crop`` takes the count to remove)."""
    extra = cache_length(cache) - length
    if extra > 0:
        cache.crop(-extra)


def kv_bytes_per_token(config: Any, dtype_bytes: int) -> int:
    """Bytes one cached token takes over all layers (keys and values); 0 if the config says too little."""
    try:
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return int(2 * config.num_hidden_layers * kv_heads * head_dim * dtype_bytes)
    except (AttributeError, TypeError, ZeroDivisionError):
        return 0


@dataclass
class CacheEntry:
    ids: list[int]  # the prompt ids the cache covers, one batch row
    cache: Any  # a DynamicCache over exactly ``ids``

    @property
    def tokens(self) -> int:
        return len(self.ids)


@dataclass
class CacheStats:
    lookups: int = 0
    hits: int = 0  # lookups that reused at least one token
    reused_tokens: int = 0
    prefilled_tokens: int = 0  # tokens the callers had to prefill after the reused prefix
    evictions: int = 0


class PrefixCache:
    """Per-dialogue prompt KV caches with LRU eviction by count and by total tokens."""

    @classmethod
    def for_model(cls, model: Any, max_bytes: int | None = None, max_dialogues: int = 32) -> "PrefixCache":
        """A cache bounded by memory: ``max_tokens`` = ``max_bytes`` / the model's KV bytes per token
        (default budget: 2 GiB on a GPU, 64 MiB on a CPU, where it shares RAM with everything)."""
        config = getattr(model, "config", None)
        try:
            device = next(model.parameters()).device
            dtype_bytes = next(model.parameters()).element_size()
        except (AttributeError, StopIteration, TypeError):
            return cls(max_dialogues=max_dialogues)
        if max_bytes is None:
            max_bytes = 2 * 2**30 if device.type == "cuda" else 64 * 2**20
        per_token = kv_bytes_per_token(config, dtype_bytes)
        return cls(max_dialogues=max_dialogues, max_tokens=max(1, max_bytes // per_token) if per_token else 16_000)

    def __init__(self, max_dialogues: int = 32, max_tokens: int = 16_000):
        if max_dialogues < 1 or max_tokens < 1:
            raise ValueError("a prefix cache needs room for at least one dialogue and one token")
        self.max_dialogues, self.max_tokens = max_dialogues, max_tokens
        self._entries: OrderedDict[Hashable, CacheEntry] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = CacheStats()

    # ---- the two operations a generation needs -------------------------------------------

    def take(self, key: Hashable, prompt_ids: Sequence[int]) -> tuple[Any, int]:
        """Remove ``key``'s entry and return ``(cache, n)``: a cache over ``prompt_ids[:n]``
        (cropped to the common prefix, never the whole prompt: ``generate()`` needs at least one
        new token to produce the first step's logits), or ``(None, 0)`` on a miss."""
        with self._lock:
            entry = self._entries.pop(key, None)
            self.stats.lookups += 1
        if entry is None:
            self.stats.prefilled_tokens += len(prompt_ids)
            return None, 0
        n = min(common_prefix_length(entry.ids, prompt_ids), len(prompt_ids) - 1)
        if n <= 0:
            self.stats.prefilled_tokens += len(prompt_ids)
            return None, 0
        crop_to(entry.cache, n)
        self.stats.hits += 1
        self.stats.reused_tokens += n
        self.stats.prefilled_tokens += len(prompt_ids) - n
        return entry.cache, n

    def put(self, key: Hashable, prompt_ids: Sequence[int], cache: Any) -> None:
        """Store ``cache`` (batch of one) as covering ``prompt_ids``; it is cropped to them."""
        if cache is None or cache_length(cache) < len(prompt_ids) or len(prompt_ids) > self.max_tokens:
            return
        crop_to(cache, len(prompt_ids))
        with self._lock:
            self._entries.pop(key, None)
            self._entries[key] = CacheEntry(list(prompt_ids), cache)
            self._evict()

    def peek(self, key: Hashable) -> CacheEntry | None:
        with self._lock:
            return self._entries.get(key)

    # ---- helpers ---------------------------------------------------------------------------

    @staticmethod
    def expanded(cache: Any, rows: int) -> Any:
        """A copy of ``cache`` with each row repeated ``rows`` times (the original is untouched)."""
        out = copy.deepcopy(cache)
        if rows > 1:
            out.batch_repeat_interleave(rows)
        return out

    def forget(self, key: Hashable) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def total_tokens(self) -> int:
        with self._lock:
            return sum(e.tokens for e in self._entries.values())

    def _evict(self) -> None:
        total = sum(e.tokens for e in self._entries.values())
        while self._entries and (len(self._entries) > self.max_dialogues or total > self.max_tokens):
            _key, entry = self._entries.popitem(last=False)
            total -= entry.tokens
            self.stats.evictions += 1
