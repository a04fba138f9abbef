"""The one thin layer every collective of the package goes through, with byte accounting.

Each call records, under its ``tag`` (what the bytes are: ``lowrank_grad``,
``projector``, ``dense_grad`` …) and its ``kind`` (the collective):

* ``calls``;
* ``payload``: bytes of the tensor handed to the collective on this rank;
* ``bytes``: bytes this rank sends under the bandwidth-optimal (ring) algorithm
  of that collective, with ``W`` ranks and ``S`` the payload size:

  ======================  ==========================
  all_reduce              ``2·(W−1)/W · S``
  reduce_scatter          ``(W−1)/W · S`` (S = input)
  all_gather              ``(W−1)/W · S`` (S = output)
  broadcast, reduce       ``(W−1)/W · S``
  all_to_all              what leaves this rank: ``S`` minus its own split
  ======================  ==========================

These are measured from the actual tensors and calls, never computed from
model shapes; tests compare them against formulas derived from the collectives.
Statistics are kept per step (``end_step`` closes a step: ``last_step`` is then the step
just finished) and in total.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

_RING_FACTOR = {
    "all_reduce": lambda w: 2.0 * (w - 1) / w,
    "reduce_scatter": lambda w: (w - 1) / w,
    "all_gather": lambda w: (w - 1) / w,
    "broadcast": lambda w: (w - 1) / w,
    "reduce": lambda w: (w - 1) / w,
}


# torch 2.13 renamed the flat-tensor collectives (the old names warn); keep both working
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


class CommStats:
    """Per-step and total counters keyed by ``(tag, kind)``."""

    def __init__(self) -> None:
        self.total: dict = defaultdict(lambda: {"calls": 0, "bytes": 0.0, "payload": 0})
        self.current: dict = defaultdict(lambda: {"calls": 0, "bytes": 0.0, "payload": 0})
        self.last_step: dict = {}
        self.steps = 0

    def record(self, tag: str, kind: str, payload: int, wire: float) -> None:
        for table in (self.total, self.current):
            row = table[f"{tag}/{kind}"]
            row["calls"] += 1
            row["bytes"] += wire
            row["payload"] += payload

    def end_step(self) -> None:
        """Close a step: what was recorded since the last close becomes ``last_step``."""
        self.last_step = {k: dict(v) for k, v in self.current.items()}
        self.steps += 1
        self.current = defaultdict(lambda: {"calls": 0, "bytes": 0.0, "payload": 0})

    def as_dict(self, world_size: int) -> dict:
        return {
            "world_size": world_size,
            "steps": self.steps,
            "last_step": {k: dict(v) for k, v in self.last_step.items()},
            "current": {k: dict(v) for k, v in self.current.items()},
            "total": {k: dict(v) for k, v in self.total.items()},
        }

    def reset(self) -> None:
        self.__init__()


def summed_bytes(table: dict, prefix: Optional[str] = None) -> float:
    """Sum of ``bytes`` over a stats table, optionally only tags starting with ``prefix``."""
    return sum(v["bytes"] for k, v in table.items() if prefix is None or k.startswith(prefix))


class CollectiveTimeoutError(RuntimeError):
    """A collective did not complete in time (a peer died, hung, or took another code path)."""


class Collectives:
    """Synchronous collectives (and one asynchronous all-reduce, :meth:`all_reduce_future`) on ``group`` (``None``: the default group) with accounting.

    ``timeout`` (seconds, ``None``: the process group's own timeout) bounds every wait; a
    collective that does not complete raises :class:`CollectiveTimeoutError` naming its kind and
    tag. With NCCL the process group's watchdog timeout (``init_process_group(timeout=...)``)
    applies as well, since waits there only enqueue on the stream.
    """

    def __init__(self, group: Optional[dist.ProcessGroup] = None, timeout: Optional[float] = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized: call init_process_group first")
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.stats = CommStats()
        self.timeout = timeout

    def global_rank(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank) if self.group is not None else group_rank

    def _record(self, tag: str, kind: str, t: Tensor) -> None:
        size = _nbytes(t)
        self.stats.record(tag, kind, size, _RING_FACTOR[kind](self.world_size) * size)

    def _wait(self, work, kind: str, tag: str) -> None:
        """Wait for ``work`` (``timeout`` bounds it); a failure names the collective."""
        try:
            if self.timeout:
                work.wait(timeout=timedelta(seconds=self.timeout))
            else:
                work.wait()
        except RuntimeError as err:
            limit = f"{self.timeout:g} s" if self.timeout else "the process group's timeout"
            raise CollectiveTimeoutError(
                f"Collective {kind} {tag!r} did not complete on rank {self.rank} of {self.world_size} within {limit} "
                f"(a peer died, hung or left the step): {err}"
            ) from err

    def all_reduce(self, t: Tensor, tag: str, op=dist.ReduceOp.SUM) -> Tensor:
        self._record(tag, "all_reduce", t)
        if self.world_size > 1:
            self._wait(dist.all_reduce(t, op=op, group=self.group, async_op=True), "all_reduce", tag)
        return t

    def all_reduce_future(self, t: Tensor, tag: str, op=dist.ReduceOp.SUM) -> torch.futures.Future:
        """Start an in-place all-reduce of ``t`` and return its Future (value ``[t]``); recorded now.

        Nothing waits here, so ``timeout`` does not apply (the process group's own timeout does);
        chain the work on the result with ``Future.then``. Issued even on one rank, so that a
        one-device check exercises the backend's Future (NCCL: CUDA streams and events).
        """
        self._record(tag, "all_reduce", t)
        return dist.all_reduce(t, op=op, group=self.group, async_op=True).get_future()

    def reduce_scatter(self, out: Tensor, inp: Tensor, tag: str) -> Tensor:
        """``out`` (``inp.numel() / W``) receives this rank's chunk of the sum of ``inp`` over ranks."""
        self._record(tag, "reduce_scatter", inp)
        if self.world_size > 1:
            work = _reduce_scatter(out, inp, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
            self._wait(work, "reduce_scatter", tag)
        else:
            out.copy_(inp)
        return out

    def all_gather(self, out: Tensor, inp: Tensor, tag: str) -> Tensor:
        """``out`` (``W · inp.numel()``) receives every rank's ``inp``, in rank order."""
        self._record(tag, "all_gather", out)
        if self.world_size > 1:
            self._wait(_all_gather(out, inp, group=self.group, async_op=True), "all_gather", tag)
        else:
            out.copy_(inp)
        return out

    def broadcast(self, t: Tensor, src: int, tag: str) -> Tensor:
        """``src`` is a rank of ``group``."""
        self._record(tag, "broadcast", t)
        if self.world_size > 1:
            work = dist.broadcast(t, src=self.global_rank(src), group=self.group, async_op=True)
            self._wait(work, "broadcast", tag)
        return t

    def all_to_all(self, out: Tensor, inp: Tensor, out_splits: list[int], in_splits: list[int], tag: str) -> Tensor:
        """1-D ``inp`` cut in ``in_splits`` (one piece per destination rank, in rank order);
        ``out`` receives the pieces sent to this rank, in source-rank order (``out_splits``)."""
        own = in_splits[self.rank] * inp.element_size()
        self.stats.record(tag, "all_to_all", _nbytes(inp), float(_nbytes(inp) - own))
        if self.world_size > 1:
            work = dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group, async_op=True)
            self._wait(work, "all_to_all", tag)
        else:
            out.copy_(inp)
        return out

    def agree_on(self, lines: list[str], what: str) -> None:
        """Raise on every rank unless every rank of the group passes the same ``lines``.

        One all-gather of a 32-byte digest (fixed size, so ranks that disagree even on the number of
        parameters reach it safely); only on a mismatch are the descriptions gathered, to name the
        first difference. Setup traffic: not part of the per-step byte records.
        """
        if self.world_size == 1:
            return
        digest = hashlib.sha256("\n".join(lines).encode()).digest()
        mine = torch.tensor(list(digest), dtype=torch.uint8, device=_device_of(self.group)).view(1, -1)
        every = torch.empty(self.world_size, mine.numel(), dtype=torch.uint8, device=mine.device)
        # setup, not a step: kept out of the per-step byte records
        self._wait(_all_gather(every.view(-1), mine.view(-1), group=self.group, async_op=True), "all_gather", "fingerprint")
        if bool((every == every[0]).all()):
            return
        got: list = [None] * self.world_size
        dist.all_gather_object(got, lines, group=self.group)
        for k in range(1, self.world_size):
            if got[k] == got[0]:
                continue
            i = next((i for i, (a, b) in enumerate(zip(got[0], got[k])) if a != b), min(len(got[0]), len(got[k])))
            a = got[0][i] if i < len(got[0]) else "<nothing>"
            b = got[k][i] if i < len(got[k]) else "<nothing>"
            raise ValueError(
                f"Invalid {what}: ranks disagree (every rank must build the same model and optimizer); first "
                f"difference at item {i}: rank {self.global_rank(0)} has {a!r}, rank {self.global_rank(k)} has {b!r}"
            )

    def end_step(self) -> None:
        self.stats.end_step()

    def comm_stats(self) -> dict:
        return self.stats.as_dict(self.world_size)


def _device_of(group: Optional[dist.ProcessGroup]) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def first_error(message: Optional[str], group: Optional[dist.ProcessGroup]) -> Optional[str]:
    """The first non-``None`` message of the ranks of ``group`` (collective; error path only).

    Pass messages already prefixed by their global rank, so that nested agreements (shard group,
    then replicate group) keep naming the rank that failed.
    """
    got: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(got, message, group=group)
    return next((m for m in got if m is not None), None)
