"""pick_codes, the sampler's last step: temperature, top-k and top-p on known logits, ties, and the distribution it
samples.

pick_codes maps one uniform per row through the inverse CDF of the kept probabilities, sorted largest first. Two
kinds of checks follow from that: evenly spaced uniforms (a quadrature) must reproduce the expected probabilities to
within one draw, and the seeded uniforms the sampler really uses (candidate_uniforms) must give frequencies that pass a
chi-square test against them."""
from __future__ import annotations

import math

import pytest
import torch

from bart_prior.sampling import SamplingOptions, candidate_seed, candidate_uniforms, pick_codes

P = torch.tensor([0.1, 0.4, 0.2, 0.3], dtype=torch.float64)  # code 1 is the favourite, then 3, 2, 0
LOGITS = P.log().float()


def opts(**kw) -> SamplingOptions:
    return SamplingOptions(**kw)


def expected(probs: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None) -> torch.Tensor:
    """The distribution pick_codes should sample, written from the definitions: p^(1/T) renormalised; the top_k
    largest; then the smallest prefix of the largest whose mass reaches top_p (the largest always kept)."""
    q = probs ** (1.0 / temperature)
    q = q / q.sum()
    order = q.argsort(descending=True)
    keep = torch.zeros_like(q, dtype=torch.bool)
    keep[order[: top_k or len(q)]] = True
    q = torch.where(keep, q, torch.zeros_like(q))
    q = q / q.sum()
    if top_p is not None:
        mass = 0.0
        kept = torch.zeros_like(keep)
        for i in q.argsort(descending=True).tolist():
            if q[i] == 0 or (mass >= top_p and kept.any()):
                break
            kept[i] = True
            mass += float(q[i])
        q = torch.where(kept, q, torch.zeros_like(q))
        q = q / q.sum()
    return q


def draw(logits: torch.Tensor, uniforms: torch.Tensor, options: SamplingOptions) -> torch.Tensor:
    """Counts of each code over one pick per uniform."""
    ids = pick_codes(logits.expand(len(uniforms), -1), uniforms, options)
    return torch.bincount(ids, minlength=logits.shape[-1])


def grid(n: int) -> torch.Tensor:
    return (torch.arange(n, dtype=torch.float64) + 0.5) / n


def assert_quadrature(counts: torch.Tensor, want: torch.Tensor) -> None:
    """n evenly spaced uniforms through an inverse CDF: each code gets n x p of them, give or take the one draw that
    straddles a boundary."""
    n = int(counts.sum())
    assert (counts.double() - n * want).abs().max() <= 1, (counts.tolist(), (n * want).tolist())


# ---- exact semantics -------------------------------------------------------------------------------------------
def test_inverse_cdf_over_the_sorted_probabilities():
    # sorted: code 1 (0.4), 3 (0.3), 2 (0.2), 0 (0.1) -> cdf 0.4, 0.7, 0.9, 1.0
    u = torch.tensor([0.0, 0.39, 0.41, 0.69, 0.71, 0.89, 0.91, 0.999999], dtype=torch.float64)
    picked = pick_codes(LOGITS.expand(len(u), -1), u, opts())
    assert picked.tolist() == [1, 1, 3, 3, 2, 2, 0, 0]


def test_greedy_picks_the_largest_and_the_first_of_tied_largest():
    logits = torch.tensor([[0.5, 3.0, 3.0, -1.0], [2.0, 0.0, 0.0, 2.0], [-5.0, -4.0, -6.0, -7.0]])
    u = torch.tensor([0.99, 0.5, 0.0], dtype=torch.float64)
    assert pick_codes(logits, u, opts(temperature=0)).tolist() == [1, 0, 1]  # the uniforms play no part


def test_rows_are_independent():
    logits = torch.stack([LOGITS, LOGITS.flip(0), torch.tensor([0.0, 0.0, 9.0, 0.0])])
    u = torch.tensor([0.05, 0.05, 0.5], dtype=torch.float64)
    assert pick_codes(logits, u, opts()).tolist() == [1, 2, 2]


def test_masked_codes_are_never_picked_even_at_the_top_of_the_cdf():
    logits = torch.tensor([0.0, float("-inf"), 1.0, float("-inf")])
    u = torch.tensor([0.0, 0.5, 1.0 - 1e-12], dtype=torch.float64)
    assert set(pick_codes(logits.expand(3, -1), u, opts()).tolist()) <= {0, 2}


def test_top_k_keeps_the_k_largest_and_clamps_to_the_vocabulary():
    assert_quadrature(draw(LOGITS, grid(1000), opts(top_k=2)), torch.tensor([0, 4 / 7, 0, 3 / 7]))
    assert torch.equal(draw(LOGITS, grid(1000), opts(top_k=1)), torch.tensor([0, 1000, 0, 0]))
    assert torch.equal(draw(LOGITS, grid(1000), opts(top_k=99)), draw(LOGITS, grid(1000), opts()))


@pytest.mark.parametrize("top_p, kept", [(1e-9, [1]), (0.35, [1]), (0.45, [1, 3]), (0.65, [1, 3]),
                                         (0.75, [1, 3, 2]), (0.95, [1, 3, 2, 0]), (1.0, [1, 3, 2, 0])])
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_p, kept):
    counts = draw(LOGITS, grid(10000), opts(top_p=top_p))
    assert sorted(torch.nonzero(counts).flatten().tolist()) == sorted(kept)
    assert_quadrature(counts, expected(P, top_p=top_p))


def test_top_k_then_top_p_on_the_renormalised_rest():
    # top_k=3 leaves 0.4, 0.3, 0.2 -> 4/9, 3/9, 2/9; top_p=0.5 then keeps 4/9 + 3/9 (4/9 alone is short of 0.5)
    assert_quadrature(draw(LOGITS, grid(7000), opts(top_k=3, top_p=0.5)), torch.tensor([0, 4 / 7, 0, 3 / 7]))
    assert torch.allclose(expected(P, top_k=3, top_p=0.5), torch.tensor([0, 4 / 7, 0, 3 / 7], dtype=torch.float64))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 10.0])
def test_temperature_sharpens_and_flattens(temperature):
    counts = draw(LOGITS, grid(20000), opts(temperature=temperature))
    assert_quadrature(counts, expected(P, temperature=temperature))
    assert counts.argsort(descending=True).tolist() == [1, 3, 2, 0]  # the order of the codes never changes


def test_temperature_scales_the_logits_not_the_probabilities():
    """T=2 samples p^(1/2): with p = (0.8, 0.2) that is (2/3, 1/3), not (0.8, 0.2) and not (0.5, 0.5)."""
    logits = torch.tensor([0.8, 0.2], dtype=torch.float64).log().float()
    assert_quadrature(draw(logits, grid(3000), opts(temperature=2.0)), torch.tensor([2 / 3, 1 / 3]))


# ---- ties ------------------------------------------------------------------------------------------------------
def test_tied_codes_share_their_mass_equally():
    logits = torch.tensor([2.0, 2.0, 2.0, 0.0])
    tied = math.exp(2) / (3 * math.exp(2) + 1)
    assert_quadrature(draw(logits, grid(30000), opts()), torch.tensor([tied, tied, tied, 1 - 3 * tied]))


@pytest.mark.parametrize("options", [dict(top_k=2), dict(top_p=0.5)], ids=["top_k", "top_p"])
def test_a_cut_through_tied_codes_keeps_that_many_and_splits_evenly(options):
    """Which of the tied codes survive a cut is not defined, but how many and what they get is: two of the three
    tied codes, half each."""
    logits = torch.tensor([1.0, 1.0, 1.0, 1.0]) if "top_p" in options else torch.tensor([2.0, 2.0, 2.0, 0.0])
    counts = draw(logits, grid(4000), opts(**options))
    kept = torch.nonzero(counts).flatten().tolist()
    assert len(kept) == 2 and all(abs(c - 2000) <= 1 for c in counts[kept].tolist())
    if "top_k" in options:
        assert 3 not in kept  # the smaller logit is never among the top 2


# ---- the distribution of the sampler's own uniforms ------------------------------------------------------------
def chi_square_limit(df: int, z: float = 4.753) -> float:
    """The chi-square quantile at 1 - 1e-6 (z: the normal quantile), by the Wilson-Hilferty approximation, which is
    within a few percent for df >= 1. A test at this level fails by chance once in a million runs."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("options", [dict(), dict(temperature=0.7), dict(temperature=1.5, top_k=3),
                                     dict(top_p=0.8), dict(top_k=3, top_p=0.6)],
                         ids=["plain", "T0.7", "T1.5-k3", "p0.8", "k3-p0.6"])
def test_sampled_frequencies_match_the_distribution(options):
    n = 20000
    seeds = [candidate_seed(7, 0, c) for c in range(n)]
    uniforms = candidate_uniforms(seeds, 1)[:, 0]
    counts = draw(LOGITS, uniforms, opts(**options)).double()
    want = expected(P, **options)
    assert torch.all(counts[want == 0] == 0)  # nothing outside the kept set
    kept = want > 0
    stat = float((((counts - n * want) ** 2) / (n * want))[kept].sum())
    df = int(kept.sum()) - 1
    if df == 0:
        assert counts[kept].item() == n
    else:
        assert stat < chi_square_limit(df), (stat, counts.tolist(), (n * want).tolist())


def test_the_chi_square_check_would_catch_a_wrong_distribution():
    """The same test against a slightly wrong expectation (a 2-point shift) must fail: it has the power to see it."""
    n = 20000
    uniforms = candidate_uniforms([candidate_seed(7, 0, c) for c in range(n)], 1)[:, 0]
    counts = draw(LOGITS, uniforms, opts()).double()
    wrong = torch.tensor([0.12, 0.38, 0.2, 0.3], dtype=torch.float64)
    stat = float(((counts - n * wrong) ** 2 / (n * wrong)).sum())
    assert stat > chi_square_limit(3)
