"""FSDP2 / HSDP helpers: shard a Hugging Face model the usual way, and the HSDP mesh.

``PlumageAdamW`` needs nothing from here: build it on ``model.parameters()`` (or
``lowrank_param_groups(model, ...)``) after ``fully_shard``, as ``torch.optim.AdamW``. These helpers
are what the main job's ``fsdp2``/``hsdp`` engines and ``docs/fsdp.md`` use::

    mesh = hsdp_mesh(replicas=nodes, shards=gpus_per_node)          # ("replicate", "shard")
    shard_model(model, mesh["shard"])                               # FSDP inside a node
    opt = PlumageAdamW(model.parameters(), rank=128, replicate_group=mesh["replicate"].get_group())

The optimizer then averages across replicas itself, target matrices as their ``r × l``
projections (compressed HSDP); ``shard_model(model, mesh)`` on the 2-D mesh instead is plain HSDP
(FSDP all-reduces full gradients across replicas).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def block_modules(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model``: modules whose class is in ``model._no_split_modules``
    (Hugging Face's list of blocks that must stay whole, e.g. ``LlamaDecoderLayer``)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(
            f"Invalid model {type(model).__name__}: no transformer blocks found (its _no_split_modules="
            f"{sorted(names)}); pass blocks= to shard_model"
        )
    return blocks


def shard_model(model: nn.Module, mesh, *, blocks: Optional[list[nn.Module]] = None, mp_policy=None,
                reshard_after_forward: bool = True) -> nn.Module:
    """``fully_shard`` every block, then the root (as torchtitan does); returns ``model``.

    ``mesh``: a 1-D mesh (FSDP), a 2-D ``(replicate, shard)`` mesh (plain HSDP), or the shard
    sub-mesh of an HSDP mesh (compressed HSDP: pass the replicate group to the optimizer).
    """
    from torch.distributed.fsdp import fully_shard

    kw = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kw["mp_policy"] = mp_policy
    for block in blocks if blocks is not None else block_modules(model):
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


def hsdp_mesh(replicas: int, shards: int, device_type: Optional[str] = None):
    """A ``(replicate, shard)`` device mesh over the world: shard within a node, replicate across nodes.

    Ranks ``[k·shards, (k+1)·shards)`` form replica ``k`` (torchrun numbers a node's processes
    consecutively), so the shard group stays on the fast intra-node links.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if replicas < 1 or shards < 1 or replicas * shards != world:
        raise ValueError(f"Invalid HSDP mesh {replicas=} x {shards=}: must multiply to world_size={world}")
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    return init_device_mesh(device_type, (replicas, shards), mesh_dim_names=("replicate", "shard"))


__all__ = ["block_modules", "hsdp_mesh", "shard_model"]
