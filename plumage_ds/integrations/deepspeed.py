"""DeepSpeed adapter: PLUMAGE owns the target matrices outside ZeRO's flat partitions.

See ``docs/deepspeed.md`` for the mechanism and the reasoning (read from
DeepSpeed 0.19.8's source). In short:

* :func:`initialize` pops the ``"plumage"`` section, the ``"optimizer"`` section
  (AdamW hyperparameters) and ``gradient_clipping`` from the DeepSpeed config and
  loads them into ONE :class:`~plumage_ds.config.OptimizerConfig` (the schema of the
  main job's ``optimizer:`` section, same strict loading), selects the target matrices with
  :func:`~plumage_ds.optim.lowrank_param_groups`, logs (rank 0, INFO) one row per
  parameter with its mode, and hands DeepSpeed a **composite client optimizer**
  (:class:`PlumageDeepSpeedOptimizer`) whose ``param_groups`` are only the
  non-target parameters. ZeRO flattens, partitions and reduces exactly those; the
  target matrices stay ordinary ``nn.Parameter`` s whose ``.grad`` accumulate
  locally over micro-batches.
* The composite's ``step()`` (called by DeepSpeed at the accumulation boundary,
  on every rank, after ZeRO has reduced its partitions) runs
  :class:`~plumage_ds.distributed.ShardedPlumageAdamW` on the targets
  (compressed reduce-scatter to owners, owner Adam, all-gather of the ``r × l``
  updates), then AdamW (same arithmetic, :mod:`plumage_ds.optim.adam`) on
  DeepSpeed's partition, both scaled by ONE global clip coefficient.
* Stage 0: DeepSpeed would all-reduce every module gradient (targets included,
  uncompressed); the adapter sets ``engine.enable_backward_allreduce = False``
  (the public switch 1-bit Adam uses) and the composite all-reduces the
  non-target gradients itself through the accounted collective layer.
* Stage 3: every module parameter is a ZeRO-3 placeholder; targets keep full-size
  local gradients (ZeRO-3 only reduces its optimizer's parameters), PLUMAGE reduces
  them compressed and applies ``ΔW`` to this rank's flat chunk ``param.ds_tensor``
  (version-guarded, :func:`check_zero3_param`); the composite's ``state_dict()``
  carries this rank's target chunks, so ZeRO-3 checkpoints hold them.

Only public DeepSpeed API is used: ``deepspeed.initialize``,
``deepspeed.init_distributed``, ``engine.enable_backward_allreduce``,
``engine.client_optimizer``, ``engine.save_checkpoint`` / ``load_checkpoint``
and the documented config keys.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..config import ConfigError, OptimizerConfig, from_dict
from ..io import atomic_torch_save
from ..optim.adam import adam_direction, adam_step_size, adam_update_moments, zeros_state
from ..optim.base import NonFiniteGradientError

logger = logging.getLogger(__name__)

SUPPORTED_STAGES = (0, 1, 2, 3)
VERIFIED_DEEPSPEED = "0.19.8"
"""The DeepSpeed version whose source and behaviour this adapter was verified against."""
_SIDE_FILE = "plumage_optim_rank{rank}_of_{world}.pt"


# --------------------------------------------------------------------------- config

_ADAM_KEYS = ("lr", "betas", "eps", "weight_decay")


def _read_config(config: Any) -> dict:
    if isinstance(config, (str, os.PathLike)):
        with open(config, encoding="utf-8") as f:
            return json.load(f)
    if isinstance(config, dict):
        return copy.deepcopy(config)
    raise ValueError(f"Invalid config: expected a dict or a JSON path, got {type(config).__name__}")


def optimizer_config_from_deepspeed(ds: dict) -> OptimizerConfig:
    """Pop the optimizer knobs out of DeepSpeed config ``ds`` (in place) into one :class:`OptimizerConfig`.

    Sources, all loaded with the same strict ``from_dict`` as the main job's YAML (so a bad key or
    value gets the same message, with ``plumage.``/``optimizer.params.`` in front of the key):
    the ``"plumage"`` section (any :class:`OptimizerConfig` key), DeepSpeed's own
    ``"optimizer"`` section (type ``AdamW``/``Adam``; ``params``: ``lr``, ``betas``, ``eps``,
    ``weight_decay`` — decoupled decay in both, as DeepSpeed's default ``adam_w_mode``) and
    ``gradient_clipping`` (→ ``max_grad_norm``; absent means no clipping here, not DeepSpeed's 1.0).
    A knob given in two places with two values is an error naming both.
    """
    section = ds.pop("plumage", None)
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ConfigError("plumage", section, "must be a mapping of optimizer keys")
    data = dict(section)
    opt = ds.pop("optimizer", None) or {}
    if not isinstance(opt, dict):
        raise ConfigError("optimizer", opt, "must be a mapping with 'type' and 'params'")
    unknown = sorted(set(opt) - {"type", "params"})
    if unknown:
        raise ValueError(f"Unknown key(s) {unknown} in optimizer section; valid keys: ['params', 'type']")
    otype = str(opt.get("type", "AdamW"))
    if otype.lower() not in ("adamw", "adam"):
        raise ValueError(f"Invalid optimizer.type={otype!r}: the PLUMAGE adapter runs AdamW (type 'AdamW' or 'Adam')")
    params = dict(opt.get("params", {}) or {})
    unknown = sorted(set(params) - set(_ADAM_KEYS))
    if unknown:
        raise ValueError(f"Unknown key(s) {unknown} in optimizer.params; valid keys: {list(_ADAM_KEYS)}")
    adam = from_dict(OptimizerConfig, params, section="optimizer.params").adam_kwargs() if params else {}
    given = {k: adam[k] for k in params}
    if "gradient_clipping" in ds:
        clip = ds.pop("gradient_clipping")
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip >= 0 or not math.isfinite(clip):
            raise ConfigError("gradient_clipping", clip, "must be a finite number >= 0")
        given["max_grad_norm"] = float(clip)
    for key, value in given.items():
        if key in data and getattr(from_dict(OptimizerConfig, {key: data[key]}, section="plumage"), key) != value:
            where = "gradient_clipping" if key == "max_grad_norm" else f"optimizer.params.{key}"
            raise ValueError(f"Conflicting {key}: plumage.{key}={data[key]!r} but {where}={value!r}; give it once")
        data[key] = list(value) if isinstance(value, tuple) else value
    return from_dict(OptimizerConfig, data, section="plumage")


def split_config(config: Any) -> tuple[dict, OptimizerConfig, int]:
    """``(ds_config, optimizer_config, stage)`` from a DeepSpeed config (dict or JSON path).

    ``ds_config`` is what DeepSpeed gets: no ``"plumage"`` / ``"optimizer"`` section,
    ``"gradient_clipping": 0`` (this DeepSpeed build clips at 1.0 when the key is
    absent; clipping is done once, globally, by the composite) and
    ``"zero_allow_untested_optimizer": true`` (the composite is a client optimizer
    ZeRO does not know). ``optimizer_config`` is :func:`optimizer_config_from_deepspeed`.
    """
    ds = _read_config(config)
    cfg = optimizer_config_from_deepspeed(ds)
    ds["gradient_clipping"] = 0.0
    ds["zero_allow_untested_optimizer"] = True
    zero = ds.get("zero_optimization", {}) or {}
    stage = zero.get("stage", 0)
    if stage not in SUPPORTED_STAGES:
        raise ConfigError("zero_optimization.stage", stage, "must be 0, 1, 2 or 3")
    if zero.get("elastic_checkpoint"):
        raise ValueError(
            "zero_optimization.elastic_checkpoint=true drops the client optimizer's non-partition state (PLUMAGE "
            "projectors and moments) from ZeRO checkpoints; leave it false"
        )
    if (ds.get("fp16", {}) or {}).get("enabled"):
        raise NotImplementedError(
            "fp16 is not supported: target-matrix gradients live outside ZeRO and would need DeepSpeed's loss-scale "
            "unscaling and overflow check; use bf16 (stage 2) or fp32"
        )
    if (ds.get("bf16", {}) or {}).get("enabled") and stage != 2:
        raise NotImplementedError(
            f"bf16 with zero stage {stage} is not supported (DeepSpeed wraps the optimizer in its FP16/BF16 "
            "optimizer there, which flattens every group; only stage 2 + bf16 is verified)"
        )
    return ds, cfg, stage


# --------------------------------------------------------------------------- ZeRO-3 target updates


def check_zero3_param(p: Tensor, name: str = "parameter") -> None:
    """Version guard for the one DeepSpeed internal the stage-3 path relies on.

    Under ZeRO-3 every module parameter (targets too) is a placeholder; its logical
    shape is ``p.ds_shape`` and this rank's flat chunk of ``ceil(numel / W)`` elements
    (zero-padded at the end) is ``p.ds_tensor``; DeepSpeed all-gathers the full weight
    from these chunks before use (and re-gathers persistent ones after each step).
    """
    import deepspeed

    problems = []
    for attr in ("ds_shape", "ds_numel", "ds_tensor"):
        if not hasattr(p, attr):
            problems.append(f"missing attribute {attr}")
    if not problems:
        world = dist.get_world_size(getattr(p, "ds_process_group", None))
        chunk = -(-int(p.ds_numel) // world)
        if p.ds_tensor.numel() != chunk or p.ds_tensor.dim() != 1:
            problems.append(f"ds_tensor has shape {tuple(p.ds_tensor.shape)}, expected ({chunk},) = ceil(numel/W)")
        if int(torch.Size(p.ds_shape).numel()) != int(p.ds_numel):
            problems.append("ds_numel != prod(ds_shape)")
    if problems:
        raise RuntimeError(
            f"DeepSpeed {deepspeed.__version__} changed the ZeRO-3 parameter layout plumage_ds relies on "
            f"(verified with {VERIFIED_DEEPSPEED}) for {name}: " + "; ".join(problems)
        )


def _zero3_plumage_class():
    from ..distributed.data_parallel import ShardedPlumageAdamW

    class Zero3PlumageAdamW(ShardedPlumageAdamW):
        """Targets are ZeRO-3 placeholders: shapes from ``ds_shape`` (base class), and
        ``ΔW`` (full, replicated on every rank after the all-gather of ``N``) is applied to
        this rank's flat chunk ``param.ds_tensor`` only. Their ``.grad`` (full-size, local:
        ZeRO-3 only reduces its optimizer's parameters) goes through PLUMAGE's compressed path."""

        @staticmethod
        def _apply_matrix_update(param: Tensor, delta: Tensor, decay: float) -> None:
            check_zero3_param(param)
            part = param.ds_tensor
            group = getattr(param, "ds_process_group", None)
            start = dist.get_rank(group) * part.numel()
            n = max(0, min(part.numel(), int(param.ds_numel) - start))
            if n == 0:
                return
            # the chunk is a flat view; the base rule (fp32 math, one rounding) applies as is
            ShardedPlumageAdamW._apply_matrix_update(part.narrow(0, 0, n), delta.reshape(-1)[start : start + n], decay)

    return Zero3PlumageAdamW


# --------------------------------------------------------------------------- composite optimizer


class PlumageDeepSpeedOptimizer(torch.optim.Optimizer):
    """Client optimizer handed to DeepSpeed: AdamW on the non-target group, PLUMAGE on the targets.

    ``param_groups`` is exactly ONE group of non-target parameters (DeepSpeed's
    ZeRO-1/2 replaces its ``params`` by this rank's flat fp32 partition and calls
    ``step()`` once per group with that group's gradient set just before, so a
    single group is what makes one global clipping norm possible).
    ``self.plumage`` is the internal :class:`~plumage_ds.distributed.ShardedPlumageAdamW`
    over the target matrices.
    """

    def __init__(
        self,
        dense_params: list[Tensor],
        target_groups: list[dict],
        *,
        config: OptimizerConfig,
        stage: int,
        process_group: Optional[dist.ProcessGroup] = None,
        dense_names: Optional[list[str]] = None,
    ) -> None:
        from ..distributed.data_parallel import ShardedPlumageAdamW

        cls = _zero3_plumage_class() if stage == 3 else ShardedPlumageAdamW
        if not dense_params:
            raise ValueError(
                "Every trainable parameter is a PLUMAGE target: DeepSpeed needs at least one non-target parameter "
                "in its optimizer (embeddings, norms...); narrow plumage.target_modules"
            )
        if stage not in SUPPORTED_STAGES:
            raise ValueError(f"Invalid stage={stage!r}: must be 0, 1, 2 or 3")
        if config.spec.family != "lowrank_adam":
            raise ConfigError(
                "estimator", config.estimator, "the DeepSpeed composite runs 'plumage', 'galore', 'haar' or 'optimal' on its targets"
            )
        if config.dense_lr is not None and not config.lr > 0:
            raise ConfigError("dense_lr", config.dense_lr, f"needs lr > 0 under DeepSpeed (lr={config.lr!r} is the schedule's base)")
        super().__init__([{"params": list(dense_params)}], config.adam_kwargs())
        self.stage = stage
        self.dense_names = list(dense_names) if dense_names else None
        kwargs = config.lowrank_kwargs()
        if config.backward_projection is None:  # ZeRO-3: target gradients would stay full-size on every rank
            kwargs["backward_projection"] = stage == 3
        self.plumage = cls(target_groups, **kwargs, process_group=process_group)
        self.plumage.external_grad_sq_norm = self._dense_grad_sq_norm
        self._base_lr = float(config.lr)
        # DeepSpeed's schedulers (WarmupLR...) write absolute LRs for lr into the group: the dense
        # step runs at that value times dense_lr / lr
        self._dense_lr_ratio = 1.0 if config.dense_lr is None else config.dense_lr / config.lr
        self._plumage_base_lr = [float(g["lr"]) for g in self.plumage.param_groups]
        self._targets = [p for g in self.plumage.param_groups for p in g["params"]]
        self.engine_attached = False  # stage 0: set by attach_engine (the engine must not all-reduce)
        self.skipped_steps = 0  # whole steps skipped on every rank for non-finite gradients

    # -- helpers ----------------------------------------------------------------
    @property
    def comm(self):
        return self.plumage.distributor.comm

    def _dense_grads(self) -> list[Tensor]:
        return [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]

    def _dense_grad_sq_norm(self) -> float:
        """This rank's share of ``‖ḡ‖²`` over the non-target gradients DeepSpeed hands us.

        Stages 1/2/3: the fp32 partitions are disjoint across ranks, so every rank
        contributes its own (summed over ranks by PLUMAGE's ``sum_scalar``).
        Stage 0: the averaged gradients are replicated, so only rank 0 contributes.
        """
        if self.stage == 0 and self.comm.rank != 0:
            return 0.0
        return float(sum(float(g.double().pow(2).sum()) for g in self._dense_grads()))

    def zero_grad(self, set_to_none: bool = True) -> None:
        """DeepSpeed's group and the targets' gradients (and their backward projections)."""
        super().zero_grad(set_to_none=set_to_none)
        self.plumage.zero_grad(set_to_none=True)

    def _dense_nonfinite(self) -> bool:
        """Does any rank's non-target gradient (its ZeRO partition; stage 0: the averaged ones) hold NaN/Inf?"""
        local = any(g.numel() and not bool(torch.isfinite(g).all()) for g in self._dense_grads())
        return self.plumage.distributor.any_true([local], "dense_flags")[0]

    def _allreduce_dense_grads(self) -> None:
        """Stage 0: mean over ranks of the non-target gradients (one accounted all-reduce)."""
        params = [p for g in self.param_groups for p in g["params"]]
        has = self.plumage.distributor.any_true([p.grad is not None for p in params])
        for p, h in zip(params, has):
            if h and p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p, h in zip(params, has) if h]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        self.comm.all_reduce(flat, "dense_grad")
        flat.div_(self.comm.world_size)
        off = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[off : off + n].view_as(g))
            off += n

    # -- step -------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if len(self.param_groups) != 1:
            raise RuntimeError(
                f"PlumageDeepSpeedOptimizer expects exactly one non-target param group, got {len(self.param_groups)}"
            )
        if self.stage == 0:
            if not self.engine_attached:
                raise RuntimeError(
                    "PlumageDeepSpeedOptimizer on ZeRO stage 0 was not attached to its engine: DeepSpeed would "
                    "all-reduce every gradient uncompressed (targets included). Call "
                    "plumage_ds.integrations.deepspeed.attach_engine(engine) after deepspeed.initialize "
                    "(initialize() and the plumage_ds.integrations.hf helpers do it)"
                )
            self._allreduce_dense_grads()
        # LR schedule: DeepSpeed's scheduler writes lr into our (single) group; the PLUMAGE
        # groups follow with the same multiplier, the dense step scales it by dense_lr / lr.
        lr = float(self.param_groups[0]["lr"])
        for g, base in zip(self.plumage.param_groups, self._plumage_base_lr):
            g["lr"] = base * (lr / self._base_lr) if self._base_lr > 0 else lr
        # Atomic across both halves: non-finite values in DeepSpeed's partitions (checked and agreed
        # here) or in the targets (checked and agreed by PLUMAGE) skip the whole step on every rank.
        if self._dense_nonfinite():
            if self.plumage.nonfinite == "raise":
                raise NonFiniteGradientError(
                    "Non-finite gradient in DeepSpeed's non-target partition; step not applied (nonfinite='raise'); "
                    "parameters and optimizer state are unchanged"
                )
            self.skipped_steps += 1
            self.plumage.zero_grad(set_to_none=True)
            return loss
        skipped = self.plumage.skipped_steps
        self.plumage.step()
        if self.plumage.skipped_steps != skipped:  # the targets held NaN/Inf: leave the partition alone too
            self.skipped_steps += 1
            self.plumage.zero_grad(set_to_none=True)
            return loss
        coef = self.plumage.last_clip_coef
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                G = p.grad.float() if p.grad.dtype != torch.float32 else p.grad
                if coef != 1.0:
                    G = G * coef
                st = self.state[p]
                if "step" not in st:
                    st["step"] = 0
                    st["exp_avg"], st["exp_avg_sq"] = zeros_state(p.shape, p.device)
                st["step"] += 1
                adam_update_moments(st["exp_avg"], st["exp_avg_sq"], G, beta1, beta2)
                N = adam_direction(st["exp_avg"], st["exp_avg_sq"], group["eps"])
                lr = group["lr"] * self._dense_lr_ratio
                size = adam_step_size(lr, st["step"], beta1, beta2)
                if p.dtype == torch.float32:
                    p.mul_(1.0 - lr * group["weight_decay"]).sub_(N, alpha=size)
                else:
                    p.copy_(p.float().mul_(1.0 - lr * group["weight_decay"]).sub_(N, alpha=size))
        # DeepSpeed's zero_grad only covers its own groups: the targets' (and their projections) are ours.
        self.plumage.zero_grad(set_to_none=True)
        return loss

    # -- reports ----------------------------------------------------------------
    def matrix_report(self) -> list[dict]:
        """PLUMAGE's per-target report plus one row per non-target parameter."""
        rows = self.plumage.matrix_report()
        for name in self.dense_names or []:
            rows.append({"name": name, "shape": None, "mode": "adamw (DeepSpeed ZeRO partition)", "reason": "not a target", "owner": None})
        return rows

    def state_bytes(self) -> dict:
        """This rank's optimizer state, measured: PLUMAGE's target state (``projectors``,
        ``second_moment``, ``moments``) and the AdamW state of DeepSpeed's partition (``deepspeed_partition``);
        ``total`` is their sum, ``plumage_total`` PLUMAGE's part alone."""
        out = dict(self.plumage.state_bytes())
        inner = 0
        for st in self.state.values():
            inner += sum(t.numel() * t.element_size() for t in st.values() if torch.is_tensor(t))
        out["deepspeed_partition"] = inner
        out["plumage_total"] = out["total"]
        out["total"] = out["plumage_total"] + inner
        return out

    def comm_stats(self) -> dict:
        return self.plumage.comm_stats()

    # -- checkpoints ------------------------------------------------------------
    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["plumage"] = self.plumage.state_dict()
        if self.stage == 3:
            # The targets' weights live in ZeRO-3 chunks outside DeepSpeed's optimizer, so
            # DeepSpeed's files would not carry them: this rank's chunks travel here.
            for p in self._targets:
                check_zero3_param(p)
            sd["zero3_targets"] = {
                "rank": self.comm.rank,
                "world_size": self.comm.world_size,
                "chunks": [p.ds_tensor.detach().clone() for p in self._targets],
            }
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        sd = dict(state_dict)
        shard = sd.pop("plumage", None)
        if shard is None:
            raise ValueError("Invalid state_dict: no 'plumage' entry (not saved by PlumageDeepSpeedOptimizer)")
        meta = shard.get("plumage", {})
        if meta.get("kind") == "shard" and meta.get("rank") != self.comm.rank:
            raise ValueError(
                f"Invalid state_dict: PLUMAGE shard of rank {meta.get('rank')} offered to rank {self.comm.rank}. "
                "On ZeRO stage 0 DeepSpeed saves one optimizer state (rank 0's) for all ranks; use "
                "plumage_ds.integrations.deepspeed.save_checkpoint / load_checkpoint, which keep one shard per rank"
            )
        chunks = sd.pop("zero3_targets", None)
        if self.stage == 3:
            if chunks is None:
                raise ValueError("Invalid state_dict: no 'zero3_targets' (not saved under ZeRO stage 3)")
            if chunks["rank"] != self.comm.rank or chunks["world_size"] != self.comm.world_size:
                raise ValueError(
                    f"Invalid state_dict: ZeRO-3 target chunks of rank {chunks['rank']}/{chunks['world_size']} "
                    f"offered to rank {self.comm.rank}/{self.comm.world_size}; stage-3 checkpoints resume on the "
                    "same world size only"
                )
            for p, c in zip(self._targets, chunks["chunks"]):
                check_zero3_param(p)
                if tuple(c.shape) != tuple(p.ds_tensor.shape):
                    raise ValueError(f"Invalid state_dict: ZeRO-3 chunk shape {tuple(c.shape)} != {tuple(p.ds_tensor.shape)}")
        elif chunks is not None:
            raise ValueError(f"Invalid state_dict: saved under ZeRO stage 3, loading under stage {self.stage}")
        self.plumage.load_state_dict(shard)  # validates first (world size, ownership, shapes)
        super().load_state_dict(sd)
        if chunks is not None:
            with torch.no_grad():
                for p, c in zip(self._targets, chunks["chunks"]):
                    p.ds_tensor.copy_(c)
                    if p.data.numel() == int(p.ds_numel):  # currently gathered (persistent): stale copy
                        raise RuntimeError(
                            "ZeRO-3 target parameter is gathered while loading a checkpoint; set "
                            "stage3_param_persistence_threshold so targets are partitioned, or load before use"
                        )


# --------------------------------------------------------------------------- public entry points


def _log_report(rows: list[dict], dense: list[tuple[str, list]], title: str = "DeepSpeed adapter") -> None:
    lines = [f"{'parameter':<48} {'shape':<14} {'mode':<8} {'owner':<5} reason"]
    for r in rows:
        lines.append(f"{r['name']:<48} {str(tuple(r['shape'])):<14} {r['mode']:<8} {r['owner']!s:<5} {r['reason']}")
    for name, shape in dense:
        lines.append(f"{name:<48} {str(tuple(shape)):<14} {'adamw':<8} {'zero':<5} DeepSpeed ZeRO partition (not a target)")
    logger.info("%s, parameter modes:\n%s", title, "\n".join(lines))


def build_composite(model, *, config: OptimizerConfig, stage: int, title: str = "DeepSpeed adapter") -> PlumageDeepSpeedOptimizer:
    """The composite client optimizer for ``model``: targets chosen by ``config.target_modules``
    (:func:`~plumage_ds.optim.select_targets` rules), each distinct tensor once (tied weights),
    every other trainable tensor in DeepSpeed's group.

    Hand it to DeepSpeed as ``optimizer=`` with ``"gradient_clipping": 0`` (clipping is the
    composite's, global) and ``"zero_allow_untested_optimizer": true``; then call
    :func:`attach_engine` on the engine. Logs the mode table on rank 0.
    """
    from ..optim.factory import select_groups

    groups, _ = select_groups(model, config)
    target_groups = [g for g in groups if g.get("lowrank")]
    dense_groups = [g for g in groups if not g.get("lowrank")]
    dense_params = [p for g in dense_groups for p in g["params"]]
    dense_names = [n for g in dense_groups for n in g["names"]]
    composite = PlumageDeepSpeedOptimizer(dense_params, target_groups, config=config, stage=stage, dense_names=dense_names)
    if not dist.is_initialized() or dist.get_rank() == 0:
        shapes = [list(getattr(p, "ds_shape", p.shape)) for p in dense_params]
        _log_report(composite.plumage.matrix_report(), list(zip(dense_names, shapes)), title)
    return composite


def attach_engine(engine) -> PlumageDeepSpeedOptimizer:
    """Tie the composite to the engine that wraps it; returns the composite.

    Stage 0: DeepSpeed's fallback all-reduces EVERY module gradient (targets uncompressed);
    this turns that off (``engine.enable_backward_allreduce = False``, the public switch 1-bit
    Adam uses): the composite reduces non-targets itself, PLUMAGE the targets, compressed.
    Other stages: ZeRO reduces only its own partitions; nothing to change.
    """
    composite = plumage_optimizer(engine)
    if composite.stage == 0:
        engine.enable_backward_allreduce = False
    elif engine.optimizer is not composite:
        _drop_targets_on_skip(engine.optimizer, composite)
    composite.engine_attached = True
    return composite


def _drop_targets_on_skip(zero_optimizer, composite: PlumageDeepSpeedOptimizer) -> None:
    """ZeRO wraps the composite and may skip a step itself (``overflow``: a NaN/Inf in its
    partitions) without calling the composite; the targets' gradients of that step must then be
    dropped too, or they would leak into the next step."""
    inner = zero_optimizer.step

    def step(*args, **kwargs):
        out = inner(*args, **kwargs)
        if getattr(zero_optimizer, "overflow", False):
            composite.plumage.zero_grad(set_to_none=True)
        return out

    zero_optimizer.step = step


def initialize(model, config, model_parameters=None, **kwargs):
    """Drop-in for ``deepspeed.initialize`` with PLUMAGE owning the target matrices.

    Args:
        model: the ``nn.Module``.
        config: DeepSpeed config (dict or JSON path) with a ``"plumage"`` section.
        model_parameters: must be ``None`` (targets and non-targets come from
            ``model``'s trainable parameters).
        **kwargs: passed to ``deepspeed.initialize`` (``training_data``,
            ``lr_scheduler``, ``collate_fn``...). ``optimizer``, ``mpu`` and
            ``config_params`` are rejected.

    Returns DeepSpeed's tuple ``(engine, optimizer, dataloader, lr_scheduler)``;
    the composite optimizer is ``engine.client_optimizer`` (see
    :func:`plumage_optimizer`).
    """
    import deepspeed

    for bad in ("optimizer", "mpu", "config_params"):
        if kwargs.get(bad) is not None:
            raise ValueError(f"plumage_ds.integrations.deepspeed.initialize does not take {bad}=")
    if model_parameters is not None:
        raise ValueError("model_parameters must be None: PLUMAGE selects targets from model via plumage.target_modules")
    ds_config, cfg, stage = split_config(config)
    if cfg.spec.family != "lowrank_adam":
        raise ConfigError(
            "plumage.estimator", cfg.estimator,
            "the DeepSpeed composite runs 'plumage', 'galore', 'haar' or 'optimal'; for AdamW hand DeepSpeed torch.optim.AdamW",
        )
    if not dist.is_initialized():
        backend = "gloo" if os.environ.get("DS_ACCELERATOR", "") == "cpu" or not torch.cuda.is_available() else None
        deepspeed.init_distributed(dist_backend=backend)
    composite = build_composite(model, config=cfg, stage=stage)
    engine, optimizer, dataloader, lr_scheduler = deepspeed.initialize(
        model=model, optimizer=composite, config=ds_config, **kwargs
    )
    if engine.client_optimizer is not composite:  # public attribute of DeepSpeedEngine
        raise RuntimeError("DeepSpeed did not keep the PLUMAGE composite as its client optimizer")
    attach_engine(engine)
    return engine, optimizer, dataloader, lr_scheduler


def plumage_optimizer(engine) -> PlumageDeepSpeedOptimizer:
    """The composite optimizer of an engine built by :func:`initialize`."""
    opt = getattr(engine, "client_optimizer", None)
    if not isinstance(opt, PlumageDeepSpeedOptimizer):
        raise ValueError("engine was not built by plumage_ds.integrations.deepspeed.initialize")
    return opt


def save_checkpoint(engine, save_dir: str, tag: Optional[str] = None, client_state: Optional[dict] = None, **kw):
    """``engine.save_checkpoint`` plus, on stage 0, one PLUMAGE shard file per rank.

    Stages 1/2/3: DeepSpeed's ``zero_pp_rank_*_optim_states.pt`` already carries the
    composite's full ``state_dict()`` (inner AdamW + this rank's PLUMAGE shard; stage 3:
    + this rank's target-weight chunks), so this is ``engine.save_checkpoint``. Stage 0: DeepSpeed saves only rank 0's
    optimizer state; every rank writes ``<dir>/<tag>/plumage_optim_rank{r}_of_{W}.pt``.
    Collective: every rank must call it.
    """
    opt = plumage_optimizer(engine)
    tag = tag if tag is not None else f"global_step{engine.global_steps}"
    ok = engine.save_checkpoint(save_dir, tag=tag, client_state=client_state or {}, **kw)
    if opt.stage == 0:
        path = os.path.join(save_dir, str(tag), _SIDE_FILE.format(rank=opt.comm.rank, world=opt.comm.world_size))
        atomic_torch_save(opt.state_dict(), path)
        dist.barrier()
    return ok


def load_checkpoint(engine, load_dir: str, tag: Optional[str] = None, **kw):
    """``engine.load_checkpoint`` plus, on stage 0, this rank's PLUMAGE shard file.

    Same world size: resumes bitwise (fp32). Another world size raises
    ``ValueError`` naming :func:`plumage_ds.optim.merge_shards` (PLUMAGE) — DeepSpeed's
    own partitions follow DeepSpeed's rules.
    """
    opt = plumage_optimizer(engine)
    if opt.stage == 0:
        kw = dict(kw, load_optimizer_states=False)
    out = engine.load_checkpoint(load_dir, tag=tag, **kw)
    if opt.stage == 0 and out[0] is not None:
        ckpt_dir = os.path.dirname(out[0])
        path = os.path.join(ckpt_dir, _SIDE_FILE.format(rank=opt.comm.rank, world=opt.comm.world_size))
        if not os.path.exists(path):
            found = sorted(f for f in os.listdir(ckpt_dir) if f.startswith("plumage_optim_rank"))
            raise ValueError(
                f"No PLUMAGE shard {os.path.basename(path)} in {ckpt_dir} (found {found}): the checkpoint was saved "
                "with another world size or without plumage_ds.integrations.deepspeed.save_checkpoint"
            )
        opt.load_state_dict(torch.load(path, weights_only=True))
    return out


__all__ = [
    "PlumageDeepSpeedOptimizer",
    "optimizer_config_from_deepspeed",
    "split_config",
    "attach_engine",
    "build_composite",
    "initialize",
    "plumage_optimizer",
    "save_checkpoint",
    "load_checkpoint",
]
