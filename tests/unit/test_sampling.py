"""Systematic ("wheel of fortune") sampling and the seeded generators (DESIGN §2.1 item 3)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from plumage_ds.estimators import (
    derive_seed,
    inclusion_probabilities,
    sampler_generator,
    systematic_sample,
)

N_DRAWS = 20_000
N_CHECK = 300  # prefix of the batched draws replayed through the real systematic_sample
Z = 5.0  # per-index binomial bound in standard errors (two-sided tail ~6e-7 per index)
PINNED_0_0_0 = 3458162621981714465  # derive_seed values: changing the mixer silently changes every run
PINNED_1_2_3 = 8540368435173492241
PROPERTY = settings(max_examples=100, deadline=None, derandomize=True)


def systematic_from_uniforms(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Independent, batched oracle written from DESIGN §2.1 item 3: ``(N,) u → (N, k)`` indices.

    Index ``i`` is taken when ``[C_{i-1}, C_i)`` holds one of ``u, u+1, …, u+k-1``.
    """
    p64 = p.double()
    k = round(float(p64.sum()))
    cum = torch.cumsum(p64, 0)
    points = u.double()[:, None] + torch.arange(k, dtype=torch.float64)  # (N, k)
    return torch.searchsorted(cum, points.contiguous(), right=True)


def _water_filled() -> torch.Tensor:
    sigma = torch.arange(1, 17, dtype=torch.float64) ** -1.5
    return inclusion_probabilities(sigma, 4)


P_CASES = {
    "water_filled": _water_filled(),
    "zeros_and_ones": torch.tensor([0.0, 1.0, 0.25, 0.0, 0.75, 1.0, 0.5, 0.5, 0.0], dtype=torch.float64),
    "uniform": torch.full((10,), 0.3, dtype=torch.float64),
    "tiny_and_large": torch.tensor([0.01, 0.99, 0.02, 0.98, 0.5, 0.5], dtype=torch.float64),
    "single_certain": torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64),
}


@pytest.mark.parametrize("name", sorted(P_CASES))
def test_marginals_match_p(name):
    """Over 20k draws each index is picked with frequency p_i (binomial 5-sigma; exact for p in {0, 1})."""
    p = P_CASES[name]
    k = round(float(p.sum()))
    u = torch.rand(N_DRAWS, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    S = systematic_from_uniforms(p, u)  # (N, k)
    # the batched oracle *is* N sequential systematic_sample calls on one generator (checked on a prefix)
    gen = torch.Generator().manual_seed(11)
    assert torch.equal(torch.stack([systematic_sample(p, gen) for _ in range(N_CHECK)]), S[:N_CHECK])
    assert S.shape == (N_DRAWS, k)
    assert bool((S[:, 1:] > S[:, :-1]).all()), "indices must be distinct and sorted"
    freq = torch.bincount(S.flatten(), minlength=p.numel()).double() / N_DRAWS
    bound = Z * torch.sqrt(p * (1 - p) / N_DRAWS)
    assert bool(((freq - p).abs() <= bound).all()), f"freq={freq.tolist()} p={p.tolist()}"
    assert bool((freq[p == 0] == 0).all()) and bool((freq[p == 1] == 1).all())


@st.composite
def probability_vectors(draw):
    """Valid designs: water-filled probabilities of arbitrary non-negative spectra."""
    sigma = draw(
        st.lists(
            st.one_of(st.just(0.0), st.floats(1e-4, 1e4), st.sampled_from([1.0, 2.0])),
            min_size=1,
            max_size=40,
        )
    )
    rank = draw(st.integers(1, len(sigma)))
    return inclusion_probabilities(torch.tensor(sigma, dtype=torch.float64), rank)


@PROPERTY
@given(p=probability_vectors(), seed=st.integers(0, 2**31 - 1))
def test_draw_is_k_distinct_sorted_indices(p, seed):
    """Every draw is round(sum p) distinct sorted int64 indices, never a p=0 one, always every p=1 one."""
    S = systematic_sample(p, torch.Generator().manual_seed(seed))
    k = round(float(p.sum()))
    assert S.dtype == torch.int64 and S.shape == (k,)
    assert bool((S[1:] > S[:-1]).all())
    assert bool((p[S] > 0).all())
    assert set(torch.nonzero(p == 1).flatten().tolist()) <= set(S.tolist())


@pytest.mark.parametrize("u", [0.0, 1.0 - 2.0**-50, 1.0 - 2.0**-53], ids=["u_min", "u_in_gap", "u_max"])
def test_extreme_uniforms_never_pick_zero_probability(monkeypatch, u):
    """At the ends of u's range [0, 1) the sample skips leading and trailing p=0 indices."""
    # A design whose float cumsum, rescaled to k = 6, ends at 6 - 2**-50 on the last positive
    # entry: u_in_gap puts u + 5 exactly there, and u_max makes u + 5 round up to 6.0.
    p = torch.tensor(
        [0.037639677867449574, 0.6694851291500639, 0.6277700908913816, 0.6415908249644058,
         0.3501737756081321, 0.05803460565386477, 0.5268044350255917, 0.03925699165986011,
         0.08550409472136887, 0.08624214623649966, 0.10484406338946714, 0.4839892478132253,
         0.2094744266364323, 0.5057493621078295, 0.26685711763494974, 0.45873296247284795,
         0.6544937812154359, 0.19335726695119357, 0.0, 0.0],
        dtype=torch.float64,
    )  # fmt: skip
    p = torch.cat([torch.zeros(2, dtype=torch.float64), p])
    assert float(torch.cumsum(p, 0)[-3] * (6 / float(torch.cumsum(p, 0)[-1]))) < 6  # the gap exists
    with monkeypatch.context() as patch:
        patch.setattr(torch, "rand", lambda *a, **kw: torch.full((), u, dtype=torch.float64))
        S = systematic_sample(p, torch.Generator().manual_seed(0))
    assert S.shape == (6,)
    assert bool((p[S] > 0).all()), f"picked zero-probability index in {S.tolist()}"


def test_zeros_never_and_ones_always_with_real_sampler():
    """Through the real sampler and per-draw generators, p=0 is never picked and p=1 always."""
    p = P_CASES["zeros_and_ones"]
    zeros, ones = set(torch.nonzero(p == 0).flatten().tolist()), set(torch.nonzero(p == 1).flatten().tolist())
    for draw in range(500):
        S = set(systematic_sample(p, sampler_generator(3, 9, draw)).tolist())
        assert not S & zeros and ones <= S


@pytest.mark.parametrize(
    ("p", "match"),
    [
        (torch.tensor([0.5, 0.7], dtype=torch.float64), r"sum\(p\)=1\.2 must be a positive integer"),
        (torch.tensor([0.2, 0.2], dtype=torch.float64), r"sum\(p\)=0\.4 must be a positive integer"),
        (torch.zeros(4), r"sum\(p\)=0\.0 must be a positive integer"),
        (torch.tensor([1.5, 0.5]), r"p\[0\]=1\.5, every probability must be in \[0, 1\]"),
        (torch.tensor([0.6, -0.2, 0.6]), r"p\[1\]=-0\.2\d*, every probability must be in \[0, 1\]"),
        (torch.tensor([0.5, float("nan"), 0.5]), r"p\[1\]=nan, every probability must be in \[0, 1\]"),
        (torch.tensor([float("inf"), 0.0]), r"p\[0\]=inf, every probability must be in \[0, 1\]"),
        (torch.full((2, 2), 0.5), r"p\.shape=\(2, 2\): must be 1-D and non-empty"),
        (torch.zeros(0), r"p\.shape=\(0,\): must be 1-D and non-empty"),
    ],
    ids=["sum_1.2", "sum_0.4", "all_zero", "above_one", "negative", "nan", "inf", "2d", "empty"],
)
def test_bad_p_raises_naming_the_problem(p, match):
    """Invalid designs raise ValueError whose message names the offending value or shape."""
    with pytest.raises(ValueError, match=match):
        systematic_sample(p, torch.Generator().manual_seed(0))


def test_same_generator_seed_gives_same_draw():
    """Two generators from the same (seed, matrix, draw) give the identical sample."""
    p = P_CASES["water_filled"]
    for draw in range(20):
        a = systematic_sample(p, sampler_generator(5, 2, draw))
        b = systematic_sample(p, sampler_generator(5, 2, draw))
        assert torch.equal(a, b)


@pytest.mark.parametrize("changed", [0, 1, 2], ids=["seed", "matrix_id", "draw_index"])
def test_sampler_generator_depends_on_each_component(changed):
    """Changing any one of (seed, matrix_id, draw_index) changes the generator's stream."""
    base = (123, 45, 6)
    ref = sampler_generator(*base)
    ref_u = torch.rand(4, generator=ref, dtype=torch.float64)
    for delta in (1, 2, 1000):
        parts = list(base)
        parts[changed] += delta
        gen = sampler_generator(*parts)
        assert gen.initial_seed() != ref.initial_seed()
        assert not torch.equal(torch.rand(4, generator=gen, dtype=torch.float64), ref_u)


def test_derive_seed_is_ordered_stable_and_63_bit():
    """derive_seed is order-sensitive, in [0, 2**63) and pinned (resumed runs must redraw the same S)."""
    assert derive_seed(1, 2, 3) != derive_seed(2, 1, 3) != derive_seed(1, 3, 2)
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3)
    seeds = {derive_seed(0, m, t) for m in range(50) for t in range(50)}
    assert len(seeds) == 2500 and all(0 <= s < 2**63 for s in seeds)
    assert sampler_generator(1, 2, 3).initial_seed() == derive_seed(1, 2, 3)
    assert derive_seed(0, 0, 0) == PINNED_0_0_0 and derive_seed(1, 2, 3) == PINNED_1_2_3


def test_sampling_leaves_global_rng_untouched():
    """Neither sampler_generator nor systematic_sample consume the global torch RNG."""
    torch.manual_seed(99)
    before = torch.get_rng_state()
    systematic_sample(P_CASES["water_filled"], sampler_generator(0, 0, 0))
    assert torch.equal(before, torch.get_rng_state())
