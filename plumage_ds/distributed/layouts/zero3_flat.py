"""DeepSpeed ZeRO-3 flat chunks: the replicated case's math, updates landing on this rank's chunk.

Under ZeRO-3 every module parameter is a placeholder between uses: its logical shape is
``p.ds_shape`` and this rank holds a flat chunk ``p.ds_tensor`` of ``ceil(numel/W)`` elements. A
target keeps its full-size local gradient (ZeRO-3 only reduces its own optimizer's parameters), so
the replicated case's collectives apply unchanged (compressed ``R`` to owners, ``N`` back); only
the update lands differently: ``ΔW = A B`` is formed and this rank's flat slice of it applied to
``ds_tensor``. The chunk layout is checked against the DeepSpeed version it was verified with
(:func:`check_zero3_param`); the targets' chunks travel in the DeepSpeed composite's checkpoints
(:meth:`Zero3FlatLayout.export_weights`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..comm import Collectives
from .base import ZERO3_FLAT, apply_delta, chunk_size
from .replicated import ReplicatedLayout


class Zero3FlatLayout(ReplicatedLayout):
    """ZeRO-3 placeholders: owner-sharded state over the default (or given) group, updates on ``ds_tensor``."""

    case = ZERO3_FLAT

    @staticmethod
    def claims(p: Tensor) -> bool:
        return hasattr(p, "ds_tensor") or hasattr(p, "ds_shape")

    @classmethod
    def build(cls, params, *, process_group=None, replicate_group=None, right_projectors: str = "sharded") -> "Zero3FlatLayout":
        if replicate_group is not None:
            raise ValueError("Invalid replicate_group: only meaningful for FSDP2 (DTensor) parameters (HSDP)")
        return cls(Collectives(process_group if process_group is not None else dist.group.WORLD))

    @staticmethod
    def logical_shape(p: Tensor) -> tuple:
        return tuple(getattr(p, "ds_shape", p.shape))

    def apply_lifts(self, entries, factors, decays, *, in_weight_dtype: bool = False, skip=None) -> None:
        if skip is not None:  # a step decided on the device streams, and this layout never does
            raise RuntimeError("the ZeRO-3 layout runs collectives in every step: its steps are staged, not skipped on the device")
        self.apply_deltas(entries, [A.float() @ B.float() for A, B in factors], decays)

    def apply_deltas(self, entries, deltas, decays) -> None:
        for e, delta, decay in zip(entries, deltas, decays):
            part, start, n = self.chunk_of(e.param, e.name)
            if n:  # the chunk is a flat view; the same rule (fp32 math, one rounding) applies
                apply_delta(part.narrow(0, 0, n), delta.reshape(-1)[start : start + n], decay)

    def chunk_of(self, p: Tensor, name: str = "parameter") -> tuple[Tensor, int, int]:
        """``(ds_tensor, start, n)``: this rank's flat chunk, where it starts in the flat weight and how
        many of its elements are real (the last rank's chunk is zero-padded)."""
        check_zero3_param(p, name)
        part = p.ds_tensor
        start = dist.get_rank(getattr(p, "ds_process_group", None)) * part.numel()
        return part, start, max(0, min(part.numel(), int(p.ds_numel) - start))

    def export_weights(self, entries) -> dict:
        """This rank's chunks of the targets' weights (DeepSpeed's own files do not carry them: the
        targets live outside its optimizer)."""
        return {
            "rank": self.rank, "world_size": self.world_size,
            "chunks": [self.chunk_of(e.param, e.name)[0].detach().clone() for e in entries],
        }

    def check_weights(self, entries, saved: dict) -> None:
        """Validate :meth:`export_weights` output before anything is installed (same world size only)."""
        if saved["rank"] != self.rank or saved["world_size"] != self.world_size:
            raise ValueError(
                f"Invalid state_dict: ZeRO-3 target chunks of rank {saved['rank']}/{saved['world_size']} offered to rank "
                f"{self.rank}/{self.world_size}; stage-3 checkpoints resume on the same world size only"
            )
        for e, c in zip(entries, saved["chunks"]):
            part = self.chunk_of(e.param, e.name)[0]
            if tuple(c.shape) != tuple(part.shape):
                raise ValueError(f"Invalid state_dict: ZeRO-3 chunk shape {tuple(c.shape)} != {tuple(part.shape)}")

    def import_weights(self, entries, saved: dict) -> None:
        """Install checked chunks (:meth:`check_weights`)."""
        with torch.no_grad():
            for e, c in zip(entries, saved["chunks"]):
                self.chunk_of(e.param, e.name)[0].copy_(c)
                if e.param.data.numel() == int(e.param.ds_numel):  # currently gathered (persistent): stale copy
                    raise RuntimeError(
                        "ZeRO-3 target parameter is gathered while loading a checkpoint; set "
                        "stage3_param_persistence_threshold so targets are partitioned, or load before use"
                    )


VERIFIED_DEEPSPEED = "0.19.8"
"""The DeepSpeed version whose ZeRO-3 parameter layout this module was verified against."""


def check_zero3_param(p: Tensor, name: str = "parameter") -> None:
    """Version guard for the one DeepSpeed internal the ZeRO-3 layout relies on.

    Every module parameter is a placeholder; its logical shape is ``p.ds_shape`` and this rank's
    flat chunk of ``ceil(numel / W)`` elements (zero-padded at the end) is ``p.ds_tensor``;
    DeepSpeed all-gathers the full weight from these chunks before use.
    """
    problems = []
    for attr in ("ds_shape", "ds_numel", "ds_tensor"):
        if not hasattr(p, attr):
            problems.append(f"missing attribute {attr}")
    if not problems:
        world = dist.get_world_size(getattr(p, "ds_process_group", None))
        chunk = chunk_size(int(p.ds_numel), world)
        if p.ds_tensor.numel() != chunk or p.ds_tensor.dim() != 1:
            problems.append(f"ds_tensor has shape {tuple(p.ds_tensor.shape)}, expected ({chunk},) = ceil(numel/W)")
        if int(torch.Size(p.ds_shape).numel()) != int(p.ds_numel):
            problems.append("ds_numel != prod(ds_shape)")
    if problems:
        import deepspeed

        raise RuntimeError(
            f"DeepSpeed {deepspeed.__version__} changed the ZeRO-3 parameter layout plumage_ds relies on "
            f"(verified with {VERIFIED_DEEPSPEED}) for {name}: " + "; ".join(problems)
        )
