"""``train.engine: sharded`` — optimizer state sharded across data-parallel ranks, no replicas of it.

Low-rank estimators: :class:`PlumageAdamW` or :class:`GUM` on the replicated layout, owner-sharded
over the world (``process_group``; the model is NOT wrapped in DDP: the optimizer reduces gradients
itself — compressed ``r × l`` projections to each matrix's owner, which alone keeps its moments).
``adamw``: DDP + ``torch.distributed.optim.ZeroRedundancyOptimizer`` around ``torch.optim.AdamW``
(ZeRO-1: each rank keeps the AdamW state of its share of the parameters).

Checkpoints: PLUMAGE writes one shard per rank (``optimizer_rank{k}_of_{W}.pt``); on another
world size the shards are merged (:func:`~plumage_ds.optim.merge_shards`) and each rank keeps
what it owns under its new plan. ZeRO consolidates AdamW's state on rank 0 (``optimizer.pt``),
which loads on any world size.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from plumage_ds.io import atomic_torch_save
from plumage_ds.optim import build_optimizer
from plumage_ds.optim.factory import adamw_params, adamw_rows

from .base import tensor_bytes
from .ddp import DDPEngine

_SHARD = "optimizer_rank{rank}_of_{world}.pt"
_SHARD_RE = re.compile(r"^optimizer_rank(\d+)_of_(\d+)\.pt$")


class ShardedEngine(DDPEngine):
    name = "sharded"

    def setup(self, model) -> None:
        if self.cfg.spec.family == "adamw":
            from torch.distributed.optim import ZeroRedundancyOptimizer

            self.wrap(model)
            params = adamw_params(self.model, self.cfg)
            self.optimizer = ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, **self.cfg.adam_kwargs())
            self.rows = adamw_rows(self.model, params)
        else:
            import torch.distributed as dist

            self.model = self.module = model.to(self.device)
            self.optimizer, self.rows = build_optimizer(self.model, self.cfg, process_group=dist.group.WORLD)
        self.scheduler = self.make_scheduler(self.optimizer)

    def _zero(self) -> bool:
        return self.module is not self.model

    def state_bytes(self):
        if self._zero():  # this rank's shard of the AdamW state
            return tensor_bytes(list(self.optimizer.optim.state.values())), None
        return super().state_bytes()

    def save(self, path: Path) -> None:
        if self._zero():
            self.optimizer.consolidate_state_dict(to=0)
            super().save(path)
            return
        atomic_torch_save(self.optimizer.state_dict(), path / _SHARD.format(rank=self.rank, world=self.world_size))

    def load(self, path: Path) -> None:
        if self._zero():
            super().load(path)
            return
        from plumage_ds.optim import merge_shards

        if self.cfg.spec.family == "gum" and not (path / _SHARD.format(rank=self.rank, world=self.world_size)).is_file():
            raise ValueError(
                f"Invalid checkpoint {path}: GUM's owner-sharded state resumes on the world size it was saved with "
                f"(no shard for rank {self.rank} of {self.world_size})"
            )
        mine = path / _SHARD.format(rank=self.rank, world=self.world_size)
        if mine.is_file():
            sd = torch.load(mine, map_location=self.device, weights_only=True)
        else:  # saved on another world size: merge every shard, keep what this rank owns now
            shards = sorted((int(m.group(1)), p) for p in path.iterdir() if (m := _SHARD_RE.match(p.name)))
            if not shards:
                raise ValueError(f"Invalid checkpoint {path}: no optimizer shards (saved by another engine?)")
            sd = merge_shards([torch.load(p, map_location=self.device, weights_only=True) for _, p in shards])
        self.optimizer.load_state_dict(sd)
