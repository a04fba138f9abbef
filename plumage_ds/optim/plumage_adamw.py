"""``PlumageAdamW``: Adam on one-sided low-rank projections of target matrices.

For each target matrix ``W`` (``m × n``, oriented to ``(s, l)`` with the short side first, see
:mod:`plumage_ds.estimators.spectral`):

* every ``τ = update_interval`` steps (refresh), one rank (the matrix's *owner*) builds ``P``
  # (s, r) and ``d``  # (r,) from the averaged gradient (PLUMAGE: SVD → min-variance
  probabilities → systematic sample; GaLore: top-r; Haar: random orthonormal, no gradient
  needed; optimal: the owner's ``Σ``  # (s, s) ← running mean of ``G_o G_oᵀ`` over refreshes,
  then ``π ∝ √λ(Σ)`` → systematic sample) and, if ``realign``, the moments move to the new basis
  (``M ← BM``, ``V ← (B∘B)V``, ``B = P_newᵀ P_old``);
* every step: ``R = Pᵀ G_o``  # (r, l) (times ``D⁻¹`` for ``dinv_placement="coords"``), Adam on
  ``R`` gives ``N``  # (r, l) (times ``D⁻¹`` for ``"lift"``), and
  ``W ← W·(1 − lr·wd) − step_size·scale·P N``.

Everything else (1-D parameters, groups with ``lowrank=False``, matrices whose ``rank >= s``)
gets AdamW with the same arithmetic (:mod:`plumage_ds.optim.adam`).

The math is written once; where each piece lives depends on the parameter's sharding case
(:mod:`plumage_ds.optim.sharding`), and each case has its own projection/lift functions on
this rank's local views:

* ``*_replicated`` (plain tensors; ZeRO-3 chunks reuse them): every rank holds ``P``; the
  owner holds ``M, V`` ``(r, l)``; ``R_k = Pᵀ G_k`` is reduced to the owner and ``N`` gathered
  back; dense parameters are cut in ``W`` flat chunks, rank ``k`` holds the AdamW moments of
  chunk ``k`` (reduce-scatter of the gradients, all-gather of the updated chunks)
  (:class:`LocalDistributor`: all on one process);
* ``*_fsdp`` (FSDP2 rows ``W_k``, ``G_k``): left projection (``m < n``): ``P_k`` = this rank's
  rows of ``P``, ``Σ_k P_kᵀ G_k`` reduce-scattered by columns, ``M, V`` ``(r, n/S)``, ``N``
  all-gathered, ``ΔW_k = P_k N``; right projection (``m >= n``): ``R_k = (G_k P)ᵀ`` is local,
  ``M, V`` ``(r, m_k)`` follow the weight's rows, ``ΔW_k = (P N_k)ᵀ``; ``P`` ``(n, r)`` row-sharded
  and all-gathered each step (``right_projectors="sharded"``) or kept whole on every rank
  (``"replicated"``: no optimizer communication on ordinary steps). Compressed HSDP averages
  ``R`` (not ``G``) across replicas.

The arithmetic runs on lists (:mod:`plumage_ds.optim.batched`: ``_foreach`` ops, same-shape
products and decompositions stacked where the device gains from it).

A step is atomic: new ``P, d, M, V`` and weights are staged and committed after the step's
last collective; a refresh failure on any rank raises :class:`CollectiveStepError` on every
rank with nothing changed. Sampling uses a generator seeded from
``(seed, matrix_id, refresh_index)``: the same draw on every rank and world size, and resuming
needs no RNG state beyond the step counters.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import torch
from torch import Tensor

from ..config import RIGHT_PROJECTORS, validate_lowrank_options
from ..estimators import (
    get_estimator, gram_basis, optimal_basis, orient, sampler_generator, second_moment_from_gram, short_side_basis,
)
from ..estimators.registry import estimator_problem, resolve_realign
from .adam import adam_step_size
from .base import CollectiveStepError, MatrixOptimizer, _Entry
from .batched import (
    DECOMPOSITION_STACK_ELEMENTS, adam_direction_foreach, adam_moments_foreach, apply_lifts, group_indices, matmuls,
    sq_norm_sum, stack_plan,
)
from .distributor import Distributor
from .sharding import FSDP_ROWS, REPLICATED, ZERO3_FLAT, chunk_bounds, local

_LOWRANK_KEYS = (
    "rank", "update_interval", "estimator", "scale", "dinv_placement", "realign", "svd_method", "uniform_mix"
)
_STATE_FORMAT = 1
EVERY_RANK = -1
"""``owner`` of a dense parameter: no single owner, every rank holds a piece of its state (flat
chunks for replicated weights, rows under FSDP2)."""


# ============================================================================ replicated case
# Every rank holds the whole weight and P (s, r); the owner holds M, V (r, l).


def _projectors_replicated(dist, entries: list[_Entry], P_local: list[Tensor]) -> list[Tensor]:
    """The ``P`` each rank projects with: its own (whole) copy."""
    return P_local


def _compress_replicated(dist, entries, grads, P_use, averaged, projected) -> list[Optional[Tensor]]:
    """``R̄ = mean_k Pᵀ G_k``  # (r, l), on the owner (one reduce-scatter over owner segments).

    ``projected[i]``: ``Pᵀ G_k`` already formed during backward (``backward_projection``)."""
    todo = [i for i, R_k in enumerate(projected) if R_k is None]
    R = list(projected)
    for i, R_k in zip(todo, matmuls([P_use[i].mT for i in todo], [orient(grads[i], entries[i].left) for i in todo])):
        R[i] = R_k
    return dist.reduce_to_owners(R, [e.owner for e in entries], "lowrank_grad")


def _lift_replicated(dist, entries, N_owned, P_use) -> list[tuple[Tensor, Tensor]]:
    """``ΔW = deorient(P N) = A B``  # (m, n) on every rank, ``N`` all-gathered from the owners:
    ``(A, B) = (P, N)`` for left projections, ``(Nᵀ, Pᵀ)`` for right ones (applied at commit)."""
    N_all = dist.gather_from_owners(N_owned, [(e.r, e.l) for e in entries], [e.owner for e in entries], "lowrank_update")
    return [(P, N) if e.left else (N.mT, P.mT) for e, N, P in zip(entries, N_all, P_use)]


def _reduce_dense_replicated(dist, entries, grads) -> list[Tensor]:
    """This rank's flat chunk of every averaged dense gradient (one reduce-scatter, ZeRO-1/2 style)."""
    return dist.reduce_scatter_flat(grads, "dense_grad")


def _gather_dense_replicated(dist, entries, new_W) -> list[Tensor]:
    """Every dense weight reassembled from the ranks' updated chunks (one all-gather)."""
    return dist.all_gather_flat(new_W, [e.shape for e in entries], "dense_update")


def _refresh_basis_replicated(dist, entries, grads) -> list[Optional[tuple]]:
    """Owner: ``("grad", G)`` with the averaged full gradient (``refresh_grad``); ``None`` elsewhere."""
    full = dist.reduce_to_owners(grads, [e.owner for e in entries], "refresh_grad")
    return [None if G is None else ("grad", G) for G in full]


def _share_projectors_replicated(dist, entries, new_on_owner) -> list[tuple[Tensor, Tensor]]:
    """Every rank receives the owner's whole ``[P, d]`` (one all-gather over owner segments)."""
    packed = [None if x is None else torch.cat([x[0].reshape(-1), x[1]]) for x in new_on_owner]
    got = dist.gather_from_owners(packed, [(e.s * e.r + e.r,) for e in entries], [e.owner for e in entries], "projector")
    return [(f[: e.s * e.r].reshape(e.s, e.r).clone(), f[e.s * e.r :].clone()) for e, f in zip(entries, got)]


def _realignment_replicated(dist, entries, P_new, P_old) -> list[Optional[Tensor]]:
    """``B = P_newᵀ P_old``  # (r, r), on the owner (the only rank with moments)."""
    mine = [i for i, e in enumerate(entries) if e.owner == dist.rank]
    B: list = [None] * len(entries)
    for i, b in zip(mine, matmuls([P_new[i].mT for i in mine], [P_old[i] for i in mine])):
        B[i] = b
    return B


# ============================================================================ FSDP2 rows case
# This rank holds rows W_k, G_k; P rows e.p_rows; M, V columns e.cols of (r, l).


def _projectors_fsdp(dist, entries, P_local) -> list[Tensor]:
    """Left: this rank's rows ``P_k``; right: the whole ``P`` (all-gathered when row-sharded)."""
    gather = [i for i, e in enumerate(entries) if not e.left and e.p_rows != (0, e.s)]
    full = dist.all_gather_rows([P_local[i] for i in gather], [entries[i].s for i in gather], "projector_gather")
    out = list(P_local)
    for i, P in zip(gather, full):
        out[i] = P
    return out


def _compress_fsdp(dist, entries, grads, P_use, averaged, projected) -> list[Tensor]:
    """This rank's columns of ``R̄ = Pᵀ G_o`` (averaged across replicas under compressed HSDP).

    Left: ``Σ_k P_kᵀ G_k`` reduce-scattered by columns ``(r, n/S)``. Right: ``(G_k P)ᵀ``
    ``(r, m_k)`` is already this rank's columns. Collectives: one reduce-scatter (shard group),
    one all-reduce of the compressed pieces (replicate group).
    """
    left = [i for i, e in enumerate(entries) if e.left]
    right = [i for i, e in enumerate(entries) if not e.left]
    R: list = [None] * len(entries)
    partial = matmuls([P_use[i].mT for i in left], [grads[i] for i in left])  # (r, n) partial sums
    for i, part in zip(left, dist.reduce_scatter_cols(partial, "lowrank_grad")):
        R[i] = part
    for i, GP in zip(right, matmuls([grads[i] for i in right], [P_use[i] for i in right])):
        R[i] = GP.mT  # (r, m_k)
    sync = [i for i in range(len(entries)) if not averaged[i]]
    for i, t in zip(sync, dist.replica_mean([R[i] for i in sync], "lowrank_grad")):
        R[i] = t
    return R


def _lift_fsdp(dist, entries, N_owned, P_use) -> list[tuple[Tensor, Tensor]]:
    """``ΔW_k = A B``  # (m_k, n): left ``P_k N`` (``N`` all-gathered by columns), right ``N_kᵀ Pᵀ = (P N_k)ᵀ``."""
    left = [i for i, e in enumerate(entries) if e.left]
    N_full = dist.all_gather_cols([N_owned[i] for i in left], [entries[i].l for i in left], "lowrank_update")
    factors: list = [None] * len(entries)
    for i, N in zip(left, N_full):
        factors[i] = (P_use[i], N)
    for i, e in enumerate(entries):
        if not e.left:
            factors[i] = (N_owned[i].mT, P_use[i].mT)
    return factors


def _reduce_dense_fsdp(dist, entries, grads) -> list[Tensor]:
    return dist.replica_mean(grads, "dense_grad")


def _gather_dense_fsdp(dist, entries, new_W) -> list[Tensor]:
    return new_W


def _refresh_basis_fsdp(dist, entries, grads) -> list[Optional[tuple]]:
    """Owner: ``("gram", G_oG_oᵀ)`` for right projections with the Gram route (Gram matrices of
    the row shards summed, float64), else ``("grad", G)`` (rows gathered, one all-to-all)."""
    gram = [i for i, e in enumerate(entries) if not e.left and e.group["svd_method"] == "gram"]
    rows = [i for i in range(len(entries)) if i not in set(gram)]
    out: list = [None] * len(entries)
    G64 = [grads[i].double() for i in gram]
    owners = [entries[i].owner for i in gram]
    partial = matmuls([G.mT for G in G64], G64)
    for i, S in zip(gram, dist.reduce_to_owners(partial, owners, "refresh_gram", mean=False)):
        out[i] = None if S is None else ("gram", S)
    full = dist.gather_rows_to_owners([grads[i] for i in rows], [entries[i].shape[0] for i in rows],
                                      [entries[i].owner for i in rows], "refresh_grad")
    for i, G in zip(rows, full):
        out[i] = None if G is None else ("grad", G)
    return out


def _share_projectors_fsdp(dist, entries, new_on_owner) -> list[tuple[Tensor, Tensor]]:
    """Each rank receives its rows of the owner's ``P`` and the whole ``d`` (one all-to-all)."""
    W = dist.world_size
    bounds = [[_p_rows(e, k, W) for k in range(W)] for e in entries]
    return dist.scatter_rows_from_owners(
        [None if x is None else x[0] for x in new_on_owner],
        [None if x is None else x[1] for x in new_on_owner],
        bounds, [(e.s, e.r) for e in entries], [e.owner for e in entries], "projector",
    )


def _realignment_fsdp(dist, entries, P_new, P_old) -> list[Tensor]:
    """``B = Σ_k P_new,kᵀ P_old,k``  # (r, r): summed over the shard group where ``P`` is row-sharded."""
    B = matmuls([Pn.mT for Pn in P_new], list(P_old))
    split = [i for i, e in enumerate(entries) if e.p_rows != (0, e.s)]
    for i, t in zip(split, dist.all_reduce_sum([B[i] for i in split], "realign")):
        B[i] = t
    return B


def _route(e: _Entry, kind: str) -> str:
    """How the owner decomposes ``e``'s refresh input: ``"sigma"`` (eigh of its updated ``Σ``),
    ``"svd"`` (``svd`` of ``G``) or ``"gram"`` (eigh of ``G_o G_oᵀ``)."""
    if get_estimator(e.group["estimator"]).keeps_second_moment:
        return "sigma"
    return "svd" if kind == "grad" and e.group["svd_method"] == "svd" else "gram"


def _p_rows(e: _Entry, k: int, S: int) -> tuple[int, int]:
    """Rows of ``P`` held by shard rank ``k`` (the weight's rows for left projections)."""
    if e.p_rows == (0, e.s) and not e.left:  # right projector kept whole on every rank
        return (0, e.s)
    return chunk_bounds(e.s, S, k)


_CASES = {
    REPLICATED: dict(
        projectors=_projectors_replicated, compress=_compress_replicated, lift=_lift_replicated,
        reduce_dense=_reduce_dense_replicated, gather_dense=_gather_dense_replicated,
        refresh_basis=_refresh_basis_replicated, share_projectors=_share_projectors_replicated,
        realignment=_realignment_replicated,
    ),
    FSDP_ROWS: dict(
        projectors=_projectors_fsdp, compress=_compress_fsdp, lift=_lift_fsdp,
        reduce_dense=_reduce_dense_fsdp, gather_dense=_gather_dense_fsdp,
        refresh_basis=_refresh_basis_fsdp, share_projectors=_share_projectors_fsdp,
        realignment=_realignment_fsdp,
    ),
}
_CASES[ZERO3_FLAT] = _CASES[REPLICATED]  # full local gradients; ΔW lands on this rank's flat chunk


class PlumageAdamW(MatrixOptimizer):
    """AdamW with PLUMAGE / GaLore / Haar–Stiefel low-rank projection of target matrices.

    Works like ``torch.optim.AdamW``: build it on ``model.parameters()`` (or groups, e.g. from
    :func:`~plumage_ds.optim.lowrank_param_groups`) — after ``fully_shard`` under FSDP2, where
    the state is then sharded like the weights.

    Args:
        params: parameters or groups. A group may set ``lowrank`` (bool) and any
            hyperparameter below; ``names`` (list of str, aligned with ``params``)
            labels the rows of :meth:`matrix_report`. Without ``lowrank``, every
            2-D parameter is a target.
        lr, betas, eps, weight_decay: Adam hyperparameters (eps as in GaLore:
            ``M/(sqrt(V)+eps)``); weight decay is decoupled.
        rank: ``r``, number of directions kept per matrix.
        update_interval: ``τ``, steps between refreshes of ``P``.
        estimator: ``"plumage"`` (unbiased, min-variance for the refresh gradient),
            ``"galore"`` (top-r, biased), ``"haar"`` (uniform random orthonormal, unbiased) or
            ``"optimal"`` (unbiased, min-variance for gradients with the second moment ``Σ``
            that the owner keeps: the mean of ``G_o G_oᵀ`` over refresh gradients, float64
            ``(s, s)`` per matrix, in ``state_dict()`` as ``Sigma`` and ``sigma_count``).
        scale: lift scale ``α`` applied to ``P N``.
        dinv_placement: where ``D⁻¹`` enters: ``"coords"``, ``"lift"`` or ``"none"``.
        realign: realign moments when ``P`` changes (``None``: on for plumage/haar,
            off for galore, as GaLore does not).
        svd_method: ``"gram"`` (eigh of the short-side Gram matrix) or ``"svd"``;
            ``None``: the estimator's default (``svd`` for GaLore, whose moments keep
            the singular vectors' signs; ``gram`` otherwise; see the estimator registry;
            ``optimal`` decomposes ``Σ`` and takes ``gram`` only).
        uniform_mix: PLUMAGE and optimal: mix ε of uniform probability into the
            sampling design so no direction has ``p = 0`` (keeps the estimate
            unbiased for later gradients between refreshes; 0 = the paper's design).
        seed: sampler seed.
        strict: raise instead of falling back to AdamW for a target matrix that
            cannot take the low-rank path.
        max_grad_norm: if > 0, clip by the global norm of what the optimizer
            uses: ``sqrt(Σ_targets ‖R̄‖² + Σ_others ‖ḡ‖²)`` with ``R̄`` the
            (averaged) projected gradient and ``ḡ`` the averaged dense gradient.
        nonfinite: ``"skip"`` (default: a step whose gradients hold NaN/Inf on any rank is
            skipped on every rank and counted in ``skipped_steps``) or ``"raise"``.
        backward_projection: replicated/ZeRO-3 weights: project each target's gradient to
            ``Pᵀ G_o`` (``r × l``) as soon as backward accumulates it and drop the full gradient
            (``p.grad`` is then ``None``), except before a refresh, which needs the full
            gradient. Target-gradient memory between backward and ``step()`` falls from
            ``m·n`` to ``r·l`` per matrix on ordinary steps; the trajectory is unchanged (the
            projection is linear). Call ``zero_grad()`` (as usual) before each backward.
        right_projectors: FSDP2 only, right-projected matrices (``m >= n``): ``"sharded"``
            (default: ``P`` ``(n, r)`` row-sharded, state per rank ~1/S, one all-gather of ``P``
            per step) or ``"replicated"`` (whole ``P`` on every rank, no optimizer
            communication on ordinary steps).
        collective_timeout: seconds any collective of the step may wait (0: the process
            group's timeout); a timeout raises ``CollectiveTimeoutError`` naming the collective.
        replicate_group: FSDP2 only: compressed HSDP. ``fully_shard`` ran on the shard
            sub-mesh; the optimizer averages across this group itself, target matrices as
            their ``r × l`` projections.
        distributor: where state lives for plain tensors (default: this process owns
            everything; see :class:`~plumage_ds.distributed.ShardedPlumageAdamW`).
    """

    _display_name = "PlumageAdamW"
    _state_section = "plumage"
    _state_format = _STATE_FORMAT
    _projector_keys = ("P", "d")
    _second_moment_keys = ("Sigma",)
    _state_dtypes = {"Sigma": torch.float64}
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
        estimator: str = "plumage",
        scale: float = 1.0,
        dinv_placement: str = "none",
        realign: Optional[bool] = None,
        svd_method: Optional[str] = None,
        uniform_mix: float = 0.0,
        seed: int = 0,
        strict: bool = False,
        max_grad_norm: float = 0.0,
        nonfinite: str = "skip",
        right_projectors: str = "sharded",
        backward_projection: bool = False,
        collective_timeout: float = 0.0,
        replicate_group=None,
        distributor: Optional[Distributor] = None,
    ) -> None:
        defaults = self._adam_defaults(lr, betas, eps, weight_decay)
        if svd_method is None and estimator_problem(estimator, "lowrank_adam") is None:
            svd_method = get_estimator(estimator).default_svd_method or "gram"  # haar takes no SVD
        defaults.update(
            rank=rank,
            update_interval=update_interval,
            estimator=estimator,
            scale=scale,
            dinv_placement=dinv_placement,
            realign=realign,
            svd_method=svd_method,
            uniform_mix=uniform_mix,
            lowrank=None,
        )
        self._validate_group(defaults)
        if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)) or not max_grad_norm >= 0 or not math.isfinite(max_grad_norm):
            raise ValueError(f"Invalid {max_grad_norm=}: must be a finite number >= 0 (0 disables clipping)")
        if right_projectors not in RIGHT_PROJECTORS:
            raise ValueError(f"Invalid {right_projectors=}: must be one of {list(RIGHT_PROJECTORS)}")
        self._check_bool("backward_projection", backward_projection)
        self.backward_projection = backward_projection
        self._hooks: list = []
        self.max_grad_norm = float(max_grad_norm)
        self.right_projectors = right_projectors
        # Optional callable: this rank's share of the squared norm of gradients that
        # another optimizer applies (e.g. DeepSpeed's ZeRO partitions), so that one
        # global norm clips both; after step(), ``last_clip_coef`` is the factor used.
        self.external_grad_sq_norm = None
        self.last_clip_coef = 1.0
        self.last_grad_norm: Optional[float] = None
        super().__init__(
            params, defaults, seed=seed, strict=strict, distributor=distributor, nonfinite=nonfinite,
            replicate_group=replicate_group, collective_timeout=collective_timeout,
        )

    # ------------------------------------------------------------------ setup

    def _validate_group(self, g: dict) -> None:
        validate_lowrank_options(**{k: g[k] for k in _LOWRANK_KEYS if k != "realign"})
        spec = get_estimator(g["estimator"])
        if not spec.in_optimizer:
            raise ValueError(
                f"Invalid estimator={g['estimator']!r}: available in the DDP comm hook only "
                "(plumage_ds.distributed.comm_hook)"
            )
        if spec.keeps_second_moment and g["svd_method"] != "gram":
            raise ValueError(
                f"Invalid svd_method={g['svd_method']!r}: estimator {spec.name!r} decomposes its second moment Σ "
                "(eigh), not G; leave svd_method=None"
            )
        if g["realign"] is not None and not isinstance(g["realign"], bool):
            raise ValueError(f"Invalid realign={g['realign']!r}: must be True, False or None")
        if g.get("lowrank") is not None and not isinstance(g["lowrank"], bool):
            raise ValueError(f"Invalid lowrank={g['lowrank']!r}: must be True, False or None")

    def _target_mode(self, group: dict) -> str:
        return group["estimator"]

    def _options(self) -> dict:
        return {
            **super()._options(), "max_grad_norm": self.max_grad_norm, "right_projectors": self.right_projectors,
            "backward_projection": self.backward_projection,
        }

    def _plan_fsdp_layout(self, e: _Entry, dist) -> None:
        super()._plan_fsdp_layout(e, dist)
        if not e.left and self.right_projectors == "replicated":
            e.p_rows = (0, e.s)

    def _build_entries(self) -> None:
        entries = self._plan_entries()
        self._register_projection_hooks(entries)
        # Each target matrix has an owner (its SVD and moments); dense parameters have none:
        # every rank holds a piece of their state (flat chunks, or FSDP2 rows).
        targets = [e for e in entries if e.lowrank]
        costs, state_bytes = [], []
        for e in targets:
            svd_cost = float(e.s * e.s * e.l) if get_estimator(e.group["estimator"]).needs_gradient else 0.0
            costs.append(svd_cost + 2.0 * e.r * e.l)
            sigma_bytes = 8 * e.s * e.s if get_estimator(e.group["estimator"]).keeps_second_moment else 0
            state_bytes.append(2 * e.r * e.l * 4 + sigma_bytes)
        for e, o in zip(targets, self._distributor.assign_owners(costs, state_bytes)):
            e.owner = o
        for e in entries:
            if not e.lowrank:
                e.owner = EVERY_RANK
        self._entries = entries

    def _register_projection_hooks(self, entries: list[_Entry]) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if not self.backward_projection:
            return
        for e in entries:
            if e.lowrank and e.case == FSDP_ROWS:
                raise ValueError(
                    f"Invalid backward_projection=True for {e.name!r}: FSDP2 already hands each rank 1/W of the "
                    "gradient (reduce-scattered rows); the option is for replicated and ZeRO-3 weights"
                )
            if e.lowrank:
                self._hooks.append(e.param.register_post_accumulate_grad_hook(self._projection_hook(e)))

    def _projection_hook(self, e: _Entry):
        """After backward accumulates ``e``'s gradient: add ``Pᵀ G_o`` (r, l) to its accumulator, drop ``G``."""

        def hook(p: Tensor) -> None:
            st = self.state.get(p, {})
            if p.grad is None or "P" not in st or st["step"] % e.group["update_interval"] == 0:
                return  # the refresh at the start of the next step needs the whole gradient
            with torch.no_grad():
                R = st["P"].mT @ orient(p.grad.float(), e.left)  # (r, l)
                acc = self._projected.get(e.index)
                self._projected[e.index] = R if acc is None else acc.add_(R)
            p.grad = None

        return hook

    def _report_row(self, e: _Entry) -> dict:
        row = super()._report_row(e)
        if e.lowrank and e.case == FSDP_ROWS:
            row["projector"] = "rows" if e.p_rows != (0, e.s) else "replicated"
        return row

    # ------------------------------------------------------------------ step

    def _case_ops(self) -> dict:
        return _CASES[self._entries[0].case if self._entries else REPLICATED]

    def _run_step(self) -> None:
        dist = self._distributor
        plan = self._begin_step()
        if plan is None:
            return
        lowrank, dense = plan
        ops = self._case_ops()
        staged: dict[int, dict] = {}
        projected = [self._projected.get(e.index) for e in lowrank]
        grads = [None if R is not None else self._grad32(e) for e, R in zip(lowrank, projected)]
        averaged = [False] * len(lowrank)  # this step's gradient already averaged across replicas

        # -- phase 1: refresh projectors (staged) ------------------------------------
        refresh = [i for i, e in enumerate(lowrank) if self._step_of(e) % e.group["update_interval"] == 0]
        if refresh:
            self._refresh([lowrank[i] for i in refresh], [grads[i] for i in refresh], staged, ops)
            for i in refresh:
                if "G" in staged[lowrank[i].index]:
                    grads[i] = staged[lowrank[i].index].pop("G")
                    averaged[i] = True

        def current(e: _Entry, key: str) -> Tensor:
            return staged.get(e.index, {}).get(key, self.state.get(e.param, {}).get(key))

        # -- phase 2: compressed gradients to their owners, dense ones to every rank's chunk ----
        P_use = ops["projectors"](dist, lowrank, [current(e, "P") for e in lowrank])
        R_owned = ops["compress"](dist, lowrank, grads, P_use, averaged, projected)
        coords = [i for i, (e, R) in enumerate(zip(lowrank, R_owned)) if R is not None and e.group["dinv_placement"] == "coords"]
        if coords:
            scaled = torch._foreach_div([R_owned[i] for i in coords], [current(lowrank[i], "d")[:, None] for i in coords])
            for i, R in zip(coords, scaled):
                R_owned[i] = R
        g_owned = ops["reduce_dense"](dist, dense, [self._grad32(e) for e in dense])

        # -- phase 3: clipping on what the optimizer uses -------------------------
        clip = 1.0
        if self.max_grad_norm > 0:
            sq = sq_norm_sum([t for t in R_owned + g_owned if t is not None])
            if self.external_grad_sq_norm is not None:
                sq += float(self.external_grad_sq_norm())
            total_norm = math.sqrt(dist.sum_scalar(sq, "grad_norm"))
            self.last_grad_norm = total_norm
            clip = min(1.0, self.max_grad_norm / (total_norm + 1e-6))
        self.last_clip_coef = clip

        # -- phase 4: Adam on the owned pieces (out of place) ----------------------
        N_owned = self._lowrank_adam(lowrank, R_owned, clip, staged, current)
        # dense AdamW: out of place when its result still has to travel; with no collective left
        # (one rank), it runs in place at commit (same bits, no new moment tensors)
        in_place = self._dense_in_place(dense)
        dense_plan = self._dense_groups(dense, g_owned, clip) if in_place else []
        new_dense = [] if in_place else self._dense_adamw(dense, g_owned, clip, staged)

        # -- phase 5: updates to every rank (the step's last collectives) ----------
        factors = ops["lift"](dist, lowrank, N_owned, P_use)  # ΔW = A B per target
        W_all = [] if in_place else ops["gather_dense"](dist, dense, new_dense)

        # -- commit ------------------------------------------------------------------
        self._commit(lowrank + dense, staged)
        self._projected.clear()
        self._apply_matrix_updates(lowrank, factors)
        if in_place:
            self._dense_adamw_in_place(dense, dense_plan)
        for e, W in zip(dense, W_all):
            self._apply_dense(e, W)

    def _lowrank_adam(self, lowrank: list[_Entry], R_owned: list, clip: float, staged: dict, current) -> list:
        """Adam on the projected gradients this rank owns: ``N``  # (r, l_k), step size and scale
        folded in (``None`` where it owns nothing). New moments are staged, not written.
        Batched: one ``_foreach`` chain per set of equal hyperparameters and step."""
        N_owned: list[Optional[Tensor]] = [None] * len(lowrank)
        live = [i for i, R in enumerate(R_owned) if R is not None]
        keys = []
        for i in live:
            g = lowrank[i].group
            keys.append((g["lr"], g["betas"], g["eps"], g["scale"], g["dinv_placement"], self._step_of(lowrank[i])))
        for part in group_indices(keys):
            idx = [live[j] for j in part]
            lr, (beta1, beta2), eps, scale, dinv, step = keys[part[0]]
            R = [R_owned[i] for i in idx]
            if clip != 1.0:
                R = list(torch._foreach_mul(R, clip))
            es = [lowrank[i] for i in idx]
            M, V = adam_moments_foreach([current(e, "exp_avg") for e in es], [current(e, "exp_avg_sq") for e in es], R, beta1, beta2)
            N = adam_direction_foreach(M, V, eps)  # (r, l_k) each
            if dinv == "lift":
                torch._foreach_div_(N, [current(e, "d")[:, None] for e in es])
            torch._foreach_mul_(N, adam_step_size(lr, step + 1, beta1, beta2) * scale)
            for i, e, m, v, n in zip(idx, es, M, V, N):
                staged.setdefault(e.index, {}).update(exp_avg=m, exp_avg_sq=v)
                N_owned[i] = n
        return N_owned

    def _apply_matrix_updates(self, lowrank: list[_Entry], factors: list[tuple[Tensor, Tensor]]) -> None:
        """``W ← W·(1 − lr·wd) − A B`` for every target, in place (:func:`~plumage_ds.optim.batched.apply_lifts`);
        one by one through :meth:`_apply_matrix_update` where a subclass places updates itself (ZeRO-3 chunks)."""
        custom = type(self)._apply_matrix_update is not MatrixOptimizer._apply_matrix_update
        rest = []
        for i, e in enumerate(lowrank):
            if custom or e.case == ZERO3_FLAT:
                A, B = factors[i]
                self._apply_matrix_update(e.param, A @ B, e.group["lr"] * e.group["weight_decay"])
            else:
                rest.append(i)
        apply_lifts(
            [local(lowrank[i].param) for i in rest], [factors[i][0] for i in rest], [factors[i][1] for i in rest],
            [lowrank[i].group["lr"] * lowrank[i].group["weight_decay"] for i in rest],
        )

    def _dense_in_place(self, dense: list[_Entry]) -> bool:
        """Whether dense AdamW can wait for the commit and run in place: no collective follows it
        (one rank, no replicas) and every dense weight is fp32 (one rounding either way)."""
        dist = self._distributor
        return (
            dist.world_size == 1 and getattr(dist, "replica_comm", None) is None
            and all(local(e.param).dtype == torch.float32 for e in dense)
        )

    @staticmethod
    def _apply_dense(e: _Entry, W: Tensor) -> None:
        local(e.param).copy_(W)

    def _dense_piece(self, e: _Entry) -> Tensor:
        """Replicated weights: this rank's flat chunk (the weight itself when the chunk is all of it)."""
        W = local(e.param).detach()
        if e.case == FSDP_ROWS:
            return W
        a, b = self._distributor.flat_chunk(W.numel())
        return W if b - a == W.numel() else W.reshape(-1)[a:b]

    def _dense_chunk_shape(self, e: _Entry) -> tuple:
        """Shape of this rank's AdamW moments of a dense parameter (see :meth:`_dense_piece`)."""
        if e.case == FSDP_ROWS:
            return e.local_shape
        n = int(torch.Size(e.shape).numel())
        a, b = self._distributor.flat_chunk(n)
        return tuple(e.shape) if b - a == n else (b - a,)

    def _refresh(self, refresh: list[_Entry], grads: list[Tensor], staged: dict, ops: dict) -> None:
        """Stage new ``P, d`` and realigned (or fresh) moments for ``refresh``.

        SVD-based estimators: the spectral input goes to each matrix's owner (the averaged
        gradient, or for right projections of row shards the summed Gram matrix), the owner
        draws ``P, d`` and every rank receives its part. Haar: every rank draws the same ``P``
        from the shared seed, no communication. A failure on any owner is agreed on and
        raised on every rank as :class:`CollectiveStepError`, with nothing changed.
        Under compressed HSDP the refresh gradients are first averaged across replicas
        (uncompressed, every ``τ`` steps); they are then staged as ``"G"`` for this step.
        """
        dist = self._distributor
        if ops is _CASES[FSDP_ROWS]:
            grads = dist.replica_mean(grads, "refresh_grad")
            if dist.replica_comm is not None:
                for e, G in zip(refresh, grads):
                    staged.setdefault(e.index, {})["G"] = G
        need = [i for i, e in enumerate(refresh) if get_estimator(e.group["estimator"]).needs_gradient]
        svd = [refresh[i] for i in need]
        basis = ops["refresh_basis"](dist, svd, [grads[i] for i in need])
        mine = [j for j, b in enumerate(basis) if b is not None]  # this rank owns their SVD
        drawn, error = self._draw_projections([svd[j] for j in mine], [basis[j] for j in mine])
        new_on_owner: list[Optional[tuple[Tensor, Tensor]]] = [None] * len(svd)
        for j, (P, d, kept) in zip(mine, drawn):
            new_on_owner[j] = (P, d)
            if kept:  # optimal: the owner's updated Σ and its count
                staged.setdefault(svd[j].index, {}).update(kept)
        shared = ops["share_projectors"](dist, svd, new_on_owner)
        error = dist.agree_error(error, "refresh")
        if error is not None:
            for e in refresh:
                staged.pop(e.index, None)
            raise CollectiveStepError(f"{self._display_name} step failed ({error}); parameters and optimizer state are unchanged")
        new_P: dict[int, tuple[Tensor, Tensor]] = {e.index: pd for e, pd in zip(svd, shared)}
        for e in refresh:
            if e.index not in new_P:  # no gradient needed (haar): every rank draws the same P
                spec = get_estimator(e.group["estimator"])
                proj = spec.build(None, e.r, self._generator(e), short_dim=e.s, device=grads[0].device)
                a, b = e.p_rows if e.case == FSDP_ROWS else (0, e.s)
                new_P[e.index] = (proj.P[a:b].contiguous(), proj.d)

        # moments: fresh zeros, or realigned to the new basis (B = P_newᵀ P_old)
        old = [e for e in refresh if "P" in self.state.get(e.param, {})]
        realign = [e for e in old if resolve_realign(e.group["estimator"], e.group["realign"])]
        B = ops["realignment"](dist, realign, [new_P[e.index][0] for e in realign], [self.state[e.param]["P"] for e in realign])
        mine = [i for i, (e, b) in enumerate(zip(realign, B))
                if b is not None and self._holds_moments(e) and "exp_avg" in self.state[e.param]]
        st_of = [self.state[realign[i].param] for i in mine]
        BM = matmuls([B[i] for i in mine], [st["exp_avg"] for st in st_of])  # M ← B M
        BB = list(torch._foreach_mul([B[i] for i in mine], [B[i] for i in mine])) if mine else []
        BBV = matmuls(BB, [st["exp_avg_sq"] for st in st_of])
        realigned = {realign[i].index: (m, v) for i, m, v in zip(mine, BM, BBV)}  # V ← (B∘B) V
        for e in refresh:
            st = self.state.get(e.param, {})
            P, d = new_P[e.index]
            new = staged.setdefault(e.index, {})
            new.update(P=P.to(grads[0].device).contiguous(), d=d.to(grads[0].device).contiguous())
            if not self._holds_moments(e):
                continue
            if "exp_avg" not in st:
                cols = self._moment_cols(e)
                new["exp_avg"] = torch.zeros(e.r, cols, dtype=torch.float32, device=P.device)
                new["exp_avg_sq"] = torch.zeros(e.r, cols, dtype=torch.float32, device=P.device)
            elif e.index in realigned:
                new["exp_avg"], new["exp_avg_sq"] = realigned[e.index]

    def _draw_projections(self, entries: list[_Entry], basis: list[tuple]) -> tuple[list, Optional[str]]:
        """The owner's new ``(P  # (s, r), d  # (r,), kept)`` for ``entries`` and an error message (``None``
        if all went well); ``kept`` is the state to stage besides ``P, d`` (``{}`` but for ``optimal``).

        The spectra come from Gram matrices (given as ``("gram", S)``, or ``G_o G_oᵀ`` in float64 from
        ``("grad", G)`` with ``svd_method="gram"``) through ``eigh``, or from ``svd`` of ``G``. Estimators
        that keep ``Σ`` (``optimal``) first fold the Gram matrix into it (:meth:`_second_moments`) and
        decompose ``Σ`` (:func:`~plumage_ds.estimators.optimal.optimal_basis`); ``kept`` is then the new
        ``{"Sigma", "sigma_count"}``. Matrices
        go group by group (:func:`~plumage_ds.optim.batched.stack_plan`): small same-shape ones in one
        batched decomposition, big ones alone, and each group is sampled before the next is
        decomposed, so at most one group's Gram matrices and bases are alive at a time. A matrix
        whose refresh fails gets a placeholder and the first failure (named by matrix, found by
        redoing a failed group one matrix at a time) is returned, to be agreed on by every rank.
        """
        out: list = [None] * len(entries)
        if not entries:
            return out, None
        error: Optional[str] = None
        keys, sizes = [], []
        for e, (kind, X) in zip(entries, basis):
            route = _route(e, kind)
            keys.append((route, tuple(X.shape) if route == "svd" else e.s, X.device))
            sizes.append(X.numel() if route == "svd" else e.s * e.s)
        plan = stack_plan(keys, sizes, [8 * n for n in sizes], basis[0][1].device, DECOMPOSITION_STACK_ELEMENTS)
        for part in plan:
            es, bs = [entries[i] for i in part], [basis[i] for i in part]
            try:
                spectra, kept = self._decompose(es, bs)
            except Exception as err:  # noqa: BLE001 - agreed on by the caller, raised on every rank
                error = error or self._first_failure(es, bs, err)
                spectra, kept = [None] * len(part), [{}] * len(part)
            for i, e, spectrum, keep in zip(part, es, spectra, kept):
                device = basis[i][1].device
                out[i] = (torch.zeros(e.s, e.r, device=device), torch.ones(e.r, device=device), {})  # if it fails
                if spectrum is None:
                    continue
                try:
                    proj = get_estimator(e.group["estimator"]).build_from_basis(
                        *spectrum, e.r, self._generator(e), uniform_mix=e.group["uniform_mix"]
                    )
                    out[i] = (proj.P.float(), proj.d.float(), keep)
                except Exception as err:  # noqa: BLE001 - agreed on by the caller, raised on every rank
                    error = error or f"refresh of {e.name!r} failed: {type(err).__name__}: {err}"
        return out, error

    def _first_failure(self, entries: list[_Entry], basis: list[tuple], err: Exception) -> str:
        """Names the first matrix of a failed group that fails on its own (error path only)."""
        for e, b in zip(entries, basis):
            try:
                self._decompose([e], [b])
            except Exception as alone:  # noqa: BLE001
                return f"refresh of {e.name!r} failed: {type(alone).__name__}: {alone}"
        names = [e.name for e in entries]
        return f"refresh of {names} failed together: {type(err).__name__}: {err}"

    def _decompose(self, entries: list[_Entry], basis: list[tuple]) -> tuple[list, list[dict]]:
        """Spectra of one :func:`stack_plan` group (one route) and the state each item keeps (``{}``
        but for estimators that keep ``Σ``, see :meth:`_second_moments`)."""
        if _route(entries[0], basis[0][0]) == "sigma":
            basis, kept = self._second_moments(entries, basis)
            return self._spectra(entries, basis), kept
        return self._spectra(entries, basis), [{}] * len(entries)

    def _second_moments(self, entries: list[_Entry], basis: list[tuple]) -> tuple[list[tuple], list[dict]]:
        """Owner, estimators that keep ``Σ``: ``Σ ← (1 − 1/k)·Σ + (1/k)·G_o G_oᵀ`` at the ``k``-th refresh
        (the running mean of the refresh gradients' Gram matrices, float64 ``(s, s)``).

        Returns ``[("sigma", Σ_new)]`` to decompose and the state to stage, ``{"Sigma", "sigma_count"}``
        (nothing is written here). ``("grad", G)`` items get their Gram matrix ``G_o G_oᵀ`` in float64
        first (batched), ``("gram", S)`` items (summed over row shards) are used as they are.
        """
        grams = [X if kind == "gram" else None for kind, X in basis]
        need = [i for i, g in enumerate(grams) if g is None]
        Go = [orient(basis[i][1].detach().double(), entries[i].left) for i in need]  # (s, l) each
        for i, S in zip(need, matmuls(Go, [G.mT for G in Go])):
            grams[i] = S
        out, kept = [], []
        for e, gram in zip(entries, grams):
            st = self.state.get(e.param, {})
            k = st.get("sigma_count", 0) + 1
            Sigma = second_moment_from_gram(st.get("Sigma"), gram, 1.0 / k)  # (s, s) float64
            out.append(("sigma", Sigma))
            kept.append({"Sigma": Sigma, "sigma_count": k})
        return out, kept

    @staticmethod
    def _spectra(entries: list[_Entry], basis: list[tuple]) -> list[tuple[Tensor, Tensor]]:
        """``(U, σ)`` of each item of one :func:`stack_plan` group: one (batched) decomposition
        (``(Q, √λ)`` of ``Σ`` for ``("sigma", Σ)`` items)."""
        kind, X0 = basis[0]
        if kind == "sigma":
            Q, root = optimal_basis(X0 if len(basis) == 1 else torch.stack([X for _, X in basis]))
            return [(Q, root)] if len(basis) == 1 else list(zip(Q.unbind(0), root.unbind(0)))
        if kind == "grad" and entries[0].group["svd_method"] == "svd":
            G = X0 if len(basis) == 1 else torch.stack([X for _, X in basis])
            U, sigma = short_side_basis(G, "svd")
        else:
            grams = []
            for e, (kind, X) in zip(entries, basis):
                if kind == "grad":
                    Go = orient(X.detach().double(), e.left)  # (s, l) float64
                    X = Go @ Go.mT  # (s, s)
                grams.append(X)
            U, sigma = gram_basis(grams[0] if len(grams) == 1 else torch.stack(grams))
        if len(basis) == 1:
            return [(U, sigma)]
        return list(zip(U.unbind(0), sigma.unbind(0)))

    def _generator(self, e: _Entry) -> torch.Generator:
        return sampler_generator(self.seed, e.index, self._step_of(e) // e.group["update_interval"])

    def _holds_moments(self, e: _Entry) -> bool:
        """FSDP2 and dense parameters: every rank holds its piece; replicated targets: the owner only."""
        return e.case == FSDP_ROWS or e.owner in (EVERY_RANK, self._distributor.rank)

    def _holds_sigma(self, e: _Entry) -> bool:
        """``optimal`` targets: the owner (the rank that draws ``P``) keeps ``Σ``, in every sharding case."""
        return e.lowrank and get_estimator(e.group["estimator"]).keeps_second_moment and e.owner == self._distributor.rank

    @staticmethod
    def _moment_cols(e: _Entry) -> int:
        return e.cols[1] - e.cols[0] if e.case == FSDP_ROWS else e.l

    # ------------------------------------------------------------------ checkpoints

    def _state_sharding(self, e: _Entry, key: str):
        if e.lowrank and e.case == FSDP_ROWS:
            if key in ("exp_avg", "exp_avg_sq"):
                return (e.r, e.l), 1
            if key == "P" and e.p_rows != (0, e.s):
                return (e.s, e.r), 0
            return None
        return super()._state_sharding(e, key)

    def state_dict(self) -> dict:
        """Tensors and plain scalars only (``torch.load(weights_only=True)`` safe).

        ``state[i]`` holds this rank's state of parameter ``i``: replicated weights keep ``P, d``
        on every rank and moments on the owner; under FSDP2 every rank holds its shard of
        ``P``/``M``/``V`` as ``DTensor`` s (``torch.distributed.checkpoint`` reshards them).
        ``optimal``: ``Sigma`` (float64 ``(s, s)``) and ``sigma_count`` on the matrix's owner only,
        in every case (plain values: DCP writes them once, the new owner loads them).
        ``plumage`` records the ownership plan and world size.
        """
        return self._state_dict_with({
            "format": _STATE_FORMAT,
            "kind": "shard",
            "seed": self.seed,
        })

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a :meth:`state_dict`; everything is validated before anything changes.

        Replicated weights: this rank's shard saved under the same world size and ownership
        plan, or a full state from :func:`merge_shards` (any world size), from which each rank
        keeps the moments it owns. FSDP2: the state this rank gets from
        ``torch.distributed.checkpoint`` (any world size; the ``plumage`` section may be
        absent) or from :meth:`state_dict` on the same layout. Checks: group count and
        sizes, every hyperparameter, modes, ownership, seed, tensor shapes, finiteness.
        """
        meta, groups = self._check_saved_groups(state_dict, ("rank", "estimator", "lowrank"))
        full = meta is not None and meta.get("kind") == "full"
        symmetric = all(e.case == FSDP_ROWS for e in self._entries)
        if meta is not None and not full and not symmetric and (
            meta["world_size"] != self._distributor.world_size or meta["ownership"] != self.ownership()
        ):
            raise ValueError(
                f"Invalid state_dict: a shard saved for world_size={meta['world_size']} with a different ownership "
                "plan; merge all shards with plumage_ds.optim.merge_shards(...) and load the result"
            )
        self._check_saved_modes(meta)
        if meta is not None and meta["seed"] != self.seed:
            raise ValueError(f"Invalid state_dict: seed={meta['seed']}, optimizer has seed={self.seed}")

        def prepare(e: _Entry, st: dict) -> dict:
            if full and not self._holds_moments(e):  # keep only what this rank owns
                st = {k: v for k, v in st.items() if k not in ("exp_avg", "exp_avg_sq")}
            if full and not self._holds_sigma(e):
                st = {k: v for k, v in st.items() if k not in ("Sigma", "sigma_count")}
            if full and not e.lowrank and e.case != FSDP_ROWS:  # whole dense moments: keep this rank's chunk
                st = {k: self._chunk_of_full(e, k, v) for k, v in st.items()}
            self._check_entry_state(e, st)
            return st

        self._install_state(self._load_entry_states(state_dict, prepare), groups, meta)

    def _chunk_of_full(self, e: _Entry, key: str, v: Any) -> Any:
        """This rank's flat chunk of a whole dense moment (any shape with the parameter's numel)."""
        n = int(torch.Size(e.shape).numel())
        if key not in ("exp_avg", "exp_avg_sq") or not torch.is_tensor(v) or v.numel() != n:
            return v  # checked (and rejected) by _check_entry_state
        a, b = self._distributor.flat_chunk(n)
        return v.reshape(-1)[a:b].reshape(self._dense_chunk_shape(e))

    def _check_entry_state(self, e: _Entry, st: dict) -> None:
        if e.lowrank:
            if e.case == FSDP_ROWS:
                a, b = e.p_rows
                expect = {"P": (b - a, e.r), "d": (e.r,), "exp_avg": (e.r, self._moment_cols(e))}
            else:
                expect = {"P": (e.s, e.r), "d": (e.r,), "exp_avg": (e.r, e.l)}
        else:
            expect = {"exp_avg": self._dense_chunk_shape(e)}
        expect["exp_avg_sq"] = expect["exp_avg"]
        if self._holds_sigma(e):
            expect["Sigma"] = (e.s, e.s)
        self._check_state_tensors(e, st, expect, ("step", "sigma_count"))
        if "step" not in st:
            raise ValueError(f"Invalid state_dict: {e.name} has no step")
        if e.lowrank and st["step"] > 0 and not {"P", "d"} <= set(st):
            raise ValueError(f"Invalid state_dict: {e.name} lacks its projector (P, d) after {st['step']} steps")
        if self._holds_moments(e) and st["step"] > 0 and not {"exp_avg", "exp_avg_sq"} <= set(st):
            raise ValueError(f"Invalid state_dict: {e.name} lacks its moments after {st['step']} steps")
        self._check_sigma_state(e, st)

    def _check_sigma_state(self, e: _Entry, st: dict) -> None:
        """``optimal``: the owner holds ``Sigma``  # (s, s) (shape and finiteness checked with the rest),
        symmetric, with ``sigma_count >= 1``; both or neither, and both once a refresh ran."""
        kept = {"Sigma", "sigma_count"} & set(st)
        if not self._holds_sigma(e):
            if kept:
                raise ValueError(
                    f"Invalid state_dict: {e.name} holds {sorted(kept)} but its second moment lives on rank {e.owner} "
                    f"(its owner), not on rank {self._distributor.rank}"
                )
            return
        if len(kept) == 1 or (st["step"] > 0 and not kept):
            raise ValueError(
                f"Invalid state_dict: {e.name} lacks its second moment (Sigma and sigma_count) after {st['step']} steps"
            )
        if not kept:
            return
        if st["sigma_count"] < 1:
            raise ValueError(f"Invalid state_dict: {e.name} sigma_count={st['sigma_count']!r}: must be >= 1")
        S = st["Sigma"].double()
        asym = float((S - S.mT).abs().max())
        if asym > 1e-10 * float(S.abs().max()):
            raise ValueError(f"Invalid state_dict: {e.name}.Sigma is not symmetric (max |Σ − Σᵀ| = {asym:.3g})")


def merge_shards(shards: list[dict]) -> dict:
    """Merge the per-rank :meth:`PlumageAdamW.state_dict` shards of one run into a full state.

    Pure (no collectives): read every rank's shard file, merge, and load the
    result on any world size — each rank keeps the moments it owns under its new
    plan. Target matrices come from their owner's shard; the flat chunks of a dense
    parameter (owner ``EVERY_RANK``) are concatenated in rank order into its whole (flat)
    moments. Raises ``ValueError`` if shards are missing, duplicated or disagree.
    """
    if not shards:
        raise ValueError("Invalid shards: empty list")
    metas = [sd.get("plumage") for sd in shards]
    if any(not isinstance(m, dict) or m.get("kind") != "shard" for m in metas):
        raise ValueError("Invalid shards: every element must be a PlumageAdamW shard state_dict")
    world = metas[0]["world_size"]
    ranks = sorted(m["rank"] for m in metas)
    if ranks != list(range(world)):
        raise ValueError(f"Invalid shards: got ranks {ranks} for world_size={world}")
    for m in metas:
        for key in ("ownership", "modes", "seed", "world_size"):
            if m[key] != metas[0][key]:
                raise ValueError(f"Invalid shards: shards disagree on {key!r}")
    by_rank = {m["rank"]: sd for m, sd in zip(metas, shards)}
    ownership = metas[0]["ownership"]
    state: dict = {}
    for index, owner in enumerate(ownership):
        if owner != EVERY_RANK:
            owner_state = by_rank[owner]["state"].get(index)
            if owner_state is not None:
                state[index] = dict(owner_state)
            continue
        pieces = [by_rank[k]["state"].get(index) for k in range(world)]
        if all(p is None for p in pieces):
            continue
        if any(p is None or p.get("step") != pieces[0].get("step") for p in pieces):
            raise ValueError(f"Invalid shards: the chunks of parameter {index} disagree on their step")
        merged = dict(pieces[0])
        for key in ("exp_avg", "exp_avg_sq"):
            if key in merged:
                merged[key] = torch.cat([p[key].reshape(-1) for p in pieces])
        state[index] = merged
    meta = dict(metas[0], kind="full", rank=None, world_size=None, ownership=None)
    return {"state": state, "param_groups": shards[0]["param_groups"], "plumage": meta}
