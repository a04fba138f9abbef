"""An ordinary streamed step decides "skip for NaN/Inf" on the device (docs/design.md §5.1):

* nothing in the step reads a tensor on the host (``item``, ``tolist``, ``bool``, ``float``, ...)
  beyond the previous step's flag, which the next ``step()`` settles first if nothing did before;
* a step the device skipped leaves parameters and state as they were, bit for bit, under every
  precision policy and the compiled step, with weight decay and clipping, on the stacked lift path and with gradients
  projected during backward: the run equals one that never saw the bad step;
* what the host reports (``skipped_steps``, ``last_nonfinite``, ``last_grad_norm``, ``state``,
  ``state_dict()``) is settled from the flag when read.
"""

from __future__ import annotations

import pytest
import torch

from plumage_ds.kernels import batched
from plumage_ds.optim import PlumageAdamW

SHAPES = [(12, 20), (12, 20), (20, 8), (8, 8), (24, 12), (24,)]  # a same-shape pair, left, right, square; a vector
POLICIES = {
    "fp32": (torch.float32, {}),
    "bf16-weights": (torch.bfloat16, {}),
    "bf16-compute-state": (torch.bfloat16, {"compute_dtype": "bfloat16", "state_dtype": "bfloat16"}),
    "compiled": (torch.float32, {"step_impl": "compiled"}),
    "compiled-bf16-state": (torch.bfloat16, {"state_dtype": "bfloat16", "step_impl": "compiled"}),
}
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


def _params(dtype):
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter((torch.randn(s, generator=g) * 0.1).to(dtype)) for s in SHAPES]


def _grads(params, step, bad=None):
    g = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        if i == bad:
            p.grad.view(-1)[3] = float("nan")


def _opt(params, **kw):
    options = dict(lr=1e-2, rank=3, update_interval=4, seed=1, weight_decay=0.1)
    return PlumageAdamW(params, **{**options, **kw})


def _record_host_reads(monkeypatch) -> list:
    reads = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return reads


def _snapshot(opt, params) -> list:
    state = [{k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()} for p in params if p in opt.state]
    return [p.detach().clone() for p in params] + state


def _equal(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x, y) if torch.is_tensor(x) else x.keys() == y.keys() and all(
            torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k] for k in x)
        for x, y in zip(a, b))


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("kw", [{}, {"max_grad_norm": 0.5}, {"backward_projection": True}], ids=["plain", "clip", "bwdproj"])
def test_an_ordinary_step_reads_nothing_on_the_host(monkeypatch, policy, kw):
    dtype, options = POLICIES[policy]
    params = _params(dtype)
    opt = _opt(params, **options, **kw)
    for step in range(2):  # the refresh may read on the host, and the first ordinary step compiles
        _grads(params, step)
        opt.step()
    assert opt.skipped_steps == 0  # settles step 1's flag here (else the next step() reads it first, design §5.1)
    _grads(params, 2)
    reads = _record_host_reads(monkeypatch)
    opt.step()
    assert reads == []
    monkeypatch.undo()
    assert opt.skipped_steps == 0 and opt.state[params[0]]["step"] == 3


def test_in_a_loop_a_step_reads_only_the_previous_steps_flag(monkeypatch):
    """Back to back, each ordinary step first settles the previous one: one ``tolist`` of the flag
    that was queued for the host when that step began (on an accelerator: a wait for that copy only)."""
    params = _params(torch.float32)
    opt = _opt(params)
    for step in range(2):
        _grads(params, step)
        opt.step()
    _grads(params, 2)
    reads = _record_host_reads(monkeypatch)
    opt.step()
    assert reads == ["tolist"]


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("kw", [{}, {"max_grad_norm": 0.5}, {"weight_decay": 0.0}, {"stacked": True}],
                         ids=["decay", "clip", "no-decay", "stacked"])
def test_a_step_skipped_on_the_device_changes_nothing(monkeypatch, policy, kw):
    dtype, options = POLICIES[policy]
    if kw.pop("stacked", False):  # small same-shape fp32 lifts stacked, as on accelerators (rank 1: one chunk)
        monkeypatch.setitem(batched.STACK_ELEMENTS, "cpu", 1 << 22)
        kw["rank"] = 1
    a, b = _params(dtype), _params(dtype)
    skipping, clean = _opt(a, **options, **kw), _opt(b, **options, **kw)
    for step in range(2):
        for params, opt in ((a, skipping), (b, clean)):
            _grads(params, step)
            opt.step()
    norm = skipping.last_grad_norm
    before = _snapshot(skipping, a)
    _grads(a, 99, bad=1)
    skipping.step()  # ordinary: streamed, decided on the device
    assert all(torch.equal(p, q) for p, q in zip(a, before))  # the weights, before anything is read
    assert _equal(_snapshot(skipping, a), before)  # reading the state settles the step counters
    assert skipping.skipped_steps == 1 and skipping.last_nonfinite == ["param1"] and skipping.last_grad_norm == norm
    for step in range(2, 7):  # crosses the refresh at step 4
        for params, opt in ((a, skipping), (b, clean)):
            _grads(params, step)
            opt.step()
    assert _equal(_snapshot(skipping, a), _snapshot(clean, b))
    sections = [{k: v for k, v in o.state_dict()["plumage"].items() if k != "skipped_steps"} for o in (skipping, clean)]
    assert sections[0] == sections[1]


def test_a_skipped_first_step_leaves_no_state():
    """A dense-only optimizer streams from its first step: the state that step created goes with it."""
    params = [torch.nn.Parameter(torch.randn(6)), torch.nn.Parameter(torch.randn(4))]
    opt = PlumageAdamW(params, lr=1e-2)
    params[0].grad, params[1].grad = torch.randn(6), torch.tensor([1.0, float("inf"), 0.0, 2.0])
    opt.step()
    assert len(opt.state) == 0 and opt.skipped_steps == 1 and opt.last_nonfinite == ["param1"]
    params[1].grad = torch.randn(4)
    opt.step()
    assert all(opt.state[p]["step"] == 1 for p in params) and opt.skipped_steps == 1


def test_backward_projection_sees_the_settled_step():
    """Gradients projected during backward ask "does the next step refresh?" of the step counters: a
    step skipped on the device is settled first, so the run equals one without the bad batch."""
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.Tanh(), torch.nn.Linear(20, 6)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [_opt(m.parameters(), update_interval=3, backward_projection=True) for m in models]
    batches = [torch.randn(16, 12, generator=torch.Generator().manual_seed(s)) for s in range(6)]
    bad = torch.full((16, 12), float("nan"))
    for k, x in enumerate(batches):
        for m, opt, xs in zip(models, opts, ([x, bad] if k == 2 else [x], [x])):
            for batch in xs:  # model 0 also meets a NaN batch before step 2's refresh decision
                opt.zero_grad()
                m(batch).pow(2).mean().backward()
                opt.step()
    assert opts[0].skipped_steps == 1 and opts[1].skipped_steps == 0
    assert all(torch.equal(p, q) for p, q in zip(models[0].parameters(), models[1].parameters()))


def test_loading_a_state_dict_over_a_pending_skip_keeps_the_loaded_state():
    """The flag of a step skipped on the device is settled against the state it changed, not a loaded one."""
    params = _params(torch.float32)
    opt = _opt(params)
    for step in range(2):
        _grads(params, step)
        opt.step()
    saved = opt.state_dict()
    _grads(params, 2)
    opt.step()  # applied: counters at 3
    _grads(params, 99, bad=0)
    opt.step()  # skipped on the device, not yet read
    opt.load_state_dict(saved)
    assert all(opt.state[p]["step"] == 2 for p in params) and opt.skipped_steps == 0
