"""The one factory: an :class:`~plumage_ds.config.OptimizerConfig` in, an optimizer out.

The estimator's registry entry (:mod:`plumage_ds.estimators.registry`) picks the optimizer
family; the config's fields go to the constructor through one mapping per family
(:meth:`OptimizerConfig.lowrank_kwargs`, :meth:`OptimizerConfig.gum_kwargs`), never copied by hand.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import OptimizerConfig
from ..targets import lowrank_param_groups


def select_groups(model: nn.Module, cfg: OptimizerConfig) -> tuple[list[dict], list[dict]]:
    """``lowrank_param_groups`` with the config's ``target_modules``, ``rank`` and ``strict``; the
    dense group carries ``lr=cfg.dense_lr`` when that is set (the one place it is applied)."""
    groups, report = lowrank_param_groups(model, target_modules=cfg.target_modules, rank=cfg.rank, strict=cfg.strict)
    if cfg.dense_lr is not None:
        for g in groups:
            if not g["lowrank"]:
                g["lr"] = cfg.dense_lr
    return groups, report


def adamw_params(model: nn.Module, cfg: OptimizerConfig) -> list:
    """What ``torch.optim.AdamW`` gets for ``estimator='adamw'``, in every engine.

    Every trainable tensor, in one group at ``cfg.lr``; with ``cfg.dense_lr`` set, the split of
    :func:`select_groups` instead: the tensors a low-rank estimator would project at ``lr``, the
    rest at ``dense_lr``, so a full-rank baseline can train the dense parameters exactly as the
    low-rank arms do.
    """
    if cfg.dense_lr is None:
        return [p for p in model.parameters() if p.requires_grad]
    groups, _ = select_groups(model, cfg)
    return [{"params": g["params"], "lr": g.get("lr", cfg.lr)} for g in groups]


def adamw_rows(model: nn.Module, params: list) -> list[dict]:
    """One report row per trainable parameter for the full-rank AdamW baseline; ``params`` is what
    :func:`adamw_params` returned (its groups' LRs are named when it split them)."""
    lr_of = {id(p): g["lr"] for g in params if isinstance(g, dict) for p in g["params"]}
    return [
        {
            "name": n,
            "shape": list(p.shape),
            "mode": "adamw",
            "reason": "estimator=adamw" + (f" (lr={lr_of[id(p)]:g})" if lr_of else ""),
        }
        for n, p in model.named_parameters()
        if p.requires_grad
    ]


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, **extra) -> tuple[torch.optim.Optimizer, list[dict]]:
    """Return ``(optimizer, rows)``; ``rows`` has one ``{name, shape, mode, reason}`` per parameter.

    ``adamw``: ``torch.optim.AdamW`` on everything. ``max_grad_norm`` is the caller's job for
    every optimizer without a ``max_grad_norm`` attribute (AdamW, GUM): clip before ``step()``. ``lowrank_adam`` estimators:
    :class:`PlumageAdamW` on the matrices matched by ``cfg.target_modules``. ``gum``: :class:`GUM`.
    ``extra`` goes to the constructor (e.g. ``process_group``, ``replicate_group``).
    """
    if cfg.spec.family == "adamw":
        if extra:
            raise ValueError(f"Invalid arguments {sorted(extra)} for estimator='adamw' (torch.optim.AdamW)")
        params = adamw_params(model, cfg)
        return torch.optim.AdamW(params, **cfg.adam_kwargs()), adamw_rows(model, params)
    groups, _ = select_groups(model, cfg)
    opt = matrix_optimizer(groups, cfg, **extra)
    return opt, opt.matrix_report()


def matrix_optimizer(groups: list[dict], cfg: OptimizerConfig, **extra):
    """The matrix optimizer of ``cfg``'s estimator family on ``groups``: :class:`PlumageAdamW`
    (``lowrank_adam``) or :class:`GUM` (``gum``); ``extra`` overrides/extends the config's keywords."""
    if cfg.spec.family == "gum":
        from .gum import GUM

        return GUM(groups, **{**cfg.gum_kwargs(), **extra})
    from .plumage_adamw import PlumageAdamW

    return PlumageAdamW(groups, **{**cfg.lowrank_kwargs(), **extra})
