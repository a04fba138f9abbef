"""Measure PLUMAGE's open knobs (docs/design.md §2.1 item 6) side by side in one run.

Trains the main job's tiny LLaMA on the embedded corpus with the same data, seed
and steps for AdamW, GaLore and PLUMAGE variants (``dinv_placement`` ×
``scale``), then prints a markdown table with the final eval loss and the
"gap closed vs GaLore" figure of docs/design.md §5:
``(L_galore − L_variant) / (L_galore − L_adamw)``.

    python benchmarks/sweep_lowrank.py --config configs/demo.yaml --out runs/sweep [--steps N]

Not a test: numbers depend on the machine only through speed, not through
values (everything is seeded), so the table is reproducible.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from plumage_ds.config import load_config
from plumage_ds.train.loop import train

VARIANTS = [
    ("adamw", {"estimator": "adamw"}),
    ("galore a=0.25", {"estimator": "galore", "scale": 0.25}),
    ("galore a=1", {"estimator": "galore", "scale": 1.0}),
    ("plumage none a=1", {"estimator": "plumage", "dinv_placement": "none", "scale": 1.0}),
    ("plumage coords a=1", {"estimator": "plumage", "dinv_placement": "coords", "scale": 1.0}),
    ("plumage lift a=1", {"estimator": "plumage", "dinv_placement": "lift", "scale": 1.0}),
    ("plumage none a=0.25", {"estimator": "plumage", "dinv_placement": "none", "scale": 0.25}),
    ("plumage lift a=0.25", {"estimator": "plumage", "dinv_placement": "lift", "scale": 0.25}),
    ("plumage none a=1 mix0.1", {"estimator": "plumage", "dinv_placement": "none", "scale": 1.0, "uniform_mix": 0.1}),
    ("plumage coords a=1 mix0.1", {"estimator": "plumage", "dinv_placement": "coords", "scale": 1.0, "uniform_mix": 0.1}),
    ("plumage none a=1 no-realign", {"estimator": "plumage", "dinv_placement": "none", "scale": 1.0, "realign": False}),
    ("haar none a=1", {"estimator": "haar", "dinv_placement": "none", "scale": 1.0}),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--out", default="runs/sweep")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--only", nargs="*", default=None, help="variant names to run (default: all)")
    ap.add_argument("--grad-clip", type=float, default=None, help="optimizer.max_grad_norm for every variant")
    ap.add_argument("--lr", type=float, default=None, help="optimizer.lr for every variant")
    args = ap.parse_args(argv)
    base = load_config(args.config)
    if args.steps:
        base = dataclasses.replace(base, train=dataclasses.replace(base.train, steps=args.steps))
    rows = []
    for name, overrides in VARIANTS:
        if args.only and name not in args.only:
            continue
        if args.grad_clip is not None:
            overrides = dict(overrides, max_grad_norm=args.grad_clip)
        if args.lr is not None:
            overrides = dict(overrides, lr=args.lr)
        cfg = dataclasses.replace(base, optimizer=dataclasses.replace(base.optimizer, **overrides))
        out = os.path.join(args.out, name.replace(" ", "_").replace("=", ""))
        summary = train(cfg, out, overwrite=True, progress=False)
        rows.append((name, summary))
        print(f"{name}: eval {summary['final_eval_loss']:.4f}", file=sys.stderr, flush=True)
    by_name = dict(rows)
    adamw = by_name.get("adamw", {}).get("final_eval_loss")
    galore = by_name.get("galore a=1", {}).get("final_eval_loss")
    print(f"\nconfig {args.config}, steps {base.train.steps}, rank {base.optimizer.rank}, "
          f"tau {base.optimizer.update_interval}, lr {args.lr or base.optimizer.lr}, max_grad_norm {args.grad_clip}\n")
    print("| variant | final eval loss | gap closed vs GaLore(a=1) | optimizer state bytes |")
    print("|---|---|---|---|")
    for name, s in rows:
        loss = s["final_eval_loss"]
        gap = "" if adamw is None or galore is None or galore == adamw else f"{(galore - loss) / (galore - adamw):+.0%}"
        print(f"| {name} | {loss:.4f} | {gap} | {s.get('optimizer_state_bytes', '')} |")
    with open(os.path.join(args.out, "sweep.json"), "w", encoding="utf-8") as fh:
        json.dump({n: s.get("final_eval_loss") for n, s in rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
