"""Target selection (``plumage_ds.targets``) on tiny transformers models, tied weights, orientation.

* default and ``"all-linear"`` selections pick exactly the attention/MLP matrices of LLaMA, GPT-2, BERT,
  RoBERTa, T5 and ViT built from configs; embeddings, norms and heads are never targets;
* one regex string is one regex; bad selections raise naming the value (nothing matched: the model's
  module names are in the message);
* tied tensors are listed once; every optimizer keeps one state and applies one update per step,
  equal to a run where the tensor appears once; ``state_bytes()`` counts it once;
* GPT-2 ``Conv1D`` stores ``Wᵀ``: the update of a non-square ``Conv1D`` weight is the transpose of
  the update of the ``nn.Linear`` holding ``W``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from plumage_ds.optim import GUM, PlumageAdamW, build_optimizer, lowrank_param_groups, select_targets
from plumage_ds.testing import TINY_MODELS, groups_listed_once, lm_loss, token_batch

LAYERS = 2
# leaf modules (per block) that the default selection must pick, by family
EXPECTED = {
    "llama": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    "gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
    "bert": ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "intermediate.dense", "output.dense"],
    "t5": ["SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o", "EncDecAttention.q",
           "EncDecAttention.k", "EncDecAttention.v", "EncDecAttention.o", "DenseReluDense.wi", "DenseReluDense.wo"],
    "vit": ["attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2"],
}
EXPECTED["roberta"] = EXPECTED["bert"]
# matrices per block: T5 has an encoder block (4 attention + 2 MLP) and a decoder block (8 + 2)
PER_LAYER = {"llama": 7, "gpt2": 4, "bert": 6, "roberta": 6, "t5": 16, "vit": 6}
HEADS = {  # output heads and embeddings that must never be targets
    "llama": ["model.embed_tokens.weight", "lm_head.weight"],
    "gpt2": ["transformer.wte.weight|lm_head.weight", "transformer.wpe.weight"],
    "bert": ["bert.embeddings.word_embeddings.weight|cls.predictions.decoder.weight",
             "cls.predictions.transform.dense.weight"],
    "roberta": ["roberta.embeddings.word_embeddings.weight|lm_head.decoder.weight", "lm_head.dense.weight"],
    "t5": ["shared.weight|encoder.embed_tokens.weight|decoder.embed_tokens.weight|lm_head.weight"],
    "vit": ["classifier.weight", "vit.embeddings.patch_embeddings.projection.weight"],
}


@pytest.fixture(scope="module")
def models():
    return {family: build(layers=LAYERS) for family, build in TINY_MODELS.items()}


@pytest.mark.parametrize("selection", [None, "all-linear"])
@pytest.mark.parametrize("family", sorted(TINY_MODELS))
def test_default_and_all_linear_pick_attention_and_mlp(models, family, selection):
    model = models[family]
    groups, report = lowrank_param_groups(model, target_modules=selection, rank=4)
    targets = [r["name"] for r in report if r["mode"] == "lowrank"]
    expected = [
        n for n, _ in model.named_parameters()
        if n.endswith(".weight") and any(n[: -len(".weight")].endswith("." + leaf) for leaf in EXPECTED[family])
    ]
    assert targets == expected and len(targets) == PER_LAYER[family] * LAYERS, (targets, expected)
    rows = {r["name"]: r for r in report}
    for name in HEADS[family]:
        assert rows[name]["mode"] == "adamw", name
    # every distinct trainable tensor is in exactly one group, once
    listed = [p for g in groups for p in g["params"]]
    assert len(listed) == len({id(p) for p in listed}) == len(list(model.parameters()))
    assert [name for name, _, _ in select_targets(model, selection, rank=4)] == targets


def test_one_regex_string_is_one_regex(models):
    model = models["llama"]
    as_string = lowrank_param_groups(model, target_modules="mlp", rank=4)[1]
    as_list = lowrank_param_groups(model, target_modules=["mlp"], rank=4)[1]
    assert as_string == as_list
    assert {r["name"].split(".")[-2] for r in as_string if r["mode"] == "lowrank"} == {"gate_proj", "up_proj", "down_proj"}
    # a list may mix regexes and 'all-linear' (union): adds the LM head, which all-linear alone never takes
    rows = {r["name"]: r for r in lowrank_param_groups(model, target_modules=["all-linear", "lm_head"], rank=4)[1]}
    assert rows["lm_head.weight"]["mode"] == "lowrank" and rows["model.layers.0.mlp.up_proj.weight"]["mode"] == "lowrank"


def test_bad_selections_raise(models):
    bert = models["bert"]
    with pytest.raises(ValueError, match=r"target_modules=\['attn\|mlp'\] selected no matrix of the model.*"
                                         r"bert\.encoder\.layer\.0\.attention\.self\.query"):
        lowrank_param_groups(bert, target_modules=[r"attn|mlp"], rank=4)  # LLaMA-shaped regex on BERT
    with pytest.raises(ValueError, match=r"Invalid target_modules=\[\]"):
        lowrank_param_groups(bert, target_modules=[], rank=4)
    with pytest.raises(ValueError, match=r"Invalid target_modules=3"):
        lowrank_param_groups(bert, target_modules=3, rank=4)
    with pytest.raises(ValueError, match=r"Invalid target_modules entry '\(': not a regex"):
        lowrank_param_groups(bert, target_modules=["("], rank=4)
    with pytest.raises(ValueError, match=r"selected no matrix that can take the low-rank path.*rank=32 >= short side"):
        lowrank_param_groups(bert, target_modules=None, rank=32)
    flat = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"'all-linear' needs the model's repeated blocks in an nn.ModuleList"):
        lowrank_param_groups(flat, target_modules="all-linear", rank=2)


def test_config_route_takes_all_linear(models):
    """The job config turns a string into a one-element tuple: ``("all-linear",)`` is still the keyword."""
    from plumage_ds.config import OptimizerConfig

    cfg = OptimizerConfig(estimator="plumage", rank=4, target_modules="all-linear")
    _, rows = build_optimizer(models["gpt2"], cfg)
    targets = [r["name"] for r in rows if r["mode"] == "plumage"]
    assert len(targets) == PER_LAYER["gpt2"] * LAYERS and all(".h." in n for n in targets)


@pytest.mark.parametrize("estimator", ["adamw", "plumage", "gum"])
def test_dense_lr_steps_the_non_targets_only(estimator):
    """``optimizer.dense_lr``: the tensors a low-rank estimator leaves dense take their first Adam
    step (``|Δ| = lr·|g|/(|g| + eps)``, so ``max |Δ| ≈ lr``) at ``dense_lr``; the targets step exactly
    as without it — for the full-rank baseline too, which splits by the same selection."""
    from plumage_ds.config import OptimizerConfig
    from plumage_ds.testing import tiny_llama

    def first_step(dense_lr):
        model = tiny_llama()
        opt, rows = build_optimizer(model, OptimizerConfig(estimator=estimator, lr=1e-3, dense_lr=dense_lr, rank=4))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        lm_loss(model, token_batch(0, 4)).backward()
        opt.step()
        return {n: p.detach() - before[n] for n, p in model.named_parameters()}, rows

    base, _ = first_step(None)
    split, rows = first_step(0.05)
    _, report = lowrank_param_groups(tiny_llama(), rank=4)
    targets = {r["name"] for r in report if r["mode"] == "lowrank"}
    assert targets and len(targets) < len(split)
    for name, delta in split.items():
        if name in targets:
            assert torch.equal(delta, base[name]), name
        else:
            for d, lr in ((delta, 0.05), (base[name], 1e-3)):
                assert 0.98 * lr < d.abs().max() < 1.001 * lr, name
    if estimator == "adamw":
        assert {r["reason"] for r in rows} == {"estimator=adamw (lr=0.001)", "estimator=adamw (lr=0.05)"}


# ----------------------------------------------------------------------------- tied weights


def _train(model, opt, steps=3):
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        lm_loss(model, token_batch(step, 4)).backward()
        opt.step()


@pytest.mark.parametrize("optimizer", ["plumage", "gum"])
def test_tied_tensor_one_entry_one_state_one_update(optimizer):
    """GPT-2's ``wte``/``lm_head``: one entry, ``step == N`` in its state, and weights equal to a run
    that lists the tensor once (groups from ``named_parameters()``, which yields it once)."""
    from plumage_ds.testing import tiny_gpt2

    def build(once: bool):
        model = tiny_gpt2()
        if once:
            groups = groups_listed_once(model, rank=4)
        else:
            groups, _ = lowrank_param_groups(model, target_modules=None, rank=4)
        cls = PlumageAdamW if optimizer == "plumage" else GUM
        return model, cls(groups, lr=1e-2, rank=4, update_interval=2, seed=3)

    model, opt = build(once=False)
    assert model.transformer.wte.weight is model.lm_head.weight
    rows = [r for r in opt.matrix_report() if "wte" in r["name"]]
    assert [r["name"] for r in rows] == ["transformer.wte.weight|lm_head.weight"]
    _train(model, opt)
    ref_model, ref_opt = build(once=True)
    _train(ref_model, ref_opt)
    assert opt.state[model.lm_head.weight]["step"] == 3
    for (n, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        assert torch.equal(p, q), n
    # state_bytes counts the shared tensor once: AdamW moments of every distinct non-target tensor
    dense = [p for g in opt.param_groups if not g.get("lowrank") for p in g["params"]]
    assert opt.state_bytes()["non_target"] == sum(2 * 4 * p.numel() for p in dense)
    assert len(dense) + len([p for g in opt.param_groups if g.get("lowrank") for p in g["params"]]) == len(
        list(model.parameters())
    )


# ----------------------------------------------------------------------------- orientation


def test_conv1d_update_is_transpose_of_linear_update():
    """``Conv1D(nf=out, nx=in)`` holds ``Wᵀ`` ``(in, out)``: for a non-square weight the short side is
    the same dimension of ``W``, so PLUMAGE's update of the stored tensor is the transpose of
    ``nn.Linear``'s."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    d_in, d_out = 12, 20
    conv = Conv1D(d_out, d_in)
    lin = nn.Linear(d_in, d_out)
    with torch.no_grad():
        conv.weight.normal_()
        lin.weight.copy_(conv.weight.T)
        lin.bias.copy_(conv.bias)
    start = lin.weight.detach().clone()
    kw = dict(lr=1e-2, rank=3, update_interval=2, seed=5)
    o_conv, o_lin = PlumageAdamW([conv.weight], **kw), PlumageAdamW([lin.weight], **kw)
    for step in range(4):
        x = torch.randn(16, d_in, generator=torch.Generator().manual_seed(step))
        for m, o in ((conv, o_conv), (lin, o_lin)):
            o.zero_grad()
            (m(x).tanh() ** 2).sum().backward()
            o.step()
    assert o_conv.matrix_report()[0]["mode"] == o_lin.matrix_report()[0]["mode"] == "plumage"
    torch.testing.assert_close(conv.weight.T, lin.weight, rtol=0, atol=1e-6)
    assert float((lin.weight.detach() - start).abs().max()) > 1e-3  # the steps really moved the weights
