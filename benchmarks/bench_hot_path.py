#!/usr/bin/env python
"""The optimizer step's cost against the number of matrices, batched and per matrix (one process, CPU).

    PYTHONPATH=. python benchmarks/bench_hot_path.py                       # curve + stacking sweep, ~4 min

``--curve``: ``PlumageAdamW.step()`` alone (gradients set by hand, no model) on ``N`` target matrices of
one shape, ``N`` from 8 to 512, ordinary steps (no refresh): the batched path (default) and the
same code under :func:`plumage_ds.kernels.batched.per_matrix` (a matrix at a time), interleaved,
median over repetitions. The ratio ``ms / N`` is the cost per matrix: flat when the step has no
per-matrix overhead left.

``--sweep``: for one shape family ``(s, 2.6875·s)`` with ``r = s/4``, the projection ``Pᵀ G``, the lift
``P N`` and the Gram ``eigh`` of 16 and 128 matrices through :mod:`plumage_ds.kernels.batched` stacked
and one call per matrix (what sets ``STACK_ELEMENTS`` for CPU).
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


def _median_ms(fn, reps: int, device: torch.device = torch.device("cpu")) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()  # warm-up
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def curve(shape: tuple[int, int], counts: list[int], rank: int, reps: int) -> list[dict]:
    from plumage_ds import PlumageAdamW
    from plumage_ds.kernels import batched

    rows = []
    for n in counts:
        g = torch.Generator().manual_seed(n)
        params = [torch.nn.Parameter(torch.randn(shape, generator=g) * 0.02) for _ in range(n)]
        grads = [torch.randn(shape, generator=g) for _ in range(n)]
        opt = PlumageAdamW(params, lr=1e-3, rank=rank, update_interval=10**9)  # one refresh (step 0), then ordinary
        for p, G in zip(params, grads):
            p.grad = G
        opt.step()

        def step():
            opt.step()

        def step_per_matrix():
            with batched.per_matrix():
                opt.step()

        res = {"batched": [], "per_matrix": []}
        for _ in range(3):  # interleaved rounds
            res["batched"].append(_median_ms(step, reps))
            res["per_matrix"].append(_median_ms(step_per_matrix, reps))
        b, p = min(res["batched"]), min(res["per_matrix"])
        rows.append({"n": n, "batched_ms": b, "per_matrix_ms": p})
        print(f"# {shape} N={n}: batched {b:.2f} ms, per matrix {p:.2f} ms", file=sys.stderr)
    return rows


def sweep(sides: list[int], count: int, reps: int, device: torch.device = torch.device("cpu")) -> list[dict]:
    """Projection ``Pᵀ G``, lift ``P N`` and Gram ``eigh`` of ``count`` matrices ``(s, 2.6875·s)``, ``r = s/4``,
    stacked (one ``bmm`` / batched ``eigh``) and one call per matrix: ``(proj, lift, eigh)`` ms each way."""
    from plumage_ds.estimators import gram_basis
    from plumage_ds.kernels import batched

    rows = []
    for s in sides:
        l, r = int(2.6875 * s), s // 4
        g = torch.Generator().manual_seed(s)
        P = [torch.linalg.qr(torch.randn(s, r, generator=g))[0].to(device) for _ in range(count)]
        G = [torch.randn(s, l, generator=g).to(device) for _ in range(count)]
        N = [torch.randn(r, l, generator=g).to(device) for _ in range(count)]
        S = [(x.double() @ x.double().mT) for x in G]
        Pt = [p.mT for p in P]
        old = dict(batched.STACK_ELEMENTS), dict(batched.DECOMPOSITION_STACK_ELEMENTS)
        out = {}
        try:
            for mode in ("stacked", "single"):
                for table in (batched.STACK_ELEMENTS, batched.DECOMPOSITION_STACK_ELEMENTS):
                    table[device.type] = 1 << 40 if mode == "stacked" else 0
                out[mode] = (
                    _median_ms(lambda: batched.matmuls(Pt, G), reps, device),
                    _median_ms(lambda: batched.matmuls(P, N), reps, device),
                    _median_ms(lambda: batched.map_stacked(gram_basis, S), max(1, reps // 2), device),
                )
        finally:
            for table, saved in zip((batched.STACK_ELEMENTS, batched.DECOMPOSITION_STACK_ELEMENTS), old):
                table.clear()
                table.update(saved)
        rows.append({"s": s, "l": l, "r": r, "elements": s * l, "stacked": out["stacked"], "single": out["single"]})
        print(f"# s={s}: stacked {out['stacked']}, single {out['single']}", file=sys.stderr)
    return rows


def sweep_table(rows: list[dict], count: int) -> str:
    lines = [f"| s × l (r = s/4) | elements of G | Pᵀ G: stacked / one by one (ms, {count} matrices) "
             "| P N: stacked / one by one | Gram eigh: batched / one by one |", "|---|---|---|---|---|"]
    for row in rows:
        cells = [f"{a:.2f} / {b:.2f} ({a / b:.2f})" for a, b in zip(row["stacked"], row["single"])]
        lines.append(f"| {row['s']} × {row['l']} | {row['elements']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--curve-shapes", nargs="+", default=["64x172", "512x1376"])
    p.add_argument("--counts", type=int, nargs="+", default=[8, 32, 128, 512])
    p.add_argument("--big-counts", type=int, nargs="+", default=[7, 14, 28],
                   help="counts for shapes above 2^16 elements (their step is compute-bound)")
    p.add_argument("--sweep-sides", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    p.add_argument("--sweep-counts", type=int, nargs="+", default=[16, 128])
    p.add_argument("--skip-curve", action="store_true")
    p.add_argument("--skip-sweep", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)\n")
    if not args.skip_curve:
        print("| shape | N matrices | batched step (ms) | per matrix (ms) | per-matrix / batched | batched µs per matrix |")
        print("|---|---|---|---|---|---|")
        for text in args.curve_shapes:
            m, n = map(int, text.split("x"))
            counts = args.counts if m * n <= 1 << 16 else args.big_counts
            for row in curve((m, n), counts, max(1, min(m, n) // 4), args.reps):
                print(f"| {m}×{n} | {row['n']} | {row['batched_ms']:.2f} | {row['per_matrix_ms']:.2f} "
                      f"| {row['per_matrix_ms'] / row['batched_ms']:.2f} | {1e3 * row['batched_ms'] / row['n']:.1f} |")
        print()
    if not args.skip_sweep:
        for count in args.sweep_counts:
            print(sweep_table(sweep(args.sweep_sides, count, args.reps), count))
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
