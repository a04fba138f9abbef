"""The unbiased low-rank DDP comm hook (``plumage_ds.distributed.comm_hook``).

Two spawned runs (W=2 and W=4) carry all distributed checks, to keep the file fast on 2 cores:

* unbiasedness on real DDP buckets (recorded from a real DDP run, replayed through the hook
  with many seeds): Haar, PLUMAGE, PLUMAGE redrawn per step with int8 coefficients and the
  optimal design with fp16-integer coefficients converge to the all-reduced gradient within a
  CLT bound, top-r (biased) does not;
* ``r >= s``: bit-identical to a plain all-reduce by the compression rule, and equal up to
  float rounding through the compressed path (``min_compression_rate=1``) in real DDP;
* replicas identical after N steps with a ``no_sync()`` micro-batch in every step, several
  buckets, every variant of ``VARIANTS``, W=2 and W=4;
* counted bytes per step equal the formula (docs/comm_hook.md), and an ordinary step issues one
  collective per bucket (fp32 coefficients and the uncompressed rest packed together);
* the asynchronous path (``async_comm=True``, Futures chained on ``async_op`` all-reduces) trains
  bitwise like the synchronous one, refreshes included, fp32 and int8;
* the packed collective equals the previous two-collective math (bitwise at W=2, ≤ 1e-6 at W=4);
* the state pickles with a process group set, and a resumed run continues bit-identically.
"""

from __future__ import annotations

import gc
import io
import pickle
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from plumage_ds.config import ModelConfig
import plumage_ds.kernels.batched as batched
from plumage_ds.distributed.comm_hook import PlumageHookState, plumage_hook
from plumage_ds.estimators import convert_second_moment, full_second_moment, is_left, orient
from plumage_ds.testing import run_workers
from plumage_ds.train.model import build_model, causal_lm_loss

SEQ = 16
MICRO = 2  # windows per micro-batch per rank
BUCKET_MB = 0.02  # ≈ 5k floats per bucket: several buckets for the 35k-parameter model
N_SEEDS = 48
RECORD_BUCKET_MB = 0.04  # fewer, larger real buckets for the many-seed replay (gloo latency)


def tiny_model(seed: int = 0):
    cfg = ModelConfig(fields=dict(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    ))
    return build_model(cfg, seed=seed)


class TorchLM(torch.nn.Module):
    """A one-block causal transformer from ``torch.nn`` only (the W=4 run skips importing
    ``transformers`` in 4 processes on 2 cores); same ``model(input_ids=...).logits`` API."""

    hook_targets = [r"^block"]  # no LLaMA/GPT-2 names: the block's attention and MLP matrices, explicitly

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(256, 32)
        self.block = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True, dropout=0.0)
        self.head = torch.nn.Linear(32, 256, bias=False)

    def forward(self, input_ids):
        mask = torch.nn.Transformer.generate_square_subsequent_mask(input_ids.shape[1])
        h = self.block(self.embed(input_ids), src_mask=mask, is_causal=True)
        return SimpleNamespace(logits=self.head(h))


def batch(step: int, micro: int, rank: int, n: int = MICRO) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1_000_003 * step + 1_009 * micro + rank)
    return torch.randint(0, 256, (n, SEQ + 1), generator=gen)


def ddp(model, bucket_mb=BUCKET_MB):
    return torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=bucket_mb)


VARIANTS = {
    "haar": dict(estimator="haar"),
    # uniform_mix > 0: P from an earlier gradient stays unbiased for later ones (p > 0 everywhere)
    "plumage": dict(estimator="plumage", uniform_mix=0.1),
    # redraw S from the broadcast design every 2 steps; coefficients as int8 / fp16 integers
    "plumage-resample-int8": dict(estimator="plumage", uniform_mix=0.1, resample_interval=2, quantize="int8"),
    "optimal-fp16": dict(estimator="optimal", uniform_mix=0.1, quantize="fp16"),
}
COEFF_BYTES = {None: 4, "int8": 1, "fp16": 2}


def step_bytes_formula(
    shapes, phase: str, world: int, rank: int, min_rate: float = 2.0, *, quantize=None, resample_interval=0, **_
) -> float:
    """Bytes this rank sends in one iteration (ring model, fp32 gradients), as stated in docs/comm_hook.md;
    ``shapes``: ``(shape, is_target)`` per parameter."""
    resample = resample_interval > 0
    ar, bc = 2.0 * (world - 1) / world, (world - 1) / world
    total = 0.0
    for shape, target in shapes:
        numel = torch.Size(shape).numel()
        compressed = False
        if target and len(shape) >= 2:
            m, n = shape[0], numel // shape[0]
            s, l = min(m, n), max(m, n)
            r = min(rank, s)
            compressed = s / r >= min_rate
        if phase == "warmup" or not compressed:
            total += ar * numel * 4
        elif phase == "refresh":
            k = s if resample else r  # the design [U, p] or the draw [P, d]
            total += ar * numel * 4 + bc * (s * k + k) * 4
        else:
            total += ar * r * l * COEFF_BYTES[quantize] + (ar * r * 4 if quantize else 0.0)  # + row scales
    return total


class ReplayBucket:
    """A ``GradBucket`` stand-in over a recorded real DDP bucket (same parameters, same layout)."""

    def __init__(self, params, buffer, last):
        self._params, self._buffer, self._last = params, buffer, last

    def buffer(self):
        return self._buffer

    def gradients(self):
        views, off = [], 0
        for p in self._params:
            views.append(self._buffer[off : off + p.numel()].view(p.shape))
            off += p.numel()
        return views

    def parameters(self):
        return self._params

    def is_last(self):
        return self._last


def _record_buckets(model, dmodel, inputs):
    """One real DDP backward with a recording hook: per bucket (params, local buffer, average)."""
    rec = []

    def hook(_, bucket):
        local = bucket.buffer().clone()
        buf = bucket.buffer()
        buf.div_(dist.get_world_size())
        dist.all_reduce(buf)
        rec.append((list(bucket.parameters()), local, buf.clone(), bucket.is_last()))
        fut = torch.futures.Future()
        fut.set_result(buf)
        return fut

    dmodel.register_comm_hook(None, hook)
    for x in inputs:
        start = len(rec)
        model.zero_grad(set_to_none=True)
        causal_lm_loss(dmodel, x).backward()
        yield rec[start:]


def _replay(state, recorded):
    """Run the hook over recorded buckets (fresh copies of local grads); return the flat output."""
    outs = []
    for params, local, _, last in recorded:
        buf = local.clone()
        fut = plumage_hook(state, ReplayBucket(params, buf, last))
        outs.append(fut.value().clone())
    return torch.cat(outs)


def _unbiasedness(rank, world):
    torch.manual_seed(0)
    model = tiny_model()
    dmodel = ddp(model, RECORD_BUCKET_MB)
    _, g0, g1 = _record_buckets(model, dmodel, [batch(s, 0, rank, n=4) for s in (0, 1, 2)])
    assert len(g1) > 2, "expected several real DDP buckets"
    target = torch.cat([avg for _, _, avg, _ in g1])
    out = {"buckets": len(g1)}

    # r >= s by the compression rule: nothing compressed, the plain all-reduce bit for bit
    st = PlumageHookState(model, rank=10**6, start_iter=0)
    out["exact_rule"] = torch.equal(_replay(st, g1), target)
    # r >= s through the compressed path (square orthogonal P, d = 1): equal up to rounding
    for est in ("haar", "plumage"):
        st = PlumageHookState(model, estimator=est, rank=10**6, start_iter=0, min_compression_rate=1)
        if est == "plumage":
            _replay(st, g0)  # refresh
        assert st.phase() == "lowrank"
        out[f"exact_path_{est}"] = float((_replay(st, g1) - target).abs().max())

    for est in ("haar", "plumage", "galore", "plumage-resample-int8", "optimal-fp16"):
        total = torch.zeros_like(target, dtype=torch.float64)
        total_sq = torch.zeros_like(total)
        n = N_SEEDS if est != "galore" else 2
        kw = VARIANTS.get(est, {"estimator": est})
        for seed in range(n):
            st = PlumageHookState(model, rank=4, update_interval=100, start_iter=0, seed=seed, **kw)
            if kw["estimator"] != "haar":
                _replay(st, g0)  # refresh on an earlier averaged gradient
            ghat = _replay(st, g1).double()
            total += ghat
            total_sq += ghat**2
        mean = total / n
        var = (total_sq / n - mean**2).clamp(min=0) * n / max(n - 1, 1)
        out[est] = {
            "err2": float(((mean - target.double()) ** 2).sum()),
            "clt2": float(var.sum() / n),  # E‖mean − G‖² for an unbiased estimator
            "norm2": float((target.double() ** 2).sum()),
        }
        out[f"{est}_modes"] = st.param_modes()
    del dmodel
    gc.collect()

    # real DDP, compressed path at r >= s: equals plain DDP up to rounding
    diffs = {}
    for est in ("haar", "plumage"):
        ref_model, hook_model = tiny_model(), tiny_model()
        d_ref, d_hook = ddp(ref_model), ddp(hook_model)
        st = PlumageHookState(d_hook, estimator=est, rank=10**6, start_iter=0, min_compression_rate=1)
        d_hook.register_comm_hook(st, plumage_hook)
        worst = 0.0
        for step in range(3):
            x = batch(10 + step, 0, rank)
            for m, d in ((ref_model, d_ref), (hook_model, d_hook)):
                m.zero_grad(set_to_none=True)
                causal_lm_loss(d, x).backward()
            for p, q in zip(ref_model.parameters(), hook_model.parameters()):
                worst = max(worst, float((p.grad - q.grad).abs().max()) / (float(p.grad.abs().max()) + 1e-12))
        diffs[est] = (worst, st.iter)
        del d_ref, d_hook
        gc.collect()
    out["ddp_exact"] = diffs
    return out


def _train(rank, world, variant, steps, *, save_at=None, resume=None, make_model=tiny_model, **hook_kw):
    """Steps of AdamW with one ``no_sync`` micro-batch + one synced micro-batch each; ``hook_kw`` go to the state.

    Records per step the collectives' calls (``comm_stats``) and, per bucket the hook saw, whether it
    held compressed and uncompressed parameters."""
    model = make_model(seed=0 if resume is None else 123)
    dmodel = ddp(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = 0
    if resume is None:
        # refresh every 3 steps; a Haar redraw every 2 (its interval is update_interval too)
        interval = 2 if VARIANTS[variant]["estimator"] == "haar" else 3
        state = PlumageHookState(dmodel, rank=4, update_interval=interval, start_iter=1, seed=7,
                                 target_modules=getattr(model, "hook_targets", None), **VARIANTS[variant], **hook_kw)
    else:
        blob, model_sd, opt_sd, first = resume
        model.load_state_dict(torch.load(io.BytesIO(model_sd), weights_only=True))
        opt.load_state_dict(torch.load(io.BytesIO(opt_sd), weights_only=True))
        state = pickle.loads(blob).bind(dmodel)
        assert state.process_group is dist.distributed_c10d._get_default_group()
        assert state.iter == first
    buckets = []  # per step: (has compressed, has uncompressed) of every bucket

    def counting_hook(st, bucket):
        modes = [st.is_compressed(st._pid(p)) for p in bucket.parameters()]
        buckets[-1].append((any(modes), not all(modes)))
        return plumage_hook(st, bucket)

    dmodel.register_comm_hook(state, counting_hook)
    phases, step_bytes, step_calls, saved = [], [], [], None
    for step in range(first, steps):
        with dmodel.no_sync():
            causal_lm_loss(dmodel, batch(step, 0, rank)).backward()
        phases.append(state.phase())
        buckets.append([])
        causal_lm_loss(dmodel, batch(step, 1, rank)).backward()
        step_bytes.append(sum(v["bytes"] for v in state.comm_stats()["last_step"].values()))
        step_calls.append({k: v["calls"] for k, v in state.comm_stats()["last_step"].items()})
        opt.step()
        opt.zero_grad(set_to_none=True)
        if save_at is not None and step + 1 == save_at:
            msd, osd = io.BytesIO(), io.BytesIO()
            torch.save(model.state_dict(), msd)
            torch.save(opt.state_dict(), osd)
            saved = (pickle.dumps(state), msd.getvalue(), osd.getvalue(), step + 1)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = torch.empty(world * flat.numel())
    dist.all_gather_into_tensor(gathered, flat)
    replicas = gathered.view(world, -1)
    result = {
        "replica_max_diff": float((replicas - replicas[0]).abs().max()),
        "params": flat,
        "phases": phases,
        "step_bytes": step_bytes,
        "step_calls": step_calls,
        "buckets": buckets,
        "async": state.uses_async(),
        "shapes": [(tuple(p.shape), pid in state.targets) for pid, p in enumerate(model.parameters())],
        "modes": state.param_modes(),
        "saved": saved,
    }
    del dmodel
    gc.collect()
    return result


ASYNC_VARIANTS = ("plumage", "plumage-resample-int8")  # fp32 and int8 coefficients, with refreshes


def _replica_runs(rank, world, with_resume, make_model=tiny_model):
    out = {}
    steps = 7 if with_resume else 5
    for est in VARIANTS:
        full = _train(rank, world, est, steps, save_at=3 if with_resume else None, make_model=make_model)
        out[est] = {k: v for k, v in full.items() if k != "saved"}
        if with_resume:
            resumed = _train(rank, world, est, steps, resume=full["saved"])
            out[est]["resumed_equal"] = torch.equal(resumed["params"], full["params"])
            out[est]["resumed_phases"] = resumed["phases"]
        if with_resume and est in ASYNC_VARIANTS:  # the same run through the asynchronous path (forced on gloo)
            run = _train(rank, world, est, steps, make_model=make_model, async_comm=True)
            out[est]["async_run"] = {k: run[k] for k in ("params", "phases", "step_bytes", "step_calls", "async")}
    return out


def _two_collective_reference(state, recorded):
    """The hook's previous ordinary step, written out: ``all_reduce(pack(Pᵀ G_k) / W)`` and
    ``all_reduce(pack(rest) / W)`` per bucket, then ``G_o ← P D⁻¹ R``, one matmul per matrix."""
    world, outs = dist.get_world_size(), []
    for params, local, _, _ in recorded:
        buf = local.clone()
        views = ReplayBucket(params, buf, False).gradients()
        pids = [state._pid(p) for p in params]
        comp = [i for i, pid in enumerate(pids) if state.is_compressed(pid)]
        rest = [i for i in range(len(pids)) if i not in comp]
        G = {i: orient(views[i].view(state.matrix_shape(pids[i])), is_left(state.matrix_shape(pids[i]))) for i in comp}
        Pd = {i: state._current(pids[i], buf.device) for i in comp}
        if comp:
            R = torch.cat([(Pd[i][0].mT @ G[i]).reshape(-1) for i in comp]).div_(world)
            dist.all_reduce(R)
        if rest:
            flat = torch.cat([views[i].reshape(-1) for i in rest]).div_(world)
            dist.all_reduce(flat)
            off = 0
            for i in rest:
                views[i].copy_(flat[off : off + views[i].numel()].view_as(views[i]))
                off += views[i].numel()
        off = 0
        for i in comp:
            (P, d), (r, l) = Pd[i], (Pd[i][0].shape[1], G[i].shape[1])
            G[i].copy_(P @ (R[off : off + r * l].view(r, l) / d[:, None]))
            off += r * l
        outs.append(buf)
    return torch.cat(outs)


def _packed_vs_previous(rank, world, make_model=tiny_model):
    """Max |packed hook − previous two-collective math| on an ordinary step of real DDP buckets."""
    model = make_model()
    dmodel = ddp(model)
    g0, g1 = _record_buckets(model, dmodel, [batch(s, 0, rank) for s in (0, 1)])
    st = PlumageHookState(model, rank=4, update_interval=100, start_iter=0, uniform_mix=0.1,
                          target_modules=getattr(model, "hook_targets", None))  # fmt: skip
    _replay(st, g0)  # refresh
    assert st.phase() == "lowrank"
    want = _two_collective_reference(st, g1)
    got = _replay(st, g1)  # the CPU default: no stacking
    saved = dict(batched.STACK_ELEMENTS)
    batched.STACK_ELEMENTS["cpu"] = batched.STACK_ELEMENTS_DEFAULT  # every same-shape group stacked
    try:
        stacked = _replay(st, g1)
    finally:
        batched.STACK_ELEMENTS.clear()
        batched.STACK_ELEMENTS.update(saved)
    del dmodel
    gc.collect()
    return {"max_diff": float((got - want).abs().max()), "equal": torch.equal(got, want), "buckets": len(g1),
            "stacked_max_diff": float((stacked - want).abs().max())}  # fmt: skip


def _hook_faults(rank, world):
    """NaN on rank 1 at an ordinary (iteration 3) and at a refresh step (iteration 4; refreshes at
    1, 4, 7), with PlumageAdamW behind the hook (both policies); then an ``eigh`` that fails on
    rank 0 only during a refresh. Every case must end on both ranks, nothing changed."""
    import plumage_ds.estimators.spectral as spectral
    from plumage_ds import PlumageAdamW

    out = {}

    def snapshot(model, state):
        return ([p.detach().clone() for p in model.parameters()],
                {pid: (d, P.clone(), v.clone()) for pid, (d, P, v) in state.projections.items()})  # fmt: skip

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a[0], b[0])) and a[1].keys() == b[1].keys() and all(
            a[1][k][0] == b[1][k][0] and torch.equal(a[1][k][1], b[1][k][1]) for k in a[1])  # fmt: skip

    for policy in ("skip", "raise"):
        for bad in (3, 4):
            model = tiny_model()
            dmodel = ddp(model)
            state = PlumageHookState(dmodel, rank=4, update_interval=3, start_iter=1, seed=7, uniform_mix=0.1)
            dmodel.register_comm_hook(state, plumage_hook)
            opt = PlumageAdamW(model.parameters(), lr=1e-2, rank=4, update_interval=3, nonfinite=policy)
            res = {"raised": None}
            for step in range(7):
                loss = causal_lm_loss(dmodel, batch(step, 0, rank))
                if step == bad and rank == 1:
                    loss = loss * float("nan")
                opt.zero_grad()
                loss.backward()
                if step == bad:
                    before = snapshot(model, state)
                try:
                    opt.step()
                except FloatingPointError as err:
                    res["raised"] = str(err)
                if step == bad:
                    res["unchanged"] = same(before, snapshot(model, state))
                    if res["raised"]:
                        break
            res["finite"] = all(bool(torch.isfinite(p).all()) for p in model.parameters())
            res["skipped"] = opt.skipped_steps
            res["skipped_refreshes"] = state.skipped_refreshes
            out[f"nan_{policy}_{bad}"] = res
            del dmodel
            gc.collect()

    model = tiny_model()
    dmodel = ddp(model)
    state = PlumageHookState(dmodel, rank=4, update_interval=3, start_iter=1, seed=7, uniform_mix=0.1)
    dmodel.register_comm_hook(state, plumage_hook)
    for step in range(4):  # iterations 0..3; iteration 4 refreshes
        dmodel.zero_grad()
        causal_lm_loss(dmodel, batch(step, 0, rank)).backward()
    before = (state.iter, {k: v[1].clone() for k, v in state.projections.items()})
    healthy = spectral.torch.linalg.eigh
    if rank == 0:
        def broken(*a, **k):
            raise torch.linalg.LinAlgError("eigh failed to converge (injected)")

        spectral.torch.linalg.eigh = broken
    try:
        dmodel.zero_grad()
        causal_lm_loss(dmodel, batch(4, 0, rank)).backward()
        error = None
    except RuntimeError as err:
        error = str(err)
    finally:
        spectral.torch.linalg.eigh = healthy
    after = (state.iter, {k: v[1].clone() for k, v in state.projections.items()})
    out["failed_refresh"] = {"error": error, "unchanged": before[0] == after[0] and before[1].keys() == after[1].keys()
                             and all(torch.equal(before[1][k], after[1][k]) for k in before[1])}  # fmt: skip
    del dmodel
    gc.collect()
    return out


def _worker_w2(rank, world):
    return {"unbiased": _unbiasedness(rank, world), "replicas": _replica_runs(rank, world, True),
            "faults": _hook_faults(rank, world), "packed": _packed_vs_previous(rank, world)}  # fmt: skip


def _worker_w4(rank, world):
    return {"replicas": _replica_runs(rank, world, False, make_model=TorchLM),
            "packed": _packed_vs_previous(rank, world, make_model=TorchLM)}  # fmt: skip


@pytest.fixture(scope="module")
def w2():
    return run_workers(_worker_w2, 2)


def _check_replicas(results, world, resumed):
    for est in VARIANTS:
        r0 = results[0]["replicas"][est]
        for r in results:
            rep = r["replicas"][est]
            assert rep["replica_max_diff"] == 0.0, (est, rep["replica_max_diff"])
        assert torch.isfinite(r0["params"]).all()
        expect_phases = (
            ["warmup", "refresh", "lowrank", "lowrank", "refresh", "lowrank", "lowrank"]
            if VARIANTS[est]["estimator"] != "haar"
            else ["warmup"] + ["lowrank"] * 6
        )
        expect_phases = expect_phases[: len(r0["phases"])]
        assert len(expect_phases) >= 5
        assert r0["phases"] == expect_phases
        # several buckets with compressed and dense parameters; the embedding and head are not targets
        modes = r0["modes"]
        assert {m for m, _ in modes.values()} == {"lowrank", "dense"}
        embed = "model.embed_tokens.weight" if "model.embed_tokens.weight" in modes else "embed.weight"
        assert modes[embed] == ("dense", "not a target (target_modules)")
        for phase, got in zip(r0["phases"], r0["step_bytes"]):
            want = step_bytes_formula(r0["shapes"], phase, world, rank=4, **VARIANTS[est])
            assert got == pytest.approx(want, rel=1e-12), (est, phase, got, want)
        quantized = VARIANTS[est].get("quantize") is not None
        for phase, calls, buckets in zip(r0["phases"], r0["step_calls"], r0["buckets"]):
            if phase != "lowrank":
                continue
            assert len(buckets) > 2, "expected several buckets"
            # fp32: ONE all-reduce per bucket; quantized: the row scales (MAX) and the integers per
            # bucket with compressed matrices, plus the rest (fp32) where there is one
            want = sum((2 + dense if quantized else 1) if comp else 1 for comp, dense in buckets)
            assert sum(calls.values()) == want, (est, calls, buckets)
            if not quantized:
                assert calls.get("lowrank_grad/all_reduce") == sum(comp for comp, _ in buckets), (est, calls)
        if resumed:
            assert r0["resumed_equal"], est
            assert r0["resumed_phases"] == expect_phases[3:]


@pytest.mark.distributed
@pytest.mark.parametrize("variant", ASYNC_VARIANTS)
def test_async_path_equals_sync_bitwise(w2, variant):
    """Forced on gloo: Futures of ``async_op`` all-reduces with the lift chained by ``.then`` give the
    synchronous path's parameters bit for bit over 7 steps (warm-up, two refreshes, ordinary steps),
    with the same bytes and calls per step."""
    for res in w2:
        sync, run = res["replicas"][variant], res["replicas"][variant]["async_run"]
        assert run["async"] is True and sync["async"] is False  # gloo's default is synchronous
        assert run["phases"] == sync["phases"] and "refresh" in run["phases"] and "lowrank" in run["phases"]
        assert torch.equal(run["params"], sync["params"])
        assert run["step_bytes"] == sync["step_bytes"] and run["step_calls"] == sync["step_calls"]


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_packed_collective_equals_two_collective_math(request, world):
    """Packing the rest with the coefficients changes no value: the elementwise ``/ W`` is the same and
    a 2-term sum is order-free (bitwise at W=2); with more ranks the ring's summation order depends
    on where an element sits in the buffer, so the bits may differ within rounding (≤ 1e-6).
    Stacked matmuls (forced here; off on CPU by default) round differently from per-matrix ones
    (1.5e-8 seen at W=2): ≤ 1e-6 as well."""
    for res in request.getfixturevalue(f"w{world}"):
        packed = res["packed"]
        assert packed["buckets"] > 2
        if world == 2:
            assert packed["equal"], packed
        assert packed["max_diff"] <= 1e-6, packed
        assert packed["stacked_max_diff"] <= 1e-6, packed


@pytest.mark.distributed
def test_unbiased_on_real_buckets_and_galore_biased(w2):
    u = w2[0]["unbiased"]
    assert u["buckets"] > 2
    for est in ("haar", "plumage", "plumage-resample-int8", "optimal-fp16"):
        # E‖mean − G‖² = tr(Cov)/N for an unbiased estimator; allow 2x for sampling noise
        assert u[est]["err2"] <= 2.0 * u[est]["clt2"], (est, u[est])
        assert u[est]["clt2"] > 0
        assert all(m == "lowrank" for n, (m, _) in u[f"{est}_modes"].items() if n.endswith("proj.weight"))
    # PLUMAGE's variance is far below Haar's at the same rank (spectrum-aware)
    # top-r: deterministic (no variance), so its error cannot shrink with more seeds; the same
    # CLT criterion rejects it, and its bias is a sizeable part of the gradient.
    assert u["galore"]["clt2"] == pytest.approx(0.0, abs=1e-20)
    assert u["galore"]["err2"] > 1e6 * max(u["galore"]["clt2"], 1e-30)
    # only the attention/MLP matrices are compressed (the default selection): their truncation still
    # costs several percent of the whole gradient (8.5 % measured)
    assert u["galore"]["err2"] > 0.05 * u["galore"]["norm2"]


@pytest.mark.distributed
def test_rank_at_least_short_side_is_plain_allreduce(w2):
    u = w2[0]["unbiased"]
    assert u["exact_rule"] is True
    for est in ("haar", "plumage"):
        assert u[f"exact_path_{est}"] < 1e-6, est
        worst, iters = u["ddp_exact"][est]
        assert iters == 3
        assert worst < 1e-5, (est, worst)


@pytest.mark.distributed
def test_replicas_bytes_and_resume_w2(w2):
    _check_replicas(w2, 2, resumed=True)


@pytest.fixture(scope="module")
def w4():
    return run_workers(_worker_w4, 4)


@pytest.mark.distributed
def test_replicas_and_bytes_w4(w4):
    _check_replicas(w4, 4, resumed=False)


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(64, 32)
        self.norm = torch.nn.LayerNorm(32)


def test_invalid_arguments_and_unbound_state():
    model = _Block()
    with pytest.raises(ValueError, match=r"^Invalid rank=0: must be a positive integer$"):
        PlumageHookState(model, rank=0)
    # an unknown name: the same message as in the main job's YAML (tests/unit/test_config.py)
    with pytest.raises(ValueError, match=r"^Invalid estimator='powersgd': must be one of \['adamw', 'plumage', "):
        PlumageHookState(model, estimator="powersgd")
    # a registered estimator the hook cannot compress with
    with pytest.raises(ValueError, match=r"^Invalid estimator='adamw': must be one of \['plumage', 'galore', 'haar', 'optimal'\]$"):
        PlumageHookState(model, estimator="adamw")
    with pytest.raises(ValueError, match=r"^Invalid config key 'tau': renamed to 'update_interval'$"):
        PlumageHookState(model, tau=0)
    with pytest.raises(ValueError, match=r"^Invalid estimator='topr': renamed to 'galore'$"):
        PlumageHookState(model, estimator="topr")
    with pytest.raises(ValueError, match=r"^Invalid comm_hook.min_compression_rate=0.5: must be a number >= 1$"):
        PlumageHookState(model, min_compression_rate=0.5)
    with pytest.raises(ValueError, match=r"^Invalid comm_hook.quantize='int4': must be one of \['int8', 'fp16'\]$"):
        PlumageHookState(model, quantize="int4")
    with pytest.raises(ValueError, match=r"^Invalid comm_hook.resample_interval=2: only 'plumage' and 'optimal' keep"):
        PlumageHookState(model, estimator="haar", resample_interval=2)
    with pytest.raises(ValueError, match=r"^Invalid comm_hook.resample_interval=True: must be an integer$"):
        PlumageHookState(model, resample_interval=True)
    with pytest.raises(ValueError, match=r"^Invalid sigma_weight=0.0: must be in \(0, 1\]"):
        PlumageHookState(model, estimator="optimal", sigma_weight=0.0)
    with pytest.raises(ValueError, match=r"^Invalid sigma_weight=0.5: applies to estimator 'optimal' only \(it keeps Σ\), not 'plumage'$"):
        PlumageHookState(model, estimator="plumage", sigma_weight=0.5)
    assert PlumageHookState(model, rank=4, target_modules="proj", sigma_weight=0.5).sigma_weight == 0.5  # the optimizer's knob
    with pytest.raises(ValueError, match=r"^Invalid comm_hook.async_comm='yes': must be true or false$"):
        PlumageHookState(model, async_comm="yes")
    assert PlumageHookState(model, rank=4, target_modules="proj", async_comm=True).uses_async() is True
    with pytest.raises(ValueError, match=r"target_modules=None \(the default selection\) selected no matrix"):
        PlumageHookState(model, rank=4)  # no attention/MLP names: the default selection finds nothing
    state = PlumageHookState(model, estimator="plumage", rank=4, target_modules=["proj"])
    blob = pickle.dumps(state)  # no process group: still plain data
    restored = pickle.loads(blob)
    assert restored.param_names == state.param_names and restored.rank == 4
    p = next(model.parameters())
    bucket = ReplayBucket([p], torch.zeros(p.numel()), True)
    with pytest.raises(RuntimeError, match=r"call state.bind\(ddp_model\)"):
        plumage_hook(restored, bucket)
    other = torch.nn.Linear(3, 3)
    with pytest.raises(ValueError, match=r"Invalid model for this hook state: parameter #0 differs"):
        restored.bind(other)
    restored.bind(model)
    modes = restored.param_modes()
    assert modes["norm.weight"] == ("dense", "1-D tensor")
    assert modes["proj.bias"] == ("dense", "1-D tensor")
    assert modes["proj.weight"] == ("lowrank", "plumage r=4 of s=32, l=64: 8x fewer bytes")
    quantized = PlumageHookState(model, rank=16, resample_interval=1, quantize="int8", target_modules="proj").param_modes()["proj.weight"]
    assert quantized == ("lowrank", "optimal r=16 of s=32, l=64, resampled, int8: 8x fewer bytes")  # the schema's default
    narrow = PlumageHookState(model, rank=20, target_modules="proj").param_modes()["proj.weight"]
    assert narrow == ("dense", "compression rate s/r=32/20 < min_compression_rate=2")


@pytest.mark.distributed
@pytest.mark.parametrize("bad", [3, 4], ids=["ordinary", "refresh"])
@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_nan_on_one_rank_passes_through_and_the_optimizer_decides(w2, policy, bad):
    """The hook averages the NaN exactly (no hang), never refreshes from it; PlumageAdamW behind it
    skips (or raises) on both ranks; parameters and the hook's projections unchanged."""
    for res in w2:
        run = res["faults"][f"nan_{policy}_{bad}"]
        assert run["unchanged"] and run["finite"], run
        if policy == "skip":
            assert run["raised"] is None and run["skipped"] == 1
        else:
            assert run["raised"].startswith("Non-finite gradient in [")
        if bad == 4:  # the refresh saw NaN in every compressed matrix: none refreshed from it
            assert run["skipped_refreshes"] > 0
        else:
            assert run["skipped_refreshes"] == 0


@pytest.mark.distributed
def test_refresh_failing_on_its_owner_raises_on_every_rank(w2):
    errors = [res["faults"]["failed_refresh"]["error"] for res in w2]
    assert errors[0] is not None and errors[0] == errors[1], errors
    assert "plumage_hook: the refresh of" in errors[0] and "failed on its owner, rank 0" in errors[0]
    assert all(res["faults"]["failed_refresh"]["unchanged"] for res in w2)


@pytest.mark.parametrize("saved_k, now_k", [(0, 4), (4, 0)])
def test_sigma_saved_in_another_form_loads_in_the_hooks_form(tmp_path, saved_k, now_k):
    """A hook state whose ``Σ`` was kept under another ``sigma_rank`` loads in this hook's form (expanded
    exactly, or compressed with its trace and top pairs kept); a ``Σ`` of no form is refused by name and
    nothing changes."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = _Block()  # proj.weight (32, 64): s = 32
        g = torch.Generator().manual_seed(0)
        A = torch.randn(32, 40, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 32, dtype=torch.float64)[:, None]
        saved = convert_second_moment(A @ A.mT, saved_k)
        hook = dict(rank=4, estimator="optimal", target_modules="proj")
        sd = PlumageHookState(model, sigma_rank=saved_k, **hook).state_dict()
        sd["sigma"] = {0: {"count": 2, "Sigma": saved}}
        loader = PlumageHookState(model, sigma_rank=now_k, **hook)
        bad = dict(sd, sigma={0: {"count": 2, "Sigma": torch.zeros(32, 33, dtype=torch.float64)}})
        with pytest.raises(ValueError, match=r"^Invalid comm hook state_dict: sigma\[0\]\.Sigma must be a finite tensor of shape "
                                             r"\(32, 32\) or compact \(32, k\+1\) with 1 <= k <= 30$"):
            loader.load_state_dict(bad)
        assert loader.sigma == {}
        loader.load_state_dict(sd)
        count, kept = loader.sigma[0]
        assert count == 2 and kept.shape == ((32, 5) if now_k else (32, 32))
        whole, mine = full_second_moment(saved), full_second_moment(kept)
        if not now_k:
            assert torch.equal(mine, whole)
        torch.testing.assert_close(torch.trace(mine), torch.trace(whole), rtol=1e-12, atol=0)
        torch.testing.assert_close(torch.linalg.eigvalsh(mine)[-4:], torch.linalg.eigvalsh(whole)[-4:], rtol=1e-9, atol=0)
    finally:
        dist.destroy_process_group()
