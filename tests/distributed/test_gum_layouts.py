"""GUM on every layout follows its single-process run (docs/gum.md "Distributed").

Spawned gloo ranks at W = 2 and 3, a tiny LLaMA, fp32, τ = K = 3 (a new period, projector and layer
draw every 3 steps), γ = 2 drawn matrices per period. Checked against single-process ``GUM`` on the
same global batches (max |Δw| ≤ 1e-5 after 12 steps):

* the owner-sharded data-parallel layout (``process_group``): every target's Newton–Schulz runs on
  its owner, the others hold no momentum of it; with a global-norm clip as well;
* FSDP2 rows (``fully_shard``): drawn targets' rows gathered to the owner, the update's rows
  scattered back; state sharded like the weights;
* a checkpoint of the owner-sharded layout resumes bitwise on the same world size.

Compressed HSDP is in ``test_fsdp.py`` (4 ranks), the engines of the main job (ZeRO-1 composite
included) in ``test_main_job.py``.
"""

from __future__ import annotations

import pytest
import torch

from plumage_ds.optim import GUM
from plumage_ds.testing import lm_loss, run_workers, tiny_llama, token_batch

pytestmark = pytest.mark.distributed

BATCH, STEPS, SAVE_AT = 12, 12, 5  # global batch divisible by 2 and 3
KW = dict(lr=3e-3, weight_decay=0.1, update_interval=3, rank=4, seed=1, gamma=2, momentum=0.9)
CLIP = 0.05
TOL = 1e-5


def _train(model, opt, steps, rank, parts):
    per = BATCH // parts
    for step in steps:
        opt.zero_grad()
        lm_loss(model, token_batch(step, BATCH)[rank * per : (rank + 1) * per]).backward()
        opt.step()


def _params(model) -> dict:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in model.named_parameters()}


def _job(rank, world, ckpt):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    out = {}
    for name, extra in (("sharded", {}), ("sharded_clip", {"max_grad_norm": CLIP})):
        model = tiny_llama()
        opt = GUM(model.parameters(), process_group=dist.group.WORLD, **KW, **extra)
        _train(model, opt, range(STEPS), rank, world)
        out[name] = {"params": _params(model), "report": opt.matrix_report(), "grad_norm": opt.last_grad_norm,
                     "momentum_held": sorted(e.index for e in opt._entries if "momentum_buffer" in opt.state.get(e.param, {})),
                     "owned": sorted(e.index for e in opt._entries if e.lowrank and e.owner == opt.layout.rank)}
    # checkpoint: save after SAVE_AT steps, a fresh optimizer loads it and finishes
    model = tiny_llama()
    opt = GUM(model.parameters(), process_group=dist.group.WORLD, **KW)
    _train(model, opt, range(SAVE_AT), rank, world)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, f"{ckpt}/gum_w{world}_r{rank}.pt")
    fresh = tiny_llama(seed=7)
    fresh_opt = GUM(fresh.parameters(), process_group=dist.group.WORLD, **KW)
    saved = torch.load(f"{ckpt}/gum_w{world}_r{rank}.pt", weights_only=True)
    fresh.load_state_dict(saved["model"])
    fresh_opt.load_state_dict(saved["opt"])
    _train(fresh, fresh_opt, range(SAVE_AT, STEPS), rank, world)
    out["resumed"] = _params(fresh)
    # FSDP2 rows
    mesh = init_device_mesh("cpu", (world,))
    model = tiny_llama()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = GUM(model.parameters(), **KW)
    _train(model, opt, range(STEPS), rank, world)
    out["fsdp2"] = {"params": _params(model), "report": opt.matrix_report(), "state_bytes": opt.state_bytes()}
    return out


def _reference(**extra) -> tuple[dict, GUM]:
    model = tiny_llama()
    opt = GUM(model.parameters(), **KW, **extra)
    _train(model, opt, range(STEPS), 0, 1)
    return _params(model), opt


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[n] - b[n]).abs().max()) for n in a)


@pytest.fixture(scope="module")
def references():
    plain, _ = _reference()
    clipped, opt = _reference(max_grad_norm=CLIP)
    return {"sharded": plain, "fsdp2": plain, "sharded_clip": clipped, "clip_norm": opt.last_grad_norm}


@pytest.fixture(scope="module", params=[2, 3])
def runs(request, tmp_path_factory):
    return request.param, run_workers(_job, request.param, str(tmp_path_factory.mktemp("gum")))


@pytest.mark.parametrize("layout", ["sharded", "sharded_clip", "fsdp2"])
def test_gum_matches_single_process(runs, references, layout):
    world, results = runs
    for res in results:
        assert _max_diff(res[layout]["params"], references[layout]) < TOL, (world, layout)
    if layout == "sharded_clip":
        assert references["clip_norm"] > CLIP  # the clip is active: the test means something
        assert results[0][layout]["grad_norm"] == pytest.approx(references["clip_norm"], rel=1e-5)


def test_owners_alone_keep_momentum_and_owners_spread(runs):
    world, results = runs
    for res in results:
        run = res["sharded"]
        assert run["momentum_held"] == run["owned"] and run["owned"]  # Newton–Schulz on the owner only
    assert {r["owner"] for r in results[0]["sharded"]["report"] if r["mode"] == "gum"} == set(range(world))


def test_fsdp2_rows_and_sharded_state(runs):
    world, results = runs
    rows = results[0]["fsdp2"]["report"]
    assert {r["sharding"] for r in rows} == {"fsdp_rows"} and any(r["mode"] == "gum" for r in rows)
    per_rank = [res["fsdp2"]["state_bytes"]["total"] for res in results]
    assert max(per_rank) < 0.8 * sum(per_rank)  # the state is spread, not replicated


def test_sharded_checkpoint_resumes_bitwise(runs):
    _, results = runs
    for res in results:
        assert _max_diff(res["resumed"], res["sharded"]["params"]) == 0.0
