"""The one sampler (usersim_ui.inference.sampling): its top-k prefilter and both fallbacks draw,
token for token, what a plain full-sort top-p draw gives with the same uniforms; each dialogue's
rows draw from their own generator whatever else is in the batch; and the distribution is
transformers' temperature + top-p."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from usersim_ui.inference import sampling
from usersim_ui.inference.sampling import (
    SCALE,
    RowGroup,
    StepState,
    draw_tokens,
    nucleus_draw,
    shifted,
)


def reference_draw(d: torch.Tensor, top_p: float, u: float) -> int:
    """The definition, read plainly: one full stable sort of the row (value descending, id
    ascending), integer weights, the nucleus up to the first running weight >= top_p, the
    first running weight above floor(u * M)."""
    e = torch.exp(d)
    weights = (e * (SCALE / e.sum())).long()
    order = torch.sort(d, descending=True, stable=True).indices.tolist()
    w = weights.tolist()
    threshold, running, mass = int(top_p * SCALE), 0, None
    for j in order:
        running += w[j]
        if running >= threshold:
            mass = running
            break
    mass = running if mass is None else mass
    target = min(int(torch.floor(torch.tensor(u, dtype=torch.float64) * mass)), mass - 1)
    running = 0
    for j in order:
        running += w[j]
        if running > target:
            return j
    raise AssertionError("no token drawn")


def python_draw(d: list[float], weights: list[int], top_p: float, u: float) -> int:
    """The same definition without torch's sort: Python's sort on (-value, id)."""
    order = sorted(range(len(d)), key=lambda j: (-d[j], j))
    threshold, running, mass = int(top_p * SCALE), 0, None
    for j in order:
        running += weights[j]
        if mass is None and running >= threshold:
            mass = running
    mass = running if mass is None else mass
    target = min(int(u * mass) if u * mass < mass else mass - 1, mass - 1)
    running = 0
    for j in order:
        running += weights[j]
        if running > target:
            return j
    raise AssertionError("no token drawn")


def mixed_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    """Rows of the kinds a sampler meets: peaked like a trained model's (the nucleus is a few
    tokens: top-k suffices), flat like a random-weight model's (the nucleus is most of the
    vocabulary: the fallback), bf16-rounded (many exact ties), masked ids (-inf), integers."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g)
    kinds = []
    for r in range(rows):
        kind = r % 5
        if kind == 0:
            x[r] = x[r] * 6.0
        elif kind == 1:
            x[r] = x[r] * 0.3
            x[r, 7] += 8.3  # one biased token, as the benchmark's random model has
        elif kind == 2:
            x[r] = (x[r] * 4.0).bfloat16().float()
        elif kind == 3:
            x[r] = x[r] * 5.0
            x[r, :50] = -float("inf")
        else:
            x[r] = torch.round(x[r] * 2.0)
        kinds.append(kind)
    return x


@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.0, 1.6])
@pytest.mark.parametrize("top_p", [0.5, 0.8, 0.95, 1.0])
def test_prefilter_and_fallbacks_equal_the_full_sort_draw(temperature, top_p):
    rows, vocab = 10, 32_000
    x = mixed_logits(rows, vocab, seed=int(temperature * 10) + int(top_p * 100)) * temperature  # kinds kept after T
    d = shifted(x, torch.full((rows,), temperature))
    thresholds = torch.full((rows,), int(top_p * SCALE))
    uniforms = torch.rand(rows, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    expected = [reference_draw(d[r], top_p, float(uniforms[r])) for r in range(rows)]
    e = torch.exp(d)
    _, exact_in_top_k = sampling._top_k_draw(d, e, sampling.SCALE / e.sum(-1, keepdim=True), thresholds, uniforms,
                                             sampling.TOP_K)
    assert not exact_in_top_k.all()  # flat rows fall back (at top_p 1 all but the most peaked)
    if top_p < 1.0:  # and peaked rows end inside the top-k
        assert exact_in_top_k.any()
    for fallback in ("buckets", "sort"):
        got, fell_back = nucleus_draw(d.clone(), thresholds, uniforms, fallback=fallback)
        assert got.tolist() == expected, fallback
        assert fell_back.tolist() == (~exact_in_top_k).tolist()
    skipped, _ = nucleus_draw(d.clone(), thresholds, uniforms, skip_top_k=torch.ones(rows, dtype=torch.bool))
    assert skipped.tolist() == expected  # every row through the bucket fallback
    some = torch.arange(rows) % 3 == 0
    assert nucleus_draw(d.clone(), thresholds, uniforms, skip_top_k=some)[0].tolist() == expected


def test_torch_reference_is_the_plain_definition():
    """The reference above against Python's own sort, including ties and masked ids."""
    x = mixed_logits(10, 2_000, seed=11)
    d = shifted(x, torch.full((10,), 0.9))
    e = torch.exp(d)
    weights = (e * (SCALE / e.sum(-1, keepdim=True))).long()
    for r in range(10):
        for top_p, u in [(0.8, 0.37), (0.95, 0.999), (1.0, 0.0), (0.3, 0.5)]:
            assert reference_draw(d[r], top_p, u) == python_draw(d[r].tolist(), weights[r].tolist(), top_p, u)


def test_each_group_draws_from_its_own_generator():
    """A dialogue's rows draw the same tokens in a batch of others as alone, step after step:
    a row's token depends only on its logits, settings and generator."""
    vocab, steps = 5_000, 6
    specs = [(2, 1.0, 0.8, 5), (1, 0.0, 0.8, 0), (3, 0.7, 0.95, 9), (1, 1.3, 1.0, 2)]
    logits = mixed_logits(7 * steps, vocab, seed=1).view(steps, 7, vocab)

    def groups():
        out, start = [], 0
        for rows, t, p, seed in specs:
            out.append(RowGroup.seeded(start, rows, t, p, seed, "cpu"))
            start += rows
        return out

    together, alone, state = groups(), groups(), StepState()
    for step in range(steps):
        batch = draw_tokens(logits[step], together, state=state)  # as Sampler calls it: flat rows skip the top-k
        for g in alone:
            rows = slice(g.start, g.start + g.rows)
            single = draw_tokens(logits[step][rows], [RowGroup(0, g.rows, g.temperature, g.top_p, g.generator)])
            assert batch[rows].tolist() == single.tolist()
        assert batch[2] == logits[step][2].argmax()  # temperature 0: argmax


def test_distribution_is_transformers_temperature_top_p():
    """Many draws of one small row against the probabilities transformers' warpers leave."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 40, generator=g) * 2.0
    temperature, top_p, draws = 0.8, 0.9, 20_000
    warped = LogitsProcessorList([TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)])(None, x.clone())
    expected = torch.softmax(warped, dim=-1)[0]
    group = RowGroup.seeded(0, draws, temperature, top_p, 123, "cpu")
    tokens = draw_tokens(x.expand(draws, -1), [group])
    counts = torch.bincount(tokens, minlength=40).double() / draws
    assert set(tokens.tolist()) <= set(expected.nonzero().squeeze(1).tolist())  # nothing outside the nucleus
    assert 0.5 * (counts - expected.double()).abs().sum() < 0.02  # total variation


def test_edge_settings():
    x = torch.tensor([[0.0, 3.0, 3.0, -float("inf"), 1.0]])
    tiny = draw_tokens(x, [RowGroup.seeded(0, 1, 1.0, 1e-9, 0, "cpu")])
    assert tiny.item() == 1  # top_p ~ 0: the first canonical token (ties by id)
    one = torch.full((1, 5), -float("inf"))
    one[0, 4] = 0.0
    assert draw_tokens(one, [RowGroup.seeded(0, 1, 1.5, 1.0, 0, "cpu")]).item() == 4
    assert draw_tokens(one, [RowGroup.seeded(0, 1, 1.5, 1.0, 0, "cpu")], fallback="sort").item() == 4
