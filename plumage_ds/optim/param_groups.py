"""Select target matrices by regex on module names and report every parameter's mode.

Like transformers' ``optim_target_modules``: a parameter is a target when the
name of the module that holds it matches one of ``target_modules``
(``re.search``) and it is a 2-D weight whose short side exceeds the rank.
"""

from __future__ import annotations

import re
import warnings
from typing import Iterable

from torch import nn

from ..estimators import oriented_shape


def lowrank_param_groups(
    model: nn.Module,
    *,
    target_modules: Iterable[str],
    rank: int,
    strict: bool = False,
    **lowrank_overrides,
) -> tuple[list[dict], list[dict]]:
    """Split ``model``'s trainable parameters into a low-rank and a dense group.

    Returns ``(groups, report)``: ``groups`` for :class:`PlumageAdamW` (or
    :class:`GUM`), each with ``names``; ``report`` one row per parameter
    ``{"name", "shape", "mode", "reason"}`` (mode ``"lowrank"`` or ``"adamw"``;
    the optimizer's :meth:`matrix_report` later names the estimator).

    ``strict=True`` raises ``ValueError`` for a matched matrix that cannot take
    the low-rank path (``rank >= short side``) and when no parameter matches.
    """
    patterns = [re.compile(t) for t in target_modules]
    targets, target_names, others, other_names, report = [], [], [], [], []
    seen: set[int] = set()  # tied weights (GPT-2's wte / lm_head): one entry, one update per step
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{module_name}.{pname}" if module_name else pname
            matched = any(pat.search(module_name) for pat in patterns)
            if not matched:
                mode, reason = "adamw", "module not matched by target_modules"
            elif p.dim() != 2:
                mode, reason = "adamw", f"{p.dim()}-D parameter in a target module"
            elif rank >= oriented_shape(p.shape)[0]:
                reason = f"{rank=} >= short side {min(p.shape)} of shape {tuple(p.shape)}"
                if strict:
                    raise ValueError(f"Matrix {full!r} cannot take the low-rank path (strict=True): {reason}")
                mode = "adamw"
            else:
                mode, reason = "lowrank", f"matched target_modules; rank {rank} of short side {min(p.shape)}"
            if mode == "lowrank":
                targets.append(p)
                target_names.append(full)
            else:
                others.append(p)
                other_names.append(full)
            report.append({"name": full, "shape": list(p.shape), "mode": mode, "reason": reason})
    if not targets:
        msg = f"target_modules={list(target_modules)!r} selected no matrix of the model"
        if strict:
            raise ValueError(msg)
        warnings.warn(msg, stacklevel=2)
    groups = []
    if targets:
        groups.append({"params": targets, "names": target_names, "lowrank": True, "rank": rank, **lowrank_overrides})
    if others:
        groups.append({"params": others, "names": other_names, "lowrank": False})
    return groups, report
