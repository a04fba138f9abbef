"""Hugging Face Trainer and Accelerate routes (``transformers`` / ``accelerate`` imported lazily).

Trainer — one class, every launch mode (see ``docs/integrations.md``)::

    from plumage_ds.integrations.hf import PlumageTrainer
    trainer = PlumageTrainer(model=model, args=TrainingArguments(...), train_dataset=ds,
                             plumage={"rank": 8, "update_interval": 200})
    trainer.train()

* single process / ``torchrun`` (DDP): :class:`~plumage_ds.optim.PlumageAdamW` on the averaged
  gradients (replicated state, identical on every rank); ``comm_hook={...}`` additionally registers
  :func:`~plumage_ds.distributed.comm_hook.plumage_hook` (unbiased low-rank all-reduce) on the DDP model;
* ``TrainingArguments(deepspeed=cfg)``: the DeepSpeed composite
  (:class:`~plumage_ds.integrations.deepspeed.PlumageDeepSpeedOptimizer`): DeepSpeed's ZeRO gets only the
  non-targets, PLUMAGE owns the targets (owner-sharded state, compressed reduction). The config must
  have no ``"optimizer"`` section (the Trainer would then build DeepSpeed's optimizer instead, and
  PLUMAGE would silently not run: this raises).

Hyperparameters: ``lr``, ``betas``, ``eps``, ``weight_decay`` from ``TrainingArguments`` (weight decay
on every parameter); clipping from ``args.max_grad_norm`` (DeepSpeed: the config's
``gradient_clipping``, applied once, globally, by the composite); the low-rank options from
``plumage`` (any key of the project's one :class:`~plumage_ds.config.OptimizerConfig` but those;
``target_modules`` as :func:`~plumage_ds.optim.select_targets`, default: attention and MLP matrices).
``trainer.plumage_report()`` gives one row per parameter with its real name and mode.

Accelerate — :func:`prepare` builds the optimizer the accelerator's engine needs and prepares it::

    model, optimizer, loader = prepare(accelerator, model, loader, lr=1e-3, plumage={"rank": 8})

* DeepSpeed plugin: the composite, handed to ``accelerator.prepare`` (the engine is attached:
  stage 0 then does not all-reduce the targets uncompressed);
* DDP (``MULTI_CPU``/``MULTI_GPU``...): :class:`~plumage_ds.optim.ShardedPlumageAdamW`
  (owner-sharded state, compressed target reduction). The model is returned **unwrapped** (no
  DDP): the optimizer reduces every gradient itself;
* single process: :class:`~plumage_ds.optim.PlumageAdamW`.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..config import OptimizerConfig, from_dict
from ..optim.factory import matrix_optimizer, select_groups
from .deepspeed import _log_report, attach_engine, build_composite, plumage_optimizer

__all__ = ["PlumageTrainer", "prepare", "make_optimizer", "inner_optimizer"]


_ENGINE_KEYS = ("lr", "betas", "eps", "weight_decay", "max_grad_norm")
"""The hyperparameters the engine's own arguments give (``TrainingArguments``, ``prepare``'s keywords)."""


def _engine_options(**given) -> dict:
    """``given`` with every ``None`` replaced by :class:`OptimizerConfig`'s default (the one schema's)."""
    defaults = OptimizerConfig()
    return {k: getattr(defaults, k) if given.get(k) is None else given[k] for k in _ENGINE_KEYS}


def _config(plumage: Optional[dict], **given) -> OptimizerConfig:
    """The project's one :class:`~plumage_ds.config.OptimizerConfig` from the user's ``plumage``
    mapping (strict: unknown keys raise) and the engine's own hyperparameters ``given``
    (``lr``, ``betas``, ``eps``, ``weight_decay``, ``max_grad_norm``), which ``plumage`` must not repeat."""
    if plumage is not None and not isinstance(plumage, dict):
        raise ValueError(f"Invalid plumage={plumage!r}: expected a mapping of optimizer options")
    options = dict(plumage or {})
    both = sorted(set(options) & set(given))
    if both:
        raise ValueError(
            f"Invalid plumage keys {both}: they come from the training arguments (learning_rate, adam_beta1/2, "
            "adam_epsilon, weight_decay, max_grad_norm), not from plumage="
        )
    given["betas"] = tuple(given["betas"])
    return from_dict(OptimizerConfig, {**options, **given}, section="plumage")


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def make_optimizer(
    model: nn.Module,
    *,
    plumage: Optional[dict] = None,
    lr: Optional[float] = None,
    betas: Optional[tuple[float, float]] = None,
    eps: Optional[float] = None,
    weight_decay: Optional[float] = None,
    max_grad_norm: Optional[float] = None,
    deepspeed_stage: Optional[int] = None,
    sharded: bool = False,
) -> torch.optim.Optimizer:
    """The PLUMAGE optimizer for ``model`` in one engine (``None``: the one schema's default).

    ``deepspeed_stage`` set: the DeepSpeed composite (hand it to DeepSpeed as ``optimizer=`` and call
    :func:`~plumage_ds.integrations.deepspeed.attach_engine` on the engine). Else ``sharded``:
    :class:`~plumage_ds.optim.ShardedPlumageAdamW` over the default process group (model not
    wrapped in DDP); else :class:`PlumageAdamW` (single process, or a DDP-wrapped model).
    Logs the per-parameter mode table on rank 0.
    """
    cfg = _config(plumage, **_engine_options(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, max_grad_norm=max_grad_norm))
    if deepspeed_stage is not None:
        return build_composite(model, config=cfg, stage=deepspeed_stage)
    groups, _ = select_groups(model, cfg)
    opt = matrix_optimizer(groups, cfg, **({"process_group": dist.group.WORLD} if sharded else {}))
    if _is_rank0():
        _log_report(opt.matrix_report(), [], title=type(opt).__name__)
    return opt


def inner_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The PLUMAGE optimizer behind wrappers: Accelerate's ``AcceleratedOptimizer``, a DeepSpeed
    engine or ZeRO optimizer (its client optimizer, the composite)."""
    seen = 0
    while seen < 8:
        if hasattr(optimizer, "matrix_report"):  # PlumageAdamW, GUM, the DeepSpeed composite
            return optimizer
        if hasattr(optimizer, "client_optimizer"):  # DeepSpeedEngine
            return plumage_optimizer(optimizer)
        nxt = getattr(optimizer, "optimizer", None)
        if nxt is None or nxt is optimizer:
            break
        optimizer, seen = nxt, seen + 1
    raise ValueError(f"No PLUMAGE optimizer behind {type(optimizer).__name__}")


# ----------------------------------------------------------------------------- Accelerate


def _deepspeed_clip(config: dict) -> float:
    """The clipping DeepSpeed would apply (its default is 1.0 when the key is absent or ``"auto"``)."""
    clip = config.get("gradient_clipping", "auto")
    if clip == "auto":
        return 1.0
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip >= 0:
        raise ValueError(f"Invalid gradient_clipping={clip!r}: must be a number >= 0")
    return float(clip)


def _reject_optimizer_section(config: dict) -> None:
    if "optimizer" in config:
        raise ValueError(
            "The DeepSpeed config has an 'optimizer' section: DeepSpeed would build its own optimizer and PLUMAGE "
            "would not run. Remove the section (lr, betas, eps, weight_decay come from the training arguments)"
        )


def _take_deepspeed_clip(config: dict) -> float:
    """The config's clipping, moved to the composite: DeepSpeed gets ``gradient_clipping = 0``
    (its clip would see only its own partitions; the composite clips once, globally)."""
    _reject_optimizer_section(config)
    clip = _deepspeed_clip(config)
    config["gradient_clipping"] = 0.0
    return clip


def prepare(
    accelerator,
    model: nn.Module,
    *objects: Any,
    plumage: Optional[dict] = None,
    lr: Optional[float] = None,
    betas: Optional[tuple[float, float]] = None,
    eps: Optional[float] = None,
    weight_decay: Optional[float] = None,
    max_grad_norm: Optional[float] = None,
) -> tuple:
    """``accelerator.prepare`` with a PLUMAGE optimizer: returns ``(model, optimizer, *objects)``.

    DeepSpeed plugin: the composite (stage from the plugin; ``max_grad_norm`` ignored, clipping is the
    config's ``gradient_clipping``, DeepSpeed's default 1.0 when absent or ``"auto"``); the returned
    model is the engine. DDP: :class:`ShardedPlumageAdamW`, model returned unwrapped (do not clip with
    ``accelerator.clip_grad_norm_``: local gradients; use ``max_grad_norm``). Single process:
    :class:`PlumageAdamW`. Collective under DeepSpeed and DDP: every rank must call it.
    """
    from accelerate.utils import DistributedType

    adam = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    kind = accelerator.distributed_type
    if dist.is_initialized() and dist.get_world_size() != accelerator.num_processes:
        raise ValueError(
            f"Accelerate counts {accelerator.num_processes} process(es) but the process group has "
            f"{dist.get_world_size()} ranks: every rank would read the whole dataset. Without GPUs, name the backend: "
            "Accelerator(..., kwargs_handlers=[InitProcessGroupKwargs(backend='gloo')])"
        )
    if kind == DistributedType.DEEPSPEED:
        plugin = accelerator.state.deepspeed_plugin
        clip = _take_deepspeed_clip(plugin.deepspeed_config)
        opt = make_optimizer(model, plumage=plumage, **adam, max_grad_norm=clip, deepspeed_stage=plugin.zero_stage)
        engine, opt, *rest = accelerator.prepare(model, opt, *objects)
        attach_engine(engine)
        return (engine, opt, *rest)
    if kind == DistributedType.FSDP:
        if getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
            raise NotImplementedError(
                "plumage_ds.integrations.hf.prepare supports Accelerate's FSDP plugin with fsdp_version=2 only "
                "(FSDP1 flat parameters hide the matrices; docs/integrations.md)"
            )
        # Accelerate shards the model and swaps the optimizer's parameters for the DTensors in place;
        # PlumageAdamW re-plans on them (state sharded like the weights) at its first step
        opt = make_optimizer(model, plumage=plumage, **adam, max_grad_norm=max_grad_norm)
        return accelerator.prepare(model, opt, *objects)
    if kind == DistributedType.NO:
        opt = make_optimizer(model, plumage=plumage, **adam, max_grad_norm=max_grad_norm)
        return accelerator.prepare(model, opt, *objects)
    if accelerator.num_processes > 1 and kind.name.startswith("MULTI_"):
        model.to(accelerator.device)
        opt = make_optimizer(model, plumage=plumage, **adam, max_grad_norm=max_grad_norm, sharded=True)
        return (model, *accelerator.prepare(opt, *objects))
    raise NotImplementedError(f"plumage_ds.integrations.hf.prepare: distributed type {kind} is not supported")


# ----------------------------------------------------------------------------- Trainer


def _trainer_class():
    from transformers import Trainer, TrainerCallback

    class _AttachCallback(TrainerCallback):
        """After the Trainer wrapped the model (before the first step): attach the DeepSpeed engine,
        or register the comm hook on the DDP model."""

        def __init__(self, trainer) -> None:
            self.trainer = trainer

        def on_train_begin(self, args, state, control, **kwargs):
            self.trainer._attach_engine()

    class PlumageTrainer(Trainer):
        """``transformers.Trainer`` whose optimizer is PLUMAGE in every launch mode (module docstring).

        Args (besides the Trainer's):
            plumage: optimizer options of the project's one schema (``rank``, ``update_interval``,
                ``estimator``, ``target_modules``, ``scale``, ``dinv_placement``, ``realign``,
                ``svd_method``, ``uniform_mix``, ``seed``, ``strict``, ``nonfinite``...); the Adam
                hyperparameters and clipping come from ``TrainingArguments``; unknown keys raise.
            comm_hook: under DDP (``torchrun``), keyword arguments of
                :class:`~plumage_ds.distributed.comm_hook.PlumageHookState`: the gradients are then
                all-reduced compressed (unbiased) before the optimizer sees them.
        """

        def __init__(self, *args, plumage: Optional[dict] = None, comm_hook: Optional[dict] = None, **kwargs):
            optimizers = kwargs.get("optimizers") or (None, None)
            if optimizers[0] is not None or kwargs.get("optimizer_cls_and_kwargs") is not None:
                raise ValueError("PlumageTrainer builds its optimizer: do not pass optimizers= or optimizer_cls_and_kwargs=")
            if comm_hook is not None and not isinstance(comm_hook, dict):
                raise ValueError(f"Invalid comm_hook={comm_hook!r}: expected a mapping of PlumageHookState options")
            self._plumage_options = dict(plumage or {})
            _config(self._plumage_options, **_engine_options())  # validate now, before any training state exists
            self._comm_hook = comm_hook
            super().__init__(*args, **kwargs)
            if self.is_fsdp_enabled and getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
                raise NotImplementedError(
                    "PlumageTrainer supports the Trainer's FSDP integration with FSDP2 only: set "
                    "fsdp_config={'fsdp_version': 2} (FSDP1 flat parameters hide the matrices; docs/integrations.md)"
                )
            if self.is_deepspeed_enabled:
                if comm_hook is not None:
                    raise ValueError("comm_hook is for DDP; under DeepSpeed PLUMAGE reduces the target gradients itself")
                _reject_optimizer_section(self.accelerator.state.deepspeed_plugin.hf_ds_config.config)
            self.add_callback(_AttachCallback(self))

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                model = self.model if model is None else model
                args = self.args
                adam = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                            weight_decay=args.weight_decay)  # fmt: skip
                if self.is_deepspeed_enabled:
                    plugin = self.accelerator.state.deepspeed_plugin
                    clip = _take_deepspeed_clip(plugin.hf_ds_config.config)
                    self.optimizer = make_optimizer(
                        model, plumage=self._plumage_options, **adam, max_grad_norm=clip,
                        deepspeed_stage=plugin.zero_stage,
                    )  # fmt: skip
                else:  # the Trainer clips the (averaged) gradients itself, with args.max_grad_norm
                    self.optimizer = make_optimizer(model, plumage=self._plumage_options, **adam)
            return self.optimizer

        def _attach_engine(self) -> None:
            wrapped = self.model_wrapped
            if self.is_deepspeed_enabled:
                attach_engine(wrapped)
            elif self._comm_hook is not None:
                if not isinstance(wrapped, nn.parallel.DistributedDataParallel):
                    raise ValueError(
                        f"comm_hook needs the Trainer's DDP model (launch with torchrun on >= 2 processes); the model "
                        f"is a {type(wrapped).__name__}"
                    )
                from ..distributed.comm_hook import PlumageHookState, plumage_hook

                self.comm_hook_state = PlumageHookState(wrapped, **self._comm_hook)
                wrapped.register_comm_hook(self.comm_hook_state, plumage_hook)

        def plumage_optimizer(self) -> torch.optim.Optimizer:
            """The PLUMAGE optimizer (``PlumageAdamW`` or the DeepSpeed composite) behind the Trainer's wrappers."""
            if self.optimizer is None:
                raise ValueError("No optimizer yet: call train() first (or create_optimizer())")
            return inner_optimizer(self.optimizer)

        def plumage_report(self) -> list[dict]:
            """One row per parameter: real name, shape, mode (``plumage``/``galore``/``haar`` or ``adamw``), reason."""
            return self.plumage_optimizer().matrix_report()

    return PlumageTrainer


_LAZY: dict[str, Any] = {}


def __getattr__(name: str):  # PEP 562: ``PlumageTrainer`` is built on first use (imports transformers)
    if name == "PlumageTrainer":
        if name not in _LAZY:
            _LAZY[name] = _trainer_class()
        return _LAZY[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
