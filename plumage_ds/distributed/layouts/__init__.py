"""The sharding cases, one module each, and the registry that picks one from the parameters' placement.

======================  ==================================================  ==========================
case                    parameters                                          module
======================  ==================================================  ==========================
``replicated``          plain tensors (one process, DDP, the owner-sharded  :mod:`.replicated`
                        data-parallel optimizer, DeepSpeed ZeRO-0/1/2)
``fsdp_rows``           FSDP2 ``DTensor`` rows ``(Shard(0),)``, or HSDP     :mod:`.fsdp_rows`
                        ``(Replicate(), Shard(0))``
``zero3_flat``          DeepSpeed ZeRO-3 placeholders (``ds_tensor`` chunks) :mod:`.zero3_flat`
======================  ==================================================  ==========================

A new case is one module with a :class:`~.base.Layout` subclass (what it must provide: see
:mod:`.base`) and one line in :data:`LAYOUTS`. Every other placement (``Shard(1)``, ``Partial``,
tensor-parallel meshes, FSDP1 flat parameters) is refused at optimizer construction, naming the
parameter and its placement.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from .base import EVERY_RANK, FSDP_ROWS, REPLICATED, ZERO3_FLAT, Entry, Layout, chunk_bounds, is_dtensor, local
from .fsdp_rows import FSDPRowsLayout
from .replicated import ReplicatedLayout
from .zero3_flat import Zero3FlatLayout, check_zero3_param

LAYOUTS: dict[str, type[Layout]] = {
    ZERO3_FLAT: Zero3FlatLayout,
    FSDP_ROWS: FSDPRowsLayout,
    REPLICATED: ReplicatedLayout,
}
"""Case name → layout class, in the order their claims are tried."""


def sharding_case(p: Tensor, name: str) -> str:
    """The sharding case of parameter ``p`` (the first layout of :data:`LAYOUTS` that claims it).

    Raises ``ValueError`` naming ``name`` and the layout when no case covers it.
    """
    if getattr(p, "_is_flat_param", False) or type(p).__name__ == "FlatParameter":
        raise ValueError(
            f"Invalid parameter {name!r}: an FSDP1 FlatParameter (1-D flat shard of several weights); "
            "plumage_ds supports FSDP2: use torch.distributed.fsdp.fully_shard"
        )
    for case, cls in LAYOUTS.items():
        if cls.claims(p):
            return case
    placement = f"({', '.join(repr(pl) for pl in p.placements)}) on a {p.device_mesh.ndim}-D mesh" if is_dtensor(p) else type(p).__name__
    raise ValueError(
        f"Invalid placement of parameter {name!r}: {placement}; supported: plain tensors, "
        "FSDP2 rows (Shard(0),) and HSDP (Replicate(), Shard(0)) — not Shard(1), Partial or tensor-parallel meshes"
    )


def layout_for(named: Sequence[tuple[str, Tensor]], *, supported: Sequence[str], who: str, **options) -> Layout:
    """The layout of the parameters ``named`` (``(name, tensor)``): one sharding case per optimizer.

    ``supported``: the cases the optimizer runs; ``options`` go to the layout's ``build``
    (``process_group``, ``replicate_group``, ``right_projectors``). Raises ``ValueError`` for an
    unsupported case or a mix of cases, naming a parameter of each.
    """
    cases: dict[str, str] = {}
    for name, p in named:
        case = sharding_case(p, name)
        if case not in supported:
            raise ValueError(f"Invalid parameter {name!r}: {who} does not support the {case} sharding case")
        cases.setdefault(case, name)
    if len(cases) > 1:
        listed = ", ".join(f"{c} (e.g. {n!r})" for c, n in cases.items())
        raise ValueError(
            f"Invalid parameters: {who} got several sharding cases: {listed}. With FSDP2, "
            "call fully_shard on the root module too so that every parameter is a DTensor"
        )
    case = next(iter(cases), REPLICATED)
    return LAYOUTS[case].build([p for _, p in named], **options)


__all__ = [
    "EVERY_RANK", "FSDP_ROWS", "LAYOUTS", "REPLICATED", "ZERO3_FLAT", "Entry", "FSDPRowsLayout", "Layout", "ReplicatedLayout",
    "Zero3FlatLayout", "check_zero3_param", "chunk_bounds", "is_dtensor", "layout_for", "local", "sharding_case",
]
