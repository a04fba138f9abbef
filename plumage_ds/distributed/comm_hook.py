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
* ``"galore"`` — GaLore-style top-``r`` (``d = 1``), refreshed like ``plumage``. **Biased**;
  a baseline knob (called ``topr`` before the config schema was unified).

Collectives per bucket (all synchronous, through :class:`~plumage_ds.distributed.comm.Collectives`,
so the hook works with many buckets on gloo and NCCL and returns an already-completed Future):

* warm-up step (``iter < start_iter``), or a bucket with no compressed matrix:
  one all-reduce of the bucket buffer (tag ``dense_grad``);
* refresh step (estimators whose ``P`` needs the gradient, ``(iter − start_iter) % update_interval == 0``): one all-reduce of
  the whole bucket buffer (tag ``refresh_grad``; the step's output is the exact average), then
  one broadcast per owner rank of the packed ``[P, d]`` of its refreshed matrices (tag
  ``projector``);
* ordinary step: one all-reduce of the packed ``R_k = Pᵀ G_k`` of all compressed matrices
  (fp32, tag ``lowrank_grad``) and one of the packed uncompressed rest (tag ``dense_grad``);
  then ``Ĝ_o = P D⁻¹ R`` is written into the bucket buffer.

Compression rule (PowerSGD's ``min_compression_rate`` idea): a parameter is compressed iff it
has ``ndim >= 2`` (viewed as ``(shape[0], numel / shape[0])``) and its compression rate
``s / min(rank, s) >= min_compression_rate``. 1-D tensors and matrices too small for the
requested rank go uncompressed; :meth:`PlumageHookState.param_modes` reports each decision.
"""

import dataclasses
import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from plumage_ds.config import CommHookConfig, OptimizerConfig, check_estimator, from_dict, to_dict
from plumage_ds.distributed.comm import Collectives
from plumage_ds.distributed.ownership import greedy_ownership
from plumage_ds.estimators import (
    galore_projection,
    haar_projection,
    is_left,
    orient,
    oriented_shape,
    plumage_projection,
    sampler_generator,
)

from plumage_ds.estimators.registry import estimator_names, resolve_svd_method

__all__ = ["HOOK_ESTIMATORS", "PlumageHookState", "hook_config", "plumage_hook"]

HOOK_ESTIMATORS = estimator_names("lowrank_adam")
"""The registry's low-rank estimators; ``galore`` is biased (top-r, ``d = 1``): a baseline knob."""

_HOOK_KEYS = tuple(f.name for f in dataclasses.fields(CommHookConfig))


def hook_config(config=None, **knobs) -> OptimizerConfig:
    """The hook's :class:`OptimizerConfig`: ``config`` (a config, a mapping or ``None``) plus ``knobs``.

    Goes through ``from_dict(OptimizerConfig, ...)``, so a bad key or value gets the same message
    as in the main job's YAML (``Invalid rank=0: must be a positive integer``). The hook's own
    keys (``start_iter``, ``min_compression_rate``) may be given as plain keywords; they land in
    ``comm_hook``. The estimator must be a low-rank one (``plumage``, ``galore`` or ``haar``).
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
        "iter",
        "param_names",
        "param_shapes",
        "projections",
        "deterministic",
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
        self.kappa = cfg.update_interval  # redraw interval (haar): the same knob
        self.start_iter = cfg.comm_hook.start_iter
        self.min_compression_rate = cfg.comm_hook.min_compression_rate
        self.seed = cfg.seed
        self.svd_method = resolve_svd_method(cfg.estimator, cfg.svd_method) or "gram"  # haar: unused
        self.uniform_mix = cfg.uniform_mix
        self.iter = 0
        named = _named_trainable(model)
        if not named:
            raise ValueError("Invalid model: it has no trainable parameters")
        self.param_names = [n for n, _ in named]
        self.param_shapes = [tuple(p.shape) for _, p in named]
        self.projections: dict[int, tuple[int, Tensor, Tensor]] = {}  # pid -> (draw, P (s, r), d (r,))
        self.deterministic: set[int] = set()  # pids whose current PLUMAGE design has no randomness
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
        """The compression rule: ``ndim >= 2`` and ``s / min(rank, s) >= min_compression_rate``."""
        mshape = self.matrix_shape(pid)
        if mshape is None or 0 in mshape:
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
                out[name] = ("lowrank", f"{self.estimator} r={r} of s={s}, l={l}: {s / r:.3g}x fewer bytes{note}")
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

    def _end_bucket(self, bucket) -> None:
        if bucket.is_last():
            self.iter += 1
            self.collectives().end_step()


def _future(t: Tensor) -> torch.futures.Future:
    fut = torch.futures.Future(devices=[t.device]) if t.is_cuda else torch.futures.Future()
    fut.set_result(t)
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


def _refresh(state: PlumageHookState, comms: Collectives, pids: list[int], grads: list[Tensor]) -> None:
    """Owner: projection of the (already averaged) gradient; broadcast packed ``[P, d]`` per owner.

    Every rank holds ``G_avg`` after the all-reduce, but the SVD runs once per matrix (on its
    owner), not ``W`` times; the broadcast of ``(s·r + r)`` floats is small next to the
    ``s·l`` gradient all-reduce of the same step.
    """
    refresh_idx = (state.iter - state.start_iter) // state.tau
    owners = state.owners()
    items = [(pid, g) for pid, g in zip(pids, grads) if state.is_compressed(pid)]
    device = grads[0].device if grads else torch.device("cpu")
    for owner in range(comms.world_size):
        mine = [(pid, g) for pid, g in items if owners[pid] == owner]
        if not mine:
            continue
        sizes = []
        for pid, _ in mine:
            s, r = min(state.matrix_shape(pid)), state.effective_rank(pid)
            sizes.append((s, r))
        packed = torch.empty(sum(s * r + r for s, r in sizes), dtype=torch.float32, device=device)
        if comms.rank == owner:
            off = 0
            for (pid, g), (s, r) in zip(mine, sizes):
                G = g.view(state.matrix_shape(pid))
                if state.estimator == "plumage":
                    gen = sampler_generator(state.seed, pid, refresh_idx)
                    proj = plumage_projection(
                        G, state.rank, gen, svd_method=state.svd_method, uniform_mix=state.uniform_mix
                    )
                else:
                    proj = galore_projection(G, state.rank, svd_method=state.svd_method)
                packed[off : off + s * r].copy_(proj.P.reshape(-1))
                packed[off + s * r : off + s * r + r].copy_(proj.d)
                off += s * r + r
        comms.broadcast(packed, src=owner, tag="projector")
        off = 0
        for (pid, _), (s, r) in zip(mine, sizes):
            P = packed[off : off + s * r].view(s, r).clone()
            d = packed[off + s * r : off + s * r + r].clone()
            off += s * r + r
            state.projections[pid] = (refresh_idx, P, d)
            # all(d == 1) with Σd = r means every other direction had p = 0: no randomness left
            if state.estimator == "plumage" and r < s and bool((d == 1).all()):
                state.deterministic.add(pid)
            else:
                state.deterministic.discard(pid)


def plumage_hook(state: PlumageHookState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """DDP comm hook: unbiased low-rank all-reduce, ``E[Ĝ] = mean_k G_k``, no error feedback.

    Per bucket, synchronously (see the module docstring for the full list):

    * warm-up / nothing to compress: ``all_reduce(buffer / W)``;
    * refresh (``plumage``/``galore``): ``all_reduce(buffer / W)`` — exact for this step — then
      per owner one ``broadcast`` of the packed ``[P, d]`` it computed from that average;
    * ordinary step: ``all_reduce(pack(Pᵀ G_k) / W)`` for the compressed matrices and
      ``all_reduce(pack(rest) / W)``; then ``G_o ← P D⁻¹ R`` in the bucket buffer.

    Returns an already-completed Future holding the bucket buffer.
    """
    buffer = bucket.buffer()
    grads = _bucket_views(bucket, buffer)
    pids = [state._pid(p) for p in bucket.parameters()]
    comms = state.collectives()
    world = comms.world_size
    phase = state.phase()
    compressed = [i for i, pid in enumerate(pids) if state.is_compressed(pid)]
    if phase == "lowrank" and state.estimator != "haar" and any(pids[i] not in state.projections for i in compressed):
        phase = "refresh"  # no projection yet (e.g. a state created mid-run): same decision on every rank

    if phase != "lowrank" or not compressed:
        buffer.div_(world)
        comms.all_reduce(buffer, tag="refresh_grad" if phase == "refresh" else "dense_grad")
        if phase == "refresh" and compressed:
            _refresh(state, comms, [pids[i] for i in compressed], [grads[i] for i in compressed])
        state._end_bucket(bucket)
        return _future(buffer)

    # ordinary low-rank step
    views, projs, sizes = [], [], []
    for i in compressed:
        pid = pids[i]
        if state.estimator == "haar":
            P, d = state._haar(pid, buffer.device)
        else:
            _, P, d = state.projections[pid]
        G_o = _oriented_views(state, pid, grads[i])  # (s, l)
        views.append(G_o)
        projs.append((P, d))
        sizes.append(P.shape[1] * G_o.shape[1])
    packed = torch.empty(sum(sizes), dtype=torch.float32, device=buffer.device)
    off = 0
    for G_o, (P, _), n in zip(views, projs, sizes):
        torch.matmul(P.mT, G_o.float(), out=packed[off : off + n].view(P.shape[1], G_o.shape[1]))  # R_k (r, l)
        off += n
    packed.div_(world)
    comms.all_reduce(packed, tag="lowrank_grad")

    compressed_set = set(compressed)
    dense_idx = [i for i in range(len(pids)) if i not in compressed_set]
    if dense_idx:
        flat = torch.cat([grads[i].reshape(-1) for i in dense_idx]).div_(world)
        comms.all_reduce(flat, tag="dense_grad")
        off = 0
        for i in dense_idx:
            n = grads[i].numel()
            grads[i].copy_(flat[off : off + n].view_as(grads[i]))
            off += n

    off = 0
    for G_o, (P, d), n in zip(views, projs, sizes):
        R = packed[off : off + n].view(P.shape[1], G_o.shape[1])  # mean_k Pᵀ G_k (r, l)
        G_o.copy_(P @ (R / d[:, None]))  # Ĝ_o = P D⁻¹ R
        off += n
    state._end_bucket(bucket)
    return _future(buffer)
