"""Replicated weights: one process, DDP-averaged gradients, or the owner-sharded data-parallel optimizer.

Every rank holds the whole weight and ``P``  # (s, r). Each target matrix has one owner rank
(:func:`~plumage_ds.distributed.ownership.greedy_ownership`), which alone keeps its moments
``M, V``  # (r, l) and runs its refresh; dense parameters are split into ``W`` flat chunks, rank
``k`` keeping the AdamW moments of chunk ``k`` of every one (ZeRO-1/2 style). Every phase is one
batched collective per tag, never one per matrix:

* targets: ``R_k = Pᵀ G_k`` reduce-scattered to the owners (exact: projection is linear), the
  owners' ``N`` all-gathered back, ``ΔW = deorient(P N)`` on every rank;
* dense: one reduce-scatter of every gradient's chunks (rank ``k``'s segment holds chunk ``k`` of
  every item, padded to ``c = ceil(numel/W)``), AdamW on this rank's chunks, one all-gather of the
  updated chunks — a ring all-reduce's bytes whatever ``W``;
* refresh: the full gradient reduced to the owner only, which sends ``[P, d]`` to every rank.

With no process group (``comm=None``: one process, or every DDP rank running the same optimizer
on averaged gradients) every exchange is the identity, without copies.

Bytes per rank for an ordinary step (ring model, see :mod:`~plumage_ds.distributed.comm`), with
``L = max_o Σ_{owned by o} r·l`` and ``C = Σ_dense ceil(numel/W)``: ``2·(W−1)·4·(L + C)``; with a
balanced plan that is a ring all-reduce of the ``r × l`` compressed gradients and of the dense
ones, versus ``2·(W−1)/W·Σ m·n·4`` for DDP.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ...estimators import orient
from ...kernels.batched import projections
from ..comm import Collectives
from ..owners import gather_from_owners, reduce_to_owners
from .base import REPLICATED, Entry, Layout, chunk_size, is_dtensor


class ReplicatedLayout(Layout):
    """Plain tensors; owner-sharded state over ``comm``'s group (``None``: one process)."""

    case = REPLICATED

    @staticmethod
    def claims(p: Tensor) -> bool:
        return not is_dtensor(p) and not (hasattr(p, "ds_tensor") or hasattr(p, "ds_shape"))

    @classmethod
    def build(cls, params: Sequence[Tensor], *, process_group=None, replicate_group=None, right_projectors: str = "sharded") -> "ReplicatedLayout":
        if replicate_group is not None:
            raise ValueError("Invalid replicate_group: only meaningful for FSDP2 (DTensor) parameters (HSDP)")
        return cls(Collectives(process_group) if process_group is not None else None)

    def describe(self) -> str:
        return self.case if self.comm is None else f"{self.case}, owner-sharded over {self.world_size} ranks"

    # ------------------------------------------------------------------ targets
    def compress(self, entries: Sequence[Entry], grads: Sequence[Optional[Tensor]], P_use: Sequence[Tensor],
                 averaged: Sequence[bool] = (), projected: Sequence[Optional[Tensor]] = (), *,
                 tag: str = "lowrank_grad", dtype: torch.dtype = torch.float32) -> list[Optional[Tensor]]:
        """``R̄ = mean_k Pᵀ G_k``  # (r, l) fp32, on the owner (one reduce-scatter over owner segments).

        Products in ``dtype`` (:func:`~plumage_ds.kernels.batched.projections`). ``projected[i]``:
        ``Pᵀ G_k`` already formed during backward (``backward_projection``)."""
        R = list(projected) if projected else [None] * len(entries)
        todo = [i for i, R_k in enumerate(R) if R_k is None]
        Go = [orient(grads[i], entries[i].left) for i in todo]
        for i, R_k in zip(todo, projections([P_use[i].mT for i in todo], Go, dtype)):
            R[i] = R_k
        return reduce_to_owners(self.comm, R, [e.owner for e in entries], tag)

    def lift(self, entries: Sequence[Entry], N_owned: Sequence[Optional[Tensor]], P_use: Sequence[Tensor], *,
             tag: str = "lowrank_update") -> list[tuple[Tensor, Tensor]]:
        """``ΔW = deorient(P N) = A B``  # (m, n) on every rank, ``N`` all-gathered from the owners:
        ``(A, B) = (P, N)`` for left projections, ``(Nᵀ, Pᵀ)`` for right ones."""
        N_all = gather_from_owners(self.comm, N_owned, [(e.r, e.l) for e in entries], [e.owner for e in entries], tag)
        return [(P, N) if e.left else (N.mT, P.mT) for e, N, P in zip(entries, N_all, P_use)]

    def compress_to_owners(self, entries, grads, P_use, *, tag: str = "lowrank_grad",
                           dtype: torch.dtype = torch.float32) -> list[Optional[Tensor]]:
        """The whole ``R̄``  # (r, l) on each matrix's owner (here: :meth:`compress`)."""
        return self.compress(entries, grads, P_use, tag=tag, dtype=dtype)

    def lift_from_owners(self, entries, O_owned, P_use, *, tag: str = "lowrank_update") -> list[Tensor]:
        """This rank's ``ΔW = deorient(P O)`` from the owner's whole ``O``  # (r, l)."""
        O_all = gather_from_owners(self.comm, O_owned, [(e.r, e.l) for e in entries], [e.owner for e in entries], tag)
        return [orient(P @ O, e.left) for e, O, P in zip(entries, O_all, P_use)]

    def full_to_owners(self, entries, grads, *, tag: str = "full_grad") -> list[Optional[Tensor]]:
        """The averaged whole gradient (stored orientation) on each matrix's owner."""
        return reduce_to_owners(self.comm, list(grads), [e.owner for e in entries], tag)

    def full_from_owners(self, entries, D_owned, *, tag: str = "full_update") -> list[Tensor]:
        """This rank's ``ΔW`` (stored orientation) from the owner's whole one."""
        return gather_from_owners(self.comm, D_owned, [e.shape for e in entries], [e.owner for e in entries], tag)

    # ------------------------------------------------------------------ refresh
    def refresh_inputs(self, entries: Sequence[Entry], grads: Sequence[Tensor], gram_ok: Sequence[bool]) -> list[Optional[tuple]]:
        """Owner: ``("grad", G)`` with the averaged full gradient (``refresh_grad``); ``None`` elsewhere."""
        full = reduce_to_owners(self.comm, list(grads), [e.owner for e in entries], "refresh_grad")
        return [None if G is None else ("grad", G) for G in full]

    def share_projectors(self, entries: Sequence[Entry], new_on_owner: Sequence[Optional[tuple]]) -> list[tuple[Tensor, Tensor]]:
        """Every rank receives the owner's whole ``[P, d]`` (one all-gather over owner segments)."""
        packed = [None if x is None else torch.cat([x[0].reshape(-1), x[1]]) for x in new_on_owner]
        got = gather_from_owners(self.comm, packed, [(e.s * e.r + e.r,) for e in entries], [e.owner for e in entries], "projector")
        return [(f[: e.s * e.r].reshape(e.s, e.r).clone(), f[e.s * e.r :].clone()) for e, f in zip(entries, got)]

    # ------------------------------------------------------------------ dense (flat chunks)
    def reduce_dense(self, entries: Sequence[Entry], grads: Sequence[Tensor], *, tag: str = "dense_grad") -> list[Tensor]:
        """This rank's flat chunk of the mean over ranks of each tensor (one ``reduce_scatter``): 1-D, or
        the tensor's own shape when the chunk is the whole tensor."""
        if self.comm is None or not grads:
            return list(grads)
        W = self.world_size
        sizes = [chunk_size(t.numel(), W) for t in grads]
        send = torch.zeros(W, sum(sizes), dtype=torch.float32, device=grads[0].device)
        off = 0
        for t, c in zip(grads, sizes):
            _scatter_chunks(send[:, off : off + c], t.reshape(-1))
            off += c
        recv = torch.empty(send.shape[1], dtype=torch.float32, device=grads[0].device)
        self.comm.reduce_scatter(recv, send.view(-1), tag)
        recv.div_(W)
        out, off = [], 0
        for t, c in zip(grads, sizes):
            a, b = self.flat_chunk(t.numel())
            chunk = recv[off : off + b - a]
            out.append(chunk.view(t.shape) if chunk.numel() == t.numel() else chunk)
            off += c
        return out

    def gather_dense(self, entries: Sequence[Entry], chunks: Sequence[Tensor], *, tag: str = "dense_update") -> list[Tensor]:
        """Every dense weight assembled from every rank's flat chunk (one ``all_gather``)."""
        if self.comm is None or not entries:
            return list(chunks)
        W = self.world_size
        numels = [int(torch.Size(e.shape).numel()) for e in entries]
        sizes = [chunk_size(n, W) for n in numels]
        mine = torch.zeros(sum(sizes), dtype=torch.float32, device=chunks[0].device if chunks else self._device())
        off = 0
        for t, c in zip(chunks, sizes):
            mine[off : off + t.numel()].copy_(t.reshape(-1))
            off += c
        full = torch.empty(W, mine.numel(), dtype=torch.float32, device=mine.device)
        self.comm.all_gather(full.view(-1), mine, tag)
        out, off = [], 0
        for e, n, c in zip(entries, numels, sizes):
            out.append(full[:, off : off + c].reshape(-1)[:n].view(e.shape))
            off += c
        return out


def _scatter_chunks(rows: Tensor, flat: Tensor) -> None:
    """Row ``k`` of ``rows`` ``(W, c)`` receives chunk ``k`` of ``flat`` (``torch.chunk`` bounds; the rest stays zero)."""
    c = rows.shape[1]
    full = flat.numel() // c if c else 0
    rows[:full].copy_(flat[: full * c].view(full, c))
    if full < rows.shape[0] and full * c < flat.numel():
        rows[full, : flat.numel() - full * c].copy_(flat[full * c :])
