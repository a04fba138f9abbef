"""The Adam arithmetic shared by every optimizer in the package, per tensor and on lists.

One convention everywhere (it is GaLore's and Hugging Face's, so the GaLore peer
check can match to 1e-6): ``step_size = lr·sqrt(1 − β2^t)/(1 − β1^t)`` and
``N = M / (sqrt(V) + eps)``. Weight decay is decoupled and applied before the
update: ``W ← W·(1 − lr·wd)``.

The list forms (:func:`adam_moments_foreach`, :func:`adam_direction_foreach`, :func:`adamw_chunks`) run
the same operations in the same order through ``torch._foreach_*``, so they match the per-tensor
functions bit for bit. A step skipped on the device (:func:`skip_constants`: a 0-dim ``skip`` flag
that nobody reads on the host) runs the same operations with constants that leave every tensor as it
was. Pure tensor code: no ``torch.distributed``.
"""

from __future__ import annotations

import math
from typing import Optional

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


def adam_moments_foreach(
    M: list[Tensor], V: list[Tensor], R: list[Tensor], beta1: float, beta2: float
) -> tuple[list[Tensor], list[Tensor]]:
    """Out of place, as :func:`adam_moments`: ``M' = β1 M + (1−β1) R``,
    ``V' = β2 V + (1−β2) R∘R`` (new tensors)."""
    M = torch._foreach_mul(M, beta1)
    torch._foreach_add_(M, R, alpha=1.0 - beta1)
    V = torch._foreach_mul(V, beta2)
    torch._foreach_addcmul_(V, R, R, value=1.0 - beta2)
    return list(M), list(V)


def skip_constants(skip: Optional[Tensor], beta1: float, beta2: float, eps: float, decay: float) -> tuple:
    """``(β1, β2, eps, 1 − decay)`` for a step that ``skip`` (a 0-dim bool tensor, decided on the device)
    may cancel: as 0-dim fp32 tensors on its device, ``(1, 1, ∞, 1)`` where ``skip`` holds — moments
    times 1 plus a zeroed gradient stay, ``M/(√V + ∞) = 0`` moves no weight — and the plain values
    where it does not (a product by a 0-dim fp32 tensor gives the bits of the product by the float).
    ``skip=None``: the floats themselves."""
    if skip is None:
        return beta1, beta2, eps, 1.0 - decay
    return tuple(torch.where(skip, keep, value).to(torch.float32) for keep, value in
                 ((1.0, beta1), (1.0, beta2), (math.inf, eps), (1.0, 1.0 - decay)))


def adam_direction_foreach(M: list[Tensor], V: list[Tensor], eps) -> list[Tensor]:
    """``N = M / (sqrt(V) + eps)`` (new tensors), as :func:`adam_direction` (``eps`` a float or a
    0-dim tensor, see :func:`skip_constants`)."""
    denom = torch._foreach_sqrt(V)
    torch._foreach_add_(denom, eps)
    return list(torch._foreach_div(M, denom))


def adamw_chunks(
    M: list[Optional[Tensor]], V: list[Optional[Tensor]], G: list[Tensor], W: list[Tensor], *,
    beta1: float, beta2: float, eps: float, decay: float, step_size: float, in_place: bool,
    skip: Optional[Tensor] = None,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """AdamW on lists (the arithmetic above): ``M' = β1 M + (1−β1) G``,
    ``V' = β2 V + (1−β2) G²``, ``W' = W·(1 − decay) − step_size · M'/(sqrt(V') + eps)``.

    ``M[i] is None``: zero moments (first step). ``in_place``: ``M, V, W`` are updated and returned
    (zeros are allocated for missing moments). Otherwise ``M', V'`` are new tensors and ``W'`` is
    written into ``W`` — pass fresh fp32 copies (the caller's staging buffers). Both ways run the
    same operations, so they give the same bits. ``skip``: a flag on the device (:func:`skip_constants`)
    that, where it holds, leaves ``M, V, W`` as they were; ``G`` must then be zeros where it holds.
    """
    b1, b2, eps, keep = skip_constants(skip, beta1, beta2, eps, decay)
    M = _decayed(M, G, b1, in_place)
    V = _decayed(V, G, b2, in_place)
    torch._foreach_add_(M, G, alpha=1.0 - beta1)
    torch._foreach_addcmul_(V, G, G, value=1.0 - beta2)
    denom = torch._foreach_sqrt(V)
    torch._foreach_add_(denom, eps)
    if decay:
        torch._foreach_mul_(W, keep)
    torch._foreach_addcdiv_(W, M, denom, value=-step_size)
    return M, V, W


def _decayed(T: list[Optional[Tensor]], like: list[Tensor], beta, in_place: bool) -> list[Tensor]:
    """``β·T`` (in place, or new tensors); zeros where ``T[i] is None``."""
    have = [i for i, t in enumerate(T) if t is not None]
    out: list = [None] * len(T)
    if have:
        src = [T[i] for i in have]
        if in_place:
            torch._foreach_mul_(src, beta)
        else:
            src = list(torch._foreach_mul(src, beta))
        for i, t in zip(have, src):
            out[i] = t
    return [torch.zeros_like(g) if t is None else t for t, g in zip(out, like)]
