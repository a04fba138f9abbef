"""Build the optimizer a job config asks for (``OptimizerConfig.estimator``)."""

from __future__ import annotations

import torch
from torch import nn

from ..config import OptimizerConfig
from .param_groups import lowrank_param_groups


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, **extra) -> tuple[torch.optim.Optimizer, list[dict]]:
    """Return ``(optimizer, rows)``; ``rows`` has one ``{name, shape, mode, reason}`` per parameter.

    ``adamw``: ``torch.optim.AdamW`` on everything. ``plumage``/``galore``/``haar``:
    :class:`PlumageAdamW` on the matrices matched by ``cfg.target_modules``.
    ``gum``: :class:`GUM`. ``extra`` goes to the optimizer constructor (e.g. a
    ``distributor``).
    """
    if cfg.estimator == "adamw":
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        opt = torch.optim.AdamW(
            [p for _, p in params], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
        rows = [{"name": n, "shape": list(p.shape), "mode": "adamw", "reason": "estimator=adamw"} for n, p in params]
        return opt, rows
    groups, rows = lowrank_param_groups(
        model, target_modules=cfg.target_modules, rank=cfg.rank, strict=cfg.strict
    )
    common = dict(
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        rank=cfg.rank,
        update_interval=cfg.update_interval,
        scale=cfg.scale,
        svd_method=cfg.svd_method,
        seed=cfg.seed,
        strict=cfg.strict,
        **extra,
    )
    if cfg.estimator == "gum":
        from .gum import GUM

        opt = GUM(groups, gamma=cfg.gum_gamma, momentum=cfg.gum_momentum, **common)
    else:
        from .plumage_adamw import PlumageAdamW

        opt = PlumageAdamW(
            groups,
            estimator=cfg.estimator,
            dinv_placement=cfg.dinv_placement,
            realign=cfg.realign,
            uniform_mix=cfg.uniform_mix,
            max_grad_norm=cfg.grad_clip,
            **common,
        )
    return opt, opt.matrix_report()
