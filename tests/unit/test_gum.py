"""GUM: GaLore Unbiased with Muon (DESIGN §2.2, arXiv 2510.17802)."""

from __future__ import annotations

import io
import math
import re

import pytest
import torch
from torch import nn

from plumage_ds.config import GumConfig, OptimizerConfig
from plumage_ds.estimators import galore_projection, orient
from plumage_ds.optim import PlumageAdamW, build_optimizer
from plumage_ds.optim.gum import (
    GUM,
    draw_layers,
    gum_input,
    lift,
    newton_schulz5,
    sampling_probability,
    update_coefficient,
)

Z = 5.0  # CLT / binomial bounds in standard errors


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one intra-op thread is faster and immune to a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float = 0.0) -> None:
    # not torch.testing.assert_close: its first call imports torch.distributed.tensor (seconds)
    err = (actual - expected).abs()
    assert (err <= atol + rtol * expected.abs()).all(), f"max abs error {float(err.max())}"


# --------------------------------------------------------------------------- helpers


def _mlp(seed: int = 0) -> nn.Module:
    """Targets (rank 2): weights (20, 12) right-projected, (16, 20) left, (6, 16) left."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 6)
    )


def _groups(model: nn.Module) -> list[dict]:
    mats = [(n, p) for n, p in model.named_parameters() if p.dim() == 2]
    rest = [(n, p) for n, p in model.named_parameters() if p.dim() != 2]
    return [
        {"params": [p for _, p in mats], "names": [n for n, _ in mats], "lowrank": True},
        {"params": [p for _, p in rest], "names": [n for n, _ in rest], "lowrank": False},
    ]


def _batches(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(12, 6, generator=g) / 4
    out = []
    for _ in range(n):
        x = torch.randn(32, 12, generator=g)
        out.append((x, torch.tanh(x @ W)))
    return out


def _loss(model, x, y):
    return ((model(x) - y) ** 2).mean()


def _run(model, opt, batches, on_step=None) -> list[float]:
    losses = []
    for t, (x, y) in enumerate(batches):
        opt.zero_grad(set_to_none=True)
        loss = _loss(model, x, y)
        loss.backward()
        if on_step is not None:
            on_step(t, "before")
        opt.step()
        if on_step is not None:
            on_step(t, "after")
        losses.append(float(loss.detach()))
    return losses


def _targets(opt: GUM) -> list:
    return [e for e in opt._entries if e.lowrank]


# --------------------------------------------------------------------------- layer draw


@pytest.mark.parametrize("num_targets,gamma", [(7, 2), (5, 1), (4, 3)])
def test_draw_exactly_gamma_with_marginal_q(num_targets, gamma):
    n_periods = 3000
    masks = torch.stack([draw_layers(11, num_targets, gamma, k) for k in range(n_periods)])
    assert masks.dtype == torch.bool and masks.shape == (n_periods, num_targets)
    assert (masks.sum(1) == gamma).all()
    q = sampling_probability(num_targets, gamma)
    assert q == gamma / num_targets
    freq = masks.double().mean(0)
    bound = Z * math.sqrt(q * (1 - q) / n_periods)
    assert ((freq - q).abs() <= bound).all(), (freq, q, bound)
    # a pure function of (seed, N_L, γ, period)
    assert torch.equal(draw_layers(11, num_targets, gamma, 17), masks[17])
    assert any(not torch.equal(draw_layers(12, num_targets, gamma, k), masks[k]) for k in range(10))


def test_gamma_at_least_num_targets_draws_all():
    assert draw_layers(0, 3, 5, 0).all()
    assert sampling_probability(3, 5) == 1.0


def test_optimizer_draw_matches_draw_layers():
    model = _mlp()
    opt = GUM(_groups(model), rank=2, update_interval=3, gamma=1, seed=5)
    assert opt.num_targets == 3 and opt.q == pytest.approx(1 / 3)
    batches = _batches(7)
    seen = []

    def check(t, when):
        if when == "after":
            k = t // 3
            expected = draw_layers(5, 3, 1, k)
            assert torch.equal(opt.drawn_mask(k), expected)
            rows = [r for r in opt.matrix_report() if r["mode"] == "gum"]
            seen.append([r["drawn"] for r in rows])
            assert [r["drawn"] for r in rows] == opt.drawn_mask().tolist()  # the next step's period

    _run(model, opt, batches, check)
    assert len(seen) == 7


# --------------------------------------------------------------------------- unbiasedness


def _fixed_gradients() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    # decaying spectra so the top-r projection drops a real tail
    out = []
    for m, n in [(6, 10), (12, 8), (9, 9)]:
        U, _ = torch.linalg.qr(torch.randn(m, m, generator=g))
        V, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
        s = min(m, n)
        S = torch.diag(torch.arange(1, s + 1, dtype=torch.float32) ** -1.0)
        out.append(U[:, :s] @ S @ V[:, :s].T * 3.0)
    return out


@pytest.mark.parametrize("gamma", [1, 2])
def test_lifted_input_is_unbiased(gamma):
    Gs = _fixed_gradients()
    rank, n_draws = 2, 2000
    N = len(Gs)
    q = sampling_probability(N, gamma)
    setup = []
    for G in Gs:
        left = G.shape[0] <= G.shape[1]
        G_o = orient(G, left)
        P = galore_projection(G, rank, svd_method="svd").P
        setup.append((G_o, P))
    sums = [torch.zeros_like(G_o, dtype=torch.float64) for G_o, _ in setup]
    sq = [torch.zeros_like(G_o, dtype=torch.float64) for G_o, _ in setup]
    galore_sum = [torch.zeros_like(G_o, dtype=torch.float64) for G_o, _ in setup]
    for seed in range(n_draws):
        mask = draw_layers(seed, N, gamma, 0)
        for i, (G_o, P) in enumerate(setup):
            drawn = bool(mask[i])
            X = gum_input(G_o, P, drawn, q)
            assert X.shape == (G_o.shape if drawn else (rank, G_o.shape[1]))
            Y = lift(X, P, drawn).double()
            sums[i] += Y
            sq[i] += Y * Y
            galore_sum[i] += (P @ (P.mT @ G_o)).double()
    for i, (G_o, _) in enumerate(setup):
        mean = sums[i] / n_draws
        var = (sq[i] / n_draws - mean * mean).clamp(min=0)
        bound = Z * (var / n_draws).sqrt() + 1e-5
        assert ((mean - G_o.double()).abs() <= bound).all(), (i, (mean - G_o).abs().max())
        # power check: GaLore's biased estimate fails the same bound
        galore = galore_sum[i] / n_draws
        assert not ((galore - G_o.double()).abs() <= bound).all()


def test_expectation_identity_and_q_one():
    G_o = _fixed_gradients()[0]
    P = galore_projection(G_o, 2).P
    q = 0.3
    expect = q * lift(gum_input(G_o, P, True, q), P, True) + (1 - q) * lift(gum_input(G_o, P, False, q), P, False)
    _assert_close(expect, G_o, atol=1e-5)
    # q == 1: every target drawn, the input is the gradient itself (the residual alone would be biased)
    assert torch.equal(gum_input(G_o, None, True, 1.0), G_o)
    with pytest.raises(ValueError, match="needs a projector"):
        gum_input(G_o, None, True, 0.5)


# --------------------------------------------------------------------------- Newton–Schulz


@pytest.mark.parametrize("shape", [(32, 64), (64, 32), (16, 48)])
def test_newton_schulz_singular_values_in_band(shape):
    g = torch.Generator().manual_seed(sum(shape))
    for _ in range(3):
        G = torch.randn(*shape, generator=g) * 7.0
        O = newton_schulz5(G)
        assert O.dtype == torch.float32 and O.shape == G.shape
        s = torch.linalg.svdvals(O)
        assert s.min() >= 0.5 and s.max() <= 1.5, (s.min(), s.max())
        U, _, Vh = torch.linalg.svd(G, full_matrices=False)
        polar = U @ Vh
        assert (O - polar).norm() / polar.norm() < 0.35
        _assert_close(newton_schulz5(G.T), O.T, atol=1e-5, rtol=1e-5)


def test_newton_schulz_zero_and_bf16():
    assert torch.equal(newton_schulz5(torch.zeros(4, 6)), torch.zeros(4, 6))
    G = torch.randn(8, 16)
    assert newton_schulz5(G.bfloat16()).dtype == torch.float32


# --------------------------------------------------------------------------- the step


@pytest.mark.parametrize("nesterov", [True, False])
def test_momentum_reset_and_update_rule(nesterov):
    model = _mlp()
    K, mu, lr, wd, scale = 3, 0.9, 0.05, 0.1, 0.7
    opt = GUM(
        _groups(model), lr=lr, weight_decay=wd, rank=2, update_interval=K, gamma=1, momentum=mu,
        nesterov=nesterov, scale=scale, svd_method="svd", seed=2,
    )
    targets = _targets(opt)
    q = opt.q
    prev: dict = {}

    def check(t, when):
        for e in targets:
            st = opt.state[e.param]
            if when == "before":
                prev[e.index] = (
                    e.param.detach().clone(),
                    st["momentum_buffer"].clone() if "momentum_buffer" in st else None,
                    st.get("P"),
                )
                continue
            k = t // K
            assert st["period"] == k
            drawn = bool(draw_layers(2, len(targets), 1, k)[e.target])
            G = e.param.grad
            G_o = orient(G, e.left)
            W0, M0, P0 = prev[e.index]
            P = st["P"]
            if t % K == 0:  # boundary: new GaLore P from this gradient, momentum reset
                assert torch.equal(P, galore_projection(G, 2, svd_method="svd").P)
                M0 = torch.zeros_like(st["momentum_buffer"])
            else:
                assert P is P0 or torch.equal(P, P0)
            X = gum_input(G_o, P, drawn, q)
            M = M0 * mu + X
            assert torch.equal(st["momentum_buffer"], M), (t, e.name)
            U = X + mu * M if nesterov else M
            delta = orient(lift(newton_schulz5(U), P, drawn), e.left) * update_coefficient(lr, scale, e.param.shape)
            _assert_close(e.param.detach(), W0 * (1 - lr * wd) - delta, atol=1e-6, rtol=1e-5)

    _run(model, opt, _batches(8), check)


def test_full_rank_buffers_only_on_drawn_and_state_bytes():
    model = _mlp()
    K = 2
    opt = GUM(_groups(model), rank=2, update_interval=K, gamma=1, seed=4)
    targets = _targets(opt)
    dense = [e for e in opt._entries if not e.lowrank]
    periods_seen = set()

    def check(t, when):
        if when != "after":
            return
        k = t // K
        periods_seen.add(k)
        mask = draw_layers(4, len(targets), 1, k)
        assert int(mask.sum()) == 1
        for e in targets:
            shape = (e.s, e.l) if mask[e.target] else (e.r, e.l)
            assert tuple(opt.state[e.param]["momentum_buffer"].shape) == shape
        sb = opt.state_bytes()
        assert sb["projectors"] == 4 * sum(e.s * e.r for e in targets)
        assert sb["moments"] == 4 * sum(e.s * e.l if mask[e.target] else e.r * e.l for e in targets)
        assert sb["non_target"] == 8 * sum(e.param.numel() for e in dense)
        assert sb["total"] == sb["projectors"] + sb["moments"] + sb["non_target"]

    _run(model, opt, _batches(8), check)
    assert len(periods_seen) == 4
    # across those periods the drawn matrix changed at least once
    assert len({int(torch.nonzero(draw_layers(4, len(targets), 1, k))[0]) for k in periods_seen}) > 1


def test_gamma_covering_all_targets_is_plain_muon_without_projectors():
    model = _mlp()
    opt = GUM(_groups(model), rank=2, update_interval=2, gamma=10)
    assert opt.q == 1.0
    _run(model, opt, _batches(3))
    for e in _targets(opt):
        st = opt.state[e.param]
        assert "P" not in st and tuple(st["momentum_buffer"].shape) == (e.s, e.l)
    assert opt.state_bytes()["projectors"] == 0


@pytest.mark.parametrize("gamma", [1, 3])
def test_trains_tiny_model(gamma):
    model = _mlp()
    opt = GUM(_groups(model), lr=0.05, rank=2, update_interval=5, gamma=gamma)
    batch = _batches(1)[0]
    losses = _run(model, opt, [batch] * 30)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.2 * losses[0], losses


def test_dense_path_matches_plumage_adamw():
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    a, b = _mlp(), _mlp()
    opt_a = GUM([{"params": list(a.parameters()), "lowrank": False}], rank=2, **kw)
    opt_b = PlumageAdamW([{"params": list(b.parameters()), "lowrank": False}], rank=2, **kw)
    batches = _batches(5)
    _run(a, opt_a, batches)
    _run(b, opt_b, batches)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_add_param_group_mid_training_redraws():
    model = _mlp()
    layers = [m for m in model if isinstance(m, nn.Linear)]
    opt = GUM([{"params": [layers[0].weight, layers[1].weight]}], lr=0.05, rank=2, update_interval=4, gamma=1)
    batches = _batches(4)
    _run(model, opt, batches[:2])
    opt.add_param_group({"params": [layers[2].weight]})
    assert opt.num_targets == 3
    _run(model, opt, batches[2:])
    mask = opt.drawn_mask(0)
    for e in _targets(opt):
        st = opt.state[e.param]
        assert st["period"] == 0
        assert tuple(st["momentum_buffer"].shape) == ((e.s, e.l) if mask[e.target] else (e.r, e.l))


def test_bf16_params_step():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8, bias=False).bfloat16()
    opt = GUM(lin.parameters(), lr=0.01, rank=2, update_interval=2, gamma=1)
    for _ in range(3):
        opt.zero_grad()
        lin(torch.randn(4, 16).bfloat16()).float().pow(2).mean().backward()
        opt.step()
    assert lin.weight.dtype == torch.bfloat16 and torch.isfinite(lin.weight.float()).all()


# --------------------------------------------------------------------------- checkpoints


def _roundtrip(sd: dict) -> dict:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("split", [4, 6])  # mid-period and at a period boundary (K=3)
def test_state_dict_roundtrip_bitwise_resume(split):
    batches = _batches(10)
    make = lambda m: GUM(_groups(m), lr=0.05, weight_decay=0.01, rank=2, update_interval=3, gamma=1, seed=9)  # noqa: E731
    ref = _mlp()
    _run(ref, make(ref), batches)

    first = _mlp()
    opt = make(first)
    _run(first, opt, batches[:split])
    sd = _roundtrip(opt.state_dict())
    weights = _roundtrip(first.state_dict())

    second = _mlp(seed=123)
    second.load_state_dict(weights)
    opt2 = make(second)
    opt2.load_state_dict(sd)
    assert opt2.current_period == split // 3
    _run(second, opt2, batches[split:])
    for pa, pb in zip(ref.parameters(), second.parameters()):
        assert torch.equal(pa, pb)


def test_load_state_dict_rejects_bad_checkpoints_untouched():
    model = _mlp()
    opt = GUM(_groups(model), rank=2, update_interval=3, gamma=1, seed=9)
    _run(model, opt, _batches(2))
    good = _roundtrip(opt.state_dict())
    before = {k: v.clone() for k, v in opt.state[_targets(opt)[0].param].items() if torch.is_tensor(v)}

    fresh = GUM(_groups(model), rank=2, update_interval=3, gamma=1, seed=9)
    bad = _roundtrip(opt.state_dict())
    e0 = _targets(opt)[0]
    mb = bad["state"][e0.index]["momentum_buffer"]
    bad["state"][e0.index]["momentum_buffer"] = torch.zeros(mb.shape[0] + 1, mb.shape[1])
    with pytest.raises(ValueError, match=r"momentum_buffer has shape"):
        fresh.load_state_dict(bad)
    assert len(fresh.state) == 0

    with pytest.raises(ValueError, match=r"seed=9, optimizer has seed=8"):
        GUM(_groups(model), rank=2, update_interval=3, gamma=1, seed=8).load_state_dict(good)
    with pytest.raises(ValueError, match=r"gamma=1, optimizer has gamma=2"):
        GUM(_groups(model), rank=2, update_interval=3, gamma=2, seed=9).load_state_dict(good)
    with pytest.raises(ValueError, match="missing or unknown 'gum' section"):
        fresh.load_state_dict({"state": {}, "param_groups": good["param_groups"]})
    fresh.load_state_dict(good)
    for k, v in before.items():
        assert torch.equal(fresh.state[e0.param][k], v)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"gamma": 0}, "Invalid gamma=0: must be a positive integer"),
        ({"gamma": 1.5}, "Invalid gamma=1.5: must be a positive integer"),
        ({"momentum": 1.0}, "Invalid momentum=1.0: must be in [0, 1)"),
        ({"momentum": -0.1}, "Invalid momentum=-0.1: must be in [0, 1)"),
        ({"rank": 0}, "Invalid rank=0: must be a positive integer"),
        ({"rank": -2}, "Invalid rank=-2: must be a positive integer"),
        ({"update_interval": 0}, "Invalid update_interval=0: must be a positive integer"),
        ({"nesterov": 1}, "Invalid nesterov=1: must be true or false"),
        ({"seed": 1.0}, "Invalid seed=1.0: must be an integer"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        GUM(_mlp().parameters(), **kwargs)


def test_bad_group_and_setup_raise():
    model = _mlp()
    groups = _groups(model)
    groups[0]["momentum"] = 1.0
    with pytest.raises(ValueError, match=re.escape("Invalid momentum=1.0: must be in [0, 1)")):
        GUM(groups)
    layers = [m for m in model if isinstance(m, nn.Linear)]
    split = [
        {"params": [layers[0].weight], "update_interval": 3},
        {"params": [layers[1].weight], "update_interval": 4},
    ]
    with pytest.raises(ValueError, match=re.escape("same update_interval; got [3, 4]")):
        GUM(split, rank=2)
    with pytest.raises(ValueError, match="strict=True"):
        GUM([{"params": [layers[2].weight], "lowrank": True}], rank=6, strict=True)

    with pytest.raises(ValueError, match=re.escape("Invalid replicate_group: only meaningful for FSDP2 (DTensor) parameters")):
        GUM(model.parameters(), replicate_group=object())


def test_factory_builds_gum():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Linear(12, 20)
            self.head = nn.Linear(20, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.mlp(x)))

    torch.manual_seed(0)
    model = Block()
    cfg = OptimizerConfig(estimator="gum", rank=4, update_interval=2, gum=GumConfig(gamma=1, momentum=0.9), lr=0.02,
                          target_modules=("mlp",))
    opt, rows = build_optimizer(model, cfg)
    assert isinstance(opt, GUM) and opt.gamma == 1
    assert [(r["name"], r["mode"]) for r in rows] == [
        ("mlp.weight", "gum"), ("mlp.bias", "adamw"), ("head.weight", "adamw"), ("head.bias", "adamw")
    ]
    assert rows[0]["drawn"] is True  # N_L = 1, γ = 1: q = 1
    x = torch.randn(8, 12)
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    opt.step()
    assert opt.comm_stats()["world_size"] == 1
