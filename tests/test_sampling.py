"""The one sampler (usersim_ui.inference.sampling): its top-k prefilter and both fallbacks draw,
token for token, what a plain full-sort top-p draw gives with the same uniforms; each dialogue's
rows draw from their own generator whatever else is in the batch; a draw survives the float
noise a padded batch puts in the logits; and the distribution is transformers' temperature +
top-p."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from usersim_ui.inference import sampling
from usersim_ui.inference.sampling import (
    BLOCK,
    SCALE,
    RowGroup,
    StepState,
    blocks,
    draw_tokens,
    nucleus_draw,
    shifted,
)


def race(member_weights: dict[int, int], vocab: int, log_u: list[float]) -> int:
    """The two-stage race, read plainly: the block of BLOCK ids with the largest W / -log u
    (its first uniforms), then in it the id with the largest w / -log u (the next BLOCK);
    ties to the lower block and id; weight 0 never wins."""
    n = blocks(vocab)
    totals = [0] * n
    for j, w in member_weights.items():
        totals[j // BLOCK] += w
    block = min((b for b in range(n) if totals[b] > 0), key=lambda b: (totals[b] / log_u[b], b))
    inside = [(j, w) for j, w in member_weights.items() if j // BLOCK == block and w > 0]
    return min(inside, key=lambda jw: (jw[1] / log_u[n + jw[0] % BLOCK], jw[0]))[0]


def reference_draw(d: torch.Tensor, top_p: float, log_u: torch.Tensor) -> int:
    """The definition, read plainly: one full stable sort of the row (value descending, id
    ascending), integer weights, the nucleus up to the first running weight >= top_p, then the
    race over it."""
    e = torch.exp(d)
    w = (e * (SCALE / e.sum())).floor().long().tolist()
    threshold, running, members = int(top_p * SCALE), 0, {}
    for j in torch.sort(d, descending=True, stable=True).indices.tolist():
        members[j] = w[j]
        running += w[j]
        if running >= threshold:
            break
    return race(members, len(w), log_u.tolist())


def python_draw(d: list[float], weights: list[int], top_p: float, log_u: list[float]) -> int:
    """The same definition without torch's sort: Python's sort on (-value, id)."""
    threshold, running, members = int(top_p * SCALE), 0, {}
    for j in sorted(range(len(d)), key=lambda j: (-d[j], j)):
        members[j] = weights[j]
        running += weights[j]
        if running >= threshold:
            break
    return race(members, len(d), log_u)


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
    log_u = torch.rand(rows, blocks(vocab) + BLOCK, generator=torch.Generator().manual_seed(3)).log_()
    expected = [reference_draw(d[r], top_p, log_u[r]) for r in range(rows)]
    e = torch.exp(d)
    _, exact_in_top_k = sampling._top_k_draw(d, e, sampling.SCALE / e.sum(-1, keepdim=True), thresholds, log_u,
                                             sampling.TOP_K)
    assert not exact_in_top_k.all()  # flat rows fall back (at top_p 1 all but the most peaked)
    if top_p < 1.0:  # and peaked rows end inside the top-k
        assert exact_in_top_k.any()
    for fallback in ("buckets", "sort"):
        got, fell_back = nucleus_draw(d.clone(), thresholds, log_u, fallback=fallback)
        assert got.tolist() == expected, fallback
        assert fell_back.tolist() == (~exact_in_top_k).tolist()
    skipped, _ = nucleus_draw(d.clone(), thresholds, log_u, skip_top_k=torch.ones(rows, dtype=torch.bool))
    assert skipped.tolist() == expected  # every row through the bucket fallback
    some = torch.arange(rows) % 3 == 0
    assert nucleus_draw(d.clone(), thresholds, log_u, skip_top_k=some)[0].tolist() == expected


def test_torch_reference_is_the_plain_definition():
    """The reference above against Python's own sort, including ties and masked ids."""
    x = mixed_logits(10, 2_000, seed=11)
    d = shifted(x, torch.full((10,), 0.9))
    e = torch.exp(d)
    weights = (e * (SCALE / e.sum(-1, keepdim=True))).floor()
    for r in range(10):
        for top_p, seed in [(0.8, 1), (0.95, 2), (1.0, 3), (0.3, 4)]:
            log_u = torch.rand(blocks(2_000) + BLOCK, generator=torch.Generator().manual_seed(seed)).log_()
            assert reference_draw(d[r], top_p, log_u) == python_draw(d[r].tolist(), weights[r].long().tolist(),
                                                                      top_p, log_u.tolist())


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


def test_a_draw_survives_the_float_noise_of_a_padded_batch():
    """A batched row's logits differ from the single row's by ~1e-6. On a flat row (a random
    model's: ~90k tokens in the nucleus) an inverse CDF drawn with the same uniform moved at 3%
    of the steps; the race moves only when its two best keys are that close."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 128_257, generator=g) * 0.32
    x[0, 128009] += 8.3
    noisy = x + torch.randn(x.shape, generator=g) * 1e-6
    moved = 0
    for seed in range(200):
        a = draw_tokens(x, [RowGroup.seeded(0, 1, 1.0, 0.8, seed, "cpu")])
        b = draw_tokens(noisy, [RowGroup.seeded(0, 1, 1.0, 0.8, seed, "cpu")])
        moved += int(a != b)
    assert moved <= 1


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
