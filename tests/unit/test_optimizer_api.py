"""What a user of the optimizers meets first: named parameters and the default selection, a rejected
``add_param_group`` that changes nothing, and a step where no parameter has a gradient."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from plumage_ds.optim import GUM, PlumageAdamW
from plumage_ds.testing import lm_loss, tiny_llama, token_batch

OPTIMIZERS = {
    "plumage": lambda params, **kw: PlumageAdamW(params, rank=4, update_interval=2, **kw),
    "gum": lambda params, **kw: GUM(params, rank=4, update_interval=2, gamma=1, **kw),
}


def _step(model, opt, step: int = 0) -> None:
    opt.zero_grad()
    lm_loss(model, token_batch(step, 4)).backward()
    opt.step()


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_named_parameters_get_the_default_selection_and_real_names(kind):
    model = tiny_llama()
    opt = OPTIMIZERS[kind](model.named_parameters())
    rows = {r["name"]: r for r in opt.matrix_report()}
    assert set(rows) == {n for n, _ in model.named_parameters()}  # real names, not param0...
    mode = "plumage" if kind == "plumage" else "gum"
    assert rows["model.layers.0.self_attn.q_proj.weight"]["mode"] == mode
    assert rows["model.layers.1.mlp.down_proj.weight"]["mode"] == mode
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert rows[name]["mode"] == "adamw", name
    _step(model, opt)  # and it trains


def test_named_parameters_with_target_modules_and_the_errors():
    model = tiny_llama()
    opt = PlumageAdamW(model.named_parameters(), rank=4, target_modules=[r"mlp\.up_proj"])
    modes = {r["name"]: r["mode"] for r in opt.matrix_report()}
    assert [n for n, m in modes.items() if m == "plumage"] == [f"model.layers.{i}.mlp.up_proj.weight" for i in range(2)]
    with pytest.raises(ValueError, match=r"^target_modules=\['nothing_here'\] selected none of the \d+ named parameters"):
        PlumageAdamW(model.named_parameters(), rank=4, target_modules=["nothing_here"])
    with pytest.raises(ValueError, match=r"^Invalid target_modules=\['mlp'\]: it selects by name, so it needs model.named_parameters\(\)"):
        PlumageAdamW(model.parameters(), rank=4, target_modules=["mlp"])
    with pytest.raises(ValueError, match=r"^Invalid target_modules='all-linear' with named parameters"):
        PlumageAdamW(model.named_parameters(), rank=4, target_modules="all-linear")


def _snapshot(model, opt) -> tuple:
    return ({n: p.detach().clone() for n, p in model.named_parameters()},
            [dict(g, params=list(g["params"])) for g in opt.param_groups], len(opt._entries))  # fmt: skip


@pytest.mark.parametrize("case", ["strict_fallback", "gum_interval"])
def test_a_rejected_param_group_leaves_the_optimizer_working(case):
    model = tiny_llama()
    extra = nn.Linear(4, 3)  # short side 3 <= rank 4: cannot take the low-rank path
    if case == "strict_fallback":
        opt = PlumageAdamW([p for n, p in model.named_parameters()], rank=4, update_interval=2, strict=True, lr=1e-3)
        group, match = {"params": [extra.weight], "lowrank": True}, "cannot take the low-rank path (strict=True)"
    else:
        opt = GUM(model.parameters(), rank=4, update_interval=2, gamma=1)
        wide = nn.Linear(16, 12)
        group, match = {"params": [wide.weight], "update_interval": 5}, "needs the same update_interval; got [2, 5]"
    _step(model, opt, 0)
    before_state = opt.state_dict()
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match=re.escape(match)):
        opt.add_param_group(group)
    after = _snapshot(model, opt)
    assert len(opt.param_groups) == len(before[1]) and after[2] == before[2]
    assert all(a["params"] == b["params"] for a, b in zip(opt.param_groups, before[1]))
    sd = opt.state_dict()  # used to raise KeyError on the half-added group
    assert sd["param_groups"] == before_state["param_groups"]
    _step(model, opt, 1)  # and the optimizer still steps
    assert any(not torch.equal(p, before[0][n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_a_step_without_gradients(kind):
    model = tiny_llama()
    opt = OPTIMIZERS[kind](model.parameters())
    # before any step: most likely the engine took the parameters away, an error naming the route
    with pytest.raises(RuntimeError, match="none of its .* parameters has a gradient on any rank"):
        opt.step()
    _step(model, opt, 0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {k: v for k, v in opt.state_dict()["state"].items()}
    opt.zero_grad()
    opt.step()  # a loop that skipped its batch: a no-op, as in torch.optim, counted
    assert opt.empty_steps == 1 and opt.skipped_steps == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert opt.state_dict()["state"].keys() == state.keys()
    assert all(torch.equal(a, b) if torch.is_tensor(a) else a == b
               for i in state for a, b in zip(state[i].values(), opt.state_dict()["state"][i].values()))  # fmt: skip
    _step(model, opt, 1)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
