"""Scaffolding shared by the matrix optimizers (:class:`~plumage_ds.optim.PlumageAdamW`, :class:`~plumage_ds.optim.GUM`).

:class:`MatrixOptimizer` plans one :class:`_Entry` per parameter (target matrix
or AdamW fallback, with the same classification and reason strings for both
optimizers), owns the distributor, wraps ``step()`` around the subclass's
``_run_step()``, runs the AdamW path of non-targets, and holds the pieces of
``state_dict``/``load_state_dict`` that do not depend on the target math. Each
subclass keeps its own target math, ownership costs and checkpoint section.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor

from ..config import validate_adam_options
from ..estimators import is_left, oriented_shape
from .adam import adam_direction, adam_step_size, adam_update_moments, zeros_state
from .distributor import Distributor, LocalDistributor


@dataclass
class _Entry:
    """Static facts about one parameter (derived from shapes and groups, never saved)."""

    index: int  # flattened position over param_groups == matrix id
    param: Tensor
    group: dict
    name: str
    lowrank: bool
    mode: str
    reason: str
    shape: tuple = ()  # logical shape (``ds_shape`` for ZeRO-3 placeholders)
    left: bool = True
    s: int = 0
    l: int = 0
    r: int = 0
    owner: int = 0


class MatrixOptimizer(torch.optim.Optimizer):
    """Base of the optimizers that treat 2-D target matrices specially and use AdamW elsewhere.

    Subclasses set ``_display_name``, ``_state_section``, ``_state_format`` and
    ``_projector_keys``, and implement ``_target_mode``, ``_validate_group``,
    ``_build_entries`` (usually :meth:`_plan_entries` + ownership) and ``_run_step``.
    """

    _entry_type: type = _Entry
    _display_name = "MatrixOptimizer"  # in error messages
    _state_section = ""  # key of the optimizer's own section in state_dict()
    _state_format = 1
    _projector_keys: tuple = ("P",)  # lowrank state counted as "projectors" by state_bytes()

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict,
        *,
        seed: int,
        strict: bool,
        distributor: Optional[Distributor],
    ) -> None:
        self.seed = seed
        self.strict = strict
        self._distributor: Distributor = distributor if distributor is not None else LocalDistributor()
        self._entries: list[_Entry] = []
        super().__init__(params, defaults)
        self._build_entries()

    @staticmethod
    def _adam_defaults(lr: float, betas: Any, eps: float, weight_decay: float) -> dict:
        """Validated Adam hyperparameters (``betas`` as a tuple): the first entries of ``defaults``."""
        if isinstance(betas, list):
            betas = tuple(betas)
        validate_adam_options(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        return dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    @staticmethod
    def _check_seed(seed: Any) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"Invalid {seed=}: must be an integer")

    # ------------------------------------------------------------------ setup

    def add_param_group(self, param_group: dict) -> None:
        group = dict(param_group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        super().add_param_group(group)
        g = self.param_groups[-1]
        validate_adam_options(lr=g["lr"], betas=g["betas"], eps=g["eps"], weight_decay=g["weight_decay"])
        self._validate_group(g)
        names = g.get("names")
        if names is not None and len(names) != len(g["params"]):
            raise ValueError(f"Invalid names: {len(names)} names for {len(g['params'])} params in a group")
        if self._entries:  # a group added after construction: re-plan
            self._build_entries()

    def _validate_group(self, g: dict) -> None:
        """Validate the optimizer-specific hyperparameters of a newly added group."""

    def _target_mode(self, group: dict) -> str:
        """The ``mode`` of a target matrix of ``group`` (see :meth:`matrix_report`)."""
        raise NotImplementedError

    def _classify(self, p: Tensor, group: dict, name: str) -> tuple[bool, str, str, int]:
        requested = group.get("lowrank")
        rank = group["rank"]
        if requested is False:
            return False, "adamw", "group has lowrank=False", 0
        shape = self._logical_shape(p)
        if len(shape) != 2:
            reason = f"{len(shape)}-D parameter: low-rank projection needs a matrix"
            if requested:
                self._strict_fail(name, reason)
            return False, "adamw", reason, 0
        s, _ = oriented_shape(shape)
        if rank >= s:
            reason = f"{rank=} >= short side {s} of shape {shape}: full-rank AdamW"
            self._strict_fail(name, reason)
            return False, "adamw", reason, 0
        return True, self._target_mode(group), f"rank {rank} of short side {s}", rank

    def _strict_fail(self, name: str, reason: str) -> None:
        if self.strict:
            raise ValueError(f"Matrix {name!r} cannot take the low-rank path (strict=True): {reason}")

    def _plan_entries(self) -> list[_Entry]:
        """One entry per parameter in flattened order, classified; owners are left at 0."""
        entries: list[_Entry] = []
        index = 0
        for group in self.param_groups:
            names = group.get("names") or [None] * len(group["params"])
            for p, name in zip(group["params"], names):
                name = name or f"param{index}"
                lowrank, mode, reason, r = self._classify(p, group, name)
                e = self._entry_type(
                    index=index, param=p, group=group, name=name, lowrank=lowrank, mode=mode, reason=reason,
                    shape=self._logical_shape(p),
                )
                if lowrank:
                    e.left = is_left(e.shape)
                    e.s, e.l = oriented_shape(e.shape)
                    e.r = r
                entries.append(e)
                index += 1
        return entries

    def _build_entries(self) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ reports

    def _report_row(self, e: _Entry) -> dict:
        return {"name": e.name, "shape": list(e.shape), "mode": e.mode, "reason": e.reason, "owner": e.owner}

    def matrix_report(self) -> list[dict]:
        """One row per parameter: name, shape, mode, reason, owner rank."""
        return [self._report_row(e) for e in self._entries]

    def ownership(self) -> list[int]:
        """Owner rank of each parameter, in flattened param order."""
        return [e.owner for e in self._entries]

    def state_bytes(self) -> dict:
        """Optimizer-state bytes held by this rank, measured from the tensors.

        ``projectors``: the targets' projector tensors; ``moments``: their other
        state (moments / momentum buffers); ``non_target``: AdamW moments.
        """
        out = {"projectors": 0, "moments": 0, "non_target": 0}
        for e in self._entries:
            st = self.state.get(e.param, {})
            for key, t in st.items():
                if not torch.is_tensor(t):
                    continue
                nbytes = t.numel() * t.element_size()
                if not e.lowrank:
                    out["non_target"] += nbytes
                elif key in self._projector_keys:
                    out["projectors"] += nbytes
                else:
                    out["moments"] += nbytes
        out["total"] = sum(out.values())
        return out

    def comm_stats(self) -> dict:
        """Collective bytes/calls per kind, from the distributor's accounting layer."""
        return self._distributor.comm_stats()

    @property
    def distributor(self) -> Distributor:
        """The strategy that places state and runs the collectives (read-only)."""
        return self._distributor

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        try:
            self._run_step()
        finally:
            self._distributor.end_step()  # closes this step's communication record
        return loss

    def _run_step(self) -> None:
        raise NotImplementedError

    def _ensure_state(self, e: _Entry) -> dict:
        st = self.state[e.param]
        if "step" not in st:
            st["step"] = 0
        return st

    def _begin_step(self) -> Optional[tuple[list[_Entry], list[_Entry]]]:
        """``(targets, dense)`` entries with a gradient on some rank (``None`` if none has)."""
        has_grad = self._distributor.any_true([e.param.grad is not None for e in self._entries])
        active = [e for e, h in zip(self._entries, has_grad) if h]
        if not active:
            return None
        for e in active:
            self._ensure_state(e)
        return [e for e in active if e.lowrank], [e for e in active if not e.lowrank]

    def _grad32(self, e: _Entry) -> Tensor:
        """``e``'s gradient in fp32 (zeros where this rank has none)."""
        g = e.param.grad
        if g is None:
            return torch.zeros(e.shape, dtype=torch.float32, device=e.param.device)
        if g.is_sparse:
            raise RuntimeError(f"{self._display_name} does not support sparse gradients ({e.name})")
        return g.float() if g.dtype != torch.float32 else g

    def _dense_adamw(self, dense: list[_Entry], g_owned: list[Optional[Tensor]], clip: float = 1.0) -> list[Optional[Tensor]]:
        """AdamW on the owners of the non-targets: their new fp32 weights (``None`` elsewhere)."""
        new_dense: list[Optional[Tensor]] = []
        for e, G in zip(dense, g_owned):
            st = self.state[e.param]
            st["step"] += 1
            if G is None:
                new_dense.append(None)
                continue
            g = e.group
            beta1, beta2 = g["betas"]
            if "exp_avg" not in st:
                st["exp_avg"], st["exp_avg_sq"] = zeros_state(e.shape, e.param.device)
            if clip != 1.0:
                G = G * clip
            adam_update_moments(st["exp_avg"], st["exp_avg_sq"], G, beta1, beta2)
            N = adam_direction(st["exp_avg"], st["exp_avg_sq"], g["eps"])
            W = e.param.detach().float().mul(1.0 - g["lr"] * g["weight_decay"]).sub_(
                N, alpha=adam_step_size(g["lr"], st["step"], beta1, beta2)
            )
            new_dense.append(W)
        return new_dense

    # Hooks for engines whose parameters are not plain replicated tensors (ZeRO-3):
    @staticmethod
    def _logical_shape(p: Tensor) -> tuple:
        """The matrix shape of ``p`` (``ds_shape`` when ZeRO-3 replaced it by a placeholder)."""
        return tuple(getattr(p, "ds_shape", p.shape))

    @staticmethod
    def _apply_matrix_update(param: Tensor, delta: Tensor, decay: float) -> None:
        """``W ← W·(1 − decay) − delta`` in fp32, rounded once into ``param``'s dtype."""
        if param.dtype == torch.float32:
            if decay:
                param.mul_(1.0 - decay)
            param.sub_(delta)
        else:
            W = param.float()
            if decay:
                W.mul_(1.0 - decay)
            param.copy_(W.sub_(delta))

    # ------------------------------------------------------------------ checkpoints

    def _state_dict_with(self, meta: dict) -> dict:
        """``state`` (cloned, by parameter index), ``param_groups`` (params as indices), and the
        optimizer's section: ``meta`` followed by ``world_size``, ``rank``, ``ownership``, ``modes``."""
        meta = {
            **meta,
            "world_size": self._distributor.world_size,
            "rank": self._distributor.rank,
            "ownership": self.ownership(),
            "modes": [e.mode for e in self._entries],
        }
        state = {}
        for e in self._entries:
            st = self.state.get(e.param)
            if st:
                state[e.index] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
        groups = []
        for g in self.param_groups:
            groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"})
            groups[-1]["params"] = [self._index_of(p) for p in g["params"]]
        return {"state": state, "param_groups": groups, self._state_section: meta}

    def _index_of(self, p: Tensor) -> int:
        for e in self._entries:
            if e.param is p:
                return e.index
        raise KeyError("parameter not managed by this optimizer")

    def _check_saved_groups(self, state_dict: dict, keys: tuple[str, ...]) -> tuple[dict, list]:
        """Checks the optimizer's section format, group count and sizes, and ``keys`` of every group."""
        meta = state_dict.get(self._state_section)
        if not isinstance(meta, dict) or meta.get("format") != self._state_format:
            raise ValueError(f"Invalid optimizer state_dict: missing or unknown {self._state_section!r} section")
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"Invalid state_dict: {len(groups)} param groups, optimizer has {len(self.param_groups)}")
        for i, (saved, mine) in enumerate(zip(groups, self.param_groups)):
            if len(saved["params"]) != len(mine["params"]):
                raise ValueError(
                    f"Invalid state_dict: group {i} has {len(saved['params'])} params, optimizer has {len(mine['params'])}"
                )
            for key in keys:
                if saved.get(key) != mine.get(key):
                    raise ValueError(f"Invalid state_dict: group {i} {key}={saved.get(key)!r}, optimizer has {mine.get(key)!r}")
        return meta, groups

    def _check_saved_modes(self, meta: dict) -> None:
        if meta["modes"] != [e.mode for e in self._entries]:
            raise ValueError("Invalid state_dict: matrix modes differ from this optimizer's")

    def _load_entry_states(self, saved_state: dict, prepare: Callable[[_Entry, dict], dict]) -> dict:
        """New ``state`` (by parameter): each saved entry through ``prepare`` (check/filter), fp32 on the param's device."""
        new_state: dict = {}
        for e in self._entries:
            st = saved_state.get(e.index)
            if st is None:
                continue
            st = prepare(e, dict(st))
            new_state[e.param] = {
                k: (v.to(device=e.param.device, dtype=torch.float32).clone() if torch.is_tensor(v) else v)
                for k, v in st.items()
            }
        return new_state

    def _install_state(self, new_state: dict, groups: list) -> None:
        """Replace group hyperparameters (but ``params``/``names``) and the whole state."""
        for g, saved in zip(self.param_groups, groups):
            for k, v in saved.items():
                if k in ("params", "names"):
                    continue
                g[k] = tuple(v) if k == "betas" else v
        self.state.clear()
        for p, st in new_state.items():
            self.state[p] = st

    @staticmethod
    def _check_state_tensors(e: _Entry, st: dict, expect: dict, ints: tuple[str, ...]) -> None:
        """Every key but ``ints`` is expected, a tensor of the expected shape, and finite."""
        for key, t in st.items():
            if key in ints:
                continue
            if key not in expect:
                raise ValueError(f"Invalid state_dict: unexpected key {key!r} for {e.name}")
            if not torch.is_tensor(t) or tuple(t.shape) != expect[key]:
                shape = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
                raise ValueError(f"Invalid state_dict: {e.name}.{key} has shape {shape}, expected {expect[key]}")
            if not torch.isfinite(t).all():
                raise ValueError(f"Invalid state_dict: {e.name}.{key} holds non-finite values")
