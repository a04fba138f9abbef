#!/usr/bin/env python
"""Training quality at GPU scale (issue 20): AdamW, GaLore, PLUMAGE and `optimal` on one device, per seed.

    benchmarks/gpu_quality.sh                         # one CUDA device: < 9 min, prints the per-seed tables
    benchmarks/gpu_quality.sh --device cpu --tiny     # dry run of every part on CPU (tiny models, seconds)

Points (each: 4 arms × 2 seeds through the quality harness, ``benchmarks/quality.py``, i.e. the main
job ``python -m plumage_ds train`` as subprocesses, all eight at once on the one device; ``optimal`` is
the config schema's default estimator, with ``Σ`` compact; ``--arms`` adds ``haar`` or drops arms other
than AdamW and GaLore, two runs each, which the 40M point's sizing then pays for or saves):

* ``11m`` — ``configs/gpu-11m.yaml``: LLaMA 6 × 384 (10.9M parameters), seq 256 × batch 64, 1000 steps
  (16.4M byte tokens), fp32, rank 96 = s/4, τ = 200, the embedded corpus (the running interpreter's
  standard library, 8 MB).
* ``40m`` — ``configs/gpu-40m.yaml``: LLaMA 8 × 640 (39.9M parameters), the same data, rank 160, τ = 200;
  run only if it fits: its steps are sized from the ``11m`` point's measured wall time
  (:func:`size_steps`), at most 1000, and it is skipped (saying why) below :data:`MIN_STEPS`.

Every arm runs at its matrix LR swept on CPU at width 384, the ``11m`` point's width and the widest of
the ladder (:data:`LRS`, docs/quality.md §10), every arm's dense parameters (embeddings, norms, head) at
the same ``optimizer.dense_lr`` swept there too (:data:`DENSE_LR`). ``--lr ARM=v`` and ``--dense-lr``
override them.
After each point it prints one table: final eval loss per seed and, for every arm X other than AdamW and
GaLore, X − GaLore and the gap closed ``(L_galore − L_X)/(L_galore − L_adamw)`` where AdamW beats GaLore
on that seed (else ``n/a``).
Run folders go to ``--out`` (``OUT/POINT/...``, the harness's layout: rerunning resumes). ``--set``
passes an override to every run (τ = 200 reproduces the issue's run; docs/quality.md §10 measured
that τ = 50 suits PLUMAGE and τ = 200 GaLore, so ``--set optimizer.update_interval=50`` into another
``--out`` is the other half of a fair comparison; the tables name the τ the runs used).

**Sizing** (no H200 figures of this project were measured; the estimate, from the issue's protocol):
one ``11m`` step is ``6 · 10.9M · 16 384 ≈ 1.07`` TFLOP plus ~0.1 TFLOP of attention; at ~40 % of the
H200's ~67 TFLOP/s of plain fp32 that is ~45 ms, so 1000 steps ≈ 45 s of device time per run and the
eight runs ≈ 6 min if they serialise on the device (their Python overhead overlaps: eight processes).
With ~0.5 min of start-up that leaves ~2 min of the 8.5-min budget (``--budget-s 510``; the shell
wrapper kills at 530 s) for the ``40m`` point, which costs ~3.7× per step: it runs only if ≥ 300 steps
fit by the measured rate (likely not with four arms: ``--arms adamw,galore,optimal`` frees two runs'
time). ``--points 40m --big-steps 1000`` runs it alone in full (~22 min).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "benchmarks"))

ARMS = ("adamw", "galore", "plumage", "optimal")
"""The default arms (``optimal`` is the schema's default estimator); ``--arms`` may add ``haar`` or leave out
PLUMAGE or ``optimal`` (AdamW and GaLore are always in: the gap)."""
KNOWN_ARMS = ("adamw", "galore", "plumage", "haar", "optimal")
LABELS = {"adamw": "AdamW", "galore": "GaLore", "plumage": "PLUMAGE", "haar": "Haar", "optimal": "optimal"}
SEEDS = 2
LRS = {"adamw": 5e-4, "galore": 1e-3, "plumage": 1e-3, "haar": 1e-3, "optimal": 1e-3}
"""Matrix LR (``optimizer.lr``) per arm: the width-384 optima of docs/quality.md §10 (each inside its grid,
swept on 4 layers; ``optimal`` at PLUMAGE's, as it ran there)."""
DENSE_LR = 3.2e-2
"""``optimizer.dense_lr`` of every arm: the width-384 optimum of docs/quality.md §10 (inside its grid)."""

POINTS = {
    "11m": {"config": "configs/gpu-11m.yaml", "params": 10_873_728, "label": "LLaMA 6 × 384, rank 96"},
    "40m": {"config": "configs/gpu-40m.yaml", "params": 39_864_960, "label": "LLaMA 8 × 640, rank 160"},
}
STEPS = 1000
MIN_STEPS = 300
"""The ``40m`` point is skipped when fewer steps than this fit in the time left."""

TINY = {  # --tiny: every part on CPU in seconds (the structure of each point, tiny widths)
    "11m": ["model.hidden_size=32", "model.intermediate_size=86", "model.num_hidden_layers=2",
            "model.num_attention_heads=2", "model.num_key_value_heads=2", "optimizer.rank=8"],
    "40m": ["model.hidden_size=48", "model.intermediate_size=129", "model.num_hidden_layers=2",
            "model.num_attention_heads=2", "model.num_key_value_heads=2", "optimizer.rank=12"],
}  # fmt: skip
TINY_COMMON = ["data.seq_len=32", "data.batch_size=4", "data.max_corpus_bytes=200000", "optimizer.update_interval=3",
               "train.eval_interval=3", "train.eval_batches=2", "train.warmup_steps=2"]  # fmt: skip
TINY_STEPS = 6


def size_steps(elapsed_s: float, steps_done: int, params_done: int, params_next: int, left_s: float,
               cap: int = STEPS, quantum: int = 100) -> int:
    """Steps of the next point that fit in ``left_s``: the last point's wall seconds per step
    (start-up included, so conservative) times the parameter ratio (FLOPs per token ∝ parameters;
    attention grows less), with a 10 % margin, rounded down to ``quantum``, at most ``cap``."""
    if steps_done <= 0 or elapsed_s <= 0 or left_s <= 0:
        return 0
    per_step = elapsed_s / steps_done * params_next / params_done
    fit = int(0.9 * left_s / per_step)
    return min(cap, fit // quantum * quantum)


def per_seed_table(results: dict, seeds: list[int], arms: tuple = ARMS) -> tuple[str, dict]:
    """Markdown rows ``seed | AdamW | GaLore | X… | X − GaLore… | gap closed (X)…`` for every arm X other
    than AdamW and GaLore, and the numbers (``delta`` and ``gap_closed`` per X)."""
    res = results["arms"]
    others = [a for a in arms if a not in ("adamw", "galore")]
    cols = ["AdamW", "GaLore", *(LABELS[a] for a in others), *(f"{LABELS[a]} − GaLore" for a in others),
            *(f"gap closed ({LABELS[a]})" if len(others) > 1 else "gap closed" for a in others)]
    rows = ["| seed | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    data = {"seeds": seeds, "final_eval": {a: res[a]["final_eval"] for a in arms},
            "delta": {a: [] for a in others}, "gap_closed": {a: [] for a in others}}  # fmt: skip
    for i, seed in enumerate(seeds):
        a, g = res["adamw"]["final_eval"][i], res["galore"]["final_eval"][i]
        losses = [res[x]["final_eval"][i] for x in others]
        gaps = []
        for x, loss in zip(others, losses):
            gap = (g - loss) / (g - a) if a < g else math.nan
            data["delta"][x].append(loss - g)
            data["gap_closed"][x].append(gap)
            gaps.append(f"{100 * gap:.0f} %" if gap == gap else "n/a (AdamW does not beat GaLore)")
        cells = [f"{v:.4f}" for v in (a, g, *losses)] + [f"{v - g:+.4f}" for v in losses] + gaps
        rows.append(f"| {seed} | " + " | ".join(cells) + " |")
    means = [statistics.fmean(res[x]["final_eval"]) for x in ("adamw", "galore", *others)]
    deltas = [statistics.fmean(data["delta"][x]) for x in others]
    rows.append("| mean | " + " | ".join([*(f"{m:.4f}" for m in means), *(f"{d:+.4f}" for d in deltas), *[""] * len(others)]) + " |")
    return "\n".join(rows), data


def run_point(name: str, steps: int, ns, quality) -> tuple[dict, float]:
    """One point through the harness; returns its results and its wall time."""
    point = POINTS[name]
    out = Path(ns.out) / name
    argv = ["--config", str(REPO / point["config"]), "--out", str(out), "--steps", str(steps),
            "--seeds", str(ns.seeds), "--sweep-seeds", "1", "--jobs", str(ns.jobs), "--nice", str(ns.nice),
            "--estimators", ",".join(ns.arms), "--corpus", "embedded", "--report", "gpu",
            "--set", f"optimizer.dense_lr={ns.dense_lr!r}"]  # fmt: skip
    for arm in ns.arms:
        argv += ["--lr", f"{arm}={ns.lr[arm]!r}"]
    for s in (TINY[name] + TINY_COMMON if ns.tiny else []) + ns.set:
        argv += ["--set", s]
    t0 = time.perf_counter()
    rc = quality.main(argv)
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(rc)
    results = json.loads((out / "results-gpu.json").read_text(encoding="utf-8"))["corpora"]["embedded"]
    return results, wall


def describe_runs(out: Path, steps: int) -> tuple[str, list[float], str]:
    """The corpus description, every run's tokens/s and the τ the runs used (from the run folders'
    ``summary.json`` at ``steps``)."""
    corpus, speeds, taus = "", [], set()
    for summary in sorted(out.glob(f"embedded/steps={steps}/*/lr=*/seed=*/summary.json")):
        s = json.loads(summary.read_text(encoding="utf-8"))
        c = s.get("corpus", {})
        corpus = corpus or f"{c.get('root')} ({c.get('train_bytes')} train bytes, sha1 {str(c.get('sha1'))[:12]})"
        speeds.append(float(s.get("tokens_per_s") or 0.0))
        taus.add(s.get("config", {}).get("optimizer", {}).get("update_interval"))
    return corpus, speeds, "/".join(str(t) for t in sorted(taus, key=str)) or "?"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (dry run)")
    p.add_argument("--tiny", action="store_true", help="tiny widths, 6 steps: a dry run of every part")
    p.add_argument("--points", default="11m,40m", help="comma-separated: 11m, 40m (40m only if it fits)")
    p.add_argument("--out", default=str(REPO / "runs" / "gpu_quality"))
    p.add_argument("--budget-s", type=float, default=510.0, help="wall seconds for all points (sizes the 40m point)")
    p.add_argument("--big-steps", type=int, default=0, help="steps of the 40m point (0: sized to the budget)")
    p.add_argument("--seeds", type=int, default=SEEDS, help="seeds per arm (default 2)")
    p.add_argument("--jobs", type=int, default=0, help="concurrent runs (default: every run on cuda, 2 on cpu)")
    p.add_argument("--nice", type=int, default=None, help="nice of each run (default: 0 on cuda, 19 on cpu)")
    p.add_argument("--arms", default=",".join(ARMS),
                   help=f"comma-separated arms from {', '.join(KNOWN_ARMS)} (adamw and galore always run: the gap)")
    p.add_argument("--lr", action="append", default=[], metavar="ARM=v", help="matrix LR of an arm (default LRS)")
    p.add_argument("--dense-lr", type=float, default=DENSE_LR)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="for every run, e.g. optimizer.update_interval=50 (use another --out than the runs without it)")
    ns = p.parse_args(argv)
    t_start = time.perf_counter()
    if ns.device not in ("cuda", "cpu"):
        print(f"Invalid --device={ns.device!r}: must be 'cuda' or 'cpu'", file=sys.stderr)
        return 2
    if ns.seeds < 1:
        print(f"Invalid --seeds={ns.seeds}: must be >= 1", file=sys.stderr)
        return 2
    points = [x for x in ns.points.split(",") if x]
    if not points or any(x not in POINTS for x in points):
        print(f"Invalid --points={ns.points!r}: choose from {', '.join(POINTS)}", file=sys.stderr)
        return 2
    arms = tuple(dict.fromkeys(x for x in ns.arms.split(",") if x))
    if any(a not in KNOWN_ARMS for a in arms) or not {"adamw", "galore"} <= set(arms) or len(arms) < 3:
        print(f"Invalid --arms={ns.arms!r}: adamw, galore and at least one of "
              f"{', '.join(a for a in KNOWN_ARMS if a not in ('adamw', 'galore'))}", file=sys.stderr)
        return 2
    ns.arms = ("adamw", "galore", *(a for a in arms if a not in ("adamw", "galore")))
    lrs = {a: LRS[a] for a in ns.arms}
    for item in ns.lr:
        arm, sep, value = item.partition("=")
        if arm not in ns.arms or not sep:
            print(f"Invalid --lr {item!r}: expected ARM=VALUE with ARM in {', '.join(ns.arms)}", file=sys.stderr)
            return 2
        lrs[arm] = float(value)
    ns.lr = lrs
    if ns.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the main job uses CUDA whenever it sees a device
    import torch

    if ns.device == "cuda" and not torch.cuda.is_available():
        print("gpu_quality: CUDA is not available (torch.cuda.is_available() is False, torch "
              f"{torch.__version__}); run it on a machine with a CUDA device, or use --device cpu --tiny for a "
              "dry run", file=sys.stderr)  # fmt: skip
        return 2
    ns.jobs = ns.jobs or (ns.seeds * len(ns.arms) if ns.device == "cuda" else 2)
    ns.nice = ns.nice if ns.nice is not None else (0 if ns.device == "cuda" else 19)
    import quality  # benchmarks/quality.py

    name = torch.cuda.get_device_name(0) if ns.device == "cuda" else "CPU"
    print(f"gpu_quality on {name}, torch {torch.__version__}, python {sys.version.split()[0]}"
          f"{' (tiny dry run)' if ns.tiny else ''}; matrix LRs {lrs}, dense_lr {ns.dense_lr:g}; "
          f"{ns.jobs} runs at a time; budget {ns.budget_s:.0f} s\n", flush=True)  # fmt: skip
    summary, last = {}, None
    for point in points:
        steps = TINY_STEPS if ns.tiny else STEPS
        if point == "40m":
            left = ns.budget_s - (time.perf_counter() - t_start)
            if ns.big_steps:
                steps = ns.big_steps
            elif last is not None:
                sized = size_steps(last[0], last[1], POINTS[last[2]]["params"], POINTS["40m"]["params"], left)
                if sized < MIN_STEPS and not ns.tiny:
                    print(f"## 40m: skipped — {sized} steps fit in the {left:.0f} s left (at the 11m point's "
                          f"{last[0] / last[1]:.3f} s per step × {POINTS['40m']['params'] / POINTS['11m']['params']:.2f}); "
                          f"needs >= {MIN_STEPS}. Run it alone: --points 40m --big-steps 1000\n", flush=True)  # fmt: skip
                    summary[point] = {"skipped": True, "steps_that_fit": sized, "left_s": left}
                    continue
                steps = TINY_STEPS if ns.tiny else sized
        results, wall = run_point(point, steps, ns, quality)
        last = (wall, steps, point)
        corpus, speeds, tau = describe_runs(Path(ns.out) / point, steps)
        table, data = per_seed_table(results, results["seeds"], ns.arms)
        cfg = POINTS[point]
        shape = ("tiny widths, seq 32 × batch 4" if ns.tiny else
                 f"{cfg['label']} ({cfg['params'] / 1e6:.1f}M parameters), seq 256 × batch 64") + f", τ = {tau}"
        print(f"\n## {point}: {shape}, {steps} steps, fp32, embedded corpus {corpus}\n"
              f"matrix LR {', '.join(f'{a} {lrs[a]:g}' for a in ns.arms)}; "
              f"dense_lr {ns.dense_lr:g}; final eval loss:\n\n{table}\n\n"
              f"wall {wall:.0f} s for {len(speeds)} runs on {name} (tokens/s per run while {ns.jobs} ran: "
              f"{', '.join(f'{s:.0f}' for s in speeds)})\n", flush=True)  # fmt: skip
        summary[point] = {"steps": steps, "wall_s": wall, **data}
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_quality.json").write_text(json.dumps({"device": name, "lrs": lrs, "dense_lr": ns.dense_lr,
                                                      "tiny": ns.tiny, "points": summary}, indent=2) + "\n")  # fmt: skip
    print(f"total wall {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
