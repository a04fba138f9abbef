"""Tests for the single-device oracle ``ReferencePlumageAdam``."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from plumage_ds.estimators import estimate, get_estimator, sampler_generator
from plumage_ds.optim.reference import ReferencePlumageAdam


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # weights (20, 12) and (8, 20): non-square, one projected from each side in galore-torch
    # ((20,12): m >= n → right; (8,20): m < n → left), same sides as ours.
    return nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 8))


def _batches(n_steps: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 12, generator=g), torch.randn(16, 8, generator=g)) for _ in range(n_steps)]


def _train(model: nn.Module, opt: torch.optim.Optimizer, batches) -> list[torch.Tensor]:
    snapshots = []
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        snapshots.append(torch.cat([p.detach().flatten().clone() for p in model.parameters()]))
    return snapshots


# ---------------------------------------------------------------- (a) dense fallback == hand-written Adam


@pytest.mark.parametrize("estimator", ["plumage", "galore", "haar"])
def test_full_rank_fallback_matches_handwritten_adam(estimator):
    torch.manual_seed(0)
    model = nn.Linear(5, 3)  # weight (3, 5): s = 3, rank 3 >= s → dense
    ref_params = [p.detach().clone() for p in model.parameters()]
    lr, (b1, b2), eps, wd = 1e-2, (0.9, 0.99), 1e-8, 0.1
    opt = ReferencePlumageAdam(
        model.parameters(), lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, rank=3, estimator=estimator,
        scale=0.25, update_interval=2,
    )
    m = [torch.zeros_like(p) for p in ref_params]
    v = [torch.zeros_like(p) for p in ref_params]
    for t, (x, y) in enumerate(_batches(6, seed=3), start=1):
        x, y = x[:, :5], y[:, :3]
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        for i, (w, g) in enumerate(zip(ref_params, grads)):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            step_size = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
            ref_params[i] = w * (1 - lr * wd) - step_size * m[i] / (v[i].sqrt() + eps)
        for w, p in zip(ref_params, model.parameters()):
            torch.testing.assert_close(p.detach(), w, rtol=0, atol=1e-6)
    st = opt.state[model.weight]
    assert "P" not in st and st["exp_avg"].shape == model.weight.shape and st["step"] == 6


# ---------------------------------------------------------------- (b) galore estimator == galore-torch


def test_galore_estimator_matches_galore_torch(monkeypatch):
    """The oracle's GaLore equals galore-torch's, both taking singular vectors in the canonical sign form."""
    galore_torch = pytest.importorskip("galore_torch")
    from plumage_ds.testing import canonical_svd

    canonical_svd(monkeypatch)
    model_ref, model_gt = _mlp(), _mlp()
    model_gt.load_state_dict(model_ref.state_dict())
    lr, eps, rank, gap, scale = 1e-2, 1e-8, 4, 3, 0.25

    def groups(model):
        mats = [p for p in model.parameters() if p.dim() == 2]
        vecs = [p for p in model.parameters() if p.dim() != 2]
        return mats, vecs

    mats, vecs = groups(model_ref)
    opt_ref = ReferencePlumageAdam(
        [{"params": vecs}, {"params": mats}],  # order differs from model order on purpose: ids don't matter for galore
        lr=lr, eps=eps, rank=rank, update_interval=gap, estimator="galore", scale=scale, svd_method="svd",
    )
    mats, vecs = groups(model_gt)
    opt_gt = galore_torch.GaLoreAdamW(
        [{"params": vecs}, {"params": mats, "rank": rank, "update_proj_gap": gap, "scale": scale, "proj_type": "std"}],
        lr=lr, eps=eps, weight_decay=0.0, no_deprecation_warning=True,
    )
    batches = _batches(10)
    traj_ref = _train(model_ref, opt_ref, batches)
    traj_gt = _train(model_gt, opt_gt, batches)
    for a, b in zip(traj_ref, traj_gt):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # 10 steps with gap 3 → refreshes at steps 0, 3, 6, 9; moments carried unchanged (no realign)
    w1 = model_ref[0].weight  # (20, 12): right projection, s = 12
    st = opt_ref.state[w1]
    assert st["P"].shape == (12, rank) and st["exp_avg"].shape == (rank, 20) and st["step"] == 10
    # the trajectory really moved (not trivially equal)
    assert (traj_ref[-1] - traj_ref[0]).abs().max() > 1e-3


# ---------------------------------------------------------------- (c) realignment is the identity when P is unchanged


def test_realign_identity_when_projection_unchanged():
    torch.manual_seed(0)
    G = torch.randn(6, 10)
    results = {}
    for realign in (False, True):
        W = nn.Parameter(torch.randn(6, 10, generator=torch.Generator().manual_seed(5)))
        opt = ReferencePlumageAdam(
            [W], lr=1e-2, rank=2, update_interval=2, estimator="galore", realign=realign, svd_method="svd"
        )
        for _ in range(5):  # refreshes at steps 0, 2, 4 on the same G → same P
            W.grad = G.clone()
            opt.step()
        results[realign] = (opt.state[W]["exp_avg"].clone(), opt.state[W]["exp_avg_sq"].clone(), W.detach().clone())
    for a, b in zip(results[False], results[True]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_realign_rotates_moments_into_new_basis():
    """Realignment with ``P_new = P_old·Q`` (same span) keeps ``P M`` fixed: ``M ← Qᵀ M``."""
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(4, 9))
    opt = ReferencePlumageAdam([W], lr=1e-2, rank=2, update_interval=1, estimator="haar", seed=3)
    W.grad = torch.randn(4, 9)
    opt.step()
    st = opt.state[W]
    P_old, M_old = st["P"].clone(), st["exp_avg"].clone()
    W.grad = torch.randn(4, 9)
    opt.step()  # refresh (haar draws a new P), realign, then one Adam update
    B = st["P"].mT @ P_old
    beta1 = 0.9
    R = st["P"].mT @ W.grad
    torch.testing.assert_close(st["exp_avg"], beta1 * (B @ M_old) + (1 - beta1) * R, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- seeding, placement of D⁻¹, bookkeeping


def test_projection_uses_seed_matrix_id_and_refresh_index():
    torch.manual_seed(0)
    bias = nn.Parameter(torch.zeros(3))  # index 0: not a target but counts in matrix ids
    W1 = nn.Parameter(torch.randn(5, 8))  # index 1 (left)
    W2 = nn.Parameter(torch.randn(9, 6))  # index 2 (right: s = 6)
    opt = ReferencePlumageAdam([{"params": [bias]}, {"params": [W1, W2]}], rank=2, update_interval=2, seed=11)
    for step in range(3):
        grads = {id(W1): torch.randn(5, 8), id(W2): torch.randn(9, 6)}
        bias.grad, W1.grad, W2.grad = torch.randn(3), grads[id(W1)], grads[id(W2)]
        opt.step()
        if step % 2 == 0:
            k = step // 2
            for mid, W in ((1, W1), (2, W2)):
                proj = get_estimator("plumage").build(grads[id(W)], 2, sampler_generator(11, mid, k), svd_method="gram")
                torch.testing.assert_close(opt.state[W]["P"], proj.P)
                torch.testing.assert_close(opt.state[W]["d"], proj.d)
    assert opt.state[W2]["P"].shape == (6, 2) and opt.state[W2]["exp_avg"].shape == (2, 9)


def test_haar_dinv_placements():
    """Haar has constant ``d = r/s``: ``coords`` ≈ ``none`` (Adam is scale-free), ``lift`` = ``none``·s/r."""
    torch.manual_seed(0)
    W0, grads = torch.zeros(4, 10), [torch.randn(4, 10) for _ in range(4)]  # W0 = 0: no cancellation
    deltas = {}
    for dinv in ("none", "coords", "lift"):
        W = nn.Parameter(W0.clone())
        opt = ReferencePlumageAdam([W], lr=1e-3, eps=1e-12, rank=2, estimator="haar", dinv_placement=dinv, seed=7)
        for g in grads:
            W.grad = g.clone()
            opt.step()
        deltas[dinv] = W.detach() - W0
    torch.testing.assert_close(deltas["coords"], deltas["none"], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(deltas["lift"], deltas["none"] * (4 / 2), rtol=1e-4, atol=1e-7)


def test_coords_input_is_unbiased_over_seeds():
    """With ``dinv="coords"`` Adam's first moment after one step is ``(1−β1) D⁻¹PᵀG``; lifted by ``P`` its mean over
    seeds is ``G`` (the optimizer wires seeds and ``d`` so that the PLUMAGE estimate stays unbiased)."""
    g = torch.Generator().manual_seed(0)
    G = torch.randn(5, 7, generator=g) @ torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.5, 0.3, 0.2, 0.1]))
    n_seeds, beta1 = 1000, 0.5
    acc = torch.zeros_like(G)
    for seed in range(n_seeds):
        W = nn.Parameter(torch.zeros(5, 7))
        opt = ReferencePlumageAdam([W], rank=2, dinv_placement="coords", betas=(beta1, 0.999), seed=seed)
        W.grad = G
        opt.step()
        st = opt.state[W]
        acc += st["P"] @ st["exp_avg"] / (1 - beta1)
        if seed == 0:
            proj_est = estimate(G, get_estimator("plumage").build(G, 2, sampler_generator(0, 0, 0)))
            torch.testing.assert_close(st["P"] @ st["exp_avg"] / (1 - beta1), proj_est, rtol=1e-5, atol=1e-5)
    mean = acc / n_seeds
    # the biased top-2 GaLore estimate is far from G; the sample mean must be much closer
    galore = estimate(G, get_estimator("galore").build(G, 2, sampler_generator(0, 0, 0)))
    assert (mean - G).norm() < 0.25 * (galore - G).norm()


def test_skips_params_without_grad_and_bf16_keeps_fp32_state():
    torch.manual_seed(0)
    Wb = nn.Parameter(torch.randn(6, 12).to(torch.bfloat16))
    Wf = nn.Parameter(Wb.detach().float().clone())
    idle = nn.Parameter(torch.randn(6, 12))
    opt_b = ReferencePlumageAdam([Wb, idle], lr=1e-2, rank=2, update_interval=2)
    opt_f = ReferencePlumageAdam([Wf, nn.Parameter(torch.randn(6, 12))], lr=1e-2, rank=2, update_interval=2)
    for _ in range(3):
        G = torch.randn(6, 12)
        Wb.grad, Wf.grad = G.to(torch.bfloat16), G.to(torch.bfloat16).float()
        opt_b.step()
        opt_f.step()
    assert idle not in opt_b.state or "step" not in opt_b.state[idle]
    st = opt_b.state[Wb]
    assert Wb.dtype == torch.bfloat16 and st["step"] == 3
    assert all(st[k].dtype == torch.float32 for k in ("exp_avg", "exp_avg_sq", "P", "d"))
    torch.testing.assert_close(Wb.detach().float(), Wf.detach(), rtol=0, atol=0.05)


def test_state_dict_roundtrip_weights_only():
    model = _mlp()
    opt = ReferencePlumageAdam(model.parameters(), lr=1e-2, rank=3, update_interval=2, seed=2)
    batches = _batches(5)
    _train(model, opt, batches[:3])
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    model2 = copy.deepcopy(model)
    opt2 = ReferencePlumageAdam(model2.parameters(), lr=1e-2, rank=3, update_interval=2, seed=2)
    opt2.load_state_dict(sd)
    a = _train(model, opt, batches[3:])
    b = _train(model2, opt2, batches[3:])
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_lowrank_group_flag_and_validation():
    W = nn.Parameter(torch.randn(4, 10))
    opt = ReferencePlumageAdam([{"params": [W], "lowrank": False}], rank=2)
    W.grad = torch.randn(4, 10)
    opt.step()
    assert "P" not in opt.state[W] and opt.state[W]["exp_avg"].shape == (4, 10)
    with pytest.raises(ValueError):
        ReferencePlumageAdam([{"params": [nn.Parameter(torch.zeros(3))], "lowrank": True}])
    with pytest.raises(ValueError):
        ReferencePlumageAdam([W], estimator="bogus")
    with pytest.raises(ValueError):
        ReferencePlumageAdam([W], dinv_placement="both")
