#!/usr/bin/env python
"""Data-parallel benchmark: ``ShardedPlumageAdamW`` vs DDP + ``AdamW`` vs DDP + ``PlumageAdamW``.

    PYTHONPATH=. python benchmarks/bench_data_parallel.py            # W = 2, 4 and 8, ~10 min on 2 cores

Same run for every method and world size: a tiny LLaMA (``transformers.LlamaConfig``: hidden 128,
intermediate 344, 4 layers, 4 heads, vocabulary 256, fp32), the embedded byte-level corpus,
sequence 64, global batch 16 windows (each of the ``W`` spawned gloo ranks runs its slice),
30 steps, ``τ = 10``, rank ``r = 16`` on every attention/MLP matrix, lr 1e-3.

Measured, per rank (the table shows the maximum over ranks where ranks differ):

* **bytes/step**: gradient-related bytes this rank sends per step under the ring model of
  :mod:`plumage_ds.distributed.comm`, averaged over all 30 steps (so the 3 refresh steps are
  amortised). ShardedPlumageAdamW: its own accounting layer (every tag: ``grad_flags``,
  ``lowrank_grad``, ``lowrank_update``, ``dense_grad``, ``dense_update``, ``refresh_grad``,
  ``projector``). DDP: a comm hook wraps the stock ``allreduce_hook`` and counts
  ``2·(W−1)/W·S`` for every bucket buffer of ``S`` bytes it all-reduces (measured from the
  buckets DDP actually hands the hook, including its bucket rebuild after step 1).
* **optimizer state**: bytes of the tensors in the optimizer's state on this rank
  (``state_bytes()`` for the PLUMAGE optimizers; every tensor in ``optimizer.state`` for AdamW).
* **step time**: wall time of forward + backward + ``step()``; per step the maximum over ranks
  (the slowest rank sets the pace), mean over steps 1–29 (step 0 is warm-up), refreshes included.

A second table compares ShardedPlumageAdamW with its floors: bytes per step against
``(Σ r·l + dense)/(Σ m·n + dense)`` of DDP's (the compressed targets and every dense gradient
through a ring all-reduce), with the measured ordinary and refresh steps amortised over
``--tau-amortised`` (200); optimizer state per rank (max over ranks) against
``P, d`` (replicated) ``+ (target moments + dense AdamW moments)/W``.

On a 2-core machine the 4- and 8-rank runs oversubscribe the cores (1 thread per rank), so times there
measure contention as much as the methods; bytes and memory do not depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

warnings.filterwarnings("ignore", category=FutureWarning)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

MODEL = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=64, vocab_size=256)
SEQ, GLOBAL_BATCH, LR = 64, 16, 1e-3
TARGETS = r"self_attn|mlp"
METHODS = ("sharded", "ddp_adamw", "ddp_plumage")
LABELS = {
    "sharded": "ShardedPlumageAdamW (no DDP)",
    "ddp_adamw": "DDP + torch.optim.AdamW",
    "ddp_plumage": "DDP + PlumageAdamW (replicated)",
}


class CountingAllreduce:
    """DDP comm hook state: counts ring all-reduce bytes of every bucket, then all-reduces it."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.bytes = 0.0
        self.calls = 0

    @staticmethod
    def hook(state: "CountingAllreduce", bucket):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        buf = bucket.buffer()
        state.bytes += 2.0 * (state.world - 1) / state.world * buf.numel() * buf.element_size()
        state.calls += 1
        return allreduce_hook(None, bucket)


def _tensor_state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t))


def _run_method(method: str, rank: int, world: int, args) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from plumage_ds.config import DataConfig, ModelConfig
    from plumage_ds.optim import ShardedPlumageAdamW
    from plumage_ds.distributed.comm import summed_bytes
    from plumage_ds.optim import PlumageAdamW, lowrank_param_groups
    from plumage_ds.train.data import BatchStream, load_corpus, rank_slice
    from plumage_ds.train.model import build_model, causal_lm_loss

    data_cfg = DataConfig(seq_len=SEQ, batch_size=GLOBAL_BATCH, max_corpus_bytes=400_000)
    stream = BatchStream(load_corpus(data_cfg), data_cfg, seed=0)
    model = build_model(ModelConfig(fields=MODEL), seq_len=SEQ, seed=0)
    lowrank_kw = dict(lr=LR, rank=args.rank, update_interval=args.tau, estimator="plumage", seed=0)
    counter = None
    if method == "sharded":
        groups, _ = lowrank_param_groups(model, target_modules=[TARGETS], rank=args.rank)
        opt = ShardedPlumageAdamW(groups, **lowrank_kw)
        fwd = model
    else:
        fwd = DDP(model)
        counter = CountingAllreduce(world)
        fwd.register_comm_hook(counter, CountingAllreduce.hook)
        if method == "ddp_adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
        else:
            groups, _ = lowrank_param_groups(model, target_modules=[TARGETS], rank=args.rank)
            opt = PlumageAdamW(groups, **lowrank_kw)

    times, sent, losses = [], [], []
    prev = 0.0
    for step in range(args.steps):
        x = rank_slice(stream.global_batch(step, GLOBAL_BATCH), rank, world)
        dist.barrier()
        t0 = time.perf_counter()
        loss = causal_lm_loss(fwd, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
        times.append(float(dt))
        total = summed_bytes(opt.comm_stats()["total"]) if method == "sharded" else counter.bytes
        sent.append(total - prev)
        prev = total
        global_loss = loss.detach().reshape(1) / world
        dist.all_reduce(global_loss)  # mean over ranks = loss of the global batch (not counted)
        losses.append(global_loss.item())

    out = {
        "bytes_per_step": sum(sent) / len(sent),
        "bytes_steps": sent,
        "state_bytes": opt.state_bytes()["total"] if hasattr(opt, "state_bytes") else _tensor_state_bytes(opt),
        "step_ms": 1e3 * statistics.fmean(times[1:]),
        "step_ms_median": 1e3 * statistics.median(times[1:]),
        "final_loss": losses[-1],
    }
    if method == "sharded":
        report = opt.matrix_report()
        targets = [row for row in report if row["mode"] != "adamw"]
        out["target_numel"] = sum(math.prod(row["shape"]) for row in targets)
        out["n_targets"] = len(targets)
        out["n_params"] = sum(p.numel() for p in model.parameters())
        out["state_parts"] = opt.state_bytes()
        tags = opt.comm_stats()["total"]
        out["lowrank_bytes"] = summed_bytes(tags, "lowrank_") / args.steps
        out["refresh_bytes"] = (summed_bytes(tags, "refresh_grad") + summed_bytes(tags, "projector")) / args.steps
        out["sum_rl"] = sum(args.rank * max(row["shape"]) for row in targets)
        out["projector_bytes"] = sum((min(row["shape"]) * args.rank + args.rank) * 4 for row in targets)
    else:
        out["ddp_calls_per_step"] = counter.calls / args.steps
    del fwd, opt, model
    return out


def _worker(rank: int, world: int, args) -> dict:
    return {m: _run_method(m, rank, world, args) for m in METHODS}


def _fmt_bytes(b: float) -> str:
    return f"{b / 1024:,.1f} KiB" if b < 1024**2 else f"{b / 1024**2:,.2f} MiB"


def _amortised(sent: list[float], tau_run: int, tau: int) -> tuple[float, float, float]:
    """(ordinary mean, refresh mean, amortised over ``tau``) of per-step bytes; step 0 excluded (first use)."""
    ordinary = [b for k, b in enumerate(sent) if k > 0 and k % tau_run != 0]
    refresh = [b for k, b in enumerate(sent) if k > 0 and k % tau_run == 0] or [sent[0]]
    o, r = statistics.fmean(ordinary), statistics.fmean(refresh)
    return o, r, o + (r - o) / tau


def floor_table(results: dict, args) -> str:
    tau = args.tau_amortised
    lines = [
        f"ShardedPlumageAdamW against its floors (bytes amortised at τ = {tau}: mean ordinary step + (refresh − "
        f"ordinary)/{tau}; state: max over ranks)",
        "",
        "| W | bytes/step ord. | refresh step | amortised τ=200 | vs DDP | floor | vs floor | state/rank | state floor | vs floor |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for world, per_rank in results.items():
        s = per_rank[0]["sharded"]
        o, r, a = (max(v) for v in zip(*(_amortised(x["sharded"]["bytes_steps"], args.tau, tau) for x in per_rank)))
        ddp = max(_amortised(x["ddp_adamw"]["bytes_steps"], args.tau, tau)[0] for x in per_rank)
        dense = s["n_params"] - s["target_numel"]
        floor = (s["sum_rl"] + dense) / (s["target_numel"] + dense)
        state = max(x["sharded"]["state_bytes"] for x in per_rank)
        state_floor = s["projector_bytes"] + (2 * s["sum_rl"] * 4 + 2 * dense * 4) / world
        lines.append(
            f"| {world} | {_fmt_bytes(o)} | {_fmt_bytes(r)} | {_fmt_bytes(a)} | {a / ddp:.3f} | {floor:.3f} "
            f"| {a / ddp / floor:.3f} | {_fmt_bytes(state)} | {_fmt_bytes(state_floor)} | {state / state_floor:.3f} |"
        )
    return "\n".join(lines)


def table(results: dict, args) -> str:
    lines = [
        f"steps={args.steps}, τ={args.tau}, r={args.rank}, global batch {GLOBAL_BATCH}×{SEQ}, "
        f"model {MODEL['num_hidden_layers']}×{MODEL['hidden_size']} (intermediate {MODEL['intermediate_size']})",
        "",
        "| W | method | bytes/step/rank | vs DDP+AdamW | optimizer state/rank (max) | vs DDP+AdamW "
        "| step time (ms) | vs DDP+AdamW | final loss (global batch) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for world, per_rank in results.items():
        agg = {}
        for m in METHODS:
            rows = [r[m] for r in per_rank]
            agg[m] = {
                "bytes": max(r["bytes_per_step"] for r in rows),
                "state": max(r["state_bytes"] for r in rows),
                "ms": rows[0]["step_ms"],
                "loss": rows[0]["final_loss"],
            }
        base = agg["ddp_adamw"]
        for m in METHODS:
            a = agg[m]
            lines.append(
                f"| {world} | {LABELS[m]} | {_fmt_bytes(a['bytes'])} | {a['bytes'] / base['bytes']:.3f} "
                f"| {_fmt_bytes(a['state'])} | {a['state'] / base['state']:.3f} | {a['ms']:.1f} "
                f"| {a['ms'] / base['ms']:.2f} | {a['loss']:.4f} |"
            )
    lines.append("")
    for world, per_rank in results.items():
        s = per_rank[0]["sharded"]
        ddp = per_rank[0]["ddp_adamw"]
        ddp_targets = 2.0 * (world - 1) / world * s["target_numel"] * 4
        moments = [r["sharded"]["state_parts"]["moments"] for r in per_rank]
        lines.append(
            f"- W={world}: target matrices only ({s['n_targets']} matrices, {s['target_numel']:,} of "
            f"{s['n_params']:,} params): compressed traffic {_fmt_bytes(s['lowrank_bytes'])}/step vs DDP's "
            f"{_fmt_bytes(ddp_targets)} for them ({ddp_targets / s['lowrank_bytes']:.2f}× fewer); refresh traffic "
            f"amortised over τ: {_fmt_bytes(s['refresh_bytes'])}/step; moments per rank "
            f"{', '.join(_fmt_bytes(b) for b in moments)}; DDP calls/step {ddp['ddp_calls_per_step']:.1f}."
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--tau-amortised", type=int, default=200, help="τ of the amortised bytes in the floor table")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--tau", type=int, default=10)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--json", default=None, help="also write the raw per-rank results here")
    args = p.parse_args(argv)
    from plumage_ds.testing import run_workers

    results = {}
    for world in args.worlds:
        t0 = time.perf_counter()
        results[world] = run_workers(_worker, world, args)
        print(f"# W={world}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print(table(results, args))
    print()
    print(floor_table(results, args))
    if args.json:
        Path(args.json).write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
