"""The Adam arithmetic shared by every optimizer in the package.

One convention everywhere (it is GaLore's and Hugging Face's, so the GaLore peer
check can match to 1e-6): ``step_size = lr·sqrt(1 − β2^t)/(1 − β1^t)`` and
``N = M / (sqrt(V) + eps)``. Weight decay is decoupled and applied before the
update: ``W ← W·(1 − lr·wd)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def adam_update_moments(M: Tensor, V: Tensor, R: Tensor, beta1: float, beta2: float) -> None:
    """In place: ``M ← β1 M + (1−β1) R``, ``V ← β2 V + (1−β2) R∘R``."""
    M.mul_(beta1).add_(R, alpha=1.0 - beta1)
    V.mul_(beta2).addcmul_(R, R, value=1.0 - beta2)


def adam_moments(M: Tensor, V: Tensor, R: Tensor, beta1: float, beta2: float) -> tuple[Tensor, Tensor]:
    """Out of place (new tensors, bitwise equal to :func:`adam_update_moments`): ``(M', V')``."""
    return M.mul(beta1).add_(R, alpha=1.0 - beta1), V.mul(beta2).addcmul_(R, R, value=1.0 - beta2)


def adam_step_size(lr: float, step: int, beta1: float, beta2: float) -> float:
    """Bias-corrected step size ``lr·sqrt(1 − β2^t)/(1 − β1^t)`` for step ``t >= 1``."""
    return lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)


def adam_direction(M: Tensor, V: Tensor, eps: float) -> Tensor:
    """``N = M / (sqrt(V) + eps)`` (new tensor)."""
    return M / (V.sqrt().add_(eps))


def zeros_state(shape, device) -> tuple[Tensor, Tensor]:
    """Fresh fp32 Adam moments."""
    return (
        torch.zeros(shape, dtype=torch.float32, device=device),
        torch.zeros(shape, dtype=torch.float32, device=device),
    )
