#!/usr/bin/env python
"""LLaMA-shaped models of ~50M and ~120M parameters on CPU: PlumageAdamW vs torch AdamW vs galore-torch.

    PYTHONPATH=. nice -n 10 python benchmarks/bench_scale.py                    # both models, ~25 min on 2 cores
    PYTHONPATH=. nice -n 10 python benchmarks/bench_scale.py --models 50m --rounds 2

Models (``transformers.LlamaConfig``, fp32, vocabulary 32,000, built from the config):

* ``50m``: hidden 512, intermediate 1376, 6 layers, 8 heads: 51.7M parameters, 42 target matrices;
* ``120m``: hidden 768, intermediate 2048, 10 layers, 12 heads: 120.0M parameters, 70 target matrices.

Methods, each in a fresh process per round (so that peak RSS is its own), rounds interleaved
(``adamw, plumage, galore_torch, adamw, ...``) so that the load of the shared machine hits them alike:

* ``adamw``: ``torch.optim.AdamW(foreach=True)`` on every parameter;
* ``plumage``: :class:`~plumage_ds.PlumageAdamW` (PLUMAGE, Gram route), rank ``s/4`` on every
  attention/MLP matrix, AdamW on the embedding, LM head and norms;
* ``galore_torch``: ``galore_torch.GaLoreAdamW`` with the same targets, rank and interval (``proj_type="std"``).

Each process runs ``--steps`` training steps (random tokens, batch ``--batch`` × ``--seq``, one thread) with
the projector refreshed every ``--tau-run`` steps, and times forward+backward and ``step()``
separately. Reported per method (median over the steps of a kind, then over rounds):

* **optimizer step**: ordinary steps (no refresh; step 0 excluded, it allocates the state);
* **refresh**: extra time of a refresh step over an ordinary one (step 0 excluded);
* **amortised step** at ``τ = --tau`` (200): ``fwd+bwd + step + refresh/τ``, with the forward+backward
  time pooled over the methods of the round (it is the same computation; its per-method medians are
  printed too); the ratio to AdamW is taken within each round, then the median over rounds;
* **optimizer state**: bytes of the state tensors (galore-torch's projector matrices included);
* **peak RSS** of the process (``ru_maxrss``: model, gradients, activations, state, torch itself).

Then, per model, a paired comparison of the optimizer steps alone, less sensitive to the load of a
shared machine: the three optimizers in one process on three copies of the model, one set of fixed
gradients, ``step()`` calls interleaved with a rotating order, a refresh every other step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

MODELS = {
    "50m": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
                num_key_value_heads=8, vocab_size=32000),
    "120m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=10, num_attention_heads=12,
                 num_key_value_heads=12, vocab_size=32000),
}
METHODS = ("adamw", "plumage", "galore_torch")
TARGETS = r"self_attn|mlp"
LR = 1e-3


def _build(model_name: str, seq: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    import torch

    torch.manual_seed(0)
    cfg = LlamaConfig(**MODELS[model_name], max_position_embeddings=seq, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def _optimizer(method: str, model, rank: int, tau: int):
    import torch

    from plumage_ds import PlumageAdamW, lowrank_param_groups

    if method == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=LR, foreach=True)
    groups, _ = lowrank_param_groups(model, target_modules=[TARGETS], rank=rank)
    if method == "plumage":
        return PlumageAdamW(groups, lr=LR, rank=rank, update_interval=tau)
    import galore_torch

    targets = [p for g in groups if g.get("lowrank") for p in g["params"]]
    others = [p for g in groups if not g.get("lowrank") for p in g["params"]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return galore_torch.GaLoreAdamW(
            [{"params": others}, {"params": targets, "rank": rank, "update_proj_gap": tau, "scale": 1.0, "proj_type": "std"}],
            lr=LR, no_deprecation_warning=True,
        )


def _state_bytes(opt) -> int:
    import torch

    total = 0
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
            elif hasattr(v, "ortho_matrix") and torch.is_tensor(v.ortho_matrix):  # galore-torch's projector
                total += v.ortho_matrix.numel() * v.ortho_matrix.element_size()
    return total


def child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    model = _build(args.model, args.seq)
    n_params = sum(p.numel() for p in model.parameters())
    rank = MODELS[args.model]["hidden_size"] // 4
    opt = _optimizer(args.method, model, rank, args.tau_run)
    g = torch.Generator().manual_seed(0)
    vocab = MODELS[args.model]["vocab_size"]
    fb, step_t = [], []
    for step in range(args.steps):
        x = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        fb.append(t1 - t0)
        step_t.append(t2 - t1)
    refresh = [s for s in range(1, args.steps) if s % args.tau_run == 0]
    ordinary = [s for s in range(1, args.steps) if s % args.tau_run != 0]
    if args.method == "adamw":
        ordinary, refresh = list(range(1, args.steps)), []
    n_targets = 0
    if args.method == "plumage":
        n_targets = sum(1 for r in opt.matrix_report() if r["mode"] != "adamw")
    return {
        "model": args.model, "method": args.method, "params": n_params, "rank": rank, "targets": n_targets,
        "fwd_bwd": statistics.median(fb[1:]),
        "opt_step": statistics.median(step_t[s] for s in ordinary),
        "refresh_step": statistics.median(step_t[s] for s in refresh) if refresh else None,
        "state_bytes": _state_bytes(opt),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "steps": step_t, "fwd_bwd_all": fb, "loss": float(loss.detach()),
    }


def paired(model_name: str, args) -> dict:
    """The three optimizers in one process on three copies of the model, sharing one set of fixed
    gradients, their ``step()`` calls interleaved (the order rotates every round), refresh every
    other step: per method the times of ordinary and refresh steps, as pairs with the same load."""
    import torch

    torch.set_num_threads(args.threads)
    rank = MODELS[model_name]["hidden_size"] // 4
    models = {m: _build(model_name, args.seq) for m in METHODS}
    opts = {m: _optimizer(m, models[m], rank, 2) for m in METHODS}
    g = torch.Generator().manual_seed(0)
    params = {m: list(models[m].parameters()) for m in METHODS}
    for i, p0 in enumerate(params[METHODS[0]]):
        G = torch.randn(p0.shape, generator=g) * 1e-3
        for m in METHODS:
            params[m][i].grad = G  # read only by every optimizer
    times: dict = {m: {"ordinary": [], "refresh": []} for m in METHODS}
    for step in range(args.paired_steps):
        order = METHODS[step % 3:] + METHODS[: step % 3]
        for m in order:
            t0 = time.perf_counter()
            opts[m].step()
            dt = time.perf_counter() - t0
            if step > 0:  # step 0 allocates the state
                times[m]["refresh" if step % 2 == 0 and m != "adamw" else "ordinary"].append(dt)
    return times


def paired_report(results: dict, args) -> str:
    lines = [
        f"Optimizer steps interleaved in one process ({args.paired_steps} steps each, refresh every other step, "
        "same fixed gradients): medians and the median of the per-step ratios",
        "",
        "| model | method | ordinary step (ms) | vs AdamW | vs galore-torch | refresh step (ms) | refresh extra vs galore-torch |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, t in results.items():
        med = {m: statistics.median(t[m]["ordinary"]) for m in METHODS}
        for m in METHODS:
            pair = lambda base: statistics.median(a / b for a, b in zip(t[m]["ordinary"], t[base]["ordinary"]))  # noqa: E731
            refresh, extra = "–", "–"
            if m != "adamw":
                refresh = f"{1e3 * statistics.median(t[m]['refresh']):.0f}"
                mine = statistics.median(t[m]["refresh"]) - med[m]
                theirs = statistics.median(t["galore_torch"]["refresh"]) - med["galore_torch"]
                extra = f"{mine / theirs:.2f}"
            lines.append(f"| {model} | {m} | {1e3 * med[m]:.0f} | {pair('adamw'):.2f} | {pair('galore_torch'):.2f} "
                         f"| {refresh} | {extra} |")
    return "\n".join(lines)


def _run_child(model: str, method: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", "--model", model, "--method", method, "--steps", str(args.steps),
           "--tau-run", str(args.tau_run), "--batch", str(args.batch), "--seq", str(args.seq),
           "--threads", str(args.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _amortised(row: dict, fwd_bwd: float, tau: int) -> float:
    """``fwd+bwd + step + (refresh step − step)/τ`` (seconds)."""
    extra = 0.0 if row["refresh_step"] is None else (row["refresh_step"] - row["opt_step"]) / tau
    return fwd_bwd + row["opt_step"] + extra


def _refresh(row: dict) -> float:
    return row["refresh_step"] - row["opt_step"]


def report(results: dict, args) -> str:
    lines = [
        f"batch {args.batch}×{args.seq} tokens, {args.threads} thread, {args.steps} steps per process, refresh every "
        f"{args.tau_run} steps in the run, amortised at τ = {args.tau}, {args.rounds} interleaved rounds",
        "",
        "| model | method | fwd+bwd (s) | optimizer step (ms) | vs AdamW | vs galore-torch | refresh (ms) "
        "| vs galore-torch | amortised step (s) | vs AdamW | state (MiB) | vs AdamW | peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, rounds in results.items():
        pooled = [statistics.median(r[m]["fwd_bwd"] for m in METHODS) for r in rounds]  # same work for all

        for m in METHODS:
            def med(f):
                return statistics.median(f(r) for r in rounds)

            def vs(f, base):
                return statistics.median(f(r[m]) / f(r[base]) for r in rounds)

            step = lambda row: row["opt_step"]  # noqa: E731
            refresh, refresh_vs = "–", "–"
            if m != "adamw":
                refresh = f"{1e3 * med(lambda r: _refresh(r[m])):.0f}"
                refresh_vs = f"{vs(_refresh, 'galore_torch'):.2f}"
            amortised = [_amortised(r[m], fb, args.tau) for r, fb in zip(rounds, pooled)]
            am_ratio = statistics.median(
                _amortised(r[m], fb, args.tau) / _amortised(r["adamw"], fb, args.tau) for r, fb in zip(rounds, pooled)
            )
            r0, a0 = rounds[0][m], rounds[0]["adamw"]
            lines.append(
                f"| {model} ({r0['params'] / 1e6:.1f}M) | {m} | {med(lambda r: r[m]['fwd_bwd']):.2f} "
                f"| {1e3 * med(lambda r: r[m]['opt_step']):.0f} | {vs(step, 'adamw'):.2f} | {vs(step, 'galore_torch'):.2f} "
                f"| {refresh} | {refresh_vs} | {statistics.median(amortised):.3f} | {am_ratio:.3f} "
                f"| {r0['state_bytes'] / 2**20:,.1f} | {r0['state_bytes'] / a0['state_bytes']:.3f} | {r0['peak_rss'] / 2**20:,.0f} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--tau-run", type=int, default=3, help="refresh interval inside the timed run")
    p.add_argument("--tau", type=int, default=200, help="refresh interval the amortised step assumes")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--paired-steps", type=int, default=13, help="interleaved optimizer steps per method (0: skip)")
    p.add_argument("--skip-runs", action="store_true", help="only the in-process paired optimizer-step comparison")
    p.add_argument("--json", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--method", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    results: dict = {}
    for model in args.models if not args.skip_runs else []:
        results[model] = []
        for rnd in range(args.rounds):
            order = METHODS if rnd % 2 == 0 else tuple(reversed(METHODS))
            rows = {}
            for m in order:
                t0 = time.perf_counter()
                rows[m] = _run_child(model, m, args)
                print(f"# {model} round {rnd} {m}: opt {1e3 * rows[m]['opt_step']:.0f} ms, fwd+bwd "
                      f"{rows[m]['fwd_bwd']:.2f} s ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
            results[model].append(rows)
    if results:
        print(report(results, args))
        print()
    pairs = {}
    if args.paired_steps:
        for model in args.models:
            pairs[model] = paired(model, args)
            print(f"# {model} paired done", file=sys.stderr)
        print(paired_report(pairs, args))
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": results, "paired": pairs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
