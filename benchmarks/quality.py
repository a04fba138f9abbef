"""Training-quality harness: arms × seeds × corpora × steps through the main job, over seeds.

Every run is one subprocess of the main job::

    python -m plumage_ds train --config CONFIG --out DIR --overwrite --no-progress --set key=value ...

with one intra-op thread (``train.num_threads=1``, ``OMP_NUM_THREADS=1``) and ``nice`` (``--nice``),
at most ``--jobs`` at a time. A run whose ``summary.json`` says ``completed`` or ``diverged`` is
never run again (resumable: rerun the same command after an interruption); each run folder records
its ``--set`` list (``sets.json``) and is reused only for that list, so a changed ``--set`` needs
another ``--out``.

* **Arms.** ``--estimators adamw,galore,...`` gives one arm per estimator; ``--arm NAME=EST[,k=v...]``
  adds an arm with extra ``--set`` overrides (e.g. ``plumage-norealign=plumage,optimizer.realign=false``).
  :data:`ARM_DEFAULTS` holds the overrides every arm of an estimator gets (recorded in the table).
* **Learning rates.** Each arm runs at its own best LR: a sweep over ``--lr-grid ARM=v1,v2,...``
  (default :data:`DEFAULT_LR_GRID`) on the first ``--sweep-seeds`` seeds picks the LR with the lowest
  mean final eval loss; then every seed runs at that LR (sweep runs are reused). ``--lr-from A=B``
  runs arm ``A`` at arm ``B``'s best LR (knob ablations: same LR as the baseline, paired by seed).
  The LR swept is ``optimizer.lr``: with ``optimizer.dense_lr`` set (the demo config sets it) that is
  the LR of the target matrices only, and every arm trains the dense parameters (embeddings, norms,
  head) with the same AdamW at ``dense_lr`` — arms differ only in how the matrices are stepped.
* **The shared dense LR.** ``--dense-lr-grid Y1:Y2:...`` sweeps ``optimizer.dense_lr`` (every arm's LR
  for the parameters that stay dense) once per corpus: first the matrix LRs are swept at the config's
  ``dense_lr`` (the *base*), then every arm with its own LR runs each ``Y`` at its best matrix LR on the
  sweep seeds, and the ``Y`` with the lowest mean over those arms is chosen for every arm (one pass of
  coordinate descent; arms share it, so none is tuned against the others). One value runs everything,
  the matrix sweep included, at that ``dense_lr``. Runs at a ``dense_lr`` other than the base live in
  ``ARM/dense_lr=Y/lr=X/seed=S``; runs at the base stay in ``ARM/lr=X/seed=S``, so earlier runs are reused.
* **Grid edges.** ``--extend-grid K``: when a sweep's best LR (matrix or dense) is the smallest or largest
  of its grid, the next point outward (the edge's own ratio: ×2 on a doubling grid) is added and run,
  up to ``K`` times per grid; the table says whether each optimum is inside its grid or at an edge.
* **Corpora.** ``--corpus embedded`` (the main job's stdlib corpus), ``text:DIR`` (a folder of text
  files) or ``manpages`` (English prose built by ``benchmarks/prose_corpus.py``, apt-installed there);
  :func:`corpus_overrides` is the one place that maps a corpus to ``--set data.*`` overrides.
* **Outputs** in ``--out``: ``quality.md`` (tables), ``results.json`` (every number), and per corpus
  ``curves-CORPUS.png`` (eval loss mean ± sd and smoothed train loss, refresh steps marked);
  ``--report NAME`` writes ``quality-NAME.md`` etc. instead, so several reports share the runs.

Figures: final eval loss mean ± sd per arm; the gap closed per seed
``(L_galore − L_x)/(L_galore − L_adamw)`` (same seed, each arm at its best LR); and, for low-rank
arms, the loss jump at refresh steps (:func:`refresh_spikes`, paired against AdamW on the same
batches).

    PYTHONPATH=. python benchmarks/quality.py --config configs/demo.yaml --steps 600 --seeds 5 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from plumage_ds.train.compare import gap_closed  # noqa: E402

LOWRANK = ("plumage", "galore", "haar", "optimal", "gum")

ARM_DEFAULTS: dict[str, tuple[str, ...]] = {
    # GaLore's moments keep the singular vectors' signs across refreshes, so only "svd" reproduces
    # galore-torch. It is also GaLore's config default now (svd_method=None → the estimator's
    # default); the override stays explicit so every recorded table names the same setting.
    "galore": ("optimizer.svd_method=svd",),
}

DEFAULT_LR_GRID: dict[str, tuple[float, ...]] = {
    # optimizer.lr, the target matrices' LR under the demo config's dense_lr = 4e-3: each grid
    # brackets the best found over 5 seeds (docs/quality.md §9)
    "adamw": (5e-4, 1e-3, 2e-3),
    "galore": (1e-3, 2e-3, 4e-3),
    "plumage": (1e-3, 2e-3, 4e-3),
    "optimal": (1e-3, 2e-3, 4e-3),
    "haar": (2e-3, 4e-3, 8e-3),
    "gum": (8e-3, 1.6e-2, 3.2e-2),
}

SPIKE_WINDOW = 5
"""Steps on each side of a refresh compared by :func:`refresh_spikes`."""


# --------------------------------------------------------------------------- corpora


def corpus_overrides(corpus: str, out: Path) -> list[str]:
    """``--set`` overrides selecting ``corpus`` in the main job (the one place that maps corpora).

    ``embedded`` → none; ``text:DIR`` → a folder of text files; ``manpages`` → built on first use
    into ``OUT/corpora/manpages`` by ``benchmarks/prose_corpus.py`` (installs Debian's ``manpages``
    with apt), then as ``text:``.
    """
    if corpus == "embedded":
        return []
    if corpus == "manpages":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from prose_corpus import build_manpages_corpus

        return corpus_overrides(f"text:{build_manpages_corpus(out / 'corpora' / 'manpages')}", out)
    kind, sep, path = corpus.partition(":")
    if kind == "text" and sep and path:
        if not Path(path).is_dir():
            raise ValueError(f"Invalid corpus={corpus!r}: {path!r} is not a directory")
        return ["data.source=text", f"data.path={Path(path).resolve()}"]
    raise ValueError(f"Invalid corpus={corpus!r}: must be 'embedded', 'manpages' or 'text:DIR'")


def corpus_label(corpus: str) -> str:
    return corpus.replace(":", "-").replace("/", "_").strip("_")


# --------------------------------------------------------------------------- arms and runs


@dataclass(frozen=True)
class Arm:
    name: str
    estimator: str
    overrides: tuple[str, ...] = ()
    lrs: tuple[float, ...] = ()  # sweep grid (one value: fixed)
    lr_from: Optional[str] = None  # use that arm's best LR


@dataclass(frozen=True)
class Run:
    corpus: str
    arm: Arm
    lr: float
    seed: int
    steps: int
    dense_lr: Optional[float] = None  # None: the config's optimizer.dense_lr (no override)

    def dir(self, out: Path) -> Path:
        arm = out / corpus_label(self.corpus) / f"steps={self.steps}" / self.arm.name
        if self.dense_lr is not None:
            arm = arm / f"dense_lr={self.dense_lr:g}"
        return arm / f"lr={self.lr:g}" / f"seed={self.seed}"


@dataclass
class Outcome:
    status: str  # completed | diverged
    final_eval: float  # inf when diverged
    eval_curve: list[tuple[int, float]] = field(default_factory=list)
    train_curve: list[tuple[int, float]] = field(default_factory=list)
    update_interval: Optional[int] = None


def parse_arm(text: str) -> Arm:
    name, sep, rest = text.partition("=")
    parts = [p for p in rest.split(",") if p]
    if not sep or not name or not parts:
        raise ValueError(f"Invalid --arm {text!r}: expected NAME=ESTIMATOR[,section.key=value,...]")
    bad = [p for p in parts[1:] if "=" not in p or "." not in p.partition("=")[0]]
    if bad:
        raise ValueError(f"Invalid --arm {text!r}: override {bad[0]!r} is not section.key=value")
    return Arm(name=name, estimator=parts[0], overrides=tuple(parts[1:]))


def parse_mapping(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"Invalid {flag} {item!r}: expected ARM=VALUE")
        out[key] = value
    return out


def round_lr(x: float) -> float:
    """6 significant digits: the value a folder name (``:g``) and a ``--set`` spell the same way."""
    return float(f"{x:.6g}")


def parse_grid(text: str, flag: str) -> tuple[float, ...]:
    try:
        values = tuple(round_lr(float(v)) for v in text.split(":") if v)
    except ValueError:
        values = ()
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values) or len(set(values)) != len(values):
        raise ValueError(f"Invalid {flag} {text!r}: expected distinct positive numbers v1:v2:...")
    return values


def grid_edge(grid, best: float) -> str:
    """Where ``best`` sits in ``grid``: ``inside``, ``lower edge``, ``upper edge`` (or ``fixed``: one point)."""
    g = sorted(grid)
    if len(g) < 2:
        return "fixed"
    return "lower edge" if best == g[0] else ("upper edge" if best == g[-1] else "inside")


def next_grid_point(grid, best: float) -> Optional[float]:
    """The next point outward when ``best`` is at an edge of ``grid`` (that edge's own ratio), else ``None``."""
    g = sorted(grid)
    edge = grid_edge(g, best)
    if edge == "lower edge":
        return round_lr(g[0] * g[0] / g[1])
    if edge == "upper edge":
        return round_lr(g[-1] * g[-1] / g[-2])
    return None


def build_arms(ns) -> list[Arm]:
    arms = [Arm(name=e, estimator=e) for e in ns.estimators.split(",") if e]
    arms += [parse_arm(a) for a in ns.arm]
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"Invalid arms: duplicate names in {names}")
    grids = parse_mapping(ns.lr_grid, "--lr-grid")
    fixed = parse_mapping(ns.lr, "--lr")
    lr_from = parse_mapping(ns.lr_from, "--lr-from")
    for mapping, flag in ((grids, "--lr-grid"), (fixed, "--lr"), (lr_from, "--lr-from")):
        unknown = sorted(set(mapping) - set(names))
        if unknown:
            raise ValueError(f"Invalid {flag}: unknown arm(s) {unknown}; arms are {names}")
    out = []
    for a in arms:
        if a.name in lr_from:
            src = lr_from[a.name]
            if src not in names or src in lr_from:
                raise ValueError(f"Invalid --lr-from {a.name}={src}: must name an arm with its own LR")
            out.append(Arm(a.name, a.estimator, a.overrides, (), src))
            continue
        if a.name in fixed:
            lrs = (float(fixed[a.name]),)
        elif a.name in grids:
            lrs = parse_grid(grids[a.name], f"--lr-grid {a.name}=")
        elif a.estimator in DEFAULT_LR_GRID:
            lrs = DEFAULT_LR_GRID[a.estimator]
        else:
            raise ValueError(f"Invalid arm {a.name!r}: no LR grid for estimator {a.estimator!r}; pass --lr or --lr-grid")
        out.append(Arm(a.name, a.estimator, a.overrides, lrs, None))
    return out


def run_overrides(run: Run, corpus_sets: list[str], extra: list[str]) -> list[str]:
    """Every ``--set`` of one run, in order: corpus, harness, arm defaults, arm, user extras, dense LR."""
    sets = list(corpus_sets)
    sets += [
        f"train.steps={run.steps}",
        f"train.seed={run.seed}",
        "train.num_threads=1",
        "train.log_interval=1",  # per-step train loss: refresh spikes need it
        f"optimizer.estimator={run.arm.estimator}",
        f"optimizer.seed={run.seed}",
        f"optimizer.lr={run.lr!r}",
    ]
    sets += list(ARM_DEFAULTS.get(run.arm.estimator, ())) + list(run.arm.overrides) + list(extra)
    if run.dense_lr is not None:  # the dense-LR sweep's value wins over the config and every --set
        sets.append(f"optimizer.dense_lr={run.dense_lr!r}")
    return sets


def read_outcome(run_dir: Path) -> Optional[Outcome]:
    """The finished run's outcome, or ``None`` if it has not finished (absent, running, failed)."""
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        return None
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    status = summary.get("status")
    if status not in ("completed", "diverged"):
        return None
    evals, train = [], []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if "eval_loss" in row:
                evals.append((row["step"], row["eval_loss"]))
            elif "loss" in row:
                train.append((row["step"], row["loss"]))
    final = summary.get("final_eval_loss") if status == "completed" else None
    opt = summary.get("config", {}).get("optimizer", {})
    interval = opt.get("update_interval") if opt.get("estimator") in LOWRANK else None
    return Outcome(status, float(final) if final is not None else math.inf, evals, train, interval)


class Runner:
    """Runs main-job subprocesses, at most ``jobs`` at a time, skipping finished runs."""

    def __init__(self, ns, out: Path) -> None:
        self.ns, self.out = ns, out
        self.lock = threading.Lock()
        self.started = self.skipped = 0

    def command(self, run: Run, corpus_sets: list[str]) -> list[str]:
        cmd = [sys.executable, "-m", "plumage_ds", "train", "--config", str(Path(self.ns.config).resolve())]
        cmd += ["--out", str(run.dir(self.out)), "--overwrite", "--no-progress"]
        for s in run_overrides(run, corpus_sets, self.ns.set):
            cmd += ["--set", s]
        return (["nice", "-n", str(self.ns.nice)] if self.ns.nice else []) + cmd

    def one(self, run: Run, corpus_sets: list[str]) -> Outcome:
        run_dir = run.dir(self.out)
        sets = run_overrides(run, corpus_sets, self.ns.set)
        recorded = run_dir / "sets.json"
        if recorded.is_file() and json.loads(recorded.read_text(encoding="utf-8")) != sets:
            old = json.loads(recorded.read_text(encoding="utf-8"))
            raise ValueError(
                f"Invalid --out {str(self.out)!r}: run {run_dir} was made with other overrides "
                f"(only there: {sorted(set(old) - set(sets))}; only now: {sorted(set(sets) - set(old))}); "
                "pass another --out"
            )
        done = read_outcome(run_dir)
        if done is not None:
            with self.lock:
                self.skipped += 1
            return done
        run_dir.mkdir(parents=True, exist_ok=True)
        recorded.write_text(json.dumps(sets), encoding="utf-8")
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
        t0 = time.time()
        with self.lock:
            self.started += 1
        proc = subprocess.run(self.command(run, corpus_sets), env=env, capture_output=True, text=True)
        (run_dir / "harness.log").write_text(proc.stdout + proc.stderr, encoding="utf-8")
        if proc.returncode == 2:
            raise ValueError(f"main job rejected run {run_dir}: {proc.stderr.strip()}")
        outcome = read_outcome(run_dir)
        if outcome is None:
            raise RuntimeError(f"run {run_dir} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
        if not self.ns.quiet:
            print(f"[{time.time() - t0:6.0f}s] {run_dir.relative_to(self.out)}: {outcome.status} "
                  f"eval={outcome.final_eval:.4f}", flush=True)
        return outcome

    def many(self, runs: list[Run], corpus_sets: list[str]) -> dict[Run, Outcome]:
        with ThreadPoolExecutor(max_workers=self.ns.jobs) as pool:
            futures = {r: pool.submit(self.one, r, corpus_sets) for r in runs}
            return {r: f.result() for r, f in futures.items()}


# --------------------------------------------------------------------------- statistics


def mean_sd(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) != len(values):
        return math.inf, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def gap_closed_or_nan(loss: float, galore: float, adamw: float) -> float:
    """:func:`~plumage_ds.train.compare.gap_closed` (0 = GaLore, 1 = AdamW).

    nan when a run diverged or when AdamW does not beat GaLore on that seed (the ratio's sign
    would then invert: a method better than GaLore would read as a negative gap closed).
    """
    if not math.isfinite(loss + galore + adamw) or not adamw < galore:
        return math.nan
    return gap_closed(loss, galore=galore, adamw=adamw)


def refresh_spikes(arm: Outcome, adamw: Outcome, window: int = SPIKE_WINDOW) -> list[float]:
    """Loss jump at each refresh after the first, paired against AdamW on the same batches.

    The refresh at 0-based optimizer step ``t = kτ`` changes the update applied after the loss
    logged at step ``t + 1``. With ``Δ(x) = mean(L_x[t+2 … t+1+w]) − mean(L_x[t+2−w … t+1])``
    (per-step train losses), the spike is ``Δ(arm) − Δ(adamw)``: both see the same batches (the
    data depends only on seed and step), so batch noise and the common trend cancel.
    """
    tau = arm.update_interval
    if not tau:
        return []
    la, lb = dict(arm.train_curve), dict(adamw.train_curve)
    out = []
    for t in range(tau, max(la) - window, tau):
        pre = range(t + 2 - window, t + 2)
        post = range(t + 2, t + 2 + window)
        if all(s in la and s in lb for s in (*pre, *post)):
            da = statistics.fmean(la[s] for s in post) - statistics.fmean(la[s] for s in pre)
            db = statistics.fmean(lb[s] for s in post) - statistics.fmean(lb[s] for s in pre)
            out.append(da - db)
    return out


# --------------------------------------------------------------------------- report


def summarise(arms: list[Arm], seeds: list[int], best: dict[str, float], sweep: dict, main: dict) -> dict:
    """Per arm: best LR, the sweep, final eval per seed, gap closed per seed, refresh spikes."""
    rows = {}
    for arm in arms:
        finals = [main[(arm.name, s)].final_eval for s in seeds]
        row = {
            "estimator": arm.estimator,
            "overrides": list(ARM_DEFAULTS.get(arm.estimator, ())) + list(arm.overrides),
            "lr": best[arm.name],
            "lr_from": arm.lr_from,
            "sweep": {f"{lr:g}": sweep[arm.name][lr] for lr in sorted(sweep.get(arm.name, {}))},
            "final_eval": finals,
            "final_eval_mean_sd": mean_sd(finals),
        }
        if "galore" in best:
            row["delta_vs_galore"] = [main[(arm.name, s)].final_eval - main[("galore", s)].final_eval for s in seeds]
        if "adamw" in best and "galore" in best:
            row["gap_closed"] = [
                gap_closed_or_nan(
                    main[(arm.name, s)].final_eval, main[("galore", s)].final_eval, main[("adamw", s)].final_eval
                )
                for s in seeds
            ]
        if "adamw" in best and arm.estimator in LOWRANK:
            spikes = [x for s in seeds for x in refresh_spikes(main[(arm.name, s)], main[("adamw", s)])]
            if spikes:
                row["refresh_spike"] = {"mean": statistics.fmean(spikes), "max": max(spikes), "n": len(spikes)}
        rows[arm.name] = row
    return rows


def fmt(x: float, digits: int = 4) -> str:
    return "diverged" if x == math.inf else ("n/a" if x != x else f"{x:.{digits}f}")


def markdown(corpus: str, steps: int, seeds: list[int], rows: dict, dense: Optional[dict] = None,
             sweep_seeds: Optional[list[int]] = None) -> str:
    lines = [
        f"### Corpus `{corpus}`, {steps} steps, seeds {seeds}",
        "",
        "| arm | overrides | LR (best of sweep) | sweep: LR → mean final eval | final eval mean ± sd | final eval per seed | "
        "Δ vs GaLore per seed | gap closed per seed | gap closed mean ± sd | refresh spike mean / max |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        sweep = ", ".join(f"{lr} → {fmt(v)}" for lr, v in r["sweep"].items()) or (
            f"(LR of {r['lr_from']})" if r["lr_from"] else "(fixed)"
        )
        m, sd = r["final_eval_mean_sd"]
        gaps = r.get("gap_closed")
        gap_txt = ", ".join(f"{100 * g:.0f}%" if g == g else "n/a" for g in gaps) if gaps else "-"
        finite_gaps = [g for g in gaps or [] if math.isfinite(g)]
        gm, gsd = mean_sd(finite_gaps) if finite_gaps else (math.nan, math.nan)
        spike = r.get("refresh_spike")
        spike_txt = "-" if not spike else f"{spike['mean']:+.4f} / {spike['max']:+.4f}"
        gap_mean = "-" if not gaps else ("n/a" if not finite_gaps else f"{100 * gm:.0f}% ± {100 * gsd:.0f}%")
        deltas = r.get("delta_vs_galore")
        delta_txt = ", ".join(f"{d:+.4f}" for d in deltas) if deltas else "-"
        edge = r.get("lr_edge")
        lr_txt = f"{r['lr']:g}" + (f" ({edge})" if edge else "")
        per_seed = ", ".join(fmt(x) for x in r["final_eval"])
        lines.append(
            f"| {name} | {' '.join(f'`{o}`' for o in r['overrides']) or '-'} | {lr_txt} | {sweep} | "
            f"{fmt(m)} ± {fmt(sd)} | {per_seed} | {delta_txt} | {gap_txt} | {gap_mean} | {spike_txt} |"
        )
    if "adamw" in rows and "galore" in rows:
        a, g = rows["adamw"]["final_eval_mean_sd"][0], rows["galore"]["final_eval_mean_sd"][0]
        if not a < g:
            lines.append(
                f"\nAdamW ({fmt(a)}) does not beat GaLore ({fmt(g)}) at their best LRs here: the gap-closed "
                "ratio (n/a on every seed where L_adamw >= L_galore) is not meaningful; read Δ vs GaLore instead."
            )
    if dense and dense["sweep"]:
        points = "; ".join(
            f"{y} → mean {fmt(v['mean'])} (" + ", ".join(f"{a} {fmt(x)}" for a, x in v.items() if a != "mean") + ")"
            for y, v in dense["sweep"].items()
        )
        base = "none" if dense["base"] is None else f"{dense['base']:g}"
        lines.append(
            f"\nShared `optimizer.dense_lr`, swept at each arm's best matrix LR (matrix LRs swept at the base "
            f"dense_lr {base}; seeds {sweep_seeds}): {points}. Chosen: **{dense['chosen']:g}** "
            f"({dense['edge']}; per arm: " + ", ".join(f"{a} {y:g}" for a, y in dense["best_per_arm"].items())
            + "); every row above runs at it."
        )
    elif dense:
        lines.append(f"\nEvery run at `optimizer.dense_lr` = {dense['chosen']:g}.")
    return "\n".join(lines)


def plot(path: Path, corpus: str, arms: list[Arm], seeds: list[int], main: dict) -> None:
    """Eval loss (mean ± sd over seeds) and smoothed train loss per arm; refresh steps as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_e, ax_t) = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    marked = set()
    for i, arm in enumerate(arms):
        color = colors[i % len(colors)]
        outs = [main[(arm.name, s)] for s in seeds]
        steps = sorted(set.intersection(*(set(dict(o.eval_curve)) for o in outs)))
        if steps:
            vals = [[dict(o.eval_curve)[t] for o in outs] for t in steps]
            mu = [statistics.fmean(v) for v in vals]
            sd = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
            ax_e.plot(steps, mu, color=color, label=arm.name, marker=".")
            ax_e.fill_between(steps, [a - b for a, b in zip(mu, sd)], [a + b for a, b in zip(mu, sd)], color=color, alpha=0.15)
        tsteps = sorted(set.intersection(*(set(dict(o.train_curve)) for o in outs)))
        if tsteps:
            mean = [statistics.fmean(dict(o.train_curve)[t] for o in outs) for t in tsteps]
            k = max(1, len(mean) // 60)
            smooth = [statistics.fmean(mean[max(0, j - k) : j + k + 1]) for j in range(len(mean))]
            ax_t.plot(tsteps, smooth, color=color, label=arm.name, linewidth=1)
        tau = outs[0].update_interval
        last = max((t for o in outs for t, _ in o.train_curve), default=0)
        if tau and (tau, last) not in marked:
            marked.add((tau, last))
            for t in range(tau, last, tau):  # refresh at 0-based step t acts after logged step t + 1
                for ax in (ax_e, ax_t):
                    ax.axvline(t + 1, color="grey", linestyle=":", linewidth=0.8, alpha=0.6)
    ax_e.set(title=f"eval loss, mean ± sd over {len(seeds)} seeds ({corpus})", xlabel="step", ylabel="eval loss")
    ax_t.set(title="train loss (per step, smoothed; dotted: refresh steps)", xlabel="step", ylabel="train loss")
    for ax in (ax_e, ax_t):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    lo = min((v for o in main.values() for _, v in o.eval_curve if math.isfinite(v)), default=None)
    if lo is not None:
        ax_e.set_ylim(bottom=lo - 0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def base_dense_lr(ns, corpus_sets: list[str]) -> Optional[float]:
    """``optimizer.dense_lr`` of the config with the corpus and ``--set`` overrides applied (the base)."""
    from plumage_ds.cli import apply_overrides
    from plumage_ds.config import load_config

    return apply_overrides(load_config(ns.config), list(corpus_sets) + list(ns.set)).optimizer.dense_lr


def sweep_means(runs: dict, keys: dict) -> dict:
    """``{key: mean final eval over its runs}`` for ``keys = {key: [Run, ...]}``."""
    return {k: mean_sd([runs[r].final_eval for r in rs])[0] for k, rs in keys.items()}


def run_corpus(ns, runner: Runner, arms: list[Arm], corpus: str, out: Path) -> tuple[dict, str]:
    corpus_sets = corpus_overrides(corpus, out)
    seeds = list(range(ns.seed0, ns.seed0 + ns.seeds))
    sweep_seeds = seeds[: ns.sweep_seeds]
    dense_grid = parse_grid(ns.dense_lr_grid, "--dense-lr-grid") if ns.dense_lr_grid else ()
    base = base_dense_lr(ns, corpus_sets) if dense_grid else None

    def at(y: Optional[float]) -> Optional[float]:  # runs at the base dense LR carry no override
        return None if y is None or (base is not None and math.isclose(y, base, rel_tol=1e-9)) else y

    # 1. matrix LRs: at the base dense LR, or at the one value of --dense-lr-grid
    dense0 = at(dense_grid[0]) if len(dense_grid) == 1 else None
    grids = {a.name: list(a.lrs) for a in arms if a.lr_from is None and len(a.lrs) > 1}
    extended = dict.fromkeys(grids, 0)
    best, sweep = {}, {}
    while True:
        keys = {(a.name, lr): [Run(corpus, a, lr, s, ns.steps, dense0) for s in sweep_seeds]
                for a in arms if a.name in grids for lr in grids[a.name]}  # fmt: skip
        swept = runner.many([r for rs in keys.values() for r in rs], corpus_sets)
        means = sweep_means(swept, keys)
        grown = False
        for name, grid in grids.items():
            sweep[name] = {lr: means[(name, lr)] for lr in grid}
            best[name] = min(grid, key=lambda lr: (sweep[name][lr], lr))
            nxt = next_grid_point(grid, best[name]) if extended[name] < ns.extend_grid else None
            if nxt is not None:
                grid.append(nxt)
                extended[name] += 1
                grown = True
        if not grown:
            break
    for a in arms:
        if a.lr_from is None and a.name not in grids:
            best[a.name] = a.lrs[0]
    for a in arms:
        if a.lr_from is not None:
            best[a.name] = best[a.lr_from]
    edges = {a.name: grid_edge(grids[a.name], best[a.name]) for a in arms if a.name in grids}

    # 2. the shared dense LR: every arm with its own LR, at its best matrix LR, on the sweep seeds
    dense = None
    if len(dense_grid) > 1:
        own = [a for a in arms if a.lr_from is None]
        dgrid, dext = list(dense_grid), 0
        while True:
            keys = {(a.name, y): [Run(corpus, a, best[a.name], s, ns.steps, at(y)) for s in sweep_seeds]
                    for y in dgrid for a in own}  # fmt: skip
            swept = runner.many([r for rs in keys.values() for r in rs], corpus_sets)
            per_arm = sweep_means(swept, keys)
            dsweep = {y: {a.name: per_arm[(a.name, y)] for a in own} for y in dgrid}
            dmean = {y: mean_sd(list(dsweep[y].values()))[0] for y in dgrid}
            chosen = min(dgrid, key=lambda y: (dmean[y], y))
            nxt = next_grid_point(dgrid, chosen) if dext < ns.extend_grid else None
            if nxt is None:
                break
            dgrid.append(nxt)
            dext += 1
        dense = {
            "base": base, "grid": sorted(dgrid), "chosen": chosen, "edge": grid_edge(dgrid, chosen),
            "sweep": {f"{y:g}": {**dsweep[y], "mean": dmean[y]} for y in sorted(dgrid)},
            "best_per_arm": {a.name: min(dgrid, key=lambda y: (dsweep[y][a.name], y)) for a in own},
        }  # fmt: skip
        dense0 = at(chosen)
    elif dense_grid:
        dense = {"base": base, "grid": list(dense_grid), "chosen": dense_grid[0], "edge": "fixed", "sweep": {}}

    # 3. every seed at the chosen LRs
    main_runs = {(a.name, s): Run(corpus, a, best[a.name], s, ns.steps, dense0) for a in arms for s in seeds}
    done = runner.many(list(main_runs.values()), corpus_sets)
    main = {key: done[run] for key, run in main_runs.items()}
    rows = summarise(arms, seeds, best, sweep, main)
    for name, edge in edges.items():
        rows[name]["lr_edge"] = edge
    png = out / f"curves{ns.tag}-{corpus_label(corpus)}.png"
    plot(png, corpus, arms, seeds, main)
    result = {"seeds": seeds, "sweep_seeds": sweep_seeds, "steps": ns.steps, "arms": rows, "png": png.name}
    if dense is not None:
        result["dense_lr"] = dense
    return result, markdown(corpus, ns.steps, seeds, rows, dense, sweep_seeds)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    ap.add_argument("--out", default=str(REPO / "runs" / "quality"))
    ap.add_argument("--estimators", default="adamw,galore,plumage,haar,gum", help="one arm per estimator")
    ap.add_argument("--arm", action="append", default=[], metavar="NAME=EST[,k=v...]", help="extra arm")
    ap.add_argument("--lr-grid", action="append", default=[], metavar="ARM=v1:v2:...", help="sweep grid of an arm")
    ap.add_argument("--lr", action="append", default=[], metavar="ARM=v", help="fixed LR of an arm (no sweep)")
    ap.add_argument("--lr-from", action="append", default=[], metavar="ARM=OTHER", help="ARM runs at OTHER's best LR")
    ap.add_argument("--corpus", action="append", default=[], help="embedded | manpages | text:DIR (repeatable)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--seed0", type=int, default=0)
    ap.add_argument("--sweep-seeds", type=int, default=1, help="seeds the LR sweep averages over")
    ap.add_argument("--dense-lr-grid", default="", metavar="Y1:Y2:...",
                    help="sweep the shared optimizer.dense_lr at each arm's best matrix LR (one value: run at it)")
    ap.add_argument("--extend-grid", type=int, default=0, metavar="K",
                    help="add up to K points outward to a grid whose best LR sits at its edge")
    ap.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    ap.add_argument("--nice", type=int, default=19, help="run each job under nice -n N (0: not)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="for every run")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--report", default="", help="suffix of the report files (quality-REPORT.md, ...): "
                    "several reports can share one --out and its finished runs")
    return ap


def main(argv=None) -> int:
    ns = build_parser().parse_args(argv)
    ns.tag = f"-{ns.report}" if ns.report else ""
    try:
        if ns.extend_grid < 0:
            raise ValueError(f"Invalid --extend-grid={ns.extend_grid}: must be >= 0")
        for name in ("steps", "seeds", "jobs", "sweep_seeds"):
            if getattr(ns, name) < 1:
                raise ValueError(f"Invalid --{name.replace('_', '-')}={getattr(ns, name)}: must be >= 1")
        if ns.sweep_seeds > ns.seeds:
            raise ValueError(f"Invalid --sweep-seeds={ns.sweep_seeds}: more than --seeds={ns.seeds}")
        arms = build_arms(ns)
        out = Path(ns.out)
        out.mkdir(parents=True, exist_ok=True)
        runner = Runner(ns, out)
        t0 = time.time()
        results, tables = {}, []
        for corpus in ns.corpus or ["embedded"]:
            results[corpus], table = run_corpus(ns, runner, arms, corpus, out)
            tables.append(table)
    except ValueError as err:
        print(f"quality: error: {err}", file=sys.stderr)
        return 2
    cmd = "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = "\n\n".join(tables) + f"\n\n`{cmd}` — {runner.started} runs started, {runner.skipped} reused, wall {time.time() - t0:.0f} s\n"
    (out / f"quality{ns.tag}.md").write_text(text, encoding="utf-8")
    (out / f"results{ns.tag}.json").write_text(json.dumps({"command": cmd, "corpora": results}, indent=2, default=str) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
