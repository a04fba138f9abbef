"""Short-side handling and the spectral decomposition used at refresh.

The one place that decides orientation: a weight ``W`` of shape ``(m, n)`` is
projected from the **left** when ``m < n`` (``P`` is ``(m, r)``, ``R = Pᵀ G`` is
``(r, n)``), otherwise from the right, which is the left projection of ``Gᵀ``.
A square matrix goes right, as in GaLore (galore-torch projects from the right iff
``m >= n``): for top-``r`` both sides give the same ``PPᵀG``, but Adam runs on different
coordinates (``r × n`` vs ``m × r``), so the tie rule decides whether ``estimator="galore"``
reproduces GaLore on square weights (attention projections).
Everything downstream works on the *oriented* matrix ``G_o`` of shape
``(s, l)`` with ``s = min(m, n) <= l``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def is_left(shape: tuple[int, ...] | torch.Size) -> bool:
    """True when ``P`` multiplies from the left (``m < n``; square matrices go right, as in GaLore)."""
    if len(shape) != 2:
        raise ValueError(f"Invalid shape={tuple(shape)}: low-rank projection needs a 2-D matrix")
    return shape[0] < shape[1]


def oriented_shape(shape: tuple[int, ...] | torch.Size) -> tuple[int, int]:
    """``(s, l)``: short side first."""
    m, n = shape
    return (m, n) if m <= n else (n, m)


def orient(X: Tensor, left: bool) -> Tensor:
    """View of ``X`` with the short side first (``X`` if left, ``Xᵀ`` otherwise)."""
    return X if left else X.mT


deorient = orient  # the transpose is its own inverse


def short_side_basis(G: Tensor, method: str = "svd") -> tuple[Tensor, Tensor]:
    """Full short-side singular basis of ``G`` (original orientation).

    Returns ``(U, σ)`` with ``U`` ``(s, s)`` orthonormal columns spanning the short
    side and ``σ`` ``(s,)`` descending, in float32, such that
    ``G_o = U diag(σ) V_oᵀ`` for the oriented ``G_o``.

    ``method="svd"``: ``torch.linalg.svd(G)`` on ``G`` as stored (``U`` if left,
    ``Vᵀ`` rows if right) — GaLore's projector, with its columns' signs put in the canonical form
    of :func:`canonical_signs` (LAPACK builds and devices return either sign).
    ``method="gram"``: ``eigh`` of the ``s × s`` Gram matrix ``G_o G_oᵀ`` in float64
    (about 2× faster than fp32 ``svd`` on CPU; ``σ = sqrt(max(λ, 0))``). Both give the whole spectrum, which
    PLUMAGE needs to stay unbiased. A stack ``(B, m, n)`` gives ``(B, s, s)`` and ``(B, s)`` (batched
    decompositions, each matrix as if alone).
    """
    left = is_left(G.shape[-2:])
    Gf = G.detach().float()
    if method == "svd":
        U, S, Vh = torch.linalg.svd(Gf, full_matrices=False)
        return canonical_signs(U if left else Vh.mT), S
    if method == "gram":
        # float64: squaring the spectrum in fp32 loses every σ below ~3e-4·σ₁ and makes
        # the eigenvectors jump under 1e-7 perturbations of G (reduction order across
        # world sizes); in float64 the Gram route stays about 2× faster than fp32 svd.
        Go = orient(G.detach().double(), left)
        return gram_basis(Go @ Go.mT)
    raise ValueError(f"Invalid svd_method={method!r}: must be one of ['svd', 'gram']")


def canonical_signs(U: Tensor) -> Tensor:
    """``U`` with each column's entry of largest magnitude made positive (the first such entry on ties).

    A decomposition leaves every singular vector's sign free, and CPU and CUDA (or two LAPACK builds,
    or a 1e-8 change of ``G``) pick differently. An estimator that keeps its moments in ``P``'s
    coordinates across refreshes without realigning them (GaLore) would then follow another
    trajectory on every device; in this form ``U`` is a function of the subspace and the
    decomposition's order alone. Works on a stack ``(..., s, k)``.
    """
    pivot = U.abs().argmax(dim=-2, keepdim=True)  # (..., 1, k)
    signs = torch.sign(torch.gather(U, -2, pivot))
    signs[signs == 0] = 1.0
    return U * signs


def gram_basis(gram: Tensor) -> tuple[Tensor, Tensor]:
    """``(U, σ)`` from the short-side Gram matrix ``G_o G_oᵀ``  # (s, s), float64.

    ``U`` (s, s) eigenvectors by descending eigenvalue, ``σ = sqrt(max(λ, 0))``, both float32.
    Used directly when the Gram matrix is assembled from row shards (``Σ_k G_kᵀ G_k``).

    Signs in :func:`canonical_signs`' form, so ``U`` is a continuous function of ``G`` away from
    repeated eigenvalues, on every device. A stack ``(B, s, s)`` is decomposed in one batched ``eigh``.
    """
    evals, evecs = torch.linalg.eigh(gram.double())
    evals = torch.flip(evals, [-1]).clamp(min=0.0)
    U = torch.flip(evecs, [-1])  # (s, s)
    return canonical_signs(U).float(), torch.sqrt(evals).float()
