"""Single-process failure semantics (docs/reliability.md): atomic steps, non-finite gradients, bad input.

* a NaN/Inf gradient at an ordinary or a refresh step, for plumage, galore, haar and GUM: with
  ``nonfinite="skip"`` the step changes nothing (parameters and state bitwise) and the run then
  continues exactly as if the bad step had never happened; with ``"raise"`` the error names the
  parameter and nothing changes either;
* a refresh whose spectral decomposition fails raises ``CollectiveStepError`` with nothing changed,
  and the next step works;
* bad input — constructor options, ``add_param_group``, ``load_state_dict`` — raises a
  ``ValueError`` naming the key and the value, and leaves the optimizer exactly as it was.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from plumage_ds import GUM, PlumageAdamW
from plumage_ds.optim.base import CollectiveStepError, NonFiniteGradientError

TAU = 3
KW = dict(lr=1e-2, rank=3, update_interval=TAU, seed=7, weight_decay=0.05)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 8), nn.Tanh(), nn.Linear(8, 24))


def _backward(model: nn.Module, step: int, poison: float | None = None) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(32, 12, generator=g), torch.randn(32, 24, generator=g)
    ((model(x) - y) ** 2).mean().backward()
    if poison is not None:
        model[2].weight.grad[1, 3] = poison  # one entry of one target matrix


def _make(kind: str, model: nn.Module, **extra):
    if kind == "gum":
        return GUM(model.parameters(), gamma=1, **KW, **extra)
    return PlumageAdamW(model.parameters(), estimator=kind, **KW, **extra)


def _snapshot(model: nn.Module, opt) -> tuple[list, bytes]:
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    return [p.detach().clone() for p in model.parameters()], buf.getvalue()


def _train(model, opt, steps, poisoned=None, poison=float("nan")):
    for s in steps:
        opt.zero_grad()
        _backward(model, s, poison if s == poisoned else None)
        opt.step()


KINDS = ["plumage", "galore", "haar", "gum"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad_step", [4, 3], ids=["ordinary", "refresh"])  # τ = 3: step 3 refreshes
@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_step_is_skipped_and_changes_nothing(kind, bad_step, poison):
    model, clean_model = _mlp(), _mlp()
    opt, clean = _make(kind, model), _make(kind, clean_model)
    _train(model, opt, range(bad_step))
    _train(clean_model, clean, range(bad_step))
    before = _snapshot(model, opt)
    opt.zero_grad()
    _backward(model, bad_step, poison)
    opt.step()  # skipped on every rank, counted
    after = _snapshot(model, opt)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
    assert before[1] == after[1] or _same_state(opt, before[1])
    assert opt.skipped_steps == 1 and opt.last_nonfinite == ["param2"]
    # training continues exactly as a run that never saw the bad step
    _train(model, opt, range(bad_step + 1, bad_step + 5))
    _train(clean_model, clean, range(bad_step + 1, bad_step + 5))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), clean_model.parameters()))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _same_state(opt, saved: bytes) -> bool:
    """The state equals a saved one (only ``skipped_steps`` in the meta section may differ)."""
    old = torch.load(io.BytesIO(saved), weights_only=True)
    new = opt.state_dict()
    section = "gum" if isinstance(opt, GUM) else "plumage"
    old[section].pop("skipped_steps"), new[section].pop("skipped_steps")
    for i, st in old["state"].items():
        for k, v in st.items():
            w = new["state"][i][k]
            if not (torch.equal(v, w) if torch.is_tensor(v) else v == w):
                return False
    return old[section] == new[section] and old["param_groups"] == new["param_groups"]


@pytest.mark.parametrize("kind", KINDS)
def test_nonfinite_raise_policy_names_the_parameter(kind):
    model = _mlp()
    opt = _make(kind, model, nonfinite="raise")
    _train(model, opt, range(2))
    before = _snapshot(model, opt)
    opt.zero_grad()
    _backward(model, 2, float("nan"))
    with pytest.raises(NonFiniteGradientError, match=r"Non-finite gradient in \['param2'\]; step not applied"):
        opt.step()
    after = _snapshot(model, opt)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0])) and before[1] == after[1]


@pytest.mark.parametrize("kind", ["plumage", "galore", "gum"])
def test_failed_refresh_raises_and_changes_nothing(kind, monkeypatch):
    import plumage_ds.estimators.spectral as spectral

    model = _mlp()
    opt = _make(kind, model)
    _train(model, opt, range(TAU))  # next step refreshes
    before = _snapshot(model, opt)

    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("the algorithm failed to converge (injected)")

    for route in ("eigh", "svd"):  # galore takes the svd route by default, the others the Gram eigh
        monkeypatch.setattr(spectral.torch.linalg, route, broken)
    opt.zero_grad()
    _backward(model, TAU)
    with pytest.raises(CollectiveStepError, match=r"refresh of 'param\d' failed: _?LinAlgError: .*injected.*unchanged"):
        opt.step()
    after = _snapshot(model, opt)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0])) and before[1] == after[1]
    assert not any("_new" in st for st in opt.state.values())
    monkeypatch.undo()
    opt.step()  # same gradients, healthy eigh: the step goes through
    assert all(not torch.equal(a, b) for a, b in zip(before[0], [p.detach() for p in model.parameters()]))


# ----------------------------------------------------------------------------- bad input

BAD_OPTIONS = [
    (dict(strict="no"), r"Invalid strict='no': must be True or False"),
    (dict(realign="no"), r"Invalid realign='no'"),
    (dict(backward_projection="yes"), r"Invalid backward_projection='yes': must be True or False"),
    (dict(nonfinite="ignore"), r"Invalid nonfinite='ignore'"),
    (dict(right_projectors="both"), r"Invalid right_projectors='both'"),
    (dict(collective_timeout=-1.0), r"Invalid collective_timeout=-1.0"),
    (dict(collective_timeout=float("nan")), r"Invalid collective_timeout=nan"),
    (dict(uniform_mix=1.5), r"Invalid uniform_mix=1.5"),
    (dict(lr=float("nan")), r"Invalid lr=nan"),
    (dict(eps=-1e-8), r"Invalid eps=-1e-08"),
    (dict(weight_decay=-0.1), r"Invalid weight_decay=-0.1"),
    (dict(betas=(0.9, 1.5)), r"Invalid betas=\(0.9, 1.5\)"),
    (dict(betas=0.9), r"Invalid betas=0.9"),
    (dict(seed=1.5), r"Invalid seed=1.5"),
    (dict(seed=True), r"Invalid seed=True"),
    (dict(rank=True), r"Invalid rank=True"),
    (dict(update_interval=2.5), r"Invalid update_interval=2.5"),
    (dict(scale=-1.0), r"Invalid scale=-1.0"),
]


@pytest.mark.parametrize("options,match", BAD_OPTIONS, ids=[next(iter(o)) + str(i) for i, (o, _) in enumerate(BAD_OPTIONS)])
def test_bad_constructor_options_name_the_value(options, match):
    with pytest.raises(ValueError, match=match):
        PlumageAdamW(_mlp().parameters(), **{**KW, **options})


BAD_GROUPS = [
    (dict(lr=-1.0), r"Invalid lr=-1.0"),
    (dict(update_interval=0), r"Invalid update_interval=0"),
    (dict(estimator="topk"), r"Invalid estimator='topk'"),
    (dict(realign="yes"), r"Invalid realign='yes'"),
    (dict(lowrank="sometimes"), r"Invalid lowrank='sometimes'"),
    (dict(names=["a", "b"]), r"Invalid names: 2 names for 1 params"),
]


@pytest.mark.parametrize("extra,match", BAD_GROUPS, ids=[next(iter(o)) for o, _ in BAD_GROUPS])
def test_rejected_param_group_leaves_the_optimizer_as_it_was(extra, match):
    model = _mlp()
    opt = PlumageAdamW(list(model.parameters())[:4], **KW)
    _train(model, opt, range(2))
    groups, state = copy.deepcopy(opt.state_dict()["param_groups"]), _snapshot(model, opt)[1]
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": [model[4].weight], **extra})
    assert opt.state_dict()["param_groups"] == groups and _snapshot(model, opt)[1] == state
    assert len(opt.matrix_report()) == 4
    opt.load_state_dict(torch.load(io.BytesIO(state), weights_only=True))  # still consistent


def _corrupt(sd: dict, how: str) -> dict:
    sd = torch.load(_to_bytes(sd), weights_only=True)
    mat = next(i for i, st in sd["state"].items() if "P" in st)
    group = sd["param_groups"][0]
    if how == "update_interval":
        group["update_interval"] = 0
    elif how == "lr":
        group["lr"] = float("nan")
    elif how == "betas":
        group["betas"] = [0.9, 1.5]
    elif how == "svd_method":
        group["svd_method"] = "qr"
    elif how == "unknown_key":
        group["momentum"] = 0.9
    elif how == "step_negative":
        sd["state"][mat]["step"] = -1
    elif how == "step_str":
        sd["state"][mat]["step"] = "3"
    elif how == "P_shape":
        sd["state"][mat]["P"] = torch.zeros(2, 2)
    elif how == "inf_moment":
        sd["state"][mat]["exp_avg"][0, 0] = float("inf")
    elif how == "missing_P":
        del sd["state"][mat]["P"]
    elif how == "stray_key":
        sd["state"][mat]["_new"] = torch.zeros(3)
    elif how == "state_not_mapping":
        sd["state"][mat] = [1, 2]
    return sd


def _to_bytes(sd: dict) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return buf


BAD_CHECKPOINTS = [
    ("update_interval", r"group 0: Invalid update_interval=0"),
    ("lr", r"group 0: Invalid lr=nan"),
    ("betas", r"group 0: Invalid betas=\(0.9, 1.5\)"),
    ("svd_method", r"group 0: Invalid svd_method='qr'"),
    ("unknown_key", r"group 0 has unknown hyperparameter 'momentum'"),
    ("step_negative", r"step=-1"),
    ("step_str", r"step='3'"),
    ("P_shape", r"\.P has shape \(2, 2\), expected"),
    ("inf_moment", r"exp_avg holds non-finite values"),
    ("missing_P", r"lacks its projector \(P, d\)"),
    ("stray_key", r"unexpected key '_new'"),
    ("state_not_mapping", r"state of param\d is a list, expected a mapping"),
]


@pytest.mark.parametrize("how,match", BAD_CHECKPOINTS, ids=[h for h, _ in BAD_CHECKPOINTS])
def test_load_state_dict_validates_everything_it_installs(how, match):
    model = _mlp()
    opt = PlumageAdamW(model.parameters(), **KW)
    _train(model, opt, range(2))
    before = _snapshot(model, opt)[1]
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(_corrupt(opt.state_dict(), how))
    assert _snapshot(model, opt)[1] == before
