"""Vectorised Monte-Carlo helpers shared by the estimator statistics tests.

Every draw's uniform comes from its own ``sampler_generator(seed, matrix_id, draw)`` exactly as
:func:`~plumage_ds.estimators.systematic_sample` would consume it, so the batched draws are the
real pipeline's draws (each test checks a subset against the unbatched functions).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from plumage_ds.estimators import sampler_generator

Z = 5.0
"""CLT bound in standard errors: per-entry two-sided tail ~6e-7 (×384 entries ~2e-4)."""


@functools.lru_cache(maxsize=None)
def draw_uniforms(seed: int, matrix_id: int, n: int) -> torch.Tensor:
    """``(n,)`` float64: the single uniform ``systematic_sample`` consumes from each generator."""
    return torch.stack(
        [torch.rand((), generator=sampler_generator(seed, matrix_id, k), dtype=torch.float64) for k in range(n)]
    )


def systematic_from_uniforms(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Batched systematic sampling written from DESIGN §2.1 item 3: ``(N,) u → (N, k)`` indices."""
    k = round(float(p.sum()))
    cum = torch.cumsum(p.double(), 0)
    points = u[:, None] + torch.arange(k, dtype=torch.float64)
    return torch.searchsorted(cum, points.contiguous(), right=True)


def lift_batch(G_o: torch.Tensor, U: torch.Tensor, p: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """``Ĝ_k = P_k D_k⁻¹ P_kᵀ G_o`` for every draw: ``(N, s, l)`` fp32, same arithmetic as ``estimate``."""
    P = U.mT[S].mT  # (N, s, r)
    d = p[S].float()  # (N, r)
    return P @ ((P.mT @ G_o) / d[..., None])


@dataclass
class Summary:
    mean: torch.Tensor  # (s, l) float64
    std: torch.Tensor  # (s, l) float64, per-entry empirical std of one draw
    sq_err: torch.Tensor  # (N,) float64: ‖Ĝ_k − G_o‖²

    @classmethod
    def of(cls, G_hat: torch.Tensor, G_o: torch.Tensor) -> "Summary":
        x = G_hat.double()
        err = x - G_o.double()
        return cls(mean=x.mean(0), std=x.std(0), sq_err=(err**2).sum((1, 2)))

    def mse_and_tolerance(self) -> tuple[float, float]:
        """Empirical ``E‖Ĝ − G‖²`` and its ``Z``-standard-error CLT tolerance."""
        n = self.sq_err.numel()
        return float(self.sq_err.mean()), Z * float(self.sq_err.std()) / math.sqrt(n)

    def max_z(self, G_o: torch.Tensor) -> float:
        """``max |mean − G| / (std/√N)`` over entries (unbiased: <= Z with overwhelming probability)."""
        se = self.std / math.sqrt(self.sq_err.numel())
        return float(((self.mean - G_o.double()).abs() / se).max())
