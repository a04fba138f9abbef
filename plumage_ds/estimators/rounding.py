"""Unbiased stochastic rounding of low-rank coefficients onto a shared integer grid.

Pure tensor math (no ``torch.distributed``). Used by the DDP comm hook to send the compressed
coefficients ``R_k = Pᵀ G_k`` in 1 or 2 bytes instead of 4, so 2–4× the rank fits in the same
bytes, **without giving up** ``E[Ĝ] = G``:

* every rank scales row ``i`` of ``R_k`` by the same ``L / c_i`` (``c_i`` = the largest ``|R_k[i, :]|``
  over ranks, agreed by one small max-all-reduce), so its entries lie in ``[−L, L]``;
* :func:`stochastic_round` maps ``x`` to ``⌊x⌋`` or ``⌊x⌋ + 1`` with probabilities that make
  ``E[q] = x`` exactly; ``|q| <= L``;
* the integers are summed by the collective **exactly**: with ``W`` ranks and ``L = q_max // W``
  every partial sum stays within ``±q_max``, which the container holds exactly (``int8``:
  ``q_max = 127``; ``float16``: every integer up to ``2048 = 2¹¹`` is a float16 number, so the
  fp16 additions of a ring all-reduce never round);
* :func:`dequantize_rows` maps the summed integers back: ``mean_k R_k ≈ c_i/(L·W) · Σ_k q_k``,
  unbiased because each ``q_k`` is.

Rounding noise per entry has variance ``<= (c_i / L)² / 4``; bfloat16 is not offered as a
container because its own additions inside the collective round to nearest (biased).
"""

from __future__ import annotations

import torch
from torch import Tensor

QUANTIZERS: dict[str, tuple[torch.dtype, int]] = {"int8": (torch.int8, 127), "fp16": (torch.float16, 2048)}
"""``name -> (container dtype, q_max)``: integers ``|q| <= q_max`` that sum exactly in the container."""


def quantization_levels(quantize: str, world_size: int) -> int:
    """``L = q_max // W``: per-rank levels such that a sum over ``W`` ranks stays exact."""
    if quantize not in QUANTIZERS:
        raise ValueError(f"Invalid quantize={quantize!r}: must be one of {list(QUANTIZERS)} or None")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"Invalid {world_size=}: must be an integer >= 1")
    levels = QUANTIZERS[quantize][1] // world_size
    if levels < 1:
        raise ValueError(
            f"Invalid quantize={quantize!r} for world_size={world_size}: fewer than 1 level per rank "
            f"(q_max={QUANTIZERS[quantize][1]}); use 'fp16' or no quantization"
        )
    return levels


def stochastic_round(x: Tensor, generator: torch.Generator) -> Tensor:
    """``⌊x⌋ + [u < x − ⌊x⌋]`` with ``u ~ U[0, 1)`` from ``generator``: ``E[q] = x`` exactly.

    Returns integers in ``x``'s floating dtype; ``⌊x⌋ <= q <= ⌊x⌋ + 1`` and an integer ``x`` stays
    itself. (``⌊x + u⌋`` would be the same in exact arithmetic, but ``x + u`` rounds up to the next
    integer for ``u`` close to 1 once ``|x|`` is in the thousands in fp32.)
    """
    floor = torch.floor(x)
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return floor + (u < x - floor).to(x.dtype)


def row_scales(R: Tensor) -> Tensor:
    """``c_i = max_j |R[i, j]|``  # (r,) — this rank's share of the shared scale (max over ranks next)."""
    return R.abs().amax(dim=1)


def quantize_rows(R: Tensor, scale: Tensor, levels: int, generator: torch.Generator, quantize: str) -> Tensor:
    """``q = stochastic_round(R · L / c)`` in ``quantize``'s container  # (r, l); ``|q| <= L``.

    ``scale``  # (r,) must bound ``|R|`` row-wise (the max over ranks); rows with ``c_i = 0`` give 0.
    """
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # (r,)
    x = (R.float() * (levels / safe)[:, None]).clamp_(-levels, levels)
    return stochastic_round(x, generator).to(QUANTIZERS[quantize][0])


def dequantize_rows(q_sum: Tensor, scale: Tensor, levels: int, count: int) -> Tensor:
    """``c_i/(L·count) · Σ_k q_k``  # (r, l) float32: the mean of the ``count`` ranks' ``R_k``."""
    return q_sum.float() * (scale.float() / (levels * count))[:, None]
