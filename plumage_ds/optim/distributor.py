"""The distributor interface the optimizers talk to, and its single-process form.

The optimizer math (:mod:`plumage_ds.optim.plumage_adamw`) is written once, as
phases over lists of tensors; *where* each tensor lives is the distributor's
business. :class:`LocalDistributor` is the trivial one (one process owns
everything, every exchange is the identity). The data-parallel strategy in
:mod:`plumage_ds.distributed.data_parallel` implements the same methods with
batched collectives. This module imports no ``torch.distributed``.
"""

from __future__ import annotations

from typing import Optional, Protocol, Sequence

from torch import Tensor


class Distributor(Protocol):
    """What an optimizer needs from a distribution strategy.

    Every method is called by every rank with the same list structure
    (collective semantics); ``owners[i]`` is the rank that owns item ``i``.
    """

    rank: int
    world_size: int

    def assign_owners(self, costs: Sequence[float], state_bytes: Sequence[int]) -> list[int]:
        """Deterministic owner rank for each item."""

    def any_true(self, flags: Sequence[bool], tag: str = "grad_flags") -> list[bool]:
        """Element-wise OR of ``flags`` over every rank that takes part in the step."""

    def reduce_to_owners(
        self, tensors: Sequence[Tensor], owners: Sequence[int], tag: str, *, mean: bool = True
    ) -> list[Optional[Tensor]]:
        """Mean (or sum) over ranks of each tensor, delivered to its owner only (``None`` elsewhere)."""

    def gather_from_owners(
        self, tensors: Sequence[Optional[Tensor]], shapes: Sequence[tuple], owners: Sequence[int], tag: str
    ) -> list[Tensor]:
        """Every rank receives every tensor from its owner (owners pass the tensor, others ``None``)."""

    def flat_chunk(self, numel: int) -> tuple[int, int]:
        """``[a, b)``: this rank's flat chunk of a tensor of ``numel`` elements (``torch.chunk`` bounds)."""

    def reduce_scatter_flat(self, tensors: Sequence[Tensor], tag: str) -> list[Tensor]:
        """Mean over ranks of each tensor; this rank keeps its flat chunk ``flat[a:b]`` of each (1-D,
        or the tensor's own shape when the chunk is the whole tensor)."""

    def all_gather_flat(self, chunks: Sequence[Tensor], shapes: Sequence[tuple], tag: str) -> list[Tensor]:
        """Inverse of :meth:`reduce_scatter_flat`: every rank's chunk of each item, assembled to ``shapes``."""

    def sum_scalar(self, value: float, tag: str) -> float:
        """Sum of a float over the ranks that hold disjoint pieces of the state."""

    def agree_error(self, message: Optional[str], tag: str) -> Optional[str]:
        """``None`` if no rank failed, else the first failing rank's message (same on every rank)."""

    def agree_on(self, lines: list[str], what: str) -> None:
        """Raise ``ValueError`` on every rank unless all ranks pass the same ``lines`` (names the first difference)."""

    def set_timeout(self, seconds: Optional[float]) -> None:
        """Bound every collective wait (``None``: the process group's own timeout)."""

    def end_step(self) -> None:
        """Marks the end of an optimizer step (``comm_stats()["last_step"]`` is then that step)."""

    def comm_stats(self) -> dict:
        """Bytes and calls per collective kind (see :mod:`plumage_ds.distributed.comm`)."""


class LocalDistributor:
    """One process owns every item; every exchange is the identity (no copies)."""

    rank = 0
    world_size = 1

    def assign_owners(self, costs: Sequence[float], state_bytes: Sequence[int]) -> list[int]:
        return [0] * len(costs)

    def any_true(self, flags: Sequence[bool], tag: str = "grad_flags") -> list[bool]:
        return list(flags)

    def reduce_to_owners(
        self, tensors: Sequence[Tensor], owners: Sequence[int], tag: str, *, mean: bool = True
    ) -> list[Optional[Tensor]]:
        return list(tensors)

    def gather_from_owners(
        self, tensors: Sequence[Optional[Tensor]], shapes: Sequence[tuple], owners: Sequence[int], tag: str
    ) -> list[Tensor]:
        return list(tensors)  # type: ignore[arg-type]

    def flat_chunk(self, numel: int) -> tuple[int, int]:
        return 0, numel

    def reduce_scatter_flat(self, tensors: Sequence[Tensor], tag: str) -> list[Tensor]:
        return list(tensors)

    def all_gather_flat(self, chunks: Sequence[Tensor], shapes: Sequence[tuple], tag: str) -> list[Tensor]:
        return list(chunks)

    def sum_scalar(self, value: float, tag: str) -> float:
        return value

    def agree_error(self, message: Optional[str], tag: str) -> Optional[str]:
        return message

    def agree_on(self, lines: list[str], what: str) -> None:
        pass

    def set_timeout(self, seconds: Optional[float]) -> None:
        pass

    def end_step(self) -> None:
        pass

    def comm_stats(self) -> dict:
        return {"world_size": 1, "last_step": {}, "total": {}, "steps": 0}
