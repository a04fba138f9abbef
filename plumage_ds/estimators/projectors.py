"""Projector builders sharing one interface, the estimator, and moment realignment.

Pure tensor math: no ``torch.distributed``, no global RNG. All shapes are in the
*oriented* frame of :mod:`plumage_ds.estimators.spectral`: ``G_o`` is ``(s, l)``,
``P`` is ``(s, r)``, ``R = Pᵀ G_o`` is ``(r, l)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .probabilities import inclusion_probabilities, is_deterministic, mix_uniform
from .sampling import systematic_sample
from .spectral import short_side_basis


@dataclass(frozen=True)
class Projection:
    """A one-sided projector: ``Ĝ_o = P D⁻¹ Pᵀ G_o`` with ``D = diag(d)``.

    ``P``  # (s, r) orthonormal columns
    ``d``  # (r,) inclusion probability of each picked direction (1 for GaLore)
    ``deterministic``: no randomness was left (rank-deficient ``G`` or ``r >= s``).
    """

    P: Tensor
    d: Tensor
    deterministic: bool = False


def plumage_design(
    G: Tensor, rank: int, *, svd_method: str = "gram", uniform_mix: float = 0.0
) -> tuple[Tensor, Tensor]:
    """PLUMAGE's sampling design from one gradient: ``(U, p)``.

    ``U``  # (s, s) the short-side singular basis of ``G`` (stored orientation), ``p``  # (s,)
    float64 min-variance inclusion probabilities (water-filled ``p ∝ σ``, capped at 1), mixed with
    ``ε = uniform_mix`` of uniform probability (:func:`mix_uniform`). ``Σ p = min(r, s)``.
    """
    U, sigma = short_side_basis(G, svd_method)  # U (s, s), sigma (s,)
    return U, mix_uniform(inclusion_probabilities(sigma, rank), uniform_mix)


def projection_from_design(U: Tensor, p: Tensor, generator: torch.Generator, *, device=None) -> Projection:
    """Draw ``S`` (exactly ``Σp`` indices, ``Pr(i ∈ S) = p_i``) and return ``P = U[:, S]``, ``d = p_S``.

    ``E[P D⁻¹ Pᵀ] = Σ_{p_i > 0} u_i u_iᵀ``: the identity when every ``p_i > 0``, so ``E[Ĝ] = G`` for
    any ``G``. One uniform from ``generator`` (:func:`systematic_sample`).
    """
    S = systematic_sample(p, generator)  # (r,)
    device = U.device if device is None else device
    P = U[:, S.to(U.device)].to(device=device, dtype=torch.float32).contiguous()  # (s, r)
    d = p[S.to(p.device)].to(device=device, dtype=torch.float32)  # (r,)
    return Projection(P=P, d=d, deterministic=is_deterministic(p))


def plumage_projection(
    G: Tensor,
    rank: int,
    generator: torch.Generator,
    *,
    svd_method: str = "gram",
    uniform_mix: float = 0.0,
) -> Projection:
    """PLUMAGE: SVD → min-variance probabilities → systematic sample (``E[Ĝ] = G``).

    ``G`` is the (averaged, full) gradient in its stored orientation.
    ``uniform_mix = ε > 0`` mixes the probabilities with uniform ones
    (:func:`mix_uniform`): still unbiased for ``G``, and also for later gradients
    projected with the same ``P`` (no direction has ``p = 0``), at a small cost in
    variance on ``G`` itself.
    """
    U, p = plumage_design(G, rank, svd_method=svd_method, uniform_mix=uniform_mix)
    return projection_from_design(U, p, generator)


def plumage_from_basis(
    U: Tensor, sigma: Tensor, rank: int, generator: torch.Generator, *, uniform_mix: float = 0.0
) -> Projection:
    """PLUMAGE's draw from a known short-side basis ``U``  # (s, s) and spectrum ``sigma``  # (s,)
    (e.g. from a Gram matrix summed over row shards)."""
    return projection_from_design(U, mix_uniform(inclusion_probabilities(sigma, rank), uniform_mix), generator)


def galore_projection(G: Tensor, rank: int, *, svd_method: str = "svd") -> Projection:
    """GaLore: top-``r`` singular directions, ``d = 1`` (biased: drops the tail)."""
    return galore_from_basis(short_side_basis(G, svd_method)[0], rank)


def galore_from_basis(U: Tensor, rank: int) -> Projection:
    """GaLore's top-``r`` columns of a short-side basis ``U``  # (s, s) sorted by σ."""
    r = min(rank, U.shape[1])
    P = U[:, :r].contiguous()  # (s, r)
    return Projection(P=P, d=torch.ones(r, device=U.device), deterministic=True)


def haar_projection(short_dim: int, rank: int, generator: torch.Generator, *, device=None) -> Projection:
    """Haar–Stiefel: ``P`` uniform on the Stiefel manifold, ``d = r/s`` (``Ĝ = (s/r) P Pᵀ G``).

    QR of an ``(s, r)`` Gaussian drawn from ``generator`` with the sign fix
    ``P ← Q·sign(diag(R))``; identical on every rank given the same generator.
    """
    r = min(rank, short_dim)
    Z = torch.randn(short_dim, r, generator=generator, dtype=torch.float64)  # (s, r)
    Q, Rq = torch.linalg.qr(Z)
    signs = torch.sign(torch.diagonal(Rq))
    signs[signs == 0] = 1.0
    P = (Q * signs).to(device=device, dtype=torch.float32)  # (s, r)
    d = torch.full((r,), r / short_dim, device=device, dtype=torch.float32)
    return Projection(P=P, d=d, deterministic=(r == short_dim))


def estimate(G_o: Tensor, proj: Projection) -> Tensor:
    """The lifted estimate ``Ĝ_o = P D⁻¹ Pᵀ G_o`` (oriented ``(s, l)``)."""
    P, d = proj.P, proj.d
    return P @ ((P.mT @ G_o.to(P.dtype)) / d[:, None])


def realignment(P_new: Tensor, P_old: Tensor) -> Tensor:
    """``B = P_newᵀ P_old``  # (r, r): maps old coordinates to new ones."""
    return P_new.mT @ P_old


def realign_moments(M: Tensor, V: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """``M ← B M``, ``V ← (B∘B) V`` (docs/design.md §2.1 item 5). ``M, V``  # (r, l)

    ``V`` stays non-negative because ``B∘B`` is. If ``P_new == P_old``, ``B = I``.
    """
    return B @ M, (B * B) @ V
