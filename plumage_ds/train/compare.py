"""Comparison table over main-job run directories (``plumage-ds compare DIR...``).

The gap-closed column is the figure of ``docs/design.md`` §5, generalised to every run:
``(L_galore − L_x) / (L_galore − L_adamw)`` on final eval loss — 0 for GaLore, 1 for
AdamW, and for ``x = plumage`` exactly the figure the project is judged by. It is only
shown when one ``adamw`` and one ``galore`` run are among the directories and their
losses differ.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional


def load_summary(run_dir: str | os.PathLike) -> dict:
    """The ``summary.json`` of ``run_dir``; ``ValueError`` naming the path if absent."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise ValueError(f"Invalid run dir={str(run_dir)!r}: no summary.json")
    return json.loads(path.read_text(encoding="utf-8"))


def gap_closed(loss: float, *, galore: float, adamw: float) -> Optional[float]:
    """``(galore − loss) / (galore − adamw)``; ``None`` when the denominator is 0."""
    denom = galore - adamw
    if denom == 0:
        return None
    return (galore - loss) / denom + 0.0  # + 0.0: no "-0.0%"


def _comparable_key(summary: dict) -> str:
    """Everything but the optimizer section and ``train.num_threads`` (speed only); a config written
    before a key existed counts as having its default."""
    from plumage_ds.config import JobConfig, from_dict, to_dict

    cfg = summary.get("config", {})
    try:
        cfg = to_dict(from_dict(JobConfig, cfg))
    except ValueError:  # not loadable by this version: compared as written
        pass
    key = {k: cfg.get(k) for k in ("model", "data", "train")}
    if isinstance(key["train"], dict):
        key["train"] = {k: v for k, v in key["train"].items() if k != "num_threads"}
    return json.dumps(key, sort_keys=True)


def _fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def compare_rows(run_dirs: list[str | os.PathLike]) -> tuple[list[dict], list[str]]:
    """One row per run (``name``, ``estimator``, losses, bytes, speed, ``gap_closed``, ``vs_galore``) and warnings.

    ``gap_closed`` needs one AdamW and one GaLore run with AdamW better (``None`` otherwise, with a
    warning); ``vs_galore`` is the final eval loss minus GaLore's (one GaLore run needed).
    """
    summaries = [(str(d), load_summary(d)) for d in run_dirs]
    warnings = []
    if len({_comparable_key(s) for _, s in summaries}) > 1:
        warnings.append("runs differ outside the optimizer section (model/data/train): not like-for-like")
    by_est: dict[str, list[float]] = {}
    for _, s in summaries:
        est = s.get("config", {}).get("optimizer", {}).get("estimator", "?")
        if s.get("final_eval_loss") is not None:
            by_est.setdefault(est, []).append(s["final_eval_loss"])
    ref = None
    galore = by_est["galore"][0] if len(by_est.get("galore", [])) == 1 else None
    if len(by_est.get("adamw", [])) == 1 and galore is not None:
        ref = {"adamw": by_est["adamw"][0], "galore": galore}
        if not ref["adamw"] < ref["galore"]:
            warnings.append(
                f"adamw (eval loss {ref['adamw']:.4f}) is not better than galore ({ref['galore']:.4f}): "
                "gap closed is not meaningful for these runs and not shown; read 'vs galore' (the "
                "eval-loss difference, negative = better than GaLore)"
            )
            ref = None
    elif "adamw" in by_est and "galore" in by_est:
        warnings.append("several adamw or galore runs: gap closed not shown")
    rows = []
    for name, s in summaries:
        est = s.get("config", {}).get("optimizer", {}).get("estimator", "?")
        loss = s.get("final_eval_loss")
        gap = gap_closed(loss, **ref) if ref is not None and loss is not None else None
        rows.append(
            {
                "name": Path(name).name or name,
                "estimator": est,
                "status": s.get("status"),
                "final_eval_loss": loss,
                "final_train_loss": s.get("final_train_loss"),
                "optimizer_state_bytes": s.get("optimizer_state_bytes"),
                "tokens_per_s": s.get("tokens_per_s"),
                "gap_closed": gap,
                "vs_galore": None if galore is None or loss is None else loss - galore + 0.0,
            }
        )
    return rows, warnings


def format_table(rows: list[dict]) -> str:
    """Plain-text table of :func:`compare_rows` rows."""
    head = ["run", "estimator", "eval loss", "vs galore", "train loss", "opt state", "tokens/s", "gap closed"]

    def f(v, spec):
        return "-" if v is None else format(v, spec)

    body = [
        [
            r["name"],
            r["estimator"] + ("" if r["status"] in (None, "completed") else f" ({r['status']})"),
            f(r["final_eval_loss"], ".4f"),
            f(r["vs_galore"], "+.4f"),
            f(r["final_train_loss"], ".4f"),
            _fmt_bytes(r["optimizer_state_bytes"]),
            f(r["tokens_per_s"], ".0f"),
            "-" if r["gap_closed"] is None else f"{100 * r['gap_closed']:.1f}%",
        ]
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def compare(run_dirs: list[str | os.PathLike]) -> str:
    """Table plus warnings and the gap-closed formula, ready to print."""
    rows, warnings = compare_rows(run_dirs)
    out = [format_table(rows)]
    if any(r["gap_closed"] is not None for r in rows):
        out.append("gap closed = (L_galore - L_x) / (L_galore - L_adamw), final eval loss")
    out.extend(f"warning: {w}" for w in warnings)
    return "\n".join(out)
