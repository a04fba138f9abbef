"""``train.engine: ddp`` and ``ddp_hook`` — ``DistributedDataParallel`` with a replicated optimizer.

``ddp``: DDP all-reduces every gradient; each rank then runs the same optimizer from the
factory (AdamW, PLUMAGE/GaLore/Haar as :class:`PlumageAdamW`, GUM) on identical averaged
gradients with identical seeds, so the replicas stay equal.

``ddp_hook``: the gradients are all-reduced through the low-rank comm hook
(:mod:`plumage_ds.distributed.comm_hook`) built from the same ``optimizer:`` section
(``estimator``, ``rank``, ``update_interval``, ``seed``, ``svd_method``, ``uniform_mix``,
``comm_hook.*``), and ``torch.optim.AdamW`` (``lr``, ``betas``, ``eps``, ``weight_decay``,
``max_grad_norm``) steps on the decompressed, unbiased gradient.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from plumage_ds.config import ConfigError, JobConfig
from plumage_ds.distributed.hook_state import HOOK_ESTIMATORS
from plumage_ds.io import atomic_torch_save
from plumage_ds.optim import build_optimizer
from plumage_ds.optim.factory import adamw_params

from .base import Engine, unsupported

_HOOK_FILE = "comm_hook_rank{rank}_of_{world}.pt"
_HOOK_RE = re.compile(r"^comm_hook_rank(\d+)_of_(\d+)\.pt$")


class DDPEngine(Engine):
    name = "ddp"

    def wrap(self, model) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.model = model.to(self.device)
        self.module = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def setup(self, model) -> None:
        self.wrap(model)
        self.optimizer, self.rows = build_optimizer(self.model, self.cfg)
        self.scheduler = self.make_scheduler(self.optimizer)

    def _no_sync(self, last: bool):
        """DDP all-reduces on the last micro-batch only (an optimizer that reduces itself: never)."""
        import contextlib

        return contextlib.nullcontext() if last or not hasattr(self.module, "no_sync") else self.module.no_sync()


_HOOK_UNUSED = {"dinv_placement": "none", "scale": 1.0, "realign": None, "strict": False}


class DDPHookEngine(DDPEngine):
    name = "ddp_hook"

    @classmethod
    def check(cls, job: JobConfig, world_size: int) -> None:
        cfg = job.optimizer
        if cfg.spec.family != "lowrank_adam":
            raise unsupported(cls.name, cfg.estimator, f"the comm hook compresses with {', '.join(map(repr, HOOK_ESTIMATORS))}")
        for key, default in _HOOK_UNUSED.items():
            if getattr(cfg, key) != default:
                raise ConfigError(
                    f"optimizer.{key}", getattr(cfg, key),
                    "does not apply to train.engine='ddp_hook' (the hook hands torch AdamW the decompressed "
                    "gradient; it compresses the target_modules matrices that pass comm_hook.min_compression_rate)",
                )

    def setup(self, model) -> None:
        from plumage_ds.distributed.comm_hook import PlumageHookState, plumage_hook

        self.wrap(model)
        self.hook_state = PlumageHookState(self.module, self.cfg)
        self.module.register_comm_hook(self.hook_state, plumage_hook)
        self.optimizer = torch.optim.AdamW(adamw_params(self.model, self.cfg), **self.cfg.adam_kwargs())
        self.scheduler = self.make_scheduler(self.optimizer)
        self.rows = [
            {"name": name, "shape": list(shape), "mode": mode, "reason": reason}
            for (name, (mode, reason)), shape in zip(self.hook_state.param_modes().items(), self.hook_state.param_shapes)
        ]

    def comm_stats(self):
        return self.hook_state.comm_stats()

    def save(self, path: Path) -> None:
        """AdamW's state from rank 0; the hook's from every rank (``optimal`` keeps ``Σ`` on each matrix's owner)."""
        super().save(path)
        atomic_torch_save(self.hook_state.state_dict(), path / _HOOK_FILE.format(rank=self.rank, world=self.world_size))

    def load(self, path: Path) -> None:
        """The hook's state from this rank's file; on another world size, every rank's ``Σ`` merged
        (each rank keeps the matrices it owns now)."""
        super().load(path)
        files = sorted(p for p in path.iterdir() if _HOOK_RE.match(p.name))
        if not files:
            raise ValueError(f"Invalid checkpoint {path}: no comm hook state (saved by another engine?)")
        mine = path / _HOOK_FILE.format(rank=self.rank, world=self.world_size)
        first = torch.load(mine if mine.is_file() else files[0], map_location=self.device, weights_only=True)
        sigma: dict = {}
        for f in files:
            sigma.update(torch.load(f, map_location=self.device, weights_only=True).get("sigma", {}))
        self.hook_state.load_state_dict({**first, "sigma": sigma})
