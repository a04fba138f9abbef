"""The batched hot path (same-shape matrices stacked, ``torch._foreach_*``) equals the per-matrix path.

``plumage_ds.kernels.batched.per_matrix()`` runs the very same optimizer code with groups of one
matrix (no stacking, one ``_foreach`` list per tensor); the batched run — with stacking switched
on for CPU as it is on accelerators (``stacking`` fixture) — must follow it to 1e-6
for mixed shapes, both orientations, every estimator, ``svd_method`` and ``dinv_placement``,
several hyperparameter groups, clipping and weight decay, across refreshes. The oracle tests
(``test_plumage_adamw.py``, ``test_reference.py``) compare the batched path with the readable
per-matrix reference as well.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from plumage_ds import PlumageAdamW
from plumage_ds.kernels import batched
from plumage_ds.optim import GUM
from plumage_ds.distributed.layouts.base import apply_delta
from plumage_ds.optim.base import CollectiveStepError


class Mixed(nn.Module):
    """Three shapes of target matrix several times each, both orientations, plus a unique one."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.ModuleList(nn.Linear(16, 24) for _ in range(3))  # (24, 16): right projection
        self.down = nn.ModuleList(nn.Linear(24, 16) for _ in range(3))  # (16, 24): left projection
        self.sq = nn.ModuleList(nn.Linear(16, 16, bias=False) for _ in range(2))
        self.odd = nn.Linear(16, 12, bias=False)  # (12, 16): alone in its shape
        self.norm = nn.Parameter(torch.ones(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * self.norm
        for up, down in zip(self.up, self.down):
            h = h + down(torch.tanh(up(h)))
        for sq in self.sq:
            h = torch.tanh(sq(h))
        return self.odd(h)


def _groups(model: Mixed) -> list[dict]:
    """Two target groups with different lr (two batching keys), and the dense rest."""
    first = [p for m in model.up for p in (m.weight,)] + [model.odd.weight]
    second = [m.weight for m in model.down] + [m.weight for m in model.sq]
    dense = [model.norm] + [m.bias for m in (*model.up, *model.down)]
    return [
        {"params": first, "lowrank": True},
        {"params": second, "lowrank": True, "lr": 2e-3},
        {"params": dense, "lowrank": False},
    ]


def _train(opt_factory, steps: int = 7, per_matrix: bool = False) -> tuple[Mixed, torch.optim.Optimizer]:
    model = Mixed()
    opt = opt_factory(model)
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(40, 16, generator=g), torch.randn(40, 12, generator=g)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        if per_matrix:
            with batched.per_matrix():
                opt.step()
        else:
            opt.step()
    return model, opt


@pytest.fixture
def stacking(monkeypatch):
    """Stack small same-shape matrices on CPU too (off by default there: measured slower), so that the
    tests run the stacked code path that accelerators take."""
    monkeypatch.setitem(batched.STACK_ELEMENTS, "cpu", 1 << 16)
    monkeypatch.setitem(batched.DECOMPOSITION_STACK_ELEMENTS, "cpu", 1 << 16)


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


CASES = [
    dict(estimator="plumage", svd_method="gram", dinv_placement="none"),
    dict(estimator="plumage", svd_method="svd", dinv_placement="coords"),
    dict(estimator="plumage", svd_method="gram", dinv_placement="lift", uniform_mix=0.1),
    dict(estimator="galore", svd_method="gram", dinv_placement="none"),
    dict(estimator="galore", svd_method="svd", dinv_placement="none", realign=True),
    dict(estimator="haar", dinv_placement="coords"),
    dict(estimator="optimal", dinv_placement="none", uniform_mix=0.1),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_batched_step_equals_per_matrix_step(case: dict, stacking) -> None:
    # stacked and single products round differently (~1e-7 relative); Adam turns that into larger
    # changes in directions whose R is near eps, and dinv_placement="lift" multiplies them by 1/p:
    # at lr 5e-3 the two paths stay within 6e-7 after 7 steps (lift) and 2e-7 otherwise
    def factory(model):
        return PlumageAdamW(_groups(model), lr=5e-3, eps=1e-6, rank=4, update_interval=3, weight_decay=0.1,
                            max_grad_norm=0.5, seed=3, **case)

    fast, opt_fast = _train(factory)
    slow, opt_slow = _train(factory, per_matrix=True)
    assert _max_diff(fast, slow) <= 1e-6
    assert _max_diff(fast, Mixed()) > 1e-2  # it trained
    for p_fast, p_slow in zip(fast.parameters(), slow.parameters()):
        st_fast, st_slow = opt_fast.state[p_fast], opt_slow.state[p_slow]
        assert st_fast.keys() == st_slow.keys() and st_fast["step"] == 7
        for key, value in st_fast.items():  # the tolerances of the oracle test (fp32 svd moves P by ~1e-6)
            if torch.is_tensor(value):
                tol = dict(rtol=0, atol=1e-5) if key in ("P", "d") else dict(rtol=1e-5, atol=1e-7)
                torch.testing.assert_close(value, st_slow[key], **tol)
    rows = {r["name"]: r["mode"] for r in opt_fast.matrix_report()}
    assert list(rows.values()).count(case["estimator"]) == 9  # every matrix took the low-rank path


def test_gum_dense_path_batched_equals_per_matrix(stacking) -> None:
    def factory(model):
        return GUM(_groups(model), lr=1e-2, rank=4, update_interval=3, gamma=2, weight_decay=0.1, seed=3)

    fast, _ = _train(factory)
    slow, _ = _train(factory, per_matrix=True)
    assert _max_diff(fast, slow) <= 1e-6


def test_stacking_really_happens_and_matches_matmul(stacking) -> None:
    """Small same-shape pairs go through one bmm (results are views of one stack); big ones do not."""
    g = torch.Generator().manual_seed(0)
    A = [torch.randn(4, 16, generator=g) for _ in range(5)] + [torch.randn(300, 300, generator=g)] * 2
    B = [torch.randn(16, 24, generator=g) for _ in range(5)] + [torch.randn(300, 2, generator=g)] * 2
    out = batched.matmuls(A, B)
    for a, b, c in zip(A, B, out):
        torch.testing.assert_close(c, a @ b, rtol=1e-6, atol=1e-6)
    assert len({c.untyped_storage().data_ptr() for c in out[:5]}) == 1  # one stacked product
    assert out[5].untyped_storage().data_ptr() != out[6].untyped_storage().data_ptr()  # 90,000 > 2¹⁶ elements
    with batched.per_matrix():
        single = batched.matmuls(A, B)
    assert len({c.untyped_storage().data_ptr() for c in single[:5]}) == 5
    spectra = batched.map_stacked(torch.linalg.eigh, [a @ a.mT for a in A])
    for a, (evals, evecs) in zip(A, spectra):
        torch.testing.assert_close(evals, torch.linalg.eigvalsh(a @ a.mT), rtol=1e-5, atol=1e-4)


def test_cpu_keeps_one_matmul_per_matrix() -> None:
    """The default CPU policy (measured: stacking never paid there) makes no stack."""
    A = [torch.randn(4, 16) for _ in range(5)]
    out = batched.matmuls(A, [torch.randn(16, 3) for _ in range(5)])
    assert len({c.untyped_storage().data_ptr() for c in out}) == 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_lifts_equals_the_per_matrix_rule(dtype: torch.dtype, stacking) -> None:
    """``W ← W·(1 − decay) − A B`` without forming ``A B`` (addmm_), stacked for small groups, bf16 rounded once."""
    g = torch.Generator().manual_seed(1)
    W = [torch.randn(6, 5, generator=g).to(dtype) for _ in range(3)] + [torch.randn(40, 300, generator=g).to(dtype)]
    A = [torch.randn(w.shape[0], 2, generator=g) for w in W]
    B = [torch.randn(2, w.shape[1], generator=g) * 1e-2 for w in W]
    decays = [0.01, 0.01, 0.0, 0.02]
    ref = [w.clone() for w in W]
    for w, a, b, decay in zip(ref, A, B, decays):
        apply_delta(w, a @ b, decay)
    batched.apply_lifts(W, A, B, decays)
    for a, b in zip(W, ref):
        assert a.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        else:  # fp32 math rounded once to bf16: at most one bf16 ulp apart
            assert ((a.float() - b.float()).abs() <= 2**-7 * b.float().abs() + 1e-30).all()


@pytest.mark.parametrize("in_place", [True, False])
def test_adamw_chunks_in_place_and_staged_give_the_same_bits(in_place: bool) -> None:
    from plumage_ds.kernels.adam import adam_direction, adam_moments, adamw_chunks

    g = torch.Generator().manual_seed(2)
    G = [torch.randn(7, generator=g), torch.randn(3, 4, generator=g)]
    M = [None, torch.randn(3, 4, generator=g)]
    V = [None, torch.rand(3, 4, generator=g)]
    W = [torch.randn(7, generator=g), torch.randn(3, 4, generator=g)]
    kw = dict(beta1=0.9, beta2=0.99, eps=1e-8, decay=0.01, step_size=0.05)
    W_run = [w.clone() for w in W]
    M_run = [None if m is None else m.clone() for m in M]
    V_run = [None if v is None else v.clone() for v in V]
    M2, V2, W2 = adamw_chunks(M_run, V_run, G, W_run, in_place=in_place, **kw)
    assert (W2[1] is W_run[1]) and (M2[1] is M_run[1]) == in_place
    for m, v, g_, w, m2, v2, w2 in zip(M, V, G, W, M2, V2, W2):
        m0 = torch.zeros_like(g_) if m is None else m
        v0 = torch.zeros_like(g_) if v is None else v
        m1, v1 = adam_moments(m0, v0, g_, 0.9, 0.99)
        w1 = w.mul(0.99).sub_(adam_direction(m1, v1, 1e-8), alpha=0.05)
        assert torch.equal(m2, m1) and torch.equal(v2, v1)
        torch.testing.assert_close(w2, w1, rtol=1e-6, atol=1e-7)


def test_nonfinite_flags_and_norms() -> None:
    huge = torch.full((4,), 3e38)  # finite, but its squared norm overflows
    ts = [torch.ones(3), torch.tensor([1.0, float("nan")]), torch.empty(0), torch.tensor([float("-inf")]), huge,
          torch.zeros(2, 2)]
    assert batched.nonfinite_flags(ts) == [False, True, False, True, False, False]
    assert batched.sq_norm_sum([torch.full((4,), 2.0), torch.empty(0), torch.ones(2, 2)]) == 20.0
    assert batched.sq_norm_sum([]) == 0.0


def test_a_failed_refresh_names_the_matrix_and_changes_nothing(monkeypatch) -> None:
    """A failing eigh inside a stack: the matrices are redone alone to name the failing one; the step is refused."""
    from plumage_ds.estimators import refresh

    real = refresh.gram_basis

    def failing(gram):
        if gram.shape[-1] == 12:  # the Gram matrix of ``odd.weight`` (short side 12)
            raise RuntimeError("simulated eigh failure")
        return real(gram)

    model = Mixed()
    names = dict((id(p), n) for n, p in model.named_parameters())
    groups = _groups(model)
    for grp in groups:
        grp["names"] = [names[id(p)] for p in grp["params"]]
    opt = PlumageAdamW(groups, lr=1e-2, rank=4, update_interval=2, seed=3)
    x = torch.randn(40, 16)
    ((model(x)) ** 2).mean().backward()
    opt.step()  # refresh at step 0 works
    opt.zero_grad()
    ((model(x)) ** 2).mean().backward()
    opt.step()  # ordinary step
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state_before = {k: {kk: (vv.clone() if torch.is_tensor(vv) else vv) for kk, vv in v.items()} for k, v in opt.state.items()}
    opt.zero_grad()
    ((model(x)) ** 2).mean().backward()
    monkeypatch.setattr(refresh, "gram_basis", failing)
    with pytest.raises(CollectiveStepError, match=re.escape("refresh of 'odd.weight' failed: RuntimeError: simulated eigh failure")):
        opt.step()  # step 2 refreshes
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    for p, st in opt.state.items():
        for key, value in st.items():
            old = state_before[p][key]
            assert (torch.equal(value, old) if torch.is_tensor(value) else value == old), key
