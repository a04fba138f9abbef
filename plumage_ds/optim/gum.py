"""``GUM``: GaLore Unbiased with Muon (arXiv 2510.17802, docs/design.md §2.2).

For the ``N_L`` target matrices ``W`` (``m × n``, oriented to ``(s, l)`` with the
short side first, see :mod:`plumage_ds.estimators.spectral`), with period
``K = update_interval`` and ``q = γ / N_L``:

* at the first step of period ``k`` (``step % K == 0``): ``P``  # (s, r) = top-r
  left singular vectors of the oriented gradient (GaLore,
  :func:`~plumage_ds.estimators.galore_projection`); exactly ``γ`` targets are
  drawn (:func:`draw_layers`, seeded from ``(seed, LAYER_DRAW_ID, k)``); every
  momentum is reset to zeros of its branch's shape (the previous period's
  buffers are dropped);
* every step, the branch input (:func:`gum_input`):
  drawn ``X = (G_o − P Pᵀ G_o)/q``  # (s, l),
  others ``X = Pᵀ G_o/(1 − q)``  # (r, l),
  so the lifted input (:func:`lift`) averages to ``G_o`` over the draw;
* Muon on ``X``: ``M ← μ M + X``, ``U = X + μ M`` (Nesterov) or ``U = M``,
  ``O = NS5(U)`` (:func:`newton_schulz5`), lifted ``Δ = P O`` or ``O``;
* ``W ← W·(1 − lr·wd)``, ``W ← W − lr·scale·0.2·sqrt(max(m, n))·Δ`` (Moonlight's
  RMS matching, so AdamW learning rates carry over).

When ``γ >= N_L`` (``q = 1``) every target is drawn every period and the
low-rank branch has probability 0; the input is then ``G_o`` itself (plain Muon
with period-wise momentum resets, no projector, no SVD), because the residual
alone would drop the top-r part and be biased.

Everything else (1-D parameters, groups with ``lowrank=False``, matrices whose
``rank >= s``) gets AdamW with the arithmetic of :mod:`plumage_ds.kernels.adam`,
identical to :class:`~plumage_ds.optim.PlumageAdamW`'s dense path.

Distribution is the layout's (:mod:`plumage_ds.distributed.layouts`), as for
:class:`~plumage_ds.optim.PlumageAdamW`: Newton–Schulz needs a whole matrix, so each target's
branch input goes whole to its owner (the averaged ``G`` for drawn targets, the averaged
``Pᵀ G_o`` — compressed — for the others), the owner runs Muon, and every rank receives its piece
of the update. Under FSDP2 that is the rows gathered to the owner and the update's rows scattered
back; the refresh (GaLore ``P``) goes through the same owner refresh as PLUMAGE's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
from torch import Tensor

from ..config import check_int, check_positive, check_unit, validate_lowrank_options
from ..distributed.layouts import FSDP_ROWS, REPLICATED, ZERO3_FLAT, Entry
from ..estimators import orient, refresh_index, sample_layers, sampler_generator
from ..estimators.registry import get_estimator
from .base import MatrixOptimizer

LAYER_DRAW_ID = 2**31 - 1
"""The ``matrix_id`` slot of :func:`sampler_generator` used for the layer draw."""

NS_COEFFS = (3.4445, -4.7750, 2.0315)
"""Muon's quintic Newton–Schulz coefficients ``(a, b, c)``."""

RMS_MATCH = 0.2
"""Moonlight's RMS matching factor: updates are scaled by ``0.2·sqrt(max(m, n))``."""

_STATE_FORMAT = 1


# --------------------------------------------------------------------------- pure math


def newton_schulz5(G: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Muon's quintic Newton–Schulz orthogonalization, in fp32 (new tensor).

    ``X = G/(‖G‖_F + eps)`` (transposed when rows > cols), then ``steps`` times
    ``A = X Xᵀ``, ``X ← aX + (bA + cA²)X``. The singular vectors are those of
    ``G``; singular values land roughly in ``[0.7, 1.2]`` (not exactly 1: the
    coefficients trade accuracy for speed), except those far below ``‖G‖_F``.
    """
    if G.dim() != 2:
        raise ValueError(f"Invalid G.shape={tuple(G.shape)}: Newton–Schulz needs a matrix")
    a, b, c = NS_COEFFS
    X = G.float()
    transposed = X.shape[0] > X.shape[1]
    if transposed:
        X = X.mT
    X = X / (X.norm() + eps)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT.contiguous() if transposed else X


def sampling_probability(num_targets: int, gamma: int) -> float:
    """``q = min(γ, N_L)/N_L``: the probability that a target is drawn in a period."""
    return min(gamma, num_targets) / num_targets


def draw_layers(seed: int, num_targets: int, gamma: int, period: int) -> Tensor:
    """Boolean mask ``(N_L,)`` of the targets drawn in ``period`` (exactly ``min(γ, N_L)``).

    Depends on ``(seed, N_L, γ, period)`` only: identical on every rank and after
    a resume, so it is never stored.
    """
    return sample_layers(num_targets, gamma, sampler_generator(seed, LAYER_DRAW_ID, period))


def gum_input(G_o: Tensor, P: Optional[Tensor], drawn: bool, q: float) -> Tensor:
    """The Muon input of one target for one step (oriented frame).

    Drawn: ``(G_o − P Pᵀ G_o)/q``  # (s, l); not drawn: ``Pᵀ G_o/(1 − q)``  # (r, l).
    ``q == 1`` (every target drawn): ``G_o`` itself, and ``P`` may be ``None``.
    """
    if q >= 1.0:
        return G_o.clone()
    if P is None:
        raise ValueError("gum_input needs a projector P when q < 1")
    R = P.mT @ G_o  # (r, l)
    if drawn:
        return (G_o - P @ R) / q
    return R / (1.0 - q)


def lift(X: Tensor, P: Optional[Tensor], drawn: bool) -> Tensor:
    """Back to the oriented ``(s, l)`` frame: ``X`` if drawn, ``P X`` otherwise."""
    return X if drawn else P @ X


def update_coefficient(lr: float, scale: float, shape: tuple[int, ...] | torch.Size) -> float:
    """``lr·scale·0.2·sqrt(max(m, n))``: what multiplies the lifted orthogonalized update."""
    return lr * scale * RMS_MATCH * math.sqrt(max(shape))


# --------------------------------------------------------------------------- optimizer


@dataclass
class _GumEntry(Entry):
    """An :class:`~plumage_ds.distributed.layouts.Entry` with its place in the layer draw."""

    target: int = -1  # position among the N_L targets (index into the layer-draw mask)


class GUM(MatrixOptimizer):
    """GaLore projection + Muon + layer-wise sampling (unbiased); AdamW elsewhere.

    Args:
        params: ``model.named_parameters()`` (the default selection of ``target_modules`` picks the
            targets), parameters, or groups. A group may set ``lowrank`` (bool) and any per-group
            hyperparameter below; ``names`` (list of str, aligned with ``params``) labels the rows of
            :meth:`matrix_report`. Without ``lowrank``, every 2-D parameter is a target.
        lr: learning rate of both paths (targets: Moonlight RMS matching makes
            AdamW-sized rates work).
        betas, eps: AdamW on non-targets only.
        weight_decay: decoupled, both paths: ``W ← W·(1 − lr·wd)``.
        rank: ``r``, GaLore rank of the low-rank branch.
        update_interval: ``K``, period length (SVD, layer draw, momentum reset);
            the draw is global, so every group holding targets must agree.
        gamma: ``γ``, targets drawn per period for the full-rank residual branch.
        momentum: Muon momentum ``μ`` in ``[0, 1)``.
        nesterov: use ``X + μM`` (default, as Muon) instead of ``M``.
        scale: extra multiplier on the target update.
        svd_method: ``"gram"`` or ``"svd"`` for the GaLore projector.
        seed: layer-draw seed.
        strict: raise instead of falling back to AdamW for a requested target
            matrix that cannot take the low-rank path.
        max_grad_norm: if > 0, clip by the global norm of what the optimizer uses: the averaged
            branch inputs (``G`` of drawn targets, ``Pᵀ G_o`` of the others) and dense gradients.
        nonfinite: ``"skip"`` (default) a step whose gradients hold NaN/Inf, counted in
            ``skipped_steps``, or ``"raise"``; either way nothing changes.
        process_group, replicate_group, collective_timeout, target_modules: as for
            :class:`~plumage_ds.optim.PlumageAdamW` (every sharding case: one process, the
            owner-sharded data-parallel optimizer, FSDP2/HSDP rows, ZeRO-3 flat chunks).
    """

    _entry_type = _GumEntry
    _display_name = "GUM"
    _state_section = "gum"
    _state_format = _STATE_FORMAT
    _projector_keys = ("P",)
    _supported_cases = (REPLICATED, FSDP_ROWS, ZERO3_FLAT)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        rank: int = 8,
        update_interval: int = 200,
        gamma: int = 2,
        momentum: float = 0.95,
        nesterov: bool = True,
        scale: float = 1.0,
        svd_method: str = "gram",
        seed: int = 0,
        strict: bool = False,
        max_grad_norm: float = 0.0,
        nonfinite: str = "skip",
        process_group=None,
        replicate_group=None,
        collective_timeout: float = 0.0,
        target_modules: Any = None,
    ) -> None:
        defaults = self._adam_defaults(lr, betas, eps, weight_decay)
        self._validate_lowrank(rank, update_interval, scale, svd_method, momentum, nesterov)
        check_positive("gamma", gamma, integer=True)
        check_int("seed", seed)
        defaults.update(
            rank=rank, update_interval=update_interval, momentum=momentum, nesterov=nesterov, scale=scale,
            svd_method=svd_method, lowrank=None,
        )
        self.gamma = gamma
        self._targets: list[_GumEntry] = []
        self._step = 0  # optimizer steps taken (global: periods and draws are global)
        self._mask_cache: tuple[int, Tensor] | None = None
        super().__init__(
            params, defaults, seed=seed, strict=strict, nonfinite=nonfinite, max_grad_norm=max_grad_norm,
            process_group=process_group, replicate_group=replicate_group, collective_timeout=collective_timeout,
            target_modules=target_modules,
        )

    # ------------------------------------------------------------------ setup

    @staticmethod
    def _validate_lowrank(rank, update_interval, scale, svd_method, momentum, nesterov) -> None:
        validate_lowrank_options(rank=rank, update_interval=update_interval, scale=scale, svd_method=svd_method)
        check_unit("momentum", momentum, closed=False)
        if not isinstance(nesterov, bool):
            raise ValueError(f"Invalid nesterov={nesterov!r}: must be true or false")

    def _validate_group(self, g: dict) -> None:
        self._validate_lowrank(g["rank"], g["update_interval"], g["scale"], g["svd_method"], g["momentum"], g["nesterov"])

    def add_param_group(self, param_group: dict) -> None:
        replan = bool(self._entries)  # a group added after construction
        super().add_param_group(param_group)
        if replan:
            # N_L changed, so this period's draw did too: every target restarts its
            # period (new P, zero momentum) at its next step.
            for st in self.state.values():
                st.pop("period", None)

    def _target_mode(self, group: dict) -> str:
        return "gum"

    def _estimator(self, e: Entry):
        return get_estimator("gum")

    def _options(self) -> dict:
        return {**super()._options(), "gamma": self.gamma}

    def _build_entries(self) -> None:
        entries = self._plan_entries()
        targets = [e for e in entries if e.lowrank]
        for i, e in enumerate(targets):
            e.target = i
        intervals = sorted({e.group["update_interval"] for e in targets})
        if len(intervals) > 1:
            raise ValueError(
                f"Invalid update_interval: GUM's layer draw is global, so every group holding target "
                f"matrices needs the same update_interval; got {intervals}"
            )
        # the owner decomposes at period starts and runs Newton–Schulz every step: ~10 products of
        # (s, s, l) on drawn targets; it keeps the momentum (full-size with probability q)
        q = sampling_probability(len(targets), self.gamma) if targets else 0.0
        costs = [float(e.s * e.s * e.l) * 11.0 for e in targets]
        state_bytes = [int(4 * (e.s * e.r + q * e.s * e.l + (1 - q) * e.r * e.l)) for e in targets]
        for e, o in zip(targets, self._layout.assign_owners(costs, state_bytes)):
            e.owner = o
        self._entries = entries
        self._targets = targets
        self._mask_cache = None

    # ------------------------------------------------------------------ period facts

    @property
    def num_targets(self) -> int:
        """``N_L``."""
        return len(self._targets)

    @property
    def q(self) -> float:
        """``q = min(γ, N_L)/N_L`` (0 without targets)."""
        return sampling_probability(self.num_targets, self.gamma) if self._targets else 0.0

    @property
    def update_interval(self) -> int:
        """``K`` of the target groups (the defaults' value without targets)."""
        if self._targets:
            return self._targets[0].group["update_interval"]
        return self.defaults["update_interval"]

    @property
    def current_period(self) -> int:
        """Period index of the next step (``step // K``)."""
        return refresh_index(self._step, self.update_interval)

    def drawn_mask(self, period: Optional[int] = None) -> Tensor:
        """Targets drawn in ``period`` (default: :attr:`current_period`), bool ``(N_L,)``."""
        k = self.current_period if period is None else period
        if not self._targets:
            return torch.zeros(0, dtype=torch.bool)
        if self._mask_cache is None or self._mask_cache[0] != k:
            self._mask_cache = (k, draw_layers(self.seed, self.num_targets, self.gamma, k))
        return self._mask_cache[1]

    # ------------------------------------------------------------------ reports

    def matrix_report(self) -> list[dict]:
        """One row per parameter: name, shape, mode, reason, owner, sharding, and ``drawn``.

        ``drawn`` (targets only, ``None`` otherwise) is the branch of the current
        period: ``True`` full-rank residual, ``False`` low-rank.
        """
        mask = self.drawn_mask()
        return [{**self._report_row(e), "drawn": bool(mask[e.target]) if e.lowrank else None} for e in self._entries]

    def state_bytes(self) -> dict:
        """Optimizer-state bytes held by this rank, measured from the tensors.

        ``projectors``: ``P`` of the targets; ``moments``: their momentum buffers
        (``(s, l)`` for drawn, ``(r, l)`` for the others, on their owner); ``non_target``: AdamW
        moments.
        """
        return super().state_bytes()

    # ------------------------------------------------------------------ step

    def _current(self, staged: dict, e: Entry, key: str) -> Optional[Tensor]:
        new = staged.get(e.index, {})
        return new[key] if key in new else self.state.get(e.param, {}).get(key)

    def _targets_inputs(self, targets: list[_GumEntry], staged: dict) -> dict:
        """Period start (staged), then each target's branch input, averaged and whole, on its owner:
        the gradient of drawn targets (the residual is formed there), ``Pᵀ G_o`` of the others
        (compressed: projection is linear)."""
        k = self.current_period
        q, mask = self.q, self.drawn_mask(k)
        # A target refreshes when its state belongs to an earlier period: at the boundary step,
        # or at its first step with a gradient within the period.
        refresh = [e for e in targets if self.state.get(e.param, {}).get("period") != k]
        if refresh:
            self._refresh(refresh, k, q, mask, staged)
        drawn = [e for e in targets if bool(mask[e.target])]
        low = [e for e in targets if not bool(mask[e.target])]
        layout = self._layout
        G_owned = layout.full_to_owners(drawn, [self._grad32(e) for e in drawn], tag="gum_grad")
        # the owner forms the residual G_o − P Pᵀ G_o of a drawn target with its whole P
        P_drawn = layout.whole_projectors(drawn, [self._current(staged, e, "P") for e in drawn]) if q < 1.0 else [None] * len(drawn)
        P_low = layout.projectors(low, [self._current(staged, e, "P") for e in low])
        R_owned = layout.compress_to_owners(low, [self._grad32(e) for e in low], P_low, tag="gum_grad")
        return {"k": k, "q": q, "drawn": drawn, "low": low, "G": G_owned, "R": R_owned, "P_low": P_low,
                "P_drawn": P_drawn, "clip_inputs": G_owned + R_owned}

    def _targets_update(self, targets: list[_GumEntry], work: dict, clip: float, staged: dict) -> dict:
        """Muon on the owners (new momentum staged), then every rank's piece of each update."""
        q, drawn, low = work["q"], work["drawn"], work["low"]
        O_drawn = [None if Y is None else self._muon(e, gum_input(orient(_clipped(Y, clip), e.left), P, True, q), staged)
                   for e, Y, P in zip(drawn, work["G"], work["P_drawn"])]
        O_low = [None if Y is None else self._muon(e, _clipped(Y, clip) / (1.0 - q), staged) for e, Y in zip(low, work["R"])]
        layout = self._layout
        deltas = layout.full_from_owners(drawn, [None if O is None else orient(O, e.left) for e, O in zip(drawn, O_drawn)],
                                         tag="gum_update")
        deltas += layout.lift_from_owners(low, O_low, work["P_low"], tag="gum_update")
        return {"entries": drawn + low, "deltas": deltas}

    def _muon(self, e: _GumEntry, X: Tensor, staged: dict) -> Tensor:
        """``M ← μ M + X``, ``U = X + μ M`` (Nesterov) or ``M``, ``O = NS5(U)·lr·scale·0.2·√max(m, n)``."""
        g = e.group
        mu = g["momentum"]
        M = self._current(staged, e, "momentum_buffer").mul(mu).add_(X)
        staged.setdefault(e.index, {})["momentum_buffer"] = M
        U = X.add(M, alpha=mu) if g["nesterov"] else M
        return newton_schulz5(U).mul_(update_coefficient(g["lr"], g["scale"], e.shape))

    def _apply_targets(self, targets: list[_GumEntry], updates: dict) -> None:
        es = updates["entries"]
        self._layout.apply_deltas(es, updates["deltas"], [e.group["lr"] * e.group["weight_decay"] for e in es])

    def _run_step(self, partition) -> bool:
        applied = super()._run_step(partition)
        if applied:
            self._step += 1
        return applied

    def _refresh(self, refresh: list[_GumEntry], k: int, q: float, mask: Tensor, staged: dict) -> None:
        """Stage period ``k`` for ``refresh``: GaLore ``P`` (unless ``q == 1``), zero momentum on the owner.

        The previous period's buffers are replaced, so full-size momentum exists only for this
        period's drawn targets. ``P`` comes from the owner refresh shared with PLUMAGE (the layout
        moves each gradient to its owner, every rank receives its rows of ``P``); a failed
        decomposition on any owner raises :class:`~plumage_ds.optim.base.CollectiveStepError` on
        every rank with nothing changed.
        """
        need_p = refresh if q < 1.0 else []
        grads, _ = self._layout.refresh_grads(need_p, [self._grad32(e) for e in need_p])  # HSDP: across replicas
        new_P = self._refresh_projectors(need_p, grads, staged)
        me = self._layout.rank
        for e in refresh:
            new = staged.setdefault(e.index, {})
            new["P"] = None  # dropped unless this period has one
            new["momentum_buffer"] = None
            if e.index in new_P:
                new["P"] = new_P[e.index][0].to(device=e.param.device, dtype=torch.float32).contiguous()
            if e.owner == me:
                shape = (e.s, e.l) if bool(mask[e.target]) else (e.r, e.l)
                new["momentum_buffer"] = torch.zeros(shape, dtype=torch.float32, device=e.param.device)
            new["period"] = k

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """Tensors and plain scalars only (``torch.load(weights_only=True)`` safe).

        ``state[i]`` holds parameter ``i``'s state on this rank: targets ``step``, ``period``
        (ints), ``P`` (this rank's rows) and, on the owner, ``momentum_buffer``; others ``step``,
        ``exp_avg``, ``exp_avg_sq`` (this rank's piece). The drawn set is not stored:
        :func:`draw_layers` re-derives it from ``gum.seed``/``gamma`` and the period. ``gum.step``
        is the global step counter that places periods.
        """
        return self._state_dict_with({
            "format": _STATE_FORMAT, "seed": self.seed, "gamma": self.gamma, "step": self._step,
            "num_targets": self.num_targets,
        })

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a :meth:`state_dict` of an identically configured optimizer.

        Validates everything first (section format, group count and sizes, hyperparameters that
        shape the state, seed, γ, modes, ownership, every tensor's shape against the branch its
        period's draw implies) and only then replaces the state, so a bad checkpoint leaves the
        optimizer untouched. Saved group hyperparameters (lr, momentum, …) replace the current
        ones. Under FSDP2 a ``torch.distributed.checkpoint`` state carries no ``gum`` section: the
        global step is then the targets' own step count.
        """
        meta, groups = self._check_saved_groups(state_dict, ("rank", "lowrank", "update_interval"))
        self._check_saved_layout(meta, merged_ok=False)
        self._check_saved_modes(meta)
        saved = self._saved_entry_states(state_dict)
        if meta is not None:
            for key, mine in (("seed", self.seed), ("gamma", self.gamma), ("num_targets", self.num_targets)):
                if meta.get(key) != mine:
                    raise ValueError(f"Invalid state_dict: {key}={meta.get(key)!r}, optimizer has {key}={mine!r}")
            step = meta.get("step")
        else:
            step = max((st.get("step", 0) for i, st in saved.items() if isinstance(st, dict)), default=0)
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"Invalid state_dict: gum step={step!r}")

        def prepare(e: _GumEntry, st: dict) -> dict:
            self._check_entry_state(e, st, step)
            return st

        self._install_state(self._load_entry_states(state_dict, prepare), groups, meta)
        self._step = step
        self._mask_cache = None

    def _check_entry_state(self, e: _GumEntry, st: dict, global_step: int) -> None:
        step = st.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= global_step:
            raise ValueError(f"Invalid state_dict: {e.name} step={step!r}")
        if e.lowrank:
            period = st.get("period")
            last = refresh_index(max(global_step - 1, 0), self.update_interval)
            if isinstance(period, bool) or not isinstance(period, int) or not 0 <= period <= last:
                raise ValueError(f"Invalid state_dict: {e.name} period={period!r} (global step {global_step})")
            drawn = bool(draw_layers(self.seed, self.num_targets, self.gamma, period)[e.target])
            expect = {}
            if e.owner == self._layout.rank:
                expect["momentum_buffer"] = (e.s, e.l) if drawn else (e.r, e.l)
            if self.q < 1.0:
                expect["P"] = (e.p_rows[1] - e.p_rows[0], e.r)
            ints = ("step", "period")
        else:
            expect = {"exp_avg": self._layout.dense_shape(e), "exp_avg_sq": self._layout.dense_shape(e)}
            ints = ("step",)
        missing = sorted(set(expect) - set(st))
        if missing:
            raise ValueError(f"Invalid state_dict: {e.name} lacks {missing}")
        self._check_state_tensors(e, st, expect, ints)


def _clipped(Y: Tensor, clip: float) -> Tensor:
    return Y if clip == 1.0 else Y * clip
