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
``rank >= s``) gets AdamW with the arithmetic of :mod:`plumage_ds.optim.adam`,
identical to :class:`~plumage_ds.optim.PlumageAdamW`'s dense path.

The step is written as phases over lists through a distributor, as in
:class:`~plumage_ds.optim.PlumageAdamW`; only the single-process
:class:`~plumage_ds.optim.LocalDistributor` is supported for now.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
from torch import Tensor

from ..config import validate_lowrank_options
from ..estimators import galore_projection, orient, sample_layers, sampler_generator
from .base import CollectiveStepError, MatrixOptimizer, _Entry
from .distributor import Distributor, LocalDistributor
from .sharding import REPLICATED

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


def _check_momentum(momentum: Any) -> None:
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
        raise ValueError(f"Invalid momentum={momentum!r}: must be in [0, 1)")


def _check_gamma(gamma: Any) -> None:
    if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 1:
        raise ValueError(f"Invalid gamma={gamma!r}: must be a positive integer")


# --------------------------------------------------------------------------- optimizer


@dataclass
class _GumEntry(_Entry):
    """An :class:`~plumage_ds.optim.base._Entry` with its place in the layer draw."""

    target: int = -1  # position among the N_L targets (index into the layer-draw mask)


class GUM(MatrixOptimizer):
    """GaLore projection + Muon + layer-wise sampling (unbiased); AdamW elsewhere.

    Args:
        params: parameters or groups. A group may set ``lowrank`` (bool) and any
            per-group hyperparameter below; ``names`` (list of str, aligned with
            ``params``) labels the rows of :meth:`matrix_report`. Without
            ``lowrank``, every 2-D parameter is a target.
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
        nonfinite: ``"skip"`` (default) a step whose gradients hold NaN/Inf, counted in
            ``skipped_steps``, or ``"raise"``; either way nothing changes.
        distributor: only the single-process one is supported (default).
    """

    _entry_type = _GumEntry
    _display_name = "GUM"
    _state_section = "gum"
    _state_format = _STATE_FORMAT
    _projector_keys = ("P",)
    _supported_cases = (REPLICATED,)

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
        nonfinite: str = "skip",
        distributor: Optional[Distributor] = None,
    ) -> None:
        defaults = self._adam_defaults(lr, betas, eps, weight_decay)
        self._validate_lowrank(rank, update_interval, scale, svd_method, momentum, nesterov)
        _check_gamma(gamma)
        self._check_seed(seed)
        dist = distributor if distributor is not None else LocalDistributor()
        if dist.world_size != 1:
            raise ValueError(
                f"GUM supports a single process only (distributor world_size={dist.world_size}); "
                "its step uses the distributor phases but the multi-rank path is not implemented/tested"
            )
        defaults.update(
            rank=rank,
            update_interval=update_interval,
            momentum=momentum,
            nesterov=nesterov,
            scale=scale,
            svd_method=svd_method,
            lowrank=None,
        )
        self.gamma = gamma
        self._targets: list[_GumEntry] = []
        self._step = 0  # optimizer steps taken (global: periods and draws are global)
        self._mask_cache: tuple[int, Tensor] | None = None
        super().__init__(params, defaults, seed=seed, strict=strict, distributor=dist, nonfinite=nonfinite)

    # ------------------------------------------------------------------ setup

    @staticmethod
    def _validate_lowrank(rank, update_interval, scale, svd_method, momentum, nesterov) -> None:
        validate_lowrank_options(
            rank=rank,
            update_interval=update_interval,
            estimator="galore",
            scale=scale,
            dinv_placement="none",
            svd_method=svd_method,
        )
        _check_momentum(momentum)
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

    @staticmethod
    def _logical_shape(p: Tensor) -> tuple:
        """``p``'s own shape: GUM does not support ZeRO-3 placeholders."""
        return tuple(p.shape)

    def _build_entries(self) -> None:
        entries = self._plan_entries()
        n_targets = 0
        for e in entries:
            if e.lowrank:
                e.target = n_targets
                n_targets += 1
        intervals = sorted({e.group["update_interval"] for e in entries if e.lowrank})
        if len(intervals) > 1:
            raise ValueError(
                f"Invalid update_interval: GUM's layer draw is global, so every group holding target "
                f"matrices needs the same update_interval; got {intervals}"
            )
        q = sampling_probability(n_targets, self.gamma) if n_targets else 0.0
        costs, state_bytes = [], []
        for e in entries:
            if e.lowrank:
                costs.append(float(e.s * e.s * e.l) + 10.0 * e.s * e.s * e.l)
                state_bytes.append(int(4 * (e.s * e.r + q * e.s * e.l + (1 - q) * e.r * e.l)))
            else:
                costs.append(2.0 * e.param.numel())
                state_bytes.append(2 * e.param.numel() * 4)
        owners = self._distributor.assign_owners(costs, state_bytes)
        for e, o in zip(entries, owners):
            e.owner = o
        self._entries = entries
        self._targets = [e for e in entries if e.lowrank]
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
        return self._step // self.update_interval

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
        """One row per parameter: name, shape, mode, reason, owner, and ``drawn``.

        ``drawn`` (targets only, ``None`` otherwise) is the branch of the current
        period: ``True`` full-rank residual, ``False`` low-rank.
        """
        mask = self.drawn_mask()
        return [
            {**self._report_row(e), "drawn": bool(mask[e.target]) if e.lowrank else None}
            for e in self._entries
        ]

    def state_bytes(self) -> dict:
        """Optimizer-state bytes held by this rank, measured from the tensors.

        ``projectors``: ``P`` of the targets; ``moments``: their momentum buffers
        (``(s, l)`` for drawn, ``(r, l)`` for the others); ``non_target``: AdamW
        moments.
        """
        return super().state_bytes()

    # ------------------------------------------------------------------ step

    def _run_step(self) -> None:
        dist = self._distributor
        split = self._begin_step()
        if split is None:
            return
        targets, dense = split
        k = self._step // self.update_interval
        q = self.q
        mask = self.drawn_mask(k)
        grad32 = self._grad32
        staged: dict[int, dict] = {}

        def current(e: _GumEntry, key: str) -> Optional[Tensor]:
            new = staged.get(e.index, {})
            return new[key] if key in new else self.state.get(e.param, {}).get(key)

        # -- phase 1: period start: projectors, momentum reset (staged) --------------
        # A target refreshes when its state belongs to an earlier period: at the
        # boundary step, or at its first step with a gradient within the period.
        refresh = [e for e in targets if self.state.get(e.param, {}).get("period") != k]
        if refresh:
            self._refresh(refresh, k, q, mask, grad32, staged)

        # -- phase 2: branch inputs to owners --------------------------------------
        # Drawn (and q == 1): the full oriented gradient, the residual is formed on
        # the owner. Low-rank: Pᵀ G_o is linear, so it is formed before the reduction.
        local = []
        for e in targets:
            G_o = orient(grad32(e), e.left)  # (s, l)
            if bool(mask[e.target]):
                local.append(G_o)
            else:
                local.append(current(e, "P").mT @ G_o)  # (r, l)
        reduced = dist.reduce_to_owners(local, [e.owner for e in targets], "gum_grad")
        g_owned = dist.reduce_to_owners([grad32(e) for e in dense], [e.owner for e in dense], "dense_grad")

        # -- phase 3: Muon on owners (targets), AdamW on owners (others), out of place --
        O_out: list[Optional[Tensor]] = []
        for e, Y in zip(targets, reduced):
            if Y is None:
                O_out.append(None)
                continue
            g = e.group
            drawn = bool(mask[e.target])
            if drawn:
                X = gum_input(Y, current(e, "P"), True, q)
            else:
                X = Y / (1.0 - q)  # == gum_input(G_o, P, False, q) for the averaged G_o
            mu = g["momentum"]
            M = current(e, "momentum_buffer").mul(mu).add_(X)
            staged.setdefault(e.index, {})["momentum_buffer"] = M
            U = X.add(M, alpha=mu) if g["nesterov"] else M
            O = newton_schulz5(U)
            O.mul_(update_coefficient(g["lr"], g["scale"], e.param.shape))
            O_out.append(O)
        new_dense = self._dense_adamw(dense, g_owned, 1.0, staged)

        # -- phase 4: updates to every rank, then commit ---------------------------
        shapes = [(e.s, e.l) if bool(mask[e.target]) else (e.r, e.l) for e in targets]
        O_all = dist.gather_from_owners(O_out, shapes, [e.owner for e in targets], "gum_update")
        W_all = dist.gather_from_owners(new_dense, [tuple(e.param.shape) for e in dense], [e.owner for e in dense], "dense_update")
        deltas = [orient(lift(O, current(e, "P"), bool(mask[e.target])), e.left) for e, O in zip(targets, O_all)]
        self._commit(targets + dense, staged)
        for e, delta in zip(targets, deltas):
            self._apply_matrix_update(e.param, delta, e.group["lr"] * e.group["weight_decay"])
        for e, W in zip(dense, W_all):
            e.param.copy_(W)
        self._step += 1

    def _refresh(self, refresh: list[_GumEntry], k: int, q: float, mask: Tensor, grad32, staged: dict) -> None:
        """Stage period ``k`` for ``refresh``: GaLore ``P`` (unless ``q == 1``), zero momentum.

        The previous period's buffers are replaced, so full-size momentum exists
        only for this period's drawn targets. Collectives: full gradients to owners
        (``refresh_grad``), ``P`` from owners to everyone (``projector``). A failed SVD on
        any owner raises :class:`~plumage_ds.optim.base.CollectiveStepError` on every rank.
        """
        dist = self._distributor
        me = dist.rank
        need_p = [e for e in refresh if q < 1.0]
        full = dist.reduce_to_owners([grad32(e) for e in need_p], [e.owner for e in need_p], "refresh_grad")
        mine: list[Optional[Tensor]] = []
        error = None
        for e, G in zip(need_p, full):
            if G is None:
                mine.append(None)
                continue
            try:
                mine.append(galore_projection(G, e.r, svd_method=e.group["svd_method"]).P)
            except Exception as err:  # noqa: BLE001 - agreed on below, raised on every rank
                error = error or f"refresh of {e.name!r} failed: {type(err).__name__}: {err}"
                mine.append(torch.zeros(e.s, e.r, device=G.device))
        got = dist.gather_from_owners(mine, [(e.s, e.r) for e in need_p], [e.owner for e in need_p], "projector")
        error = dist.agree_error(error, "refresh")
        if error is not None:
            raise CollectiveStepError(f"GUM step failed ({error}); parameters and optimizer state are unchanged")
        P_by_index = {e.index: P for e, P in zip(need_p, got)}
        for e in refresh:
            new = staged.setdefault(e.index, {})
            new["P"] = None  # dropped unless this period has one
            new["momentum_buffer"] = None
            if e.index in P_by_index:
                new["P"] = P_by_index[e.index].to(device=e.param.device, dtype=torch.float32).contiguous()
            if e.owner == me:
                shape = (e.s, e.l) if bool(mask[e.target]) else (e.r, e.l)
                new["momentum_buffer"] = torch.zeros(shape, dtype=torch.float32, device=e.param.device)
            new["period"] = k

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """Tensors and plain scalars only (``torch.load(weights_only=True)`` safe).

        ``state[i]`` holds parameter ``i``'s state: targets ``step``, ``period``
        (ints), ``P`` and ``momentum_buffer``; others ``step``, ``exp_avg``,
        ``exp_avg_sq``. The drawn set is not stored: :func:`draw_layers` re-derives
        it from ``gum.seed``/``gamma`` and the period. ``gum.step`` is the global
        step counter that places periods.
        """
        return self._state_dict_with({
            "format": _STATE_FORMAT,
            "seed": self.seed,
            "gamma": self.gamma,
            "step": self._step,
            "num_targets": self.num_targets,
        })

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a :meth:`state_dict` of an identically configured optimizer.

        Validates everything first (section format, group count and sizes,
        hyperparameters that shape the state, seed, γ, modes, ownership, every
        tensor's shape against the branch its period's draw implies) and only then
        replaces the state, so a bad checkpoint leaves the optimizer untouched.
        Saved group hyperparameters (lr, momentum, …) replace the current ones.
        """
        meta, groups = self._check_saved_groups(state_dict, ("rank", "lowrank", "update_interval"))
        if meta["world_size"] != self._distributor.world_size or meta["ownership"] != self.ownership():
            raise ValueError(f"Invalid state_dict: saved for world_size={meta['world_size']} with a different ownership plan")
        self._check_saved_modes(meta)
        for key, mine in (("seed", self.seed), ("gamma", self.gamma), ("num_targets", self.num_targets)):
            if meta.get(key) != mine:
                raise ValueError(f"Invalid state_dict: {key}={meta.get(key)!r}, optimizer has {key}={mine!r}")
        step = meta.get("step")
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
            last = max(global_step - 1, 0) // self.update_interval
            if isinstance(period, bool) or not isinstance(period, int) or not 0 <= period <= last:
                raise ValueError(f"Invalid state_dict: {e.name} period={period!r} (global step {global_step})")
            drawn = bool(draw_layers(self.seed, self.num_targets, self.gamma, period)[e.target])
            expect = {"momentum_buffer": (e.s, e.l) if drawn else (e.r, e.l)}
            if self.q < 1.0:
                expect["P"] = (e.s, e.r)
            ints = ("step", "period")
        else:
            expect = {"exp_avg": tuple(e.param.shape), "exp_avg_sq": tuple(e.param.shape)}
            ints = ("step",)
        missing = sorted(set(expect) - set(st))
        if missing:
            raise ValueError(f"Invalid state_dict: {e.name} lacks {missing}")
        self._check_state_tensors(e, st, expect, ints)
