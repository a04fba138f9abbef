"""Engines that take the parameters away, and tied weights inside engines (2 gloo ranks, one spawned job).

* The plain DeepSpeed route ``deepspeed.initialize(model=m, optimizer=<PlumageAdamW | GUM |
  ShardedPlumageAdamW over m's parameters>)``: stage 0 keeps the optimizer's parameters and trains
  like the single-process ``PlumageAdamW`` (within 1e-5); stages 1-3 replace them by flat partitions and
  the first ``engine.step()`` raises the documented error (naming the supported route) with every
  parameter unchanged. The composite handed to DeepSpeed by hand on stage 0 without
  ``attach_engine`` raises too (DeepSpeed would all-reduce the targets uncompressed).
* Tied GPT-2 (``wte`` is ``lm_head``'s weight): ``pds.initialize`` on ZeRO 0-3 and DDP +
  ``PlumageAdamW`` end, after N steps, within 1e-5 of the single-process run whose groups list the
  shared tensor once.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
pytest.importorskip("deepspeed")

from plumage_ds.optim import PlumageAdamW  # noqa: E402
from plumage_ds.testing import free_port, groups_listed_once, lm_loss, record, run_workers, tiny_gpt2, tiny_llama, token_batch  # noqa: E402

W, BATCH, STEPS = 2, 8, 4
KW = dict(lr=3e-3, weight_decay=0.1, rank=4, update_interval=2, seed=1)
PLAIN_STAGES = (0, 1, 2, 3)
TIED_STAGES = (0, 1, 2, 3)


def _batch(step):
    return token_batch(step, BATCH, salt=5)


def _ds_config(stage, plumage=False):
    cfg = {
        "train_batch_size": BATCH, "train_micro_batch_size_per_gpu": BATCH // W, "gradient_clipping": 0.0,
        "zero_optimization": {"stage": stage}, "steps_per_print": 10**6,
    }  # fmt: skip
    if stage == 3:
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    if plumage:
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": KW["lr"], "weight_decay": KW["weight_decay"]}}
        cfg["plumage"] = {"estimator": "plumage", "rank": KW["rank"], "update_interval": KW["update_interval"],
                          "seed": KW["seed"], "target_modules": "all-linear"}  # PlumageAdamW's own default, as the reference
    else:
        cfg["zero_allow_untested_optimizer"] = True
    return cfg


def _train(model, step_fn, rank, steps=STEPS):
    mb = BATCH // W
    for step in range(steps):
        step_fn(lm_loss(model, _batch(step)[rank * mb : (rank + 1) * mb]))


def _params(model):
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}



def _worker(rank, world, port):
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu"})
    import deepspeed
    from torch.nn.parallel import DistributedDataParallel as DDP

    from plumage_ds.optim import ShardedPlumageAdamW
    from plumage_ds.integrations import deepspeed as pds
    from plumage_ds.optim import GUM, lowrank_param_groups

    out: dict = {}

    def engine_step(engine):
        def step(loss):
            engine.backward(loss)
            engine.step()

        return step

    def plain(stage, cls):
        def fn():
            model = tiny_llama()
            before = _params(model)
            opt = cls(model.parameters(), **KW)
            engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=_ds_config(stage))
            try:
                _train(engine, engine_step(engine), rank)
                raised = None
            except RuntimeError as exc:
                raised = str(exc)
            if stage == 3:
                with deepspeed.zero.GatheredParameters(list(model.parameters())):
                    params = _params(model)
            else:
                params = _params(model)
            unchanged = all(torch.equal(params[n], before[n]) for n in before)
            del engine, opt
            return {"raised": raised, "params": params, "unchanged": unchanged}

        return fn

    def composite_unattached():
        model = tiny_llama()
        _, cfg, stage = pds.split_config(_ds_config(0, plumage=True))
        comp = pds.build_composite(model, config=cfg, stage=stage)
        cfg = _ds_config(0)
        engine, *_ = deepspeed.initialize(model=model, optimizer=comp, config=cfg)
        try:
            _train(engine, engine_step(engine), rank, steps=1)
            raised = None
        except RuntimeError as exc:
            raised = str(exc)
        del engine, comp
        return {"raised": raised}

    def tied_ds(stage):
        def fn():
            model = tiny_gpt2()
            engine, *_ = pds.initialize(model=model, config=_ds_config(stage, plumage=True))
            comp = pds.plumage_optimizer(engine)
            _train(engine, engine_step(engine), rank)
            if stage == 3:
                with deepspeed.zero.GatheredParameters(list(model.parameters())):
                    params = _params(model)
                    tied = model.lm_head.weight is model.transformer.wte.weight
            else:
                params, tied = _params(model), model.lm_head.weight is model.transformer.wte.weight
            res = {"params": params, "tied": tied, "report": comp.matrix_report(), "n_dense": len(comp.dense_names),
                   "n_targets": len(comp._targets)}  # fmt: skip
            del engine, comp
            return res

        return fn

    def tied_ddp():
        model = tiny_gpt2()
        ddp = DDP(model)
        groups, _ = lowrank_param_groups(model, target_modules=None, rank=KW["rank"])
        opt = PlumageAdamW(groups, **KW)

        def step(loss):
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        _train(ddp, step, rank)
        res = {"params": _params(model), "step": opt.state[model.lm_head.weight]["step"]}
        del ddp, opt
        return res

    for stage in PLAIN_STAGES:
        record(out, f"plain{stage}", plain(stage, PlumageAdamW))
    record(out, "plain_gum2", plain(2, GUM))
    record(out, "plain_sharded2", plain(2, ShardedPlumageAdamW))
    record(out, "composite_unattached0", composite_unattached)
    for stage in TIED_STAGES:
        record(out, f"tied_ds{stage}", tied_ds(stage))
    record(out, "tied_ddp", tied_ddp)
    return out



@pytest.fixture(scope="module")
def runs():
    return run_workers(_worker, W, free_port())


def _get(runs, name):
    for r in runs:
        if not r[name]["ok"]:
            pytest.fail(f"run {name!r} failed:\n{r[name]['error']}")
    return runs[0][name]


def _reference(build, groups_fn):
    model = build()
    opt = PlumageAdamW(groups_fn(model), **KW)
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        lm_loss(model, _batch(step)).backward()
        opt.step()
    return _params(model), model


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.distributed
@pytest.mark.parametrize("stage", PLAIN_STAGES)
def test_plain_deepspeed_route_trains_or_raises(runs, stage):
    run = _get(runs, f"plain{stage}")
    if stage == 0:  # DeepSpeed keeps the optimizer's parameters and all-reduces gradients: plain data parallel
        assert run["raised"] is None
        ref, _ = _reference(tiny_llama, lambda m: m.parameters())
        assert _max_diff(run["params"], ref) <= 1e-5
        assert not run["unchanged"]
    else:
        assert run["raised"] is not None and run["unchanged"]
        assert "PlumageAdamW: its param_groups no longer hold the parameters it was built on" in run["raised"]
        assert "plumage_ds.integrations.deepspeed.initialize" in run["raised"]


@pytest.mark.distributed
@pytest.mark.parametrize("name, cls", [("plain_gum2", "GUM"), ("plain_sharded2", "ShardedPlumageAdamW")])
def test_plain_route_raises_for_every_matrix_optimizer(runs, name, cls):
    run = _get(runs, name)
    assert run["unchanged"]
    assert run["raised"] is not None and "no longer hold the parameters it was built on" in run["raised"]


@pytest.mark.distributed
def test_composite_on_stage0_needs_attach(runs):
    run = _get(runs, "composite_unattached0")
    assert run["raised"] is not None and "attach_engine(engine)" in run["raised"]


@pytest.mark.distributed
@pytest.mark.parametrize("stage", TIED_STAGES)
def test_tied_gpt2_under_deepspeed(runs, stage):
    run = _get(runs, f"tied_ds{stage}")
    ref, ref_model = _reference(tiny_gpt2, lambda m: groups_listed_once(m, KW["rank"], "all-linear"))
    assert run["tied"]
    assert run["n_dense"] + run["n_targets"] == len(list(ref_model.parameters()))  # each tensor handed over once
    names = [r["name"] for r in run["report"]]
    assert names.count("transformer.wte.weight|lm_head.weight") == 1
    assert _max_diff(run["params"], ref) <= 1e-5


@pytest.mark.distributed
def test_tied_gpt2_under_ddp(runs):
    run = _get(runs, "tied_ddp")
    ref, _ = _reference(tiny_gpt2, lambda m: groups_listed_once(m, KW["rank"]))
    assert run["step"] == STEPS
    assert _max_diff(run["params"], ref) <= 1e-5
