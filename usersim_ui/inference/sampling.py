"""The one sampler of every in-process draw: temperature and top-p (nucleus) over all rows of a
decoding step in one call, each dialogue's rows drawn from its own seeded ``torch.Generator``.

A single dialogue's turn (``generation.sample``), a batch of dialogues (``users.batched``) and
the test completions server all draw through :class:`Sampler`, so a row's token depends only
on its logits, its settings and its generator's state: a batched turn is the turn its seed
gives alone, by construction (up to the float noise a padded batch puts in the logits).

**The distribution, defined once.** For a row with logits ``x``, temperature ``T`` and
``top_p``: ``d = (x - max x) / T``; ``e = exp(d)`` over the whole row; each token's weight is
``w = floor(e * (2**52 / sum(e)))`` in float32 arithmetic, an integer (a probability on a
2**-52 grid; a token below 2**-52 has weight 0 and is never drawn, at most V * 2**-52 ~ 3e-11
of mass in all). Tokens are ordered by ``d`` descending, ties by token id ascending (the
*canonical order*). The nucleus is the canonical prefix up to the first token whose running
weight reaches ``trunc(top_p * 2**52)`` (the whole row if none does): a token is in it iff the
mass before it is below ``top_p``, transformers' ``TopPLogitsWarper`` rule. The draw is an
exponential race: the row's generator gives one uniform ``u_i`` per token (the whole row at
every step, whichever path the row takes), and the nucleus token with the largest
``w_i / -log u_i`` wins (float32; ties to the lowest id): token ``i`` wins with probability
``w_i / M``, ``M`` the nucleus weight. Temperature 0 is argmax (the first maximal id), and
draws nothing from the generator.

**Why a race, not one uniform and the inverse CDF.** A padded batch changes the logits by
~1e-6, so a batched row is the single row only up to that noise. An inverse CDF over a flat
row's ~90k nucleus tokens moves whenever the noise shifts a running sum past the uniform: it
did at 3% of the steps of the benchmark's random model, and half of its batched turns then
differed from their single twins. A race's winner moves only when the two best keys lie
within the noise of each other (about 1e-6 of the steps). The uniforms cost one pass over
each row (~0.5 ms per 128k tokens on a CPU core), as ``torch.multinomial``'s own race did.

**Why integers.** Integer sums are exact in any order. So three ways of finding the same
token cannot disagree, not even at a float boundary:

* the *top-k prefilter* (one ``topk`` for all rows, but those that fell back at the previous
  step: :class:`StepState`): when the nucleus ends inside the row's top ``k`` and its last
  token is strictly above the k-th value (no tie crosses the cut), the canonical prefix is
  known from the top-k alone; a trained model's peaked rows end here;
* the *bucket fallback* (CPU): the rows whose nucleus does not fit (a flat distribution, a
  high temperature, ``top_p`` 1) are split into value buckets monotone in ``d``; per-bucket
  weight sums (one ``index_add_``) locate the bucket holding the nucleus' end, and only
  that bucket's few tokens are sorted; the race then runs over the row. A random-weight model
  keeps ~90k tokens in its nucleus: a full sort of 128k tokens per row and step cost more
  than the model's own decode step on a CPU; this costs a few passes over the row;
* the *sort fallback* (GPU, where a batched sort is one kernel and the bucket fallback's
  variable-size gathers would need host syncs): the whole row in canonical order.

``tests/test_sampling.py`` holds all three to a plain full-sort reference, token for token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from transformers import LogitsProcessor

SCALE = 2**52  # the probability grid: weights and their sums stay exact integers below 2**53
TOP_K = 128  # prefilter width: peaked rows of a real model end their nucleus well inside it
BUCKETS = 4096  # value buckets of the CPU fallback, per row
BLOCK = 1024  # the race's blocks of token ids
_NATS = 36.1  # at d < -36.05 a token's weight is 0: no bucket needs to reach further


@dataclass(frozen=True)
class RowGroup:
    """Rows ``start .. start + rows - 1`` of a step: one draw of one dialogue, its settings and
    its generator (``None`` at temperature 0: argmax draws nothing)."""

    start: int
    rows: int
    temperature: float
    top_p: float
    generator: torch.Generator | None = None

    @classmethod
    def seeded(cls, start: int, rows: int, temperature: float, top_p: float, seed: int,
               device: Any) -> "RowGroup":
        """A group with a fresh generator on ``device`` seeded with ``seed`` (a ``Draw.seed``)."""
        if temperature <= 0:
            return cls(start, rows, temperature, top_p)
        generator = torch.Generator(device=device)
        generator.manual_seed(int(seed))
        return cls(start, rows, temperature, top_p, generator)


class StepState:
    """What a :class:`Sampler` carries from one decoding step to the next (speed only: no draw
    depends on it).

    * Which rows took the fallback: they skip the top-k pass next step (a random-weight
      model's rows are flat at every step, and the pass is wasted there); every ``REPROBE``
      steps all rows try it again.
    * Buffers for the whole-row intermediates, reused: a fresh (rows, vocab) tensor costs its
      page faults at every step (several ms for 16 x 128k floats on a CPU), more than the
      arithmetic done in it.
    """

    REPROBE = 16

    def __init__(self) -> None:
        self.flat: torch.Tensor | None = None
        self.step = 0
        self._buffers: dict[str, torch.Tensor] = {}

    def skip(self, rows: int) -> torch.Tensor | None:
        if self.flat is None or len(self.flat) != rows or self.step % self.REPROBE == 0:
            return None
        return self.flat

    def update(self, fell_back: torch.Tensor) -> None:
        self.flat, self.step = fell_back, self.step + 1

    def buffer(self, name: str, shape: Sequence[int], dtype: torch.dtype, device: Any) -> torch.Tensor:
        """An uninitialised tensor of ``shape``, the same storage as last time where it fits."""
        size = math.prod(shape)
        held = self._buffers.get(name)
        if held is None or held.dtype != dtype or held.device != torch.device(device) or held.numel() < size:
            held = self._buffers[name] = torch.empty(size, dtype=dtype, device=device)
        return held[:size].view(*shape)


def draw_tokens(scores: torch.Tensor, groups: Sequence[RowGroup], *, top_k: int = TOP_K,
                fallback: str = "auto", state: StepState | None = None) -> torch.Tensor:
    """The next token of every row of ``scores`` (rows, vocab), as the module docstring defines
    it. Each sampled group takes ``rows x (blocks + BLOCK)`` uniforms from its generator (the
    global one where it has none), whichever path its rows take. ``fallback``: ``"buckets"``, ``"sort"`` or
    ``"auto"`` (sort on CUDA, buckets else). ``state``: carried from step to step by
    :class:`Sampler`."""
    chosen = torch.empty(scores.shape[0], dtype=torch.long, device=scores.device)
    sampled = [g for g in groups if g.temperature > 0]
    for g in groups:
        if g.temperature <= 0:
            chosen[g.start:g.start + g.rows] = scores[g.start:g.start + g.rows].argmax(dim=-1)
    if not sampled:
        return chosen
    device = scores.device
    temps = [g.temperature for g in sampled for _ in range(g.rows)]
    thresholds = torch.tensor([int(min(max(g.top_p, 0.0), 1.0) * SCALE) for g in sampled for _ in range(g.rows)],
                              dtype=torch.long, device=device)
    state = state or StepState()
    width = blocks(scores.shape[-1]) + BLOCK
    log_u = torch.empty(len(temps), width, device=device)
    at = 0
    for g in sampled:  # the race's uniforms, from the row's generator, whichever path the row takes
        torch.rand(g.rows, width, generator=g.generator, out=log_u[at:at + g.rows])
        at += g.rows
    log_u.log_()
    if len(temps) == scores.shape[0]:
        rows, x = slice(None), scores.float()
    else:
        rows = torch.cat([torch.arange(g.start, g.start + g.rows) for g in sampled]).to(device)
        x = scores.float().index_select(0, rows)
    d = shifted(x, torch.tensor(temps, device=device), out=state.buffer("d", x.shape, torch.float32, device))
    tokens, fell_back = nucleus_draw(d, thresholds, log_u, top_k=top_k, fallback=fallback,
                                     skip_top_k=state.skip(len(temps)), state=state)
    state.update(fell_back)
    chosen[rows] = tokens
    return chosen


def blocks(vocab: int) -> int:
    """How many blocks of ``BLOCK`` token ids the race has over a vocabulary."""
    return -(-vocab // BLOCK)


def shifted(x: torch.Tensor, temperatures: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``d = (x - max x) / T`` per row: the log-weights the whole definition is stated on (a
    new tensor, or ``out``; at ``T = 1`` the division, exact, is skipped)."""
    d = torch.sub(x, x.amax(dim=-1, keepdim=True), out=out)
    return d if bool((temperatures == 1).all()) else d.div_(temperatures[:, None])


def nucleus_draw(d: torch.Tensor, thresholds: torch.Tensor, log_u: torch.Tensor, *, top_k: int = TOP_K,
                 fallback: str = "auto", skip_top_k: torch.Tensor | None = None,
                 state: StepState | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``d`` (:func:`shifted` logits, used up), the nucleus token that wins the race
    run with ``log_u`` (per row the logs of ``blocks + BLOCK`` uniforms); ``thresholds``:
    ``trunc(top_p * 2**52)`` per row. Rows in ``skip_top_k`` go straight to the fallback.
    Returns the tokens and which rows took the fallback."""
    state = state or StepState()
    e = torch.exp(d, out=state.buffer("e", d.shape, d.dtype, d.device))
    per_unit = SCALE / e.sum(dim=-1, keepdim=True)  # w = floor(e * per_unit), computed alike everywhere
    tokens = torch.empty(len(d), dtype=torch.long, device=d.device)
    fell_back = torch.ones(len(d), dtype=torch.bool, device=d.device)
    probe = None if skip_top_k is None else (~skip_top_k).nonzero().squeeze(1)
    if probe is None or len(probe) == len(d):
        tokens, ok = _top_k_draw(d, e, per_unit, thresholds, log_u, min(top_k, d.shape[-1]))
        fell_back = ~ok
    elif len(probe):
        found, ok = _top_k_draw(d[probe], e[probe], per_unit[probe], thresholds[probe], log_u[probe],
                                min(top_k, d.shape[-1]))
        tokens[probe], fell_back[probe] = found, ~ok
    if not bool(fell_back.any()):
        return tokens, fell_back
    rest = fell_back.nonzero().squeeze(1)
    if len(rest) < len(d):
        d, e, per_unit, thresholds, log_u = d[rest], e[rest], per_unit[rest], thresholds[rest], log_u[rest]
    use_sort = fallback == "sort" or (fallback == "auto" and d.is_cuda)
    if use_sort:
        tokens[rest] = _sorted_draw(d, e, per_unit, thresholds, log_u)
    else:
        tokens[rest] = _bucketed_draw(d, e, per_unit, thresholds, log_u, state)
    return tokens, fell_back


def _canonical(values: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``values``/``ids`` reordered per row by value descending, ties by id ascending."""
    ids, order = ids.sort(dim=-1)
    values = values.gather(-1, order)
    values, order = values.sort(dim=-1, descending=True, stable=True)
    return values, ids.gather(-1, order)


def _race(block_weights: torch.Tensor, weight_of: Any, log_u: torch.Tensor) -> torch.Tensor:
    """The two-stage race. ``block_weights``: (rows, blocks) float64, each block's nucleus
    weight (exact integers); ``weight_of(block)``: (rows, BLOCK) float64, the nucleus weights of
    that block's ids (0 for the others); ``log_u``: (rows, blocks + BLOCK). Stage one picks the
    block with the largest ``W_b / -log u_b``, stage two the id in it with the largest
    ``w_i / -log u_(blocks + i % BLOCK)``; ties go to the lower block and id, weight 0 never
    wins. P(block) = W_b / M and P(id | block) = w_i / W_b: P(id) = w_i / M."""
    n = block_weights.shape[-1]
    unreachable = torch.tensor(float("inf"), dtype=torch.float64, device=log_u.device)
    first = torch.where(block_weights > 0, block_weights / log_u[:, :n].double(), unreachable).argmin(dim=-1)
    weights = weight_of(first)
    slot = torch.where(weights > 0, weights / log_u[:, n:].double(), unreachable).argmin(dim=-1)
    return first * BLOCK + slot


def _sparse_race(ids: torch.Tensor, weights: torch.Tensor, vocab: int, log_u: torch.Tensor) -> torch.Tensor:
    """:func:`_race` over a few candidates per row: ``ids`` and their nucleus ``weights``
    (float64, 0 for non-members)."""
    block_weights = torch.zeros(len(ids), blocks(vocab), dtype=torch.float64, device=ids.device)
    block_weights.scatter_add_(1, ids // BLOCK, weights)

    def weight_of(block: torch.Tensor) -> torch.Tensor:
        inside = torch.where(ids // BLOCK == block[:, None], weights, 0.0)
        out = torch.zeros(len(ids), BLOCK, dtype=torch.float64, device=ids.device)
        return out.scatter_add_(1, ids % BLOCK, inside)  # adds: an outside id's 0 never overwrites

    return _race(block_weights, weight_of, log_u)


def _dense_race(weights: torch.Tensor, log_u: torch.Tensor) -> torch.Tensor:
    """:func:`_race` over whole rows: ``weights`` (rows, vocab) float64, 0 off the nucleus."""
    n, vocab = weights.shape
    full = vocab // BLOCK * BLOCK
    block_weights = weights[:, :full].unflatten(-1, (vocab // BLOCK, BLOCK)).sum(dim=-1)
    if full < vocab:
        block_weights = torch.cat([block_weights, weights[:, full:].sum(dim=-1, keepdim=True)], dim=-1)

    def weight_of(block: torch.Tensor) -> torch.Tensor:
        ids = block[:, None] * BLOCK + torch.arange(BLOCK, device=weights.device)
        return torch.where(ids < vocab, weights.gather(-1, ids.clamp(max=vocab - 1)), 0.0)

    return _race(block_weights, weight_of, log_u)


def _top_k_draw(d: torch.Tensor, e: torch.Tensor, per_unit: torch.Tensor, thresholds: torch.Tensor,
                log_u: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The draw from each row's top ``k``, and whether it is exact there (nucleus ends inside,
    strictly above the k-th value)."""
    values, ids = d.topk(k, dim=-1)
    values, ids = _canonical(values, ids)
    weights = (e.gather(-1, ids) * per_unit).floor_()
    reached = weights.long().cumsum(dim=-1) >= thresholds[:, None]
    end = reached.long().argmax(dim=-1, keepdim=True)  # first position reaching top_p
    ok = reached[:, -1] & (values.gather(-1, end).squeeze(1) > values[:, -1])
    members = torch.arange(k, device=d.device) <= end
    return _sparse_race(ids, torch.where(members, weights.double(), 0.0), d.shape[-1], log_u), ok


def _sorted_draw(d: torch.Tensor, e: torch.Tensor, per_unit: torch.Tensor, thresholds: torch.Tensor,
                 log_u: torch.Tensor) -> torch.Tensor:
    """The draw from each whole row in canonical order (one batched stable sort)."""
    _, order = d.sort(dim=-1, descending=True, stable=True)
    weights = (e.gather(-1, order) * per_unit).floor_()
    reached = weights.long().cumsum(dim=-1) >= thresholds[:, None]
    end = torch.where(reached[:, -1], reached.long().argmax(dim=-1), d.shape[-1] - 1)[:, None]
    members = torch.arange(d.shape[-1], device=d.device) <= end
    by_id = torch.zeros(d.shape, dtype=torch.float64, device=d.device)
    return _dense_race(by_id.scatter_(1, order, torch.where(members, weights.double(), 0.0)), log_u)


def _bucketed_draw(d: torch.Tensor, e: torch.Tensor, per_unit: torch.Tensor, thresholds: torch.Tensor,
                   log_u: torch.Tensor, state: StepState) -> torch.Tensor:
    """The nucleus located by value buckets: bucket ``b`` is monotone in ``d`` (higher ``d``,
    lower ``b``), so canonical order visits buckets in order and a bucket's weight sum is its
    share of the running weight; only the tokens of the bucket where the running weight reaches
    ``top_p`` are put in canonical order, which gives the nucleus' last token. Buckets are
    numbered across rows (row ``r``: ``r * BUCKETS`` on) so that one ``index_add_`` sums them
    all; the integer weights are summed in float64, exact below 2**53 (float-to-int64 casts of
    whole rows are slow on a CPU). ``e`` is used up."""
    n, vocab = d.shape
    low = d.amin(dim=-1, keepdim=True).neg_()
    span = low.clamp(min=1e-6, max=_NATS)  # a masked id (-inf) or a long tail: capped, and clamped below
    scaled = torch.mul(d, -(BUCKETS - 1) / span, out=state.buffer("scaled", d.shape, d.dtype, d.device))
    if bool((low > span).any()):  # else every value is in [0, BUCKETS - 1] already
        scaled.clamp_(max=BUCKETS - 1)
    bucket = state.buffer("bucket", d.shape, torch.int32, d.device).copy_(scaled)  # truncates, as .int()
    bucket.add_(torch.arange(n, device=d.device, dtype=torch.int32)[:, None] * BUCKETS)
    weights = state.buffer("weights", d.shape, torch.float64, d.device).copy_(e.mul_(per_unit).floor_())
    hist = torch.zeros(n * BUCKETS, dtype=torch.float64, device=d.device)
    cum = hist.index_add_(0, bucket.view(-1), weights.view(-1)).long().view(n, BUCKETS).cumsum(dim=-1)
    bound = torch.minimum(thresholds, cum[:, -1])  # no prefix reaches top_p: the nucleus is the whole row
    end = torch.searchsorted(cum, bound[:, None]).squeeze(1)  # first bucket whose running weight >= bound
    mask = state.buffer("mask", d.shape, torch.bool, d.device)
    last, tied_after = _nucleus_end(d, bucket, weights, cum, end, bound, mask)
    cut = d.gather(-1, last[:, None])
    members = torch.ge(d, cut, out=mask)
    if bool(tied_after.any()):  # tokens tied with the last one but after it in canonical order: out
        members &= (d > cut) | (torch.arange(vocab, device=d.device) <= last[:, None])
    return _dense_race(weights.mul_(members), log_u)


def _nucleus_end(d: torch.Tensor, bucket: torch.Tensor, weights: torch.Tensor, cum: torch.Tensor,
                 which: torch.Tensor, bound: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the first token of its bucket ``which`` in canonical order whose running weight
    reaches ``bound``, and whether a token of equal ``d`` follows it there. The buckets' tokens
    of all rows are gathered at once, padded to the largest bucket."""
    n = d.shape[0]
    rows = torch.arange(n, device=d.device)
    flat = (which + rows * BUCKETS).to(bucket.dtype)
    picked = torch.eq(bucket, flat[:, None], out=mask).nonzero()  # row-major: row, then id ascending
    row, col = picked[:, 0], picked[:, 1]
    counts = torch.bincount(row, minlength=n)
    slot = torch.arange(len(row), device=d.device) - (torch.cumsum(counts, 0) - counts)[row]
    width = int(counts.max())
    ids = torch.zeros(n, width, dtype=torch.long, device=d.device)
    values = torch.full((n, width), -float("inf"), device=d.device)
    ids[row, slot], values[row, slot] = col, d[row, col]
    values, order = values.sort(dim=-1, descending=True, stable=True)  # padding (-inf, weight 0) sorts last
    ids = ids.gather(-1, order)
    real = torch.arange(width, device=d.device) < counts[:, None]
    w = weights.gather(-1, ids).long() * real
    before = torch.where(which > 0, cum.gather(-1, (which - 1).clamp(min=0)[:, None]).squeeze(1), 0)
    at = torch.searchsorted(before[:, None] + w.cumsum(dim=-1), bound[:, None]).clamp_(max=width - 1)
    after = (torch.arange(width, device=d.device) > at) & real & (values == values.gather(-1, at))
    return ids.gather(-1, at).squeeze(1), after.any(dim=-1)


class Sampler(LogitsProcessor):
    """:func:`draw_tokens` as the last logits processor of a ``generate()`` call: it returns
    scores that are 0 at the drawn token and -inf elsewhere, so that greedy search takes it
    (``generate`` then runs with ``do_sample=False``)."""

    def __init__(self, groups: Sequence[RowGroup], top_k: int = TOP_K, fallback: str = "auto"):
        self.groups, self.top_k, self.fallback = list(groups), top_k, fallback
        self.state = StepState()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        chosen = draw_tokens(scores, self.groups, top_k=self.top_k, fallback=self.fallback, state=self.state)
        out = self.state.buffer("one_hot", scores.shape, scores.dtype, scores.device).fill_(-float("inf"))
        return out.scatter_(1, chosen[:, None], 0.0)  # read by generate's argmax before the next step
