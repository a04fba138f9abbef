"""uniform_mix: a floor on PLUMAGE's probabilities keeps later gradients unbiased."""

from __future__ import annotations

import pytest
import torch

from plumage_ds.estimators import (
    Projection,
    estimate,
    inclusion_probabilities,
    mix_uniform,
    plumage_projection,
    sampler_generator,
)


def test_mix_uniform_keeps_sum_and_floors() -> None:
    """Σp' = Σp, p' >= ε·k/d > 0 everywhere, p' <= 1, and ε = 0 is the identity."""
    sigma = torch.tensor([9.0, 4.0, 1.0, 0.0, 0.0, 0.0])
    p = inclusion_probabilities(sigma, 2)
    assert (p == 0).sum() == 3
    q = mix_uniform(p, 0.1)
    assert float(q.sum()) == pytest.approx(2.0, abs=1e-12)
    assert float(q.min()) >= 0.1 * 2 / 6 - 1e-12 and float(q.max()) <= 1.0
    assert mix_uniform(p, 0.0) is p
    with pytest.raises(ValueError, match=r"Invalid uniform_mix=1.5: must be in \[0, 1\]"):
        mix_uniform(p, 1.5)


def _mean_estimate(G: torch.Tensor, X: torch.Tensor, mix: float, draws: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std-error of P D⁻¹ Pᵀ X over draws of P built from G's spectrum."""
    acc, acc2 = torch.zeros_like(X, dtype=torch.float64), torch.zeros_like(X, dtype=torch.float64)
    for k in range(draws):
        proj = plumage_projection(G, 2, sampler_generator(0, 0, k), svd_method="svd", uniform_mix=mix)
        est = estimate(X, Projection(P=proj.P.double(), d=proj.d.double())).double()
        acc += est
        acc2 += est * est
    mean = acc / draws
    se = ((acc2 / draws - mean * mean).clamp(min=0) / draws).sqrt()
    return mean, se


def test_mix_makes_later_gradients_unbiased() -> None:
    """P from a rank-deficient G: without the mix the estimate of another X is biased, with it unbiased."""
    torch.manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(10, 6, dtype=torch.float64))
    G = (U[:, :3] * torch.tensor([5.0, 2.0, 1.0], dtype=torch.float64)) @ V[:, :3].T  # rank 3 < s = 6
    X = torch.randn(6, 10, dtype=torch.float64)  # a later gradient with energy everywhere
    mean0, _ = _mean_estimate(G.float(), X, 0.0, 100)
    mean1, se1 = _mean_estimate(G.float(), X, 0.2, 1500)
    bias0 = float((mean0 - X).norm() / X.norm())
    assert bias0 > 0.3  # directions with p = 0 are never seen
    z = ((mean1 - X).abs() / (se1 + 1e-12)).max()
    assert float(z) < 5.0, float(z)
