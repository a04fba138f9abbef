"""``PlumageAdamW``: Adam on one-sided low-rank projections of target matrices.

For each target matrix ``W`` (``m × n``, oriented to ``(s, l)`` with the short
side first, see :mod:`plumage_ds.estimators.spectral`):

* every ``τ = update_interval`` steps (refresh), the owner builds ``P``  # (s, r)
  and ``d``  # (r,) from the averaged gradient (PLUMAGE: SVD → min-variance
  probabilities → systematic sample; GaLore: top-r; Haar: random orthonormal,
  no gradient needed) and, if ``realign``, maps its moments into the new basis
  (``M ← BM``, ``V ← (B∘B)V``, ``B = P_newᵀ P_old``);
* every step: ``R = Pᵀ G_o``  # (r, l) (times ``D⁻¹`` for ``dinv_placement="coords"``),
  Adam on ``R`` gives ``N``  # (r, l) (times ``D⁻¹`` for ``"lift"``), and
  ``W ← W·(1 − lr·wd) − step_size·scale·P N``.

Everything else (1-D parameters, groups with ``lowrank=False``, matrices whose
``rank >= s``) gets AdamW with the same arithmetic (:mod:`plumage_ds.optim.adam`).

The step is written as phases over lists so that a distributor
(:mod:`plumage_ds.optim.distributor`) decides where each tensor lives: the
single-process :class:`LocalDistributor` (default) or the sharded data-parallel
strategy of :mod:`plumage_ds.distributed`. Sampling uses a generator seeded from
``(seed, matrix_id, refresh_index)``, so the draw is the same on every rank and
every world size, and resuming needs no RNG state beyond the step counters.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import torch
from torch import Tensor

from ..config import validate_lowrank_options
from ..estimators import build_projection, default_svd_method, haar_projection, realign_moments, realignment, sampler_generator
from .adam import adam_direction, adam_step_size, adam_update_moments, zeros_state
from .base import MatrixOptimizer, _Entry
from .distributor import Distributor

_LOWRANK_KEYS = (
    "rank", "update_interval", "estimator", "scale", "dinv_placement", "realign", "svd_method", "uniform_mix"
)
_STATE_FORMAT = 1


def _default_realign(estimator: str) -> bool:
    return estimator in ("plumage", "haar")


class PlumageAdamW(MatrixOptimizer):
    """AdamW with PLUMAGE / GaLore / Haar–Stiefel low-rank projection of target matrices.

    Args:
        params: parameters or groups. A group may set ``lowrank`` (bool) and any
            hyperparameter below; ``names`` (list of str, aligned with ``params``)
            labels the rows of :meth:`matrix_report`. Without ``lowrank``, every
            2-D parameter is a target.
        lr, betas, eps, weight_decay: Adam hyperparameters (eps as in GaLore:
            ``M/(sqrt(V)+eps)``); weight decay is decoupled.
        rank: ``r``, number of directions kept per matrix.
        update_interval: ``τ``, steps between refreshes of ``P``.
        estimator: ``"plumage"`` (unbiased, min-variance), ``"galore"`` (top-r,
            biased) or ``"haar"`` (uniform random orthonormal, unbiased).
        scale: lift scale ``α`` applied to ``P N``.
        dinv_placement: where ``D⁻¹`` enters: ``"coords"``, ``"lift"`` or ``"none"``.
        realign: realign moments when ``P`` changes (``None``: on for plumage/haar,
            off for galore, as GaLore does not).
        svd_method: ``"gram"`` (eigh of the short-side Gram matrix) or ``"svd"``;
            ``None``: the estimator's default (``svd`` for GaLore, whose moments keep
            the singular vectors' signs; ``gram`` otherwise; see ``default_svd_method``).
        uniform_mix: PLUMAGE only: mix ε of uniform probability into the
            sampling design so no direction has ``p = 0`` (keeps the estimate
            unbiased for later gradients between refreshes; 0 = the paper's design).
        seed: sampler seed.
        strict: raise instead of falling back to AdamW for a target matrix that
            cannot take the low-rank path.
        max_grad_norm: if > 0, clip by the global norm of what the optimizer
            uses: ``sqrt(Σ_targets ‖R̄‖² + Σ_others ‖ḡ‖²)`` with ``R̄`` the
            (averaged) projected gradient and ``ḡ`` the averaged dense gradient.
        distributor: where state lives (default: this process owns everything).
    """

    _display_name = "PlumageAdamW"
    _state_section = "plumage"
    _state_format = _STATE_FORMAT
    _projector_keys = ("P", "d")

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
        distributor: Optional[Distributor] = None,
    ) -> None:
        defaults = self._adam_defaults(lr, betas, eps, weight_decay)
        svd_method = default_svd_method(estimator, svd_method)
        validate_lowrank_options(
            rank=rank,
            update_interval=update_interval,
            estimator=estimator,
            scale=scale,
            dinv_placement=dinv_placement,
            svd_method=svd_method,
            uniform_mix=uniform_mix,
        )
        self._check_seed(seed)
        if not isinstance(max_grad_norm, (int, float)) or not max_grad_norm >= 0 or not math.isfinite(max_grad_norm):
            raise ValueError(f"Invalid {max_grad_norm=}: must be a finite number >= 0 (0 disables clipping)")
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
        self.max_grad_norm = float(max_grad_norm)
        # Optional callable: this rank's share of the squared norm of gradients that
        # another optimizer applies (e.g. DeepSpeed's ZeRO partitions), so that one
        # global norm clips both; after step(), ``last_clip_coef`` is the factor used.
        self.external_grad_sq_norm = None
        self.last_clip_coef = 1.0
        self.last_grad_norm: Optional[float] = None
        super().__init__(params, defaults, seed=seed, strict=strict, distributor=distributor)

    # ------------------------------------------------------------------ setup

    def _validate_group(self, g: dict) -> None:
        validate_lowrank_options(**{k: g[k] for k in _LOWRANK_KEYS if k != "realign"})

    def _target_mode(self, group: dict) -> str:
        return group["estimator"]

    def _build_entries(self) -> None:
        entries = self._plan_entries()
        # Matrices and dense parameters travel in separate collectives (each padded
        # to its longest owner segment), so each category is balanced on its own.
        for category in ([e for e in entries if e.lowrank], [e for e in entries if not e.lowrank]):
            costs, state_bytes = [], []
            for e in category:
                if e.lowrank:
                    svd_cost = 0.0 if e.group["estimator"] == "haar" else float(e.s * e.s * e.l)
                    costs.append(svd_cost + 2.0 * e.r * e.l)
                    state_bytes.append(2 * e.r * e.l * 4)
                else:
                    costs.append(2.0 * e.param.numel())
                    state_bytes.append(2 * e.param.numel() * 4)
            for e, o in zip(category, self._distributor.assign_owners(costs, state_bytes)):
                e.owner = o
        self._entries = entries

    # ------------------------------------------------------------------ step

    def _run_step(self) -> None:
        dist = self._distributor
        split = self._begin_step()
        if split is None:
            return
        lowrank, dense = split
        grad32 = self._grad32

        # -- phase 1: refresh projectors ------------------------------------------
        refresh = [e for e in lowrank if self.state[e.param]["step"] % e.group["update_interval"] == 0]
        if refresh:
            self._refresh(refresh, grad32)

        # -- phase 2: compressed gradients (and dense ones) to owners -------------
        R_local = []
        for e in lowrank:
            st = self.state[e.param]
            G = grad32(e)
            G_o = G if e.left else G.mT  # (s, l)
            R = st["P"].mT @ G_o  # (r, l)
            if e.group["dinv_placement"] == "coords":
                R = R / st["d"][:, None]
            R_local.append(R)
        R_owned = dist.reduce_to_owners(R_local, [e.owner for e in lowrank], "lowrank_grad")
        g_owned = dist.reduce_to_owners([grad32(e) for e in dense], [e.owner for e in dense], "dense_grad")

        # -- phase 3: clipping on what the optimizer uses -------------------------
        clip = 1.0
        if self.max_grad_norm > 0:
            sq = sum(float(t.double().pow(2).sum()) for t in R_owned + g_owned if t is not None)
            if self.external_grad_sq_norm is not None:
                sq += float(self.external_grad_sq_norm())
            total_norm = math.sqrt(dist.sum_scalar(sq, "grad_norm"))
            self.last_grad_norm = total_norm
            clip = min(1.0, self.max_grad_norm / (total_norm + 1e-6))
        self.last_clip_coef = clip

        # -- phase 4: Adam on owners ---------------------------------------------
        N_out: list[Optional[Tensor]] = []
        for e, R in zip(lowrank, R_owned):
            st = self.state[e.param]
            st["step"] += 1
            if R is None:
                N_out.append(None)
                continue
            g = e.group
            beta1, beta2 = g["betas"]
            if clip != 1.0:
                R = R * clip
            adam_update_moments(st["exp_avg"], st["exp_avg_sq"], R, beta1, beta2)
            N = adam_direction(st["exp_avg"], st["exp_avg_sq"], g["eps"])  # (r, l)
            if g["dinv_placement"] == "lift":
                N.div_(st["d"][:, None])
            N.mul_(adam_step_size(g["lr"], st["step"], beta1, beta2) * g["scale"])
            N_out.append(N)
        new_dense = self._dense_adamw(dense, g_owned, clip)

        # -- phase 5: updates to every rank, applied locally -----------------------
        N_all = dist.gather_from_owners(N_out, [(e.r, e.l) for e in lowrank], [e.owner for e in lowrank], "lowrank_update")
        W_all = dist.gather_from_owners(new_dense, [e.shape for e in dense], [e.owner for e in dense], "dense_update")
        for e, N in zip(lowrank, N_all):
            st = self.state[e.param]
            delta = st["P"] @ N  # (s, l)
            if not e.left:
                delta = delta.mT
            self._apply_matrix_update(e.param, delta, e.group["lr"] * e.group["weight_decay"])
        for e, W in zip(dense, W_all):
            e.param.copy_(W)

    def _refresh(self, refresh: list[_Entry], grad32) -> None:
        """Rebuild ``P, d`` for ``refresh`` on their owners; everyone receives them.

        Collectives (via the distributor): full gradients of SVD-based matrices
        reduced to owners (``refresh_grad``), ``[P, d]`` gathered from owners
        (``projector``). Haar draws need neither: every rank draws the same ``P``.
        """
        dist = self._distributor
        me = dist.rank
        needs_grad = [e for e in refresh if e.group["estimator"] != "haar"]
        full = dist.reduce_to_owners([grad32(e) for e in needs_grad], [e.owner for e in needs_grad], "refresh_grad")
        full_by_index = {e.index: G for e, G in zip(needs_grad, full)}
        packed: list[Optional[Tensor]] = []
        for e in refresh:
            st = self.state[e.param]
            g = e.group
            k = st["step"] // g["update_interval"]
            haar = g["estimator"] == "haar"
            if not haar and e.owner != me:
                continue
            device = e.param.device
            gen = sampler_generator(self.seed, e.index, k)
            if haar:
                proj = haar_projection(e.s, e.r, gen, device=device)
            else:
                proj = build_projection(
                    g["estimator"], full_by_index[e.index], e.r, gen,
                    svd_method=g["svd_method"], uniform_mix=g["uniform_mix"],
                )
            P, d = proj.P.to(device), proj.d.to(device)
            if e.owner == me:
                realign = g["realign"] if g["realign"] is not None else _default_realign(g["estimator"])
                if "exp_avg" not in st:
                    st["exp_avg"], st["exp_avg_sq"] = zeros_state((e.r, e.l), device)
                elif realign:
                    B = realignment(P, st["P"])  # (r, r)
                    st["exp_avg"], st["exp_avg_sq"] = realign_moments(st["exp_avg"], st["exp_avg_sq"], B)
            if haar:
                st["P"], st["d"] = P, d
            else:
                st["_new"] = torch.cat([P.reshape(-1), d])
        svd_entries = [e for e in refresh if e.group["estimator"] != "haar"]
        mine = [self.state[e.param].pop("_new", None) for e in svd_entries]
        got = dist.gather_from_owners(
            mine, [(e.s * e.r + e.r,) for e in svd_entries], [e.owner for e in svd_entries], "projector"
        )
        for e, flat in zip(svd_entries, got):
            st = self.state[e.param]
            st["P"] = flat[: e.s * e.r].reshape(e.s, e.r).clone()
            st["d"] = flat[e.s * e.r :].clone()

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """Tensors and plain scalars only (``torch.load(weights_only=True)`` safe).

        ``state[i]`` holds this rank's state of parameter ``i`` (moments only on
        its owner); ``plumage`` records the ownership plan and world size.
        """
        return self._state_dict_with({
            "format": _STATE_FORMAT,
            "kind": "shard",
            "seed": self.seed,
        })

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a :meth:`state_dict` from the same world size and ownership plan.

        ``state_dict`` is either this rank's shard saved under the same world size
        and ownership plan, or a full state from :func:`merge_shards` (any world
        size), from which each rank keeps the moments it owns under its current plan.
        Validates everything first (group count and sizes, hyperparameters that
        shape the state, modes, ownership, tensor shapes) and only then replaces
        the state, so a bad checkpoint leaves the optimizer untouched. For a
        different world size, merge the old shards first.
        """
        meta, groups = self._check_saved_groups(state_dict, ("rank", "estimator", "lowrank"))
        full = meta.get("kind") == "full"
        if not full and (meta["world_size"] != self._distributor.world_size or meta["ownership"] != self.ownership()):
            raise ValueError(
                f"Invalid state_dict: a shard saved for world_size={meta['world_size']} with a different ownership "
                "plan; merge all shards with plumage_ds.optim.merge_shards(...) and load the result"
            )
        self._check_saved_modes(meta)
        if meta["seed"] != self.seed:
            raise ValueError(f"Invalid state_dict: seed={meta['seed']}, optimizer has seed={self.seed}")

        def prepare(e: _Entry, st: dict) -> dict:
            if full and e.owner != self._distributor.rank:  # keep only what this rank owns
                st = {k: v for k, v in st.items() if k not in ("exp_avg", "exp_avg_sq")}
            self._check_entry_state(e, st)
            return st

        self._install_state(self._load_entry_states(state_dict["state"], prepare), groups)

    def _check_entry_state(self, e: _Entry, st: dict) -> None:
        if not isinstance(st.get("step"), int) or st["step"] < 0:
            raise ValueError(f"Invalid state_dict: {e.name} step={st.get('step')!r}")
        if e.lowrank:
            expect = {"P": (e.s, e.r), "d": (e.r,), "exp_avg": (e.r, e.l), "exp_avg_sq": (e.r, e.l)}
        else:
            expect = {"exp_avg": e.shape, "exp_avg_sq": e.shape}
        self._check_state_tensors(e, st, expect, ("step",))


def merge_shards(shards: list[dict]) -> dict:
    """Merge the per-rank :meth:`PlumageAdamW.state_dict` shards of one run into a full state.

    Pure (no collectives): read every rank's shard file, merge, and load the
    result on any world size — each rank keeps the moments it owns under its new
    plan. Raises ``ValueError`` if shards are missing, duplicated or disagree.
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
        owner_state = by_rank[owner]["state"].get(index)
        if owner_state is not None:
            state[index] = dict(owner_state)
    meta = dict(metas[0], kind="full", rank=None, world_size=None, ownership=None)
    return {"state": state, "param_groups": shards[0]["param_groups"], "plumage": meta}
