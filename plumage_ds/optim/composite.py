"""The DeepSpeed composite: a client optimizer whose dense half ZeRO partitions and whose targets a
matrix optimizer owns, stepped as one atomic step.

DeepSpeed's ZeRO flattens and partitions every parameter its client optimizer holds, which cuts
through matrices (a low-rank optimizer would silently lose its per-matrix state), so the
composite hands DeepSpeed exactly one group: the dense parameters (embeddings, norms, head). The
target matrices stay outside ZeRO, with a :class:`~plumage_ds.optim.PlumageAdamW` (or
:class:`~plumage_ds.optim.GUM`, by the estimator's family) over them on the owner-sharded
replicated layout (ZeRO-0/1/2) or the ZeRO-3 layout (placeholders: updates land on ``ds_tensor``).

At each step DeepSpeed has reduced its partitions (stage 0: the composite all-reduces the dense
gradients itself); the inner optimizer then takes the partition as a
:class:`~plumage_ds.optim.base.DensePartition`: one agreement on non-finite values across both
halves, one global clipping norm, the one dense AdamW (:mod:`plumage_ds.kernels.adam`), one commit.

Learning rates: DeepSpeed's schedulers write an absolute ``lr`` into the composite's group; that is
a multiplier ``m = lr_now / lr`` on every group's base LR (the targets' groups, and the dense
group's, which :func:`~plumage_ds.optim.factory.select_groups` set to ``dense_lr``).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..config import ConfigError, OptimizerConfig
from ..kernels.batched import pack, unpack_into
from .base import DensePartition

SUPPORTED_STAGES = (0, 1, 2, 3)


class PlumageDeepSpeedOptimizer(torch.optim.Optimizer):
    """Client optimizer handed to DeepSpeed: AdamW on the one dense group, a matrix optimizer on the targets.

    ``param_groups`` is exactly ONE group of dense parameters (DeepSpeed's ZeRO-1/2/3 replaces its
    ``params`` by this rank's flat fp32 partition and calls ``step()`` with that group's gradient
    set, so a single group is what makes one global clipping norm possible). ``self.plumage`` is
    the matrix optimizer over the target matrices.

    Args:
        groups: :func:`~plumage_ds.optim.factory.select_groups` output: target groups
            (``lowrank=True``) and the dense group (``lowrank=False``, ``lr`` = ``dense_lr`` if set).
        config: the one :class:`~plumage_ds.config.OptimizerConfig`.
        stage: the ZeRO stage (0–3).
        process_group: the data-parallel group (``None``: the world).
    """

    def __init__(self, groups: list[dict], *, config: OptimizerConfig, stage: int, process_group=None) -> None:
        import torch.distributed as dist

        from .factory import matrix_optimizer

        if stage not in SUPPORTED_STAGES:
            raise ValueError(f"Invalid stage={stage!r}: must be 0, 1, 2 or 3")
        if config.spec.family == "adamw":
            raise ConfigError(
                "estimator", config.estimator, "the DeepSpeed composite runs a low-rank estimator on its targets; for "
                "AdamW hand DeepSpeed torch.optim.AdamW"
            )
        dense = [g for g in groups if not g.get("lowrank")]
        dense_params = [p for g in dense for p in g["params"]]
        if not dense_params:
            raise ValueError(
                "Every trainable parameter is a PLUMAGE target: DeepSpeed needs at least one non-target parameter "
                "in its optimizer (embeddings, norms...); narrow plumage.target_modules"
            )
        if config.dense_lr is not None and not config.lr > 0:
            raise ConfigError("dense_lr", config.dense_lr, f"needs lr > 0 under DeepSpeed (lr={config.lr!r} is the schedule's base)")
        super().__init__([{"params": dense_params}], config.adam_kwargs())
        self.stage = stage
        self.dense_names = [n for g in dense for n in g.get("names", [])] or None
        extra = {}
        if config.spec.family == "lowrank_adam" and config.backward_projection is None:
            extra["backward_projection"] = stage == 3  # ZeRO-3: target gradients would stay full-size on every rank
        targets = [g for g in groups if g.get("lowrank")]
        self.plumage = matrix_optimizer(targets, config, process_group=process_group or dist.group.WORLD, **extra)
        self._targets = [p for g in self.plumage.param_groups for p in g["params"]]
        self._base_lr = float(config.lr)  # the base of DeepSpeed's schedule
        self._group_base_lr = [float(g["lr"]) for g in self.plumage.param_groups]
        self._dense_base_lr = float(dense[0].get("lr", config.lr))
        self.engine_attached = False  # stage 0: set by attach_engine (the engine must not all-reduce)
        self.skipped_steps = 0  # whole steps skipped on every rank for non-finite gradients

    # -- helpers ----------------------------------------------------------------
    @property
    def layout(self):
        """The targets' layout (its ``rank``/``world_size`` are the data-parallel group's)."""
        return self.plumage.layout

    def zero_grad(self, set_to_none: bool = True) -> None:
        """DeepSpeed's group and the targets' gradients (and their backward projections)."""
        super().zero_grad(set_to_none=set_to_none)
        self.plumage.zero_grad(set_to_none=True)

    def _allreduce_dense_grads(self) -> None:
        """Stage 0: mean over ranks of the dense gradients (one accounted all-reduce)."""
        params = [p for g in self.param_groups for p in g["params"]]
        has = self.layout.agreement.any_true([p.grad is not None for p in params])
        for p, h in zip(params, has):
            if h and p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p, h in zip(params, has) if h]
        if not grads:
            return
        flat = pack(grads, dtype=torch.float32)
        self.layout.comm.all_reduce(flat, "dense_grad")
        unpack_into(flat.div_(self.layout.world_size), grads)

    def _schedule(self) -> float:
        """Apply DeepSpeed's LR (written into the dense group) to every group as a multiplier of its base."""
        lr = float(self.param_groups[0]["lr"])
        m = lr / self._base_lr if self._base_lr > 0 else None
        for g, base in zip(self.plumage.param_groups, self._group_base_lr):
            g["lr"] = base * m if m is not None else lr
        return self._dense_base_lr * m if m is not None else lr

    # -- step -------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if len(self.param_groups) != 1:
            raise RuntimeError(f"PlumageDeepSpeedOptimizer expects exactly one dense param group, got {len(self.param_groups)}")
        if self.stage == 0:
            if not self.engine_attached:
                raise RuntimeError(
                    "PlumageDeepSpeedOptimizer on ZeRO stage 0 was not attached to its engine: DeepSpeed would "
                    "all-reduce every gradient uncompressed (targets included). Call "
                    "plumage_ds.integrations.deepspeed.attach_engine(engine) after deepspeed.initialize "
                    "(initialize() and the plumage_ds.integrations.hf helpers do it)"
                )
            self._allreduce_dense_grads()
        group = self.param_groups[0]
        partition = DensePartition(
            params=list(group["params"]), state=self.state,
            group={"lr": self._schedule(), "betas": group["betas"], "eps": group["eps"], "weight_decay": group["weight_decay"]},
            replicated=self.stage == 0,
        )
        skipped = self.plumage.skipped_steps
        self.plumage.step_with_partition(partition)
        self.skipped_steps += self.plumage.skipped_steps - skipped
        # DeepSpeed's zero_grad only covers its own group: the targets' (and their projections) are ours.
        self.plumage.zero_grad(set_to_none=True)
        return loss

    # -- reports ----------------------------------------------------------------
    def matrix_report(self) -> list[dict]:
        """The matrix optimizer's per-target report plus one row per dense parameter."""
        rows = self.plumage.matrix_report()
        for name in self.dense_names or []:
            rows.append({"name": name, "shape": None, "mode": "adamw (DeepSpeed ZeRO partition)", "reason": "not a target", "owner": None})
        return rows

    def state_bytes(self) -> dict:
        """This rank's optimizer state, measured: the matrix optimizer's (``projectors``, ``second_moment``,
        ``moments``, ``non_target``) and the AdamW state of DeepSpeed's partition (``deepspeed_partition``);
        ``total`` is their sum, ``plumage_total`` the matrix optimizer's part alone."""
        out = dict(self.plumage.state_bytes())
        inner = sum(t.numel() * t.element_size() for st in self.state.values() for t in st.values() if torch.is_tensor(t))
        out["deepspeed_partition"] = inner
        out["plumage_total"] = out["total"]
        out["total"] = out["plumage_total"] + inner
        return out

    def comm_stats(self) -> dict:
        return self.plumage.comm_stats()

    # -- checkpoints ------------------------------------------------------------
    def _zero3(self):
        """The targets' entries, on the layout of their current placement (ZeRO-3 partitions the very
        tensors the composite was built on when DeepSpeed initialises: re-planned here if no step ran)."""
        self.plumage._check_engine()
        return list(self.plumage._entries) if self.stage == 3 else []

    def state_dict(self) -> dict:
        zero3 = self._zero3()
        sd = super().state_dict()
        sd["plumage"] = self.plumage.state_dict()
        if self.stage == 3:
            # The targets' weights live in ZeRO-3 chunks outside DeepSpeed's optimizer, so
            # DeepSpeed's files would not carry them: this rank's chunks travel here.
            sd["zero3_targets"] = self.layout.export_weights(zero3)
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        sd = dict(state_dict)
        shard = sd.pop("plumage", None)
        if shard is None:
            raise ValueError("Invalid state_dict: no 'plumage' entry (not saved by PlumageDeepSpeedOptimizer)")
        meta = shard.get(self.plumage._state_section, {})
        if meta.get("rank") is not None and meta.get("rank") != self.layout.rank:
            raise ValueError(
                f"Invalid state_dict: PLUMAGE shard of rank {meta.get('rank')} offered to rank {self.layout.rank}. "
                "On ZeRO stage 0 DeepSpeed saves one optimizer state (rank 0's) for all ranks; use "
                "plumage_ds.integrations.deepspeed.save_checkpoint / load_checkpoint, which keep one shard per rank"
            )
        chunks: Optional[dict] = sd.pop("zero3_targets", None)
        zero3 = self._zero3()
        if self.stage == 3:
            if chunks is None:
                raise ValueError("Invalid state_dict: no 'zero3_targets' (not saved under ZeRO stage 3)")
            self.layout.check_weights(zero3, chunks)
        elif chunks is not None:
            raise ValueError(f"Invalid state_dict: saved under ZeRO stage 3, loading under stage {self.stage}")
        self.plumage.load_state_dict(shard)  # validates first (world size, ownership, shapes)
        super().load_state_dict(sd)
        if chunks is not None:
            self.layout.import_weights(zero3, chunks)
