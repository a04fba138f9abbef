"""``ShardedPlumageAdamW``: owner-sharded PLUMAGE-Adam over a data-parallel process group (docs/design.md §4.1).

Everything distributed runs in two spawned jobs (4 ranks import torch + transformers, so each job is
one spawn): a W=2 job and a W=4 job; W=1 runs inside the W=2 job on one-rank subgroups
(``dist.new_group([k])``, the optimizer's ``process_group``). The main job on the sharded engine
under the real ``torchrun`` launcher is in ``tests/distributed/test_main_job.py``. Checked:

* world-size invariance: W=1, 2, 4 on a tiny LLaMA (fp32, same global batch, same seed, τ=3 so 7
  refreshes in 20 steps) agree with the single-device oracle ``ReferencePlumageAdam`` and with
  ``PlumageAdamW`` within 1e-5, with replicas bitwise identical (``all_gather`` in the workers);
  a second run with 2 micro-batches per step and an active global-norm clip (reference:
  single-device ``PlumageAdamW`` with the same ``max_grad_norm``);
* compression is real: the bytes counted by the collective layer per step equal the formulas of
  ``docs/data_parallel.md`` exactly (ordinary and refresh steps, every tag), and the compressed
  traffic is within 10 % of a ring all-reduce of the ``r × l`` projections;
* memory is sharded: ``state_bytes()`` per rank equals the exact formula, moments sum over ranks
  to the single-device total; dense parameters are split in flat chunks (ZeRO-1/2): their traffic
  is a ring all-reduce of the dense gradients and each rank holds 1/W of their AdamW state;
* uneven cases: more ranks than matrices, a rank owning nothing, frozen / unused / one-rank-only
  parameters, ``rank >= short side`` (reported fallback; ``strict=True`` raises);
* distributed checkpoints: W=2 → W=2 bitwise; W=2 → W=1 and W=4 via ``merge_shards`` within
  1e-6; an unmerged shard on another world size raises ``ValueError``;
* ``estimator="optimal"`` at W=2 (``Σ`` kept compact, ``sigma_rank``): matches the oracle and
  single-device ``PlumageAdamW``, ``Σ`` lives on each matrix's owner only (also in the saved shards), resume W=2 → W=2 bitwise and W=2 → W=1 via
  ``merge_shards`` within 1e-6.
"""

from __future__ import annotations

import os
import re

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from plumage_ds.optim import PlumageAdamW, lowrank_param_groups, merge_shards
from plumage_ds.optim.reference import ReferencePlumageAdam
from plumage_ds.testing import lm_loss, run_workers, tiny_llama, token_batch


VOCAB, SEQ, GLOBAL_BATCH = 64, 16, 8  # global batch divisible by 1, 2, 4
RANK = 4  # projection rank r
STEPS, TAU = 20, 3  # refreshes at steps 0, 3, ..., 18
SAVE_AT = 7  # checkpoint after 7 steps, resumed runs do steps 7..19
KW = dict(lr=3e-3, weight_decay=0.1, update_interval=TAU, estimator="plumage", seed=1)
CLIP = 0.05  # global-norm clip; the grad norm of the tiny LLaMA stays well above it (asserted)
ACCUM = 2
SMALL_STEPS = 10
SMALL_BATCH = 32

# ------------------------------------------------------------------------------------- models & data


def llama_groups(model: nn.Module) -> list[dict]:
    groups, _ = lowrank_param_groups(model, target_modules=[r"self_attn|mlp"], rank=RANK)
    return groups


def llama_tokens(step: int, micro: int) -> torch.Tensor:
    return token_batch(step, GLOBAL_BATCH, seq=SEQ, vocab=VOCAB, salt=micro)


def llama_loss(model: nn.Module, x: torch.Tensor, k: int) -> torch.Tensor:
    return lm_loss(model, x)


class TwoMatrix(nn.Module):
    """Two target matrices of different shapes and orientations, plus a full-rank fallback."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.a = nn.Linear(12, 20)  # (20, 12): right projection, s=12, l=20
        self.b = nn.Linear(20, 8)  # (8, 20): left projection, s=8, l=20
        self.c = nn.Linear(12, 3, bias=False)  # (3, 12): rank 4 >= short side 3 → AdamW

    def loss(self, d: torch.Tensor, k: int) -> torch.Tensor:
        x, y = d[:, :12], d[:, 12:]
        return F.mse_loss(self.b(torch.tanh(self.a(x))), y) + self.c(x).pow(2).mean()


class NoGrad(nn.Module):
    """Parameters without gradients: frozen, never used, and used on one rank only."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.a = nn.Linear(12, 16)
        self.frozen = nn.Linear(16, 8).requires_grad_(False)  # used, but no grad anywhere
        self.unused = nn.Linear(16, 16)  # never called: grad None on every rank
        self.only0 = nn.Linear(12, 16, bias=False)  # a target matrix, grad on rank 0 only
        self.only1 = nn.Parameter(torch.zeros(8))  # a dense parameter, grad on rank 1 only

    def loss(self, d: torch.Tensor, k: int) -> torch.Tensor:
        x, y = d[:, :12], d[:, 12:]
        h = torch.tanh(self.a(x))
        if k == 0:
            h = h + self.only0(x)
        out = self.frozen(h)
        if k == 1:
            out = out + self.only1
        return F.mse_loss(out, y)


def small_data(step: int, micro: int) -> torch.Tensor:
    # 32 rows: every rank's slice (8 rows at W=4) gives gradients of rank > r, also for ``only0``,
    # whose gradient comes from one slice. With rank(G) < r the sample must include directions of
    # σ ≈ 0 whose R is rounding noise, which Adam normalizes to lr-sized steps: such runs are not
    # reproducible across world sizes (nor across two single-device implementations).
    g = torch.Generator().manual_seed(7_919 * step + micro + 17)
    return torch.randn(SMALL_BATCH, 20, generator=g)


def module_loss(model, d, k):
    return model.loss(d, k)


def named_group(model: nn.Module) -> list[dict]:
    names, params = zip(*model.named_parameters(remove_duplicate=True))
    return [{"params": list(params), "names": list(names)}]


# ------------------------------------------------------------------------------------- training


def train(model, opt, *, rank, world, data, loss_fn, steps, start=0, accum=1, emulate=None, on_step=None):
    """Steps ``start..steps-1``; each rank runs its slice of every micro-batch of the global batch.

    ``emulate=k`` (single device): the loss is the mean of the ``k`` per-slice losses, i.e. what
    ``k`` ranks average — needed where a parameter is used by some ranks only.
    """
    for step in range(start, steps):
        for micro in range(accum):
            x = data(step, micro)
            if emulate:
                loss = sum(loss_fn(model, xs, k) for k, xs in enumerate(x.chunk(emulate))) / emulate
            else:
                loss = loss_fn(model, x.chunk(world)[rank], rank)
            (loss / accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(step, opt)
    return model


def params_of(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def replicas_equal(model, group=None) -> bool:
    """Bitwise equality of all parameters across the ranks of ``group`` (``all_gather``)."""
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    out = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, flat, group=group)
    return all(torch.equal(o, out[0]) for o in out)


def stats_recorder(log: list, extra=None):
    """Per step: the counters' ``last_step`` and ``total`` snapshots (and the grad norm)."""

    def on_step(step, opt):
        cs = opt.comm_stats()
        log.append(
            {
                "step": step,
                "last_step": cs["last_step"],
                "total": cs["total"],
                "grad_norm": getattr(opt, "last_grad_norm", None),
            }
        )
        if extra is not None:
            extra(step, opt)

    return on_step


def summary(model, opt, log=None, group=None) -> dict:
    return {
        "params": params_of(model),
        "replicas_equal": replicas_equal(model, group),
        "report": opt.matrix_report(),
        "ownership": opt.ownership(),
        "state_bytes": opt.state_bytes(),
        "state_keys": sorted(opt.state_dict()["state"].keys()),
        "log": log or [],
    }


def sharded(groups, group=None, **kw):
    from plumage_ds.optim import ShardedPlumageAdamW

    return ShardedPlumageAdamW(groups, rank=RANK, process_group=group, **{**KW, **kw})


def resume_full(model_path, shard_paths, opt_factory, group=None, rank=0, world=1):
    """Fresh model (other init) + optimizer, loaded from the saved model and merged shards."""
    model = tiny_llama(seed=123)
    model.load_state_dict(torch.load(model_path, weights_only=True))
    opt = opt_factory(model)
    opt.load_state_dict(merge_shards([torch.load(p, weights_only=True) for p in shard_paths]))
    train(model, opt, rank=rank, world=world, data=llama_tokens, loss_fn=llama_loss, steps=STEPS, start=SAVE_AT)
    return params_of(model)


def wrong_world_error(shard_path, group) -> str:
    model = tiny_llama()
    opt = sharded(llama_groups(model), group)
    try:
        opt.load_state_dict(torch.load(shard_path, weights_only=True))
    except ValueError as exc:
        return str(exc)
    return "no error"


# ------------------------------------------------------------------------------------- workers


def _llama_runs(rank, world, group=None, ckpt=None) -> dict:
    """Plain run (saving a checkpoint after SAVE_AT steps when ``ckpt``) and accumulation + clipping."""
    out = {}

    def save(step, opt):
        if ckpt is not None and step + 1 == SAVE_AT:
            torch.save(opt.state_dict(), os.path.join(ckpt, f"optim_w{world}_rank{rank}.pt"))
            if rank == 0:
                torch.save(model.state_dict(), os.path.join(ckpt, f"model_w{world}.pt"))

    model = tiny_llama()
    opt = sharded(llama_groups(model), group)
    log: list = []
    train(model, opt, rank=rank, world=world, data=llama_tokens, loss_fn=llama_loss, steps=STEPS,
          on_step=stats_recorder(log, save))
    out["plain"] = summary(model, opt, log, group)

    model = tiny_llama()
    opt = sharded(llama_groups(model), group, max_grad_norm=CLIP)
    log = []
    train(model, opt, rank=rank, world=world, data=llama_tokens, loss_fn=llama_loss, steps=STEPS,
          accum=ACCUM, on_step=stats_recorder(log))
    out["clip"] = summary(model, opt, log, group)
    return out


def _single_device_refs(ckpt) -> dict:
    """Single-device references for the tiny LLaMA: oracle, PlumageAdamW, clipped PlumageAdamW."""
    out = {}
    model = tiny_llama()
    opt = ReferencePlumageAdam(llama_groups(model), rank=RANK, **KW)
    out["oracle"] = params_of(train(model, opt, rank=0, world=1, data=llama_tokens, loss_fn=llama_loss, steps=STEPS))
    model = tiny_llama()
    opt = PlumageAdamW(llama_groups(model), rank=RANK, **KW)
    train(model, opt, rank=0, world=1, data=llama_tokens, loss_fn=llama_loss, steps=STEPS)
    out["plumage"], out["plumage_state_bytes"] = params_of(model), opt.state_bytes()
    model = tiny_llama()
    opt = PlumageAdamW(llama_groups(model), rank=RANK, max_grad_norm=CLIP, **KW)
    train(model, opt, rank=0, world=1, data=llama_tokens, loss_fn=llama_loss, steps=STEPS, accum=ACCUM)
    out["clip"] = params_of(model)
    # W=2 checkpoint resumed by a plain single-device PlumageAdamW
    shards = [os.path.join(ckpt, f"optim_w2_rank{r}.pt") for r in range(2)]
    out["resume_plain_w1"] = resume_full(
        os.path.join(ckpt, "model_w2.pt"), shards, lambda m: PlumageAdamW(llama_groups(m), rank=RANK, **KW)
    )
    return out


OPTIMAL = dict(estimator="optimal", uniform_mix=0.1, sigma_rank=RANK)  # Σ kept compact: (s, RANK + 1)


def _optimal_runs(rank, world, ckpt) -> dict:
    """``estimator="optimal"``: a W=2 run saving shards after SAVE_AT steps, resumed at W=2 from this
    rank's shard; on rank 1 the single-device references and a W=1 resume from the merged shards."""
    path = os.path.join(ckpt, "optimal_w2_rank{}.pt")

    def save(step, opt):
        if step + 1 == SAVE_AT:
            torch.save(opt.state_dict(), path.format(rank))
            if rank == 0:
                torch.save(model.state_dict(), os.path.join(ckpt, "optimal_model_w2.pt"))

    model = tiny_llama()
    opt = sharded(llama_groups(model), **OPTIMAL)
    train(model, opt, rank=rank, world=world, data=llama_tokens, loss_fn=llama_loss, steps=STEPS, on_step=save)
    out = summary(model, opt)
    out["sigma_on_this_rank"] = sorted(e.index for e in opt._entries if "Sigma" in opt.state.get(e.param, {}))
    out["sigma_counts"] = sorted({st["sigma_count"] for st in opt.state.values() if "sigma_count" in st})
    dist.barrier()  # shard files complete
    model = tiny_llama(seed=123)
    model.load_state_dict(torch.load(os.path.join(ckpt, "optimal_model_w2.pt"), weights_only=True))
    opt = sharded(llama_groups(model), **OPTIMAL)
    opt.load_state_dict(torch.load(path.format(rank), weights_only=True))
    train(model, opt, rank=rank, world=world, data=llama_tokens, loss_fn=llama_loss, steps=STEPS, start=SAVE_AT)
    out["resume_w2"] = params_of(model)
    if rank == 1:
        kw = {**KW, **OPTIMAL}
        model = tiny_llama()
        opt = ReferencePlumageAdam(llama_groups(model), rank=RANK, **kw)
        out["oracle"] = params_of(train(model, opt, rank=0, world=1, data=llama_tokens, loss_fn=llama_loss, steps=STEPS))
        model = tiny_llama()
        opt = PlumageAdamW(llama_groups(model), rank=RANK, **kw)
        out["single"] = params_of(train(model, opt, rank=0, world=1, data=llama_tokens, loss_fn=llama_loss, steps=STEPS))
        out["resume_w1"] = resume_full(
            os.path.join(ckpt, "optimal_model_w2.pt"), [path.format(r) for r in range(world)],
            lambda m: PlumageAdamW(llama_groups(m), rank=RANK, **kw),
        )
    return out


def _worker_w2(rank, world, ckpt):
    out = _llama_runs(rank, world, ckpt=ckpt)
    dist.barrier()  # checkpoint files complete

    # resume on W=2 from this rank's shard: bitwise equal to the uninterrupted run
    model = tiny_llama(seed=123)
    model.load_state_dict(torch.load(os.path.join(ckpt, "model_w2.pt"), weights_only=True))
    opt = sharded(llama_groups(model))
    opt.load_state_dict(torch.load(os.path.join(ckpt, f"optim_w2_rank{rank}.pt"), weights_only=True))
    train(model, opt, rank=rank, world=world, data=llama_tokens, loss_fn=llama_loss, steps=STEPS, start=SAVE_AT)
    out["resume_w2"] = params_of(model)

    # W=1 on one-rank subgroups (every rank creates every group, in the same order)
    groups = [dist.new_group([k]) for k in range(world)]
    mine = groups[rank]
    shards = [os.path.join(ckpt, f"optim_w2_rank{r}.pt") for r in range(2)]
    if rank == 0:
        out["w1"] = _llama_runs(0, 1, group=mine)
        out["w1_wrong_world"] = wrong_world_error(shards[0], mine)
    else:
        out["refs"] = _single_device_refs(ckpt)
        out["resume_w1"] = resume_full(
            os.path.join(ckpt, "model_w2.pt"), shards, lambda m: sharded(llama_groups(m), mine), group=mine
        )
    dist.barrier()
    out["optimal"] = _optimal_runs(rank, world, ckpt)
    return out


def _small_run(model_cls, rank, world, steps=SMALL_STEPS):
    model = model_cls()
    opt = sharded(named_group(model))
    log: list = []
    train(model, opt, rank=rank, world=world, data=small_data, loss_fn=module_loss, steps=steps,
          on_step=stats_recorder(log))
    return summary(model, opt, log)


def _worker_w4(rank, world, ckpt):
    out = _llama_runs(rank, world)
    shards = [os.path.join(ckpt, f"optim_w2_rank{r}.pt") for r in range(2)]
    out["resume_w4"] = resume_full(
        os.path.join(ckpt, "model_w2.pt"), shards, lambda m: sharded(llama_groups(m)), rank=rank, world=world
    )
    out["wrong_world"] = wrong_world_error(shards[rank % 2], None)
    out["two_matrix"] = _small_run(TwoMatrix, rank, world)
    out["nograd"] = _small_run(NoGrad, rank, world)
    try:
        sharded(named_group(TwoMatrix()), strict=True)
        out["strict_error"] = "no error"
    except ValueError as exc:
        out["strict_error"] = str(exc)
    return out


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("dp_ckpt"))


@pytest.fixture(scope="module")
def w2(ckpt_dir):
    return run_workers(_worker_w2, 2, ckpt_dir)


@pytest.fixture(scope="module")
def w4(w2, ckpt_dir):  # needs the W=2 checkpoint
    return run_workers(_worker_w4, 4, ckpt_dir)


# ------------------------------------------------------------------------------------- formulas


def _oriented(shape):
    m, n = shape
    return min(m, n), max(m, n)


def plan(report: list[dict], active=None) -> dict:
    """Per-owner sums that the byte and memory formulas of docs/data_parallel.md use.

    ``active``: names of the parameters that ever had a gradient (default: all).
    """
    lowrank = [row for row in report if row["mode"] != "adamw" and (active is None or row["name"] in active)]
    dense = [row for row in report if row["mode"] == "adamw" and (active is None or row["name"] in active)]
    return {"lowrank": lowrank, "dense": dense}


def _max_owner_sum(rows, size, world) -> int:
    per = [0] * world
    for row in rows:
        per[row["owner"]] += size(row)
    return max(per) if rows else 0


def rl(row):
    return RANK * _oriented(row["shape"])[1]


def sl(row):
    s, l = _oriented(row["shape"])
    return s * l


def proj(row):
    return _oriented(row["shape"])[0] * RANK + RANK


def numel(row):
    return int(torch.Size(row["shape"]).numel())


def chunk(row, world):
    """``ceil(numel / W)``: the padded flat chunk of a dense parameter in every rank's segment."""
    return -(-numel(row) // world)


def chunk_len(row, world, rank):
    """Elements of a dense parameter held by ``rank`` (``torch.chunk`` bounds of the flat tensor)."""
    c, n = chunk(row, world), numel(row)
    return min((rank + 1) * c, n) - min(rank * c, n)


def expected_step_bytes(report, world, *, refresh: bool, clip: bool, active=None) -> dict:
    """``{tag/kind: bytes}`` this rank sends in one step (ring model, fp32), docs/data_parallel.md."""
    p = plan(report, active)
    W = world
    # one flag per parameter for "has a gradient" and one for "holds NaN/Inf"
    out = {"grad_flags/all_reduce": 2 * (W - 1) / W * 4 * 2 * len(report)}
    if p["lowrank"]:  # a category without items makes no collective
        out["lowrank_grad/reduce_scatter"] = (W - 1) * 4 * _max_owner_sum(p["lowrank"], rl, W)
        out["lowrank_update/all_gather"] = (W - 1) * 4 * _max_owner_sum(p["lowrank"], rl, W)
    if p["dense"]:  # one flat chunk of every dense parameter per rank, padded to ceil(numel / W)
        out["dense_grad/reduce_scatter"] = (W - 1) * 4 * sum(chunk(row, W) for row in p["dense"])
        out["dense_update/all_gather"] = (W - 1) * 4 * sum(chunk(row, W) for row in p["dense"])
    if refresh and p["lowrank"]:
        out["refresh_grad/reduce_scatter"] = (W - 1) * 4 * _max_owner_sum(p["lowrank"], sl, W)
        out["projector/all_gather"] = (W - 1) * 4 * _max_owner_sum(p["lowrank"], proj, W)
        out["refresh_agree/all_reduce"] = 2 * (W - 1) / W * 4  # did any owner fail its SVD?
    if clip:
        out["grad_norm/all_reduce"] = 2 * (W - 1) / W * 8
    return out


def expected_state_bytes(report, rank, world, active=None) -> dict:
    """``Σ_owned 2·r·l·4 + Σ_all (s·r + r)·4 + Σ_dense 2·chunk·4`` on ``rank``."""
    p = plan(report, active)
    assert all(row["owner"] == -1 for row in p["dense"])  # dense parameters have no owner: chunks everywhere
    moments = sum(2 * rl(row) * 4 for row in p["lowrank"] if row["owner"] == rank)
    projectors = sum(proj(row) * 4 for row in p["lowrank"])
    non_target = sum(2 * chunk_len(row, world, rank) * 4 for row in p["dense"])
    return {"projectors": projectors, "second_moment": 0, "moments": moments, "non_target": non_target,
            "total": projectors + moments + non_target}


def per_step_from_totals(log) -> list[dict]:
    """``{tag/kind: bytes}`` of each step: differences of the cumulative counters (tags called)."""
    steps, prev = [], {}
    for rec in log:
        cur = rec["total"]
        step = {}
        for k, v in cur.items():
            before = prev.get(k, {"calls": 0, "bytes": 0.0})
            if v["calls"] > before["calls"]:
                step[k] = v["bytes"] - before["bytes"]
        steps.append(step)
        prev = cur
    return steps


def _bytes_of(table: dict) -> dict:
    return {k: v["bytes"] for k, v in table.items()}


def max_abs(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ------------------------------------------------------------------------------------- tests: invariance


@pytest.mark.distributed
def test_world_size_invariance_plain(w2, w4):
    refs = w2[1]["refs"]
    assert max_abs(refs["plumage"], refs["oracle"]) <= 1e-5
    runs = {1: [w2[0]["w1"]], 2: [r for r in w2], 4: [r for r in w4]}
    for world, results in runs.items():
        for r in results:
            run = r["plain"]
            assert run["replicas_equal"], world
            # every rank holds the same parameters
            assert max_abs(run["params"], results[0]["plain"]["params"]) == 0.0, world
        got = results[0]["plain"]["params"]
        for ref in ("oracle", "plumage"):
            diff = max_abs(got, refs[ref])
            assert diff <= 1e-5, (world, ref, diff)
        # the run really moved and refreshed several times
        assert max_abs(got, params_of(tiny_llama())) > 1e-2
        steps = per_step_from_totals(results[0]["plain"]["log"])
        n_refresh = sum(1 for s in steps if "refresh_grad/reduce_scatter" in s)
        assert n_refresh == len(range(0, STEPS, TAU)) == 7


@pytest.mark.distributed
def test_world_size_invariance_accumulation_and_clipping(w2, w4):
    ref = w2[1]["refs"]["clip"]
    for world, results in {1: [w2[0]["w1"]], 2: w2, 4: w4}.items():
        run = results[0]["clip"]
        assert all(r["clip"]["replicas_equal"] for r in results)
        norms = [rec["grad_norm"] for rec in run["log"]]
        assert all(n is not None and n > 2 * CLIP for n in norms), norms  # clipping active every step
        diff = max_abs(run["params"], ref)
        assert diff <= 1e-5, (world, diff)
    # and the clip changed the trajectory (so the comparison above is not vacuous)
    assert max_abs(ref, w2[1]["refs"]["plumage"]) > 1e-3


# ------------------------------------------------------------------------------------- tests: bytes


def _check_bytes(results, world, key):
    for res in results:
        run = res[key]
        report = run["report"]
        assert [row["owner"] for row in report] == run["ownership"] == results[0][key]["ownership"]
        per_step = per_step_from_totals(run["log"])
        clip = key == "clip"
        for step, got in enumerate(per_step):
            want = expected_step_bytes(report, world, refresh=step % TAU == 0, clip=clip)
            assert got.keys() == want.keys(), (world, key, step, got.keys(), want.keys())
            for k in want:
                assert got[k] == pytest.approx(want[k], rel=1e-12, abs=0), (world, key, step, k)
        # ``last_step``, read right after step t, describes step t
        for rec in run["log"]:
            snap = _bytes_of(rec["last_step"])
            want = expected_step_bytes(report, world, refresh=rec["step"] % TAU == 0, clip=clip)
            assert snap == pytest.approx(want, rel=1e-12), (world, key, rec["step"])


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_counted_bytes_equal_formula(w2, w4, world):
    results = {2: w2, 4: w4}[world]
    _check_bytes(results, world, "plain")
    _check_bytes(results, world, "clip")
    # compression is real: lowrank traffic of an ordinary step vs a ring all-reduce of R, and vs DDP
    report = results[0]["plain"]["report"]
    lowrank = [row for row in report if row["mode"] != "adamw"]
    assert len(lowrank) == 14
    ordinary = per_step_from_totals(results[0]["plain"]["log"])[1]
    got = ordinary["lowrank_grad/reduce_scatter"] + ordinary["lowrank_update/all_gather"]
    ideal = sum(2 * (world - 1) / world * rl(row) * 4 for row in lowrank)
    ddp = sum(2 * (world - 1) / world * numel(row) * 4 for row in lowrank)
    assert ideal <= got <= 1.1 * ideal, (got, ideal)
    compression = sum(sl(row) for row in lowrank) / sum(rl(row) for row in lowrank)  # Σ s·l / Σ r·l ≈ 7.1
    assert ddp / got >= 0.9 * compression, (ddp, got, compression)
    # dense parameters (embedding, head, norms): a ring all-reduce of their gradients, whatever W
    dense = [row for row in report if row["mode"] == "adamw"]
    got = ordinary["dense_grad/reduce_scatter"] + ordinary["dense_update/all_gather"]
    ring = sum(2 * (world - 1) / world * numel(row) * 4 for row in dense)
    assert ring <= got <= 1.01 * ring, (got, ring)


@pytest.mark.distributed
def test_last_step_describes_the_step_just_taken(w2):
    """``comm_stats()["last_step"]`` read right after ``step()`` describes that step (refreshes at 0, τ, …)."""
    log = w2[0]["plain"]["log"]
    refresh_steps = [rec["step"] for rec in log if "refresh_grad/reduce_scatter" in rec["last_step"]]
    assert refresh_steps == list(range(0, STEPS, TAU)), (
        f"last_step lags one step behind: it shows the refresh collectives after steps {refresh_steps}, "
        f"expected after the refresh steps {list(range(0, STEPS, TAU))}"
    )


# ------------------------------------------------------------------------------------- tests: memory


@pytest.mark.distributed
def test_optimizer_state_is_sharded(w2, w4):
    single = w2[1]["refs"]["plumage_state_bytes"]
    for world, results in {1: [w2[0]["w1"]], 2: w2, 4: w4}.items():
        for key in ("plain", "clip"):
            per_rank = [res[key]["state_bytes"] for res in results]
            report = results[0][key]["report"]
            for r, got in enumerate(per_rank):
                assert got == expected_state_bytes(report, r, world), (world, key, r)
            assert sum(b["moments"] for b in per_rank) == single["moments"]
            assert sum(b["non_target"] for b in per_rank) == single["non_target"]
            assert all(b["projectors"] == single["projectors"] for b in per_rank)
        if world > 1:  # each rank holds about 1/W of the moments, and 1/W of the dense AdamW state
            moments = [res["plain"]["state_bytes"]["moments"] for res in results]
            assert max(moments) <= 1.1 * single["moments"] / world, moments
            dense = [res["plain"]["state_bytes"]["non_target"] for res in results]
            assert max(dense) <= 1.01 * single["non_target"] / world, dense


# ------------------------------------------------------------------------------------- tests: uneven


def _small_reference(model_cls, world, oracle=False):
    model = model_cls()
    groups = named_group(model)
    opt = ReferencePlumageAdam(groups, rank=RANK, **KW) if oracle else PlumageAdamW(groups, rank=RANK, **KW)
    train(model, opt, rank=0, world=1, data=small_data, loss_fn=module_loss, steps=SMALL_STEPS, emulate=world)
    return params_of(model), opt


@pytest.mark.distributed
def test_more_ranks_than_matrices_and_idle_rank(w4):
    runs = [res["two_matrix"] for res in w4]
    report = runs[0]["report"]
    modes = {row["name"]: row["mode"] for row in report}
    assert modes == {"a.weight": "plumage", "a.bias": "adamw", "b.weight": "plumage", "b.bias": "adamw",
                     "c.weight": "adamw"}
    c = next(row for row in report if row["name"] == "c.weight")
    assert "short side 3" in c["reason"] and "full-rank" in c["reason"]
    owners = runs[0]["ownership"]
    idle = [r for r in range(4) if r not in owners]
    assert idle, owners  # some rank owns no target matrix
    for r, run in enumerate(runs):
        assert run["replicas_equal"]
        assert run["state_bytes"] == expected_state_bytes(report, r, 4)
        if r in idle:
            assert run["state_bytes"]["moments"] == 0
        for step, got in enumerate(per_step_from_totals(run["log"])):
            want = expected_step_bytes(report, 4, refresh=step % TAU == 0, clip=False)
            assert got == pytest.approx(want, rel=1e-12), step
    for oracle in (False, True):
        ref, _ = _small_reference(TwoMatrix, 4, oracle)
        assert max_abs(runs[0]["params"], ref) <= 1e-5, oracle
    assert max_abs(runs[0]["params"], params_of(TwoMatrix())) > 1e-2


@pytest.mark.distributed
def test_parameters_without_gradients(w4):
    runs = [res["nograd"] for res in w4]
    init = params_of(NoGrad())
    names = [row["name"] for row in runs[0]["report"]]
    ref, ref_opt = _small_reference(NoGrad, 4)
    ref_oracle, _ = _small_reference(NoGrad, 4, oracle=True)
    for run in runs:
        assert run["replicas_equal"]
        got = run["params"]
        assert max_abs(got, ref) <= 1e-5 and max_abs(got, ref_oracle) <= 1e-5
        for n in ("frozen.weight", "frozen.bias", "unused.weight", "unused.bias"):
            assert torch.equal(got[n], init[n]), n  # never updated (no weight decay either)
            assert names.index(n) not in run["state_keys"], n  # no state created
        for n in ("only0.weight", "only1"):  # grad on one rank only: still updated everywhere
            assert not torch.equal(got[n], init[n]), n
    # the state holds exactly the parameters that had a gradient somewhere
    active = {"a.weight", "a.bias", "only0.weight", "only1"}
    for r, run in enumerate(runs):
        assert run["state_bytes"] == expected_state_bytes(run["report"], r, 4, active)
        for step, got in enumerate(per_step_from_totals(run["log"])):
            want = expected_step_bytes(run["report"], 4, refresh=step % TAU == 0, clip=False, active=active)
            assert got == pytest.approx(want, rel=1e-12), step
    assert sum(run["state_bytes"]["moments"] for run in runs) == ref_opt.state_bytes()["moments"]


@pytest.mark.distributed
def test_strict_names_the_matrix(w4):
    for res in w4:
        pinned = r"Matrix 'c\.weight' cannot take the low-rank path \(strict=True\): rank=4 >= short side 3"
        assert re.match(pinned, res["strict_error"]), res["strict_error"]


# ------------------------------------------------------------------------------------- tests: checkpoints


@pytest.mark.distributed
def test_checkpoint_resume(w2, w4):
    full = w2[0]["plain"]["params"]  # uninterrupted W=2 run
    for res in w2:
        got = res["resume_w2"]
        assert all(torch.equal(got[n], full[n]) for n in full), "W=2 → W=2 resume is not bitwise"
    for name, got in (("W=1 sharded", w2[1]["resume_w1"]), ("W=1 PlumageAdamW", w2[1]["refs"]["resume_plain_w1"]),
                      *((f"W=4 rank {r}", res["resume_w4"]) for r, res in enumerate(w4))):
        diff = max_abs(got, full)
        assert diff <= 1e-6, (name, diff)


@pytest.mark.distributed
def test_optimal_matches_single_device_and_resumes(w2, ckpt_dir):
    """``estimator="optimal"`` with ``Σ`` kept compact (``sigma_rank``): W=2 follows the oracle and
    ``PlumageAdamW``; ``Σ`` lives on the owner only (in memory and in the saved shards, where it is
    float64 ``(s, r+1)``); resume W=2 → W=2 bitwise, W=2 → W=1 via
    ``merge_shards`` within 1e-6."""
    runs = [res["optimal"] for res in w2]
    refs = runs[1]
    assert max_abs(refs["single"], refs["oracle"]) <= 1e-5
    assert runs[0]["replicas_equal"] and max_abs(runs[0]["params"], runs[1]["params"]) == 0.0
    assert max_abs(runs[0]["params"], refs["single"]) <= 1e-5
    owners = runs[0]["ownership"]
    targets = [i for i, row in enumerate(runs[0]["report"]) if row["mode"] == "optimal"]
    for rank, run in enumerate(runs):
        assert run["sigma_on_this_rank"] == [i for i in targets if owners[i] == rank]
        assert run["sigma_counts"] == [len(range(0, STEPS, TAU))]  # one Gram per refresh
        assert run["state_bytes"]["second_moment"] == sum(
            8 * _oriented(row["shape"])[0] * (RANK + 1) for row in plan(run["report"])["lowrank"] if row["owner"] == rank
        )
        sd = torch.load(os.path.join(ckpt_dir, f"optimal_w2_rank{rank}.pt"), weights_only=True)
        for index, st in sd["state"].items():
            assert ("Sigma" in st) == ("sigma_count" in st) == (index in targets and owners[index] == rank), index
            assert "Sigma" not in st or (st["Sigma"].dtype == torch.float64 and st["Sigma"].shape[1] == RANK + 1
                                         and st["sigma_count"] == 3)
    full = runs[0]["params"]
    for run in runs:
        assert all(torch.equal(run["resume_w2"][n], full[n]) for n in full), "W=2 → W=2 resume is not bitwise"
    assert max_abs(refs["resume_w1"], full) <= 1e-6


@pytest.mark.distributed
def test_unmerged_shard_on_other_world_size_raises(w2, w4):
    pinned = (
        r"^Invalid state_dict: a shard saved for world_size=2 with a different ownership plan; "
        r"merge all shards with plumage_ds\.optim\.merge_shards\(\.\.\.\) and load the result$"
    )
    for msg in [w2[0]["w1_wrong_world"]] + [res["wrong_world"] for res in w4]:
        assert re.match(pinned, msg), msg


@pytest.mark.distributed
def test_checkpoint_files_load_weights_only(w2, ckpt_dir):
    for r in range(2):
        sd = torch.load(os.path.join(ckpt_dir, f"optim_w2_rank{r}.pt"), weights_only=True)
        assert sd["plumage"]["world_size"] == 2 and sd["plumage"]["rank"] == r
        owners = sd["plumage"]["ownership"]
        for index, st in sd["state"].items():
            # target moments only on the owner; dense parameters (owner -1): a flat chunk on every rank
            assert ("exp_avg" in st) == (owners[index] in (-1, r)), index
            if owners[index] == -1:
                assert st["exp_avg"].dim() == 1
