"""The sharding case of a parameter, decided in one place from the parameter itself.

Three cases are supported; every other layout is rejected at optimizer construction with an
error naming the parameter and its placement:

* ``REPLICATED`` — a plain tensor: every rank holds the whole weight (single process, DDP,
  the owner-sharded data-parallel optimizer, DeepSpeed ZeRO-0/1/2 targets);
* ``FSDP_ROWS`` — an FSDP2 ``DTensor`` sharded by rows: placements ``(Shard(0),)`` on a 1-D
  mesh, or ``(Replicate(), Shard(0))`` on a 2-D (replicate × shard) mesh, i.e. HSDP where FSDP
  itself all-reduces across replicas;
* ``ZERO3_FLAT`` — a DeepSpeed ZeRO-3 placeholder: the logical shape is ``ds_shape`` and this
  rank holds a flat chunk ``ds_tensor`` of ``ceil(numel / W)`` elements.

Row and column chunks follow ``torch.chunk`` (what ``DTensor`` ``Shard(dim)`` does): with ``S``
ranks and ``n`` entries, rank ``k`` holds ``[min(k·c, n), min((k+1)·c, n))``, ``c = ceil(n/S)``.
Pure tensor code: no collectives here.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

REPLICATED = "replicated"
FSDP_ROWS = "fsdp_rows"
ZERO3_FLAT = "zero3_flat"
CASES = (REPLICATED, FSDP_ROWS, ZERO3_FLAT)


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def is_dtensor(t: Any) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def _placement_text(p: Tensor) -> str:
    return "(" + ", ".join(repr(pl) for pl in p.placements) + f") on a {p.device_mesh.ndim}-D mesh"


def sharding_case(p: Tensor, name: str) -> str:
    """The sharding case of parameter ``p`` (see the module docstring).

    Raises ``ValueError`` naming ``name`` and the layout when no case covers it: FSDP1
    flat parameters, ``Shard(1)``/``Partial`` placements, tensor-parallel meshes.
    """
    if getattr(p, "_is_flat_param", False) or type(p).__name__ == "FlatParameter":
        raise ValueError(
            f"Invalid parameter {name!r}: an FSDP1 FlatParameter (1-D flat shard of several weights); "
            "plumage_ds supports FSDP2: use torch.distributed.fsdp.fully_shard"
        )
    if hasattr(p, "ds_tensor") or hasattr(p, "ds_shape"):
        return ZERO3_FLAT
    if not is_dtensor(p):
        return REPLICATED
    from torch.distributed.tensor import Replicate, Shard

    placements = tuple(p.placements)
    if placements == (Shard(0),) or placements == (Replicate(), Shard(0)):
        return FSDP_ROWS
    raise ValueError(
        f"Invalid placement of parameter {name!r}: {_placement_text(p)}; supported: plain tensors, "
        "FSDP2 rows (Shard(0),) and HSDP (Replicate(), Shard(0)) — not Shard(1), Partial or tensor-parallel meshes"
    )


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


def shard_dim_group(p: Tensor):
    """The process group of the mesh dimension that shards ``p``'s rows (its last mesh dim)."""
    mesh = p.device_mesh
    return mesh.get_group(mesh.ndim - 1)


def state_placements(p: Tensor, dim: int) -> tuple:
    """Placements for optimizer state sharded along ``dim`` like ``p``'s rows (same mesh)."""
    from torch.distributed.tensor import Shard

    return tuple(p.placements[:-1]) + (Shard(dim),)


def wrap_like(p: Tensor, t: Tensor, shape: tuple, dim: int) -> Tensor:
    """``t`` (this rank's chunk along ``dim`` of a tensor of ``shape``) as a DTensor on ``p``'s mesh."""
    from torch.distributed.tensor import DTensor

    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(
        t, p.device_mesh, state_placements(p, dim), run_check=False, shape=torch.Size(shape), stride=stride
    )
