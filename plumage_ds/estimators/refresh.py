"""The owner refresh: from a matrix's averaged gradient (or its Gram matrix) to its new ``P, d``.

Shared by the optimizers (every sharding case) and the DDP comm hook: whatever moved the refresh
input to the owner, the owner calls :func:`owner_refresh` on the matrices it owns.

Per matrix the route is decided by its estimator (:mod:`.registry`):

* ``sigma`` — estimators that keep a second moment (``optimal``): the Gram matrix ``G_o G_oᵀ`` is
  folded into ``Σ ← (1 − w)·Σ + w·G_o G_oᵀ`` (``w = 1/k`` at the ``k``-th refresh, or a constant
  ``sigma_weight``) and ``Σ`` is decomposed (``eigh``); with ``sigma_rank`` the owner keeps it compact
  until the next refresh (top eigenpairs plus an isotropic rest);
* ``svd`` — ``torch.linalg.svd`` of ``G`` (``svd_method="svd"``, a gradient at hand);
* ``gram`` — ``eigh`` of ``G_o G_oᵀ`` in float64 (given, e.g. summed over row shards, or formed here).

Matrices go group by group (:func:`~plumage_ds.kernels.batched.stack_plan`): small same-shape ones in
one batched decomposition, big ones alone, and each group is drawn before the next is decomposed,
so at most one group's Gram matrices and bases are alive at a time. A matrix whose refresh fails
gets no result and the first failure is named (found by redoing a failed group one matrix at a
time); the caller agrees on it across ranks and raises on every rank.

Pure tensor math: no ``torch.distributed``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from ..kernels.batched import DECOMPOSITION_STACK_ELEMENTS, stack_plan
from .optimal import kept_second_moment
from .registry import Estimator, oriented_gram
from .spectral import gram_basis, short_side_basis


@dataclass
class RefreshInput:
    """What the owner knows about one matrix at a refresh."""

    name: str  # in error messages
    estimator: Estimator
    rank: int
    left: bool  # orientation of ``X`` when it is a gradient
    kind: str  # "grad": X is G (stored orientation); "gram": X is G_o G_oᵀ (s, s) float64
    X: Tensor
    svd_method: str = "gram"
    uniform_mix: float = 0.0
    generator: Optional[torch.Generator] = None  # None: return the design (U, p) instead of a draw
    kept: dict = field(default_factory=dict)  # the estimator's refresh state (optimal: Sigma, sigma_count)
    sigma_weight: Optional[float] = None  # optimal: weight of the newest Gram matrix (None: running mean)
    sigma_rank: int = 0  # optimal: keep Σ as k eigenpairs + isotropic rest between refreshes (0: whole)

    @property
    def route(self) -> str:
        if self.estimator.keeps_second_moment:
            return "sigma"
        return "svd" if self.kind == "grad" and self.svd_method == "svd" else "gram"

    @property
    def short(self) -> int:
        return self.X.shape[0] if self.kind == "gram" else min(self.X.shape)


@dataclass
class RefreshResult:
    """``(P  # (s, r), d  # (r,))`` drawn, or the design ``(U  # (s, s), p  # (s,))`` when no generator
    was given; ``kept``: the estimator's new refresh state (``{}`` but for ``optimal``)."""

    P: Tensor
    d: Tensor
    kept: dict


def owner_refresh(items: list[RefreshInput]) -> tuple[list[Optional[RefreshResult]], Optional[str]]:
    """Every item's new projector (``None`` where its refresh failed) and the first failure's message.

    Nothing is written anywhere: ``kept`` is returned for the caller to stage.
    """
    out: list[Optional[RefreshResult]] = [None] * len(items)
    if not items:
        return out, None
    error: Optional[str] = None
    keys, sizes = [], []
    for it in items:
        route = it.route
        keys.append((route, tuple(it.X.shape) if route == "svd" else it.short, it.X.device))
        sizes.append(it.X.numel() if route == "svd" else it.short * it.short)
    plan = stack_plan(keys, sizes, [8 * n for n in sizes], items[0].X.device, DECOMPOSITION_STACK_ELEMENTS)
    for part in plan:
        group = [items[i] for i in part]
        try:
            spectra, kept = _decompose(group)
        except Exception as err:  # noqa: BLE001 - agreed on by the caller, raised on every rank
            error = error or _first_failure(group, err)
            continue
        for i, it, (U, sigma), keep in zip(part, group, spectra, kept):
            try:
                if it.generator is None:
                    U, p = it.estimator.design(U, sigma, it.rank, uniform_mix=it.uniform_mix)
                    out[i] = RefreshResult(U, p, keep)
                else:
                    proj = it.estimator.from_spectrum(U, sigma, it.rank, it.generator, uniform_mix=it.uniform_mix)
                    out[i] = RefreshResult(proj.P.float(), proj.d.float(), keep)
            except Exception as err:  # noqa: BLE001 - agreed on by the caller, raised on every rank
                error = error or f"refresh of {it.name!r} failed: {type(err).__name__}: {err}"
    return out, error


def _first_failure(group: list[RefreshInput], err: Exception) -> str:
    """Names the first matrix of a failed group that fails on its own (error path only)."""
    for it in group:
        try:
            _decompose([it])
        except Exception as alone:  # noqa: BLE001
            return f"refresh of {it.name!r} failed: {type(alone).__name__}: {alone}"
    return f"refresh of {[it.name for it in group]} failed together: {type(err).__name__}: {err}"


def _stacked(tensors: list[Tensor]) -> Tensor:
    return tensors[0] if len(tensors) == 1 else torch.stack(tensors)


def _unstacked(U: Tensor, sigma: Tensor, n: int) -> list[tuple[Tensor, Tensor]]:
    return [(U, sigma)] if n == 1 else list(zip(U.unbind(0), sigma.unbind(0)))


def _gram(it: RefreshInput) -> Tensor:
    return it.X if it.kind == "gram" else oriented_gram(it.X, it.left)


def _decompose(group: list[RefreshInput]) -> tuple[list[tuple[Tensor, Tensor]], list[dict]]:
    """Spectra ``(U, σ)`` of one stack group (one route, one batched decomposition) and the state each
    item keeps: ``sigma`` items fold their Gram matrix into ``Σ`` first and return ``(Q, √λ)`` of it."""
    route = group[0].route
    if route == "sigma":
        sigmas, counts = [], []
        for it in group:
            counts.append(it.kept.get("sigma_count", 0) + 1)
            weight = it.sigma_weight if it.sigma_weight is not None else 1.0 / counts[-1]
            sigmas.append(it.estimator.second_moment(it.kept.get("Sigma"), _gram(it), weight))  # (s, s) float64
        Q, root = group[0].estimator.spectrum_of_second_moment(_stacked(sigmas))
        spectra = _unstacked(Q, root, len(group))
        kept = [{"Sigma": kept_second_moment(S, it.sigma_rank, qr), "sigma_count": c}
                for it, S, qr, c in zip(group, sigmas, spectra, counts)]
        return spectra, kept
    if route == "svd":
        U, sigma = short_side_basis(_stacked([it.X for it in group]), "svd")
    else:
        U, sigma = gram_basis(_stacked([_gram(it) for it in group]))
    return _unstacked(U, sigma, len(group)), [{} for _ in group]
