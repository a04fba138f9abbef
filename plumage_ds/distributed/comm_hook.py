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
  ``G_avg G_avgᵀ`` over the refresh steps (``sigma_weight``: a constant weight instead),
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

import threading
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..estimators import RefreshInput, derive_seed, is_left, orient, owner_refresh, refresh_index, sampler_generator
from ..estimators.rounding import dequantize_rows, quantization_levels, quantize_rows, row_scales
from ..kernels.batched import matmuls, pack, unpack_into
from .comm import Collectives
from .hook_state import _ROUNDING_TAG, HOOK_ESTIMATORS, PlumageHookState, hook_config

__all__ = ["HOOK_ESTIMATORS", "PlumageHookState", "hook_config", "plumage_hook"]


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


def _refresh(state: PlumageHookState, comms: Collectives, pids: list[int], grads: list[Tensor]) -> None:
    """Owner: design or projection from the (already averaged) gradient; one broadcast per owner.

    Every rank holds ``G_avg`` after the all-reduce, but the decomposition runs once per matrix (on
    its owner, through the owner refresh shared with the optimizers,
    :func:`~plumage_ds.estimators.owner_refresh`), not ``W`` times. Without ``resample`` the packed
    ``[P, d]`` (``s·r + r`` floats per matrix) is broadcast; with it the whole design ``[U, p]``
    (``s·s + s``), from which every rank redraws ``S`` on its own; both are small next to the
    ``s·l`` all-reduce of the same step.

    Failures: a matrix whose averaged gradient holds NaN/Inf (the same on every rank) is not
    refreshed — it keeps its projection, or stays uncompressed until a finite refresh — and the
    exact average goes to the optimizer, whose own policy handles it. An owner whose decomposition
    fails broadcasts NaN instead; every rank sees it and raises the same error, with the hook state
    unchanged (nothing is kept before every block arrived finite).
    """
    refresh_idx = refresh_index(state.iter - state.start_iter, state.tau)
    owners = state.owners()
    spec = state.spec
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
            results, failure = owner_refresh([
                RefreshInput(
                    name=state.param_names[pid], estimator=spec, rank=state.effective_rank(pid),
                    left=is_left(state.matrix_shape(pid)), kind="grad", X=g.view(state.matrix_shape(pid)),
                    svd_method=state.svd_method, uniform_mix=state.uniform_mix,
                    generator=None if state.resample else sampler_generator(state.seed, pid, refresh_idx),
                    kept=dict(zip(("sigma_count", "Sigma"), state.sigma[pid])) if pid in state.sigma else {},
                    sigma_weight=state.sigma_weight, sigma_rank=state.sigma_rank,
                )
                for pid, g in mine
            ])
            off = 0
            for (pid, _), (s, k), res in zip(mine, sizes, results):
                if res is None:
                    packed[off : off + s * k + k].fill_(float("nan"))
                else:
                    packed[off : off + s * k].copy_(res.P.reshape(-1))
                    packed[off + s * k : off + s * k + k].copy_(res.d)
                    if res.kept:
                        sigmas[pid] = (res.kept["sigma_count"], res.kept["Sigma"])
                off += s * k + k
        comms.broadcast(packed, src=owner, tag="projector")
        off = 0
        for (pid, _), (s, k) in zip(mine, sizes):
            block = packed[off : off + s * k + k]
            if not bool(torch.isfinite(block).all()):
                raise RuntimeError(
                    f"plumage_hook: the refresh of {state.param_names[pid]!r} failed on its owner, rank {owner}; "
                    "the hook state is unchanged"
                ) from (RuntimeError(failure) if failure else None)  # the cause, on the owner only
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
        if spec.unbiased and r < s and bool((picked == 1).all()):
            state.deterministic.add(pid)
        else:
            state.deterministic.discard(pid)
    state.sigma.update(sigmas)


def _project(mats: list[tuple]) -> list[Tensor]:
    """``R_k = Pᵀ G_o``  # (r, l) fp32 of every matrix (``mats``: ``(pid, G_o, P, d)``).

    :func:`~plumage_ds.kernels.batched.matmuls`: small same-shape pairs stacked into one ``bmm`` per
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
    pack(_project(mats), coef)
    Rs, off = [], 0  # R_k (r, l): views of coef
    for _, G, P, _ in mats:
        Rs.append(coef[off : off + P.shape[1] * G.shape[1]].view(P.shape[1], G.shape[1]))
        off += Rs[-1].numel()
    if packed_rest:
        pack(dense, coef[n_coef:])
    transfers = []
    if state.quantize is None:
        transfers.append((coef.div_(world), "lowrank_grad"))
    else:
        q, scales, levels = _quantize(state, comms, Rs, [m[0] for m in mats])
        transfers.append((q, "lowrank_grad"))
    if dense and not packed_rest:
        rest = torch.empty(n_dense, dtype=buffer.dtype, device=buffer.device)
        pack(dense, rest)
        transfers.append((rest.div_(world), "dense_grad"))

    def finish(avg: Tensor, rest: Optional[Tensor] = None) -> Tensor:
        if packed_rest:
            unpack_into(avg[n_coef:], dense)
        elif rest is not None:
            unpack_into(rest, dense)
        _lift(mats, Rs if state.quantize is None else _dequantize(avg, scales, levels, world, Rs))
        return buffer

    return _communicate(state, bucket, transfers, finish)
