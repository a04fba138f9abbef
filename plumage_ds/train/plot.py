"""``plumage-ds plot RUN... --out FILE.png``: loss curves and optimizer state of finished runs.

Three panels: train and eval loss against optimizer steps, with the steps where ``P`` changes
marked (every ``optimizer.update_interval`` steps for estimators with a projector — refreshes,
Haar redraws, GUM periods; after ``comm_hook.start_iter`` warm-up steps on ``ddp_hook``); the
same losses against training tokens; and the measured optimizer-state bytes (largest rank) of
each run. matplotlib is an extra (``pip install 'plumage_ds[plot]'``; ``make demo`` installs it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def _read_run(run: str | os.PathLike) -> dict:
    path = Path(run)
    summary_path, metrics_path = path / "summary.json", path / "metrics.jsonl"
    if not summary_path.is_file() or not metrics_path.is_file():
        raise ValueError(f"Invalid run={str(run)!r}: needs summary.json and metrics.jsonl (a finished train run)")
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    rows = [json.loads(x) for x in metrics_path.read_text(encoding="utf-8").splitlines() if x.strip()]
    return {"name": path.name or str(path), "summary": summary, "rows": rows}


def refresh_steps(config: dict, steps: int) -> list[int]:
    """0-based optimizer steps at whose start ``P`` changes (empty for ``adamw``)."""
    from plumage_ds.config import JobConfig, from_dict

    cfg = from_dict(JobConfig, config)
    opt = cfg.optimizer
    if not opt.spec.has_projector:
        return []
    first = opt.comm_hook.start_iter if cfg.train.engine == "ddp_hook" else 0
    return list(range(first, steps, opt.update_interval))


def plot_runs(runs: list[str], out: str | os.PathLike) -> Path:
    """Draw the figure for ``runs`` into ``out`` (PNG); return its path."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"Invalid --out={str(out)!r}: must end in .png")
    data = [_read_run(r) for r in runs]
    try:
        import matplotlib
    except ImportError:
        raise ValueError("Invalid plot: matplotlib is not installed (pip install 'plumage_ds[plot]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_step, ax_tok, ax_mem) = plt.subplots(1, 3, figsize=(16, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(data):
        color = colors[i % len(colors)]
        s = run["summary"]
        per_step = s.get("tokens_per_step") or 0
        train = [(r["step"], r["loss"]) for r in run["rows"] if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in run["rows"] if "eval_loss" in r]
        label = f"{run['name']} ({s.get('config', {}).get('optimizer', {}).get('estimator', '?')})"
        for ax, scale in ((ax_step, 1), (ax_tok, per_step)):
            if train:
                ax.plot([x * scale for x, _ in train], [y for _, y in train], color=color, label=f"{label} train")
            if evals:
                ax.plot([x * scale for x, _ in evals], [y for _, y in evals], "o--", color=color, label=f"{label} eval")
        steps = s.get("steps_completed") or (train[-1][0] if train else 0)
        for k, step in enumerate(refresh_steps(s["config"], steps)):
            ax_step.axvline(step, color=color, alpha=0.25, linewidth=0.8, label=f"{label} P changes" if k == 0 else None)
        ax_mem.bar(i, s.get("optimizer_state_bytes") or 0, color=color)
    ax_step.set_xlabel("optimizer step")
    ax_tok.set_xlabel("training tokens")
    for ax in (ax_step, ax_tok):
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    ax_step.legend(fontsize=7)
    ax_mem.set_xticks(range(len(data)), [d["name"] for d in data], rotation=30, ha="right")
    ax_mem.set_ylabel("optimizer state bytes (largest rank)")
    ax_step.set_title("loss vs step (vertical lines: P changes)")
    ax_tok.set_title("loss vs tokens")
    ax_mem.set_title("optimizer state")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    from plumage_ds.io import atomic_path

    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return out
