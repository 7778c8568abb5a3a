"""The one sampler of every in-process draw: temperature and top-p (nucleus) over all rows of a
decoding step in one call, each dialogue's rows drawn from its own seeded ``torch.Generator``.

A single dialogue's turn (``generation.sample``), a batch of dialogues (``users.batched``) and
the test completions server all draw through :class:`Sampler`, so a row's token depends only
on its logits, its settings and its generator's state: a batched turn is the turn its seed
gives alone, by construction (up to the float noise a padded batch puts in the logits).

**The distribution, defined once.** For a row with logits ``x``, temperature ``T`` and
``top_p``: ``d = (x - max x) / T``; ``e = exp(d)`` over the whole row; each token's weight is
``w = trunc(e * 2**52 / sum(e))``, an integer (a probability on a 2**-52 grid; a token below
2**-52 has weight 0 and is never drawn, at most V * 2**-52 ~ 3e-11 of mass in all). Tokens are
ordered by ``d`` descending, ties by token id ascending (the *canonical order*). The nucleus is
the canonical prefix up to the first token whose running weight reaches
``trunc(top_p * 2**52)`` (the whole row if none does): a token is in it iff the mass before
it is below ``top_p``, transformers' ``TopPLogitsWarper`` rule. The draw takes ``u`` from the
row's generator, ``t = floor(u * M)`` with ``M`` the nucleus weight, and returns the first
canonical token whose running weight exceeds ``t`` (inverse CDF). Temperature 0 is argmax
(the first maximal id), and draws nothing from the generator.

**Why integers.** Integer sums are exact in any order. So three ways of finding the same
token cannot disagree, not even at a float boundary:

* the *top-k prefilter* (every row, one ``topk`` for all rows): when the nucleus ends inside
  the row's top ``k`` and its last token is strictly above the k-th value (no tie crosses the
  cut), the canonical prefix is known from the top-k alone; real models' peaked rows end here;
* the *bucket fallback* (CPU): the rows whose nucleus does not fit (a flat distribution, a
  high temperature, ``top_p`` 1) are split into value buckets monotone in ``z``; per-bucket
  weight sums (one ``scatter_add``) locate the bucket holding the nucleus' end and the one
  holding the draw, and only those two buckets' few tokens are sorted. A random-weight model
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
_NATS = 36.1  # below max(z) - 36.05 a token's weight is 0: no bucket needs to reach further


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
    it. Each sampled group takes ``rows`` uniforms from its generator (the global one where it
    has none), whichever path its rows take. ``fallback``: ``"buckets"``, ``"sort"`` or
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
    uniforms = torch.cat([torch.rand(g.rows, generator=g.generator, dtype=torch.float64,
                                     device=g.generator.device if g.generator is not None else "cpu").to(device)
                          for g in sampled])
    if len(temps) == scores.shape[0]:
        rows, x = slice(None), scores.float()
    else:
        rows = torch.cat([torch.arange(g.start, g.start + g.rows) for g in sampled]).to(device)
        x = scores.float().index_select(0, rows)
    state = state or StepState()
    d = shifted(x, torch.tensor(temps, device=device), out=state.buffer("d", x.shape, torch.float32, device))
    tokens, fell_back = nucleus_draw(d, thresholds, uniforms, top_k=top_k, fallback=fallback,
                                     skip_top_k=state.skip(len(temps)), state=state)
    state.update(fell_back)
    chosen[rows] = tokens
    return chosen


def shifted(x: torch.Tensor, temperatures: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``d = (x - max x) / T`` per row: the log-weights the whole definition is stated on (a
    new tensor, or ``out``; at ``T = 1`` the division, exact, is skipped)."""
    d = torch.sub(x, x.amax(dim=-1, keepdim=True), out=out)
    return d if bool((temperatures == 1).all()) else d.div_(temperatures[:, None])


def nucleus_draw(d: torch.Tensor, thresholds: torch.Tensor, uniforms: torch.Tensor, *, top_k: int = TOP_K,
                 fallback: str = "auto", skip_top_k: torch.Tensor | None = None,
                 state: StepState | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``d`` (:func:`shifted` logits, used up), the token the inverse CDF of its
    nucleus gives at ``uniforms`` (float64 in [0, 1)); ``thresholds``: ``trunc(top_p * 2**52)``
    per row. Rows in ``skip_top_k`` go straight to the fallback. Returns the tokens and which
    rows took the fallback."""
    state = state or StepState()
    e = torch.exp(d, out=state.buffer("e", d.shape, d.dtype, d.device))
    per_unit = SCALE / e.sum(dim=-1, keepdim=True)  # w = trunc(e * per_unit), computed alike everywhere
    tokens = torch.empty(len(d), dtype=torch.long, device=d.device)
    fell_back = torch.ones(len(d), dtype=torch.bool, device=d.device)
    probe = None if skip_top_k is None else (~skip_top_k).nonzero().squeeze(1)
    if probe is None or len(probe) == len(d):
        tokens, ok = _top_k_draw(d, e, per_unit, thresholds, uniforms, min(top_k, d.shape[-1]))
        fell_back = ~ok
    elif len(probe):
        found, ok = _top_k_draw(d[probe], e[probe], per_unit[probe], thresholds[probe], uniforms[probe],
                                min(top_k, d.shape[-1]))
        tokens[probe], fell_back[probe] = found, ~ok
    if not bool(fell_back.any()):
        return tokens, fell_back
    rest = fell_back.nonzero().squeeze(1)
    if len(rest) < len(d):
        d, e, per_unit, thresholds, uniforms = d[rest], e[rest], per_unit[rest], thresholds[rest], uniforms[rest]
    use_sort = fallback == "sort" or (fallback == "auto" and d.is_cuda)
    if use_sort:
        tokens[rest] = _sorted_draw(d, e, per_unit, thresholds, uniforms)
    else:
        tokens[rest] = _bucketed_draw(d, e, per_unit, thresholds, uniforms, state)
    return tokens, fell_back


def _canonical(values: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``values``/``ids`` reordered per row by value descending, ties by id ascending."""
    ids, order = ids.sort(dim=-1)
    values = values.gather(-1, order)
    values, order = values.sort(dim=-1, descending=True, stable=True)
    return values, ids.gather(-1, order)


def _target(mass: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """``floor(u * M)``, below ``M``: the running weight the drawn token's must exceed."""
    t = torch.floor(uniforms * mass.to(torch.float64)).to(torch.long)
    return torch.minimum(t, mass - 1)


def _top_k_draw(d: torch.Tensor, e: torch.Tensor, per_unit: torch.Tensor, thresholds: torch.Tensor,
                uniforms: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The draw from each row's top ``k``, and whether it is exact there (nucleus ends inside,
    strictly above the k-th value)."""
    values, ids = d.topk(k, dim=-1)
    values, ids = _canonical(values, ids)
    cum = (e.gather(-1, ids) * per_unit).long().cumsum(dim=-1)
    reached = cum >= thresholds[:, None]
    end = reached.long().argmax(dim=-1, keepdim=True)  # first position reaching top_p
    ok = reached[:, -1] & (values.gather(-1, end).squeeze(1) > values[:, -1])
    mass = cum.gather(-1, end).squeeze(1)
    at = torch.searchsorted(cum, _target(mass, uniforms)[:, None], right=True).clamp_(max=k - 1)
    return ids.gather(-1, at).squeeze(1), ok


def _sorted_draw(d: torch.Tensor, e: torch.Tensor, per_unit: torch.Tensor, thresholds: torch.Tensor,
                 uniforms: torch.Tensor) -> torch.Tensor:
    """The draw from each whole row in canonical order (one batched stable sort)."""
    _, order = d.sort(dim=-1, descending=True, stable=True)
    cum = (e.gather(-1, order) * per_unit).long().cumsum(dim=-1)
    reached = cum >= thresholds[:, None]
    end = reached.long().argmax(dim=-1, keepdim=True)
    mass = torch.where(reached[:, -1], cum.gather(-1, end).squeeze(1), cum[:, -1])
    at = torch.searchsorted(cum, _target(mass, uniforms)[:, None], right=True)
    return order.gather(-1, at).squeeze(1)


def _bucketed_draw(d: torch.Tensor, e: torch.Tensor, per_unit: torch.Tensor, thresholds: torch.Tensor,
                   uniforms: torch.Tensor, state: StepState) -> torch.Tensor:
    """The draw located by value buckets: bucket ``b`` is monotone in ``d`` (higher ``d``, lower
    ``b``), so canonical order visits buckets in order and a bucket's weight sum is its share of
    the running weight; only the tokens of the bucket where a running weight crosses a bound
    are put in canonical order. Buckets are numbered across rows (row ``r``: ``r * BUCKETS``
    on) so that one ``index_add_`` sums them all; the integer weights are summed in float64,
    exact below 2**53 (float-to-int64 casts of whole rows are slow on a CPU). ``e`` is used up."""
    n = d.shape[0]
    low = d.amin(dim=-1, keepdim=True).neg_()
    span = low.clamp(min=1e-6, max=_NATS)  # a masked id (-inf) or a long tail: capped, and clamped below
    scaled = torch.mul(d, -(BUCKETS - 1) / span, out=state.buffer("scaled", d.shape, d.dtype, d.device))
    if bool((low > span).any()):  # else every value is in [0, BUCKETS - 1] already
        scaled.clamp_(max=BUCKETS - 1)
    bucket = state.buffer("bucket", d.shape, torch.int32, d.device).copy_(scaled)  # truncates, as .int()
    bucket.add_(torch.arange(n, device=d.device, dtype=torch.int32)[:, None] * BUCKETS)
    e.mul_(per_unit).floor_()  # floor: trunc for these non-negative values, and vectorised
    weights = state.buffer("weights", d.shape, torch.float64, d.device).copy_(e)
    hist = torch.zeros(n * BUCKETS, dtype=torch.float64, device=d.device)
    cum = hist.index_add_(0, bucket.view(-1), weights.view(-1)).long().view(n, BUCKETS).cumsum(dim=-1)
    total = cum[:, -1]
    bound = torch.minimum(thresholds, total)  # no prefix reaches top_p: the nucleus is the whole row
    end = torch.searchsorted(cum, bound[:, None]).squeeze(1)  # first bucket whose running weight >= bound
    mask = state.buffer("mask", d.shape, torch.bool, d.device)
    mass, _ = _within(d, bucket, weights, cum, end, bound, True, mask)
    target = _target(mass, uniforms)
    at = torch.searchsorted(cum, target[:, None], right=True).squeeze(1)  # first bucket > target
    return _within(d, bucket, weights, cum, at, target, False, mask)[1]


def _within(d: torch.Tensor, bucket: torch.Tensor, weights: torch.Tensor, cum: torch.Tensor, which: torch.Tensor,
            bound: torch.Tensor, inclusive: bool, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the first token of its bucket ``which`` in canonical order whose running weight
    reaches ``bound`` (``>=`` if ``inclusive``, else ``>``): that running weight and the token.
    The buckets' tokens of all rows are gathered at once, padded to the largest bucket."""
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
    w = weights.gather(-1, ids).long() * (values > -float("inf"))
    before = torch.where(which > 0, cum.gather(-1, (which - 1).clamp(min=0)[:, None]).squeeze(1), 0)
    running = before[:, None] + w.cumsum(dim=-1)
    at = torch.searchsorted(running, bound[:, None], right=not inclusive).clamp_(max=width - 1)
    return running.gather(-1, at).squeeze(1), ids.gather(-1, at).squeeze(1)


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
