"""The estimator registry: every name ``optimizer.estimator`` accepts, and the facts about it.

One table instead of string comparisons scattered over the optimizer, the reference, the comm
hook and the config. Each :class:`EstimatorSpec` says

* ``family`` — which optimizer runs it: ``"adamw"`` (``torch.optim.AdamW``, no projection),
  ``"lowrank_adam"`` (Adam on ``R = Pᵀ G_o``: :class:`~plumage_ds.optim.PlumageAdamW`, the
  reference oracle, the DeepSpeed composite, the comm hook) or ``"gum"`` (:class:`~plumage_ds.optim.GUM`);
* ``needs_gradient`` — ``P`` is built from the (averaged) gradient, so a refresh moves the full
  gradient to the matrix's owner and runs an SVD there; ``False`` (Haar) means every rank draws
  the same ``P`` from the shared seed with no communication;
* ``default_realign`` — map the Adam moments into the new basis when ``P`` changes
  (``M ← B M``, ``V ← (B∘B) V``, ``B = P_newᵀ P_old``);
* ``default_svd_method`` — ``"gram"`` or ``"svd"`` for estimators that take an SVD, ``None`` otherwise
  (``plumage``: ``gram``, about 2× faster, and its estimate and realignment do not depend on the
  signs of the singular vectors; ``galore``: ``svd``, to reproduce galore-torch);
* ``unbiased`` — ``E[Ĝ] = G`` over the estimator's randomness;
* ``keeps_second_moment`` — the owner keeps ``Σ``  # (s, s), the running mean of ``G_o G_oᵀ`` over
  refresh gradients, and ``P`` is drawn from its spectrum (``optimal``; :mod:`.optimal`);
* ``uses_uniform_mix`` — whether the ``uniform_mix`` floor on inclusion probabilities applies;
* :meth:`EstimatorSpec.build` — how to build ``(P, d)`` for one matrix.

Pure facts and tensor math: no ``torch.distributed``, nothing imported from above ``estimators/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .projectors import (
    Projection,
    galore_from_basis,
    galore_projection,
    haar_projection,
    plumage_from_basis,
    plumage_projection,
)

SVD_METHODS = ("gram", "svd")
"""``gram``: ``eigh`` of the short-side Gram matrix ``G_o G_oᵀ`` (about 3× faster on CPU);
``svd``: ``torch.linalg.svd``. Both give the whole spectrum, which PLUMAGE needs to stay unbiased."""

FAMILIES = ("adamw", "lowrank_adam", "gum")


@dataclass(frozen=True)
class EstimatorSpec:
    """Facts about one estimator (see the module docstring)."""

    name: str
    family: str
    needs_gradient: bool
    default_realign: bool
    default_svd_method: Optional[str]
    unbiased: bool
    uses_uniform_mix: bool
    summary: str
    in_optimizer: bool = True  # PlumageAdamW/GUM run it (False: the DDP comm hook only)
    keeps_second_moment: bool = False  # the owner keeps Σ = mean of G_o G_oᵀ over refreshes (optimal)

    @property
    def has_projector(self) -> bool:
        """A projector ``P`` that changes every ``update_interval`` steps (all but ``adamw``)."""
        return self.family != "adamw"

    def build(
        self,
        G: Optional[Tensor],
        rank: int,
        generator: torch.Generator,
        *,
        short_dim: Optional[int] = None,
        device=None,
        svd_method: Optional[str] = None,
        uniform_mix: float = 0.0,
    ) -> Projection:
        """``(P, d)`` for one matrix: ``P``  # (s, r), ``d``  # (r,).

        ``G`` is the averaged gradient in its stored orientation (``None`` is allowed only when
        ``needs_gradient`` is false; then ``short_dim`` gives ``s``). Randomness comes from
        ``generator`` only, so every rank that passes the same generator gets the same ``P``.
        """
        method = svd_method or self.default_svd_method
        if self.keeps_second_moment:
            raise ValueError(
                f"Invalid estimator={self.name!r} for build(G): it draws from the second moment Σ of many "
                "gradients; use estimators.optimal_projection(Sigma, ...) or build_from_basis(*optimal_basis(Sigma), ...)"
            )
        if self.name == "plumage":
            return plumage_projection(G, rank, generator, svd_method=method, uniform_mix=uniform_mix)
        if self.name in ("galore", "gum"):
            return galore_projection(G, rank, svd_method=method)
        if self.name == "haar":
            s = short_dim if short_dim is not None else min(G.shape)
            return haar_projection(s, rank, generator, device=device if device is not None else getattr(G, "device", None))
        raise ValueError(f"Invalid estimator={self.name!r}: {self.family} estimators have no projector")

    def build_from_basis(
        self, U: Tensor, sigma: Tensor, rank: int, generator: torch.Generator, *, uniform_mix: float = 0.0
    ) -> Projection:
        """:meth:`build` when the short-side basis ``U``  # (s, s) and spectrum ``sigma``  # (s,) are
        already known (e.g. from a Gram matrix summed over row shards). ``optimal``: ``(Q, √λ)`` of
        ``Σ`` (:func:`~plumage_ds.estimators.optimal.optimal_basis`); its design is PLUMAGE's
        water-filling fed ``√λ(Σ)`` instead of ``σ(G)``, so the same draw as
        :func:`~plumage_ds.estimators.optimal.optimal_projection`."""
        if self.name in ("plumage", "optimal"):
            return plumage_from_basis(U, sigma, rank, generator, uniform_mix=uniform_mix)
        if self.name in ("galore", "gum"):
            return galore_from_basis(U, rank)
        raise ValueError(f"Invalid estimator={self.name!r}: it does not draw P from a spectrum")


ESTIMATORS: dict[str, EstimatorSpec] = {
    spec.name: spec
    for spec in (
        EstimatorSpec(
            name="adamw", family="adamw", needs_gradient=False, default_realign=False, default_svd_method=None,
            unbiased=True, uses_uniform_mix=False, summary="torch.optim.AdamW on every parameter (full rank)",
        ),
        EstimatorSpec(
            name="plumage", family="lowrank_adam", needs_gradient=True, default_realign=True,
            default_svd_method="gram", unbiased=True, uses_uniform_mix=True,
            summary="r singular directions sampled with min-variance probabilities, E[Ĝ] = G",
        ),
        EstimatorSpec(
            # svd: GaLore keeps its moments across refreshes without realignment, so the singular
            # vectors' SIGNS are part of the algorithm; only torch.linalg.svd's (galore-torch's) match it
            name="galore", family="lowrank_adam", needs_gradient=True, default_realign=False,
            default_svd_method="svd", unbiased=False, uses_uniform_mix=False,
            summary="top-r singular directions (biased), no realignment, as GaLore",
        ),
        EstimatorSpec(
            name="haar", family="lowrank_adam", needs_gradient=False, default_realign=True,
            default_svd_method=None, unbiased=True, uses_uniform_mix=False,
            summary="uniformly random orthonormal P from the shared seed, (s/r) P Pᵀ G; no SVD",
        ),
        EstimatorSpec(
            # no SVD of G: the owner decomposes its Σ (eigh), so svd_method does not apply
            name="optimal", family="lowrank_adam", needs_gradient=True, default_realign=True,
            default_svd_method=None, unbiased=True, uses_uniform_mix=True, keeps_second_moment=True,
            summary="r directions sampled with π ∝ √λ(Σ), Σ the running mean of G Gᵀ over refreshes, kept by the owner",
        ),
        EstimatorSpec(
            name="gum", family="gum", needs_gradient=True, default_realign=False, default_svd_method="gram",
            unbiased=True, uses_uniform_mix=False,
            summary="GaLore projection + Muon + layer-wise sampling of full-rank residuals",
        ),
    )
}

RENAMED = {"topr": "galore"}
"""Old estimator names and their current names (a clear error, never a silent alias)."""


def estimator_names(family: Optional[str] = None) -> tuple[str, ...]:
    """Registered names (of one ``family`` if given), in registry order."""
    return tuple(n for n, s in ESTIMATORS.items() if family is None or s.family == family)


def estimator_problem(name: object, family: Optional[str] = None) -> Optional[str]:
    """Why ``name`` is not a registered estimator (of ``family``), or ``None`` if it is."""
    if isinstance(name, str) and name in RENAMED:
        return f"renamed to {RENAMED[name]!r}"
    valid = list(estimator_names(family))
    if not isinstance(name, str) or name not in valid:
        return f"must be one of {valid}"
    return None


def get_estimator(name: object, *, key: str = "estimator", family: Optional[str] = None) -> EstimatorSpec:
    """The spec of ``name``; ``ValueError`` naming ``key`` and the value otherwise.

    ``family`` restricts the accepted names (e.g. ``"lowrank_adam"`` for :class:`PlumageAdamW`).
    """
    problem = estimator_problem(name, family)
    if problem is not None:
        raise ValueError(f"Invalid {key}={name!r}: {problem}")
    return ESTIMATORS[name]


def resolve_realign(name: str, realign: Optional[bool]) -> bool:
    """``realign`` if set, else the estimator's default."""
    return get_estimator(name).default_realign if realign is None else bool(realign)


def resolve_svd_method(name: str, svd_method: Optional[str]) -> Optional[str]:
    """``svd_method`` if set, else the estimator's default (``None``: it takes no SVD)."""
    return get_estimator(name).default_svd_method if svd_method is None else svd_method
