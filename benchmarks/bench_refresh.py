#!/usr/bin/env python
"""Refresh cost per rank at W = 1, 2, 4 (owner balance), and the SVD / eigh cost of big gradients (CPU).

    PYTHONPATH=. nice -n 10 python benchmarks/bench_refresh.py                    # per-rank refresh, ~3 min
    PYTHONPATH=. nice -n 10 python benchmarks/bench_refresh.py --skip-ranks --spectral 4096x4096 4096x11008

``--worlds`` (default 1 2 4): ``ShardedPlumageAdamW`` over the target matrices of the ~50M LLaMA of
``bench_scale.py`` (6 layers × q, k, v, o ``512 × 512``, gate, up ``1376 × 512``, down ``512 × 1376``: 42
matrices, rank 128), spawned gloo ranks, random gradients, ``τ = 1`` (every step refreshes). Per rank:
the CPU time (``time.thread_time``, so four ranks sharing two cores do not inflate each other) spent
in the owner's refresh work (``PlumageAdamW._draw_projections``: Gram matrices, ``eigh`` and the
draws of ``P, d``), median over ``--steps`` steps (the first excluded). A refresh costs the slowest rank: the table gives the max over ranks, its ratio to
W = 1 (ideal ``1/W``) and the balance ``max/mean``.

``--spectral``: one full-spectrum decomposition of an ``m × n`` gradient, fp32 ``torch.linalg.svd``
(galore-torch's refresh) and the Gram route (``G Gᵀ`` and ``eigh`` in float64, the default here).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

SHAPES = [(512, 512)] * 4 + [(1376, 512), (1376, 512), (512, 1376)]
LAYERS, RANK = 6, 128


def _worker(rank: int, world: int, steps: int) -> dict:
    from plumage_ds.optim import ShardedPlumageAdamW

    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in SHAPES * LAYERS]
    opt = ShardedPlumageAdamW(params, lr=1e-3, rank=RANK, update_interval=1)
    spent = []
    inner = opt._draw_projections  # the owner's whole refresh work: decompositions and draws

    def timed(entries, basis):
        t0 = time.thread_time()
        out = inner(entries, basis)
        spent.append(time.thread_time() - t0)
        return out

    opt._draw_projections = timed
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    owned = [e for e in opt._entries if e.owner == rank]
    return {"spectra_s": statistics.median(spent[1:] or spent), "owned": len(owned),
            "owned_cost": sum(e.s * e.s * e.l for e in owned)}


def ranks_table(worlds: list[int], steps: int) -> str:
    from plumage_ds.testing import run_workers

    lines = ["| W | matrices per rank | owner refresh CPU time per rank (s) | max | vs W=1 | ideal 1/W | max/mean "
             "| plan: max/mean of Σ s²·l |", "|---|---|---|---|---|---|---|---|"]
    base = None
    for world in worlds:
        res = run_workers(_worker, world, steps)
        times = [r["spectra_s"] for r in res]
        costs = [r["owned_cost"] for r in res]
        base = base or max(times)
        lines.append(
            f"| {world} | {', '.join(str(r['owned']) for r in res)} | {', '.join(f'{t:.2f}' for t in times)} "
            f"| {max(times):.2f} | {max(times) / base:.3f} | {1 / world:.3f} | {max(times) / statistics.fmean(times):.2f} "
            f"| {max(costs) / statistics.fmean(costs):.2f} |"
        )
        print(f"# W={world}: {times}", file=sys.stderr)
    return "\n".join(lines)


def spectral_table(shapes: list[tuple[int, int]]) -> str:
    from plumage_ds.estimators import short_side_basis

    lines = ["| gradient | fp32 svd (s) | Gram + float64 eigh (s) | svd / gram |", "|---|---|---|---|"]
    for m, n in shapes:
        G = torch.randn(m, n, generator=torch.Generator().manual_seed(0))
        t0 = time.perf_counter()
        short_side_basis(G, "svd")
        t_svd = time.perf_counter() - t0
        t0 = time.perf_counter()
        short_side_basis(G, "gram")
        t_gram = time.perf_counter() - t0
        lines.append(f"| {m} × {n} | {t_svd:.1f} | {t_gram:.1f} | {t_svd / t_gram:.2f} |")
        print(f"# {m}x{n}: svd {t_svd:.1f} s, gram {t_gram:.1f} s", file=sys.stderr)
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--skip-ranks", action="store_true")
    p.add_argument("--spectral", nargs="*", default=None, help="shapes MxN for the SVD/eigh timing")
    p.add_argument("--threads", type=int, default=1, help="threads for --spectral")
    args = p.parse_args(argv)
    if not args.skip_ranks:
        print(f"{LAYERS} layers × {len(SHAPES)} matrices {SHAPES[:1] + SHAPES[4:]}, rank {RANK}, 1 thread per rank\n")
        print(ranks_table(args.worlds, args.steps))
        print()
    if args.spectral:
        torch.set_num_threads(args.threads)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)\n")
        print(spectral_table([tuple(map(int, s.split("x"))) for s in args.spectral]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
