"""The optimal random projection for *stochastic* gradients, and a running estimate of ``Σ``.

Pure tensor math (no ``torch.distributed``, no global RNG), in the oriented frame of
:mod:`plumage_ds.estimators.spectral` (``G_o`` is ``(s, l)``, short side first).

For gradients ``G`` drawn from some distribution, the estimator ``Ĝ = P D⁻¹ Pᵀ G`` with
``P = Q[:, J]``, ``D = diag(π_J)`` and ``Pr(i ∈ J) = π_i`` is unbiased for **every** ``G``
(``E_J[P D⁻¹ Pᵀ] = Σ_i π_i q_i q_iᵀ / π_i = I``) as long as every ``π_i > 0``, and

    E_G E_J ‖Ĝ − G‖² = Σ_i (1/π_i − 1) · q_iᵀ Σ q_i,      Σ = E[G_o G_oᵀ]  # (s, s)

With ``Q`` the eigenvectors of ``Σ`` (eigenvalues ``λ_i``) this is ``Σ_i (1/π_i − 1) λ_i``, minimised
under ``Σ π_i = r``, ``0 < π_i <= 1`` by the water-filled square roots ``π_i = min(1, c·√λ_i)``
(the same water-filling as PLUMAGE's :func:`inclusion_probabilities`, fed ``√λ`` instead of ``σ``).
Special cases:

* ``Σ = G Gᵀ`` for one fixed ``G``: ``√λ_i = σ_i(G)`` and ``Q = U``, PLUMAGE's design;
* no information about ``Σ`` (``Sigma=None``): the Haar–Stiefel projection (``π_i = r/s`` and a
  uniformly random basis);
* ``Σ ∝ I``: ``π_i = r/s`` in a fixed basis, the same error ``(s/r − 1)‖G‖²`` as Haar.

In the paper's notation the projector is ``V = Q_J diag(√(c/π_J))`` with ``E[V Vᵀ] = c·I`` and
``Ĝ = V Vᵀ G / c``; :func:`scaled_projector` builds that ``V`` from a :class:`Projection`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .probabilities import inclusion_probabilities, mix_uniform
from .projectors import Projection, haar_projection, projection_from_design
from .spectral import is_left, orient


def second_moment_update(Sigma: Optional[Tensor], G: Tensor, weight: float) -> Tensor:
    """``Σ ← (1 − w)·Σ + w·G_o G_oᵀ``  # (s, s) float64; ``Sigma=None`` starts at ``G_o G_oᵀ``.

    ``w = 1/k`` at the ``k``-th gradient gives the running mean of ``G_o G_oᵀ`` (an unbiased
    estimate of ``E[G_o G_oᵀ]`` when the gradients are draws around one point); a constant ``w``
    an exponential average that forgets old gradients as training moves. ``G`` is in its stored
    orientation. The state is this one tensor (symmetric positive semi-definite); the cost is one
    ``s × s × l`` product per call. :func:`second_moment_from_gram` is the same update from
    ``G_o G_oᵀ`` itself (e.g. summed over row shards).
    """
    if G.dim() != 2:
        raise ValueError(f"Invalid G.shape={tuple(G.shape)}: the second moment needs a matrix")
    G_o = orient(G.detach().double(), is_left(G.shape))  # (s, l)
    return second_moment_from_gram(Sigma, G_o @ G_o.mT, weight, shape=tuple(G.shape))


def second_moment_from_gram(Sigma: Optional[Tensor], gram: Tensor, weight: float, *, shape: Optional[tuple] = None) -> Tensor:
    """``Σ ← (1 − w)·Σ + w·gram`` with ``gram = G_o G_oᵀ``  # (s, s), in float64, symmetrised; a compact
    ``Σ`` (:func:`compact_second_moment`) is expanded first, so the result is always ``(s, s)``.

    Symmetrising (``½(X + Xᵀ)``, exact in floating point) keeps ``Σ = Σᵀ`` bit for bit, so a saved
    ``Σ`` can be checked for symmetry. ``shape`` (the gradient's) only names it in errors.
    """
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 < weight <= 1.0:
        raise ValueError(f"Invalid {weight=}: must be in (0, 1]")
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"Invalid gram.shape={tuple(gram.shape)}: must be a square (s, s) matrix")
    outer = gram.detach().double()
    if Sigma is not None:
        s = outer.shape[0]
        if Sigma.dim() != 2 or Sigma.shape[0] != s or not 1 < Sigma.shape[1] <= s:
            of = f" for G.shape={shape}" if shape is not None else ""
            raise ValueError(f"Invalid Sigma.shape={tuple(Sigma.shape)}: must be ({s}, {s}) or compact ({s}, k+1){of}")
        outer = (1.0 - weight) * full_second_moment(Sigma.to(device=outer.device)) + weight * outer
    return 0.5 * (outer + outer.mT)


def compact_second_moment(Q: Tensor, root: Tensor, k: int) -> Tensor:
    """``Σ`` kept low-rank plus isotropic: ``[F | c]``  # (s, k+1) float64, with ``F = Q_k·√(λ_k − σ²)``
    # (s, k) and every entry of ``c`` equal to ``σ² = mean(λ_{k+1..s})``, so that
    ``F Fᵀ + diag(c)`` (:func:`full_second_moment`) keeps the top ``k`` eigenpairs of ``Σ`` and its
    trace, and spreads the rest of the spectrum evenly over the complement.

    ``(Q, √λ)`` is :func:`optimal_basis`'s (descending). ``(s, k+1)`` instead of ``(s, s)`` floats:
    a refresh still draws from the whole ``Σ`` it just formed; only what is carried to the next
    refresh is compressed. Needs ``1 <= k <= s − 2`` (otherwise nothing is saved)."""
    s = Q.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= s - 2:
        raise ValueError(f"Invalid {k=}: must be 1 <= k <= {s - 2} for a ({s}, {s}) Σ")
    lam = root.to(torch.float64).square()  # (s,) descending
    iso = lam[..., k:].mean(dim=-1, keepdim=True)  # (1,) σ²
    F = Q[..., :, :k] * (lam[..., :k] - iso).clamp(min=0.0).sqrt().unsqueeze(-2)  # (s, k)
    return torch.cat([F, iso.unsqueeze(-2).expand(*F.shape[:-1], 1)], dim=-1)  # (s, k+1)


def resolve_sigma_rank(sigma_rank: Optional[int], rank: int) -> int:
    """The ``sigma_rank`` an owner keeps ``Σ`` under: the one given, or the projector's rank ``r``
    where it is ``None`` (the default: ``Σ`` as ``r`` eigenpairs plus an isotropic rest). 0: whole."""
    return rank if sigma_rank is None else sigma_rank


def kept_sigma_columns(s: int, sigma_rank: int) -> int:
    """Columns of the ``Σ`` an owner keeps for a short side ``s``: ``k + 1`` (compact) where
    ``0 < k = sigma_rank <= s − 2``, else ``s`` (the whole ``Σ``, which is then no larger)."""
    return sigma_rank + 1 if 0 < sigma_rank <= s - 2 else s


def kept_second_moment(Sigma: Tensor, sigma_rank: int, spectrum: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
    """What an owner keeps of the whole ``Σ``  # (s, s) it just formed: compact ``(s, k+1)``
    (:func:`compact_second_moment`) where :func:`kept_sigma_columns` says so, else ``Σ`` itself.
    ``spectrum``: ``(Q, √λ)`` of ``Σ`` when the caller already has it (else :func:`optimal_basis`)."""
    s = Sigma.shape[-1]
    if kept_sigma_columns(s, sigma_rank) == s:
        return Sigma
    return compact_second_moment(*(spectrum if spectrum is not None else optimal_basis(Sigma)), sigma_rank)


def is_second_moment_form(shape: tuple, s: int) -> bool:
    """Whether ``shape`` is one an owner keeps ``Σ`` in for a short side ``s``: whole ``(s, s)``, or
    compact ``(s, k+1)`` with ``1 <= k <= s − 2`` (:func:`compact_second_moment`)."""
    return len(shape) == 2 and shape[0] == s and (shape[1] == s or 2 <= shape[1] <= s - 1)


def second_moment_forms(s: int) -> str:
    """The forms of :func:`is_second_moment_form` for a short side ``s``, as error messages name them."""
    return f"({s}, {s})" + (f" or compact ({s}, k+1) with 1 <= k <= {s - 2}" if s > 2 else "")


def convert_second_moment(Sigma: Tensor, sigma_rank: int) -> Tensor:
    """``Σ`` in either form (saved, say, under another ``sigma_rank``) in the form an owner keeps under
    ``sigma_rank`` (:func:`kept_sigma_columns`): itself where it has that form already, else expanded
    (:func:`full_second_moment`) and kept anew (:func:`kept_second_moment`; one ``eigh`` where the
    result is compact). A compact ``Σ`` of ``k`` eigenpairs converted to ``k'`` keeps its top
    ``min(k, k')`` eigenpairs and its trace."""
    s = Sigma.shape[0]
    if Sigma.shape[-1] == kept_sigma_columns(s, sigma_rank):
        return Sigma
    return kept_second_moment(full_second_moment(Sigma), sigma_rank)


def full_second_moment(Sigma: Tensor) -> Tensor:
    """``Σ``  # (s, s) float64 from what the owner keeps: ``Σ`` itself, or the compact ``[F | c]``
    # (s, k+1), k + 1 < s, of :func:`compact_second_moment` as ``F Fᵀ + diag(c)``."""
    S = Sigma.to(torch.float64)
    if S.dim() != 2 or S.shape[1] > S.shape[0] or S.shape[1] == 0:
        raise ValueError(f"Invalid Sigma.shape={tuple(Sigma.shape)}: must be (s, s) or compact (s, k+1) with k + 1 < s")
    if S.shape[0] == S.shape[1]:
        return S
    F, c = S[:, :-1], S[:, -1]  # (s, k), (s,)
    return torch.diag_embed(c) + F @ F.mT


def optimal_basis(Sigma: Tensor) -> tuple[Tensor, Tensor]:
    """``(Q, √λ)`` of ``Σ``  # (..., s, s): eigenvectors (columns, descending eigenvalue) and the
    square roots of the eigenvalues, float64; a stack ``(B, s, s)`` is one batched ``eigh``.

    ``Σ`` is symmetrised and decomposed in float64; eigenvalues at or below ``s·eps·λ_max``
    (rounding noise of a rank-deficient ``Σ``, including negative ones) count as 0, so no
    sampling mass goes to directions no gradient had.
    """
    if Sigma.dim() < 2 or Sigma.shape[-1] != Sigma.shape[-2] or Sigma.shape[-1] == 0:
        raise ValueError(f"Invalid Sigma.shape={tuple(Sigma.shape)}: must be a non-empty square matrix")
    S64 = Sigma.detach().to(dtype=torch.float64)
    if not bool(torch.isfinite(S64).all()):
        raise ValueError("Invalid Sigma: contains non-finite values")
    evals, Q = torch.linalg.eigh(0.5 * (S64 + S64.mT))
    evals, Q = torch.flip(evals, [-1]), torch.flip(Q, [-1])  # descending
    floor = evals.shape[-1] * torch.finfo(torch.float64).eps * evals[..., :1].clamp(min=0.0)
    evals = torch.where(evals > floor, evals, torch.zeros_like(evals))
    return Q, torch.sqrt(evals)


def optimal_probabilities(Sigma: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``(Q, π)``: eigenvectors of ``Σ`` (columns, ``(s, s)``) and ``π ∝ √λ`` water-filled, capped at 1.

    ``Q`` and ``√λ`` from :func:`optimal_basis`. ``π`` is float64 ``(s,)`` with ``Σ π = min(rank, s)``;
    ``π_i = 0`` exactly where ``λ_i = 0`` (no gradient ever has mass there), and if fewer than
    ``rank`` eigenvalues are positive the top ones get ``π = 1`` (see :func:`inclusion_probabilities`).
    """
    if Sigma.dim() != 2:
        raise ValueError(f"Invalid Sigma.shape={tuple(Sigma.shape)}: must be a non-empty square matrix")
    Q, root = optimal_basis(Sigma)
    return Q, inclusion_probabilities(root, rank)


def optimal_projection(
    Sigma: Optional[Tensor],
    rank: int,
    generator: torch.Generator,
    *,
    short_dim: Optional[int] = None,
    uniform_mix: float = 0.0,
    device=None,
) -> Projection:
    """The minimum-variance unbiased design for gradients with second moment ``Σ``.

    ``P = Q[:, J]``  # (s, r), ``d = π_J``  # (r,), ``J`` drawn by exactly-``r`` systematic
    sampling (:func:`systematic_sample`) with marginals ``π`` (:func:`optimal_probabilities`,
    then :func:`mix_uniform` with ``ε = uniform_mix``). ``E[P D⁻¹ Pᵀ] = I`` wherever ``π > 0``, so
    ``E[Ĝ] = G`` for every ``G`` in the span of ``Σ`` (for *every* ``G`` when ``ε > 0``).

    ``Sigma=None`` means no spectral information: the Haar–Stiefel draw
    ``haar_projection(short_dim, rank, generator)`` (``short_dim`` is then required).
    """
    if Sigma is None:
        if short_dim is None:
            raise ValueError("Invalid short_dim=None: Sigma=None (Haar) needs the short side s")
        return haar_projection(short_dim, rank, generator, device=device)
    if short_dim is not None and short_dim != Sigma.shape[0]:
        raise ValueError(f"Invalid {short_dim=}: Sigma is {tuple(Sigma.shape)}")
    Q, pi = optimal_design(Sigma, rank, uniform_mix=uniform_mix)
    return projection_from_design(Q, pi, generator, device=device)


def optimal_design(Sigma: Tensor, rank: int, *, uniform_mix: float = 0.0) -> tuple[Tensor, Tensor]:
    """``(Q, π)`` of :func:`optimal_probabilities` with ``ε = uniform_mix`` of uniform probability mixed in."""
    Q, pi = optimal_probabilities(Sigma, rank)
    return Q, mix_uniform(pi, uniform_mix)


def expected_error(Q: Tensor, pi: Tensor, M: Tensor) -> float:
    """Exact ``E_J ‖P D⁻¹ Pᵀ G − G‖²`` averaged over gradients with second moment ``M = E[G_o G_oᵀ]``.

    ``Q``  # (s, s) orthonormal basis of the design, ``pi``  # (s,) its marginals, ``M``  # (s, s)
    (for one gradient, ``M = G_o G_oᵀ``). With ``a_i = q_iᵀ M q_i`` (the mass along ``q_i``):
    ``Σ_{π_i > 0} (1/π_i − 1)·a_i + Σ_{π_i = 0} a_i`` — the second sum is the squared *bias* of
    directions that are never sampled.
    """
    Q64, pi64 = Q.detach().double(), pi.detach().double().to(Q.device)
    a = ((Q64.mT @ M.detach().double().to(Q.device)) * Q64.mT).sum(1)  # (s,) q_iᵀ M q_i
    picked = pi64 > 0
    return float((a[picked] * (1.0 / pi64[picked] - 1.0)).sum() + a[~picked].sum())


def scaled_projector(proj: Projection, c: float = 1.0) -> Tensor:
    """The paper's ``V = P diag(√(c/d))``  # (s, r): ``E[V Vᵀ] = c·I`` and ``V Vᵀ G / c = P D⁻¹ Pᵀ G``."""
    if not c > 0:
        raise ValueError(f"Invalid {c=}: must be > 0")
    return proj.P * torch.sqrt(c / proj.d)[None, :]
