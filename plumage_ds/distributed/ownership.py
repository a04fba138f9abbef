"""Deterministic ownership plan: which rank owns each matrix's refresh (and, in the optimizer, its moments).

One cost model (:func:`lowrank_load`) for every user of the plan — the optimizers in every sharding
case and the DDP comm hook — and one greedy balance (:func:`greedy_ownership`).
"""

from __future__ import annotations

from typing import Sequence

from ..estimators.optimal import kept_sigma_columns


def lowrank_load(
    s: int, l: int, r: int, *, decomposes: bool, keeps_moments: bool, keeps_second_moment: bool, sigma_rank: int = 0,
) -> tuple[float, int]:
    """``(compute, state bytes)`` of owning one ``(s, l)`` target matrix at rank ``r``.

    Compute: the refresh decomposition ``s²·l`` (estimators that build ``P`` from the gradient) plus,
    where the owner runs Adam, ``2·r·l`` per step. State: fp32 moments ``2·r·l`` and, for estimators
    that keep a second moment, ``Σ`` in float64: ``s²``, or ``s·(k+1)`` kept compact (``sigma_rank = k``).
    """
    compute = (float(s * s * l) if decomposes else 0.0) + (2.0 * r * l if keeps_moments else 0.0)
    state = (2 * r * l * 4 if keeps_moments else 0) + (8 * s * kept_sigma_columns(s, sigma_rank) if keeps_second_moment else 0)
    return compute, state


def greedy_ownership(costs: Sequence[float], state_bytes: Sequence[int], world_size: int) -> list[int]:
    """Longest-processing-time greedy over a combined load.

    Each item's weight is its share of total compute cost plus its share of total state bytes, so
    both are balanced. Items are placed heaviest first (ties by index) on the rank with the
    smallest load so far (ties by rank). Pure function of its inputs: every rank computes the
    same plan, and so does a resumed run.
    """
    if world_size < 1:
        raise ValueError(f"Invalid {world_size=}: must be >= 1")
    if len(costs) != len(state_bytes):
        raise ValueError(f"Invalid plan inputs: {len(costs)} costs for {len(state_bytes)} state sizes")
    n = len(costs)
    total_cost = float(sum(costs)) or 1.0
    total_bytes = float(sum(state_bytes)) or 1.0
    weight = [costs[i] / total_cost + state_bytes[i] / total_bytes for i in range(n)]
    order = sorted(range(n), key=lambda i: (-weight[i], i))
    load = [0.0] * world_size
    owners = [0] * n
    for i in order:
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[i] = rank
        load[rank] += weight[i]
    return owners
