"""Exactly-r sampling without replacement with given marginals, and seeded generators.

Pure tensor math: no ``torch.distributed``, no global RNG.
"""

from __future__ import annotations

import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*parts: int) -> int:
    """Mix integers into one 63-bit seed (order matters; stable across processes)."""
    h = 0x5EED
    for part in parts:
        h = _splitmix64(h ^ (int(part) & _MASK64))
    return h & ((1 << 63) - 1)


def refresh_index(step: int, interval: int) -> int:
    """Which refresh period ``step`` (0-based, updates applied so far) falls in: ``step // interval``."""
    return step // interval


def is_refresh(step: int, interval: int) -> bool:
    """``P`` changes at this step (the first of its period): ``step % interval == 0``."""
    return step % interval == 0


def sampler_generator(seed: int, matrix_id: int, draw_index: int) -> torch.Generator:
    """CPU generator for draw ``draw_index`` of matrix ``matrix_id``.

    Seeded from ``(seed, matrix_id, draw_index)`` only, so every rank and every
    world size draws the same sample, and a resumed run needs no RNG state beyond
    those integers.
    """
    gen = torch.Generator(device="cpu")
    gen.manual_seed(derive_seed(seed, matrix_id, draw_index))
    return gen


def systematic_sample(p: Tensor, generator: torch.Generator) -> Tensor:
    """Systematic ("wheel of fortune") sampling: ``round(Σp)`` distinct indices.

    Cumulative sums ``C_i = Σ_{j<=i} p_j``; one ``u ~ U[0, 1)``; index ``i`` is
    taken when ``[C_{i−1}, C_i)`` holds one of ``u, u+1, …, u+k−1``. Since every
    ``p_i <= 1`` each interval holds at most one point, so the ``k`` indices are
    distinct and ``Pr(i ∈ S) = p_i``.

    Args:
        p: probabilities ``(d,)`` in ``[0, 1]`` summing to an integer ``k`` (to 1e-6).
        generator: CPU generator; the only source of randomness (one uniform).

    Returns:
        Sorted ``int64`` indices ``(k,)`` on CPU.
    """
    if p.dim() != 1 or p.numel() == 0:
        raise ValueError(f"Invalid p.shape={tuple(p.shape)}: must be 1-D and non-empty")
    p64 = p.detach().to(device="cpu", dtype=torch.float64)
    bad = ~torch.isfinite(p64) | (p64 < 0) | (p64 > 1 + 1e-12)
    if bad.any():
        i = int(torch.nonzero(bad)[0])
        raise ValueError(f"Invalid p: p[{i}]={float(p64[i])!r}, every probability must be in [0, 1]")
    total = float(p64.sum())
    k = round(total)
    if k < 1 or abs(total - k) > 1e-6:
        raise ValueError(f"Invalid p: sum(p)={total!r} must be a positive integer")
    cum = torch.cumsum(p64.clamp(max=1.0), 0)
    cum = cum * (k / float(cum[-1]))
    cum[-1] = float(k)
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    points = u + torch.arange(k, dtype=torch.float64)
    idx = torch.searchsorted(cum, points, right=True)
    # Every point is < k, so it belongs to an interval no later than the last positive p.
    # In floats, u + k - 1 can round up to k, or fall in the few-ulp gap between that
    # interval's rounded end and k: clamp so a trailing p = 0 index is never taken.
    last = int(torch.nonzero(p64 > 0)[-1])
    idx = torch.clamp(idx, max=last)
    if torch.unique(idx).numel() != k:  # only reachable through float pathologies
        raise RuntimeError(f"systematic_sample drew duplicate indices {idx.tolist()} from p={p64.tolist()}")
    return idx
