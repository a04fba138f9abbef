"""FSDP2 / HSDP row shards: every rank holds rows of every weight and its piece of every state tensor.

FSDP2 ``fully_shard`` gives rank ``k`` of the **shard group** rows ``W_k`` (``Shard(0)``) and, after
its reduce-scatter, the rows ``G_k`` of the gradient averaged over the shard group. State is
symmetric and sharded like the weight (exported as ``DTensor`` s, so ``torch.distributed.checkpoint``
saves and reshards it); "owner" is only where a matrix's refresh runs.

* **Left projection** (``m < n``): ``P_k`` = this rank's rows of ``P``; ``Σ_k P_kᵀ G_k`` is
  reduce-scattered by columns (``M, V`` are ``(r, n/S)`` column chunks), ``N`` all-gathered, ``ΔW_k = P_k N``.
* **Right projection** (``m >= n``): ``R_k = (G_k P)ᵀ`` ``(r, m_k)`` is already this rank's columns of
  ``R`` (``M, V`` follow the weight's rows), ``ΔW_k = (P N_k)ᵀ``; ``P``  # (n, r) row-sharded and
  all-gathered each step (``right_projectors="sharded"``) or kept whole (``"replicated"``: no
  optimizer communication on ordinary steps).
* **Refresh** on each matrix's owner: the Gram ``Σ_k G_kᵀ G_k`` (right projections, Gram route) or
  the gathered rows (one all-to-all); each rank receives its rows of ``P`` and the whole ``d``.
* **Compressed HSDP**: FSDP runs on the shard sub-mesh only and this layout averages across the
  **replicate group** itself — target matrices as their pieces of ``R`` (exact: every replica
  projects with the same seeded ``P``), dense shards and refresh gradients uncompressed. That is the
  only optimizer traffic on the slow inter-node link.

Accounting: shard-group collectives are counted by ``comm``, replicate-group ones by
``replica_comm``; :meth:`FSDPRowsLayout.comm_stats` reports both.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ...kernels.batched import matmuls, pack, projections, unpack
from ..comm import Collectives
from ..owners import gather_from_owners, reduce_to_owners
from .base import FSDP_ROWS, Entry, Layout, chunk_bounds, chunk_size, is_dtensor, local


class FSDPRowsLayout(Layout):
    """Row shards of ``mesh``'s last dimension, plus an optional replicate group (compressed HSDP)."""

    case = FSDP_ROWS
    symmetric_state = True
    supports_backward_projection = False

    def __init__(self, mesh, replicate_group: Optional[dist.ProcessGroup] = None, right_projectors: str = "sharded") -> None:
        if mesh.ndim == 2 and replicate_group is not None:
            raise ValueError(
                "Invalid replicate_group: the parameters live on a 2-D (replicate, shard) mesh, so FSDP already "
                "all-reduces their gradients across replicas; for compressed HSDP call fully_shard with the shard "
                "sub-mesh (mesh['shard']) and pass replicate_group=mesh['replicate'].get_group()"
            )
        super().__init__(Collectives(mesh.get_group(mesh.ndim - 1)),
                         Collectives(replicate_group) if replicate_group is not None else None)
        self.mesh = mesh
        self.replicas = self.replica_comm.world_size if self.replica_comm is not None else 1
        self.right_projectors = right_projectors

    @staticmethod
    def claims(p: Tensor) -> bool:
        if not is_dtensor(p):
            return False
        from torch.distributed.tensor import Replicate, Shard

        return tuple(p.placements) in ((Shard(0),), (Replicate(), Shard(0)))

    @classmethod
    def build(cls, params, *, process_group=None, replicate_group=None, right_projectors: str = "sharded") -> "FSDPRowsLayout":
        meshes = []
        for p in params:
            if all(p.device_mesh != m for m in meshes):
                meshes.append(p.device_mesh)
        if len(meshes) > 1:
            raise ValueError(f"Invalid parameters: FSDP2 parameters on {len(meshes)} different device meshes")
        if process_group is not None:
            raise ValueError("Invalid process_group: FSDP2 parameters bring their own (the shard group of their mesh)")
        return cls(meshes[0], replicate_group=replicate_group, right_projectors=right_projectors)

    def describe(self) -> str:
        return f"{self.case} over {self.world_size} shards" + (f" x {self.replicas} replicas" if self.replicas > 1 else "")

    # ------------------------------------------------------------------ plan
    def plan(self, e: Entry) -> None:
        """This rank's rows of ``P`` and columns of ``M, V`` (``torch.chunk`` over the shard group)."""
        k, S = self.rank, self.world_size
        rows = chunk_bounds(e.shape[0], S, k)  # the weight's rows held here
        if tuple(local(e.param).shape) != (rows[1] - rows[0], e.shape[1]):
            raise ValueError(
                f"Invalid parameter {e.name!r}: local shard {tuple(local(e.param).shape)} is not rows {rows} of "
                f"{e.shape} (expected FSDP2's even row split over {S} ranks)"
            )
        if e.left:  # P rows follow the weight's rows; M, V columns are chunks of n
            e.p_rows, e.cols = rows, chunk_bounds(e.l, S, k)
        else:  # M, V columns are the weight's rows; P (n, r) split by rows of n, or whole
            e.p_rows = (0, e.s) if self.right_projectors == "replicated" else chunk_bounds(e.s, S, k)
            e.cols = rows

    def holds_moments(self, e: Entry) -> bool:
        return True

    def report(self, e: Entry) -> dict:
        return {"projector": "rows" if e.p_rows != (0, e.s) else "replicated"} if e.lowrank else {}

    def dense_piece(self, e: Entry) -> Tensor:
        return local(e.param).detach()

    def dense_shape(self, e: Entry) -> tuple:
        return e.local_shape

    def chunk_of_full(self, e: Entry, key: str, v):
        return v  # FSDP2 state is never merged: DCP reshards it

    def _p_rows(self, e: Entry, k: int) -> tuple[int, int]:
        """Rows of ``P`` held by shard rank ``k``."""
        if e.p_rows == (0, e.s) and not e.left:  # right projector kept whole on every rank
            return (0, e.s)
        return chunk_bounds(e.s, self.world_size, k)

    # ------------------------------------------------------------------ the step
    def projectors(self, entries, P_local) -> list[Tensor]:
        """Left: this rank's rows ``P_k``; right: the whole ``P`` (all-gathered when row-sharded)."""
        right = [i for i, e in enumerate(entries) if not e.left]
        out = list(P_local)
        for i, P in zip(right, self.whole_projectors([entries[i] for i in right], [P_local[i] for i in right])):
            out[i] = P
        return out

    def whole_projectors(self, entries, P_local) -> list[Tensor]:
        """Every row-sharded ``P`` all-gathered (one collective)."""
        gather = [i for i, e in enumerate(entries) if e.p_rows != (0, e.s)]
        out = list(P_local)
        for i, P in zip(gather, self._all_gather_rows([P_local[i] for i in gather], [entries[i].s for i in gather], "projector_gather")):
            out[i] = P
        return out

    def compress(self, entries, grads, P_use, averaged=(), projected=(), *, tag: str = "lowrank_grad",
                 dtype: torch.dtype = torch.float32) -> list[Tensor]:
        """This rank's columns of ``R̄ = Pᵀ G_o`` (averaged across replicas under compressed HSDP).

        Left: ``Σ_k P_kᵀ G_k`` reduce-scattered by columns ``(r, n/S)``. Right: ``(G_k P)ᵀ``
        ``(r, m_k)`` is already this rank's columns. Collectives: one reduce-scatter (shard group),
        one all-reduce of the compressed pieces (replicate group).
        """
        left = [i for i, e in enumerate(entries) if e.left]
        R: list = [None] * len(entries)
        right = self._right(entries)
        partial = projections([P_use[i].mT for i in left], [grads[i] for i in left], dtype)  # (r, n) partial sums
        for i, part in zip(left, self._reduce_scatter_cols(partial, tag)):
            R[i] = part
        for i, GP in zip(right, projections([grads[i] for i in right], [P_use[i] for i in right], dtype)):
            R[i] = GP.mT  # (r, m_k)
        sync = [i for i in range(len(entries)) if not (averaged and averaged[i])]
        for i, t in zip(sync, self.replica_mean([R[i] for i in sync], tag)):
            R[i] = t
        return R

    def lift(self, entries, N_owned, P_use, *, tag: str = "lowrank_update") -> list[tuple[Tensor, Tensor]]:
        """``ΔW_k = A B``  # (m_k, n): left ``P_k N`` (``N`` all-gathered by columns), right ``N_kᵀ Pᵀ``."""
        left = [i for i, e in enumerate(entries) if e.left]
        N_full = self._all_gather_cols([N_owned[i] for i in left], [entries[i].l for i in left], tag)
        factors: list = [None] * len(entries)
        for i, N in zip(left, N_full):
            factors[i] = (P_use[i], N)
        for i in self._right(entries):
            factors[i] = (N_owned[i].mT, P_use[i].mT)
        return factors

    def compress_to_owners(self, entries, grads, P_use, *, tag: str = "lowrank_grad",
                           dtype: torch.dtype = torch.float32) -> list[Optional[Tensor]]:
        """The whole ``R̄``  # (r, l) on each matrix's owner: left ``Σ_k P_kᵀ G_k`` reduced to it, right
        the columns ``(G_k P)ᵀ`` gathered to it; then averaged across replicas."""
        left, right = [i for i, e in enumerate(entries) if e.left], self._right(entries)
        R: list = [None] * len(entries)
        partial = projections([P_use[i].mT for i in left], [grads[i] for i in left], dtype)
        for i, t in zip(left, reduce_to_owners(self.comm, partial, [entries[i].owner for i in left], tag, mean=False)):
            R[i] = t
        cols = projections([grads[i] for i in right], [P_use[i] for i in right], dtype)  # (m_k, r)
        for i, t in zip(right, self.gather_rows_to_owners(cols, [entries[i].l for i in right], [entries[i].owner for i in right], tag)):
            R[i] = None if t is None else t.mT
        return self._replica_mean_owned(R, tag)

    def lift_from_owners(self, entries, O_owned, P_use, *, tag: str = "lowrank_update") -> list[Tensor]:
        """This rank's ``ΔW_k`` from the owner's whole ``O``  # (r, l): left ``P_k O``, right ``(P O_k)ᵀ``."""
        O_all = gather_from_owners(self.comm, O_owned, [(e.r, e.l) for e in entries], [e.owner for e in entries], tag)
        out = []
        for e, O, P in zip(entries, O_all, P_use):
            if e.left:
                out.append(P @ O)
            else:
                a, b = e.cols
                out.append((P @ O[:, a:b]).mT)
        return out

    def full_to_owners(self, entries, grads, *, tag: str = "full_grad") -> list[Optional[Tensor]]:
        """The whole gradient ``(m, n)`` on each matrix's owner (rows gathered, averaged across replicas)."""
        full = self.gather_rows_to_owners(list(grads), [e.shape[0] for e in entries], [e.owner for e in entries], tag)
        return self._replica_mean_owned(full, tag)

    def full_from_owners(self, entries, D_owned, *, tag: str = "full_update") -> list[Tensor]:
        """This rank's rows of the owner's whole ``ΔW``  # (m, n) (one all-to-all)."""
        bounds = [[chunk_bounds(e.shape[0], self.world_size, k) for k in range(self.world_size)] for e in entries]
        got = self.scatter_rows_from_owners(D_owned, None, bounds, [tuple(e.shape) for e in entries],
                                            [e.owner for e in entries], tag)
        return [rows for rows, _ in got]

    def reduce_dense(self, entries, grads, *, tag: str = "dense_grad") -> list[Tensor]:
        return self.replica_mean(grads, tag)

    def gather_dense(self, entries, new_W, *, tag: str = "dense_update") -> list[Tensor]:
        return list(new_W)

    # ------------------------------------------------------------------ refresh
    def refresh_grads(self, entries, grads) -> tuple[list[Tensor], bool]:
        """Compressed HSDP: the refresh gradients averaged across replicas (uncompressed, every ``τ`` steps)."""
        return self.replica_mean(grads, "refresh_grad"), self.replica_comm is not None

    def refresh_inputs(self, entries, grads, gram_ok) -> list[Optional[tuple]]:
        """Owner: ``("gram", G_oG_oᵀ)`` for right projections on the Gram route (Gram matrices of the row
        shards summed, float64), else ``("grad", G)`` (rows gathered, one all-to-all)."""
        gram = [i for i, e in enumerate(entries) if not e.left and gram_ok[i]]
        rows = [i for i in range(len(entries)) if i not in set(gram)]
        out: list = [None] * len(entries)
        G64 = [grads[i].double() for i in gram]
        partial = matmuls([G.mT for G in G64], G64)
        for i, S in zip(gram, reduce_to_owners(self.comm, partial, [entries[i].owner for i in gram], "refresh_gram", mean=False)):
            out[i] = None if S is None else ("gram", S)
        full = self.gather_rows_to_owners([grads[i] for i in rows], [entries[i].shape[0] for i in rows],
                                          [entries[i].owner for i in rows], "refresh_grad")
        for i, G in zip(rows, full):
            out[i] = None if G is None else ("grad", G)
        return out

    def share_projectors(self, entries, new_on_owner) -> list[tuple[Tensor, Tensor]]:
        """Each rank receives its rows of the owner's ``P`` and the whole ``d`` (one all-to-all)."""
        bounds = [[self._p_rows(e, k) for k in range(self.world_size)] for e in entries]
        return self.scatter_rows_from_owners(
            [None if x is None else x[0] for x in new_on_owner], [None if x is None else x[1] for x in new_on_owner],
            bounds, [(e.s, e.r) for e in entries], [e.owner for e in entries], "projector",
        )

    def realignment(self, entries, P_new, P_old) -> list[Tensor]:
        """``B = Σ_k P_new,kᵀ P_old,k``  # (r, r): summed over the shard group where ``P`` is row-sharded."""
        B = matmuls([Pn.mT for Pn in P_new], list(P_old), dtype=torch.float32)
        split = [i for i, e in enumerate(entries) if e.p_rows != (0, e.s)]
        for i, t in zip(split, self._all_reduce_sum([B[i] for i in split], "realign")):
            B[i] = t
        return B

    # ------------------------------------------------------------------ checkpoints
    def export_state(self, e: Entry, key: str, v):
        """State sharded like the weight as a ``DTensor`` on the weight's mesh (DCP reshards it)."""
        v = super().export_state(e, key, v)
        if not torch.is_tensor(v):
            return v
        if e.lowrank:
            if key in ("exp_avg", "exp_avg_sq"):
                return _wrap_like(e.param, v, (e.r, e.l), 1)
            if key == "P" and e.p_rows != (0, e.s):
                return _wrap_like(e.param, v, (e.s, e.r), 0)
        elif key in ("exp_avg", "exp_avg_sq"):
            return _wrap_like(e.param, v, e.shape, 0)
        return v

    # ------------------------------------------------------------------ collectives of this case
    @staticmethod
    def _right(entries) -> list[int]:
        return [i for i, e in enumerate(entries) if not e.left]

    def _chunks(self, n: int) -> tuple[int, list[tuple[int, int]]]:
        return chunk_size(n, self.world_size), [chunk_bounds(n, self.world_size, k) for k in range(self.world_size)]

    def _reduce_scatter_cols(self, parts: Sequence[Tensor], tag: str) -> list[Tensor]:
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

    def _all_gather_cols(self, pieces: Sequence[Tensor], lengths: Sequence[int], tag: str) -> list[Tensor]:
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
        for r, c, bounds in layout:
            blocks = full[:, off : off + r * c].view(W, r, c)
            out.append(torch.cat([blocks[k, :, : b - a] for k, (a, b) in enumerate(bounds)], dim=1))
            off += r * c
        return out

    def _all_gather_rows(self, pieces: Sequence[Tensor], lengths: Sequence[int], tag: str) -> list[Tensor]:
        """Every rank's ``(chunk, r)`` row piece of each matrix, assembled to ``(s, r)``."""
        return [t.mT for t in self._all_gather_cols([p.mT for p in pieces], lengths, tag)]

    def gather_rows_to_owners(self, pieces: Sequence[Tensor], rows: Sequence[int], owners: Sequence[int], tag: str) -> list[Optional[Tensor]]:
        """Each matrix's row shards ``(m_k, n)`` assembled to ``(m, n)`` on its owner (one ``all_to_all``)."""
        if not pieces:
            return []
        W, me, n = self.world_size, self.rank, len(pieces)
        inp = torch.cat([pieces[i].reshape(-1) for o in range(W) for i in range(n) if owners[i] == o])
        in_splits = [sum(pieces[i].numel() for i in range(n) if owners[i] == o) for o in range(W)]
        mine = [i for i in range(n) if owners[i] == me]
        shard = [[chunk_bounds(rows[i], W, k) for k in range(W)] for i in range(n)]
        ncols = [pieces[i].shape[1] for i in range(n)]
        out_splits = [sum((shard[i][k][1] - shard[i][k][0]) * ncols[i] for i in mine) for k in range(W)]
        out = torch.empty(sum(out_splits), dtype=inp.dtype, device=pieces[0].device)
        self.comm.all_to_all(out, inp, out_splits, in_splits, tag)
        parts: dict[int, list[Tensor]] = {i: [] for i in mine}
        off = 0
        for k in range(W):
            for i in mine:
                a, b = shard[i][k]
                parts[i].append(out[off : off + (b - a) * ncols[i]].view(b - a, ncols[i]))
                off += (b - a) * ncols[i]
        return [torch.cat(parts[i], dim=0) if i in parts else None for i in range(n)]

    def scatter_rows_from_owners(self, full, extras, row_bounds, shapes, owners, tag) -> list[tuple[Tensor, Optional[Tensor]]]:
        """Owners send rank ``k`` rows ``row_bounds[i][k]`` of ``full[i]`` ``(s, c)`` and, if given, the whole
        ``extras[i]`` ``(c,)``; every rank returns its ``(rows, extra)`` per matrix (one ``all_to_all``)."""
        if not shapes:
            return []
        W, me, n = self.world_size, self.rank, len(shapes)
        width = [c + (c if extras is not None else 0) for _, c in shapes]  # per row of P: c, plus d once
        mine = [i for i in range(n) if owners[i] == me]
        device = self._device()
        pieces = []
        for k in range(W):
            for i in mine:
                a, b = row_bounds[i][k]
                pieces.append(full[i][a:b].reshape(-1))
                if extras is not None:
                    pieces.append(extras[i].reshape(-1))
                device = full[i].device

        def size(i: int, k: int) -> int:
            a, b = row_bounds[i][k]
            return (b - a) * shapes[i][1] + (width[i] - shapes[i][1])

        in_splits = [sum(size(i, k) for i in mine) for k in range(W)]
        inp = torch.cat(pieces).float() if pieces else torch.empty(0, device=device)
        out_splits = [sum(size(i, me) for i in range(n) if owners[i] == o) for o in range(W)]
        out = torch.empty(sum(out_splits), dtype=torch.float32, device=device)
        self.comm.all_to_all(out, inp, out_splits, in_splits, tag)
        result: list = [None] * n
        off = 0
        for o in range(W):
            for i in range(n):
                if owners[i] != o:
                    continue
                a, b = row_bounds[i][me]
                c = shapes[i][1]
                rows = out[off : off + (b - a) * c].view(b - a, c)
                off += (b - a) * c
                extra = None
                if extras is not None:
                    extra = out[off : off + c]
                    off += c
                result[i] = (rows, extra)
        return result

    def _all_reduce_sum(self, tensors: Sequence[Tensor], tag: str) -> list[Tensor]:
        """Sum over the shard group of each tensor (one all-reduce of the packed tensors)."""
        if not tensors:
            return []
        flat = pack(tensors)
        self.comm.all_reduce(flat, tag)
        return unpack(flat, [t.shape for t in tensors])

    def replica_mean(self, tensors: Sequence[Tensor], tag: str) -> list[Tensor]:
        """Mean across the replicate group (compressed HSDP); the tensors themselves without one."""
        if self.replica_comm is None or not tensors:
            return list(tensors)
        flat = pack(tensors, dtype=torch.float32)
        self.replica_comm.all_reduce(flat, tag)
        flat.div_(self.replicas)
        return unpack(flat, [t.shape for t in tensors])

    def _replica_mean_owned(self, owned: list[Optional[Tensor]], tag: str) -> list[Optional[Tensor]]:
        """:meth:`replica_mean` of the items this rank owns (the same owners in every replica)."""
        mine = [i for i, t in enumerate(owned) if t is not None]
        out = list(owned)
        for i, t in zip(mine, self.replica_mean([owned[i] for i in mine], tag)):
            out[i] = t
        return out

    def comm_stats(self) -> dict:
        """The shard group's statistics, with the replicate group's under ``"replicate"``."""
        out = self.comm.comm_stats()
        out["replicate"] = self.replica_comm.comm_stats() if self.replica_comm is not None else None
        return out


def _wrap_like(p: Tensor, t: Tensor, shape: tuple, dim: int) -> Tensor:
    """``t`` (this rank's chunk along ``dim`` of a tensor of ``shape``) as a DTensor on ``p``'s mesh."""
    from torch.distributed.tensor import DTensor, Shard

    stride = torch.empty(shape, device="meta").stride()
    placements = tuple(p.placements[:-1]) + (Shard(dim),)
    return DTensor.from_local(t, p.device_mesh, placements, run_check=False, shape=torch.Size(shape), stride=stride)
