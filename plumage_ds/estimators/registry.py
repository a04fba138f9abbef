"""The estimator registry: every name ``optimizer.estimator`` accepts, as one strategy object each.

One table instead of string comparisons scattered over the optimizer, the reference, the comm
hook and the config. Each :class:`Estimator` holds the facts about one estimator and the math
that differs between estimators; every caller asks it instead of comparing names:

* ``family`` — which optimizer runs it: ``"adamw"`` (``torch.optim.AdamW``, no projection),
  ``"lowrank_adam"`` (Adam on ``R = Pᵀ G_o``: :class:`~plumage_ds.optim.PlumageAdamW`, the
  reference oracle, the DeepSpeed composite, the comm hook) or ``"gum"`` (:class:`~plumage_ds.optim.GUM`);
* ``needs_gradient`` — ``P`` is built from the (averaged) gradient, so a refresh moves the full
  gradient to the matrix's owner and decomposes it there; ``False`` (Haar) means every rank draws
  the same ``P`` from the shared seed (:meth:`Estimator.draw`) with no communication;
* ``default_realign`` — map the Adam moments into the new basis when ``P`` changes
  (``M ← B M``, ``V ← (B∘B) V``, ``B = P_newᵀ P_old``);
* ``default_svd_method`` — ``"gram"`` or ``"svd"`` for estimators that decompose ``G``, ``None``
  otherwise (``plumage``: ``gram``, about 2× faster; ``galore``: ``svd``, to reproduce galore-torch);
* ``unbiased`` — ``E[Ĝ] = G`` over the estimator's randomness;
* ``keeps_second_moment`` — the owner keeps ``Σ``  # (s, s), the running mean of ``G_o G_oᵀ`` over
  refresh gradients, and ``P`` is drawn from its spectrum (``optimal``; :meth:`Estimator.second_moment`);
* ``redraws`` — the sampling design is random, so a kept design ``(U, p)`` can be redrawn from
  between refreshes (the comm hook's ``resample_interval``);
* ``uses_uniform_mix`` — whether the ``uniform_mix`` floor on inclusion probabilities applies.

The math of a refresh: :meth:`Estimator.design` (a sampling design ``(U, p)`` from a short-side
spectrum), :meth:`Estimator.from_spectrum` (``P, d`` drawn from it), :meth:`Estimator.draw` (no
spectrum needed) and :meth:`Estimator.build` (from one gradient: the oracle's entry point). The
owner refresh shared by the optimizers and the comm hook is :mod:`.refresh`.

Pure facts and tensor math: no ``torch.distributed``, nothing imported from above ``estimators/``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .optimal import optimal_basis, second_moment_from_gram
from .probabilities import inclusion_probabilities, mix_uniform
from .projectors import Projection, galore_from_basis, haar_projection, projection_from_design
from .spectral import orient, short_side_basis

SVD_METHODS = ("gram", "svd")
"""``gram``: ``eigh`` of the short-side Gram matrix ``G_o G_oᵀ`` (about 3× faster on CPU);
``svd``: ``torch.linalg.svd``. Both give the whole spectrum, which PLUMAGE needs to stay unbiased."""

FAMILIES = ("adamw", "lowrank_adam", "gum")


class Estimator:
    """Facts about one estimator and how it builds ``(P, d)``; subclasses override what differs.

    Shapes are in the oriented frame: ``U``  # (s, s) a short-side basis (columns by descending
    spectrum), ``sigma``  # (s,), ``P``  # (s, r), ``d``  # (r,).
    """

    name: str = ""
    family: str = "lowrank_adam"
    summary: str = ""
    needs_gradient: bool = True
    default_realign: bool = True
    default_svd_method: Optional[str] = "gram"
    unbiased: bool = True
    uses_uniform_mix: bool = False
    keeps_second_moment: bool = False
    in_optimizer: bool = True  # PlumageAdamW/GUM run it (False: the DDP comm hook only)

    def __repr__(self) -> str:
        return f"Estimator({self.name!r})"

    @property
    def has_projector(self) -> bool:
        """A projector ``P`` that changes every ``update_interval`` steps (all but ``adamw``)."""
        return self.family != "adamw"

    @property
    def redraws(self) -> bool:
        """A random design drawn from a spectrum: a kept ``(U, p)`` can be redrawn between refreshes."""
        return self.unbiased and self.needs_gradient

    def _no(self, what: str) -> ValueError:
        return ValueError(f"Invalid estimator={self.name!r}: it {what}")

    # ------------------------------------------------------------------ refresh math
    def design(self, U: Tensor, sigma: Tensor, rank: int, *, uniform_mix: float = 0.0) -> tuple[Tensor, Tensor]:
        """The sampling design ``(U, p)``: ``p``  # (s,) float64 inclusion probabilities, ``Σ p = min(r, s)``."""
        raise self._no("has no sampling design drawn from a spectrum")

    def from_spectrum(
        self, U: Tensor, sigma: Tensor, rank: int, generator: torch.Generator, *, uniform_mix: float = 0.0
    ) -> Projection:
        """``(P, d)`` drawn from a known short-side basis and spectrum (one uniform from ``generator``)."""
        return projection_from_design(*self.design(U, sigma, rank, uniform_mix=uniform_mix), generator)

    def draw(self, short_dim: int, rank: int, generator: torch.Generator, *, device=None) -> Projection:
        """``(P, d)`` without any spectrum (estimators with ``needs_gradient = False``)."""
        raise self._no("needs a gradient to build P")

    def second_moment(self, Sigma: Optional[Tensor], gram: Tensor, weight: float) -> Tensor:
        """``Σ ← (1 − w)·Σ + w·G_o G_oᵀ``  # (s, s) float64 (``keeps_second_moment`` estimators only)."""
        raise self._no("keeps no second moment")

    def spectrum_of_second_moment(self, Sigma: Tensor) -> tuple[Tensor, Tensor]:
        """``(Q, √λ)`` of ``Σ`` (``keeps_second_moment`` estimators only; a stack is one batched ``eigh``)."""
        raise self._no("keeps no second moment")

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
        """``(P, d)`` for one matrix from its (averaged) gradient ``G`` in stored orientation.

        ``G=None`` is allowed when ``needs_gradient`` is false (``short_dim`` then gives ``s``).
        Randomness comes from ``generator`` only, so every rank that passes the same generator gets
        the same ``P``.
        """
        if not self.needs_gradient:
            s = short_dim if short_dim is not None else min(G.shape)
            return self.draw(s, rank, generator, device=device if device is not None else getattr(G, "device", None))
        if self.keeps_second_moment:
            raise ValueError(
                f"Invalid estimator={self.name!r} for build(G): it draws from the second moment Σ of many "
                "gradients; use estimators.optimal_projection(Sigma, ...) or from_spectrum(*optimal_basis(Sigma), ...)"
            )
        if not self.has_projector:
            raise ValueError(f"Invalid estimator={self.name!r}: {self.family} estimators have no projector")
        U, sigma = short_side_basis(G, svd_method or self.default_svd_method)
        return self.from_spectrum(U, sigma, rank, generator, uniform_mix=uniform_mix)


class _AdamW(Estimator):
    name, family, needs_gradient = "adamw", "adamw", False
    default_realign, default_svd_method = False, None
    summary = "torch.optim.AdamW on every parameter (full rank)"

    def draw(self, short_dim, rank, generator, *, device=None):
        raise self._no("has no projector")


class _Plumage(Estimator):
    name, uses_uniform_mix = "plumage", True
    summary = "r singular directions sampled with min-variance probabilities, E[Ĝ] = G"

    def design(self, U, sigma, rank, *, uniform_mix=0.0):
        return U, mix_uniform(inclusion_probabilities(sigma, rank), uniform_mix)


class _GaLore(Estimator):
    # svd: GaLore keeps its moments across refreshes without realignment, so the singular vectors'
    # SIGNS are part of the algorithm; torch.linalg.svd's (galore-torch's) are the ones to match
    name, default_realign, default_svd_method, unbiased = "galore", False, "svd", False
    summary = "top-r singular directions (biased), no realignment, as GaLore"

    def from_spectrum(self, U, sigma, rank, generator, *, uniform_mix=0.0):
        return galore_from_basis(U, rank)


class _Haar(Estimator):
    name, needs_gradient, default_svd_method = "haar", False, None
    summary = "uniformly random orthonormal P from the shared seed, (s/r) P Pᵀ G; no SVD"

    def draw(self, short_dim, rank, generator, *, device=None):
        return haar_projection(short_dim, rank, generator, device=device)


class _Optimal(_Plumage):
    # no decomposition of G: the owner decomposes its Σ (eigh), so svd_method does not apply
    name, default_svd_method, keeps_second_moment = "optimal", None, True
    summary = "r directions sampled with π ∝ √λ(Σ), Σ the running mean of G Gᵀ over refreshes, kept by the owner"

    def second_moment(self, Sigma, gram, weight):
        return second_moment_from_gram(Sigma, gram, weight)

    def spectrum_of_second_moment(self, Sigma):
        return optimal_basis(Sigma)


class _Gum(_GaLore):
    name, family, default_svd_method, unbiased = "gum", "gum", "gram", True
    summary = "GaLore projection + Muon + layer-wise sampling of full-rank residuals"

    @property
    def redraws(self) -> bool:
        return False  # unbiased through the layer draw, not through a random P


ESTIMATORS: dict[str, Estimator] = {e.name: e for e in (_AdamW(), _Plumage(), _GaLore(), _Haar(), _Optimal(), _Gum())}

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


def get_estimator(name: object, *, key: str = "estimator", family: Optional[str] = None) -> Estimator:
    """The strategy of ``name``; ``ValueError`` naming ``key`` and the value otherwise.

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


def oriented_gram(G: Tensor, left: bool) -> Tensor:
    """``G_o G_oᵀ``  # (s, s) in float64 from a gradient in stored orientation (``left``: ``G_o = G``)."""
    Go = orient(G.detach().double(), left)  # (s, l)
    return Go @ Go.mT
