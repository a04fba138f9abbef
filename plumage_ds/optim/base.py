"""Scaffolding shared by the matrix optimizers (:class:`~plumage_ds.optim.PlumageAdamW`, :class:`~plumage_ds.optim.GUM`).

:class:`MatrixOptimizer` plans one :class:`_Entry` per distinct parameter (target matrix or
AdamW fallback, with its sharding case from :func:`~plumage_ds.optim.sharding.sharding_case`),
picks the distributor that matches the parameters, wraps ``step()`` (engine checks, non-finite
agreement, the end of the step's communication record), runs the AdamW path of non-targets on
this rank's local views, and holds the parts of ``state_dict``/``load_state_dict`` that do not
depend on the target math. Subclasses keep their own target math and checkpoint section.

A step is atomic (compute, agree, commit): subclasses stage every new tensor and write state
and parameters only after the step's last collective, so an error anywhere before that leaves
parameters and optimizer state as they were, on every rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor

from ..config import NONFINITE_POLICIES, validate_adam_options
from ..estimators import is_left, oriented_shape
from .adam import adam_step_size
from .batched import adamw_chunks, group_indices, nonfinite_flags
from .distributor import Distributor, LocalDistributor
from .sharding import FSDP_ROWS, REPLICATED, ZERO3_FLAT, chunk_bounds, is_dtensor, local, sharding_case, wrap_like

class NonFiniteGradientError(FloatingPointError):
    """Raised by ``step()`` with ``nonfinite="raise"``: some gradient holds NaN/Inf (nothing was changed)."""


class CollectiveStepError(RuntimeError):
    """A failure on one rank during a step, raised with the same message on every rank (nothing was changed)."""


@dataclass
class _Entry:
    """Static facts about one parameter (derived from shapes, groups and the mesh; never saved)."""

    index: int  # flattened position over param_groups == matrix id
    param: Tensor
    group: dict
    name: str
    lowrank: bool
    mode: str
    reason: str
    shape: tuple = ()  # logical (global) shape
    case: str = REPLICATED
    left: bool = True
    s: int = 0
    l: int = 0
    r: int = 0
    owner: int = 0
    # FSDP_ROWS only: this rank's rows of P (oriented short side) and columns of M, V (long side)
    p_rows: tuple = (0, 0)
    cols: tuple = (0, 0)

    @property
    def local_shape(self) -> tuple:
        """Shape of this rank's piece of the weight (the whole weight unless FSDP_ROWS)."""
        if self.case == FSDP_ROWS:
            return tuple(local(self.param).shape)
        return self.shape


def _nonneg_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or not math.isfinite(value):
        raise ValueError(f"Invalid {name}={value!r}: must be a finite number >= 0")
    return float(value)


class MatrixOptimizer(torch.optim.Optimizer):
    """Base of the optimizers that treat 2-D target matrices specially and use AdamW elsewhere.

    Subclasses set ``_display_name``, ``_state_section``, ``_state_format``, ``_projector_keys``
    and ``_supported_cases``, and implement ``_target_mode``, ``_validate_group``,
    ``_build_entries`` (usually :meth:`_plan_entries` + ownership) and ``_run_step``.
    """

    _entry_type: type = _Entry
    _display_name = "MatrixOptimizer"  # in error messages
    _state_section = ""  # key of the optimizer's own section in state_dict()
    _state_format = 1
    _projector_keys: tuple = ("P",)  # lowrank state counted as "projectors" by state_bytes()
    _second_moment_keys: tuple = ()  # lowrank state counted as "second_moment" by state_bytes()
    _state_dtypes: dict = {}  # state tensors loaded in another dtype than fp32 (by key)
    _supported_cases: tuple = (REPLICATED, ZERO3_FLAT)

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict,
        *,
        seed: int,
        strict: bool,
        distributor: Optional[Distributor],
        nonfinite: str = "skip",
        replicate_group=None,
        collective_timeout: float = 0.0,
    ) -> None:
        self._check_seed(seed)
        self._check_bool("strict", strict)
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"Invalid {nonfinite=}: must be one of {list(NONFINITE_POLICIES)}")
        self.seed = seed
        self.strict = strict
        self.nonfinite = nonfinite
        self.skipped_steps = 0  # steps skipped on every rank because of non-finite gradients
        self.last_nonfinite: list[str] = []  # parameters that made the last skipped step non-finite
        self._entries: list[_Entry] = []
        self._distributor: Optional[Distributor] = None
        # entry index -> Pᵀ G_o accumulated during backward (targets whose gradient was projected
        # as it arrived, see PlumageAdamW's backward_projection); cleared by zero_grad and step
        self._projected: dict[int, Tensor] = {}
        timeout = _nonneg_float("collective_timeout", collective_timeout)
        super().__init__(params, defaults)
        self._distributor = self._resolve_distributor(distributor, replicate_group)
        self._distributor.set_timeout(timeout or None)
        self._build_entries()
        self._planned_params = [e.param for e in self._entries]
        self._check_ranks_agree()

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

    @staticmethod
    def _check_bool(name: str, value: Any) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"Invalid {name}={value!r}: must be True or False")

    # ------------------------------------------------------------------ setup

    def add_param_group(self, param_group: dict) -> None:
        """Validate the group completely, then add it (a rejected group leaves the optimizer as it was).

        A tensor listed twice (tied weights under two names) is kept once; its names are joined
        with ``|`` in :meth:`matrix_report`.
        """
        group = dict(param_group)
        params = group.get("params")
        if isinstance(params, Tensor):
            params = [params]
        params = list(params) if params is not None else []
        names = group.get("names")
        if names is not None and len(names) != len(params):
            raise ValueError(f"Invalid names: {len(names)} names for {len(params)} params in a group")
        kept: dict[int, int] = {}
        uniq, uniq_names = [], []
        for i, p in enumerate(params):
            if id(p) in kept:  # shared tensor: one entry, one state, one update
                if names is not None:
                    uniq_names[kept[id(p)]] += f"|{names[i]}"
                continue
            kept[id(p)] = len(uniq)
            uniq.append(p)
            if names is not None:
                uniq_names.append(names[i])
        group["params"] = uniq
        if names is not None:
            group["names"] = uniq_names
        for k, v in self.defaults.items():
            group.setdefault(k, v)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        validate_adam_options(lr=group["lr"], betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"])
        self._validate_group(group)
        if self._distributor is not None:  # a group added after construction: plan it before committing
            for i, p in enumerate(uniq):
                self._case_of(p, (group.get("names") or [f"param{i}"] * len(uniq))[i])
        super().add_param_group(group)
        if self._entries:
            self._build_entries()
            self._planned_params = [e.param for e in self._entries]
            self._check_ranks_agree()

    def _validate_group(self, g: dict) -> None:
        """Validate the optimizer-specific hyperparameters of a group (before it is added)."""

    def _options(self) -> dict:
        """Optimizer-wide options every rank must share (subclasses add theirs)."""
        return {"seed": self.seed, "strict": self.strict, "nonfinite": self.nonfinite}

    def _check_ranks_agree(self) -> None:
        """Every rank holds the same parameters (names, logical shapes, modes), groups and options.

        Collective (one all-gather of a digest): ranks built from different models would otherwise
        exchange mismatched buffers silently, or abort inside the backend when sizes differ.
        """
        lines = [f"{len(self._entries)} parameters in {len(self.param_groups)} groups"]
        lines += [f"{e.name}: shape {tuple(e.shape)}, {e.mode}" for e in self._entries]
        for i, g in enumerate(self.param_groups):
            hp = sorted((k, repr(v)) for k, v in g.items() if k not in ("params", "names"))
            lines.append(f"group {i}: {len(g['params'])} params, " + ", ".join(f"{k}={v}" for k, v in hp))
        lines.append(", ".join(f"{k}={v!r}" for k, v in sorted(self._options().items())))
        self._distributor.agree_on(lines, f"{self._display_name} setup")

    def _target_mode(self, group: dict) -> str:
        """The ``mode`` of a target matrix of ``group`` (see :meth:`matrix_report`)."""
        raise NotImplementedError

    def _case_of(self, p: Tensor, name: str) -> str:
        case = sharding_case(p, name)
        if case not in self._supported_cases:
            raise ValueError(f"Invalid parameter {name!r}: {self._display_name} does not support the {case} sharding case")
        return case

    def _resolve_distributor(self, distributor: Optional[Distributor], replicate_group) -> Distributor:
        """The distributor matching the parameters' sharding case (one case per optimizer).

        Plain tensors: the given distributor or :class:`LocalDistributor`. FSDP2 rows: the
        row-sharded strategy of :mod:`plumage_ds.distributed.fsdp` on the parameters' mesh
        (``replicate_group``: compressed HSDP across replicas). This is the one place the
        optimizer layer reaches into ``distributed/`` (lazily), so that
        ``PlumageAdamW(model.parameters())`` works after ``fully_shard`` like any torch optimizer.
        """
        cases: dict[str, str] = {}
        meshes = []
        index = 0
        for group in self.param_groups:
            names = group.get("names") or [None] * len(group["params"])
            for p, name in zip(group["params"], names):
                name = name or f"param{index}"
                case = self._case_of(p, name)
                cases.setdefault(case, name)
                if case == FSDP_ROWS and all(p.device_mesh != m for m in meshes):
                    meshes.append(p.device_mesh)
                index += 1
        if len(cases) > 1:
            listed = ", ".join(f"{c} (e.g. {n!r})" for c, n in cases.items())
            raise ValueError(
                f"Invalid parameters: {self._display_name} got several sharding cases: {listed}. With FSDP2, "
                "call fully_shard on the root module too so that every parameter is a DTensor"
            )
        if FSDP_ROWS in cases:
            if len(meshes) > 1:
                raise ValueError(f"Invalid parameters: FSDP2 parameters on {len(meshes)} different device meshes")
            if distributor is not None:
                raise ValueError("Invalid distributor: FSDP2 parameters bring their own (the row-sharded strategy)")
            from ..distributed.fsdp import FSDPDistributor  # lazy: see the docstring

            return FSDPDistributor(meshes[0], replicate_group=replicate_group)
        if replicate_group is not None:
            raise ValueError("Invalid replicate_group: only meaningful for FSDP2 (DTensor) parameters (HSDP)")
        return distributor if distributor is not None else LocalDistributor()

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
        """One entry per parameter in flattened order, classified, with its local layout; owners left at 0."""
        entries: list[_Entry] = []
        index = 0
        dist = self._distributor
        for group in self.param_groups:
            names = group.get("names") or [None] * len(group["params"])
            for p, name in zip(group["params"], names):
                name = name or f"param{index}"
                lowrank, mode, reason, r = self._classify(p, group, name)
                e = self._entry_type(
                    index=index, param=p, group=group, name=name, lowrank=lowrank, mode=mode, reason=reason,
                    shape=self._logical_shape(p), case=self._case_of(p, name),
                )
                if lowrank:
                    e.left = is_left(e.shape)
                    e.s, e.l = oriented_shape(e.shape)
                    e.r = r
                    if e.case == FSDP_ROWS:
                        self._plan_fsdp_layout(e, dist)
                entries.append(e)
                index += 1
        return entries

    def _plan_fsdp_layout(self, e: _Entry, dist) -> None:
        """This rank's rows of ``P`` and columns of ``M, V`` (``torch.chunk`` over the shard group)."""
        k, S = dist.rank, dist.world_size
        rows = chunk_bounds(e.shape[0], S, k)  # the weight's rows held here
        if tuple(local(e.param).shape) != (rows[1] - rows[0], e.shape[1]):
            raise ValueError(
                f"Invalid parameter {e.name!r}: local shard {tuple(local(e.param).shape)} is not rows {rows} of "
                f"{e.shape} (expected FSDP2's even row split over {S} ranks)"
            )
        if e.left:  # P rows follow the weight's rows; M, V columns are chunks of n
            e.p_rows, e.cols = rows, chunk_bounds(e.l, S, k)
        else:  # M, V columns are the weight's rows; P (n, r) is split by rows of n
            e.p_rows, e.cols = chunk_bounds(e.s, S, k), rows

    def _build_entries(self) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ reports

    def _report_row(self, e: _Entry) -> dict:
        return {
            "name": e.name, "shape": list(e.shape), "mode": e.mode, "reason": e.reason, "owner": e.owner,
            "sharding": e.case,
        }

    def matrix_report(self) -> list[dict]:
        """One row per parameter: name, shape, mode, reason, owner rank (of the SVD; -1 where every
        rank holds a piece, as for PlumageAdamW's dense parameters), sharding case."""
        return [self._report_row(e) for e in self._entries]

    def ownership(self) -> list[int]:
        """Owner rank of each parameter, in flattened param order."""
        return [e.owner for e in self._entries]

    def state_bytes(self) -> dict:
        """Optimizer-state bytes held by this rank, measured from the tensors.

        ``projectors``: the targets' projector tensors; ``second_moment``: their gradient
        second moments ``Σ`` (``estimator="optimal"``, on the owner); ``moments``: their other
        state (moments / momentum buffers); ``non_target``: AdamW moments.
        """
        out = {"projectors": 0, "second_moment": 0, "moments": 0, "non_target": 0}
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
                elif key in self._second_moment_keys:
                    out["second_moment"] += nbytes
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
        self._check_engine()
        try:
            self._run_step()
        finally:
            self._distributor.end_step()  # closes this step's communication record
        return loss

    def _check_engine(self) -> None:
        """Raise if an engine replaced the parameters this optimizer was planned on.

        DeepSpeed ZeRO >= 1 given this optimizer swaps ``param_groups[...]["params"]`` for its own
        flat partitions: stepping the planned entries would update nothing.
        """
        current = [p for g in self.param_groups for p in g["params"]]
        if len(current) != len(self._planned_params) or any(a is not b for a, b in zip(current, self._planned_params)):
            if self._resharded(current):
                self._replan()
                return
            raise RuntimeError(
                f"{self._display_name}: its param_groups no longer hold the parameters it was built on (an engine "
                "such as DeepSpeed ZeRO replaced them by flat partitions), so step() would update nothing. Under "
                "DeepSpeed build the engine with plumage_ds.integrations.deepspeed.initialize(model=..., config=...) "
                "(docs/deepspeed.md); under the HF Trainer or Accelerate use plumage_ds.integrations.hf "
                "(docs/integrations.md)"
            )

    def _resharded(self, current: list[Tensor]) -> bool:
        """The engine swapped each planned plain tensor for an FSDP2 ``DTensor`` of the same shape
        before any step (Accelerate's FSDP2 preparation does so in place): the same parameters, sharded."""
        return (
            not self.state
            and len(current) == len(self._planned_params)
            and all(is_dtensor(new) and not is_dtensor(old) and tuple(new.shape) == tuple(old.shape)
                    for new, old in zip(current, self._planned_params))
        )

    def _replan(self) -> None:
        """Plan again on the (now sharded) parameters: new distributor, entries, rank agreement."""
        timeout = getattr(getattr(self._distributor, "comm", None), "timeout", None)
        self._distributor = self._resolve_distributor(None, None)
        self._distributor.set_timeout(timeout)
        self._build_entries()
        self._planned_params = [e.param for e in self._entries]
        self._check_ranks_agree()

    def _run_step(self) -> None:
        raise NotImplementedError

    def _step_of(self, e: _Entry) -> int:
        """Updates applied to ``e`` so far (0 before its first step; reading creates no state)."""
        return self.state.get(e.param, {}).get("step", 0)

    def _begin_step(self) -> Optional[tuple[list[_Entry], list[_Entry]]]:
        """``(targets, dense)`` entries with a gradient on some rank; ``None`` to skip the step.

        One small collective agrees, for every entry, on "has a gradient somewhere" and "holds a
        non-finite value somewhere", before anything changes. Non-finite: ``nonfinite="skip"``
        skips the step on every rank (counted in ``skipped_steps``), ``"raise"`` raises
        :class:`NonFiniteGradientError` naming the parameters. No gradient on any rank for any
        parameter raises: the engine probably took the parameters away.
        """
        n = len(self._entries)
        pending, owner_of = [], []  # every gradient tensor of the step, and its entry's position
        for i, e in enumerate(self._entries):
            for t in (local(e.param.grad), self._projected.get(e.index)):
                if t is not None:
                    pending.append(t)
                    owner_of.append(i)
        has, bad = [False] * n, [False] * n
        for i, flag in zip(owner_of, nonfinite_flags(pending)):
            has[i] = True
            bad[i] = bad[i] or flag
        agreed = self._distributor.any_true(has + bad)
        has_grad, nonfinite = agreed[:n], agreed[n:]
        if not any(has_grad):
            raise RuntimeError(
                f"{self._display_name}.step(): none of its {n} parameters has a gradient on any rank. If the model "
                "was wrapped (FSDP2 fully_shard, DeepSpeed) after this optimizer was built, the engine replaced the "
                "parameters: build the optimizer after wrapping the model"
            )
        if any(nonfinite):
            names = [e.name for e, b in zip(self._entries, nonfinite) if b]
            if self.nonfinite == "raise":
                raise NonFiniteGradientError(
                    f"Non-finite gradient in {names}; step not applied (nonfinite='raise'); parameters and "
                    "optimizer state are unchanged"
                )
            self.skipped_steps += 1
            self.last_nonfinite = names
            return None
        active = [e for e, h in zip(self._entries, has_grad) if h]
        return [e for e in active if e.lowrank], [e for e in active if not e.lowrank]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``torch.optim.Optimizer.zero_grad``, and the gradients projected during backward."""
        super().zero_grad(set_to_none=set_to_none)
        self._projected.clear()

    def _grad32(self, e: _Entry) -> Tensor:
        """``e``'s gradient on this rank (its local shard under FSDP2) in fp32 (zeros where none)."""
        g = local(e.param.grad)
        if g is None:
            return torch.zeros(e.local_shape, dtype=torch.float32, device=local(e.param).device)
        if g.is_sparse:
            raise RuntimeError(f"{self._display_name} does not support sparse gradients ({e.name})")
        return g.float() if g.dtype != torch.float32 else g

    def _dense_groups(self, dense: list[_Entry], g_owned: list[Optional[Tensor]], clip: float) -> list[tuple]:
        """``(positions, clipped gradients, (lr, wd, betas, eps, step))`` per set of equal hyperparameters
        and step among the entries with a gradient piece here (read before the step counters move)."""
        live = [i for i, G in enumerate(g_owned) if G is not None]
        keys = []
        for i in live:
            g = dense[i].group
            keys.append((g["lr"], g["weight_decay"], g["betas"], g["eps"], self._step_of(dense[i])))
        groups = []
        for part in group_indices(keys):
            idx = [live[j] for j in part]
            G = [g_owned[i] for i in idx]
            groups.append((idx, list(torch._foreach_mul(G, clip)) if clip != 1.0 else G, keys[part[0]]))
        return groups

    def _dense_adamw(
        self, dense: list[_Entry], g_owned: list[Optional[Tensor]], clip: float, staged: dict
    ) -> list[Optional[Tensor]]:
        """AdamW on the pieces this rank holds: their new fp32 weights (``None`` where it holds none).

        ``g_owned[i]`` is this rank's piece of the averaged gradient, shaped like
        :meth:`_dense_piece`. Out of place: new moments go to ``staged[e.index]``; nothing is
        written to the state. Batched: one ``_foreach`` chain per set of equal hyperparameters.
        """
        new_dense: list[Optional[Tensor]] = [None] * len(dense)
        for idx, G, (lr, wd, (beta1, beta2), eps, step) in self._dense_groups(dense, g_owned, clip):
            states = [self.state.get(dense[i].param, {}) for i in idx]
            M, V, W = adamw_chunks(
                [st.get("exp_avg") for st in states], [st.get("exp_avg_sq") for st in states], G,
                [self._dense_piece(dense[i]).to(torch.float32, copy=True) for i in idx],
                beta1=beta1, beta2=beta2, eps=eps, decay=lr * wd, step_size=adam_step_size(lr, step + 1, beta1, beta2),
                in_place=False,
            )
            for i, m, v, w in zip(idx, M, V, W):
                staged.setdefault(dense[i].index, {}).update(exp_avg=m, exp_avg_sq=v)
                new_dense[i] = w
        return new_dense

    def _dense_adamw_in_place(self, dense: list[_Entry], groups: list[tuple]) -> None:
        """AdamW of :meth:`_dense_groups` in place on the state and on fp32 weight pieces (views of
        the parameters): for a commit with no collective left, it allocates no new moments."""
        for idx, G, (lr, wd, (beta1, beta2), eps, step) in groups:
            states = [self.state[dense[i].param] for i in idx]
            M, V, _ = adamw_chunks(
                [st.get("exp_avg") for st in states], [st.get("exp_avg_sq") for st in states], G,
                [self._dense_piece(dense[i]) for i in idx],
                beta1=beta1, beta2=beta2, eps=eps, decay=lr * wd, step_size=adam_step_size(lr, step + 1, beta1, beta2),
                in_place=True,
            )
            for st, m, v in zip(states, M, V):
                st["exp_avg"], st["exp_avg_sq"] = m, v

    def _dense_piece(self, e: _Entry) -> Tensor:
        """This rank's piece of a dense weight, which its AdamW updates (the local tensor by default)."""
        return local(e.param).detach()

    def _commit(self, active: list[_Entry], staged: dict) -> None:
        """Write the staged state of a completed step and advance the step counters."""
        for e in active:
            st = self.state[e.param]
            for k, v in staged.get(e.index, {}).items():
                if v is None:  # staged removal
                    st.pop(k, None)
                else:
                    st[k] = v
            st["step"] = st.get("step", 0) + 1

    # Hooks for engines whose parameters are not plain replicated tensors (ZeRO-3):
    @staticmethod
    def _logical_shape(p: Tensor) -> tuple:
        """The matrix shape of ``p`` (``ds_shape`` when ZeRO-3 replaced it by a placeholder)."""
        return tuple(getattr(p, "ds_shape", p.shape))

    @staticmethod
    def _apply_matrix_update(param: Tensor, delta: Tensor, decay: float) -> None:
        """``W ← W·(1 − decay) − delta`` in fp32, rounded once into ``param``'s dtype (this rank's piece)."""
        param = local(param)
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
        optimizer's section: ``meta`` followed by ``world_size``, ``rank``, ``ownership``, ``modes``.

        Under FSDP2 every state tensor sharded like the weight is returned as a ``DTensor``
        (:meth:`_export_state`), so ``torch.distributed.checkpoint`` saves and reshards it.
        """
        meta = {
            **meta,
            "world_size": self._distributor.world_size,
            "rank": self._distributor.rank,
            "ownership": self.ownership(),
            "modes": [e.mode for e in self._entries],
            "skipped_steps": self.skipped_steps,
        }
        state = {}
        for e in self._entries:
            st = self.state.get(e.param)
            if st:
                state[e.index] = {k: self._export_state(e, k, v) for k, v in st.items()}
        groups = []
        for g in self.param_groups:
            groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"})
            groups[-1]["params"] = [self._index_of(p) for p in g["params"]]
        return {"state": state, "param_groups": groups, self._state_section: meta}

    def _export_state(self, e: _Entry, key: str, v: Any) -> Any:
        """A state value as saved: a clone; a ``DTensor`` for FSDP2 shards (see :meth:`_state_sharding`)."""
        if not torch.is_tensor(v):
            return v
        v = v.clone()
        if e.case == FSDP_ROWS:
            layout = self._state_sharding(e, key)
            if layout is not None:
                shape, dim = layout
                return wrap_like(e.param, v, shape, dim)
        return v

    def _state_sharding(self, e: _Entry, key: str) -> Optional[tuple[tuple, int]]:
        """``(global shape, shard dim)`` of an FSDP2 state tensor, ``None`` if replicated."""
        if not e.lowrank and key in ("exp_avg", "exp_avg_sq"):
            return e.shape, 0
        return None

    def _index_of(self, p: Tensor) -> int:
        for e in self._entries:
            if e.param is p:
                return e.index
        raise KeyError("parameter not managed by this optimizer")

    def _check_saved_groups(self, state_dict: dict, keys: tuple[str, ...]) -> tuple[Optional[dict], list]:
        """Checks the optimizer's section format, group count and sizes, and ``keys`` of every group.

        The section may be missing only when every entry's state is symmetric across ranks
        (FSDP2), since ``torch.distributed.checkpoint.state_dict`` keeps only ``state`` and
        ``param_groups``.
        """
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("Invalid state_dict: expected a mapping with 'state' and 'param_groups'")
        meta = state_dict.get(self._state_section)
        symmetric = bool(self._entries) and all(e.case == FSDP_ROWS for e in self._entries)
        if meta is None and symmetric:
            pass
        elif not isinstance(meta, dict) or meta.get("format") != self._state_format:
            raise ValueError(f"Invalid optimizer state_dict: missing or unknown {self._state_section!r} section")
        groups = state_dict["param_groups"]
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            n = len(groups) if isinstance(groups, list) else type(groups).__name__
            raise ValueError(f"Invalid state_dict: {n} param groups, optimizer has {len(self.param_groups)}")
        for i, (saved, mine) in enumerate(zip(groups, self.param_groups)):
            if not isinstance(saved, dict) or len(saved.get("params", ())) != len(mine["params"]):
                n = len(saved.get("params", ())) if isinstance(saved, dict) else "?"
                raise ValueError(f"Invalid state_dict: group {i} has {n} params, optimizer has {len(mine['params'])}")
            for key in keys:
                if saved.get(key) != mine.get(key):
                    raise ValueError(f"Invalid state_dict: group {i} {key}={saved.get(key)!r}, optimizer has {mine.get(key)!r}")
            self._check_saved_hyperparameters(i, saved)
        return meta, groups

    def _check_saved_hyperparameters(self, i: int, saved: dict) -> None:
        """Every hyperparameter that :meth:`_install_state` would install is validated first."""
        trial = dict(self.param_groups[i])
        for k, v in saved.items():
            if k in ("params", "names"):
                continue
            if k not in trial:
                raise ValueError(f"Invalid state_dict: group {i} has unknown hyperparameter {k!r}")
            trial[k] = tuple(v) if k == "betas" and isinstance(v, list) else v
        try:
            validate_adam_options(lr=trial["lr"], betas=trial["betas"], eps=trial["eps"], weight_decay=trial["weight_decay"])
            self._validate_group(trial)
        except ValueError as err:
            raise ValueError(f"Invalid state_dict: group {i}: {err}") from None

    def _check_saved_modes(self, meta: Optional[dict]) -> None:
        if meta is not None and meta["modes"] != [e.mode for e in self._entries]:
            raise ValueError("Invalid state_dict: matrix modes differ from this optimizer's")

    def _saved_entry_states(self, state_dict: dict) -> dict:
        """Saved per-parameter states keyed by entry index.

        Saved states are keyed by whatever ``param_groups[i]["params"]`` lists (indices from
        :meth:`state_dict`, fully qualified names from ``torch.distributed.checkpoint``) and
        matched to this optimizer's parameters by position, as ``torch.optim`` does.
        """
        saved_state = state_dict["state"]
        out = {}
        position = 0
        for saved, mine in zip(state_dict["param_groups"], self.param_groups):
            for key in saved["params"]:
                if key in saved_state:
                    out[self._entries[position].index] = saved_state[key]
                position += 1
        unknown = set(saved_state) - {k for g in state_dict["param_groups"] for k in g["params"]}
        if unknown:
            raise ValueError(f"Invalid state_dict: state for parameters {sorted(map(str, unknown))[:5]} not in any group")
        return out

    def _load_entry_states(self, state_dict: dict, prepare: Callable[[_Entry, dict], dict]) -> dict:
        """New ``state`` (by parameter): each saved entry made local, checked by ``prepare``, on the device in
        fp32 (or its dtype in ``_state_dtypes``)."""
        saved = self._saved_entry_states(state_dict)
        new_state: dict = {}
        for e in self._entries:
            st = saved.get(e.index)
            if st is None:
                continue
            if not isinstance(st, dict):
                raise ValueError(f"Invalid state_dict: state of {e.name} is a {type(st).__name__}, expected a mapping")
            st = prepare(e, {k: (local(v) if is_dtensor(v) else v) for k, v in st.items()})
            device = local(e.param).device
            new_state[e.param] = {
                k: (v.to(device=device, dtype=self._state_dtypes.get(k, torch.float32)).clone() if torch.is_tensor(v) else v)
                for k, v in st.items()
            }
        return new_state

    def _install_state(self, new_state: dict, groups: list, meta: Optional[dict] = None) -> None:
        """Replace group hyperparameters (but ``params``/``names``) and the whole state."""
        for g, saved in zip(self.param_groups, groups):
            for k, v in saved.items():
                if k in ("params", "names"):
                    continue
                g[k] = tuple(v) if k == "betas" else v
        self.state.clear()
        for p, st in new_state.items():
            self.state[p] = st
        if meta is not None:
            self.skipped_steps = int(meta.get("skipped_steps", 0))

    @staticmethod
    def _check_state_tensors(e: _Entry, st: dict, expect: dict, ints: tuple[str, ...]) -> None:
        """Every key but ``ints`` is expected, a tensor of the expected shape, and finite; ``ints`` are ints >= 0."""
        for key, t in st.items():
            if key in ints:
                if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                    raise ValueError(f"Invalid state_dict: {e.name} {key}={t!r}")
                continue
            if key not in expect:
                raise ValueError(f"Invalid state_dict: unexpected key {key!r} for {e.name}")
            if not torch.is_tensor(t) or tuple(t.shape) != expect[key]:
                shape = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
                raise ValueError(f"Invalid state_dict: {e.name}.{key} has shape {shape}, expected {expect[key]}")
            if not torch.isfinite(t).all():
                raise ValueError(f"Invalid state_dict: {e.name}.{key} holds non-finite values")
