"""Water-filling inclusion probabilities (DESIGN §2.1 item 2): properties, edge cases, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from plumage_ds.estimators import estimator_variance, inclusion_probabilities, is_deterministic

PROPERTY = settings(max_examples=100, deadline=None, derandomize=True)

# Values mix exact zeros, ties (a small pool of repeated values) and a wide dynamic range.
sigma_values = st.one_of(st.just(0.0), st.sampled_from([0.5, 1.0, 3.0]), st.floats(1e-6, 1e6))
sigmas = st.lists(sigma_values, min_size=1, max_size=32).map(lambda v: torch.tensor(v, dtype=torch.float64))
positive_sigmas = st.lists(
    st.one_of(st.sampled_from([0.5, 1.0, 3.0]), st.floats(1e-3, 1e3)), min_size=2, max_size=24
).map(lambda v: torch.tensor(v, dtype=torch.float64))


@st.composite
def designs(draw, regime: str = "any"):
    """``(σ, rank)`` pairs; ``regime`` "random" (> r positive σ) or "deficient" (<= r positive σ)."""
    if regime == "random":
        sigma = draw(sigmas.filter(lambda v: int((v > 0).sum()) >= 2))
        return sigma, draw(st.integers(1, int((sigma > 0).sum()) - 1))
    sigma = draw(sigmas)
    if regime == "deficient":
        return sigma, draw(st.integers(max(1, int((sigma > 0).sum())), sigma.numel() + 8))
    return sigma, draw(st.integers(1, sigma.numel() + 8))


def _cases(sigma: torch.Tensor, rank: int) -> tuple[int, int]:
    """``(r, #positive)`` with ``r = min(rank, d)``."""
    return min(rank, sigma.numel()), int((sigma > 0).sum())


def _variance(sigma: torch.Tensor, q: torch.Tensor) -> float:
    return float((sigma**2 * (1 / q - 1)).sum())


@PROPERTY
@given(case=designs())
def test_sum_is_min_rank_d(case):
    """Σ p_i = min(rank, d) to 1e-9, returned as float64 aligned with σ."""
    sigma, rank = case
    p = inclusion_probabilities(sigma, rank)
    assert p.dtype == torch.float64 and p.shape == sigma.shape
    assert abs(float(p.sum()) - min(rank, sigma.numel())) <= 1e-9


@PROPERTY
@given(case=designs())
def test_bounds_and_zero_on_null_directions(case):
    """0 <= p <= 1; with more positive σ than r: p > 0 exactly where σ > 0 and p = 0 where σ = 0."""
    sigma, rank = case
    p = inclusion_probabilities(sigma, rank)
    assert bool(((p >= 0) & (p <= 1)).all())
    r, positive = _cases(sigma, rank)
    if positive > r:
        assert bool((p[sigma > 0] > 0).all())
        assert bool((p[sigma == 0] == 0).all())
        assert not is_deterministic(p)


@PROPERTY
@given(case=designs("random"))
def test_single_water_level(case):
    """p_i = min(1, c·σ_i) for one c, which also saturates the p_i = 1 entries (c·σ_i >= 1)."""
    sigma, rank = case
    p = inclusion_probabilities(sigma, rank)
    free = (p < 1) & (sigma > 0)
    assert bool(free.any())  # sum r over > r positive values leaves one unsaturated
    c = float((p[free] / sigma[free]).max())
    assert torch.allclose(p, torch.clamp(c * sigma, max=1.0), rtol=1e-12, atol=1e-15)
    assert bool((c * sigma[p == 1] >= 1 - 1e-12).all())
    assert torch.allclose(p[free] / sigma[free], torch.full_like(p[free], c), rtol=1e-12)


@PROPERTY
@given(case=designs())
def test_monotone_and_ties_equal(case):
    """σ_i > σ_j ⇒ p_i >= p_j, and equal positive σ get bitwise-equal p."""
    sigma, rank = case
    p = inclusion_probabilities(sigma, rank)
    bigger = sigma[:, None] > sigma[None, :]
    assert bool((p[:, None] >= p[None, :])[bigger].all())
    tied = (sigma[:, None] == sigma[None, :]) & (sigma[:, None] > 0)
    assert bool((p[:, None] == p[None, :])[tied].all())


@PROPERTY
@given(data=st.data(), case=designs())
def test_permutation_equivariant(data, case):
    """Shuffling σ shuffles p the same way (bitwise)."""
    sigma, rank = case
    r, positive = _cases(sigma, rank)
    # With fewer positives than r < d, *which* zero directions fill the top r is an
    # arbitrary (index-stable) tie-break, so equivariance is only asked for elsewhere.
    assume(not positive < r < sigma.numel())
    perm = torch.tensor(data.draw(st.permutations(range(sigma.numel()))), dtype=torch.long)
    assert torch.equal(inclusion_probabilities(sigma[perm], rank), inclusion_probabilities(sigma, rank)[perm])


@PROPERTY
@given(case=designs("deficient"))
def test_rank_deficient_is_deterministic_top_r(case):
    """With <= r positive σ (or r >= d): every positive σ gets p = 1, exactly r ones, deterministic."""
    sigma, rank = case
    r, _ = _cases(sigma, rank)
    p = inclusion_probabilities(sigma, rank)
    assert is_deterministic(p)
    assert bool((p[sigma > 0] == 1).all())
    assert int((p == 1).sum()) == r


@PROPERTY
@given(data=st.data(), sigma=positive_sigmas)
def test_minimum_variance_over_feasible_designs(data, sigma):
    """No feasible design q (Σq = r, 0 < q <= 1) has Σσ²(1/q − 1) below the water-filling one."""
    d = sigma.numel()
    rank = data.draw(st.integers(1, d - 1))
    p = inclusion_probabilities(sigma, rank)
    best = estimator_variance(sigma, p)
    assert best == pytest.approx(_variance(sigma, p), rel=1e-12)
    weights = torch.tensor(data.draw(st.lists(st.floats(1e-3, 1e3), min_size=d, max_size=d)), dtype=torch.float64)
    other = inclusion_probabilities(weights, rank)  # an arbitrary feasible design
    for lam in (0.0, 0.01, 0.5, 0.99):
        q = lam * p + (1 - lam) * other  # convex combinations stay feasible
        assert abs(float(q.sum()) - rank) < 1e-9 and bool(((q > 0) & (q <= 1)).all())
        assert _variance(sigma, q) >= best * (1 - 1e-12)


def test_minimum_variance_against_random_search():
    """2 000 random feasible designs around a decaying spectrum never beat water-filling."""
    gen = torch.Generator().manual_seed(0)
    sigma = torch.arange(1, 17, dtype=torch.float64) ** -1.5
    p = inclusion_probabilities(sigma, 4)
    best = estimator_variance(sigma, p)
    weights = torch.rand(2000, 16, generator=gen, dtype=torch.float64) * sigma * 4 + 1e-3
    q = torch.stack([inclusion_probabilities(w, 4) for w in weights])  # (2000, 16) feasible
    assert torch.allclose(q.sum(1), torch.full((2000,), 4.0, dtype=torch.float64))
    variances = (sigma**2 * (1 / q - 1)).sum(1)
    assert float(variances.min()) >= best * (1 - 1e-12)
    assert float(variances.min()) < best * 1.2  # the search does come close: the bound is not vacuous


@pytest.mark.parametrize(
    ("sigma", "rank", "expected"),
    [
        ([4.0, 1.0, 1.0], 2, [1.0, 0.5, 0.5]),  # s = 1 saturated, tail shares r − s = 1
        ([1.0, 1.0, 4.0], 2, [0.5, 0.5, 1.0]),  # same, unsorted input stays aligned
        ([3.0, 2.0, 1.0], 1, [0.5, 1 / 3, 1 / 6]),  # nothing saturated: p ∝ σ
        ([1.0, 1.0, 1.0, 1.0], 2, [0.5, 0.5, 0.5, 0.5]),  # ties
        ([9.0, 3.0, 1.0, 0.0], 2, [1.0, 0.75, 0.25, 0.0]),  # zero direction never picked
        ([3.0], 1, [1.0]),  # single element
        ([0.0], 3, [1.0]),  # single zero, rank > d
        ([0.0, 0.0, 0.0, 0.0, 0.0], 2, [1.0, 1.0, 0.0, 0.0, 0.0]),  # all zeros: top r (stable order)
        ([3.0, 2.0, 0.0, 0.0, 0.0], 3, [1.0, 1.0, 1.0, 0.0, 0.0]),  # rank-deficient: fills with a null direction
        ([3.0, 2.0, 1.0], 3, [1.0, 1.0, 1.0]),  # rank == d
        ([3.0, 2.0, 1.0], 7, [1.0, 1.0, 1.0]),  # rank > d
    ],
)
def test_hand_computed_designs(sigma, rank, expected):
    """Water-filling on small inputs equals the hand-computed design."""
    p = inclusion_probabilities(torch.tensor(sigma), rank)
    assert torch.allclose(p, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-15)
    assert is_deterministic(p) == all(x in (0.0, 1.0) for x in expected)


def test_input_dtype_and_device_preserved():
    """float32 input works and the result lives on σ's device in float64."""
    sigma = torch.tensor([2.0, 1.0, 1.0], dtype=torch.float32)
    p = inclusion_probabilities(sigma, 1)
    assert p.dtype == torch.float64 and p.device == sigma.device
    assert torch.allclose(p, torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64))


@pytest.mark.parametrize(
    ("sigma", "rank", "match"),
    [
        ([1.0, 2.0], 0, r"Invalid rank=0: must be an integer >= 1"),
        ([1.0, 2.0], -3, r"Invalid rank=-3: must be an integer >= 1"),
        ([1.0, 2.0], True, r"Invalid rank=True: must be an integer >= 1"),
        ([1.0, 2.0], 2.0, r"Invalid rank=2\.0: must be an integer >= 1"),
        ([1.0, -0.5], 1, r"Invalid sigma=\[1\.0, -0\.5\]: sigma\[1\]=-0\.5 must be finite and >= 0"),
        ([float("nan"), 1.0], 1, r"sigma\[0\]=nan must be finite and >= 0"),
        ([1.0, float("inf")], 1, r"sigma\[1\]=inf must be finite and >= 0"),
        ([1.0] * 40 + [-2.0], 3, r"Invalid sigma=<41 values>: sigma\[40\]=-2\.0 must be finite and >= 0"),
        ([[1.0, 2.0], [3.0, 4.0]], 1, r"Invalid sigma\.shape=\(2, 2\): must be 1-D"),
        ([], 1, r"Invalid sigma: must have at least one value"),
    ],
    ids=["rank0", "rank_neg", "rank_bool", "rank_float", "negative", "nan", "inf", "long_negative", "2d", "empty"],
)
def test_bad_inputs_name_the_bad_value(sigma, rank, match):
    """Invalid σ or rank raise ValueError naming the offending value (or shape)."""
    with pytest.raises(ValueError, match=match):
        inclusion_probabilities(torch.tensor(sigma), rank)


def test_estimator_variance_formula():
    """estimator_variance = Σ_{σ>0} σ²(1/p − 1); zero directions with p = 0 contribute nothing."""
    sigma = torch.tensor([9.0, 3.0, 1.0, 0.0])
    p = torch.tensor([1.0, 0.75, 0.25, 0.0])
    assert estimator_variance(sigma, p) == pytest.approx(9 * (1 / 0.75 - 1) + 1 * (1 / 0.25 - 1), rel=1e-12)
    uniform = torch.full((4,), 0.5)
    assert estimator_variance(sigma, uniform) == pytest.approx((4 / 2 - 1) * float((sigma**2).sum()), rel=1e-12)
    assert estimator_variance(sigma, torch.tensor([1.0, 1.0, 1.0, 0.0])) == 0.0


@pytest.mark.parametrize(
    ("p", "expected"),
    [([1.0, 0.0, 1.0], True), ([1.0, 0.5, 0.5], False), ([0.0], True), ([1.0 - 1e-12, 1.0], False)],
)
def test_is_deterministic(p, expected):
    """is_deterministic is true exactly when every probability is 0 or 1."""
    assert is_deterministic(torch.tensor(p, dtype=torch.float64)) is expected
