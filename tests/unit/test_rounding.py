"""Unbiased stochastic rounding of the comm hook's coefficients (``estimators/rounding.py``).

Vectorised over N = 20 000 draws (one generator call each), with 5-standard-error CLT bounds:
``E[stochastic_round(x)] = x`` entry by entry, and the quantize → exact integer sum → dequantize
pipeline of W simulated ranks averages to ``mean_k R_k`` for both containers.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from montecarlo import Z

from plumage_ds.estimators.rounding import (
    QUANTIZERS,
    dequantize_rows,
    quantization_levels,
    quantize_rows,
    row_scales,
    stochastic_round,
)

N = 20_000


def _max_z(draws: torch.Tensor, target: torch.Tensor) -> float:
    """``max |mean − target| / (std/√N)`` over entries (std floored: integer-valued targets have none)."""
    d = draws.double()
    se = d.std(0).clamp(min=1e-12) / math.sqrt(d.shape[0])
    return float(((d.mean(0) - target.double()).abs() / se).max())


def test_stochastic_round_is_unbiased_and_adjacent():
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(5, 7, generator=gen) - 0.5) * 20  # fractional parts everywhere in [0, 1)
    q = stochastic_round(x.expand(N, 5, 7), gen)  # (N, 5, 7)
    assert _max_z(q, x) <= Z
    assert bool(((q == torch.floor(x)) | (q == torch.floor(x) + 1)).all())
    # one draw is ⌊x⌋ + Bernoulli(f), f the fractional part: variance f(1 − f), within 5 SE of its estimate
    f = (x - torch.floor(x)).double()
    var = f * (1 - f)
    se_var = torch.sqrt((var * (1 - 3 * var) - var**2).clamp(min=0) / N)  # (μ₄ − σ⁴)/N for a Bernoulli
    assert bool(((q.double().var(0) - var).abs() <= Z * se_var + 1e-12).all())
    exact = torch.tensor([-3.0, 0.0, 2.0])
    assert torch.equal(stochastic_round(exact.expand(10, 3), gen), exact.expand(10, 3))  # integers stay


@pytest.mark.parametrize("quantize", list(QUANTIZERS))
@pytest.mark.parametrize("world", [2, 3])
def test_quantized_sum_over_ranks_is_unbiased_and_exact(quantize, world):
    """W ranks quantize their R_k with the shared row scales; the container sum is exact and the
    dequantized mean is within 5 SE of mean_k R_k in every entry."""
    gen = torch.Generator().manual_seed(1)
    R = torch.randn(world, 4, 6, generator=gen) * torch.tensor([3.0, 1.0, 0.1, 0.0])[None, :, None]  # a zero row
    scale = torch.stack([row_scales(R[k]) for k in range(world)]).amax(0)  # the max-all-reduce
    L = quantization_levels(quantize, world)
    dtype, q_max = QUANTIZERS[quantize]
    q = torch.stack([quantize_rows(R[k].expand(N, 4, 6).reshape(N * 4, 6), scale.repeat(N), L, gen, quantize)
                     for k in range(world)])  # (W, N·4, 6) in the container
    assert q.dtype == dtype and int(q.abs().max()) <= L
    summed = q.sum(0, dtype=dtype)  # what the collective computes, in the container's arithmetic
    assert torch.equal(summed.to(torch.int32), q.to(torch.int32).sum(0))  # no overflow, no rounding
    assert int(summed.abs().max()) <= q_max
    mean = dequantize_rows(summed, scale.repeat(N), L, world).view(N, 4, 6)
    target = R.mean(0)
    assert _max_z(mean, target) <= Z
    assert torch.equal(mean[:, 3], torch.zeros(N, 6))  # a zero row stays exactly zero
    # rounding noise per entry is at most (c_i / L)² / 4 per rank, averaged over W ranks
    bound = (scale.double() / L) ** 2 / 4 / world
    assert bool((mean.double().var(0) <= 1.1 * bound[:, None] + 1e-12).all())


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: quantization_levels("int4", 2), "Invalid quantize='int4': must be one of ['int8', 'fp16'] or None"),
        (lambda: quantization_levels("int8", 0), "Invalid world_size=0: must be an integer >= 1"),
        (lambda: quantization_levels("int8", 128), "Invalid quantize='int8' for world_size=128: fewer than 1 level"),
    ],
)
def test_bad_input_raises(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def test_levels_leave_room_for_the_sum():
    assert quantization_levels("int8", 1) == 127 and quantization_levels("int8", 2) == 63
    assert quantization_levels("fp16", 8) == 256 and quantization_levels("fp16", 2048) == 1
