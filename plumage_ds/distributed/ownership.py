"""Deterministic ownership plan: which rank owns each matrix's SVD and Adam state."""

from __future__ import annotations

from typing import Sequence


def greedy_ownership(costs: Sequence[float], state_bytes: Sequence[int], world_size: int) -> list[int]:
    """Longest-processing-time greedy over a combined load.

    Each item's weight is its share of total compute cost (SVD ``~s²·l`` plus
    Adam work) plus its share of total state bytes, so both are balanced. Items
    are placed heaviest first (ties by index) on the rank with the smallest load
    so far (ties by rank). Pure function of its inputs: every rank computes the
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
