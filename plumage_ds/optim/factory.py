"""The one factory: an :class:`~plumage_ds.config.OptimizerConfig` in, an optimizer out.

The estimator's registry entry (:mod:`plumage_ds.estimators.registry`) picks the optimizer
family; the config's fields go to the constructor through one mapping per family
(:meth:`OptimizerConfig.lowrank_kwargs`, :meth:`OptimizerConfig.gum_kwargs`), never copied by hand.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import OptimizerConfig
from .param_groups import lowrank_param_groups


def select_groups(model: nn.Module, cfg: OptimizerConfig) -> tuple[list[dict], list[dict]]:
    """``lowrank_param_groups`` with the config's ``target_modules``, ``rank`` and ``strict``."""
    return lowrank_param_groups(model, target_modules=cfg.target_modules, rank=cfg.rank, strict=cfg.strict)


def adamw_rows(model: nn.Module) -> list[dict]:
    """One report row per trainable parameter for the full-rank AdamW baseline."""
    return [
        {"name": n, "shape": list(p.shape), "mode": "adamw", "reason": "estimator=adamw"}
        for n, p in model.named_parameters()
        if p.requires_grad
    ]


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, **extra) -> tuple[torch.optim.Optimizer, list[dict]]:
    """Return ``(optimizer, rows)``; ``rows`` has one ``{name, shape, mode, reason}`` per parameter.

    ``adamw``: ``torch.optim.AdamW`` on everything. ``max_grad_norm`` is the caller's job for
    every optimizer without a ``max_grad_norm`` attribute (AdamW, GUM): clip before ``step()``. ``lowrank_adam`` estimators:
    :class:`PlumageAdamW` on the matrices matched by ``cfg.target_modules``. ``gum``: :class:`GUM`.
    ``extra`` goes to the constructor (e.g. a ``distributor``).
    """
    family = cfg.spec.family
    if family == "adamw":
        if extra:
            raise ValueError(f"Invalid arguments {sorted(extra)} for estimator='adamw' (torch.optim.AdamW)")
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, **cfg.adam_kwargs()), adamw_rows(model)
    groups, _ = select_groups(model, cfg)
    if family == "gum":
        from .gum import GUM

        opt = GUM(groups, **cfg.gum_kwargs(), **extra)
    else:
        from .plumage_adamw import PlumageAdamW

        opt = PlumageAdamW(groups, **cfg.lowrank_kwargs(), **extra)
    return opt, opt.matrix_report()
