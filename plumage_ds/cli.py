"""Command line: ``plumage-ds train`` (the main job) and ``plumage-ds compare``.

``main(argv)`` returns the exit status: 0 success, 1 training diverged (non-finite
loss), 2 invalid config/arguments/output directory. Errors are one line on stderr that
names the bad value.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Optional

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def parse_value(text: str):
    """YAML scalar/flow value of an override, plus numbers PyYAML 1.1 reads as strings.

    ``yaml.safe_load("1e-3")`` is the *string* ``'1e-3'`` (YAML 1.1 wants ``1.0e-3``);
    such values are turned into floats here so ``--set optimizer.lr=1e-3`` works.
    """
    import yaml

    value = yaml.safe_load(text)
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        return float(value)
    return value


def apply_overrides(cfg, overrides: list[str]):
    """Apply ``section.key=value`` overrides to a ``JobConfig`` and reload it strictly.

    The result goes through ``from_dict`` again, so every override is validated like a
    value from the YAML file (unknown keys and bad values raise ``ValueError``).
    """
    from plumage_ds.config import JobConfig, from_dict, to_dict

    data = to_dict(cfg)
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise ValueError(f"Invalid override {item!r}: expected section.key=value")
        node = data
        for i, part in enumerate(parts[:-1]):
            if part not in node or not isinstance(node[part], dict):
                where = ".".join(parts[: i + 1])
                raise ValueError(f"Invalid override {item!r}: unknown config section {where!r}")
            node = node[part]
        node[parts[-1]] = parse_value(text)
    return from_dict(JobConfig, data, where="JobConfig")


def load_job_config(path: str, overrides: Optional[list[str]] = None, steps: Optional[int] = None):
    """``load_config(path)`` + ``--set`` overrides + the ``--steps`` shortcut."""
    from plumage_ds.config import load_config

    cfg = load_config(path)
    overrides = list(overrides or [])
    if steps is not None:
        overrides.append(f"train.steps={steps}")
    return apply_overrides(cfg, overrides) if overrides else cfg


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plumage-ds",
        description="Unbiased low-rank gradient estimators (PLUMAGE, GaLore, Haar, GUM): main job.",
    )
    # The ``deepspeed`` launcher appends ``--local_rank=N`` right after the module name,
    # i.e. before the subcommand; accepted (and ignored: LOCAL_RANK is in the environment).
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train a small LLaMA on the embedded stdlib corpus")
    tr.add_argument("--config", required=True, help="YAML/JSON job config (see configs/)")
    tr.add_argument("--out", required=True, help="run directory (created; must be empty)")
    tr.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value (YAML syntax), e.g. --set optimizer.estimator=galore",
    )
    tr.add_argument("--steps", type=int, help="shortcut for --set train.steps=N")
    tr.add_argument("--overwrite", action="store_true", help="replace results in a non-empty --out")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar (default: only on a TTY)")
    tr.add_argument(
        "--deepspeed",
        metavar="DS.json",
        help="train under DeepSpeed with this config (needs a \"plumage\" section; the optimizer, ZeRO stage "
        "and batch sizes come from it, not from the job's optimizer section); see docs/deepspeed.md",
    )
    tr.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    cmp_ = sub.add_parser("compare", help="compare run directories written by train")
    cmp_.add_argument("runs", nargs="+", metavar="DIR")
    return parser


def _run_job(run, out) -> tuple[int, object]:
    """Run a training function; map its failures to exit codes (1 diverged, 2 bad input)."""
    from plumage_ds.train.loop import NonFiniteLossError

    try:
        return 0, run()
    except NonFiniteLossError as err:
        print(f"plumage-ds train: error: {err} (partial results in {out})", file=sys.stderr)
        return 1, None
    except (ValueError, FileExistsError) as err:
        print(f"plumage-ds train: error: {err}", file=sys.stderr)
        return 2, None


def _train_deepspeed(args) -> int:
    """``train --deepspeed``: every check that can fail runs before the process group exists."""
    import os

    from plumage_ds.train.deepspeed_loop import (
        check_batch_sizes,
        read_deepspeed_config,
        resolve_config,
        train_deepspeed,
        world_size_from_env,
    )
    from plumage_ds.train.loop import check_job, check_out_dir

    rank0 = int(os.environ.get("RANK", "0") or 0) == 0
    try:
        bad = [o for o in args.overrides if o.strip().startswith("optimizer.")]
        if bad:
            raise ValueError(
                f"Conflicting --set {bad[0]!r} with --deepspeed: the optimizer comes from the DeepSpeed JSON "
                "(optimizer.params, \"plumage\" section, gradient_clipping); edit it there"
            )
        raw = read_deepspeed_config(args.deepspeed)
        cfg = load_job_config(args.config, args.overrides, args.steps)
        resolved, ds = resolve_config(cfg, raw)
        check_job(resolved)
        check_batch_sizes(ds, world_size_from_env())
        if rank0:
            check_out_dir(args.out, overwrite=args.overwrite)
    except (ValueError, OSError) as err:
        print(f"plumage-ds train: error: {err}", file=sys.stderr)
        return 2
    code, summary = _run_job(
        lambda: train_deepspeed(cfg, args.out, raw, overwrite=args.overwrite, progress=False if args.no_progress else None),
        args.out,
    )
    if code:
        return code
    if summary is not None:
        print(
            f"{summary['config']['optimizer']['estimator']} (DeepSpeed ZeRO-{summary['zero_stage']}, "
            f"{summary['world_size']} ranks): final eval loss {summary['final_eval_loss']:.4f}, "
            f"train loss {summary['final_train_loss']:.4f}, "
            f"optimizer state {summary['optimizer_state_bytes_per_rank']} B per rank, "
            f"{summary['tokens_per_s']:.0f} tokens/s, {summary['wall_time_s']:.1f} s -> {args.out}"
        )
    return 0


def _train(args) -> int:
    from plumage_ds.train.loop import train

    if args.deepspeed is not None:
        return _train_deepspeed(args)

    try:
        cfg = load_job_config(args.config, args.overrides, args.steps)
    except (ValueError, OSError) as err:
        print(f"plumage-ds train: error: {err}", file=sys.stderr)
        return 2
    code, summary = _run_job(
        lambda: train(cfg, args.out, overwrite=args.overwrite, progress=False if args.no_progress else None), args.out
    )
    if code:
        return code
    print(
        f"{cfg.optimizer.estimator}: final eval loss {summary['final_eval_loss']:.4f}, "
        f"train loss {summary['final_train_loss']:.4f}, "
        f"optimizer state {summary['optimizer_state_bytes']} B, "
        f"{summary['tokens_per_s']:.0f} tokens/s, {summary['wall_time_s']:.1f} s -> {args.out}"
    )
    return 0


def _compare(args) -> int:
    from plumage_ds.train.compare import compare

    try:
        print(compare(args.runs))
    except ValueError as err:
        print(f"plumage-ds compare: error: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = _build_parser().parse_args(argv)
    return {"train": _train, "compare": _compare}[args.command](args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
