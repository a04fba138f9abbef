"""DeepSpeed adapter: the DeepSpeed JSON in, a DeepSpeed engine with the composite client optimizer out.

See ``docs/deepspeed.md`` for the mechanism and the reasoning (read from DeepSpeed 0.19.8's source).
This module only adapts: the optimizer itself is :class:`~plumage_ds.optim.composite.PlumageDeepSpeedOptimizer`
(ZeRO gets the dense parameters; a matrix optimizer owns the targets on the replicated or ZeRO-3 layout).

* :func:`initialize` pops the ``"plumage"`` section, the ``"optimizer"`` section (AdamW
  hyperparameters) and ``gradient_clipping`` from the DeepSpeed config and loads them into ONE
  :class:`~plumage_ds.config.OptimizerConfig` (the schema of the main job's ``optimizer:`` section,
  same strict loading), selects the target matrices with the factory's ``select_groups``, logs
  (rank 0, INFO) one row per parameter with its mode, and hands DeepSpeed the composite.
* Stage 0: DeepSpeed would all-reduce every module gradient (targets included, uncompressed); the
  adapter sets ``engine.enable_backward_allreduce = False`` (the public switch 1-bit Adam uses) and
  the composite all-reduces the dense gradients itself through the accounted collective layer.
* Stage 3: every module parameter is a ZeRO-3 placeholder; the targets' layout applies ``ΔW`` to
  this rank's flat chunk (version-guarded), and the composite's ``state_dict()`` carries this
  rank's target chunks, so ZeRO-3 checkpoints hold them.

Only public DeepSpeed API is used: ``deepspeed.initialize``, ``deepspeed.init_distributed``,
``engine.enable_backward_allreduce``, ``engine.client_optimizer``, ``engine.save_checkpoint`` /
``load_checkpoint`` and the documented config keys.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..config import ConfigError, OptimizerConfig, check_nonneg, from_dict
from ..distributed.layouts import check_zero3_param
from ..distributed.layouts.zero3_flat import VERIFIED_DEEPSPEED
from ..io import atomic_torch_save
from ..optim.composite import SUPPORTED_STAGES, PlumageDeepSpeedOptimizer

logger = logging.getLogger(__name__)

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
        check_nonneg("gradient_clipping", clip)
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
    every other trainable tensor in DeepSpeed's group (at ``dense_lr`` when set).

    Hand it to DeepSpeed as ``optimizer=`` with ``"gradient_clipping": 0`` (clipping is the
    composite's, global) and ``"zero_allow_untested_optimizer": true``; then call
    :func:`attach_engine` on the engine. Logs the mode table on rank 0.
    """
    from ..optim.factory import select_groups

    groups, _ = select_groups(model, config)
    composite = PlumageDeepSpeedOptimizer(groups, config=config, stage=stage)
    if not dist.is_initialized() or dist.get_rank() == 0:
        dense = [(n, list(getattr(p, "ds_shape", p.shape))) for g in groups if not g.get("lowrank")
                 for n, p in zip(g["names"], g["params"])]
        _log_report(composite.plumage.matrix_report(), dense, title)
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
    if cfg.spec.family == "adamw":
        raise ConfigError(
            "plumage.estimator", cfg.estimator,
            "the DeepSpeed composite runs a low-rank estimator (plumage, galore, haar, optimal, gum); for AdamW hand "
            "DeepSpeed torch.optim.AdamW",
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
        path = os.path.join(save_dir, str(tag), _SIDE_FILE.format(rank=opt.layout.rank, world=opt.layout.world_size))
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
        path = os.path.join(ckpt_dir, _SIDE_FILE.format(rank=opt.layout.rank, world=opt.layout.world_size))
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
    "VERIFIED_DEEPSPEED",
    "check_zero3_param",
    "optimizer_config_from_deepspeed",
    "split_config",
    "attach_engine",
    "build_composite",
    "initialize",
    "plumage_optimizer",
    "save_checkpoint",
    "load_checkpoint",
]
