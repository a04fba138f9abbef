"""Row-sharded weights (FSDP2 ``fully_shard``, HSDP): the collectives of the ``fsdp_rows`` case.

Each rank of the **shard group** holds rows ``W_k`` of every weight and, after FSDP's
reduce-scatter, the rows ``G_k`` of the gradient averaged over the shard group. The optimizer
math of this case (:mod:`plumage_ds.optim.plumage_adamw`, ``*_fsdp`` functions) runs on those
local rows; this module moves the few things that must cross ranks, batched into one
collective per phase:

* columns: ``reduce_scatter_cols`` sums ``(r, l)`` partials and leaves each rank its
  ``torch.chunk`` columns; ``all_gather_cols`` is the inverse (every rank gets ``(r, l)``);
* rows: ``all_gather_rows`` assembles a row-sharded ``(s, r)`` projector;
* owners (the SVD of each matrix runs on one rank of the shard group): ``reduce_to_owners``
  (Gram matrices), ``gather_rows_to_owners`` (gradient rows, ``all_to_all``),
  ``scatter_rows_from_owners`` (each rank's rows of the new ``P`` and the whole ``d``,
  ``all_to_all``);
* replicas (compressed HSDP): ``replica_mean`` all-reduces across the **replicate group**
  — the only traffic on the slow inter-node link.

Accounting: shard-group collectives are counted by ``self.comm``, replicate-group ones by
``self.replica_comm``; :meth:`comm_stats` reports both.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..optim.sharding import FSDP_ROWS, chunk_bounds, chunk_size
from .comm import Collectives, first_error
from .data_parallel import DataParallelDistributor


class FSDPDistributor(DataParallelDistributor):
    """Collectives over the shard group of an FSDP2 mesh, plus an optional replicate group.

    Args:
        mesh: the parameters' ``DeviceMesh``: 1-D (FSDP) or 2-D ``(replicate, shard)`` (HSDP
            done by FSDP itself, gradients already averaged across replicas).
        replicate_group: for compressed HSDP: FSDP runs on the shard sub-mesh only and the
            optimizer averages across this group itself, compressing target matrices.
    """

    case = FSDP_ROWS

    def __init__(self, mesh, replicate_group: Optional[dist.ProcessGroup] = None) -> None:
        if mesh.ndim == 2 and replicate_group is not None:
            raise ValueError(
                "Invalid replicate_group: the parameters live on a 2-D (replicate, shard) mesh, so FSDP already "
                "all-reduces their gradients across replicas; for compressed HSDP call fully_shard with the shard "
                "sub-mesh (mesh['shard']) and pass replicate_group=mesh['replicate'].get_group()"
            )
        super().__init__(mesh.get_group(mesh.ndim - 1))
        self.replica_comm = Collectives(replicate_group) if replicate_group is not None else None
        self.replicas = self.replica_comm.world_size if self.replica_comm is not None else 1

    # -- agreement over every rank that holds a copy -----------------------------------
    def any_true(self, flags: Sequence[bool], tag: str = "grad_flags") -> list[bool]:
        t = torch.tensor([1.0 if f else 0.0 for f in flags], dtype=torch.float32, device=self._device())
        self.comm.all_reduce(t, tag, op=dist.ReduceOp.MAX)
        if self.replica_comm is not None:
            self.replica_comm.all_reduce(t, tag, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def agree_error(self, message: Optional[str], tag: str) -> Optional[str]:
        if not self.any_true([message is not None], f"{tag}_agree")[0]:
            return None
        text = first_error(None if message is None else f"rank {dist.get_rank()}: {message}", self.comm.group)
        if self.replica_comm is not None:
            text = first_error(text, self.replica_comm.group)
        return text

    def agree_on(self, lines: list[str], what: str) -> None:
        self.comm.agree_on(lines, what)
        if self.replica_comm is not None:
            self.replica_comm.agree_on(lines, what)

    def set_timeout(self, seconds: Optional[float]) -> None:
        super().set_timeout(seconds)
        if self.replica_comm is not None:
            self.replica_comm.timeout = seconds or None

    # -- columns and rows ----------------------------------------------------------------
    def _chunks(self, n: int) -> tuple[int, list[tuple[int, int]]]:
        return chunk_size(n, self.world_size), [chunk_bounds(n, self.world_size, k) for k in range(self.world_size)]

    def reduce_scatter_cols(self, parts: Sequence[Tensor], tag: str) -> list[Tensor]:
        """Sum over the shard group of each ``(r, l)`` partial; this rank keeps its column chunk."""
        if not parts:
            return []
        W, me = self.world_size, self.rank
        layout = [(p.shape[0], *self._chunks(p.shape[1])) for p in parts]
        seg = sum(r * c for r, c, _ in layout)
        send = torch.zeros(W, seg, dtype=torch.float32, device=parts[0].device)
        off = 0
        for p, (r, c, bounds) in zip(parts, layout):
            blocks = send[:, off : off + r * c].view(W, r, c)
            for k, (a, b) in enumerate(bounds):
                blocks[k, :, : b - a].copy_(p[:, a:b])
            off += r * c
        recv = torch.empty(seg, dtype=torch.float32, device=parts[0].device)
        self.comm.reduce_scatter(recv, send.view(-1), tag)
        out, off = [], 0
        for r, c, bounds in layout:
            a, b = bounds[me]
            out.append(recv[off : off + r * c].view(r, c)[:, : b - a])
            off += r * c
        return out

    def all_gather_cols(self, pieces: Sequence[Tensor], lengths: Sequence[int], tag: str) -> list[Tensor]:
        """Every rank's ``(r, chunk)`` column piece of each matrix, assembled to ``(r, l)``."""
        if not pieces:
            return []
        W, me = self.world_size, self.rank
        layout = [(p.shape[0], *self._chunks(n)) for p, n in zip(pieces, lengths)]
        seg = sum(r * c for r, c, _ in layout)
        mine = torch.zeros(seg, dtype=torch.float32, device=pieces[0].device)
        off = 0
        for p, (r, c, bounds) in zip(pieces, layout):
            a, b = bounds[me]
            mine[off : off + r * c].view(r, c)[:, : b - a].copy_(p)
            off += r * c
        full = torch.empty(W, seg, dtype=torch.float32, device=pieces[0].device)
        self.comm.all_gather(full.view(-1), mine, tag)
        out, off = [], 0
        for (r, c, bounds), n in zip(layout, lengths):
            blocks = full[:, off : off + r * c].view(W, r, c)
            out.append(torch.cat([blocks[k, :, : b - a] for k, (a, b) in enumerate(bounds)], dim=1))
            off += r * c
        return out

    def all_gather_rows(self, pieces: Sequence[Tensor], lengths: Sequence[int], tag: str) -> list[Tensor]:
        """Every rank's ``(chunk, r)`` row piece of each matrix, assembled to ``(s, r)``."""
        return [t.mT for t in self.all_gather_cols([p.mT for p in pieces], lengths, tag)]

    # -- owners --------------------------------------------------------------------------
    def gather_rows_to_owners(
        self, pieces: Sequence[Tensor], rows: Sequence[int], owners: Sequence[int], tag: str
    ) -> list[Optional[Tensor]]:
        """Each matrix's row shards ``(m_k, n)`` assembled to ``(m, n)`` on its owner (one ``all_to_all``)."""
        if not pieces:
            return []
        W, me = self.world_size, self.rank
        device = pieces[0].device
        inp = torch.cat([pieces[i].reshape(-1) for o in range(W) for i in range(len(pieces)) if owners[i] == o])
        in_splits = [sum(pieces[i].numel() for i in range(len(pieces)) if owners[i] == o) for o in range(W)]
        mine = [i for i in range(len(pieces)) if owners[i] == me]
        shard = [[chunk_bounds(rows[i], W, k) for k in range(W)] for i in range(len(pieces))]
        ncols = [pieces[i].shape[1] for i in range(len(pieces))]
        out_splits = [sum((shard[i][k][1] - shard[i][k][0]) * ncols[i] for i in mine) for k in range(W)]
        out = torch.empty(sum(out_splits), dtype=inp.dtype, device=device)
        self.comm.all_to_all(out, inp, out_splits, in_splits, tag)
        parts: dict[int, list[Tensor]] = {i: [] for i in mine}
        off = 0
        for k in range(W):
            for i in mine:
                a, b = shard[i][k]
                parts[i].append(out[off : off + (b - a) * ncols[i]].view(b - a, ncols[i]))
                off += (b - a) * ncols[i]
        return [torch.cat(parts[i], dim=0) if i in parts else None for i in range(len(pieces))]

    def scatter_rows_from_owners(
        self,
        full: Sequence[Optional[Tensor]],
        extras: Sequence[Optional[Tensor]],
        row_bounds: Sequence[Sequence[tuple[int, int]]],
        shapes: Sequence[tuple[int, int]],
        owners: Sequence[int],
        tag: str,
    ) -> list[tuple[Tensor, Tensor]]:
        """Owners send rank ``k`` rows ``row_bounds[i][k]`` of ``full[i]`` ``(s, r)`` and the whole
        ``extras[i]`` ``(r,)``; every rank returns its ``(rows, extras)`` per matrix (one ``all_to_all``)."""
        if not shapes:
            return []
        W, me = self.world_size, self.rank
        n = len(shapes)
        mine = [i for i in range(n) if owners[i] == me]
        device = self._device()
        pieces = []
        for k in range(W):
            for i in mine:
                a, b = row_bounds[i][k]
                pieces += [full[i][a:b].reshape(-1), extras[i].reshape(-1)]
                device = full[i].device
        in_splits = [sum((row_bounds[i][k][1] - row_bounds[i][k][0]) * shapes[i][1] + shapes[i][1] for i in mine) for k in range(W)]
        inp = torch.cat(pieces).float() if pieces else torch.empty(0, device=device)
        out_splits = [
            sum((row_bounds[i][me][1] - row_bounds[i][me][0]) * shapes[i][1] + shapes[i][1] for i in range(n) if owners[i] == o)
            for o in range(W)
        ]
        out = torch.empty(sum(out_splits), dtype=torch.float32, device=device)
        self.comm.all_to_all(out, inp, out_splits, in_splits, tag)
        result: list = [None] * n
        off = 0
        for o in range(W):
            for i in range(n):
                if owners[i] != o:
                    continue
                a, b = row_bounds[i][me]
                r = shapes[i][1]
                rows = out[off : off + (b - a) * r].view(b - a, r)
                off += (b - a) * r
                result[i] = (rows, out[off : off + r])
                off += r
        return result

    def all_reduce_sum(self, tensors: Sequence[Tensor], tag: str) -> list[Tensor]:
        """Sum over the shard group of each tensor (one all-reduce of the packed tensors)."""
        if not tensors:
            return []
        flat = torch.cat([t.reshape(-1) for t in tensors])
        self.comm.all_reduce(flat, tag)
        return self._unpack(flat, tensors)

    def replica_mean(self, tensors: Sequence[Tensor], tag: str) -> list[Tensor]:
        """Mean across the replicate group (compressed HSDP); the tensors themselves without one."""
        if self.replica_comm is None or not tensors:
            return list(tensors)
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        self.replica_comm.all_reduce(flat, tag)
        flat.div_(self.replicas)
        return self._unpack(flat, tensors)

    @staticmethod
    def _unpack(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
        out, off = [], 0
        for t in like:
            out.append(flat[off : off + t.numel()].view(t.shape))
            off += t.numel()
        return out

    # -- accounting ----------------------------------------------------------------------
    def end_step(self) -> None:
        super().end_step()
        if self.replica_comm is not None:
            self.replica_comm.end_step()

    def comm_stats(self) -> dict:
        """The shard group's statistics, with the replicate group's under ``"replicate"``."""
        out = self.comm.comm_stats()
        out["replicate"] = self.replica_comm.comm_stats() if self.replica_comm is not None else None
        return out
