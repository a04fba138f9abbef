"""Readable single-device PLUMAGE-Adam: the test oracle for the production optimizer.

Clarity over speed: one loop over the parameters, one state dict per parameter,
no fusion, no distribution. Written from the math of ``docs/design.md`` §2, independently of
the production optimizer, so that the two can check each other.

Math for a low-rank target ``W`` of shape ``(m, n)`` with gradient ``G``
(shapes in the *oriented* frame: ``s = min(m, n)``, ``l = max(m, n)``)::

    G_o = orient(G)                       # (s, l); Gᵀ when m >= n (right projection)
    every τ steps (refresh k = step // τ):
        P, d = spec.build(G)              # P (s, r) orthonormal, d (r,) inclusion probs
          optimal: Σ ← (1 − 1/k')Σ + (1/k') G_o G_oᵀ   (k'-th refresh: the running mean)
                   P, d = optimal_projection(Σ)      # π ∝ √λ(Σ) water-filled
        M, V = B M, (B∘B) V  with B = P_newᵀ P_old   (realignment, if enabled)
    R = Pᵀ G_o                            # (r, l)      [÷ d[:, None] if dinv == "coords"]
    M = β1 M + (1 − β1) R                 # (r, l)
    V = β2 V + (1 − β2) R∘R               # (r, l)
    N = M / (sqrt(V) + eps)               # HF/GaLore eps placement  [÷ d[:, None] if "lift"]
    W ← W·(1 − lr·wd)                     # decoupled weight decay first
    W ← W − lr·sqrt(1 − β2^t)/(1 − β1^t) · scale · deorient(P N)

Dense parameters (1-D, ``lowrank=False`` or ``rank >= s``) run the same Adam with
``R = G`` and no ``scale``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..config import validate_adam_options, validate_lowrank_options
from ..estimators import (
    deorient, is_left, kept_second_moment, optimal_projection, orient, realign_moments, realignment, resolve_sigma_rank,
    sampler_generator, second_moment_update,
)
from ..estimators.registry import get_estimator, resolve_realign, resolve_svd_method

__all__ = ["ReferencePlumageAdam"]


class ReferencePlumageAdam(torch.optim.Optimizer):
    """PLUMAGE / GaLore / Haar–Stiefel / optimal Adam on one device (oracle implementation).

    Every constructor keyword is also a param-group default, so groups may override
    them. Groups may additionally set ``lowrank: bool``; without it a parameter is
    low-rank iff ``p.dim() == 2``.

    State per parameter (tensors and plain ints only):
      * ``step``: int, number of updates applied to this parameter;
      * ``exp_avg`` / ``exp_avg_sq``: Adam moments ``M``, ``V`` in fp32,
        ``(r, l)`` for low-rank matrices, the parameter's shape for dense ones;
      * ``P`` ``(s, r)`` and ``d`` ``(r,)`` in fp32 for low-rank matrices;
      * ``optimal`` only: ``Sigma`` ``(s, s)`` float64, the mean of ``G_o G_oᵀ`` over the
        ``sigma_count`` refresh gradients seen so far (with ``sigma_weight = w``: their exponential
        average, ``Σ ← (1 − w)·Σ + w·G_o G_oᵀ``); with ``sigma_rank = k``, ``0 < k <= s − 2``
        (``None``, the default: ``k = rank``), compact ``(s, k+1)``, its top ``k`` eigenpairs plus an
        isotropic rest; 0: whole.
    """

    def __init__(
        self,
        params,
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        rank: int = 8,
        update_interval: int = 200,
        estimator: str = "plumage",
        scale: float = 1.0,
        dinv_placement: str = "none",
        realign: bool | None = None,
        svd_method: str | None = None,
        uniform_mix: float = 0.0,
        sigma_rank: int | None = None,
        sigma_weight: float | None = None,
        seed: int = 0,
    ):
        svd_method = resolve_svd_method(estimator, svd_method) or "gram"  # haar takes no SVD
        validate_adam_options(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        validate_lowrank_options(
            rank=rank,
            update_interval=update_interval,
            estimator=estimator,
            scale=scale,
            dinv_placement=dinv_placement,
            svd_method=svd_method,
            uniform_mix=uniform_mix,
            sigma_rank=sigma_rank,
            sigma_weight=sigma_weight,
        )
        if realign is not None and not isinstance(realign, bool):
            raise ValueError(f"Invalid {realign=}: must be None, True or False")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            rank=rank,
            update_interval=update_interval,
            estimator=estimator,
            scale=scale,
            dinv_placement=dinv_placement,
            realign=realign,
            svd_method=svd_method,
            uniform_mix=uniform_mix,
            sigma_rank=sigma_rank,
            sigma_weight=sigma_weight,
            seed=seed,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group.get("lowrank", False):
                bad = [tuple(p.shape) for p in group["params"] if p.dim() != 2]
                if bad:
                    raise ValueError(f"Invalid lowrank=True group: parameters of shapes {bad} are not 2-D")

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _is_lowrank(group: dict, p: Tensor) -> bool:
        """Low-rank path: flagged (or 2-D by default) and ``rank < s`` (else full-rank fallback)."""
        wants_lowrank = group.get("lowrank", p.dim() == 2)
        return bool(wants_lowrank) and group["rank"] < min(p.shape)

    @staticmethod
    def _realign_enabled(group: dict) -> bool:
        """``realign=None`` means the estimator's registry default (on for plumage and haar, off for galore)."""
        return resolve_realign(group["estimator"], group["realign"])

    @staticmethod
    def _adam_moments(state: dict, R: Tensor, beta1: float, beta2: float) -> None:
        """``M = β1 M + (1−β1) R``, ``V = β2 V + (1−β2) R∘R`` in place (all fp32)."""
        state["exp_avg"].mul_(beta1).add_(R, alpha=1.0 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(R, R, value=1.0 - beta2)

    # --------------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        matrix_id = -1  # index of p in the flattened order over all groups, target or not
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                matrix_id += 1
                if p.grad is None:
                    continue  # no gradient: no update, step does not advance
                if p.grad.is_sparse:
                    raise RuntimeError("ReferencePlumageAdam does not support sparse gradients")
                G = p.grad.detach().float()  # (m, n) or any shape for dense params, fp32
                state = self.state[p]
                if self._is_lowrank(group, p):
                    direction = self._lowrank_direction(group, state, G, matrix_id)
                    direction_scale = group["scale"]
                else:
                    direction = self._dense_direction(group, state, G)
                    direction_scale = 1.0

                t = state["step"]  # already advanced
                step_size = lr * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)

                # W ← W·(1 − lr·wd), then W ← W − step_size·scale·direction (math in fp32)
                W = p.detach().float()
                if wd != 0.0:
                    W = W * (1.0 - lr * wd)
                W = W - (step_size * direction_scale) * direction
                p.copy_(W.to(p.dtype))
        return loss

    def _dense_direction(self, group: dict, state: dict, G: Tensor) -> Tensor:
        """Plain Adam: advance moments on ``R = G`` and return ``N = M / (sqrt(V) + eps)``."""
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(G)  # M, shape of p, fp32
            state["exp_avg_sq"] = torch.zeros_like(G)  # V, shape of p, fp32
        beta1, beta2 = group["betas"]
        state["step"] += 1
        self._adam_moments(state, G, beta1, beta2)
        return state["exp_avg"] / (state["exp_avg_sq"].sqrt() + group["eps"])

    def _lowrank_direction(self, group: dict, state: dict, G: Tensor, matrix_id: int) -> Tensor:
        """Refresh if due, advance the compressed moments, return ``deorient(P N)`` (m, n)."""
        left = is_left(G.shape)  # m < n: P multiplies from the left
        if "step" not in state:
            state["step"] = 0

        # ---- refresh (start of the step): new P, d; realign M, V from old P to new P
        if state["step"] % group["update_interval"] == 0:
            k = state["step"] // group["update_interval"]  # refresh index
            gen = sampler_generator(group["seed"], matrix_id, k)
            spec = get_estimator(group["estimator"], family="lowrank_adam")
            if spec.keeps_second_moment:  # optimal: Σ ← running mean (or EMA) of the refresh gradients' G_o G_oᵀ
                count = state.get("sigma_count", 0) + 1
                w = group["sigma_weight"] if group["sigma_weight"] is not None else 1.0 / count
                Sigma = second_moment_update(state.get("Sigma"), G, w)  # (s, s) float64
                state["sigma_count"] = count
                proj = optimal_projection(Sigma, group["rank"], gen, uniform_mix=group["uniform_mix"])
                k = resolve_sigma_rank(group["sigma_rank"], group["rank"])
                state["Sigma"] = kept_second_moment(Sigma, k)  # whole, or compact (s, k+1)
            else:
                proj = spec.build(G, group["rank"], gen, svd_method=group["svd_method"], uniform_mix=group["uniform_mix"])
            P_new = proj.P.float()  # (s, r)
            d_new = proj.d.float().to(P_new.device)  # (r,)
            if "P" not in state:
                r, l = P_new.shape[1], max(G.shape)
                state["exp_avg"] = torch.zeros(r, l, dtype=torch.float32, device=G.device)  # M (r, l)
                state["exp_avg_sq"] = torch.zeros(r, l, dtype=torch.float32, device=G.device)  # V (r, l)
            elif self._realign_enabled(group):
                B = realignment(P_new, state["P"])  # (r, r) = P_newᵀ P_old
                state["exp_avg"], state["exp_avg_sq"] = realign_moments(state["exp_avg"], state["exp_avg_sq"], B)
            # else (GaLore): moments carried over unchanged into the new coordinates
            state["P"], state["d"] = P_new, d_new

        P, d = state["P"], state["d"]  # (s, r), (r,)
        dinv = group["dinv_placement"]

        # ---- project: R = Pᵀ G_o  (r, l)
        G_o = orient(G, left)  # (s, l)
        R = P.mT @ G_o  # (r, l)
        if dinv == "coords":
            R = R / d[:, None]  # Adam sees D⁻¹ Pᵀ G

        # ---- Adam on the compressed gradient
        beta1, beta2 = group["betas"]
        state["step"] += 1
        self._adam_moments(state, R, beta1, beta2)
        N = state["exp_avg"] / (state["exp_avg_sq"].sqrt() + group["eps"])  # (r, l)
        if dinv == "lift":
            N = N / d[:, None]  # lift P D⁻¹ N

        # ---- lift back to the parameter's orientation
        return deorient(P @ N, left)  # (s, l) -> (m, n)
