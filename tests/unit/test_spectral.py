"""Orientation, the short-side spectral basis, Haar–Stiefel draws, moment realignment, GUM layer sampling."""

from __future__ import annotations

import re

import pytest
import torch

from plumage_ds.estimators import (
    deorient,
    haar_projection,
    is_left,
    orient,
    oriented_shape,
    realign_moments,
    realignment,
    sample_layers,
    sampler_generator,
    short_side_basis,
)

SHAPES = [(16, 24), (24, 16), (16, 16)]  # left, right, square (left)
SHAPE_IDS = ["16x24-left", "24x16-right", "16x16-square"]
METHODS = ["svd", "gram"]
ORTHO_ATOL = 2e-6  # fp32 orthonormality for s <= 24


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Thousands of tiny ops: one intra-op thread is faster and immune to oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _matrix(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """A dense fp32 matrix with a well-separated, decaying spectrum (σ_i = i^-1.5, σ_s ≈ 0.016)."""
    gen = torch.Generator().manual_seed(seed)
    m, n = shape
    d = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, d, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, d, generator=gen, dtype=torch.float64))
    sigma = torch.arange(1, d + 1, dtype=torch.float64) ** -1.5
    return ((U * sigma) @ V.mT).float()


def _assert_orthonormal_columns(Q: torch.Tensor, atol: float = ORTHO_ATOL) -> None:
    eye = torch.eye(Q.shape[1], dtype=Q.dtype)
    assert torch.allclose(Q.mT @ Q, eye, atol=atol), float((Q.mT @ Q - eye).abs().max())


@pytest.mark.parametrize(
    ("shape", "left", "oriented"), [((3, 5), True, (3, 5)), ((5, 3), False, (3, 5)), ((4, 4), False, (4, 4))]
)
def test_orientation_puts_short_side_first(shape, left, oriented):
    """is_left / oriented_shape / orient pick the short side, and deorient undoes orient."""
    X = torch.arange(shape[0] * shape[1], dtype=torch.float32).reshape(shape)
    assert is_left(shape) is left and is_left(X.shape) is left
    assert oriented_shape(shape) == oriented
    assert orient(X, left).shape == oriented
    assert torch.equal(deorient(orient(X, left), left), X)


@pytest.mark.parametrize("shape", [(3,), (2, 3, 4)])
def test_is_left_rejects_non_matrices(shape):
    """Low-rank projection of a non-2-D tensor raises, naming the shape."""
    with pytest.raises(ValueError, match=re.escape(f"Invalid shape={tuple(shape)}: low-rank projection needs a 2-D")):
        is_left(shape)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_short_side_basis_is_an_orthonormal_singular_basis(shape, method):
    """U is (s, s) orthonormal, σ descending, and G_o = U diag(σ) V_oᵀ with V_o orthonormal."""
    G = _matrix(shape)
    G_o = orient(G, is_left(shape)).double()
    s = min(shape)
    U, sigma = short_side_basis(G, method)
    assert U.shape == (s, s) and sigma.shape == (s,)
    assert U.dtype == sigma.dtype == torch.float32
    _assert_orthonormal_columns(U)
    assert bool((sigma[:-1] >= sigma[1:]).all()) and bool((sigma >= 0).all())
    V_o = (U.double().mT @ G_o).mT / sigma.double()  # (l, s): right singular vectors implied by (U, σ)
    _assert_orthonormal_columns(V_o, atol=5e-5)
    assert torch.allclose((U.double() * sigma.double()) @ V_o.mT, G_o, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_svd_and_gram_agree_on_the_spectrum(shape):
    """Both methods give the same σ (fp32 tolerance) and the same subspaces (|U_svdᵀ U_gram| = I)."""
    G = _matrix(shape)
    U_svd, s_svd = short_side_basis(G, "svd")
    U_gram, s_gram = short_side_basis(G, "gram")
    true_sigma = torch.arange(1, min(shape) + 1, dtype=torch.float32) ** -1.5
    assert torch.allclose(s_svd, true_sigma, rtol=1e-5, atol=1e-6)
    assert torch.allclose(s_gram, s_svd, rtol=1e-4, atol=1e-6)
    # singular vectors agree up to sign (the spectrum is well separated)
    assert torch.allclose((U_svd.mT @ U_gram).abs(), torch.eye(min(shape)), atol=1e-3)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_svd_method_is_torch_svd_in_canonical_signs(shape):
    """method='svd' returns torch.linalg.svd's U (left) or Vhᵀ (right) and S bitwise, each column's sign
    put in the canonical form (largest-magnitude entry positive) — the same whatever signs LAPACK chose."""
    from plumage_ds.estimators.spectral import canonical_signs

    G = _matrix(shape)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    raw = U if is_left(shape) else Vh.mT
    basis, sigma = short_side_basis(G, "svd")
    assert torch.equal(basis, canonical_signs(raw)) and torch.equal(sigma, S)
    assert torch.equal(basis.abs(), raw.abs())  # only signs differ
    pivot = basis.abs().argmax(dim=0)
    assert bool((basis[pivot, torch.arange(basis.shape[1])] > 0).all())
    flips = torch.tensor([(-1.0) ** k for k in range(raw.shape[1])])
    assert torch.equal(canonical_signs(raw * flips), basis)  # another device's signs: the same basis


def test_short_side_basis_rejects_unknown_method():
    """An unknown method raises ValueError naming it and the valid choices."""
    with pytest.raises(ValueError, match=r"Invalid svd_method='qr': must be one of \['svd', 'gram'\]"):
        short_side_basis(_matrix((4, 6)), "qr")


@pytest.mark.parametrize(("short_dim", "rank"), [(16, 4), (24, 1), (8, 8), (5, 9)])
def test_haar_projection_is_orthonormal_with_d_r_over_s(short_dim, rank):
    """Haar P has orthonormal (s, min(r, s)) columns, d = r/s, and is deterministic only when r >= s."""
    proj = haar_projection(short_dim, rank, sampler_generator(0, 1, 2))
    r = min(rank, short_dim)
    assert proj.P.shape == (short_dim, r) and proj.P.dtype == torch.float32
    _assert_orthonormal_columns(proj.P)
    assert torch.equal(proj.d, torch.full((r,), r / short_dim))
    assert proj.deterministic is (r == short_dim)


def test_haar_projection_same_generator_is_bitwise_identical():
    """The same (seed, matrix, draw) gives a bitwise-identical P (zero-communication sharing); others differ."""
    a = haar_projection(16, 4, sampler_generator(3, 7, 11))
    b = haar_projection(16, 4, sampler_generator(3, 7, 11))
    c = haar_projection(16, 4, sampler_generator(3, 7, 12))
    assert torch.equal(a.P, b.P) and torch.equal(a.d, b.d)
    assert not torch.allclose(a.P, c.P)


def test_haar_projection_sign_fix_and_isotropy():
    """Sign fix makes diag(Qᵀ Z) > 0, and E[P Pᵀ] = (r/s)·I over many draws (Haar isotropy)."""
    s, r, n = 8, 2, 4000
    gen = torch.Generator().manual_seed(5)
    acc = torch.zeros(s, s, dtype=torch.float64)
    for _ in range(n):
        P = haar_projection(s, r, gen).P.double()
        acc += P @ P.mT
    # each entry of P Pᵀ is bounded by 1, so its mean has std <= 1/sqrt(n) ≈ 0.016
    assert torch.allclose(acc / n, torch.eye(s, dtype=torch.float64) * (r / s), atol=0.05)
    Z = torch.randn(s, r, generator=torch.Generator().manual_seed(6), dtype=torch.float64)  # the draw it makes
    P = haar_projection(s, r, torch.Generator().manual_seed(6)).P.double()
    assert bool((torch.diagonal(P.mT @ Z) > 0).all())


@pytest.mark.parametrize("shape", [(6, 10), (4, 4)])
def test_realignment_with_same_projector_is_identity(shape):
    """P_new == P_old ⇒ B = I (fp32), M and V unchanged."""
    s, r = 16, shape[0]
    gen = torch.Generator().manual_seed(0)
    P = haar_projection(s, r, gen).P
    M = torch.randn(shape, generator=gen)
    V = torch.rand(shape, generator=gen)
    B = realignment(P, P)
    assert B.shape == (r, r)
    assert torch.allclose(B, torch.eye(r), atol=ORTHO_ATOL)
    M2, V2 = realign_moments(M, V, B)
    assert torch.allclose(M2, M, atol=1e-5) and torch.allclose(V2, V, atol=1e-5)


def test_realignment_preserves_lifted_moment_within_same_span():
    """If P_new spans the same subspace (P_new = P_old Q), P_new·(B M) = P_old·M and V stays >= 0."""
    gen = torch.Generator().manual_seed(1)
    P_old = haar_projection(16, 4, gen).P.double()
    Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=torch.float64))
    P_new = P_old @ Q
    M = torch.randn(4, 10, generator=gen, dtype=torch.float64)
    V = torch.rand(4, 10, generator=gen, dtype=torch.float64)
    B = realignment(P_new, P_old)
    assert torch.allclose(B, Q.mT, atol=1e-12)
    M2, V2 = realign_moments(M, V, B)
    assert torch.allclose(P_new @ M2, P_old @ M, atol=1e-12)
    assert torch.allclose(V2, (Q.mT**2) @ V, atol=1e-12)
    assert bool((V2 >= 0).all())


def test_realignment_keeps_second_moment_non_negative():
    """For unrelated projectors B∘B >= 0, so V >= 0 stays >= 0 (M maps linearly as B M)."""
    gen = torch.Generator().manual_seed(2)
    for draw in range(50):
        P_old = haar_projection(16, 4, gen).P
        P_new = haar_projection(16, 4, gen).P
        M = torch.randn(4, 12, generator=gen)
        V = torch.rand(4, 12, generator=gen) * (draw % 3)  # includes V = 0
        B = realignment(P_new, P_old)
        assert torch.allclose(B, P_new.mT @ P_old)
        M2, V2 = realign_moments(M, V, B)
        assert torch.allclose(M2, B @ M) and torch.allclose(V2, (B * B) @ V)
        assert bool((V2 >= 0).all())


@pytest.mark.parametrize(("num_layers", "gamma"), [(12, 3), (7, 1), (5, 5), (4, 9)])
def test_sample_layers_picks_exactly_gamma(num_layers, gamma):
    """Every draw marks exactly min(γ, N_L) layers, and the same generator seed gives the same mask."""
    for draw in range(200):
        mask = sample_layers(num_layers, gamma, sampler_generator(0, 0, draw))
        assert mask.dtype == torch.bool and mask.shape == (num_layers,)
        assert int(mask.sum()) == min(gamma, num_layers)
        assert torch.equal(mask, sample_layers(num_layers, gamma, sampler_generator(0, 0, draw)))


@pytest.mark.parametrize(("num_layers", "gamma"), [(12, 3), (10, 1), (9, 8)])
def test_sample_layers_marginal_is_gamma_over_n(num_layers, gamma):
    """Over 10k draws each layer is drawn with frequency q = γ/N_L (binomial 5-sigma)."""
    n = 10_000
    gen = torch.Generator().manual_seed(4)
    counts = torch.zeros(num_layers, dtype=torch.float64)
    for _ in range(n):
        counts += sample_layers(num_layers, gamma, gen)
    q = gamma / num_layers
    bound = 5 * (q * (1 - q) / n) ** 0.5
    assert bool(((counts / n - q).abs() <= bound).all()), (counts / n).tolist()


@pytest.mark.parametrize(
    ("num_layers", "gamma", "match"),
    [(0, 1, r"Invalid num_layers=0: must be >= 1"), (4, 0, r"Invalid gamma=0: must be >= 1")],
)
def test_sample_layers_rejects_bad_arguments(num_layers, gamma, match):
    """Non-positive N_L or γ raise ValueError naming the value."""
    with pytest.raises(ValueError, match=match):
        sample_layers(num_layers, gamma, torch.Generator().manual_seed(0))
