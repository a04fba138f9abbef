"""PlumageAdamW: agreement with the oracle and with galore-torch, checkpoints, bad input."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

from plumage_ds import PlumageAdamW, lowrank_param_groups
from plumage_ds.config import OptimizerConfig, from_dict
from plumage_ds.estimators import full_second_moment
from plumage_ds.optim import build_optimizer
from plumage_ds.optim.reference import ReferencePlumageAdam
from plumage_ds.testing import canonical_svd


def _mlp(seed: int = 0) -> nn.Module:
    """Non-square weights (left and right projections) plus biases."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 8), nn.Tanh(), nn.Linear(8, 24))


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(32, 12, generator=g), torch.randn(32, 24, generator=g)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> list[float]:
    losses = []
    for step in steps:
        x, y = _data(step)
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


HPARAMS = dict(lr=1e-2, rank=3, update_interval=3, seed=7, weight_decay=0.05)


@pytest.mark.parametrize("estimator", ["plumage", "galore", "haar", "optimal"])
@pytest.mark.parametrize("dinv_placement", ["none", "coords", "lift"])
def test_matches_reference(estimator: str, dinv_placement: str) -> None:
    """Production optimizer follows the readable oracle step for step (refreshes included)."""
    m1, m2 = _mlp(), _mlp()
    kw = dict(HPARAMS, estimator=estimator, dinv_placement=dinv_placement, scale=0.5)
    ref = ReferencePlumageAdam(m1.parameters(), **kw)
    opt = PlumageAdamW(m2.parameters(), **kw)
    _train(m1, ref, range(10))
    _train(m2, opt, range(10))
    assert _max_diff(m1, m2) < 1e-6
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        s1, s2 = ref.state[p1], opt.state[p2]
        assert s1["step"] == s2["step"] == 10
        if "P" in s1:
            torch.testing.assert_close(s1["P"], s2["P"], rtol=0, atol=1e-5)
            torch.testing.assert_close(s1["exp_avg"], s2["exp_avg"], rtol=1e-5, atol=1e-7)
        assert ("Sigma" in s1) == ("Sigma" in s2) == (estimator == "optimal" and "P" in s1)
        if "Sigma" in s1:
            assert s1["sigma_count"] == s2["sigma_count"] == 4  # refreshes at steps 0, 3, 6, 9
            # the weights agree to ~1e-7, so do the later refresh gradients and Σ (relative to its scale)
            torch.testing.assert_close(s1["Sigma"], s2["Sigma"], rtol=0, atol=1e-6 * float(s1["Sigma"].abs().max()))


def _mlp_with_square(seed: int = 0) -> nn.Module:
    """Right (20×12, 24×8), left (8×20) and square (20×20: GaLore projects it from the right)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 20), nn.Tanh(), nn.Linear(20, 8), nn.Tanh(), nn.Linear(8, 24)
    )


@pytest.mark.parametrize(
    "uniform_mix, sigma_rank, sigma_weight", [(0.0, 0, None), (0.1, 0, None), (0.0, 3, None), (0.1, 6, None), (0.0, None, None),
                                              (0.0, 0, 0.5), (0.0, None, 0.25), (0.1, 3, 0.5)]
)  # fmt: skip
def test_optimal_matches_reference_left_right_square(uniform_mix: float, sigma_rank, sigma_weight) -> None:
    """``estimator="optimal"`` follows the oracle over 5 refreshes on left (8×20), right (20×12,
    24×8) and square (20×20) weights; ``Σ`` is float64 and equal to the oracle's — whole ``(s, s)``,
    or compact ``(s, k+1)`` with ``sigma_rank = k`` where ``k <= s − 2`` (k = 6 keeps ``s = 8`` whole;
    ``None``, the default, is ``k = rank``) — with ``Σ`` the running mean or an EMA (``sigma_weight``)."""
    m1, m2 = _mlp_with_square(), _mlp_with_square()
    kw = dict(HPARAMS, estimator="optimal", uniform_mix=uniform_mix, sigma_rank=sigma_rank, sigma_weight=sigma_weight)
    ref = ReferencePlumageAdam(m1.parameters(), **kw)
    opt = PlumageAdamW(m2.parameters(), **kw)
    _train(m1, ref, range(14))
    _train(m2, opt, range(14))
    assert _max_diff(m1, m2) < 1e-6
    shapes = set()
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        if p1.dim() == 2:
            shapes.add("left" if p1.shape[0] < p1.shape[1] else "square" if p1.shape[0] == p1.shape[1] else "right")
            S, s = opt.state[p2]["Sigma"], min(p1.shape)
            k = HPARAMS["rank"] if sigma_rank is None else sigma_rank
            kept = (s, k + 1) if 0 < k <= s - 2 else (s, s)
            assert S.dtype == torch.float64 and S.shape == kept and opt.state[p2]["sigma_count"] == 5
            S_ref, S_full = full_second_moment(ref.state[p1]["Sigma"]), full_second_moment(S)  # (s, s): the kept Σ
            torch.testing.assert_close(S_ref, S_full, rtol=0, atol=1e-6 * float(S_full.abs().max()))
    assert shapes == {"left", "right", "square"}


@pytest.mark.parametrize("sigma_weight", [None, 0.5])
def test_optimal_sigma_is_the_mean_of_refresh_grams(sigma_weight) -> None:
    """After ``k`` refreshes the owner's ``Σ`` is the mean of ``G_o G_oᵀ`` of the ``k`` refresh gradients
    (right projection: ``G_o = Gᵀ``) when kept whole (``sigma_rank=0``), or with ``sigma_weight = w`` their
    exponential average ``Σ_k = (1 − w)·Σ_{k−1} + w·G_o G_oᵀ`` (``Σ_1 = G_o G_oᵀ``); ``state_bytes`` counts it (``8·s²``)."""
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(10, 6))  # right projection: s = 6
    opt = PlumageAdamW([W], lr=1e-2, rank=2, update_interval=2, estimator="optimal", sigma_rank=0, sigma_weight=sigma_weight)
    grams = []
    for step in range(7):
        G = torch.randn(10, 6, generator=torch.Generator().manual_seed(step))
        if step % 2 == 0:
            grams.append(G.double().mT @ G.double())
        W.grad = G
        opt.step()
        if sigma_weight is None:
            expected = torch.stack(grams).mean(0)
        else:  # newest first: w, w(1 − w), ...; the first gram keeps the rest of the weight
            ws = [sigma_weight * (1 - sigma_weight) ** i for i in range(len(grams) - 1)] + [(1 - sigma_weight) ** (len(grams) - 1)]
            expected = sum(w * g for w, g in zip(ws, reversed(grams)))
        torch.testing.assert_close(opt.state[W]["Sigma"], expected, rtol=1e-12, atol=1e-12)
        assert opt.state[W]["sigma_count"] == len(grams)
    assert opt.state_bytes()["second_moment"] == 8 * 6 * 6


def test_optimal_compact_sigma_memory_and_first_refresh() -> None:
    """``sigma_rank = k``: the owner keeps ``8·s·(k+1)`` bytes of ``Σ`` instead of ``8·s²``; the first
    refresh draws from the whole ``Σ`` (the same ``P`` as ``sigma_rank = 0``), later ones from what was
    kept plus the new gradient (another ``P``: the compact ``Σ`` is an approximation). The default,
    ``None``, is ``k = rank`` (here 2), bit for bit."""
    runs = {}
    for k in (0, 2, None):
        W = nn.Parameter(torch.zeros(10, 8))  # right projection: s = 8
        opt = PlumageAdamW([W], lr=1e-2, rank=2, update_interval=2, estimator="optimal", **({} if k is None else {"sigma_rank": k}))
        Ps = []
        for step in range(5):
            g = torch.Generator().manual_seed(step)
            W.grad = torch.randn(10, 1, generator=g) * torch.randn(1, 8, generator=g) + 0.3 * torch.randn(10, 8, generator=g)
            opt.step()
            if step % 2 == 0:
                Ps.append(opt.state[W]["P"].clone())
        runs[k] = (Ps, opt.state_bytes()["second_moment"], opt.state[W]["Sigma"].shape)
    assert runs[0][1:] == (8 * 8 * 8, (8, 8)) and runs[2][1:] == runs[None][1:] == (8 * 8 * 3, (8, 3))
    assert torch.equal(runs[0][0][0], runs[2][0][0]) and not torch.equal(runs[0][0][2], runs[2][0][2])
    assert all(torch.equal(a, b) for a, b in zip(runs[2][0], runs[None][0]))


def test_optimal_compact_sigma_bad_state_is_rejected() -> None:
    """A compact ``Σ`` with a negative isotropic part is refused by name; the state as saved loads."""
    model = _mlp()
    names = [n for n, _ in model.named_parameters()]
    opt = PlumageAdamW([{"params": list(model.parameters()), "names": names}], **dict(HPARAMS, estimator="optimal", sigma_rank=3))
    _train(model, opt, range(4))
    sd = _roundtrip(opt.state_dict())
    next(st for st in sd["state"].values() if "Sigma" in st)["Sigma"][:, -1] = -1.0
    with pytest.raises(ValueError, match=r"^Invalid state_dict: 0\.weight\.Sigma is compact with a negative isotropic part$"):
        opt.load_state_dict(sd)
    opt.load_state_dict(_roundtrip(opt.state_dict()))  # and the state as saved loads


@pytest.mark.parametrize("saved_k, now_k", [(3, 0), (0, 3), (3, 5)])
def test_optimal_sigma_saved_under_another_sigma_rank_loads(saved_k: int, now_k: int) -> None:
    """``sigma_rank`` changed after a refresh (``Σ`` still in the old form) and saved: the state loads into
    an optimizer built with ``sigma_rank=0``; the saved ``sigma_rank`` is installed, as every saved
    hyperparameter is, and ``Σ`` converted to its form (top eigenpairs and trace kept). Expanded
    (3 → 0), training goes on bit for bit as in the saving optimizer."""
    model, again = _mlp(), _mlp(1)
    opt = PlumageAdamW(model.parameters(), **dict(HPARAMS, estimator="optimal", sigma_rank=saved_k))
    _train(model, opt, range(4))  # refreshes at steps 0 and 3
    opt.param_groups[0]["sigma_rank"] = now_k
    again.load_state_dict(model.state_dict())
    loaded = PlumageAdamW(again.parameters(), **dict(HPARAMS, estimator="optimal", sigma_rank=0))
    loaded.load_state_dict(_roundtrip(opt.state_dict()))
    assert loaded.param_groups[0]["sigma_rank"] == now_k
    held = 0
    for p, q in zip(model.parameters(), again.parameters()):
        if "Sigma" not in opt.state[p]:
            continue
        held += 1
        s = min(p.shape)
        saved, kept = full_second_moment(opt.state[p]["Sigma"]), loaded.state[q]["Sigma"]
        assert kept.shape == (s, now_k + 1 if 0 < now_k <= s - 2 else s)
        mine = full_second_moment(kept)
        torch.testing.assert_close(torch.trace(mine), torch.trace(saved), rtol=1e-12, atol=0)
        top = min(k for k in (saved_k, now_k, s) if k > 0)
        torch.testing.assert_close(torch.linalg.eigvalsh(mine)[-top:], torch.linalg.eigvalsh(saved)[-top:], rtol=1e-9, atol=0)
    assert held == 3
    _train(model, opt, range(4, 8))  # a refresh at step 6
    _train(again, loaded, range(4, 8))
    assert all(torch.isfinite(p).all() for p in again.parameters())
    if now_k == 0:
        assert _max_diff(model, again) == 0.0
    loaded.load_state_dict(_roundtrip(loaded.state_dict()))


@pytest.mark.parametrize("shape", [(8, 20), (20, 12), (12, 12)])
def test_optimal_first_refresh_draws_plumage_design(shape: tuple) -> None:
    """With ``Σ = G_o G_oᵀ`` (one refresh gradient) the optimal design is PLUMAGE's ``p ∝ σ``: the same
    indices, the same ``d``, the same estimator ``P D⁻¹ Pᵀ`` (columns may differ in sign) and the
    same first update."""
    torch.manual_seed(1)
    W0, G = torch.randn(*shape), torch.randn(*shape)
    runs = {}
    for est in ("plumage", "optimal"):
        W = nn.Parameter(W0.clone())
        opt = PlumageAdamW([W], lr=1e-2, rank=3, update_interval=5, estimator=est, seed=3, uniform_mix=0.1)
        W.grad = G.clone()
        opt.step()
        runs[est] = (W.detach().clone(), opt.state[W]["P"], opt.state[W]["d"])
    (W_p, P_p, d_p), (W_o, P_o, d_o) = runs["plumage"], runs["optimal"]
    torch.testing.assert_close(d_o, d_p, rtol=1e-5, atol=0)
    torch.testing.assert_close(P_o @ torch.diag(1 / d_o) @ P_o.mT, P_p @ torch.diag(1 / d_p) @ P_p.mT, rtol=0, atol=1e-4)
    torch.testing.assert_close(W_o, W_p, rtol=0, atol=1e-6)


def _signed_svd(monkeypatch, signs) -> None:
    """``torch.linalg.svd`` returning ``(U D, S, D Vh)``, ``D = diag(signs(k))`` for the k-th call: the
    same decomposition with other signs of its singular vectors (as another device might return)."""
    svd, calls = torch.linalg.svd, [0]

    def signed(A, *args, **kwargs):
        U, S, Vh = svd(A, *args, **kwargs)
        D = signs(calls[0], S.shape[-1]).to(U.dtype)
        calls[0] += 1
        return U * D, S, Vh * D[:, None]

    monkeypatch.setattr(torch.linalg, "svd", signed)


def test_galore_default_settings_match_galore_torch(monkeypatch) -> None:
    """estimator="galore" with default settings equals galore-torch's GaLoreAdamW step for step
    (1e-6) over 4 refreshes, on left, right and square weights (no svd_method given), both taking
    their singular vectors in the canonical sign form (galore-torch's SVD wrapped to return it)."""
    galore_torch = pytest.importorskip("galore_torch")  # test-only peer, installed by [dev]
    canonical_svd(monkeypatch)
    m1, m2 = _mlp_with_square(), _mlp_with_square()
    mats = [p for p in m1.parameters() if p.dim() == 2]
    others = [p for p in m1.parameters() if p.dim() != 2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peer = galore_torch.GaLoreAdamW(
            [{"params": others}, {"params": mats, "rank": 3, "update_proj_gap": 3, "scale": 0.25, "proj_type": "std"}],
            lr=1e-2,
            eps=1e-6,
            weight_decay=0.0,
            no_deprecation_warning=True,
        )
    ours = PlumageAdamW(m2.parameters(), lr=1e-2, eps=1e-6, rank=3, update_interval=3, estimator="galore", scale=0.25)
    assert {g["svd_method"] for g in ours.param_groups} == {"svd"}  # the per-estimator default
    assert {(m > n) - (m < n) for m, n in (p.shape for p in mats)} == {-1, 0, 1}  # m < n, m = n, m > n
    diffs = []
    for step in range(12):
        _train(m1, peer, range(step, step + 1))
        _train(m2, ours, range(step, step + 1))
        diffs.append(_max_diff(m1, m2))
    assert max(diffs) < 1e-6, diffs
    assert _max_diff(m1, _mlp_with_square()) > 1e-2  # the weights really moved


def test_galore_trajectory_does_not_depend_on_the_svd_signs(monkeypatch) -> None:
    """GaLore keeps its moments across refreshes without realigning them, so the signs a decomposition
    returns would change its trajectory; in canonical form they do not: random sign flips of every
    SVD's singular vectors leave 12 steps (4 refreshes) within 1e-6."""
    ref_model, model = _mlp_with_square(), _mlp_with_square()
    kw = dict(lr=1e-2, eps=1e-6, rank=3, update_interval=3, estimator="galore", scale=0.25)
    _train(ref_model, PlumageAdamW(ref_model.parameters(), **kw), range(12))
    gen = torch.Generator().manual_seed(5)
    _signed_svd(monkeypatch, lambda k, n: torch.randint(0, 2, (n,), generator=gen) * 2.0 - 1.0)
    _train(model, PlumageAdamW(model.parameters(), **kw), range(12))
    assert _max_diff(ref_model, model) < 1e-6


def test_realignment_keeps_moments_when_projector_is_unchanged() -> None:
    """Same gradient at a refresh ⇒ same P (GaLore top-r) ⇒ B = I and M, V unchanged."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(6, 10))
    G = torch.randn(6, 10)
    states = []
    for realign in (False, True):
        p = nn.Parameter(w.detach().clone())
        opt = PlumageAdamW([p], lr=1e-3, rank=2, update_interval=2, estimator="galore", realign=realign)
        for _ in range(3):  # steps 0 (refresh), 1, 2 (refresh with identical G)
            p.grad = G.clone()
            opt.step()
        states.append({k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)})
    for key in ("P", "exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(states[0][key], states[1][key], rtol=1e-6, atol=1e-7)


def test_realignment_applies_b_matrix() -> None:
    """When P changes, the stored moments equal B·M_old (first moment) before the new gradient."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(8, 16))
    opt = PlumageAdamW([p], lr=1e-3, rank=3, update_interval=1, estimator="haar", seed=3, betas=(0.5, 0.9))
    p.grad = torch.randn(8, 16)
    opt.step()
    M_old, P_old = opt.state[p]["exp_avg"].clone(), opt.state[p]["P"].clone()
    p.grad = torch.randn(8, 16)
    opt.step()
    P_new = opt.state[p]["P"]
    R = P_new.mT @ p.grad
    expected = 0.5 * (P_new.mT @ P_old) @ M_old + 0.5 * R
    torch.testing.assert_close(opt.state[p]["exp_avg"], expected, rtol=1e-5, atol=1e-6)


def _roundtrip(sd: dict) -> dict:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("estimator", ["plumage", "haar", "optimal"])
def test_bitwise_resume(estimator: str) -> None:
    """Save after 5 steps (mid-period), load with weights_only, continue: bitwise equal to uninterrupted."""
    kw = dict(HPARAMS, estimator=estimator)
    full = _mlp()
    opt = PlumageAdamW(full.parameters(), **kw)
    _train(full, opt, range(11))

    part = _mlp()
    opt_a = PlumageAdamW(part.parameters(), **kw)
    _train(part, opt_a, range(5))
    sd = _roundtrip(opt_a.state_dict())
    model_sd = _roundtrip(part.state_dict())
    resumed = _mlp(seed=123)
    resumed.load_state_dict(model_sd)
    opt_b = PlumageAdamW(resumed.parameters(), **kw)
    opt_b.load_state_dict(sd)
    _train(resumed, opt_b, range(5, 11))
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def _optimal_corrupt(sd: dict, how: str) -> dict:
    sd = _roundtrip(sd)
    st = next(st for st in sd["state"].values() if "Sigma" in st)
    if how == "asymmetric":
        st["Sigma"][0, 1] += 1.0
    elif how == "shape":
        st["Sigma"] = torch.zeros(3, 3, dtype=torch.float64)
    elif how == "nan":
        st["Sigma"][2, 2] = float("inf")
    elif how == "missing":
        del st["Sigma"]
    elif how == "count":
        st["sigma_count"] = 0
    return sd


@pytest.mark.parametrize(
    "how,match",
    [
        ("asymmetric", r"^Invalid state_dict: 0\.weight\.Sigma is not symmetric \(max \|Σ − Σᵀ\| = 1\)$"),
        ("shape", r"^Invalid state_dict: 0\.weight\.Sigma has shape \(3, 3\), expected \(12, 12\) or compact \(12, k\+1\) with 1 <= k <= 10$"),
        ("nan", r"^Invalid state_dict: 0\.weight\.Sigma holds non-finite values$"),
        ("missing", r"^Invalid state_dict: 0\.weight lacks its second moment \(Sigma and sigma_count\) after 4 steps$"),
        ("count", r"^Invalid state_dict: 0\.weight sigma_count=0: must be >= 1$"),
    ],
)
def test_optimal_bad_sigma_is_rejected_and_state_kept(how: str, match: str) -> None:
    """A corrupt whole ``Σ`` (``sigma_rank=0``) raises a ValueError naming the parameter; nothing is loaded."""
    model = _mlp()
    names = [n for n, _ in model.named_parameters()]
    opt = PlumageAdamW([{"params": list(model.parameters()), "names": names}], **dict(HPARAMS, estimator="optimal", sigma_rank=0))
    _train(model, opt, range(4))
    before = _roundtrip(opt.state_dict())
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(_optimal_corrupt(opt.state_dict(), how))
    after = opt.state_dict()
    for i, st in before["state"].items():
        for k, v in st.items():
            assert torch.equal(v, after["state"][i][k]) if torch.is_tensor(v) else v == after["state"][i][k]


def test_state_dict_holds_only_tensors_and_scalars() -> None:
    """Every leaf of state_dict() is a tensor or a plain scalar/str/list/dict/None."""
    model = _mlp()
    opt = PlumageAdamW(model.parameters(), **HPARAMS)
    _train(model, opt, range(2))

    def check(x):
        if isinstance(x, dict):
            for v in x.values():
                check(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                check(v)
        else:
            assert x is None or torch.is_tensor(x) or isinstance(x, (int, float, str, bool)), type(x)

    check(opt.state_dict())


def _corrupt(sd: dict, how: str) -> dict:
    sd = _roundtrip(sd)
    mat = next(i for i, st in sd["state"].items() if "P" in st)
    if how == "shape":
        sd["state"][mat]["exp_avg"] = torch.zeros(2, 2)
    elif how == "nan":
        sd["state"][mat]["exp_avg_sq"][0, 0] = float("nan")
    elif how == "rank":
        sd["param_groups"][0]["rank"] = 5
    elif how == "seed":
        sd["plumage"]["seed"] = 99
    elif how == "missing":
        del sd["plumage"]
    return sd


@pytest.mark.parametrize(
    "how,match",
    [
        ("shape", r"exp_avg has shape \(2, 2\), expected"),
        ("nan", r"non-finite"),
        ("rank", r"rank=5"),
        ("seed", r"seed=99"),
        ("missing", r"missing or unknown 'plumage' section"),
    ],
)
def test_bad_checkpoint_is_rejected_and_state_kept(how: str, match: str) -> None:
    """A corrupted checkpoint raises a ValueError naming the problem and leaves the state untouched."""
    model = _mlp()
    opt = PlumageAdamW(model.parameters(), **HPARAMS)
    _train(model, opt, range(2))
    before = _roundtrip(opt.state_dict())
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(_corrupt(opt.state_dict(), how))
    after = opt.state_dict()
    for i, st in before["state"].items():
        for k, v in st.items():
            assert torch.equal(v, after["state"][i][k]) if torch.is_tensor(v) else v == after["state"][i][k]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(rank=0), r"Invalid rank=0"),
        (dict(rank=-3), r"Invalid rank=-3"),
        (dict(update_interval=0), r"Invalid update_interval=0"),
        (dict(estimator="topk"), r"Invalid estimator='topk'"),
        (dict(dinv_placement="both"), r"Invalid dinv_placement='both'"),
        (dict(scale=0.0), r"Invalid scale=0.0"),
        (dict(lr=-1.0), r"Invalid lr=-1.0"),
        (dict(betas=(0.9, 1.0)), r"Invalid betas=\(0.9, 1.0\)"),
        (dict(svd_method="qr"), r"Invalid svd_method='qr'"),
        (dict(estimator="optimal", svd_method="svd"),
         r"^Invalid svd_method='svd': estimator 'optimal' decomposes its second moment Σ \(eigh\), not G; leave svd_method=None$"),
        (dict(max_grad_norm=-1.0), r"Invalid max_grad_norm=-1.0"),
        (dict(estimator="optimal", sigma_weight=0.0), r"^Invalid sigma_weight=0.0: must be in \(0, 1\] \(null: the running mean\)$"),
        (dict(estimator="plumage", sigma_weight=0.5),
         r"^Invalid sigma_weight=0.5: applies to estimator 'optimal' only \(it keeps Σ\), not 'plumage'$"),
    ],
)
def test_bad_hyperparameters_name_the_value(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PlumageAdamW(_mlp().parameters(), **kwargs)


def test_rank_above_short_side_falls_back_or_raises_in_strict() -> None:
    """rank >= short side: reported full-rank AdamW fallback; strict=True raises naming the matrix."""
    model = _mlp()
    opt = PlumageAdamW(model.parameters(), rank=10)
    rows = {r["name"]: r for r in opt.matrix_report()}
    assert rows["param0"]["mode"] == "plumage"  # 20x12, short side 12 > 10
    assert rows["param2"]["mode"] == "adamw" and "rank=10 >= short side 8" in rows["param2"]["reason"]
    with pytest.raises(ValueError, match=r"Matrix 'param2' cannot take the low-rank path \(strict=True\): rank=10"):
        PlumageAdamW(model.parameters(), rank=10, strict=True)


def test_param_group_helper_selects_by_regex_and_reports() -> None:
    """Regex on module names picks targets; every parameter is reported with its mode and reason."""
    model = nn.ModuleDict({"attn": nn.Linear(16, 32), "mlp": nn.Linear(32, 4), "head": nn.Linear(16, 16)})
    groups, report = lowrank_param_groups(model, target_modules=[r"attn|mlp"], rank=4)
    by_name = {r["name"]: r for r in report}
    assert by_name["attn.weight"]["mode"] == "lowrank"
    assert by_name["attn.bias"]["mode"] == "adamw" and "1-D" in by_name["attn.bias"]["reason"]
    assert by_name["mlp.weight"]["mode"] == "adamw" and "rank=4 >= short side 4" in by_name["mlp.weight"]["reason"]
    assert by_name["head.weight"]["reason"] == "module not matched by target_modules"
    opt = PlumageAdamW(groups, rank=4)
    modes = {r["name"]: r["mode"] for r in opt.matrix_report()}
    assert modes == {"attn.weight": "plumage", "attn.bias": "adamw", "mlp.weight": "adamw", "mlp.bias": "adamw",
                     "head.weight": "adamw", "head.bias": "adamw"}
    with pytest.raises(ValueError, match=r"Matrix 'mlp.weight' cannot take the low-rank path"):
        lowrank_param_groups(model, target_modules=[r"attn|mlp"], rank=4, strict=True)
    with pytest.raises(ValueError, match=r"selected no matrix"):
        lowrank_param_groups(model, target_modules=[r"nothing"], rank=4, strict=True)


def test_bf16_params_keep_fp32_state_and_track_fp32() -> None:
    """bf16 weights: fp32 P/M/V, and the trajectory stays close to the fp32 run."""
    m32, m16 = _mlp(), _mlp().to(torch.bfloat16)
    o32 = PlumageAdamW(m32.parameters(), **HPARAMS)
    o16 = PlumageAdamW(m16.parameters(), **HPARAMS)
    for step in range(6):
        for m, o, dt in ((m32, o32, torch.float32), (m16, o16, torch.bfloat16)):
            x, y = _data(step)
            o.zero_grad()
            ((m(x.to(dt)) - y.to(dt)) ** 2).mean().backward()
            o.step()
    for st in o16.state.values():
        for k, v in st.items():
            if torch.is_tensor(v):
                assert v.dtype == torch.float32, k
    assert max((p.float() - q).abs().max().item() for p, q in zip(m16.parameters(), m32.parameters())) < 0.05


def test_frozen_and_gradless_params_are_skipped() -> None:
    """A parameter without a gradient keeps no state and does not move."""
    model = _mlp()
    model[4].weight.requires_grad_(False)
    opt = PlumageAdamW(model.parameters(), **HPARAMS)
    before = model[4].weight.detach().clone()
    _train(model, opt, range(4))
    assert torch.equal(model[4].weight, before)
    assert model[4].weight not in opt.state


def test_clipping_scales_what_the_optimizer_uses() -> None:
    """max_grad_norm clips by sqrt(Σ‖PᵀG‖² + Σ‖g_dense‖²) and reports that norm."""
    model = _mlp()
    opt = PlumageAdamW(model.parameters(), max_grad_norm=1e-3, **HPARAMS)
    x, y = _data(0)
    ((model(x) - y) ** 2).mean().backward()
    opt.step()
    expected = 0.0
    for p in model.parameters():
        st = opt.state[p]
        g = p.grad
        if "P" in st:
            g_o = g if p.shape[0] <= p.shape[1] else g.mT
            expected += float((st["P"].mT @ g_o).pow(2).sum())
        else:
            expected += float(g.pow(2).sum())
    assert opt.last_grad_norm == pytest.approx(expected**0.5, rel=1e-5)


def test_factory_and_config() -> None:
    """OptimizerConfig builds every estimator; unknown keys are rejected naming them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2)
    )
    for est in ("adamw", "plumage", "galore", "haar"):
        opt, rows = build_optimizer(model, OptimizerConfig(estimator=est, rank=4))
        modes = {r["mode"] for r in rows}
        assert (est in modes) if est != "adamw" else modes == {"adamw"}
        assert any(r["name"].endswith("q_proj.weight") and r["mode"] == (est if est != "adamw" else "adamw") for r in rows)
    with pytest.raises(ValueError, match=r"^Unknown config key 'ranks'; valid keys: \["):
        from_dict(OptimizerConfig, {"ranks": 4})


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_backward_projection_keeps_the_trajectory_and_drops_full_gradients(micro_batches: int) -> None:
    """Pᵀ G_o formed as backward accumulates: same parameters, and only r·l per target until step()."""
    models = [_mlp(), _mlp()]
    opts = [PlumageAdamW(m.parameters(), backward_projection=flag, **HPARAMS) for m, flag in zip(models, (False, True))]
    held = []  # target-gradient bytes between backward and step, with backward projection
    for step in range(10):
        x, y = _data(step)
        for m, o in zip(models, opts):
            o.zero_grad()
            for k in range(micro_batches):
                sl = slice(k * 32 // micro_batches, (k + 1) * 32 // micro_batches)
                (((m(x[sl]) - y[sl]) ** 2).mean() / micro_batches).backward()
        targets = [e for e in opts[1]._entries if e.lowrank]
        grad_bytes = sum(e.param.grad.numel() * 4 for e in targets if e.param.grad is not None)
        proj_bytes = sum(t.numel() * 4 for t in opts[1]._projected.values())
        held.append((step, grad_bytes, proj_bytes))
        for o in opts:
            o.step()
    assert _max_diff(*models) < 1e-6
    full = sum(e.shape[0] * e.shape[1] * 4 for e in targets)
    compressed = sum(e.r * e.l * 4 for e in targets)
    for step, grad_bytes, proj_bytes in held:
        if step % HPARAMS["update_interval"] == 0:  # a refresh needs the whole gradient
            assert (grad_bytes, proj_bytes) == (full, 0)
        else:
            assert (grad_bytes, proj_bytes) == (0, compressed)
    assert compressed < full / 2


def test_zero_grad_drops_projected_gradients() -> None:
    model = _mlp()
    opt = PlumageAdamW(model.parameters(), backward_projection=True, **HPARAMS)
    _train(model, opt, range(1))
    x, y = _data(1)
    ((model(x) - y) ** 2).mean().backward()
    assert opt._projected
    opt.zero_grad()
    assert not opt._projected
