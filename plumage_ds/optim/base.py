"""The core shared by the matrix optimizers (:class:`~plumage_ds.optim.PlumageAdamW`, :class:`~plumage_ds.optim.GUM`).

:class:`MatrixOptimizer` picks the parameters' layout (the sharding case,
:func:`~plumage_ds.distributed.layouts.layout_for`), plans one
:class:`~plumage_ds.distributed.layouts.Entry` per distinct parameter (a target matrix or an
AdamW parameter), and runs every step through one skeleton (:meth:`MatrixOptimizer._run_step`):

1. agree on which parameters have a gradient and whether any is non-finite (one tiny collective);
2. the targets' first phase (subclass: refresh, inputs to the ranks that update them);
3. the dense gradients to this rank's pieces; the global clipping coefficient;
4. the targets' second phase (subclass: the update on its ranks, sent back);
5. AdamW on this rank's dense pieces, and the pieces back to every rank;
6. commit: state, then weights.

A step is atomic (compute, agree, commit): new state is staged and written, with the weights,
only after the step's last collective, so an error anywhere before that leaves parameters and
optimizer state as they were, on every rank. A dense partition that another engine already
reduced (DeepSpeed ZeRO's flat pieces, :class:`DensePartition`) goes through the same step.
Checkpoint helpers are in :mod:`.checkpoints`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
from torch import Tensor

from ..config import NONFINITE_POLICIES, check_bool, check_int, check_nonneg, validate_adam_options
from ..distributed.layouts import EVERY_RANK, LAYOUTS, REPLICATED, Entry, layout_for, local, sharding_case
from ..estimators import (
    RefreshInput, is_left, oriented_shape, owner_refresh, refresh_index, resolve_sigma_rank, sampler_generator,
)
from ..kernels.adam import adam_step_size, adamw_chunks
from ..kernels.batched import group_indices, nonfinite_flags, sq_norm_sum
from ..targets import named_groups
from .checkpoints import CheckpointMixin
from .streaming import DeviceSkip, StreamingMixin


class NonFiniteGradientError(FloatingPointError):
    """Raised by ``step()`` with ``nonfinite="raise"``: some gradient holds NaN/Inf (nothing was changed)."""


class CollectiveStepError(RuntimeError):
    """A failure on one rank during a step, raised with the same message on every rank (nothing was changed)."""


@dataclass
class DensePartition:
    """Dense tensors another engine already reduced and partitioned across ranks (DeepSpeed ZeRO's flat
    fp32 pieces, with their ``.grad``): stepped by the optimizer's dense AdamW inside its own atomic
    step, with ``state`` (kept by the caller, per tensor ``step``/``exp_avg``/``exp_avg_sq``) and the
    hyperparameters of ``group`` (``lr``, ``betas``, ``eps``, ``weight_decay``). Every rank's pieces
    are disjoint and count in the global clipping norm, unless ``replicated`` (every rank holds the
    same averaged tensors, as under ZeRO stage 0): then rank 0's count once."""

    params: list
    state: dict
    group: dict
    replicated: bool = False


class MatrixOptimizer(StreamingMixin, CheckpointMixin, torch.optim.Optimizer):
    """Base of the optimizers that treat 2-D target matrices specially and use AdamW elsewhere.

    Subclasses set ``_display_name``, ``_state_section``, ``_state_format``, ``_projector_keys``
    and ``_supported_cases``, and implement ``_target_mode``, ``_validate_group``, ``_build_entries``
    (usually :meth:`_plan_entries` + owners), ``_targets_inputs`` and ``_targets_update``.
    """

    _display_name = "MatrixOptimizer"  # in error messages
    _supported_cases: tuple = (REPLICATED,)
    _entry_type: type = Entry
    state_dtype: torch.dtype = torch.float32  # the dtype of moments (and projectors) in the state

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict,
        *,
        seed: int,
        strict: bool,
        nonfinite: str = "skip",
        max_grad_norm: float = 0.0,
        process_group=None,
        replicate_group=None,
        collective_timeout: float = 0.0,
        target_modules: Any = None,
        **layout_options,
    ) -> None:
        check_int("seed", seed)
        check_bool("strict", strict)
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"Invalid {nonfinite=}: must be one of {list(NONFINITE_POLICIES)}")
        check_nonneg("max_grad_norm", max_grad_norm)
        check_nonneg("collective_timeout", collective_timeout)
        self.seed = seed
        self.strict = strict
        self.nonfinite = nonfinite
        self.max_grad_norm = float(max_grad_norm)
        self.skipped_steps = 0  # steps skipped on every rank because of non-finite gradients
        self.empty_steps = 0  # steps where no parameter had a gradient on any rank (no-ops after the first step)
        self.last_nonfinite = []  # parameters that made the last skipped step non-finite
        self.last_grad_norm = None  # the clipping norm of the last step (max_grad_norm > 0)
        self._entries: list[Entry] = []
        self._layout = None
        self._layout_options = {"process_group": process_group, "replicate_group": replicate_group, **layout_options}
        # entry index -> Pᵀ G_o accumulated during backward (targets whose gradient was projected
        # as it arrived, see PlumageAdamW's backward_projection); cleared by zero_grad and step
        self._projected: dict[int, Tensor] = {}
        super().__init__(named_groups(params, target_modules), defaults)
        self._layout = layout_for(self._named(), supported=self._supported_cases, who=self._display_name,
                                  **self._layout_options)
        self._layout.agreement.set_timeout(float(collective_timeout) or None)
        self._plan()

    @staticmethod
    def _adam_defaults(lr: float, betas: Any, eps: float, weight_decay: float) -> dict:
        """Validated Adam hyperparameters (``betas`` as a tuple): the first entries of ``defaults``."""
        if isinstance(betas, list):
            betas = tuple(betas)
        validate_adam_options(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        return dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    def _named(self) -> list[tuple[str, Tensor]]:
        """``(name, param)`` in flattened order (``param{i}`` where a group has no names)."""
        out, index = [], 0
        for group in self.param_groups:
            names = group.get("names") or [None] * len(group["params"])
            for p, name in zip(group["params"], names):
                out.append((name or f"param{index}", p))
                index += 1
        return out

    def _plan(self) -> None:
        """Plan every parameter on the layout, then check that every rank planned the same."""
        self._build_entries()
        self._planned_params = [e.param for e in self._entries]
        self._check_ranks_agree()

    # ------------------------------------------------------------------ setup

    def add_param_group(self, param_group: dict) -> None:
        """Validate the group completely, then add it; a rejected group leaves the optimizer as it was.

        A tensor listed twice (tied weights under two names) is kept once; its names are joined
        with ``|`` in :meth:`matrix_report`. After construction the group is planned on the layout
        with the others (its sharding case, ``strict``, the subclass's checks) before it is kept.
        """
        group = dict(param_group)
        params = group.get("params")
        params = [params] if isinstance(params, Tensor) else (list(params) if params is not None else [])
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
        if self._layout is None:  # construction: planned once every group is in
            super().add_param_group(group)
            return
        super().add_param_group(group)
        try:
            layout_for(self._named(), supported=(self._layout.case,), who=self._display_name, **self._layout_options)
            self._plan()
        except Exception:
            self.param_groups.pop()
            self._build_entries()
            self._planned_params = [e.param for e in self._entries]
            raise

    def _validate_group(self, g: dict) -> None:
        """Validate the optimizer-specific hyperparameters of a group (before it is added)."""

    def _options(self) -> dict:
        """Optimizer-wide options every rank must share (subclasses add theirs)."""
        return {"seed": self.seed, "strict": self.strict, "nonfinite": self.nonfinite, "max_grad_norm": self.max_grad_norm}

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
        self._layout.agreement.agree_on(lines, f"{self._display_name} setup")

    def _target_mode(self, group: dict) -> str:
        """The ``mode`` of a target matrix of ``group`` (see :meth:`matrix_report`)."""
        raise NotImplementedError

    def _classify(self, p: Tensor, group: dict, name: str) -> tuple[bool, str, str, int]:
        requested = group.get("lowrank")
        rank = group["rank"]
        if requested is False:
            return False, "adamw", group.get("reason", "group has lowrank=False"), 0
        shape = self._layout.logical_shape(p)
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

    def _plan_entries(self) -> list[Entry]:
        """One entry per parameter in flattened order, classified and placed by the layout; owners left at 0."""
        entries: list[Entry] = []
        index = 0
        for group in self.param_groups:
            names = group.get("names") or [None] * len(group["params"])
            for p, name in zip(group["params"], names):
                name = name or f"param{index}"
                lowrank, mode, reason, r = self._classify(p, group, name)
                e = self._entry_type(index=index, param=p, group=group, name=name, lowrank=lowrank, mode=mode, reason=reason,
                          shape=self._layout.logical_shape(p), case=self._layout.case)
                if lowrank:
                    e.left = is_left(e.shape)
                    e.s, e.l = oriented_shape(e.shape)
                    e.r = r
                    self._layout.plan(e)
                else:
                    e.owner = EVERY_RANK
                entries.append(e)
                index += 1
        return entries

    def _build_entries(self) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ reports

    def _report_row(self, e: Entry) -> dict:
        return {
            "name": e.name, "shape": list(e.shape), "mode": e.mode, "reason": e.reason, "owner": e.owner,
            "sharding": e.case, **self._layout.report(e),
        }

    def matrix_report(self) -> list[dict]:
        """One row per parameter: name, shape, mode, reason, owner rank (of the refresh; -1 where every
        rank holds a piece, as for dense parameters), sharding case."""
        return [self._report_row(e) for e in self._entries]

    def ownership(self) -> list[int]:
        """Owner rank of each parameter, in flattened param order."""
        return [e.owner for e in self._entries]

    def comm_stats(self) -> dict:
        """Collective bytes/calls per kind, from the layout's accounting layer."""
        return self._layout.comm_stats()

    @property
    def layout(self):
        """The sharding case's layout: where state lives, which collectives run (read-only)."""
        return self._layout

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.step_with_partition(None)
        return loss

    @torch.no_grad()
    def step_with_partition(self, partition: Optional[DensePartition]) -> bool:
        """:meth:`step`, with ``partition``'s pieces stepped too; whether the step was applied (a step
        whose non-finite flag stayed on the device counts as applied until it is read)."""
        self._settle()  # the previous step's flag, if it stayed on the device
        self._check_engine()
        try:
            return self._run_step(partition)
        finally:
            self._layout.end_step()  # closes this step's communication record

    def _check_engine(self) -> None:
        """Re-plan on parameters an engine re-placed before the first step; raise if it took them away.

        Re-placed (nothing stepped yet, the same number of tensors of the same logical shapes, now of
        another sharding case): Accelerate's FSDP2 preparation swaps each plain tensor for its
        ``DTensor``; DeepSpeed ZeRO-3 turns the very same tensors into placeholders. The layout is
        then picked again from the new placement. Taken away: DeepSpeed ZeRO >= 1 given this
        optimizer swaps ``param_groups[...]["params"]`` for its own flat partitions, and stepping
        the planned entries would update nothing.
        """
        current = [p for g in self.param_groups for p in g["params"]]
        swapped = len(current) != len(self._planned_params) or any(a is not b for a, b in zip(current, self._planned_params))
        if not self.state and current and self._replaceable(current, swapped):
            self._replan()
            return
        if swapped:
            raise RuntimeError(
                f"{self._display_name}: its param_groups no longer hold the parameters it was built on (an engine "
                "such as DeepSpeed ZeRO replaced them by flat partitions), so step() would update nothing. Under "
                "DeepSpeed build the engine with plumage_ds.integrations.deepspeed.initialize(model=..., config=...) "
                "(docs/deepspeed.md); under the HF Trainer or Accelerate use plumage_ds.integrations.hf "
                "(docs/integrations.md)"
            )

    def _replaceable(self, current: list[Tensor], swapped: bool) -> bool:
        """The same parameters (count, logical shapes), now claimed by another sharding case."""
        case = sharding_case(current[0], self._entries[0].name if self._entries else "param0")
        if case == self._layout.case or len(current) != len(self._planned_params):
            return False
        new = LAYOUTS[case]
        return all(tuple(new.logical_shape(p)) == tuple(e.shape) for p, e in zip(current, self._entries))

    def _replan(self) -> None:
        """Plan again on the re-placed parameters: new layout, entries, rank agreement."""
        timeout = self._layout.agreement.timeout
        self._layout = layout_for(self._named(), supported=self._supported_cases, who=self._display_name,
                                  **self._layout_options)
        self._layout.agreement.set_timeout(timeout)
        self._plan()

    def _run_step(self, partition: Optional[DensePartition]) -> bool:
        """The step skeleton (module docstring); whether the step was applied."""
        layout = self._layout
        plan = self._begin_step(partition)
        if plan is None:
            return False
        targets, dense, external, skip = plan
        if skip is not None or self._streams(targets, external):  # in place, chunk by chunk (optim/streaming.py)
            self._stream_step(targets, dense, skip)
            return True
        staged: dict[Any, dict] = {}
        work = self._targets_inputs(targets, staged)
        g_owned = layout.reduce_dense(dense, [self._grad32(e) for e in dense])
        g_ext = [e.param.grad.float() for e in external]
        counted = g_ext if partition is None or not partition.replicated or layout.rank == 0 else []
        clip = self._clip_coefficient(work.get("clip_inputs", []) + g_owned + counted)
        # dense AdamW: out of place when its result still has to travel; with no collective left
        # (one rank; a partition another engine reduced), it runs in place at commit (same bits,
        # no new moment tensors)
        in_place = layout.dense_in_place(dense)
        updates = self._targets_update(targets, work, clip, staged)
        plan_in_place = self._dense_groups(external, g_ext, clip)
        if in_place:
            plan_in_place += self._dense_groups(dense, g_owned, clip)
            W_all: list = []
        else:
            new_dense = self._dense_adamw(dense, g_owned, clip, staged)
            W_all = layout.gather_dense(dense, new_dense)  # the step's last collective
        # -- commit ------------------------------------------------------------------
        self._commit(targets + dense + external, staged)
        self._projected.clear()
        self._apply_targets(targets, updates)
        self._dense_adamw_in_place(plan_in_place)
        for e, W in zip(dense, W_all):
            layout.apply_dense(e, W)
        return True

    def _targets_inputs(self, targets: list[Entry], staged: dict) -> dict:
        """Subclass: refresh and move the targets' inputs to where they are updated (collectives);
        ``{"clip_inputs": [...], ...}``: what the update uses, for the clipping norm."""
        raise NotImplementedError

    def _targets_update(self, targets: list[Entry], work: dict, clip: float, staged: dict) -> Any:
        """Subclass: the targets' update (new state staged) and what :meth:`_apply_targets` applies."""
        raise NotImplementedError

    def _apply_targets(self, targets: list[Entry], updates: Any) -> None:
        raise NotImplementedError

    def _clip_coefficient(self, used: list[Tensor]) -> float:
        """``min(1, max_grad_norm / ‖what the optimizer uses‖)`` over every rank's disjoint pieces (1.0: off)."""
        if self.max_grad_norm <= 0:
            return 1.0
        return self._clip_from_squares(sq_norm_sum([t for t in used if t is not None]))

    # ------------------------------------------------------------------ the refresh of P

    def _estimator(self, e: Entry):
        """The estimator strategy of a target (:mod:`plumage_ds.estimators.registry`)."""
        raise NotImplementedError

    @staticmethod
    def _sigma_rank(e: Entry) -> int:
        """The ``sigma_rank`` the owner keeps ``e``'s ``Σ`` under (``None`` in the group: its rank)."""
        return resolve_sigma_rank(e.group.get("sigma_rank"), e.group["rank"])

    def _generator(self, e: Entry) -> torch.Generator:
        return sampler_generator(self.seed, e.index, refresh_index(self._step_of(e), e.group["update_interval"]))

    def _refresh_projectors(self, refresh: list[Entry], grads: list[Tensor], staged: dict) -> dict[Any, tuple[Tensor, Tensor]]:
        """New ``(P, d)`` of every entry of ``refresh`` (this rank's rows of ``P``); the estimators' kept
        state (``Σ``) staged.

        Estimators that build ``P`` from the gradient: the layout moves each matrix's refresh input
        (the averaged gradient, or the Gram matrix summed over row shards) to its owner, which runs
        :func:`~plumage_ds.estimators.owner_refresh`, and every rank receives its part. The others
        (Haar): every rank draws the same ``P`` from the shared seed, no communication. A failure on
        any owner is agreed on and raised on every rank as :class:`CollectiveStepError`, nothing changed.
        """
        layout = self._layout
        need = [e for e in refresh if self._estimator(e).needs_gradient]
        at = {e.index: i for i, e in enumerate(refresh)}
        basis = layout.refresh_inputs(need, [grads[at[e.index]] for e in need], [e.group["svd_method"] == "gram" for e in need])
        mine = [j for j, b in enumerate(basis) if b is not None]  # this rank owns their refresh
        results, error = owner_refresh([
            RefreshInput(name=need[j].name, estimator=self._estimator(need[j]), rank=need[j].r, left=need[j].left,
                         kind=basis[j][0], X=basis[j][1], svd_method=need[j].group["svd_method"],
                         uniform_mix=need[j].group.get("uniform_mix", 0.0),
                         sigma_rank=self._sigma_rank(need[j]), sigma_weight=need[j].group.get("sigma_weight"),
                         generator=self._generator(need[j]),
                         kept={k: v for k, v in self.state.get(need[j].param, {}).items() if k in ("Sigma", "sigma_count")})
            for j in mine
        ])
        new_on_owner: list[Optional[tuple[Tensor, Tensor]]] = [None] * len(need)
        for j, res in zip(mine, results):
            e, device = need[j], basis[j][1].device
            new_on_owner[j] = (torch.zeros(e.s, e.r, device=device), torch.ones(e.r, device=device))  # if it failed
            if res is not None:
                new_on_owner[j] = (res.P, res.d)
                if res.kept:  # optimal: the owner's updated Σ and its count
                    staged.setdefault(e.index, {}).update(res.kept)
        shared = layout.share_projectors(need, new_on_owner)
        error = layout.agreement.agree_error(error, "refresh")
        if error is not None:
            for e in refresh:
                staged.pop(e.index, None)
            raise CollectiveStepError(f"{self._display_name} step failed ({error}); parameters and optimizer state are unchanged")
        new_P = {e.index: pd for e, pd in zip(need, shared)}
        for e in refresh:
            if e.index not in new_P:  # no gradient needed (haar): every rank draws the same P
                proj = self._estimator(e).draw(e.s, e.r, self._generator(e), device=grads[0].device)
                a, b = e.p_rows
                new_P[e.index] = (proj.P[a:b].contiguous(), proj.d)
        return new_P

    def _state_of(self, e: Entry) -> dict:
        """``e``'s state (read-only view; ``{}`` before its first step): the optimizer's, or a partition's."""
        holder = e.extra.get("partition_state", self.state)
        return holder.get(e.param, {})

    def _step_of(self, e: Entry) -> int:
        """Updates applied to ``e`` so far (0 before its first step; reading creates no state)."""
        return self._state_of(e).get("step", 0)

    def _begin_step(self, partition: Optional[DensePartition]) -> Optional[tuple]:
        """``(targets, dense, external, skip)``: the entries with a gradient on some rank, and the step's
        non-finite flag where it stays on the device (:class:`~plumage_ds.optim.streaming.DeviceSkip`,
        else ``None``); ``None`` to skip the step.

        One small collective agrees, for every entry, on "has a gradient somewhere" and "holds a
        non-finite value somewhere" (and for ``partition``: "holds a non-finite value on some rank"),
        before anything changes. Non-finite: ``nonfinite="skip"`` skips the step on every rank
        (counted in ``skipped_steps``), ``"raise"`` raises :class:`NonFiniteGradientError` naming the
        parameters. No gradient anywhere: before the first step an error (the engine probably took
        the parameters away, or the model was wrapped after this optimizer was built), later a no-op
        counted in ``empty_steps`` (as ``torch.optim`` skips parameters without gradients).

        A step that streams with ``nonfinite="skip"`` (one process, or DDP ranks each with the whole
        averaged gradient) reads nothing on the host: "has a gradient" is known there, "non-finite"
        stays on the device and the step runs as if finite, cancelled on the device where it is not.
        """
        n = len(self._entries)
        external = self._partition_entries(partition)
        pending, owner_of = [], []  # every gradient tensor of the step, and its entry's position
        for i, e in enumerate(self._entries):
            for t in (local(e.param.grad), self._projected.get(e.index)):
                if t is not None:
                    pending.append(t)
                    owner_of.append(i)
        if partition is None and self.nonfinite == "skip":
            active = [self._entries[i] for i in dict.fromkeys(owner_of)]
            targets, dense = [e for e in active if e.lowrank], [e for e in active if not e.lowrank]
            if active and self._streams(targets, []):  # no collective: "somewhere" is here
                return targets, dense, [], DeviceSkip.of(pending, [self._entries[i].name for i in owner_of])
        ext_grads = [e.param.grad for e in external]
        flags = nonfinite_flags(pending + ext_grads)
        has, bad = [False] * n, [False] * n
        for i, flag in zip(owner_of, flags):
            has[i] = True
            bad[i] = bad[i] or flag
        ext_flag = [any(flags[len(pending):])] if partition is not None else []
        agreed = self._layout.agreement.any_true(has + bad + ext_flag)
        has_grad, nonfinite, ext_bad = agreed[:n], agreed[n : 2 * n], bool(agreed[2 * n :] and agreed[2 * n])
        if not any(has_grad) and not external:
            if not any(st.get("step", 0) for st in self.state.values()):
                raise RuntimeError(
                    f"{self._display_name}.step(): none of its {n} parameters has a gradient on any rank. If the "
                    "model was wrapped (FSDP2 fully_shard, DeepSpeed) after this optimizer was built, the engine "
                    "replaced the parameters: build the optimizer after wrapping the model"
                )
            self.empty_steps += 1
            return None
        if any(nonfinite) or ext_bad:
            names = [e.name for e, b in zip(self._entries, nonfinite) if b] + (["<dense partition>"] if ext_bad else [])
            if self.nonfinite == "raise":
                raise NonFiniteGradientError(
                    f"Non-finite gradient in {names}; step not applied (nonfinite='raise'); parameters and "
                    "optimizer state are unchanged"
                )
            self.skipped_steps += 1
            self.last_nonfinite = names
            return None
        active = [e for e, h in zip(self._entries, has_grad) if h]
        return [e for e in active if e.lowrank], [e for e in active if not e.lowrank], external, None

    def _partition_entries(self, partition: Optional[DensePartition]) -> list[Entry]:
        """Entries for ``partition``'s pieces that hold a gradient here (their state is the partition's)."""
        if partition is None:
            return []
        return [
            Entry(index=("partition", j), param=p, group=partition.group, name=f"partition{j}", lowrank=False,
                  mode="adamw", reason="dense partition", shape=tuple(p.shape), owner=EVERY_RANK,
                  extra={"partition_state": partition.state})
            for j, p in enumerate(partition.params) if p.grad is not None and p.grad.numel()
        ]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``torch.optim.Optimizer.zero_grad``, and the gradients projected during backward."""
        super().zero_grad(set_to_none=set_to_none)
        self._projected.clear()

    def _grad(self, e: Entry) -> Tensor:
        """``e``'s gradient on this rank (its local shard under FSDP2) as it is (zeros where none)."""
        g = local(e.param.grad)
        if g is None:
            return torch.zeros(e.local_shape, dtype=local(e.param).dtype, device=local(e.param).device)
        if g.is_sparse:
            raise RuntimeError(f"{self._display_name} does not support sparse gradients ({e.name})")
        return g

    def _grad32(self, e: Entry) -> Tensor:
        """:meth:`_grad` in fp32 (a copy for low-precision gradients: use one matrix at a time)."""
        g = self._grad(e)
        return g.float() if g.dtype != torch.float32 else g

    # ------------------------------------------------------------------ the one dense AdamW

    def _dense_groups(self, dense: list[Entry], g_owned: list[Optional[Tensor]], clip: float) -> list[tuple]:
        """``(entries, clipped gradients, (lr, wd, betas, eps, step))`` per set of equal hyperparameters
        and step among the entries with a gradient piece here (read before the step counters move)."""
        live = [i for i, G in enumerate(g_owned) if G is not None]
        keys = []
        for i in live:
            g = dense[i].group
            keys.append((g["lr"], g["weight_decay"], g["betas"], g["eps"], self._step_of(dense[i])))
        out = []
        for part in group_indices(keys):
            idx = [live[j] for j in part]
            G = [g_owned[i] for i in idx]
            out.append(([dense[i] for i in idx], list(torch._foreach_mul(G, clip)) if clip != 1.0 else G, keys[part[0]]))
        return out

    def _dense_adamw(self, dense: list[Entry], g_owned: list[Optional[Tensor]], clip: float, staged: dict) -> list[Optional[Tensor]]:
        """AdamW on the pieces this rank holds: their new fp32 weights (``None`` where it holds none).

        Out of place: new moments go to ``staged[e.index]``; nothing is written to the state.
        Batched: one ``_foreach`` chain per set of equal hyperparameters.
        """
        new_dense: dict[Any, Tensor] = {}
        for es, G, (lr, wd, (beta1, beta2), eps, step) in self._dense_groups(dense, g_owned, clip):
            states = [self._state_of(e) for e in es]
            M, V, W = adamw_chunks(
                [self._fp32(st.get("exp_avg")) for st in states], [self._fp32(st.get("exp_avg_sq")) for st in states], G,
                [self._layout.dense_piece(e).to(torch.float32, copy=True) for e in es],
                beta1=beta1, beta2=beta2, eps=eps, decay=lr * wd, step_size=adam_step_size(lr, step + 1, beta1, beta2),
                in_place=False,
            )
            for e, m, v, w in zip(es, M, V, W):
                staged.setdefault(e.index, {}).update(exp_avg=m.to(self.state_dtype), exp_avg_sq=v.to(self.state_dtype))
                new_dense[e.index] = w
        return [new_dense.get(e.index) for e in dense]

    def _dense_adamw_in_place(self, groups: list[tuple]) -> None:
        """AdamW of :meth:`_dense_groups` in place on the state and on fp32 weight pieces (views of
        the parameters): for a commit with no collective left, it allocates no new moments."""
        for es, G, (lr, wd, (beta1, beta2), eps, step) in groups:
            states = [e.extra.get("partition_state", self.state)[e.param] for e in es]
            pieces = [e.param if "partition_state" in e.extra else self._layout.dense_piece(e) for e in es]
            M, V, _ = adamw_chunks(
                [self._fp32(st.get("exp_avg")) for st in states], [self._fp32(st.get("exp_avg_sq")) for st in states],
                G, pieces, beta1=beta1, beta2=beta2, eps=eps, decay=lr * wd,
                step_size=adam_step_size(lr, step + 1, beta1, beta2), in_place=True,
            )
            for st, m, v in zip(states, M, V):
                self._store(st, "exp_avg", m)
                self._store(st, "exp_avg_sq", v)

    def _commit(self, active: list[Entry], staged: dict) -> None:
        """Write the staged state of a completed step and advance the step counters."""
        for e in active:
            holder = e.extra.get("partition_state", self.state)
            st = holder.setdefault(e.param, {}) if holder is not self.state else self.state[e.param]
            for k, v in staged.get(e.index, {}).items():
                if v is None:  # staged removal
                    st.pop(k, None)
                else:
                    st[k] = v
            st["step"] = st.get("step", 0) + 1
