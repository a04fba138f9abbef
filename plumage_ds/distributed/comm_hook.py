"""Unbiased low-rank gradient-communication compression as a DDP comm hook (``docs/design.md`` §4.3).

Shape of torch's PowerSGD hook: a state object (:class:`PlumageHookState`, ``__slots__``,
pickles without its process group) and a free hook function (:func:`plumage_hook`)::

    state = PlumageHookState(ddp_model, estimator="plumage", rank=8, update_interval=200)
    ddp_model.register_comm_hook(state, plumage_hook)

The knobs are those of :class:`~plumage_ds.config.OptimizerConfig` (the same schema, loaded by
the same strict ``from_dict`` as the main job's ``optimizer:`` section): ``estimator``, ``rank``,
``update_interval``, ``seed``, ``svd_method``, ``uniform_mix``, plus the hook's own
``comm_hook.start_iter`` / ``comm_hook.min_compression_rate`` (also accepted as plain keywords).

Any optimizer then sees, per parameter, an **unbiased** estimate of the averaged gradient:
``E[Ĝ] = G = mean_k G_k`` over the estimator's randomness, with **no error feedback** and no
gradient-sized buffer (the hook keeps only ``P`` ``(s, r)`` and ``d`` ``(r,)`` per matrix).

Estimators (one state field, ``estimator``), all in the oriented frame of
:mod:`plumage_ds.estimators.spectral` (``G_o`` is ``(s, l)``, ``s = min(m, n)``):

* ``"haar"`` — Haar–Stiefel: ``P`` uniform on the Stiefel manifold, drawn on every rank from
  ``sampler_generator(seed, param_id, (iter − start_iter) // update_interval)``; ``d = r/s``, so
  ``Ĝ = (s/r) P Pᵀ G``. No communication to agree on ``P``.
* ``"plumage"`` — ``P, d`` from :func:`~plumage_ds.estimators.plumage_projection` of the
  *averaged* gradient of a refresh step (every ``update_interval`` steps), computed once on the matrix's
  owner and broadcast. For any later ``G``, ``E_S[P D⁻¹ Pᵀ] = Σ_i p_i u_i u_iᵀ / p_i = I``
  whenever every ``p_i > 0``, so ``E[Ĝ] = G`` holds on every step until the next refresh.
* ``"optimal"`` — the optimal design for *stochastic* gradients
  (:mod:`plumage_ds.estimators.optimal`): the owner keeps ``Σ``  # (s, s), a running mean of
  ``G_avg G_avgᵀ`` over the refresh steps (``comm_hook.sigma_weight``: a constant weight instead),
  and draws ``P, d`` with ``π ∝ √λ(Σ)``; unbiased like ``plumage``.
* ``"galore"`` — GaLore-style top-``r`` (``d = 1``), refreshed like ``plumage``. **Biased**;
  a baseline knob (called ``topr`` before the config schema was unified).

Two options change how the coefficients travel, both keeping ``E[Ĝ] = G``:

* ``resample=True`` (``plumage``/``optimal``): the owner broadcasts the whole design ``(U, p)``
  (``U``  # (s, s), ``p``  # (s,)) at a refresh, and every rank redraws ``S`` from it every
  ``kappa`` steps (``sampler_generator(seed, param_id, RESAMPLE_TAG + draw)``), so the sampling
  error of consecutive steps is independent instead of repeated for ``tau`` steps; no extra
  communication on ordinary steps.
* ``quantize="int8"|"fp16"``: ``R_k`` is stochastically rounded onto a grid shared by all ranks
  (:mod:`plumage_ds.estimators.rounding`: per-row scales agreed by one max-all-reduce, integer sums
  exact in the container), 1 or 2 bytes per coefficient instead of 4.

Collectives per bucket (through :class:`~plumage_ds.distributed.comm.Collectives`):

* warm-up step (``iter < start_iter``), or a bucket with no compressed matrix:
  one all-reduce of the bucket buffer (tag ``dense_grad``);
* refresh step (estimators whose ``P`` needs the gradient, ``(iter − start_iter) % update_interval == 0``): one all-reduce of
  the whole bucket buffer (tag ``refresh_grad``; the step's output is the exact average), then
  one broadcast per owner rank of the packed ``[P, d]`` of its refreshed matrices (tag
  ``projector``);
* ordinary step: ONE all-reduce (tag ``lowrank_grad``) of one fp32 buffer packing ``R_k = Pᵀ G_k``
  of every compressed matrix and the uncompressed rest (1-D tensors, non-targets); then
  ``Ĝ_o = P D⁻¹ R`` and the averaged rest are written into the bucket buffer. The rest travels on its
  own (tag ``dense_grad``) when it cannot share the fp32 sum: with ``quantize`` (first a
  max-all-reduce of the per-row scales, tag ``lowrank_scale``, then the integers in their container)
  and for bf16/fp16 buckets (packing would double the rest's bytes).

Synchronous or asynchronous (``comm_hook.async_comm``; ``None``: asynchronous on NCCL only). The
synchronous path blocks inside the hook and returns a completed Future (right for gloo: the stock
PowerSGD hook, which blocks inside ``.then`` callbacks, hangs there with several buckets). The
asynchronous path starts the all-reduces of warm-up and ordinary steps with ``async_op=True`` and
returns ``future.then(decompress and write back)``, so DDP overlaps them with the rest of the
backward; no callback waits on an unfinished Future. Refresh steps stay synchronous on both paths
(the owners need the average before they decompose, and a failed refresh must raise from the hook on
every rank), and so does the small ``lowrank_scale`` max-all-reduce. Both paths run the same
operations on the same tensors: bitwise the same result.

Compression rule (PowerSGD's ``min_compression_rate`` idea): a parameter is compressed iff it
has ``ndim >= 2`` (viewed as ``(shape[0], numel / shape[0])``) and its compression rate
``s / min(rank, s) >= min_compression_rate``. 1-D tensors and matrices too small for the
requested rank go uncompressed; :meth:`PlumageHookState.param_modes` reports each decision.
"""

import dataclasses
import math
import threading
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from plumage_ds.config import CommHookConfig, ConfigError, OptimizerConfig, check_estimator, from_dict, to_dict
from plumage_ds.distributed.comm import Collectives
from plumage_ds.distributed.ownership import greedy_ownership
from plumage_ds.estimators import (
    derive_seed,
    galore_projection,
    haar_projection,
    is_left,
    optimal_design,
    orient,
    oriented_shape,
    plumage_design,
    projection_from_design,
    sampler_generator,
    second_moment_update,
)
from plumage_ds.estimators.rounding import (
    QUANTIZERS,
    dequantize_rows,
    quantization_levels,
    quantize_rows,
    row_scales,
)

from plumage_ds.estimators.registry import estimator_names, get_estimator, resolve_svd_method
from plumage_ds.optim.batched import matmuls
from plumage_ds.optim.param_groups import select_targets

__all__ = ["HOOK_ESTIMATORS", "PlumageHookState", "hook_config", "plumage_hook"]

HOOK_ESTIMATORS = estimator_names("lowrank_adam")
"""The registry's low-rank estimators; ``galore`` is biased (top-r, ``d = 1``): a baseline knob."""

RESAMPLE_TAG = 1 << 40
"""Offset of the per-step redraws in the ``draw_index`` of :func:`sampler_generator` (the
refresh draws use the refresh index itself), so the two streams never share a seed."""

_ROUNDING_TAG = 0x5EA1

_HOOK_KEYS = tuple(f.name for f in dataclasses.fields(CommHookConfig))


def hook_config(config=None, **knobs) -> OptimizerConfig:
    """The hook's :class:`OptimizerConfig`: ``config`` (a config, a mapping or ``None``) plus ``knobs``.

    Goes through ``from_dict(OptimizerConfig, ...)``, so a bad key or value gets the same message
    as in the main job's YAML (``Invalid rank=0: must be a positive integer``). The hook's own
    keys (``start_iter``, ``min_compression_rate``, ``resample_interval``, ``quantize``,
    ``sigma_weight``, ``async_comm``) may be given as plain keywords; they land in ``comm_hook``. The estimator
    must be a low-rank one (``plumage``, ``galore``, ``haar`` or ``optimal``).
    """
    data = to_dict(config) if isinstance(config, OptimizerConfig) else dict(config or {})
    for key, value in knobs.items():
        if key in _HOOK_KEYS:
            data["comm_hook"] = {**dict(data.get("comm_hook") or {}), key: value}
        else:
            data[key] = value
    cfg = from_dict(OptimizerConfig, data)
    check_estimator(cfg.estimator, family="lowrank_adam")
    return cfg


def _named_trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """``(name, param)`` in DDP's order; names without DDP's ``module.`` prefix."""
    module = getattr(model, "module", model) if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


class PlumageHookState:
    """State of :func:`plumage_hook`: configuration, step counter and per-matrix ``(P, d)``.

    Args:
        model: the DDP-wrapped model (or its module). Parameters are identified by their
            position in ``named_parameters()`` (trainable ones, DDP's order), which is the
            ``param_id`` mixed into every seed; the hook maps ``bucket.parameters()`` to that
            index through the parameter objects, so DDP's bucket rebuild after iteration 1
            changes nothing.
        config: an :class:`~plumage_ds.config.OptimizerConfig` (or a mapping of its keys); the
            hook reads ``estimator`` (``plumage``, ``galore`` — biased, a baseline — or ``haar``),
            ``rank`` (capped at each matrix's short side), ``update_interval`` (steps between
            refreshes of ``P``; for ``haar`` between redraws, 1 = a fresh ``P`` every step),
            ``seed`` (every draw comes from ``sampler_generator(seed, param_id, draw)``),
            ``svd_method`` and ``uniform_mix`` (PLUMAGE: mix ``ε`` of uniform probability into the
            design so no direction has ``p = 0``; that keeps ``E[Ĝ_t] = G_t`` for the gradients
            *between* refreshes too — 0.1 cost no loss in the measurements of ``docs/benchmarks.md``;
            0, the default of the one schema, is the paper's design), and
            ``comm_hook.start_iter`` (warm-up steps with a plain all-reduce) and
            ``comm_hook.min_compression_rate`` (compress a matrix only if ``s / min(rank, s) >=`` it).
        process_group: group to communicate on (``None``: the default group).
        **knobs: config keys given directly (``rank=4``, ``start_iter=0``...), applied over ``config``.
            The hook's own section ``comm_hook`` also holds ``resample_interval`` (``plumage`` /
            ``optimal``: redraw ``S`` every that many steps from the design ``(U, p)`` broadcast at
            the refresh; 0 = one draw per refresh), ``quantize`` (``None``: fp32 coefficients;
            ``"int8"``/``"fp16"``: unbiased stochastic rounding of ``R_k`` onto a shared integer grid,
            1 or 2 bytes per coefficient) and ``sigma_weight`` (``optimal``: weight of the newest
            refresh gradient in ``Σ``; ``None``: the running mean) and ``async_comm`` (``True``: return DDP a
            Future chained on ``async_op`` all-reduces; ``False``: collectives inside the hook; ``None``:
            asynchronous on NCCL only — :meth:`uses_async`).

    Invariant: every rank holds the same ``iter`` and the same ``(P, d)`` for every matrix, so
    the decompressed gradient is bit-identical across ranks and DDP replicas stay in sync.

    Pickling drops the process group, the collective layer (its byte counters restart) and the
    parameter-object map; after ``pickle.loads`` the group is the default group and
    :meth:`bind` must be called with the (new) model before the hook runs.
    """

    __slots__ = [
        "process_group",
        "estimator",
        "rank",
        "tau",
        "kappa",
        "start_iter",
        "min_compression_rate",
        "seed",
        "svd_method",
        "uniform_mix",
        "resample",
        "quantize",
        "sigma_weight",
        "async_comm",
        "iter",
        "param_names",
        "param_shapes",
        "projections",
        "designs",
        "sigma",
        "deterministic",
        "targets",
        "skipped_refreshes",
        "_param_index",
        "_collectives",
        "_owners",
    ]

    def __init__(
        self,
        model: torch.nn.Module,
        config=None,
        *,
        process_group: Optional[dist.ProcessGroup] = None,
        **knobs,
    ) -> None:
        cfg = hook_config(config, **knobs)
        self.process_group = process_group
        self.estimator = cfg.estimator
        self.rank = cfg.rank
        self.tau = cfg.update_interval  # refresh interval (estimators that need the gradient)
        hook = cfg.comm_hook
        # redraw interval: haar draws a new P every update_interval steps (the same knob as in the
        # optimizer); plumage/optimal with resample_interval redraw S from the kept design
        self.kappa = cfg.update_interval if cfg.estimator == "haar" else max(1, hook.resample_interval)
        self.start_iter = hook.start_iter
        self.min_compression_rate = hook.min_compression_rate
        self.seed = cfg.seed
        self.svd_method = resolve_svd_method(cfg.estimator, cfg.svd_method) or "gram"  # haar: unused
        self.uniform_mix = cfg.uniform_mix
        if hook.resample_interval and cfg.estimator not in ("plumage", "optimal"):
            raise ConfigError(
                "comm_hook.resample_interval", hook.resample_interval,
                f"only 'plumage' and 'optimal' keep a design to redraw from, not {cfg.estimator!r}",
            )
        if hook.sigma_weight is not None and cfg.estimator != "optimal":
            raise ConfigError("comm_hook.sigma_weight", hook.sigma_weight, f"only 'optimal' keeps Σ, not {cfg.estimator!r}")
        self.resample = hook.resample_interval > 0
        self.quantize = hook.quantize
        self.sigma_weight = hook.sigma_weight
        self.async_comm = hook.async_comm
        self.iter = 0
        named = _named_trainable(model)
        if not named:
            raise ValueError("Invalid model: it has no trainable parameters")
        self.param_names = [n for n, _ in named]
        self.param_shapes = [tuple(p.shape) for _, p in named]
        self.projections: dict[int, tuple[int, Tensor, Tensor]] = {}  # pid -> (draw, P (s, r), d (r,))
        self.designs: dict[int, tuple[int, Tensor, Tensor]] = {}  # resample: pid -> (refresh, U (s, s), p (s,))
        self.sigma: dict[int, tuple[int, Tensor]] = {}  # optimal, on the owner: pid -> (count, Σ (s, s) fp64)
        self.deterministic: set[int] = set()  # pids whose current PLUMAGE design has no randomness
        # the optimizers' selection rule (target_modules: regexes, "all-linear", None = the default)
        module = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
        chosen = {id(p) for _, p, _ in select_targets(module, cfg.target_modules)}
        self.targets: set[int] = {i for i, (_, p) in enumerate(named) if id(p) in chosen}
        self.skipped_refreshes = 0  # refreshes left out because the averaged gradient held NaN/Inf
        self._param_index = {id(p): i for i, (_, p) in enumerate(named)}
        self._collectives: Optional[Collectives] = None
        self._owners: Optional[list[int]] = None

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict:
        """Plain data only: no process group, collective layer or parameter-object map."""
        skip = {"process_group", "_collectives", "_param_index", "_owners"}
        return {slot: getattr(self, slot) for slot in self.__slots__ if slot not in skip}

    def __setstate__(self, state: dict) -> None:
        """Restore; the process group becomes the default group. Call :meth:`bind` next."""
        for slot, value in state.items():
            setattr(self, slot, value)
        self.process_group = dist.distributed_c10d._get_default_group() if dist.is_initialized() else None
        self._collectives = None
        self._owners = None
        self._param_index = {}

    def bind(self, model: torch.nn.Module) -> "PlumageHookState":
        """Map ``model``'s parameter objects to the stored parameter ids (after unpickling)."""
        named = _named_trainable(model)
        names = [n for n, _ in named]
        shapes = [tuple(p.shape) for _, p in named]
        if names != self.param_names or shapes != self.param_shapes:
            diff = next(
                (i for i in range(max(len(names), len(self.param_names)))
                 if i >= len(names) or i >= len(self.param_names)
                 or (names[i], shapes[i]) != (self.param_names[i], self.param_shapes[i])),
                None,
            )
            raise ValueError(
                f"Invalid model for this hook state: parameter #{diff} differs "
                f"(state has {len(self.param_names)} parameters, model has {len(names)})"
            )
        self._param_index = {id(p): i for i, (_, p) in enumerate(named)}
        return self

    # ------------------------------------------------------------------ plan
    def matrix_shape(self, pid: int) -> Optional[tuple[int, int]]:
        """``(shape[0], numel / shape[0])`` for ``ndim >= 2`` parameters, else ``None``."""
        shape = self.param_shapes[pid]
        if len(shape) < 2:
            return None
        return (shape[0], math.prod(shape[1:]))

    def effective_rank(self, pid: int) -> int:
        """``min(rank, s)`` of a matrix parameter."""
        return min(self.rank, min(self.matrix_shape(pid)))

    def is_compressed(self, pid: int) -> bool:
        """The compression rule: a target (``target_modules``), ``ndim >= 2`` and
        ``s / min(rank, s) >= min_compression_rate``."""
        mshape = self.matrix_shape(pid)
        if mshape is None or 0 in mshape or pid not in self.targets:
            return False
        s = min(mshape)
        return s / min(self.rank, s) >= self.min_compression_rate

    def param_modes(self) -> dict[str, tuple[str, str]]:
        """``name -> (mode, reason)`` with mode ``lowrank`` or ``dense`` (no silent fallback)."""
        out = {}
        for pid, name in enumerate(self.param_names):
            mshape = self.matrix_shape(pid)
            if mshape is None:
                out[name] = ("dense", f"{len(self.param_shapes[pid])}-D tensor")
            elif pid not in self.targets:
                out[name] = ("dense", "not a target (target_modules)")
            elif not self.is_compressed(pid):
                s = min(mshape)
                out[name] = (
                    "dense",
                    f"compression rate s/r={s}/{min(self.rank, s)} < min_compression_rate={self.min_compression_rate:g}",
                )
            else:
                s, l = oriented_shape(mshape)
                r = self.effective_rank(pid)
                note = " (deterministic design: refresh gradient rank-deficient)" if pid in self.deterministic else ""
                extra = "".join(
                    f", {k}" for k, on in (("resampled", self.resample), (f"{self.quantize}", self.quantize)) if on
                )
                rate = s * 4 / (r * (QUANTIZERS[self.quantize][0].itemsize if self.quantize else 4))
                out[name] = ("lowrank", f"{self.estimator} r={r} of s={s}, l={l}{extra}: {rate:.3g}x fewer bytes{note}")
        return out

    def owners(self) -> list[int]:
        """Owner rank (in the group) of each parameter's refresh SVD (``-1``: not compressed).

        Greedy by SVD cost ``s²·l`` and projector bytes ``s·r`` (:func:`greedy_ownership`);
        a pure function of shapes and world size, recomputed (never pickled).
        """
        if self._owners is None:
            world = self.collectives().world_size
            pids = [i for i in range(len(self.param_names)) if self.is_compressed(i)]
            costs, sizes = [], []
            for pid in pids:
                s, l = oriented_shape(self.matrix_shape(pid))
                costs.append(float(s * s * l))
                sizes.append(s * self.effective_rank(pid))
            plan = greedy_ownership(costs, sizes, world)
            owners = [-1] * len(self.param_names)
            for pid, owner in zip(pids, plan):
                owners[pid] = owner
            self._owners = owners
        return self._owners

    def collectives(self) -> Collectives:
        """The accounted collective layer on ``process_group`` (created on first use)."""
        if self._collectives is None:
            self._collectives = Collectives(self.process_group)
        return self._collectives

    def uses_async(self) -> bool:
        """Whether ordinary and warm-up steps return a Future chained on an async all-reduce:
        ``comm_hook.async_comm``, or (``None``) whether the group's backend is NCCL."""
        if self.async_comm is not None:
            return self.async_comm
        return dist.get_backend(self.process_group) == "nccl"

    def comm_stats(self) -> dict:
        """Bytes per ``tag/kind``: ``last_step`` (last completed iteration) and ``total``."""
        return self.collectives().comm_stats()

    # ------------------------------------------------------------------ schedule
    def phase(self, it: Optional[int] = None) -> str:
        """``warmup``, ``refresh`` or ``lowrank`` for iteration ``it`` (default: ``self.iter``)."""
        it = self.iter if it is None else it
        if it < self.start_iter:
            return "warmup"
        if check_estimator(self.estimator).needs_gradient and (it - self.start_iter) % self.tau == 0:
            return "refresh"
        return "lowrank"

    def _pid(self, p: Tensor) -> int:
        try:
            return self._param_index[id(p)]
        except KeyError:
            raise RuntimeError(
                "plumage_hook got a parameter this state does not know; after unpickling "
                "call state.bind(ddp_model) before training"
            ) from None

    def _haar(self, pid: int, device: torch.device) -> tuple[Tensor, Tensor]:
        draw = (self.iter - self.start_iter) // self.kappa
        cached = self.projections.get(pid)
        if cached is None or cached[0] != draw or cached[1].device != device:
            s = min(self.matrix_shape(pid))
            proj = haar_projection(s, self.rank, sampler_generator(self.seed, pid, draw), device=device)
            cached = (draw, proj.P, proj.d)
            self.projections[pid] = cached
        return cached[1], cached[2]

    def _resampled(self, pid: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(P, d)`` drawn from the kept design ``(U, p)`` for this step's draw index (cached)."""
        draw = RESAMPLE_TAG + (self.iter - self.start_iter) // self.kappa
        cached = self.projections.get(pid)
        if cached is None or cached[0] != draw or cached[1].device != device:
            _, U, p = self.designs[pid]
            proj = projection_from_design(U, p, sampler_generator(self.seed, pid, draw), device=device)
            cached = (draw, proj.P, proj.d)
            self.projections[pid] = cached
        return cached[1], cached[2]

    def _current(self, pid: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """This step's ``(P, d)`` of a compressed matrix."""
        if not get_estimator(self.estimator).needs_gradient:  # haar: drawn from the seed
            return self._haar(pid, device)
        if self.resample:
            return self._resampled(pid, device)
        _, P, d = self.projections[pid]
        return P, d

    def _has_projection(self, pid: int) -> bool:
        return not get_estimator(self.estimator).needs_gradient or pid in (self.designs if self.resample else self.projections)

    def _end_bucket(self, bucket) -> None:
        if bucket.is_last():
            self.iter += 1
            self.collectives().end_step()


def _new_future(device: torch.device, value: Optional[Tensor] = None) -> torch.futures.Future:
    """A Future on ``device`` (CUDA: DDP's wait then orders its stream after ours), completed with ``value`` if given."""
    fut = torch.futures.Future(devices=[device]) if device.type == "cuda" else torch.futures.Future()
    if value is not None:
        fut.set_result(value)
    return fut


def _bucket_views(bucket, buffer: Tensor) -> list[Tensor]:
    """Per-parameter views of ``buffer`` (DDP lays a bucket out densely, in ``gradients()`` order)."""
    views, off = [], 0
    for g in bucket.gradients():
        views.append(buffer.narrow(0, off, g.numel()).view(g.shape))
        off += g.numel()
    if off != buffer.numel():
        raise RuntimeError(f"plumage_hook: bucket gradients cover {off} of {buffer.numel()} buffer elements")
    return views


def _oriented_views(state: PlumageHookState, pid: int, grad: Tensor) -> Tensor:
    """``G_o`` ``(s, l)``: a view of the gradient (writes go to the bucket)."""
    mshape = state.matrix_shape(pid)
    return orient(grad.view(mshape), is_left(mshape))


def _owner_design(state: PlumageHookState, pid: int, G: Tensor, refresh_idx: int) -> tuple[Tensor, Tensor, Optional[tuple]]:
    """Owner: the refreshed matrix's ``(U, p)`` (resample) or ``(P, d)`` (one draw), fp32 on ``G``'s
    device, and (``optimal``) the updated ``(count, Σ)`` to keep once the refresh succeeded everywhere."""
    r = state.effective_rank(pid)
    sigma = None
    if not get_estimator(state.estimator).unbiased:  # galore: top-r
        proj = galore_projection(G, state.rank, svd_method=state.svd_method)
        return proj.P, proj.d, None
    if state.estimator == "optimal":
        count, Sigma = state.sigma.get(pid, (0, None))
        weight = state.sigma_weight if state.sigma_weight is not None else 1.0 / (count + 1)
        Sigma = second_moment_update(Sigma, G, weight)  # (s, s) float64
        sigma = (count + 1, Sigma)
        U, p = optimal_design(Sigma, r, uniform_mix=state.uniform_mix)
    else:
        U, p = plumage_design(G, r, svd_method=state.svd_method, uniform_mix=state.uniform_mix)
    if state.resample:
        return U.to(device=G.device, dtype=torch.float32), p.to(device=G.device, dtype=torch.float32), sigma
    proj = projection_from_design(U, p, sampler_generator(state.seed, pid, refresh_idx), device=G.device)
    return proj.P, proj.d, sigma


def _refresh(state: PlumageHookState, comms: Collectives, pids: list[int], grads: list[Tensor]) -> None:
    """Owner: design or projection from the (already averaged) gradient; one broadcast per owner.

    Every rank holds ``G_avg`` after the all-reduce, but the SVD runs once per matrix (on its
    owner), not ``W`` times. Without ``resample`` the packed ``[P, d]`` (``s·r + r`` floats per
    matrix) is broadcast; with it the whole design ``[U, p]`` (``s·s + s``), from which every rank
    redraws ``S`` on its own; both are small next to the ``s·l`` all-reduce of the same step.

    Failures: a matrix whose averaged gradient holds NaN/Inf (the same on every rank) is not
    refreshed — it keeps its projection, or stays uncompressed until a finite refresh — and the
    exact average goes to the optimizer, whose own policy handles it. An owner whose decomposition
    fails broadcasts NaN instead; every rank sees it and raises the same error, with the hook state
    unchanged (nothing is kept before every block arrived finite).
    """
    refresh_idx = (state.iter - state.start_iter) // state.tau
    owners = state.owners()
    items = []
    for pid, g in zip(pids, grads):
        if not state.is_compressed(pid):
            continue
        if bool(torch.isfinite(g).all()):
            items.append((pid, g))
        else:
            state.skipped_refreshes += 1
    device = grads[0].device if grads else torch.device("cpu")
    staged, sigmas = [], {}
    for owner in range(comms.world_size):
        mine = [(pid, g) for pid, g in items if owners[pid] == owner]
        if not mine:
            continue
        sizes = []  # (s, columns of the first block): [P (s, r), d (r,)] or [U (s, s), p (s,)]
        for pid, _ in mine:
            s = min(state.matrix_shape(pid))
            sizes.append((s, s if state.resample else state.effective_rank(pid)))
        packed = torch.empty(sum(s * k + k for s, k in sizes), dtype=torch.float32, device=device)
        failure = None
        if comms.rank == owner:
            off = 0
            for (pid, g), (s, k) in zip(mine, sizes):
                try:
                    A, v, sigma = _owner_design(state, pid, g.view(state.matrix_shape(pid)), refresh_idx)
                    packed[off : off + s * k].copy_(A.reshape(-1))
                    packed[off + s * k : off + s * k + k].copy_(v)
                    if sigma is not None:
                        sigmas[pid] = sigma
                except Exception as err:  # noqa: BLE001 - every rank raises below
                    packed[off : off + s * k + k].fill_(float("nan"))
                    failure = failure or err
                off += s * k + k
        comms.broadcast(packed, src=owner, tag="projector")
        off = 0
        for (pid, _), (s, k) in zip(mine, sizes):
            block = packed[off : off + s * k + k]
            if not bool(torch.isfinite(block).all()):
                raise RuntimeError(
                    f"plumage_hook: the refresh of {state.param_names[pid]!r} failed on its owner, rank {owner}; "
                    "the hook state is unchanged"
                ) from failure
            staged.append((pid, s, block[: s * k].view(s, k).clone(), block[s * k :].clone()))
            off += s * k + k
    for pid, s, A, v in staged:
        if state.resample:
            state.designs[pid] = (refresh_idx, A, v.double())
            state.projections.pop(pid, None)
            picked = v[v > 0]
        else:
            state.projections[pid] = (refresh_idx, A, v)
            picked = v
        # every positive probability equal to 1 at r < s: no randomness left in the design
        r = state.effective_rank(pid)
        if get_estimator(state.estimator).unbiased and r < s and bool((picked == 1).all()):
            state.deterministic.add(pid)
        else:
            state.deterministic.discard(pid)
    state.sigma.update(sigmas)


def _project(mats: list[tuple]) -> list[Tensor]:
    """``R_k = Pᵀ G_o``  # (r, l) fp32 of every matrix (``mats``: ``(pid, G_o, P, d)``).

    :func:`~plumage_ds.optim.batched.matmuls`: small same-shape pairs stacked into one ``bmm`` per
    its per-device ``STACK_ELEMENTS`` (CPU: never — measured slower, and one product per matrix
    keeps the bits of the per-matrix hook), one product per matrix otherwise.
    """
    return matmuls([P.mT for _, _, P, _ in mats], [G.float() for _, G, _, _ in mats])


def _lift(mats: list[tuple], Rs: list[Tensor]) -> None:
    """``G_o ← P D⁻¹ R`` for every matrix (``Rs``: ``mean_k R_k``  # (r, l), in ``mats`` order), written
    into the bucket through the ``G_o`` views; stacked like :func:`_project`."""
    lifted = matmuls([P for _, _, P, _ in mats], [R / d[:, None] for (_, _, _, d), R in zip(mats, Rs)])
    for (_, G, _, _), L in zip(mats, lifted):
        G.copy_(L)


def _quantize(state: PlumageHookState, comms: Collectives, Rs: list[Tensor], pids: list[int]) -> tuple[Tensor, Tensor, int]:
    """``(q, scales, levels)``: every ``R_k`` stochastically rounded onto the shared grid, packed.

    One max-all-reduce of the per-row scales (``lowrank_scale``, synchronous on both paths: ``q``
    needs it), then rounding with a generator seeded from ``(seed, iter, rank, param_id)``
    (independent of how DDP groups parameters into buckets, so a resumed run rounds identically).
    """
    scales = torch.cat([row_scales(R) for R in Rs])  # (Σ r,)
    comms.all_reduce(scales, tag="lowrank_scale", op=dist.ReduceOp.MAX)
    levels = quantization_levels(state.quantize, comms.world_size)
    q, at = [], 0
    for R, pid in zip(Rs, pids):
        gen = torch.Generator(device=R.device)
        gen.manual_seed(derive_seed(state.seed, _ROUNDING_TAG, state.iter, comms.rank, pid))
        q.append(quantize_rows(R, scales[at : at + R.shape[0]], levels, gen, state.quantize).reshape(-1))
        at += R.shape[0]
    return torch.cat(q), scales, levels


def _dequantize(q_sum: Tensor, scales: Tensor, levels: int, world: int, Rs: list[Tensor]) -> list[Tensor]:
    """``mean_k R_k`` per matrix (shapes of ``Rs``) from the summed integers: exact, unbiased."""
    out, off, at = [], 0, 0
    for R in Rs:
        r, l = R.shape
        out.append(dequantize_rows(q_sum[off : off + r * l].view(r, l), scales[at : at + r], levels, world))
        off += r * l
        at += r
    return out


def _pack_into(flat: Tensor, tensors: list[Tensor]) -> None:
    off = 0
    for t in tensors:
        flat[off : off + t.numel()].copy_(t.reshape(-1))
        off += t.numel()


def _unpack_from(flat: Tensor, tensors: list[Tensor]) -> None:
    off = 0
    for t in tensors:
        t.copy_(flat[off : off + t.numel()].view_as(t))
        off += t.numel()


def _when_all(futs: list[torch.futures.Future], finish, device: torch.device) -> torch.futures.Future:
    """A Future holding ``finish(*tensors)`` once every all-reduce Future of ``futs`` completed.

    The last completion runs ``finish``; no callback ever waits on an unfinished Future (a blocking
    wait inside a gloo callback can hang DDP with several buckets), and ``wait()`` on the finished
    ones only orders the current stream after theirs (CUDA).
    """
    out = _new_future(device)
    left, lock = [len(futs)], threading.Lock()

    def done(_):
        with lock:
            left[0] -= 1
            if left[0]:
                return
        try:
            out.set_result(finish(*[f.wait()[0] for f in futs]))
        except Exception as err:  # noqa: BLE001 - DDP re-raises it from backward
            out.set_exception(err)

    for f in futs:
        f.add_done_callback(done)
    return out


def _communicate(state: PlumageHookState, bucket, transfers: list[tuple[Tensor, str]], finish) -> torch.futures.Future:
    """Sum-all-reduce each ``(tensor, tag)`` of ``transfers``, then ``finish(*tensors)`` → the bucket buffer.

    Synchronous (:meth:`PlumageHookState.uses_async` false): blocking collectives, ``finish`` inside the
    hook, a completed Future. Asynchronous: the all-reduces start with ``async_op=True`` and ``finish``
    is chained on their Futures (``Future.then``), so DDP overlaps them with the rest of the backward.
    Both run the same operations on the same tensors: the results are bitwise equal. The step's
    accounting closes at launch (``_end_bucket``): ``finish`` never reads ``state.iter``.
    """
    comms = state.collectives()
    if not state.uses_async():
        for t, tag in transfers:
            comms.all_reduce(t, tag=tag)
        out = finish(*[t for t, _ in transfers])
        state._end_bucket(bucket)
        return _new_future(out.device, out)
    futs = [comms.all_reduce_future(t, tag=tag) for t, tag in transfers]
    state._end_bucket(bucket)
    if len(futs) == 1:
        return futs[0].then(lambda fut: finish(fut.value()[0]))
    return _when_all(futs, finish, bucket.buffer().device)


def plumage_hook(state: PlumageHookState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """DDP comm hook: unbiased low-rank all-reduce, ``E[Ĝ] = mean_k G_k``, no error feedback.

    Per bucket (see the module docstring for the full list):

    * warm-up / nothing to compress: ``all_reduce(buffer / W)``;
    * refresh (``plumage``/``optimal``/``galore``), always synchronous: ``all_reduce(buffer / W)`` —
      exact for this step — then per owner one ``broadcast`` of the packed ``[P, d]`` (or design
      ``[U, p]``) it computed from that average;
    * ordinary step: ONE ``all_reduce([pack(Pᵀ G_k), pack(rest)] / W)`` (fp32 coefficients and an
      fp32 bucket; quantized: a max-all-reduce of row scales, the integers, and the rest on its own);
      then ``G_o ← P D⁻¹ R`` in the bucket buffer.

    Synchronous (gloo default) it returns an already-completed Future; asynchronous (NCCL default,
    ``comm_hook.async_comm``) a Future chained on the all-reduce, bitwise the same result.
    """
    buffer = bucket.buffer()
    grads = _bucket_views(bucket, buffer)
    pids = [state._pid(p) for p in bucket.parameters()]
    comms = state.collectives()
    world = comms.world_size
    phase = state.phase()
    compressed = [i for i, pid in enumerate(pids) if state.is_compressed(pid)]
    if phase == "lowrank" and not all(state._has_projection(pids[i]) for i in compressed):
        phase = "refresh"  # no projection yet (e.g. a state created mid-run): same decision on every rank

    if phase == "refresh" and compressed:  # synchronous on both paths: the owners need the average now
        buffer.div_(world)
        comms.all_reduce(buffer, tag="refresh_grad")
        _refresh(state, comms, [pids[i] for i in compressed], [grads[i] for i in compressed])
        state._end_bucket(bucket)
        return _new_future(buffer.device, buffer)
    if phase != "lowrank" or not compressed:
        buffer.div_(world)
        return _communicate(state, bucket, [(buffer, "refresh_grad" if phase == "refresh" else "dense_grad")],
                            lambda avg: avg)  # fmt: skip

    # ordinary low-rank step
    mats = []  # (pid, G_o (s, l) view into the bucket, P (s, r), d (r,))
    for i in compressed:
        P, d = state._current(pids[i], buffer.device)
        mats.append((pids[i], _oriented_views(state, pids[i], grads[i]), P, d))
    compressed_set = set(compressed)
    dense = [grads[i] for i in range(len(pids)) if i not in compressed_set]
    n_coef = sum(P.shape[1] * G.shape[1] for _, G, P, _ in mats)
    n_dense = sum(g.numel() for g in dense)
    # the rest rides in the coefficients' buffer when both are fp32 (a bf16 rest would double its bytes)
    packed_rest = state.quantize is None and buffer.dtype == torch.float32
    coef = torch.empty(n_coef + (n_dense if packed_rest else 0), dtype=torch.float32, device=buffer.device)
    _pack_into(coef, _project(mats))
    Rs, off = [], 0  # R_k (r, l): views of coef
    for _, G, P, _ in mats:
        Rs.append(coef[off : off + P.shape[1] * G.shape[1]].view(P.shape[1], G.shape[1]))
        off += Rs[-1].numel()
    if packed_rest:
        _pack_into(coef[n_coef:], dense)
    transfers = []
    if state.quantize is None:
        transfers.append((coef.div_(world), "lowrank_grad"))
    else:
        q, scales, levels = _quantize(state, comms, Rs, [m[0] for m in mats])
        transfers.append((q, "lowrank_grad"))
    if dense and not packed_rest:
        rest = torch.empty(n_dense, dtype=buffer.dtype, device=buffer.device)
        _pack_into(rest, dense)
        transfers.append((rest.div_(world), "dense_grad"))

    def finish(avg: Tensor, rest: Optional[Tensor] = None) -> Tensor:
        if packed_rest:
            _unpack_from(avg[n_coef:], dense)
        elif rest is not None:
            _unpack_from(rest, dense)
        _lift(mats, Rs if state.quantize is None else _dequantize(avg, scales, levels, world, Rs))
        return buffer

    return _communicate(state, bucket, transfers, finish)
