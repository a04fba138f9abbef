"""The streaming step: an ordinary step in place, chunk by chunk, with transient memory bounded by one matrix.

Where it applies (``step_impl="auto"`` or ``"streaming"``): the layout runs no collective in the
step (one process, or every DDP rank running the same optimizer on averaged gradients) and no
target refreshes this step (a refresh stages its new ``P, d``, as the staged step does). There no
collective can fail after the first write, so the step's atomicity needs no staging: every check
that can refuse the step (non-finite values, parameters without gradients) has run before, then
each chunk of matrices is projected, stepped and lifted in place, and the next chunk reuses the
memory; the dense parameters follow in chunks too.

Bound (docs/design.md §5.1): a chunk's temporaries (compressed gradients, Adam directions, their
fp32 copies of low-precision state) fit in the byte budget of the largest single matrix in fp32,
and besides them at most one matrix is cast at a time (a bf16 gradient in its projection, a bf16
weight in its lift) — so the step's transient memory is at most twice the largest matrix, never a
function of the model's size. With clipping the compressed gradients are formed twice (a first
pass computes the global norm), not kept.

The arithmetic is the staged step's, in place (``_foreach_mul_`` where the staged step uses
``_foreach_mul``): in fp32 both give the same bits (``tests/unit/test_streaming.py``).

No host synchronisation (``nonfinite="skip"``): whether the step's gradients hold NaN/Inf is a flag
on the device (:class:`DeviceSkip`), as torch's fused AdamW takes GradScaler's ``found_inf``. The
step runs with constants that leave every tensor as it was where the flag holds
(:func:`~plumage_ds.kernels.adam.skip_constants`; the gradients zeroed, the decayed weight selected
away), and the same bits where it does not; the clipping coefficient stays on the device too. The
host counts the step as applied and reads the flag later — copied to host memory without waiting
while the step is queued — when anything asks: the next ``step()``, ``state`` (and so
``state_dict()``), ``skipped_steps``, ``last_nonfinite``, ``last_grad_norm``. A skipped step is then
undone in the host's books (step counters back, state created by it dropped, ``skipped_steps``
counted): parameters and state are exactly as they were. ``nonfinite="raise"`` must decide on the
host before it returns, and reads the flag at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor

from ..distributed.layouts import Entry, local
from ..kernels.adam import adam_step_size, adamw_chunks
from ..kernels.batched import group_indices, nonfinite_mask, sq_norm_total

CHUNK_TEMPORARIES = 5
"""fp32 temporaries of one target's size ``r × l`` alive at once in a streamed chunk: the compressed
gradient, its clipped or ``D⁻¹``-scaled copy, ``√V + eps``, the direction ``N`` (and two more, the
fp32 moments, when the state is kept in bf16)."""


@dataclass
class DeviceSkip:
    """A streamed step whose skip decision is still on the device (module docstring).

    ``bad``: per gradient tensor of the step, "holds NaN/Inf" (device, or its host copy once queued);
    ``names``: the parameter of each; ``event``: marks the copy (accelerators); ``stepped``: the
    parameters whose step counter the step advanced; ``grad_norm``: ``last_grad_norm`` before it."""

    found: Tensor  # 0-dim bool, on the device: skip this step
    bad: Tensor
    names: list
    event: Any = None
    stepped: tuple = ()
    grad_norm: Any = None

    @classmethod
    def of(cls, tensors: list[Tensor], names: list[str]) -> "DeviceSkip":
        bad = nonfinite_mask(tensors)
        return cls(found=bad.any(), bad=bad, names=names)

    def queue_read(self) -> None:
        """Start the flags' copy to host memory without waiting (accelerators; on CPU they are there)."""
        if self.bad.device.type != "cpu":
            self.bad = self.bad.to("cpu", non_blocking=True)  # pinned by torch for a non-blocking copy
            self.event = torch.Event(device=self.found.device)
            self.event.record()

    def read(self) -> list[bool]:
        if self.event is not None:
            self.event.synchronize()
        return self.bad.tolist()


class StreamingMixin:
    """The streaming step of a :class:`~plumage_ds.optim.base.MatrixOptimizer` (see the module docstring).

    Subclasses provide ``_stream_inputs(chunk) -> [R]`` (the chunk's compressed gradients, fp32) and
    ``_stream_targets(chunk, clip, skip)`` (their update, in place), and say through ``_targets_stream``
    whether this step's targets can stream.
    """

    step_impl = "staged"
    _pending_skip: Optional[DeviceSkip] = None

    # ------------------------------------------------------------------ what reading settles
    @property
    def state(self):
        """``torch.optim`` state (per parameter), with any step skipped on the device settled first."""
        self._settle()
        return self.__dict__["state"]

    @state.setter
    def state(self, value) -> None:
        self.__dict__["state"] = value

    @property
    def skipped_steps(self) -> int:
        """Steps skipped on every rank because of non-finite gradients."""
        self._settle()
        return self._skipped_steps

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._settle()
        self._skipped_steps = value

    @property
    def last_nonfinite(self) -> list[str]:
        """The parameters that made the last skipped step non-finite."""
        self._settle()
        return self._last_nonfinite

    @last_nonfinite.setter
    def last_nonfinite(self, value: list[str]) -> None:
        self._last_nonfinite = value

    @property
    def last_grad_norm(self) -> Optional[float]:
        """The clipping norm of the last applied step (``max_grad_norm > 0``; ``None`` before one)."""
        self._settle()
        norm = self._last_grad_norm
        return float(norm) if torch.is_tensor(norm) else norm

    @last_grad_norm.setter
    def last_grad_norm(self, value) -> None:
        self._last_grad_norm = value

    def _settle(self) -> None:
        """Read the flag of a step decided on the device; if it was skipped, undo it in the host's books."""
        pending = self.__dict__.get("_pending_skip")
        if pending is None:
            return
        self._pending_skip = None
        bad = pending.read()
        if not any(bad):
            return
        state = self.__dict__["state"]
        for p in pending.stepped:
            st = state[p]
            st["step"] -= 1
            if st["step"] == 0:  # created by the skipped step: as if it never ran
                del state[p]
        self._skipped_steps += 1
        self._last_nonfinite = list(dict.fromkeys(n for n, b in zip(pending.names, bad) if b))
        self._last_grad_norm = pending.grad_norm

    def _streams(self, targets: list[Entry], external: list[Entry]) -> bool:
        """This step streams: the implementation allows it, the layout runs no collective, nothing from
        outside (a DeepSpeed partition), and the targets can (no refresh)."""
        layout = self._layout
        return (
            self.step_impl != "staged" and not external and layout.comm is None and layout.replica_comm is None
            and self._targets_stream(targets)
        )

    def _targets_stream(self, targets: list[Entry]) -> bool:
        return False

    def _prepare_stream(self) -> None:
        """Work a streamed step needs done before its first write (e.g. compiling its kernels)."""

    def _stream_budget(self) -> int:
        """Bytes of the largest single matrix (or dense piece) of this rank, in fp32: the chunk budget."""
        return max((4 * local(e.param).numel() for e in self._entries), default=0)

    def _target_bytes(self, e: Entry) -> int:
        low = self.state_dtype != torch.float32
        return 4 * e.r * (e.cols[1] - e.cols[0]) * (CHUNK_TEMPORARIES + 2 * low)

    def _dense_bytes(self, e: Entry) -> int:
        piece = self._layout.dense_piece(e)
        grad = local(e.param.grad)
        extra = 2 + (grad is not None and grad.dtype != torch.float32) + (piece.dtype != torch.float32)
        return 4 * piece.numel() * (extra + 2 * (self.state_dtype != torch.float32))

    @staticmethod
    def _chunks(entries: list[Entry], cost: Callable[[Entry], int], budget: int) -> Iterator[list[Entry]]:
        """Consecutive entries whose summed ``cost`` fits in ``budget`` (an entry over it alone)."""
        chunk, used = [], 0
        for e in entries:
            c = cost(e)
            if chunk and used + c > budget:
                yield chunk
                chunk, used = [], 0
            chunk.append(e)
            used += c
        if chunk:
            yield chunk

    def _stream_step(self, targets: list[Entry], dense: list[Entry], skip: Optional[DeviceSkip] = None) -> None:
        """The step, in place, chunk by chunk (the module docstring); step counters advance at the end.
        ``skip``: the step's non-finite flag is on the device; nothing here reads it."""
        self._prepare_stream()  # may refuse the step: nothing is written yet
        found = None if skip is None else skip.found
        if skip is not None:
            skip.queue_read()
            skip.grad_norm = self._last_grad_norm
        budget = self._stream_budget()
        target_chunks = list(self._chunks(targets, self._target_bytes, budget))
        dense_chunks = list(self._chunks(dense, self._dense_bytes, budget))
        clip = 1.0
        if self.max_grad_norm > 0:  # a first pass for the global norm: nothing kept but the sum
            sums = [sq_norm_total(self._stream_inputs(chunk)) for chunk in target_chunks]
            sums += [sq_norm_total([self._grad32(e) for e in chunk]) for chunk in dense_chunks]
            sq = sum((t for t in sums if t is not None), torch.zeros((), dtype=torch.float64, device=self._device()))
            clip = self._clip_from_squares(float(sq)) if skip is None else self._clip_on_device(sq, found)
        for chunk in target_chunks:
            self._stream_targets(chunk, clip, found)
        for chunk in dense_chunks:
            self._stream_dense(chunk, clip, found)
        state = self.__dict__["state"]
        for e in targets + dense:
            st = state[e.param]
            st["step"] = st.get("step", 0) + 1
        self._projected.clear()
        if skip is not None:  # counted as applied until read (_settle)
            skip.stepped = tuple(e.param for e in targets + dense)
            self._pending_skip = skip

    def _device(self) -> torch.device:
        return local(self._entries[0].param).device

    def _clip_on_device(self, sq: Tensor, found: Tensor) -> Tensor:
        """:meth:`_clip_from_squares` left on the device (one process: the sum is the global one); 1 where
        the step is skipped. The same float64 arithmetic, so the same fp32 coefficient."""
        total = sq.sqrt()
        self._last_grad_norm = total
        clip = torch.clamp(self.max_grad_norm / (total + 1e-6), max=1.0)
        return torch.where(found, 1.0, clip).to(torch.float32)

    @staticmethod
    def _zeroed(G: list[Tensor], owned: list[bool], found: Tensor) -> list[Tensor]:
        """Gradients with zeros where the step is skipped (``found``): in place where the tensor is the
        step's own copy, a new tensor where it is the parameter's ``.grad``."""
        return [g.masked_fill_(found, 0.0) if own else g.masked_fill(found, 0.0) for g, own in zip(G, owned)]

    def _stream_dense(self, chunk: list[Entry], clip, found: Optional[Tensor] = None) -> None:
        """AdamW in place on this chunk's dense pieces (fp32 math; bf16 weights and state rounded once on store)."""
        keys = [(e.group["lr"], e.group["weight_decay"], e.group["betas"], e.group["eps"], self._step_of(e)) for e in chunk]
        for part in group_indices(keys):
            es = [chunk[i] for i in part]
            lr, wd, (beta1, beta2), eps, step = keys[part[0]]
            G = [self._grad32(e) for e in es]
            if found is not None:
                G = self._zeroed(G, [g is not local(e.param.grad) for g, e in zip(G, es)], found)
                if torch.is_tensor(clip):
                    torch._foreach_mul_(G, clip)
            elif clip != 1.0:
                G = list(torch._foreach_mul(G, clip))
            states = [self.state[e.param] for e in es]
            pieces = [self._layout.dense_piece(e) for e in es]
            W = [w if w.dtype == torch.float32 else w.float() for w in pieces]
            M = [self._fp32(st.get("exp_avg")) for st in states]
            V = [self._fp32(st.get("exp_avg_sq")) for st in states]
            M, V, W = adamw_chunks(M, V, G, W, beta1=beta1, beta2=beta2, eps=eps, decay=lr * wd,
                                   step_size=adam_step_size(lr, step + 1, beta1, beta2), in_place=True, skip=found)
            for st, piece, m, v, w in zip(states, pieces, M, V, W):
                self._store(st, "exp_avg", m)
                self._store(st, "exp_avg_sq", v)
                if w is not piece:
                    piece.copy_(w)

    # ------------------------------------------------------------------ state in its dtype
    @staticmethod
    def _fp32(t):
        """A state tensor for fp32 math: itself (fp32), an fp32 copy (bf16 state), ``None`` (not yet)."""
        return t if t is None or t.dtype == torch.float32 else t.float()

    def _store(self, st: dict, key: str, value: Tensor) -> None:
        """Write an fp32 result into the state in ``state_dtype`` (in place where the state exists)."""
        old = st.get(key)
        if old is value:
            return
        if old is not None and old.shape == value.shape:
            old.copy_(value)
        else:
            st[key] = value.to(self.state_dtype)

    def _clip_from_squares(self, sq: float) -> float:
        """``min(1, max_grad_norm / √Σ‖·‖²)`` with ``sq`` this rank's sum of squares (summed over the ranks
        holding disjoint pieces); records ``last_grad_norm``."""
        total_norm = math.sqrt(self._layout.sum_scalar(sq, "grad_norm"))
        self._last_grad_norm = total_norm
        return min(1.0, self.max_grad_norm / (total_norm + 1e-6))
