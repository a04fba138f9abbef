"""The optimal random projection (``estimators/optimal.py``): unbiased, predicted error, optimal.

Stochastic gradients ``G_k = A + B·Z_k`` (a low-rank mean plus anisotropic noise) on 16×24 and
24×16 matrices, rank 4. ``Σ`` is the running mean of ``G_k G_kᵀ`` over 64 "refresh" gradients; a
held-out ``G`` is estimated over N = 20 000 vectorised draws (each from its own
``sampler_generator``, checked against :func:`optimal_projection` on a subset):

* ``mean(Ĝ)`` is within 5 standard errors of the held-out ``G`` in every entry (unbiased for a
  gradient that did not shape the design), and ``E[V Vᵀ] = c·I`` for the paper's scaled ``V``;
* the empirical ``E‖Ĝ − G‖²`` matches :func:`expected_error` within 5 SE (< 3 %);
* over the gradient distribution the design beats PLUMAGE-from-one-gradient, Haar and every
  other feasible ``π`` in the same basis (it is the minimiser);
* ``Σ = G Gᵀ`` gives PLUMAGE's design; ``Sigma=None`` gives the Haar–Stiefel draw.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import pytest
import torch
from montecarlo import Z, Summary, draw_uniforms, lift_batch, systematic_from_uniforms

from plumage_ds.estimators import (
    compact_second_moment,
    convert_second_moment,
    estimate,
    expected_error,
    full_second_moment,
    is_second_moment_form,
    haar_projection,
    inclusion_probabilities,
    is_left,
    optimal_basis,
    optimal_probabilities,
    optimal_projection,
    orient,
    plumage_projection,
    sampler_generator,
    scaled_projector,
    second_moment_from_gram,
    second_moment_update,
    short_side_basis,
)

SEED = 2026
RANK = 4
N_DRAWS = 20_000
N_CHECK = 32
N_REFRESH = 64  # gradients averaged into Σ
DESIGN_ID = 21
SHAPES = [(16, 24), (24, 16)]
REL_TOL = 0.03


pytestmark = pytest.mark.usefixtures("single_thread")


def gradient_sampler(shape: tuple[int, int]):
    """``k -> G_k`` (stored orientation, fp32): mean of rank 3 plus noise whose covariance decays."""
    gen = torch.Generator().manual_seed(SEED)
    m, n = shape
    s, l = min(m, n), max(m, n)
    U, _ = torch.linalg.qr(torch.randn(s, s, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(l, 3, generator=gen, dtype=torch.float64))
    mean = (U[:, :3] * torch.tensor([3.0, 1.5, 1.0], dtype=torch.float64)) @ V.mT  # (s, l)
    noise_scale = 0.4 * 0.8 ** torch.arange(s, dtype=torch.float64)  # (s,) along a rotated basis
    R, _ = torch.linalg.qr(torch.randn(s, s, generator=gen, dtype=torch.float64))

    def draw(k: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(SEED + 1 + k)
        G_o = mean + (R * noise_scale) @ torch.randn(s, l, generator=g, dtype=torch.float64)
        return (G_o if m < n else G_o.mT).float()

    return draw


@dataclass
class Experiment:
    draw: object
    Sigma: torch.Tensor  # (s, s) float64 running mean over the refresh gradients
    Q: torch.Tensor
    pi: torch.Tensor
    G: torch.Tensor  # held-out gradient, stored orientation
    G_o: torch.Tensor
    S: torch.Tensor  # (N, r) draws
    summary: Summary


@functools.lru_cache(maxsize=None)
def run_experiment(shape: tuple[int, int]) -> Experiment:
    draw = gradient_sampler(shape)
    Sigma = None
    for k in range(N_REFRESH):
        Sigma = second_moment_update(Sigma, draw(k), 1.0 / (k + 1))
    Q, pi = optimal_probabilities(Sigma, RANK)
    G = draw(10_000)
    G_o = orient(G, is_left(G.shape))
    S = systematic_from_uniforms(pi, draw_uniforms(SEED, DESIGN_ID, N_DRAWS))
    return Experiment(draw, Sigma, Q, pi, G, G_o, S, Summary.of(lift_batch(G_o, Q.float(), pi, S), G_o))


@pytest.fixture(params=SHAPES, ids=lambda sh: f"{sh[0]}x{sh[1]}")
def exp(request) -> Experiment:
    return run_experiment(request.param)


def test_running_mean_equals_the_batch_second_moment(exp):
    """``second_moment_update`` with ``w = 1/k`` is the mean of ``G_o G_oᵀ``; ``Σ`` is PSD and full rank."""
    Gs = [orient(exp.draw(k).double(), is_left(exp.G.shape)) for k in range(N_REFRESH)]
    batch = sum(G @ G.mT for G in Gs) / N_REFRESH
    torch.testing.assert_close(exp.Sigma, batch, rtol=1e-10, atol=1e-10)
    assert float(torch.linalg.eigvalsh(exp.Sigma).min()) > 0
    assert bool((exp.pi > 0).all()) and float(exp.pi.sum()) == pytest.approx(RANK)
    # an exponential average keeps weight w on the newest gradient
    G = exp.draw(0)
    ema = second_moment_update(exp.Sigma, G, 0.25)
    G_o = orient(G.double(), is_left(G.shape))
    torch.testing.assert_close(ema, 0.75 * exp.Sigma + 0.25 * G_o @ G_o.mT)


def test_batched_draws_are_optimal_projection(exp):
    """The vectorised draws are the real pipeline: same P (up to column sign) and d."""
    for k in range(N_CHECK):
        proj = optimal_projection(exp.Sigma, RANK, sampler_generator(SEED, DESIGN_ID, k))
        assert torch.equal(proj.P, exp.Q[:, exp.S[k]].float())
        assert torch.equal(proj.d, exp.pi[exp.S[k]].float())
        assert not proj.deterministic
        torch.testing.assert_close(estimate(exp.G_o, proj), lift_batch(exp.G_o, exp.Q.float(), exp.pi, exp.S[k : k + 1])[0])


def test_unbiased_for_a_held_out_gradient(exp):
    """|mean(Ĝ) − G| <= 5 SE in every entry for a G that did not shape Σ, and the aggregate is O(1)."""
    assert exp.summary.max_z(exp.G_o) <= Z
    mse, _ = exp.summary.mse_and_tolerance()
    aggregate = N_DRAWS * float(((exp.summary.mean - exp.G_o.double()) ** 2).sum()) / mse
    assert aggregate <= 10.0, aggregate


def test_error_matches_expected_error(exp):
    """Empirical E‖Ĝ − G‖² equals Σ (1/π_i − 1)·‖q_iᵀ G‖² within 5 SE, the tolerance < 3 % of it."""
    theory = expected_error(exp.Q, exp.pi, exp.G_o.double() @ exp.G_o.double().mT)
    mse, tol = exp.summary.mse_and_tolerance()
    assert tol <= REL_TOL * theory, (tol, theory)
    assert abs(mse - theory) <= tol, (mse, theory, tol)


def test_scaled_projector_has_isotropic_second_moment(exp):
    """The paper's ``V = P diag(√(c/π))``: ``mean(V Vᵀ)`` within 5 SE of ``c·I``; ``V Vᵀ G / c = Ĝ``."""
    c = 2.5
    P = exp.Q.mT[exp.S].mT  # (N, s, r)
    VVt = (P * (c / exp.pi[exp.S])[:, None, :]) @ P.mT  # (N, s, s) float64
    se = VVt.std(0) / math.sqrt(N_DRAWS)
    eye = c * torch.eye(P.shape[1], dtype=torch.float64)
    dev = (VVt.mean(0) - eye).abs()
    assert bool((dev <= Z * se + 1e-12).all()), float((dev / (se + 1e-30)).max())
    proj = optimal_projection(exp.Sigma, RANK, sampler_generator(SEED, DESIGN_ID, 0))
    V = scaled_projector(proj, c)
    torch.testing.assert_close(V @ (V.mT @ exp.G_o) / c, estimate(exp.G_o, proj), rtol=1e-5, atol=1e-5)


def test_design_minimises_the_expected_error_over_the_gradient_distribution(exp):
    """With M the second moment of 64 fresh gradients: optimal < PLUMAGE-from-one-gradient and < Haar,
    and no other feasible π in the same basis does better (it is the minimiser of Σ(1/π−1)λ)."""
    M = None
    for k in range(N_REFRESH):
        M = second_moment_update(M, exp.draw(20_000 + k), 1.0 / (k + 1))
    s = M.shape[0]
    optimal = expected_error(exp.Q, exp.pi, M)
    U, sigma = short_side_basis(exp.draw(0), "gram")  # PLUMAGE's design from one refresh gradient
    plumage = expected_error(U.double(), inclusion_probabilities(sigma, RANK), M)
    haar = (s / RANK - 1.0) * float(torch.trace(M))
    assert optimal < 0.9 * plumage and optimal < 0.9 * haar, (optimal, plumage, haar)
    gen = torch.Generator().manual_seed(SEED)
    on_sigma = expected_error(exp.Q, exp.pi, exp.Sigma)
    for _ in range(200):  # random feasible alternatives: π' = (1−t)π + t·q with q in the capped simplex
        q = torch.rand(s, generator=gen, dtype=torch.float64)
        q = inclusion_probabilities(q, RANK)
        t = float(torch.rand((), generator=gen, dtype=torch.float64))
        assert expected_error(exp.Q, (1 - t) * exp.pi + t * q, exp.Sigma) >= on_sigma * (1 - 1e-12)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda sh: f"{sh[0]}x{sh[1]}")
def test_one_gradient_gives_plumage_design(shape):
    """Σ = G Gᵀ: π equals PLUMAGE's p ∝ σ and the estimate equals plumage_projection's, draw for draw."""
    G = gradient_sampler(shape)(0)
    G_o = orient(G, is_left(G.shape))
    Sigma = second_moment_update(None, G, 1.0)
    _, pi = optimal_probabilities(Sigma, RANK)
    _, sigma = short_side_basis(G, "gram")
    torch.testing.assert_close(pi, inclusion_probabilities(sigma, RANK), rtol=0, atol=1e-6)
    for k in range(8):
        ours = optimal_projection(Sigma, RANK, sampler_generator(SEED, 5, k))
        theirs = plumage_projection(G, RANK, sampler_generator(SEED, 5, k))
        torch.testing.assert_close(estimate(G_o, ours), estimate(G_o, theirs), rtol=1e-4, atol=1e-5)


def test_no_information_gives_haar():
    """Sigma=None is the Haar–Stiefel draw itself; Σ ∝ I gives uniform π = r/s (Haar's error)."""
    for k in range(4):
        ours = optimal_projection(None, RANK, sampler_generator(SEED, 6, k), short_dim=16)
        theirs = haar_projection(16, RANK, sampler_generator(SEED, 6, k))
        assert torch.equal(ours.P, theirs.P) and torch.equal(ours.d, theirs.d)
    Q, pi = optimal_probabilities(3.0 * torch.eye(16, dtype=torch.float64), RANK)
    torch.testing.assert_close(pi, torch.full((16,), RANK / 16, dtype=torch.float64))
    G_o = gradient_sampler((16, 24))(0).double()
    assert expected_error(Q, pi, G_o @ G_o.mT) == pytest.approx((16 / RANK - 1) * float((G_o**2).sum()), rel=1e-9)


def test_rank_deficient_sigma_and_uniform_mix():
    """A rank-2 Σ: directions outside its span get π = 0 beyond the r forced picks (deterministic,
    biased for gradients outside the span) unless uniform_mix gives every direction π > 0."""
    X = torch.randn(16, 2, generator=torch.Generator().manual_seed(SEED), dtype=torch.float64)
    Sigma = X @ X.mT  # (16, 16), rank 2
    _, pi = optimal_probabilities(Sigma, RANK)
    assert sorted(pi.tolist(), reverse=True) == [1.0] * RANK + [0.0] * (16 - RANK)
    assert optimal_projection(Sigma, RANK, sampler_generator(SEED, 7, 0)).deterministic
    mixed = optimal_projection(Sigma, RANK, sampler_generator(SEED, 7, 0), uniform_mix=0.2)
    assert mixed.d.numel() == RANK and bool((mixed.d >= 0.2 * RANK / 16 - 1e-7).all()) and not mixed.deterministic


def test_compact_sigma_keeps_the_top_pairs_and_the_trace():
    """``Σ`` kept low-rank plus isotropic (``sigma_rank = k``): ``(s, k+1)`` floats; expanded, its top ``k``
    eigenpairs are ``Σ``'s, the other ``s − k`` eigenvalues all equal the mean of ``Σ``'s, the trace is
    kept; a ``Σ`` of rank <= k comes back whole; a compact ``Σ`` folds into the next update as its expansion."""
    g = torch.Generator().manual_seed(3)
    A = torch.randn(12, 30, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 12, dtype=torch.float64)[:, None]
    Sigma = A @ A.mT  # (12, 12), a decaying spectrum
    Q, root = optimal_basis(Sigma)
    lam = root.square()
    C = compact_second_moment(Q, root, 4)
    assert C.shape == (12, 5) and C.dtype == torch.float64
    S = full_second_moment(C)
    torch.testing.assert_close(torch.trace(S), torch.trace(Sigma), rtol=1e-12, atol=0)
    mu, V = torch.linalg.eigh(S)
    mu, V = mu.flip(-1), V.flip(-1)
    torch.testing.assert_close(mu[:4], lam[:4], rtol=1e-10, atol=0)
    torch.testing.assert_close(mu[4:], lam[4:].mean().expand(8), rtol=1e-10, atol=0)
    torch.testing.assert_close((V[:, :4].mT @ Q[:, :4]).abs(), torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-8)
    B = A[:, :3] @ A[:, :3].mT  # rank 3 <= k: nothing is dropped
    torch.testing.assert_close(full_second_moment(compact_second_moment(*optimal_basis(B), 4)), B, rtol=0, atol=1e-12 * float(B.abs().max()))
    gram = A[:, 3:9] @ A[:, 3:9].mT
    torch.testing.assert_close(second_moment_from_gram(C, gram, 0.25), second_moment_from_gram(S, gram, 0.25), rtol=1e-14, atol=0)


def test_convert_second_moment_between_forms():
    """A ``Σ`` saved under one ``sigma_rank`` in the form kept under another: a form already kept is the
    same tensor; compact to whole is its expansion; whole or compact to a compact ``k'`` keeps the top
    ``k'`` eigenvalues (of the expansion) and the trace; only whole ``(s, s)`` and ``(s, k+1)``,
    ``1 <= k <= s − 2``, are forms."""
    g = torch.Generator().manual_seed(5)
    A = torch.randn(12, 30, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 12, dtype=torch.float64)[:, None]
    Sigma = A @ A.mT  # (12, 12)
    C3 = convert_second_moment(Sigma, 3)
    assert convert_second_moment(Sigma, 0) is Sigma and convert_second_moment(C3, 3) is C3 and C3.shape == (12, 4)
    assert convert_second_moment(Sigma, 11).shape == (12, 12)  # k > s − 2 keeps the whole Σ
    torch.testing.assert_close(convert_second_moment(C3, 0), full_second_moment(C3), rtol=0, atol=0)
    lam = torch.linalg.eigvalsh(Sigma).flip(-1)
    for S, k2 in ((Sigma, 3), (C3, 6), (convert_second_moment(Sigma, 6), 3)):
        out = full_second_moment(convert_second_moment(S, k2))
        mu = torch.linalg.eigvalsh(out).flip(-1)
        torch.testing.assert_close(torch.trace(out), torch.trace(Sigma), rtol=1e-12, atol=0)
        torch.testing.assert_close(mu[:3], lam[:3], rtol=1e-9, atol=0)
    assert [is_second_moment_form(shape, 12) for shape in ((12, 12), (12, 2), (12, 11), (12, 1), (12, 13), (11, 4), (12,))] == [
        True, True, True, False, False, False, False]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: compact_second_moment(torch.eye(5), torch.ones(5), 4), "Invalid k=4: must be 1 <= k <= 3 for a (5, 5) Σ"),
        (lambda: compact_second_moment(torch.eye(5), torch.ones(5), 0), "Invalid k=0: must be 1 <= k <= 3 for a (5, 5) Σ"),
        (lambda: full_second_moment(torch.ones(3, 5)), "Invalid Sigma.shape=(3, 5): must be (s, s) or compact (s, k+1) with k + 1 < s"),
        (lambda: second_moment_from_gram(torch.ones(4, 2), torch.eye(3), 0.5), "Invalid Sigma.shape=(4, 2): must be (3, 3) or compact (3, k+1)"),
        (lambda: second_moment_update(None, torch.ones(3), 1.0), "Invalid G.shape=(3,): the second moment needs a matrix"),
        (lambda: second_moment_update(None, torch.ones(3, 4), 0.0), "Invalid weight=0.0: must be in (0, 1]"),
        (lambda: second_moment_update(torch.eye(4), torch.ones(3, 4), 0.5), "Invalid Sigma.shape=(4, 4): must be (3, 3)"),
        (lambda: optimal_probabilities(torch.ones(3, 4), 2), "Invalid Sigma.shape=(3, 4): must be a non-empty square"),
        (lambda: optimal_probabilities(torch.full((3, 3), math.nan), 2), "Invalid Sigma: contains non-finite values"),
        (lambda: optimal_projection(None, 2, torch.Generator()), "Invalid short_dim=None: Sigma=None (Haar) needs"),
        (lambda: optimal_projection(torch.eye(3), 2, torch.Generator(), short_dim=4), "Invalid short_dim=4: Sigma is (3, 3)"),
        (lambda: scaled_projector(optimal_projection(torch.eye(3), 2, torch.Generator()), 0.0), "Invalid c=0.0: must be > 0"),
    ],
)
def test_bad_input_raises(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()
