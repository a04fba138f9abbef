"""The layout protocol: how one sharding case places a matrix optimizer's state and moves its tensors.

A matrix optimizer (:mod:`plumage_ds.optim`) plans one :class:`Entry` per distinct parameter and
runs its step as phases over lists of entries; a :class:`Layout` (one per optimizer, picked from the
parameters' placement by :func:`~plumage_ds.distributed.layouts.layout_for`) answers, for its
sharding case, every question whose answer depends on where tensors live. What a layout module
provides (the methods of :class:`Layout`; each case module overrides what differs):

* **claim and build** — :meth:`Layout.claims` (does a parameter belong to this case?),
  :meth:`Layout.build` (the layout for a list of parameters and the optimizer's process groups);
* **plan** — :meth:`Layout.logical_shape`, :meth:`Layout.plan` (this rank's rows of ``P`` and
  columns of ``M, V``), :meth:`Layout.assign_owners`, :meth:`Layout.holds_moments`,
  :meth:`Layout.dense_shape` / :meth:`Layout.dense_piece` (this rank's piece of a dense weight);
* **the step** (PLUMAGE-Adam) — :meth:`Layout.projectors`, :meth:`Layout.whole_projectors`, :meth:`Layout.compress`,
  :meth:`Layout.lift`, :meth:`Layout.reduce_dense`, :meth:`Layout.gather_dense`,
  :meth:`Layout.sum_scalar`; **whole matrices on owners** (GUM's Muon) — :meth:`Layout.compress_to_owners`,
  :meth:`Layout.lift_from_owners`, :meth:`Layout.full_to_owners`, :meth:`Layout.full_from_owners`;
* **the refresh** — :meth:`Layout.refresh_grads`, :meth:`Layout.refresh_inputs`,
  :meth:`Layout.share_projectors`, :meth:`Layout.realignment`;
* **apply** — :meth:`Layout.apply_lifts`, :meth:`Layout.apply_deltas`, :meth:`Layout.apply_dense`;
* **agree** — :attr:`Layout.agreement` (:class:`~plumage_ds.distributed.agreement.Agreement`);
* **checkpoints** — :meth:`Layout.export_state`, :meth:`Layout.chunk_of_full`, :attr:`Layout.symmetric_state`.

Every step method is collective: every rank calls it with the same list structure. Row and column
chunks follow ``torch.chunk`` (what ``DTensor`` ``Shard(dim)`` does): with ``S`` ranks and ``n``
entries, rank ``k`` holds ``[min(k·c, n), min((k+1)·c, n))``, ``c = ceil(n/S)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Sequence

import torch
from torch import Tensor

from ...kernels.batched import apply_lifts, matmuls
from ..agreement import Agreement
from ..comm import Collectives, _device_of
from ..ownership import greedy_ownership

REPLICATED = "replicated"
FSDP_ROWS = "fsdp_rows"
ZERO3_FLAT = "zero3_flat"

EVERY_RANK = -1
"""``owner`` of a dense parameter: no single owner, every rank holds a piece of its state."""


def is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def local(t: Optional[Tensor]) -> Optional[Tensor]:
    """This rank's tensor: ``t.to_local()`` for a DTensor (a view, writes go through), else ``t``."""
    if t is not None and is_dtensor(t):
        return t.to_local()
    return t


def chunk_bounds(n: int, parts: int, index: int) -> tuple[int, int]:
    """``[start, stop)`` of chunk ``index`` of ``n`` entries split in ``parts`` like ``torch.chunk``."""
    c = -(-n // parts)
    return min(index * c, n), min((index + 1) * c, n)


def chunk_size(n: int, parts: int) -> int:
    """``ceil(n / parts)``: the padded size of every chunk."""
    return -(-n // parts)


@dataclass
class Entry:
    """Static facts about one parameter as its optimizer and layout place it (derived, never saved)."""

    index: int  # flattened position over param_groups == matrix id
    param: Tensor
    group: dict
    name: str
    lowrank: bool
    mode: str
    reason: str
    shape: tuple = ()  # logical (global) shape
    case: str = REPLICATED
    left: bool = True
    s: int = 0
    l: int = 0
    r: int = 0
    owner: int = 0
    # this rank's rows of P (oriented short side) and columns of M, V (long side): all of them
    # unless the layout shards the weight (set by Layout.plan)
    p_rows: tuple = (0, 0)
    cols: tuple = (0, 0)
    extra: dict = field(default_factory=dict)  # optimizer-specific facts (e.g. GUM's target position)

    @property
    def local_shape(self) -> tuple:
        """Shape of this rank's piece of the weight (the whole weight unless the layout shards rows)."""
        return tuple(local(self.param).shape) if self.case == FSDP_ROWS else self.shape


class Layout:
    """Base layout: one process or replicated weights, whole tensors, no collectives of its own.

    Subclasses set :attr:`case` and override what their placement changes. ``comm`` is the
    accounted collective layer of the group that holds disjoint pieces of the state (``None``: one
    process), :attr:`agreement` spans every rank of a step.
    """

    case: ClassVar[str] = REPLICATED
    symmetric_state: ClassVar[bool] = False
    """Every rank holds its piece of every state tensor (no owner-only state): DCP saves it as is."""
    supports_backward_projection: ClassVar[bool] = True

    def __init__(self, comm: Optional[Collectives] = None, replica_comm: Optional[Collectives] = None) -> None:
        self.comm = comm
        self.replica_comm = replica_comm
        self.rank = comm.rank if comm is not None else 0
        self.world_size = comm.world_size if comm is not None else 1
        self.agreement = Agreement([c for c in (comm, replica_comm) if c is not None])

    # ------------------------------------------------------------------ claim and build
    @staticmethod
    def claims(p: Tensor) -> bool:
        """Whether parameter ``p`` belongs to this layout's sharding case."""
        raise NotImplementedError

    @classmethod
    def build(cls, params: Sequence[Tensor], *, process_group=None, replicate_group=None,
              right_projectors: str = "sharded") -> "Layout":
        """The layout of ``params`` (all claimed by this class). ``process_group``: the group whose ranks
        share plain-tensor state (``None``: one process); ``replicate_group``: compressed HSDP;
        ``right_projectors``: FSDP2 right projections keep ``P`` row-sharded or whole."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.case

    # ------------------------------------------------------------------ plan
    @staticmethod
    def logical_shape(p: Tensor) -> tuple:
        return tuple(p.shape)

    def plan(self, e: Entry) -> None:
        """This rank's rows of ``P`` and columns of ``M, V`` (whole here)."""
        e.p_rows, e.cols = (0, e.s), (0, e.l)

    def assign_owners(self, costs: Sequence[float], state_bytes: Sequence[int]) -> list[int]:
        return greedy_ownership(costs, state_bytes, self.world_size)

    def holds_moments(self, e: Entry) -> bool:
        """Targets: the owner keeps the moments; dense parameters: every rank keeps its piece."""
        return e.owner in (EVERY_RANK, self.rank)

    def report(self, e: Entry) -> dict:
        """Extra columns of the parameter report."""
        return {}

    def flat_chunk(self, numel: int) -> tuple[int, int]:
        """``[a, b)``: this rank's flat chunk of a dense tensor of ``numel`` elements."""
        return chunk_bounds(numel, self.world_size, self.rank)

    def dense_piece(self, e: Entry) -> Tensor:
        """This rank's piece of a dense weight, which its AdamW updates (a view)."""
        W = local(e.param).detach()
        a, b = self.flat_chunk(W.numel())
        return W if b - a == W.numel() else W.reshape(-1)[a:b]

    def dense_shape(self, e: Entry) -> tuple:
        """Shape of this rank's AdamW moments of a dense parameter (see :meth:`dense_piece`)."""
        n = int(torch.Size(e.shape).numel())
        a, b = self.flat_chunk(n)
        return tuple(e.shape) if b - a == n else (b - a,)

    def dense_in_place(self, dense: Sequence[Entry]) -> bool:
        """Dense AdamW can wait for the commit and run in place: no collective follows it and every
        dense weight is fp32 (one rounding either way)."""
        return self.world_size == 1 and self.replica_comm is None and all(local(e.param).dtype == torch.float32 for e in dense)

    # ------------------------------------------------------------------ the step
    def projectors(self, entries: Sequence[Entry], P_local: Sequence[Tensor]) -> list[Tensor]:
        """The ``P`` each rank projects with (whole here)."""
        return list(P_local)

    def whole_projectors(self, entries: Sequence[Entry], P_local: Sequence[Tensor]) -> list[Tensor]:
        """Every ``P``  # (s, r) whole on every rank (whole here)."""
        return list(P_local)

    def sum_scalar(self, value: float, tag: str) -> float:
        """Sum over the ranks holding disjoint pieces of what the optimizer uses (the clipping norm)."""
        if self.comm is None:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._device())
        self.comm.all_reduce(t, tag)
        return float(t.item())

    def apply_lifts(self, entries: Sequence[Entry], factors: Sequence[tuple[Tensor, Tensor]], decays: Sequence[float], *,
                    in_weight_dtype: bool = False, skip: Optional[Tensor] = None) -> None:
        """``W ← W·(1 − decay) − A B`` on this rank's piece of every target, in place (bf16 weights with
        ``in_weight_dtype``: one GEMM in their own dtype; ``skip``: a step the device may cancel; see
        :func:`~plumage_ds.kernels.batched.apply_lifts`)."""
        apply_lifts([local(e.param) for e in entries], [A for A, _ in factors], [B for _, B in factors], decays,
                    in_weight_dtype=in_weight_dtype, skip=skip)

    def apply_deltas(self, entries: Sequence[Entry], deltas: Sequence[Tensor], decays: Sequence[float]) -> None:
        """``W ← W·(1 − decay) − ΔW`` with ``ΔW`` this rank's piece (stored orientation), fp32 math rounded once."""
        for e, delta, decay in zip(entries, deltas, decays):
            apply_delta(local(e.param), delta, decay)

    def apply_dense(self, e: Entry, W: Tensor) -> None:
        local(e.param).copy_(W)

    def realignment(self, entries: Sequence[Entry], P_new: Sequence[Tensor], P_old: Sequence[Tensor]) -> list[Optional[Tensor]]:
        """``B = P_newᵀ P_old``  # (r, r) where this rank holds the moments (``None`` elsewhere)."""
        mine = [i for i, e in enumerate(entries) if self.holds_moments(e)]
        B: list = [None] * len(entries)
        for i, b in zip(mine, matmuls([P_new[i].mT for i in mine], [P_old[i] for i in mine], dtype=torch.float32)):
            B[i] = b
        return B

    def refresh_grads(self, entries: Sequence[Entry], grads: list[Tensor]) -> tuple[list[Tensor], bool]:
        """The refresh step's gradients and whether they were averaged here (compressed HSDP)."""
        return grads, False

    # ------------------------------------------------------------------ checkpoints
    def export_state(self, e: Entry, key: str, v: Any) -> Any:
        """A state value as saved: a clone (sharded layouts wrap theirs as ``DTensor``)."""
        return v.clone() if torch.is_tensor(v) else v

    def chunk_of_full(self, e: Entry, key: str, v: Any) -> Any:
        """This rank's piece of a whole dense moment (a full state from ``merge_shards``)."""
        n = int(torch.Size(e.shape).numel())
        if key not in ("exp_avg", "exp_avg_sq") or not torch.is_tensor(v) or v.numel() != n:
            return v  # checked (and rejected) by the optimizer
        a, b = self.flat_chunk(n)
        return v.reshape(-1)[a:b].reshape(self.dense_shape(e))

    # ------------------------------------------------------------------ accounting
    def end_step(self) -> None:
        self.agreement.end_step()

    def comm_stats(self) -> dict:
        if self.comm is None:
            return {"world_size": 1, "last_step": {}, "total": {}, "steps": 0}
        return self.comm.comm_stats()

    def _device(self) -> torch.device:
        return _device_of(self.comm.group)


def apply_delta(param: Tensor, delta: Tensor, decay: float) -> None:
    """``W ← W·(1 − decay) − delta`` in fp32, rounded once into ``param``'s dtype."""
    if param.dtype == torch.float32:
        if decay:
            param.mul_(1.0 - decay)
        param.sub_(delta)
    else:
        W = param.float()
        if decay:
            W.mul_(1.0 - decay)
        param.copy_(W.sub_(delta))

