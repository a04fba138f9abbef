"""Collectives by owner: each item lives on one rank, batched into one collective per call.

* :func:`reduce_to_owners` — pack every rank's items into one buffer laid out by owner (each owner's
  segment padded to the longest), one ``reduce_scatter``; each owner receives the sum (or mean) of
  its items;
* :func:`gather_from_owners` — each owner packs its items into its segment, one ``all_gather``;
  every rank unpacks every item.

``comm=None`` is one process: every item is its own owner's and both are the identity (no copies).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .comm import Collectives, _device_of


def _layout(numels: Sequence[int], owners: Sequence[int], world: int) -> tuple[list[int], int]:
    """Offset of each item inside its owner's segment, and the segment length."""
    fill = [0] * world
    offsets = []
    for n, o in zip(numels, owners):
        offsets.append(fill[o])
        fill[o] += n
    return offsets, max(fill) if fill else 0


def reduce_to_owners(
    comm: Optional[Collectives], tensors: Sequence[Tensor], owners: Sequence[int], tag: str, *, mean: bool = True
) -> list[Optional[Tensor]]:
    """Mean (or sum) over ranks of each tensor, delivered to its owner only (``None`` elsewhere)."""
    if comm is None:
        return list(tensors)
    if not tensors:
        return []
    W = comm.world_size
    offsets, seg = _layout([t.numel() for t in tensors], owners, W)
    device, dtype = tensors[0].device, tensors[0].dtype
    send = torch.zeros(W * seg, dtype=dtype, device=device)
    for t, o, off in zip(tensors, owners, offsets):
        send[o * seg + off : o * seg + off + t.numel()].copy_(t.reshape(-1))
    recv = torch.empty(seg, dtype=dtype, device=device)
    comm.reduce_scatter(recv, send, tag)
    if mean:
        recv.div_(W)
    return [recv[off : off + t.numel()].view(t.shape) if o == comm.rank else None for t, o, off in zip(tensors, owners, offsets)]


def gather_from_owners(
    comm: Optional[Collectives], tensors: Sequence[Optional[Tensor]], shapes: Sequence[tuple], owners: Sequence[int], tag: str
) -> list[Tensor]:
    """Every rank receives every tensor from its owner (owners pass the tensor, others ``None``); fp32."""
    if comm is None:
        return list(tensors)  # type: ignore[arg-type]
    if not shapes:
        return []
    numels = [int(torch.Size(s).numel()) for s in shapes]
    offsets, seg = _layout(numels, owners, comm.world_size)
    device = next((t.device for t in tensors if t is not None), _device_of(comm.group))
    mine = torch.zeros(seg, dtype=torch.float32, device=device)
    for t, o, off, n in zip(tensors, owners, offsets, numels):
        if o == comm.rank:
            if t is None:
                raise RuntimeError(f"owner rank {comm.rank} has no tensor to gather for tag {tag!r}")
            mine[off : off + n].copy_(t.reshape(-1))
    full = torch.empty(comm.world_size * seg, dtype=torch.float32, device=device)
    comm.all_gather(full, mine, tag)
    return [full[o * seg + off : o * seg + off + n].view(s) for s, o, off, n in zip(shapes, owners, offsets, numels)]
