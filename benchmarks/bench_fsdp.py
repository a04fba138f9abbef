#!/usr/bin/env python
"""FSDP2 / HSDP benchmark at W = 4: AdamW vs PLUMAGE, per-rank state, bytes per mesh dimension, step time.

    PYTHONPATH=. python benchmarks/bench_fsdp.py               # ~4 min on 2 cores

Four setups, one spawned 4-rank gloo job each (1 thread per rank), the same LLaMA-shaped model
(hidden 256, intermediate 688, 4 layers, 8 heads, vocabulary 4096, fp32; ``fully_shard`` per
decoder layer and the root), the same global batch (16 windows of 64 random tokens), 12 steps,
rank ``r = 32`` (s/8) on every attention/MLP matrix, ``τ = 4`` (3 refreshes):

* ``fsdp2_adamw``: FSDP2 over 4 ranks + ``torch.optim.AdamW``;
* ``fsdp2_plumage``: FSDP2 over 4 ranks + ``PlumageAdamW`` (state sharded like the weights);
* ``hsdp_adamw``: plain HSDP 2 x 2 (FSDP all-reduces gradients across replicas) + AdamW;
* ``hsdp_plumage``: compressed HSDP 2 x 2 (FSDP on the shard sub-mesh, the optimizer all-reduces
  compressed projections across replicas) + ``PlumageAdamW``.

Measured on every rank (the table shows the maximum over ranks):

* **optimizer state**: bytes of this rank's state tensors (local shards);
* **bytes/step per mesh dimension**: every collective of the step — FSDP's own all-gathers and
  reduce-scatters and the optimizer's — counted where it is issued (the ``torch.distributed``
  functions are wrapped before anything imports them), in the ring model of
  :mod:`plumage_ds.distributed.comm`, attributed to the shard or the replicate group; reported
  for ordinary steps and amortised over ``--tau`` (default 200) from the measured ordinary and
  refresh steps;
* **step time**: forward + backward + ``step()``, maximum over ranks, median over steps 1–11.

On a 2-core machine 4 ranks oversubscribe the cores, so times measure contention as much as the
methods; bytes and memory do not depend on the machine.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist

# --- count every collective (FSDP's and ours) before plumage_ds binds the functions -------------
_COUNTS: dict = defaultdict(float)
_FACTOR = {
    "all_gather_single": lambda w, i, o: (w - 1) / w * o,
    "all_gather_into_tensor": lambda w, i, o: (w - 1) / w * o,
    "reduce_scatter_single": lambda w, i, o: (w - 1) / w * i,
    "reduce_scatter_tensor": lambda w, i, o: (w - 1) / w * i,
    "all_reduce": lambda w, i, o: 2 * (w - 1) / w * i,
}


def _counting(name, fn):
    sig = inspect.signature(fn)

    def wrapped(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        a = list(bound.arguments.values())
        group = bound.arguments.get("group")
        w = dist.get_world_size(group)
        out, inp = (a[0], a[0]) if name == "all_reduce" else (a[0], a[1])
        _COUNTS[(id(group) if group is not None else None, w)] += _FACTOR[name](
            w, inp.numel() * inp.element_size(), out.numel() * out.element_size()
        )
        return fn(*args, **kwargs)

    return wrapped


for _name in _FACTOR:
    if hasattr(dist, _name):
        setattr(dist, _name, _counting(_name, getattr(dist, _name)))

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore", category=FutureWarning)

from plumage_ds import PlumageAdamW, lowrank_param_groups  # noqa: E402
from plumage_ds.integrations.fsdp import hsdp_mesh, shard_model  # noqa: E402
from plumage_ds.testing import lm_loss, run_workers, tiny_llama, token_batch  # noqa: E402

MODEL = dict(vocab=4096, hidden=256, intermediate=688, layers=4, heads=8, kv_heads=8)
SEQ, BATCH, STEPS, TAU, RANK, LR = 64, 16, 12, 4, 32, 1e-3
SETUPS = ("fsdp2_adamw", "fsdp2_plumage", "hsdp_adamw", "hsdp_plumage")


def _state_bytes(opt) -> int:
    if hasattr(opt, "state_bytes"):
        return opt.state_bytes()["total"]
    return sum((t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size()
               for st in opt.state.values() for t in st.values() if torch.is_tensor(t))


def worker(rank: int, world: int, setup: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    model = tiny_llama(**MODEL)
    plumage = setup.endswith("plumage")
    groups_of = {}
    if setup.startswith("fsdp2"):
        mesh = init_device_mesh("cpu", (world,))
        shard_model(model, mesh)
        groups_of = {id(mesh.get_group(0)): "shard"}
        kw = {}
    else:
        mesh = hsdp_mesh(2, world // 2, "cpu")
        shard_model(model, mesh["shard"] if plumage else mesh)
        groups_of = {id(mesh["shard"].get_group()): "shard", id(mesh["replicate"].get_group()): "replicate"}
        kw = {"replicate_group": mesh["replicate"].get_group()} if plumage else {}
    if plumage:
        groups, _ = lowrank_param_groups(model, target_modules=[r"self_attn|mlp"], rank=RANK)
        opt = PlumageAdamW(groups, lr=LR, update_interval=TAU, **kw)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
    per = BATCH // world
    times, steps = [], []
    for step in range(STEPS):
        x = token_batch(step, BATCH, seq=SEQ, vocab=MODEL["vocab"])[rank * per : (rank + 1) * per]
        _COUNTS.clear()
        t0 = time.perf_counter()
        opt.zero_grad()
        lm_loss(model, x).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        by_dim: dict = defaultdict(float)
        for (gid, w), b in _COUNTS.items():
            if w > 1:
                by_dim[groups_of.get(gid, "shard" if w == world else "other")] += b
        steps.append(dict(by_dim))
    tags = None
    if plumage and kw:  # the optimizer's own accounting of the replicate group, per tag, last ordinary step
        tags = {k: v["bytes"] for k, v in opt.comm_stats()["replicate"]["last_step"].items()}
    targets = [p for g in opt.param_groups if g.get("lowrank") for p in g["params"]] if plumage else []
    return {"state": _state_bytes(opt), "steps": steps, "times": times, "tags": tags,
            "params": sum(p.numel() for p in model.parameters()),
            "target_local_numel": sum(p.to_local().numel() for p in targets)}


def _per_step(res: list[dict], dim: str, refresh: bool) -> float:
    """Max over ranks of the mean bytes per step on ``dim``, over refresh or ordinary steps."""
    picked = [s for s in range(STEPS) if (s % TAU == 0) == refresh]
    return max(statistics.mean(r["steps"][s].get(dim, 0.0) for s in picked) for r in res)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--tau", type=int, default=200, help="refresh interval to amortise the measured refresh steps over")
    args = ap.parse_args()
    rows, raw = {}, {}
    for setup in SETUPS:
        res = raw[setup] = run_workers(worker, args.world, setup)
        step_max = [max(r["times"][s] for r in res) for s in range(1, STEPS)]
        row = {"state": max(r["state"] for r in res), "time": statistics.median(step_max), "params": res[0]["params"]}
        for dim in ("shard", "replicate"):
            ordinary, refresh = _per_step(res, dim, False), _per_step(res, dim, True)
            row[dim] = ordinary
            row[dim + "_amortised"] = ((args.tau - 1) * ordinary + refresh) / args.tau
        rows[setup] = row
    print(f"W = {args.world}, {rows['fsdp2_adamw']['params'] / 1e6:.2f}M parameters, r = {RANK}, "
          f"refresh every {TAU} of {STEPS} measured steps\n")
    print("bytes/step: every collective of the step (FSDP's and the optimizer's), ring model, max over ranks;")
    print(f"'ord.' = ordinary steps, 'tau={args.tau}' = measured ordinary and refresh steps amortised over tau\n")
    head = (f"{'setup':<14} {'state/rank':>11} {'x':>6} {'shard ord.':>12} {'shard tau':>12} {'repl. ord.':>12} "
            f"{'repl. tau':>12} {'step s':>7} {'x':>6}")
    print(head)
    for name, r in rows.items():
        ref = rows["fsdp2_adamw" if name.startswith("fsdp2") else "hsdp_adamw"]
        print(f"{name:<14} {r['state']:>11,d} {r['state'] / ref['state']:>6.3f} {r['shard']:>12,.0f} "
              f"{r['shard_amortised']:>12,.0f} {r['replicate']:>12,.0f} {r['replicate_amortised']:>12,.0f} "
              f"{r['time']:>7.3f} {r['time'] / ref['time']:>6.3f}")
    hr, ha = rows["hsdp_plumage"], rows["hsdp_adamw"]
    print(f"\nreplicate-group bytes, compressed / plain HSDP: ordinary {hr['replicate'] / ha['replicate']:.3f}, "
          f"tau={args.tau} {hr['replicate_amortised'] / ha['replicate_amortised']:.3f}")
    R = 2
    for r in raw["hsdp_plumage"][:1]:
        tags = r["tags"]
        plain_targets = 2 * (R - 1) / R * 4 * r["target_local_numel"]
        print(f"target matrices on the replicate group, ordinary step (rank 0): compressed {tags['lowrank_grad/all_reduce']:,.0f} B "
              f"vs {plain_targets:,.0f} B uncompressed = {tags['lowrank_grad/all_reduce'] / plain_targets:.3f} (r/s = {RANK / MODEL['hidden']:.3f}); "
              f"non-targets {tags.get('dense_grad/all_reduce', 0):,.0f} B")


if __name__ == "__main__":
    main()
