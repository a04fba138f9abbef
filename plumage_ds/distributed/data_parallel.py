"""Replicated-weights strategy (DDP-style data parallelism, basis of ZeRO-0/1/2).

docs/design.md §4.1. Target matrices have one owner rank each (:func:`greedy_ownership`:
the SVD and the ``r × l`` Adam moments live there); dense parameters (everything else) are
split into ``W`` flat chunks, one per rank (ZeRO-1/2 style). Every phase of the optimizer maps
onto one batched collective per tag, never one per matrix:

* ``reduce_to_owners``: pack every rank's tensors into one buffer laid out by
  owner (each owner's segment padded to the longest segment), one
  ``reduce_scatter``; each owner receives the sum of its items and divides by
  ``W`` (mean over ranks);
* ``gather_from_owners``: each rank packs the items it owns into its segment,
  one ``all_gather``; every rank unpacks every item;
* ``reduce_scatter_flat`` / ``all_gather_flat``: every item is cut in ``W`` flat chunks
  of ``c = ceil(numel/W)`` elements (``torch.chunk`` bounds, the last ones short or empty);
  rank ``k``'s segment holds chunk ``k`` of every item (padded to ``c``), so one
  ``reduce_scatter`` leaves each rank the mean of its chunks and one ``all_gather``
  reassembles the items.

Bytes per rank for an ordinary step (ring model, see :mod:`.comm`), with
``L_o`` the summed ``r·l`` of the matrices rank ``o`` owns,
``L = max_o L_o`` and ``C = Σ_dense ceil(numel/W)``: ``2·(W−1)·4·L`` for the
compressed gradients and updates plus ``2·(W−1)·4·C`` for the dense ones; with a
balanced plan ``L ≈ Σ r·l / W`` and ``C ≈ Σ numel / W``, i.e. a ring all-reduce of the
``r × l`` compressed gradients and of the dense gradients, versus ``2·(W−1)/W·Σ m·n·4``
(plus the dense part) for DDP.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..optim.plumage_adamw import PlumageAdamW
from ..optim.sharding import chunk_bounds, chunk_size
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

    def flat_chunk(self, numel: int) -> tuple[int, int]:
        return chunk_bounds(numel, self.world_size, self.rank)

    def reduce_scatter_flat(self, tensors: Sequence[Tensor], tag: str) -> list[Tensor]:
        """This rank's flat chunk of the mean over ranks of each tensor (one ``reduce_scatter``)."""
        if not tensors:
            return []
        W = self.world_size
        sizes = [chunk_size(t.numel(), W) for t in tensors]
        seg = sum(sizes)
        send = torch.zeros(W, seg, dtype=torch.float32, device=tensors[0].device)
        off = 0
        for t, c in zip(tensors, sizes):
            _scatter_chunks(send[:, off : off + c], t.reshape(-1))
            off += c
        recv = torch.empty(seg, dtype=torch.float32, device=tensors[0].device)
        self.comm.reduce_scatter(recv, send.view(-1), tag)
        recv.div_(W)
        out, off = [], 0
        for t, c in zip(tensors, sizes):
            a, b = self.flat_chunk(t.numel())
            out.append(_chunk_shaped(recv[off : off + b - a], t.shape))
            off += c
        return out

    def all_gather_flat(self, chunks: Sequence[Tensor], shapes: Sequence[tuple], tag: str) -> list[Tensor]:
        """Every item of ``shapes`` assembled from every rank's flat chunk (one ``all_gather``)."""
        if not shapes:
            return []
        W = self.world_size
        numels = [int(torch.Size(s).numel()) for s in shapes]
        sizes = [chunk_size(n, W) for n in numels]
        device = chunks[0].device if chunks else self._device()
        mine = torch.zeros(sum(sizes), dtype=torch.float32, device=device)
        off = 0
        for t, c in zip(chunks, sizes):
            mine[off : off + t.numel()].copy_(t.reshape(-1))
            off += c
        full = torch.empty(W, mine.numel(), dtype=torch.float32, device=device)
        self.comm.all_gather(full.view(-1), mine, tag)
        out, off = [], 0
        for s, n, c in zip(shapes, numels, sizes):
            out.append(full[:, off : off + c].reshape(-1)[:n].view(s))
            off += c
        return out

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


def _scatter_chunks(rows: Tensor, flat: Tensor) -> None:
    """Row ``k`` of ``rows`` ``(W, c)`` receives chunk ``k`` of ``flat`` (``torch.chunk`` bounds; the rest stays zero)."""
    c = rows.shape[1]
    full = flat.numel() // c if c else 0
    rows[:full].copy_(flat[: full * c].view(full, c))
    if full < rows.shape[0] and full * c < flat.numel():
        rows[full, : flat.numel() - full * c].copy_(flat[full * c :])


def _chunk_shaped(chunk: Tensor, shape: torch.Size) -> Tensor:
    """A chunk that is the whole tensor keeps the tensor's shape; any other chunk stays 1-D."""
    return chunk.view(shape) if chunk.numel() == shape.numel() else chunk


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
