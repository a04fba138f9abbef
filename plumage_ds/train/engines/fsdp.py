"""``train.engine: fsdp2`` and ``hsdp`` — FSDP2 ``fully_shard`` (per block, then the root).

``fsdp2``: one mesh over the world; every rank holds rows of every weight and the optimizer
state sharded like them (:class:`PlumageAdamW` on the DTensor parameters, or
``torch.optim.AdamW`` for ``adamw``).

``hsdp``: a ``(replicate, shard)`` mesh, shard within a node (``train.hsdp_shard_size``, default
the launcher's processes per node), replicate across nodes. Low-rank estimators: compressed
HSDP — FSDP on the shard sub-mesh, the optimizer averages across replicas itself, target
matrices as their ``r × l`` projections. ``adamw``: plain HSDP (FSDP all-reduces across replicas).

Checkpoints: model and optimizer through ``torch.distributed.checkpoint`` (sharded files,
reshardable to another world size); the final weights through ``save_pretrained`` on rank 0.
PlumageAdamW and GUM both run on the FSDP2 rows layout.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from plumage_ds.config import ConfigError, JobConfig
from plumage_ds.optim import build_optimizer
from plumage_ds.optim.factory import adamw_params, adamw_rows

from .base import Engine


class FSDP2Engine(Engine):
    name = "fsdp2"
    collective_forward = True  # FSDP all-gathers weights in forward: every rank evaluates

    def mesh(self):
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(self.device.type, (self.world_size,)), {}

    def setup(self, model) -> None:
        from plumage_ds.integrations.fsdp import shard_model

        mesh, optimizer_kw = self.mesh()
        self.model = self.module = shard_model(model.to(self.device), mesh)
        if self.cfg.spec.family == "adamw":
            params = adamw_params(self.model, self.cfg)
            self.optimizer = torch.optim.AdamW(params, **self.cfg.adam_kwargs())
            self.rows = adamw_rows(self.model, params)
        else:
            self.optimizer, self.rows = build_optimizer(self.model, self.cfg, **optimizer_kw)
        self.scheduler = self.make_scheduler(self.optimizer)

    def _no_sync(self, last: bool):
        """Reduce-scatter only after the last micro-batch (FSDP2's ``set_requires_gradient_sync``)."""
        if last:
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def no_sync():
            self.module.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.module.set_requires_gradient_sync(True)

        return no_sync()

    def state_bytes(self):
        if callable(getattr(self.optimizer, "state_bytes", None)):
            return super().state_bytes()
        local = sum(
            (t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size()
            for st in self.optimizer.state.values() for t in st.values() if torch.is_tensor(t)
        )
        return local, None

    # -- state -------------------------------------------------------------------------
    @contextlib.contextmanager
    def full_model(self):
        """Rank 0 gets an unsharded copy with the full weights (collective gather)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank != 0:
            yield self.model
            return
        from transformers import AutoModelForCausalLM

        copy = AutoModelForCausalLM.from_config(self.model.config).to(next(iter(full.values())).dtype)
        result = copy.load_state_dict(full, strict=False)
        if result.unexpected_keys:
            raise RuntimeError(f"FSDP full state dict has weights the model lacks: {result.unexpected_keys[:5]}")
        yield copy

    def load_model_weights(self, path: Path) -> None:
        """The model comes back with the optimizer through ``torch.distributed.checkpoint`` (:meth:`load`)."""

    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(self.model, self.optimizer)
        return {"model": msd, "optim": osd}

    def save(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(), checkpoint_id=str(path / "dcp"))

    def load(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        target = path / "dcp"
        if not target.is_dir():
            raise ValueError(f"Invalid checkpoint {path}: no torch.distributed.checkpoint state (saved by another engine?)")
        state = self._state()
        dcp.load(state, checkpoint_id=str(target))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


class HSDPEngine(FSDP2Engine):
    name = "hsdp"

    @classmethod
    def check(cls, job: JobConfig, world_size: int) -> None:
        shards = cls.shard_size(job, world_size)
        if world_size % shards:
            raise ConfigError("train.hsdp_shard_size", shards, f"must divide the world size {world_size}")

    @staticmethod
    def shard_size(job: JobConfig, world_size: int) -> int:
        """``train.hsdp_shard_size``, or the launcher's processes per node (``LOCAL_WORLD_SIZE``)."""
        return job.train.hsdp_shard_size or int(os.environ.get("LOCAL_WORLD_SIZE", world_size) or world_size)

    def mesh(self):
        from plumage_ds.integrations.fsdp import hsdp_mesh

        shards = self.shard_size(self.job, self.world_size)
        mesh = hsdp_mesh(self.world_size // shards, shards, self.device.type)
        if self.cfg.spec.family == "adamw":  # plain HSDP: FSDP all-reduces across replicas
            return mesh, {}
        return mesh["shard"], {"replicate_group": mesh["replicate"].get_group()}
