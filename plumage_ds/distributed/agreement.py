"""Decisions every rank of a step must share, taken together (the one copy of the agreement helpers).

An :class:`Agreement` spans the process groups whose ranks take part in one optimizer step: the
group that shards the state and, under compressed HSDP, the replicate group. With no group (one
process) every decision is the rank's own. Each decision is one tiny collective per group:

* :meth:`Agreement.any_true` — element-wise OR of flags (``all_reduce`` MAX);
* :meth:`Agreement.agree_error` — ``None`` if no rank failed, else the first failing rank's message,
  the same on every rank (a flag, then the messages only on failure);
* :meth:`Agreement.agree_on` — every rank passes the same description lines (a digest all-gather;
  names the first difference otherwise).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from .comm import Collectives, _device_of, first_error


class Agreement:
    """Agreement over ``comms`` (in order: the state's group, then the replicate group); none: one process."""

    def __init__(self, comms: Sequence[Collectives] = ()) -> None:
        self.comms = list(comms)

    def any_true(self, flags: Sequence[bool], tag: str = "grad_flags") -> list[bool]:
        if not self.comms:
            return list(flags)
        t = torch.tensor([1.0 if f else 0.0 for f in flags], dtype=torch.float32, device=_device_of(self.comms[0].group))
        for comm in self.comms:
            comm.all_reduce(t, tag, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def agree_error(self, message: Optional[str], tag: str) -> Optional[str]:
        if not self.comms:
            return message
        if not self.any_true([message is not None], f"{tag}_agree")[0]:
            return None
        text = None if message is None else f"rank {dist.get_rank()}: {message}"
        for comm in self.comms:
            text = first_error(text, comm.group)
        return text

    def agree_on(self, lines: list[str], what: str) -> None:
        for comm in self.comms:
            comm.agree_on(lines, what)

    def set_timeout(self, seconds: Optional[float]) -> None:
        """Bound every collective wait (``None``/0: the process groups' own timeouts)."""
        for comm in self.comms:
            comm.timeout = seconds or None

    @property
    def timeout(self) -> Optional[float]:
        return self.comms[0].timeout if self.comms else None

    def end_step(self) -> None:
        for comm in self.comms:
            comm.end_step()
