"""``PlumageAdamW``: Adam on one-sided low-rank projections of target matrices.

For each target matrix ``W`` (``m × n``, oriented to ``(s, l)`` with the short side first, see
:mod:`plumage_ds.estimators.spectral`):

* every ``τ = update_interval`` steps (refresh), one rank (the matrix's *owner*) builds ``P``
  # (s, r) and ``d``  # (r,) from the averaged gradient (the estimator's strategy,
  :mod:`plumage_ds.estimators.registry`: PLUMAGE: spectrum → min-variance probabilities →
  systematic sample; GaLore: top-r; Haar: random orthonormal, no gradient needed; optimal: the
  owner's ``Σ``  # (s, s) ← running mean of ``G_o G_oᵀ`` over refreshes, then ``π ∝ √λ(Σ)``) and, if
  ``realign``, the moments move to the new basis (``M ← BM``, ``V ← (B∘B)V``, ``B = P_newᵀ P_old``);
* every step: ``R = Pᵀ G_o``  # (r, l) (times ``D⁻¹`` for ``dinv_placement="coords"``), Adam on
  ``R`` gives ``N``  # (r, l) (times ``D⁻¹`` for ``"lift"``), and
  ``W ← W·(1 − lr·wd) − step_size·scale·P N``.

Everything else (1-D parameters, groups with ``lowrank=False``, matrices whose ``rank >= s``)
gets AdamW with the same arithmetic (:mod:`plumage_ds.kernels.adam`).

The math is written once, on this rank's local views; where each piece lives is the layout's
business (:mod:`plumage_ds.distributed.layouts`: replicated weights with owner-sharded moments,
FSDP2/HSDP rows, ZeRO-3 flat chunks), picked from the parameters' placement.

A step is atomic: new ``P, d, M, V`` and weights are staged and committed after the step's
last collective; a refresh failure on any rank raises :class:`CollectiveStepError` on every
rank with nothing changed. Sampling uses a generator seeded from
``(seed, matrix_id, refresh_index)``: the same draw on every rank and world size, and resuming
needs no RNG state beyond the step counters.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..config import DTYPES, RIGHT_PROJECTORS, STEP_IMPLS, check_bool, check_choice, validate_lowrank_options
from ..distributed.layouts import FSDP_ROWS, REPLICATED, ZERO3_FLAT, Entry
from ..distributed.ownership import lowrank_load
from ..estimators import is_refresh, orient
from ..estimators.registry import estimator_problem, get_estimator, resolve_realign
from ..kernels.adam import adam_direction_foreach, adam_moments_foreach, adam_step_size, skip_constants
from ..kernels.batched import group_indices, matmuls, projections
from ..kernels.fused import compiled_compressed_adam, refuse_under_dispatch_mode, warm_up
from .base import MatrixOptimizer
from .plumage_state import PlumageStateMixin

_LOWRANK_KEYS = (
    "rank", "update_interval", "estimator", "scale", "dinv_placement", "realign", "svd_method", "uniform_mix", "sigma_rank",
    "sigma_weight",
)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_FUSED_CONSTS_KEPT = 8  # device scalars of the compiled step: sets of (β1, β2, eps) kept per optimizer


def _dtype(key: str, value: Any) -> torch.dtype:
    """A dtype of the precision policy: ``None`` (float32), a name of ``config.DTYPES`` or the torch dtype."""
    if value is None:
        return torch.float32
    name = str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value
    check_choice(key, name, DTYPES)
    return _DTYPES[name]


class PlumageAdamW(PlumageStateMixin, MatrixOptimizer):
    """AdamW with PLUMAGE / GaLore / Haar–Stiefel / optimal low-rank projection of target matrices.

    Works like ``torch.optim.AdamW``: build it on ``model.named_parameters()`` (or groups, e.g. from
    :func:`~plumage_ds.optim.lowrank_param_groups`) — after ``fully_shard`` under FSDP2, where
    the state is then sharded like the weights.

    Args:
        params: ``model.named_parameters()`` (the default selection of ``target_modules`` picks the
            targets; the rest runs AdamW), parameters, or groups. A group may set ``lowrank``
            (bool) and any hyperparameter below; ``names`` (list of str, aligned with ``params``)
            labels the rows of :meth:`matrix_report`. A group without ``lowrank`` makes every 2-D
            parameter a target.
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
        realign: realign moments when ``P`` changes (``None``: on for plumage/haar/optimal,
            off for galore, as GaLore does not).
        svd_method: ``"gram"`` (eigh of the short-side Gram matrix) or ``"svd"``;
            ``None``: the estimator's default (``svd`` for GaLore, whose moments keep
            the singular vectors' signs; ``gram`` otherwise; ``optimal`` decomposes ``Σ``
            and takes ``gram`` only).
        uniform_mix: PLUMAGE and optimal: mix ε of uniform probability into the
            sampling design so no direction has ``p = 0`` (keeps the estimate
            unbiased for later gradients between refreshes; 0 = the paper's design).
        sigma_rank: optimal only: between refreshes the owner keeps ``Σ`` as its top
            ``sigma_rank`` eigenpairs plus an isotropic rest, ``(s, k+1)`` float64 instead of
            ``(s, s)``; each refresh still draws from the whole ``Σ`` it forms. ``None`` (the
            default): ``rank`` eigenpairs. 0: the whole ``Σ`` (so too for a matrix with
            ``s <= sigma_rank + 1``, where it is no larger).
        sigma_weight: optimal only: ``Σ ← (1 − w)·Σ + w·G_o G_oᵀ`` at each refresh with this
            constant ``w`` in ``(0, 1]`` (recent refresh gradients weigh more; 1: the newest
            alone, PLUMAGE's design). ``None`` (the default): ``w = 1/k`` at the ``k``-th refresh,
            the running mean.
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
        compute_dtype: the precision policy's GEMMs — the projections ``Pᵀ G`` and the lifts ``P N``
            (``None``/``"float32"``: fp32, the oracle's arithmetic; ``"bfloat16"``: bf16 operands with
            fp32 accumulation on CUDA, bf16 weights updated by one GEMM in their dtype). Adam's
            arithmetic is fp32 either way.
        state_dtype: the dtype ``P``, ``M``, ``V`` and the dense moments are kept in (``None``/``"float32"``;
            ``"bfloat16"``: half the state, as torch's AdamW and galore-torch keep bf16 parameters'
            state; the math stays fp32, rounded once when stored). ``d`` stays fp32, ``Σ`` float64.
        step_impl: ``"auto"`` (default: ``"streaming"`` where it applies, else ``"staged"``),
            ``"streaming"`` (ordinary steps in place, matrix chunk by chunk, transient memory bounded
            by one matrix — for layouts with no collective in the step; refresh steps stage),
            ``"compiled"`` (streaming, with the compressed Adam of each matrix as one ``torch.compile``d
            kernel, :mod:`~plumage_ds.kernels.fused`; compiled at the first step, before anything is
            written) or ``"staged"`` (batched lists, new state staged until the step's last collective).
        process_group: plain-tensor parameters only: the optimizer *is* the data-parallel
            strategy over this group (``dist.group.WORLD`` for the world): do not wrap the model
            in DDP; each target's moments live on its owner rank, gradients are reduced by the
            optimizer (compressed ``r × l`` for targets, flat chunks for the rest). ``None``:
            no collectives (one process, or every DDP rank running the same optimizer).
        replicate_group: FSDP2 only: compressed HSDP. ``fully_shard`` ran on the shard
            sub-mesh; the optimizer averages across this group itself, target matrices as
            their ``r × l`` projections.
        target_modules: with ``named_parameters()``: which modules' matrices are targets
            (regexes on module names; ``None``: attention and MLP matrices).
    """

    _display_name = "PlumageAdamW"
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
        sigma_rank: Optional[int] = None,
        sigma_weight: Optional[float] = None,
        seed: int = 0,
        strict: bool = False,
        max_grad_norm: float = 0.0,
        nonfinite: str = "skip",
        right_projectors: str = "sharded",
        backward_projection: bool = False,
        collective_timeout: float = 0.0,
        process_group=None,
        replicate_group=None,
        target_modules: Any = None,
        compute_dtype: Any = None,
        state_dtype: Any = None,
        step_impl: str = "auto",
    ) -> None:
        defaults = self._adam_defaults(lr, betas, eps, weight_decay)
        self.compute_dtype = _dtype("compute_dtype", compute_dtype)
        self.state_dtype = _dtype("state_dtype", state_dtype)
        check_choice("step_impl", step_impl, STEP_IMPLS)
        self.step_impl = step_impl
        self._fused_ready, self._fused_consts = False, {}
        if svd_method is None and estimator_problem(estimator, "lowrank_adam") is None:
            svd_method = get_estimator(estimator).default_svd_method or "gram"  # haar takes no SVD
        defaults.update(
            rank=rank, update_interval=update_interval, estimator=estimator, scale=scale,
            dinv_placement=dinv_placement, realign=realign, svd_method=svd_method, uniform_mix=uniform_mix,
            sigma_rank=sigma_rank, sigma_weight=sigma_weight, lowrank=None,
        )
        self._validate_group(defaults)
        check_choice("right_projectors", right_projectors, RIGHT_PROJECTORS)
        check_bool("backward_projection", backward_projection)
        self.backward_projection = backward_projection
        self.right_projectors = right_projectors
        self._hooks: list = []
        super().__init__(
            params, defaults, seed=seed, strict=strict, nonfinite=nonfinite, max_grad_norm=max_grad_norm,
            process_group=process_group, replicate_group=replicate_group, collective_timeout=collective_timeout,
            target_modules=target_modules, right_projectors=right_projectors,
        )
        if step_impl in ("streaming", "compiled") and (self._layout.comm is not None or self._layout.replica_comm is not None):
            raise ValueError(
                f"Invalid {step_impl=}: the {self._layout.describe()} layout runs collectives in every step, "
                "so its new state is staged until the last one; use 'auto' or 'staged'"
            )

    @property
    def _state_dtypes(self) -> dict:
        """Loaded state tensors in their kept dtype (``Σ`` float64; ``P, M, V`` in ``state_dtype``)."""
        return {"Sigma": torch.float64, **{k: self.state_dtype for k in ("P", "exp_avg", "exp_avg_sq")}}

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

    def _estimator(self, e: Entry):
        return get_estimator(e.group["estimator"])

    def _options(self) -> dict:
        return {**super()._options(), "right_projectors": self.right_projectors, "backward_projection": self.backward_projection,
                "compute_dtype": str(self.compute_dtype), "state_dtype": str(self.state_dtype), "step_impl": self.step_impl}

    def _build_entries(self) -> None:
        entries = self._plan_entries()
        self._register_projection_hooks(entries)
        # Each target matrix has an owner (its refresh, and its moments where the layout keeps them
        # there); dense parameters have none: every rank holds a piece of their state.
        targets = [e for e in entries if e.lowrank]
        loads = [
            lowrank_load(e.s, e.l, e.r, decomposes=self._estimator(e).needs_gradient, keeps_moments=True,
                         keeps_second_moment=self._estimator(e).keeps_second_moment,
                         sigma_rank=self._sigma_rank(e))
            for e in targets
        ]
        for e, o in zip(targets, self._layout.assign_owners([c for c, _ in loads], [b for _, b in loads])):
            e.owner = o
        self._entries = entries

    def _register_projection_hooks(self, entries: list[Entry]) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if not self.backward_projection:
            return
        for e in entries:
            if e.lowrank and not self._layout.supports_backward_projection:
                raise ValueError(
                    f"Invalid backward_projection=True for {e.name!r}: FSDP2 already hands each rank 1/W of the "
                    "gradient (reduce-scattered rows); the option is for replicated and ZeRO-3 weights"
                )
            if e.lowrank:
                self._hooks.append(e.param.register_post_accumulate_grad_hook(self._projection_hook(e)))

    def _projection_hook(self, e: Entry):
        """After backward accumulates ``e``'s gradient: add ``Pᵀ G_o`` (r, l) to its accumulator, drop ``G``."""

        def hook(p: Tensor) -> None:
            st = self.state.get(p, {})
            if p.grad is None or "P" not in st or is_refresh(st["step"], e.group["update_interval"]):
                return  # the refresh at the start of the next step needs the whole gradient
            with torch.no_grad():
                R = projections([st["P"].mT], [orient(p.grad, e.left)], self.compute_dtype)[0]  # (r, l) fp32
                acc = self._projected.get(e.index)
                self._projected[e.index] = R if acc is None else acc.add_(R)
            p.grad = None

        return hook

    # ------------------------------------------------------------------ step

    def _current(self, staged: dict, e: Entry, key: str) -> Optional[Tensor]:
        return staged.get(e.index, {}).get(key, self.state.get(e.param, {}).get(key))

    def _targets_inputs(self, lowrank: list[Entry], staged: dict) -> dict:
        """Refresh (staged), then every target's compressed gradient where its Adam runs."""
        projected = [self._projected.get(e.index) for e in lowrank]
        refresh = [i for i, e in enumerate(lowrank) if is_refresh(self._step_of(e), e.group["update_interval"])]
        # the refresh decomposes the whole gradient in fp32; ordinary steps project it as it is, one
        # product at a time in the policy's dtype (never an fp32 copy of every gradient)
        grads = [None if R is not None else self._grad(e) for e, R in zip(lowrank, projected)]
        for i in refresh:
            grads[i] = self._grad32(lowrank[i])
        averaged = [False] * len(lowrank)  # this step's gradient already averaged across replicas
        if refresh:
            self._refresh([lowrank[i] for i in refresh], [grads[i] for i in refresh], staged)
            for i in refresh:
                if "G" in staged[lowrank[i].index]:
                    grads[i] = staged[lowrank[i].index].pop("G")
                    averaged[i] = True
        P_use = self._layout.projectors(lowrank, [self._current(staged, e, "P") for e in lowrank])
        R_owned = self._layout.compress(lowrank, grads, P_use, averaged, projected, dtype=self.compute_dtype)
        coords = [i for i, (e, R) in enumerate(zip(lowrank, R_owned)) if R is not None and e.group["dinv_placement"] == "coords"]
        if coords:
            scaled = torch._foreach_div([R_owned[i] for i in coords], [self._current(staged, lowrank[i], "d")[:, None] for i in coords])
            for i, R in zip(coords, scaled):
                R_owned[i] = R
        return {"P_use": P_use, "R": R_owned, "clip_inputs": R_owned}

    def _targets_update(self, lowrank: list[Entry], work: dict, clip: float, staged: dict) -> list[tuple[Tensor, Tensor]]:
        """Adam on the projected gradients this rank holds, ``N`` back to every rank: ``ΔW = A B`` per target."""
        N_owned = self._lowrank_adam(lowrank, work["R"], clip, staged)
        return self._layout.lift(lowrank, N_owned, work["P_use"])

    def _apply_targets(self, lowrank: list[Entry], factors: list[tuple[Tensor, Tensor]], found: Optional[Tensor] = None) -> None:
        """``W ← W·(1 − lr·wd) − A B`` for every target, in place (the layout places the update; the
        GEMM in the weight's dtype under a low-precision compute policy; ``found``: a step the device
        may cancel)."""
        self._layout.apply_lifts(lowrank, factors, [e.group["lr"] * e.group["weight_decay"] for e in lowrank],
                                 in_weight_dtype=self.compute_dtype != torch.float32, skip=found)

    def _lowrank_adam(self, lowrank: list[Entry], R_owned: list, clip, staged: Optional[dict],
                      found: Optional[Tensor] = None) -> list:
        """Adam on the projected gradients this rank holds: ``N``  # (r, l_k), step size and scale
        folded in (``None`` where it holds nothing). ``staged``: new moments staged, not written
        (``None``: updated in place — the streaming step, where ``found`` may skip it on the device:
        ``R`` zeroed by the caller, ``M, V`` kept, ``N = 0``). fp32 math; ``state_dtype`` on store.
        Batched: one ``_foreach`` chain per set of equal hyperparameters and step."""
        N_owned: list[Optional[Tensor]] = [None] * len(lowrank)
        live = [i for i, R in enumerate(R_owned) if R is not None]
        keys = []
        for i in live:
            g = lowrank[i].group
            keys.append((g["lr"], g["betas"], g["eps"], g["scale"], g["dinv_placement"], self._step_of(lowrank[i])))
        current = (lambda e, k: self._current(staged, e, k)) if staged is not None else (lambda e, k: self.state[e.param][k])
        for part in group_indices(keys):
            idx = [live[j] for j in part]
            lr, (beta1, beta2), eps, scale, dinv, step = keys[part[0]]
            R = [R_owned[i] for i in idx]
            if torch.is_tensor(clip) or clip != 1.0:
                R = list(torch._foreach_mul(R, clip))
            es = [lowrank[i] for i in idx]
            if staged is None and self.step_impl == "compiled":  # the same arithmetic, one kernel per matrix
                M = [self.state[e.param]["exp_avg"] for e in es]  # updated in place, in state_dtype
                V = [self.state[e.param]["exp_avg_sq"] for e in es]
                consts, fused = self._fused_constants(beta1, beta2, eps, found, R[0].device), compiled_compressed_adam()
                N = [fused(m, v, r, *consts) for m, v, r in zip(M, V, R)]  # (r, l_k) each
            else:
                M = [self._fp32(current(e, "exp_avg")) for e in es]
                V = [self._fp32(current(e, "exp_avg_sq")) for e in es]
                if staged is None:  # the same operations, in place
                    b1, b2, eps, _ = skip_constants(found, beta1, beta2, eps, 0.0)
                    torch._foreach_mul_(M, b1)
                    torch._foreach_add_(M, R, alpha=1.0 - beta1)
                    torch._foreach_mul_(V, b2)
                    torch._foreach_addcmul_(V, R, R, value=1.0 - beta2)
                else:
                    M, V = adam_moments_foreach(M, V, R, beta1, beta2)
                N = adam_direction_foreach(M, V, eps)  # (r, l_k) each
            if dinv == "lift":
                torch._foreach_div_(N, [current(e, "d")[:, None] for e in es])
            torch._foreach_mul_(N, adam_step_size(lr, step + 1, beta1, beta2) * scale)
            for i, e, m, v, n in zip(idx, es, M, V, N):
                if staged is None:
                    self._store(self.state[e.param], "exp_avg", m)
                    self._store(self.state[e.param], "exp_avg_sq", v)
                else:
                    staged.setdefault(e.index, {}).update(exp_avg=m.to(self.state_dtype), exp_avg_sq=v.to(self.state_dtype))
                N_owned[i] = n
        return N_owned

    # ------------------------------------------------------------------ the streaming step

    def _prepare_stream(self) -> None:
        """``step_impl="compiled"``: before the first write, refuse under a dispatch mode and compile the
        compressed Adam for this state's dtype (once)."""
        if self.step_impl != "compiled":
            return
        refuse_under_dispatch_mode()
        if not self._fused_ready:
            warm_up([self.state_dtype], self._device())
            self._fused_ready = True

    def _fused_constants(self, beta1: float, beta2: float, eps: float, found: Optional[Tensor], device) -> tuple:
        """``(keep1, keep2, eps, 1 − β1, 1 − β2)`` as 0-dim fp32 tensors on ``device`` for
        :func:`~plumage_ds.kernels.fused.compressed_adam_`: made once per hyperparameters (no copy to the
        device per step); where ``found`` may skip the step the first three come from :func:`skip_constants`.
        At most ``_FUSED_CONSTS_KEPT`` sets are kept (a schedule that changes the betas every step)."""
        key = (device, beta1, beta2, eps)
        consts = self._fused_consts.get(key)
        if consts is None:
            consts = tuple(torch.tensor(x, dtype=torch.float32, device=device) for x in (beta1, beta2, eps, 1.0 - beta1, 1.0 - beta2))
            if len(self._fused_consts) >= _FUSED_CONSTS_KEPT:
                self._fused_consts.pop(next(iter(self._fused_consts)))  # the oldest
            self._fused_consts[key] = consts
        if found is None:
            return consts
        return (*skip_constants(found, beta1, beta2, eps, 0.0)[:3], *consts[3:])

    def _targets_stream(self, lowrank: list[Entry]) -> bool:
        """Ordinary step for every target (a refresh stages its new projectors)."""
        return not any(is_refresh(self._step_of(e), e.group["update_interval"]) for e in lowrank)

    def _stream_inputs(self, chunk: list[Entry]) -> list[Tensor]:
        """The chunk's compressed gradients ``Pᵀ G_o`` (fp32; ``D⁻¹``-scaled for ``dinv_placement="coords"``)."""
        R = [self._projected.get(e.index) for e in chunk]
        todo = [i for i, r in enumerate(R) if r is None]
        for i, r in zip(todo, projections([self.state[chunk[i].param]["P"].mT for i in todo],
                                          [orient(self._grad(chunk[i]), chunk[i].left) for i in todo], self.compute_dtype)):
            R[i] = r
        coords = [i for i, e in enumerate(chunk) if e.group["dinv_placement"] == "coords"]
        if coords:
            d = [self.state[chunk[i].param]["d"][:, None] for i in coords]
            for i, r in zip(coords, torch._foreach_div([R[i] for i in coords], d)):
                R[i] = r
        return R

    def _stream_targets(self, chunk: list[Entry], clip, found: Optional[Tensor] = None) -> None:
        """Project, step and lift this chunk in place (``found``: a step the device may cancel)."""
        R = self._stream_inputs(chunk)  # the step's own tensors: zeroed in place where skipped
        if found is not None:
            R = self._zeroed(R, [True] * len(R), found)
        N = self._lowrank_adam(chunk, R, clip, None, found)
        del R  # gone before the lift: the chunk's transient bound counts it once
        self._apply_targets(chunk, self._layout.lift(chunk, N, [self.state[e.param]["P"] for e in chunk]), found)

    def _refresh(self, refresh: list[Entry], grads: list[Tensor], staged: dict) -> None:
        """Stage new ``P, d`` and realigned (or fresh) moments for ``refresh``.

        Under compressed HSDP the refresh gradients are first averaged across replicas
        (uncompressed, every ``τ`` steps); they are then staged as ``"G"`` for this step.
        """
        layout = self._layout
        grads, averaged = layout.refresh_grads(refresh, grads)
        if averaged:
            for e, G in zip(refresh, grads):
                staged.setdefault(e.index, {})["G"] = G
        new_P = self._refresh_projectors(refresh, grads, staged)

        # moments: fresh zeros, or realigned to the new basis (B = P_newᵀ P_old)
        old = [e for e in refresh if "P" in self.state.get(e.param, {})]
        realign = [e for e in old if resolve_realign(e.group["estimator"], e.group["realign"])]
        B = layout.realignment(realign, [new_P[e.index][0] for e in realign], [self.state[e.param]["P"] for e in realign])
        mine = [i for i, (e, b) in enumerate(zip(realign, B))
                if b is not None and layout.holds_moments(e) and "exp_avg" in self.state[e.param]]
        st_of = [self.state[realign[i].param] for i in mine]
        BM = matmuls([B[i] for i in mine], [st["exp_avg"] for st in st_of], dtype=torch.float32)  # M ← B M
        BB = list(torch._foreach_mul([B[i] for i in mine], [B[i] for i in mine])) if mine else []
        BBV = matmuls(BB, [st["exp_avg_sq"] for st in st_of], dtype=torch.float32)
        realigned = {realign[i].index: (m, v) for i, m, v in zip(mine, BM, BBV)}  # V ← (B∘B) V
        device = grads[0].device
        for e in refresh:
            P, d = new_P[e.index]
            new = staged.setdefault(e.index, {})
            new.update(P=P.to(device=device, dtype=self.state_dtype).contiguous(), d=d.to(device).contiguous())
            if not layout.holds_moments(e):
                continue
            if "exp_avg" not in self.state.get(e.param, {}):
                cols = e.cols[1] - e.cols[0]
                new["exp_avg"] = torch.zeros(e.r, cols, dtype=self.state_dtype, device=P.device)
                new["exp_avg_sq"] = torch.zeros(e.r, cols, dtype=self.state_dtype, device=P.device)
            elif e.index in realigned:
                new["exp_avg"], new["exp_avg_sq"] = (t.to(self.state_dtype) for t in realigned[e.index])


class ShardedPlumageAdamW(PlumageAdamW):
    """:class:`PlumageAdamW` as the data-parallel strategy itself (the replicated layout, owner-sharded
    over ``process_group``; ``None``: the default group).

    Do not wrap the model in DDP: the optimizer reduces gradients itself (compressed for target
    matrices). Each rank calls ``backward`` on its own micro-batch and then ``step()``; all ranks
    must call ``step()`` together.
    """

    _display_name = "ShardedPlumageAdamW"

    def __init__(self, params, *args, process_group: Optional[dist.ProcessGroup] = None, **kwargs) -> None:
        super().__init__(params, *args, process_group=process_group if process_group is not None else dist.group.WORLD, **kwargs)
