"""GUM's layer-wise sampling (docs/design.md §2.2): pick exactly γ of N_L matrices per period."""

from __future__ import annotations

import torch
from torch import Tensor


def sample_layers(num_layers: int, gamma: int, generator: torch.Generator) -> Tensor:
    """Boolean mask ``(num_layers,)`` with exactly ``min(γ, N_L)`` entries true.

    Uniform over subsets of that size, so each layer is drawn with probability
    ``q = γ / N_L``: the full-rank residual ``(G − PPᵀG)/q`` for drawn layers and the
    low-rank branch ``PPᵀG/(1 − q)`` for the others average to ``G``.
    """
    if num_layers < 1:
        raise ValueError(f"Invalid {num_layers=}: must be >= 1")
    if gamma < 1:
        raise ValueError(f"Invalid {gamma=}: must be >= 1")
    mask = torch.zeros(num_layers, dtype=torch.bool)
    mask[torch.randperm(num_layers, generator=generator)[: min(gamma, num_layers)]] = True
    return mask
