"""Replicated-weights strategy (DDP-style data parallelism, basis of ZeRO-0/1/2).

docs/design.md §4.1. Each item (a target matrix or a dense parameter) has one owner
rank (:func:`greedy_ownership`). The optimizer's phases map onto batched
collectives, one per phase and tag, never one per matrix:

* ``reduce_to_owners``: pack every rank's tensors into one buffer laid out by
  owner (each owner's segment padded to the longest segment), one
  ``reduce_scatter``; each owner receives the sum of its items and divides by
  ``W`` (mean over ranks);
* ``gather_from_owners``: each rank packs the items it owns into its segment,
  one ``all_gather``; every rank unpacks every item.

Bytes per rank for an ordinary step (ring model, see :mod:`.comm`), with
``L_o`` the summed ``r·l`` of the matrices rank ``o`` owns and
``L = max_o L_o``: ``(W−1)·4·L`` for the compressed-gradient reduce-scatter plus
the same for the update all-gather; with a balanced plan ``L ≈ Σ r·l / W``,
i.e. ``2·(W−1)/W·Σ r·l·4`` — a ring all-reduce of the ``r × l`` compressed
gradients, versus ``2·(W−1)/W·Σ m·n·4`` for DDP.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..optim.plumage_adamw import PlumageAdamW
from .comm import Collectives, _device_of, first_error
from .ownership import greedy_ownership


class DataParallelDistributor:
    """Owner-sharded state over a process group with batched, accounted collectives."""

    def __init__(self, process_group: Optional[dist.ProcessGroup] = None) -> None:
        self.comm = Collectives(process_group)
        self.rank = self.comm.rank
        self.world_size = self.comm.world_size

    # -- plan ------------------------------------------------------------------
    def assign_owners(self, costs: Sequence[float], state_bytes: Sequence[int]) -> list[int]:
        return greedy_ownership(costs, state_bytes, self.world_size)

    # -- layout helpers --------------------------------------------------------
    def _layout(self, numels: Sequence[int], owners: Sequence[int]) -> tuple[list[int], int]:
        """Offset of each item inside its owner's segment, and the segment length."""
        fill = [0] * self.world_size
        offsets = []
        for n, o in zip(numels, owners):
            offsets.append(fill[o])
            fill[o] += n
        return offsets, max(fill) if fill else 0

    # -- collectives -----------------------------------------------------------
    def any_true(self, flags: Sequence[bool], tag: str = "grad_flags") -> list[bool]:
        t = torch.tensor([1.0 if f else 0.0 for f in flags], dtype=torch.float32, device=self._device())
        self.comm.all_reduce(t, tag, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def reduce_to_owners(
        self, tensors: Sequence[Tensor], owners: Sequence[int], tag: str, *, mean: bool = True
    ) -> list[Optional[Tensor]]:
        if not tensors:
            return []
        numels = [t.numel() for t in tensors]
        offsets, seg = self._layout(numels, owners)
        W = self.world_size
        device, dtype = tensors[0].device, tensors[0].dtype
        send = torch.zeros(W * seg, dtype=dtype, device=device)
        for t, o, off in zip(tensors, owners, offsets):
            send[o * seg + off : o * seg + off + t.numel()].copy_(t.reshape(-1))
        recv = torch.empty(seg, dtype=dtype, device=device)
        self.comm.reduce_scatter(recv, send, tag)
        if mean:
            recv.div_(W)
        out: list[Optional[Tensor]] = []
        for t, o, off in zip(tensors, owners, offsets):
            out.append(recv[off : off + t.numel()].view(t.shape) if o == self.rank else None)
        return out

    def gather_from_owners(
        self, tensors: Sequence[Optional[Tensor]], shapes: Sequence[tuple], owners: Sequence[int], tag: str
    ) -> list[Tensor]:
        if not shapes:
            return []
        numels = [int(torch.Size(s).numel()) for s in shapes]
        offsets, seg = self._layout(numels, owners)
        device = next((t.device for t in tensors if t is not None), self._device())
        mine = torch.zeros(seg, dtype=torch.float32, device=device)
        for t, o, off, n in zip(tensors, owners, offsets, numels):
            if o == self.rank:
                if t is None:
                    raise RuntimeError(f"owner rank {self.rank} has no tensor to gather for tag {tag!r}")
                mine[off : off + n].copy_(t.reshape(-1))
        full = torch.empty(self.world_size * seg, dtype=torch.float32, device=device)
        self.comm.all_gather(full, mine, tag)
        return [full[o * seg + off : o * seg + off + n].view(s) for s, o, off, n in zip(shapes, owners, offsets, numels)]

    def sum_scalar(self, value: float, tag: str) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self._device())
        self.comm.all_reduce(t, tag)
        return float(t.item())

    def agree_error(self, message: Optional[str], tag: str) -> Optional[str]:
        if not self.any_true([message is not None], f"{tag}_agree")[0]:
            return None
        return first_error(None if message is None else f"rank {dist.get_rank()}: {message}", self.comm.group)

    def end_step(self) -> None:
        self.comm.end_step()

    def comm_stats(self) -> dict:
        return self.comm.comm_stats()

    def agree_on(self, lines: list[str], what: str) -> None:
        self.comm.agree_on(lines, what)

    def set_timeout(self, seconds: Optional[float]) -> None:
        """Bound every collective wait (``None``/0: the process group's timeout)."""
        self.comm.timeout = seconds or None

    def _device(self) -> torch.device:
        return _device_of(self.comm.group)


class ShardedPlumageAdamW(PlumageAdamW):
    """:class:`PlumageAdamW` with owner-sharded state over ``process_group``.

    Do not wrap the model in DDP: the optimizer reduces gradients itself
    (compressed for target matrices). Each rank calls ``backward`` on its own
    micro-batch and then ``step()``; all ranks must call ``step()`` together.
    """

    _display_name = "ShardedPlumageAdamW"

    def __init__(self, params, *args, process_group: Optional[dist.ProcessGroup] = None, **kwargs) -> None:
        if "distributor" in kwargs:
            raise ValueError("Invalid distributor: ShardedPlumageAdamW builds its own from process_group")
        super().__init__(params, *args, distributor=DataParallelDistributor(process_group), **kwargs)
