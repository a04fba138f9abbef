"""The step on an accelerator's terms, checked on CPU (docs/design.md §5.1):

* the streaming step (in place, matrix chunk by chunk) gives the staged step's bits in fp32, with
  refreshes, every ``dinv_placement``, clipping and backward projection;
* its transient memory, measured with PyTorch's own ``MemTracker`` around one ordinary ``step()``,
  is at most twice the largest single matrix (in fp32 bytes) — fp32 and bf16 weights, state in
  fp32 or bf16 — where the staged step's grows with the model;
* the precision policy: ``state_dtype="bfloat16"`` halves the state, ``compute_dtype="bfloat16"``
  runs the GEMMs in bf16; both stay within a stated bound of the fp32 policy on the same gradients;
* bad values and the streaming step on a layout with collectives are refused, naming the value.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch.distributed._tools.mem_tracker import MemTracker

from plumage_ds.optim import PlumageAdamW

# a 256-wide LLaMA block pair: q, k, v, o (256²), gate, up (688 × 256), down (256 × 688), twice
WIDTH, FFN = 256, 688
SHAPES = [(WIDTH, WIDTH)] * 4 + [(FFN, WIDTH), (FFN, WIDTH), (WIDTH, FFN)]
SHAPES = SHAPES + SHAPES


def _params(dtype, seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=g) * 0.02).to(dtype)) for s in shapes]


def _grads(params, step):
    g = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def _small():
    """A handful of small matrices and a vector: left, right and square projections, a dense parameter."""
    return _params(torch.float32, shapes=[(12, 20), (20, 8), (8, 8), (24, 12), (24,)])


def _run(params, steps, **kw):
    opt = PlumageAdamW(params, lr=1e-2, rank=3, update_interval=3, seed=5, weight_decay=0.05, **kw)
    for step in range(steps):
        _grads(params, step)
        opt.step()
    return opt


@pytest.mark.parametrize("kw", [
    {}, {"dinv_placement": "coords"}, {"dinv_placement": "lift"}, {"max_grad_norm": 0.5},
    {"estimator": "optimal", "uniform_mix": 0.1}, {"estimator": "galore"},
], ids=["plumage", "coords", "lift", "clip", "optimal", "galore"])
def test_streaming_equals_staged_bitwise(kw):
    a, b = _small(), _small()
    streamed = _run(a, 8, step_impl="streaming", **kw)  # refreshes at 0, 3, 6 stage; the others stream
    _run(b, 8, step_impl="staged", **kw)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert streamed.step_impl == "streaming"


@pytest.mark.parametrize("kw", [
    {}, {"dinv_placement": "lift", "max_grad_norm": 0.5}, {"dinv_placement": "coords"},
    {"state_dtype": "bfloat16"}, {"estimator": "optimal", "uniform_mix": 0.1},
], ids=["plumage", "lift-clip", "coords", "bf16-state", "optimal"])
def test_compiled_step_matches_streaming(kw):
    """``step_impl="compiled"`` (the compressed Adam as one compiled kernel per matrix) against the eager
    streaming step after 8 steps (refreshes at 0, 3, 6): weights within 1e-6 and moments within 1e-5
    relative (the compiler may contract ``a·b + c``); the kernel is compiled, not run eagerly."""
    from torch._dynamo.utils import counters

    a, b = _small(), _small()
    compiled = _run(a, 8, step_impl="compiled", **kw)
    streamed = _run(b, 8, step_impl="streaming", **kw)
    assert compiled._fused_ready and counters["stats"]["unique_graphs"] >= 1  # compiled (once per process)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6 * float(q.detach().abs().max()))
    for p, q in zip(a, b):
        for key in ("exp_avg", "exp_avg_sq"):
            if key in streamed.state[q]:
                x, y = compiled.state[p][key].float(), streamed.state[q][key].float()
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6 * float(y.abs().max()))


def test_compiled_step_keeps_a_bounded_set_of_device_constants():
    """The compiled step's device scalars are made once per ``(β1, β2, eps)``; a schedule that changes
    the betas every step keeps at most 8 sets, and the step still follows the streaming one."""
    a, b = _small(), _small()
    opts = [PlumageAdamW(p, lr=1e-2, rank=3, update_interval=3, seed=5, step_impl=impl) for p, impl in ((a, "compiled"), (b, "streaming"))]
    for step in range(20):
        for params, opt in zip((a, b), opts):
            opt.param_groups[0]["betas"] = (0.9, 0.999 - 1e-4 * step)
            _grads(params, step)
            opt.step()
    assert len(opts[0]._fused_consts) == 8
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6 * float(q.detach().abs().max()))


def test_compiled_step_refuses_before_writing_if_the_compiler_fails(monkeypatch):
    """A compiler failure at the first ordinary step raises naming the cause and the way out; the
    parameters and the state are as they were."""
    from plumage_ds.kernels import fused

    params = _small()
    opt = _run(params, 1, step_impl="compiled")  # the refresh (staged: nothing to compile)
    before = [p.detach().clone() for p in params]
    moments = [opt.state[p]["exp_avg"].clone() for p in params[:4]]

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(fused, "_compiled", broken)
    _grads(params, 1)
    with pytest.raises(RuntimeError, match=re.escape("step_impl='compiled': torch.compile failed for torch.float32 moments on cpu "
                                                     "(RuntimeError: no C++ compiler); use step_impl='streaming'")):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    assert all(torch.equal(opt.state[p]["exp_avg"], m) for p, m in zip(params[:4], moments))
    assert opt.state[params[0]]["step"] == 1


@pytest.mark.parametrize("mode", ["MemTracker", "_FlopCounterMode"])
def test_compiled_step_refuses_under_a_dispatch_mode(mode):
    """``torch.compile`` does not trace under a ``TorchDispatchMode``: a compiled step inside one (a memory
    tracker, a FLOP counter) raises naming the mode and the way out, before any write; outside it the
    next step runs."""
    from torch.utils.flop_counter import FlopCounterMode

    params = _small()
    opt = _run(params, 2, step_impl="compiled")  # the refresh and one compiled ordinary step
    before = [p.detach().clone() for p in params]
    moments = [opt.state[p]["exp_avg"].clone() for p in params[:4]]
    _grads(params, 2)
    ctx = MemTracker() if mode == "MemTracker" else FlopCounterMode(display=False)
    with pytest.raises(RuntimeError, match=re.escape(f"step_impl='compiled' cannot run under an active TorchDispatchMode ({mode}): "
                                                     "torch.compile does not trace under one; use step_impl='streaming' while it is active")):
        with ctx:
            opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    assert all(torch.equal(opt.state[p]["exp_avg"], m) for p, m in zip(params[:4], moments))
    assert opt.state[params[0]]["step"] == 2
    opt.step()
    assert opt.state[params[0]]["step"] == 3 and not all(torch.equal(p, q) for p, q in zip(params, before))


def test_streaming_with_backward_projection_equals_staged():
    """Gradients projected during backward (``Pᵀ G_o`` accumulated, ``G`` dropped) stream too."""
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.Tanh(), torch.nn.Linear(20, 6)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [PlumageAdamW(m.parameters(), lr=1e-2, rank=3, update_interval=3, backward_projection=True, step_impl=impl)
            for m, impl in zip(models, ("streaming", "staged"))]  # fmt: skip
    for step in range(7):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(16, 12, generator=g)
        for m, opt in zip(models, opts):
            opt.zero_grad()
            m(x).pow(2).mean().backward()
            opt.step()
    assert all(torch.equal(p, q) for p, q in zip(models[0].parameters(), models[1].parameters()))


def _transient(opt, params) -> int:
    """Bytes allocated at the peak of one ``step()`` above what was allocated before it (MemTracker)."""
    tracker = MemTracker()
    tracker.track_external(opt, *params, *[p.grad for p in params])
    with tracker:
        before = tracker.get_tracker_snapshot("current")
        opt.step()
    peak = tracker.get_tracker_snapshot("peak")

    def total(snapshot):
        return sum(v for per_device in snapshot.values() for k, v in per_device.items() if str(k).endswith("Total"))

    return total(peak) - total(before)


@pytest.mark.parametrize("dtype, state_dtype", [
    (torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, "bfloat16"),
])
def test_step_transient_is_bounded_by_one_matrix(dtype, state_dtype):
    """An ordinary step of a 14-matrix block pair (r = s/4): transient ≤ 2 × the largest matrix in fp32
    (688 × 256 × 4 B = 688 KiB); the staged step of the same optimizer holds every matrix's compressed
    moments and directions at once, so its transient grows with the model (asserted above the bound)."""
    largest = max(m * n for m, n in SHAPES) * 4
    measured = {}
    for impl in ("streaming", "staged"):
        params = _params(dtype)
        opt = PlumageAdamW(params, lr=1e-3, rank=WIDTH // 4, update_interval=1000, state_dtype=state_dtype, step_impl=impl)
        for step in range(2):  # the refresh, then an ordinary step
            _grads(params, step)
            opt.step()
        _grads(params, 2)
        measured[impl] = _transient(opt, params)
    assert 0 < measured["streaming"] <= 2 * largest, measured
    assert measured["staged"] > 2 * largest, measured  # the bound is the streaming step's doing


def test_bf16_state_halves_the_state_and_stays_close():
    """``state_dtype="bfloat16"``: P, M, V and the dense moments in bf16 (d in fp32): the state is half
    the fp32 policy's, plus d; on the same gradients the weights stay within 1 % of the update's size."""
    shapes = [(64, 96), (96, 48), (48,)]
    ref, low = _params(torch.float32, shapes=shapes), _params(torch.float32, shapes=shapes)
    start = [p.detach().clone() for p in ref]
    a = _run(ref, 10)
    b = _run(low, 10, state_dtype="bfloat16")
    kept = {t.dtype for st in b.state.values() for k, t in st.items() if torch.is_tensor(t) and k != "d"}
    assert kept == {torch.bfloat16} and {st["d"].dtype for st in b.state.values() if "d" in st} == {torch.float32}
    d_bytes = sum(st["d"].numel() * 4 for st in b.state.values() if "d" in st)
    assert b.state_bytes()["total"] - d_bytes == (a.state_bytes()["total"] - d_bytes) // 2
    for p, q, w0 in zip(ref, low, start):
        assert float((p - q).detach().abs().max()) <= 0.01 * float((p - w0).detach().abs().max())


def test_bf16_compute_stays_close_on_the_same_gradients():
    """``compute_dtype="bfloat16"`` on bf16 weights (projections and lifts in bf16, Adam in fp32) against
    the fp32 policy on the same bf16 weights and gradients: within 2 bf16 ulps of the weights' scale."""
    shapes = [(64, 96), (96, 48), (48,)]
    ref, low = _params(torch.bfloat16, shapes=shapes), _params(torch.bfloat16, shapes=shapes)
    _run(ref, 10)
    _run(low, 10, compute_dtype="bfloat16")
    for p, q in zip(ref, low):
        assert float((p.detach().float() - q.detach().float()).abs().max()) <= 2 * 2**-8 * float(p.detach().float().abs().max())


def test_streaming_on_a_layout_with_collectives_is_refused(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        for impl in ("streaming", "compiled"):
            with pytest.raises(ValueError, match=re.escape(f"Invalid step_impl='{impl}': the replicated, owner-sharded over 1 ranks layout")):
                PlumageAdamW(_small(), rank=3, process_group=dist.group.WORLD, step_impl=impl)
        opt = PlumageAdamW(_small(), rank=3, process_group=dist.group.WORLD)  # auto: staged there
        _grads(opt.param_groups[0]["params"], 0)
        opt.step()
        _grads(opt.param_groups[0]["params"], 1)
        opt.step()
        assert opt.comm_stats()["last_step"]  # the ordinary step ran the staged path's collectives
    finally:
        dist.destroy_process_group()


def test_policies_checkpoint_and_refuse_bad_values():
    params = _small()
    opt = _run(params, 4, state_dtype="bfloat16")
    sd = copy.deepcopy(opt.state_dict())
    fresh = PlumageAdamW(_small(), lr=1e-2, rank=3, update_interval=3, seed=5, weight_decay=0.05, state_dtype="bfloat16")
    fresh.load_state_dict(sd)
    got = fresh.state_dict()["state"]
    assert all(got[i]["exp_avg"].dtype == torch.bfloat16 and torch.equal(got[i]["exp_avg"], sd["state"][i]["exp_avg"])
               for i in sd["state"] if "exp_avg" in sd["state"][i])  # fmt: skip
    for kw, match in [
        ({"state_dtype": "float16"}, "Invalid state_dtype='float16': must be one of ['float32', 'bfloat16']"),
        ({"compute_dtype": torch.float64}, "Invalid compute_dtype='float64': must be one of ['float32', 'bfloat16']"),
        ({"step_impl": "fused"}, "Invalid step_impl='fused': must be one of ['auto', 'staged', 'streaming', 'compiled']"),
    ]:
        with pytest.raises(ValueError, match=re.escape(match)):
            PlumageAdamW(_small(), rank=3, **kw)
