"""Minimum-variance inclusion probabilities (docs/design.md §2.1 item 2).

Pure tensor math: no ``torch.distributed``, no global RNG.
"""

from __future__ import annotations

import torch
from torch import Tensor


def inclusion_probabilities(sigma: Tensor, rank: int) -> Tensor:
    """Water-filling probabilities ``p`` minimising ``Σ σ_i² (1/p_i − 1)`` s.t. ``Σ p_i = rank``.

    Args:
        sigma: singular values ``(d,)``, any order, all ``>= 0``.
        rank: expected number of picks ``r >= 1``.

    Returns:
        ``p`` ``(d,)`` in float64, aligned with ``sigma``, with

        * ``p_i = min(1, c·σ_i)`` for a single water level ``c``;
        * ``Σ p_i = min(rank, d)`` (to float64 rounding);
        * ``0 < p_i <= 1`` wherever ``σ_i > 0``; ``p_i = 0`` where ``σ_i = 0``
          (a zero direction carries no gradient, so never picking it keeps
          ``E[Ĝ] = G``);
        * if fewer than ``rank`` values are positive (rank-deficient ``G``, no tail
          mass to sample from), the top ``rank`` directions get ``p_i = 1``
          deterministically — see :func:`is_deterministic`.

    Water-filling: with ``σ`` sorted descending, take the smallest ``s`` such that
    ``(r − s)·σ_{s+1} <= Σ_{j>s} σ_j``; then ``p_i = 1`` for ``i <= s`` and
    ``p_i = (r − s)·σ_i / Σ_{j>s} σ_j`` otherwise. Ties get equal probabilities.
    """
    if sigma.dim() != 1:
        raise ValueError(f"Invalid sigma.shape={tuple(sigma.shape)}: must be 1-D")
    d = sigma.numel()
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"Invalid {rank=}: must be an integer >= 1")
    if d == 0:
        raise ValueError("Invalid sigma: must have at least one value")
    s64 = sigma.detach().to(device="cpu", dtype=torch.float64)
    bad = ~torch.isfinite(s64) | (s64 < 0)
    if bad.any():
        i = int(torch.nonzero(bad)[0])
        shown = sigma.tolist() if d <= 16 else f"<{d} values>"
        raise ValueError(f"Invalid sigma={shown}: sigma[{i}]={float(s64[i])!r} must be finite and >= 0")
    r = min(rank, d)
    sorted_sigma, order = torch.sort(s64, descending=True, stable=True)
    p_sorted = torch.zeros(d, dtype=torch.float64)
    positive = int((sorted_sigma > 0).sum())
    if r == d or positive <= r:
        p_sorted[:r] = 1.0
    else:
        # tail[s] = Σ_{j >= s} σ_j (0-indexed: σ[s] is the largest value of the tail)
        tail = torch.flip(torch.cumsum(torch.flip(sorted_sigma, [0]), 0), [0])
        s_idx = torch.arange(r, dtype=torch.float64)
        cond = (r - s_idx) * sorted_sigma[:r] <= tail[:r]
        s = int(torch.nonzero(cond)[0])  # cond[r-1] is always true
        c = (r - s) / float(tail[s])
        p_sorted[:s] = 1.0
        p_sorted[s:] = torch.clamp(sorted_sigma[s:] * c, max=1.0)
    p = torch.empty_like(p_sorted)
    p[order] = p_sorted
    return p.to(sigma.device)


def mix_uniform(p: Tensor, eps: float) -> Tensor:
    """``p' = (1 − ε)·p + ε·k/d`` with ``k = Σp``: same sum, every ``p'_i >= ε·k/d > 0``.

    A floor on the probabilities keeps ``E[P D⁻¹ Pᵀ X] = X`` for *every* ``X`` (not
    only the gradient whose spectrum gave ``p``), because no direction of the
    short-side basis is left out, and it bounds ``1/p_i`` — the variance on later
    gradients between refreshes — by ``d/(ε·k)``. ``ε = 0`` returns ``p``.
    """
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0.0 <= eps <= 1.0:
        raise ValueError(f"Invalid uniform_mix={eps!r}: must be in [0, 1]")
    if eps == 0:
        return p
    k = float(p.sum())
    return (1.0 - eps) * p + eps * k / p.numel()


def is_deterministic(p: Tensor) -> bool:
    """True when every probability is 0 or 1 (no randomness left in the design)."""
    return bool(((p == 0) | (p == 1)).all())


def estimator_variance(sigma: Tensor, p: Tensor) -> float:
    """``E‖Ĝ − G‖_F² = Σ σ_i² (1/p_i − 1)`` over ``σ_i > 0`` (docs/design.md §2.1 item 4)."""
    s64 = sigma.detach().double().cpu()
    p64 = p.detach().double().cpu()
    mask = s64 > 0
    return float((s64[mask] ** 2 * (1.0 / p64[mask] - 1.0)).sum())
