"""Gradient-communication compression under plain DDP + AdamW: bytes, step time, loss.

Same tiny LLaMA, same data (the embedded stdlib byte corpus), same steps and seed, 2 gloo
CPU ranks; the variants train side by side in the same processes, taking turns step by step
(so a busy machine slows them alike):

* ``allreduce`` — torch's stock ``allreduce_hook`` (what DDP does without a hook);
* ``powersgd``  — torch's ``powerSGD_hook`` (error feedback + warm start), its rank chosen so
  its compressed matrices send about as many bytes as ours;
* ``haar``      — :func:`plumage_ds.distributed.comm_hook.plumage_hook`, Haar–Stiefel;
* ``plumage``   — the same hook, PLUMAGE (owner SVD every ``tau`` steps + broadcast);
  ``plumage:10`` the same with ``tau = 10``.

All variants use one DDP bucket (``bucket_cap_mb`` large): the stock PowerSGD hook hangs on
gloo with more than one bucket (docs/comm_hook.md). Bytes are *counted*: our hook through
``Collectives``; torch's hooks by wrapping ``torch.distributed.all_reduce`` during backward
(ring model ``2(W−1)/W · payload``, the same as ``Collectives``).

    PYTHONPATH=. python benchmarks/bench_comm_hook.py            # ≈ 2–4 min on 2 cores

Not a test: it prints a markdown table (and ``--json PATH`` writes the raw numbers).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plumage_ds.config import DataConfig, ModelConfig  # noqa: E402
from plumage_ds.testing import run_workers  # noqa: E402

VARIANTS = ("allreduce", "powersgd", "haar", "plumage", "plumage:10")
# ``powersgd`` gets the rank whose bytes match ``--rank`` in fp32; ``powersgd:rank=N`` sets it.
"""``plumage:T`` is PLUMAGE with refresh interval ``T`` instead of ``--tau``; ``plumage:T:E`` also
sets ``uniform_mix=E``. The general form is ``ESTIMATOR:key=value,...`` with keys of
:data:`HOOK_KEYS` (e.g. ``plumage:rank=32,quantize=int8,resample=1``: 4× the rank in int8, redrawn
every step — the same bytes as ``plumage`` at ``--rank 8`` in fp32)."""

HOOK_KEYS = {
    "rank": ("rank", int),
    "tau": ("update_interval", int),
    "mix": ("uniform_mix", float),
    "kappa": ("kappa", int),  # Haar: redraw interval; with resample=1: steps between redraws of S
    "quantize": ("quantize", str),
    "resample": ("resample", lambda v: bool(int(v))),
    "sigma_weight": ("sigma_weight", float),
    "async": ("async_comm", lambda v: bool(int(v))),  # async=1: the Future-chained path (NCCL's default) on gloo
}


def hook_kwargs(variant: str, args: dict) -> dict:
    """``PlumageHookState`` keyword arguments (the one config schema) of a variant name (see :data:`VARIANTS`).

    Haar draws a fresh ``P`` every step unless ``kappa`` says otherwise (its redraw interval is the
    schema's ``update_interval``); ``resample=1`` redraws ``S`` every ``kappa`` steps
    (``comm_hook.resample_interval``).
    """
    estimator, _, rest = variant.partition(":")
    kw = dict(estimator=estimator, rank=args["rank"], update_interval=args["tau"], kappa=1, uniform_mix=0.0,
              target_modules=HOOK_TARGETS[args["hook_targets"]])
    if "=" in rest:
        for item in rest.split(","):
            key, _, value = item.partition("=")
            if key not in HOOK_KEYS:
                raise ValueError(f"Invalid variant {variant!r}: unknown key {key!r}; keys: {sorted(HOOK_KEYS)}")
            name, conv = HOOK_KEYS[key]
            kw[name] = conv(value)
    elif rest:
        tau, _, mix = rest.partition(":")
        kw["update_interval"] = int(tau)
        if mix:
            kw["uniform_mix"] = float(mix)
    kappa = kw.pop("kappa")
    if estimator == "haar":
        kw["update_interval"] = kappa
    if kw.pop("resample", False):
        kw["resample_interval"] = kappa
    return kw


# ``--hook-targets``: ``all`` compresses every matrix, embedding and LM head included, as torch's
# PowerSGD hook does (the equal-bytes comparison); ``default`` is the optimizers' selection (attention
# and MLP matrices only: the embedding and head go uncompressed, so far more bytes than PowerSGD).
HOOK_TARGETS = {"all": [r".*"], "default": None}

_COUNT = {"on": False, "bytes": 0.0, "calls": 0}


def _counting_all_reduce(orig):
    def wrapper(tensor, *args, **kwargs):
        if _COUNT["on"]:
            w = dist.get_world_size()
            _COUNT["bytes"] += 2.0 * (w - 1) / w * tensor.numel() * tensor.element_size()
            _COUNT["calls"] += 1
        return orig(tensor, *args, **kwargs)

    return wrapper


def _matrix_shapes(model, rank: int, min_rate: float) -> list[tuple[int, int]]:
    """``(m, n)`` of every matrix our hook compresses with ``--hook-targets all`` (PowerSGD's rank is matched on them)."""
    out = []
    for p in model.parameters():
        if p.dim() >= 2:
            m, n = p.shape[0], p.numel() // p.shape[0]
            s = min(m, n)
            if s / min(rank, s) >= min_rate:
                out.append((m, n))
    return out


def powersgd_rank(shapes, rank: int) -> int:
    """PowerSGD rank sending about our bytes: ``Σ (m+n)·r_p ≈ Σ r·max(m, n)``."""
    ours = sum(rank * max(m, n) for m, n in shapes)
    per_rank = sum(m + n for m, n in shapes)
    return max(1, round(ours / per_rank))


def _worker(rank, world, args):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook as psgd

    from plumage_ds.distributed.comm_hook import PlumageHookState, plumage_hook
    from plumage_ds.train.data import BatchStream, load_corpus
    from plumage_ds.train.model import build_model, causal_lm_loss

    dist.all_reduce = _counting_all_reduce(dist.all_reduce)
    mcfg = ModelConfig(fields=dict(
        hidden_size=args["hidden"],
        intermediate_size=args["intermediate"],
        num_hidden_layers=args["layers"],
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=args["seq_len"],
    ))
    dcfg = DataConfig(seq_len=args["seq_len"], batch_size=args["batch"], max_corpus_bytes=2_000_000)
    stream = BatchStream(load_corpus(dcfg), dcfg, seed=args["seed"])
    eval_set = stream.eval_set(args["eval_batches"])
    runs = {}
    for variant in args["variants"]:
        model = build_model(mcfg, seq_len=args["seq_len"], seed=args["seed"])
        ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=1024)
        state = None
        if variant == "allreduce":
            ddp.register_comm_hook(None, default_hooks.allreduce_hook)
        elif variant.partition(":")[0] == "powersgd":
            shapes = _matrix_shapes(model, args["rank"], 2.0)
            rest = variant.partition(":")[2]  # "powersgd:rank=N" sets PowerSGD's rank explicitly
            state = psgd.PowerSGDState(
                process_group=None,
                matrix_approximation_rank=int(rest.removeprefix("rank=")) if rest else powersgd_rank(shapes, args["rank"]),
                start_powerSGD_iter=max(2, args["warmup"]),
                min_compression_rate=2,
                use_error_feedback=True,
                warm_start=True,
                random_seed=args["seed"],
            )
            ddp.register_comm_hook(state, psgd.powerSGD_hook)
        else:
            state = PlumageHookState(ddp, start_iter=args["warmup"], seed=args["seed"], **hook_kwargs(variant, args))
            ddp.register_comm_hook(state, plumage_hook)
        opt = torch.optim.AdamW(model.parameters(), lr=args["lr"], weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args["warmup"]))
        runs[variant] = dict(model=model, ddp=ddp, state=state, opt=opt, sched=sched, losses=[], times=[], bytes=[],
                             calls=[])  # fmt: skip

    # Variants take turns step by step (rotating the order), so load on the machine hits all alike.
    names = list(runs)
    for step in range(args["steps"]):
        (x,) = stream.micro_batches(step, 1, rank=rank, world_size=world)
        k = step % len(names)
        for variant in names[k:] + names[:k]:
            run = runs[variant]
            dist.barrier()
            t0 = time.perf_counter()
            _COUNT["on"], _COUNT["bytes"], _COUNT["calls"] = True, 0.0, 0
            loss = causal_lm_loss(run["ddp"], x)
            loss.backward()
            _COUNT["on"] = False
            run["opt"].step()
            run["sched"].step()
            run["opt"].zero_grad(set_to_none=True)
            run["times"].append(time.perf_counter() - t0)
            run["losses"].append(loss.item())
            state = run["state"]
            if isinstance(state, PlumageHookState):
                last = state.comm_stats()["last_step"].values()
                run["bytes"].append(sum(v["bytes"] for v in last))
                run["calls"].append(sum(v["calls"] for v in last))  # every collective (broadcasts too)
            else:
                run["bytes"].append(_COUNT["bytes"])
                run["calls"].append(_COUNT["calls"])

    results = {}
    for variant, run in runs.items():
        eval_loss = None
        if rank == 0:
            with torch.no_grad():
                run["model"].eval()
                eval_loss = sum(causal_lm_loss(run["model"], b).item() for b in eval_set) / len(eval_set)
        tail = torch.tensor(run["losses"][-args["tail"] :]).mean().reshape(1)
        dist.all_reduce(tail)  # not counted: outside backward
        state = run["state"]
        results[variant] = {
            "bytes_per_step": statistics.fmean(run["bytes"][args["warmup"] :]),
            "bytes_first_steps": run["bytes"][0],
            "calls_per_step": statistics.fmean(run["calls"][args["warmup"] :]),
            "step_time_s": statistics.median(run["times"][args["warmup"] :]),
            "train_loss": float(tail) / world,
            "eval_loss": eval_loss,
            "powersgd_rank": state.matrix_approximation_rank if variant.startswith("powersgd") else None,
            "finite": all(math.isfinite(v) for v in run["losses"]),
        }
    for run in runs.values():
        run.clear()
    gc.collect()
    dist.barrier()
    return results


def table(res: dict, args: dict) -> str:
    base = res["allreduce"]
    lines = [
        "| variant | bytes/step (after warm-up) | vs all-reduce | collectives/step | step time (median) | time ratio "
        f"| train loss (last {args['tail']}) | eval loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in res.items():
        estimator = name.partition(":")[0]
        if estimator == "powersgd":
            label = f"powersgd (rank {r['powersgd_rank']}, EF)"
        elif estimator == "allreduce":
            label = estimator
        else:
            kw = hook_kwargs(name, args)
            label = f"{estimator} (r={kw['rank']}" + (f", τ={kw['update_interval']}" if estimator != "haar" else "")
            label += f", ε={kw['uniform_mix']:g}" if kw["uniform_mix"] else ""
            label += f", {kw['quantize']}" if kw.get("quantize") else ""
            label += ", redrawn every step" if kw.get("resample_interval") or estimator == "haar" else ""
            label += ", async" if kw.get("async_comm") else ""
            label += ")"
        lines.append(
            f"| {label} | {r['bytes_per_step'] / 1024:.1f} KiB | {base['bytes_per_step'] / r['bytes_per_step']:.2f}× fewer "
            f"| {r['calls_per_step']:.2f} | {r['step_time_s'] * 1e3:.1f} ms | {r['step_time_s'] / base['step_time_s']:.2f} "
            f"| {r['train_loss']:.4f} | {r['eval_loss']:.4f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=10, help="uncompressed steps (all hooks) and LR warm-up")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--tau", type=int, default=50)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--intermediate", type=int, default=172)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8, help="windows per rank per step")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--tail", type=int, default=20, help="train loss = mean of the last TAIL steps")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="model init, data and hook seed")
    ap.add_argument("--hook-targets", choices=sorted(HOOK_TARGETS), default="all",
                    help="matrices our hook compresses: all (as PowerSGD: equal bytes) or the default selection")
    ap.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated; ';'-separated when a variant has key=value,..."
    )
    ap.add_argument("--json", default=None, help="write raw results here")
    ns = ap.parse_args(argv)
    args = {k.replace("-", "_"): v for k, v in vars(ns).items()}
    args["variants"] = [v for v in ns.variants.split(";" if ";" in ns.variants else ",") if v]
    if "allreduce" not in args["variants"]:
        args["variants"].insert(0, "allreduce")
    t0 = time.time()
    res = run_workers(_worker, ns.world, args)[0]
    print(table(res, args))
    print(f"\n{ns.world} gloo CPU ranks, {ns.steps} steps, wall {time.time() - t0:.0f} s")
    if ns.json:
        Path(ns.json).write_text(json.dumps({"args": args, "results": res}, indent=2))


if __name__ == "__main__":
    main()
