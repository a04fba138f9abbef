"""Command line: ``plumage-ds train`` (the main job), ``compare`` and ``plot``.

``main(argv)`` returns the exit status: 0 success, 1 training diverged (non-finite loss),
2 invalid config, ``--set``, flag or output directory. Every error is ONE line on stderr
that names the key and the value. Progress and results go through :mod:`logging` (logger
``plumage_ds``; rank 0 at INFO, other ranks WARNING); ``compare`` prints its table on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from typing import Optional

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")

logger = logging.getLogger("plumage_ds")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) instead of usage + error."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise _UsageError(f"{self.prog}: error: {message}")


class _UsageError(Exception):
    pass


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (pytest's capture swaps it)."""

    _plumage_ds = True

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging() -> None:
    """Rank 0 logs INFO to stderr, other ranks WARNING (``PLUMAGE_DS_LOG_LEVEL`` overrides)."""
    rank = int(os.environ.get("RANK", "0") or 0)
    level = os.environ.get("PLUMAGE_DS_LOG_LEVEL") or ("INFO" if rank == 0 else "WARNING")
    root = logging.getLogger("plumage_ds")
    if not any(getattr(h, "_plumage_ds", False) for h in root.handlers):
        handler = _StderrHandler()
        prefix = "[plumage_ds]" if rank == 0 else f"[plumage_ds rank {rank}]"
        handler.setFormatter(logging.Formatter(f"{prefix} %(message)s"))
        root.addHandler(handler)
        root.propagate = False
    root.setLevel(level.upper())


def parse_value(text: str, *, key: str = "value"):
    """YAML scalar/flow value of an override, plus numbers PyYAML 1.1 reads as strings.

    ``yaml.safe_load("1e-3")`` is the *string* ``'1e-3'`` (YAML 1.1 wants ``1.0e-3``);
    such values are turned into floats here so ``--set optimizer.lr=1e-3`` works. Text that is
    not YAML (``*attn`` is an alias to YAML) is an error naming the key: quote it.
    """
    import yaml

    from plumage_ds.config import ConfigError

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "parse error"
        raise ConfigError(f"--set {key}", text, f"not a YAML value ({first}); quote it, e.g. {key}=\"'{text}'\"") from None
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        return float(value)
    return value


def apply_overrides(cfg, overrides: list[str]):
    """Apply ``section.key=value`` overrides to a ``JobConfig`` and reload it strictly.

    The result goes through ``from_dict`` again, so every override is validated like a
    value from the YAML file (unknown keys and bad values raise ``ValueError`` naming them).
    """
    from plumage_ds.config import ConfigError, JobConfig, from_dict, to_dict

    data = to_dict(cfg)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise ConfigError("--set", item, "expected section.key=value")
        node = data
        for i, part in enumerate(parts[:-1]):
            if part not in node or not isinstance(node[part], dict):
                raise ConfigError("--set", item, f"unknown config section {'.'.join(parts[: i + 1])!r}")
            node = node[part]
        node[parts[-1]] = parse_value(text, key=key)
    return from_dict(JobConfig, data)


def load_job_config(path: str, overrides: Optional[list[str]] = None, steps: Optional[int] = None):
    """``load_config(path)`` + ``--set`` overrides + the ``--steps`` shortcut."""
    from plumage_ds.config import load_config

    cfg = load_config(path)
    overrides = list(overrides or [])
    if steps is not None:
        overrides.append(f"train.steps={steps}")
    return apply_overrides(cfg, overrides) if overrides else cfg


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="plumage-ds",
        description="Unbiased low-rank gradient estimators (PLUMAGE, GaLore, Haar, GUM): main job.",
    )
    # The ``deepspeed`` launcher appends ``--local_rank=N`` right after the module name,
    # i.e. before the subcommand; accepted (and ignored: LOCAL_RANK is in the environment).
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    tr = sub.add_parser("train", help="train a causal LM with any estimator on any engine")
    tr.add_argument("--config", help="YAML/JSON job config (see configs/); with --resume default OUT/config.yaml")
    tr.add_argument("--out", required=True, help="run directory (created; must be empty unless --overwrite/--resume)")
    tr.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value (YAML syntax), e.g. --set optimizer.estimator=galore",
    )
    tr.add_argument("--steps", type=int, help="shortcut for --set train.steps=N")
    tr.add_argument("--engine", help="shortcut for --set train.engine=NAME (local, ddp, ddp_hook, sharded, deepspeed, fsdp2, hsdp)")
    tr.add_argument(
        "--deepspeed",
        metavar="DS.json",
        help="shortcut for --set train.engine=deepspeed --set train.deepspeed_config=DS.json (see docs/main-job.md)",
    )
    mode = tr.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true", help="replace this job's results in a non-empty --out")
    mode.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar (default: only on a TTY)")
    tr.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    cmp_ = sub.add_parser("compare", help="compare run directories written by train")
    cmp_.add_argument("runs", nargs="+", metavar="DIR")
    plot = sub.add_parser("plot", help="plot train/eval loss and optimizer state of run directories")
    plot.add_argument("runs", nargs="+", metavar="RUN")
    plot.add_argument("--out", required=True, metavar="FILE.png", help="where to write the figure")
    return parser


def _job_config(args):
    from plumage_ds.config import ConfigError

    overrides = list(args.overrides)
    if args.engine is not None:
        overrides.append(f"train.engine={args.engine}")
    if args.deepspeed is not None:
        if args.engine not in (None, "deepspeed"):
            raise ConfigError("--engine", args.engine, "conflicts with --deepspeed (engine 'deepspeed')")
        overrides += ["train.engine=deepspeed", f"train.deepspeed_config={json.dumps(args.deepspeed)}"]
    if args.steps is not None and (isinstance(args.steps, bool) or args.steps < 1):
        raise ConfigError("--steps", args.steps, "must be a positive integer")
    path = args.config
    if path is None:
        if not args.resume:
            raise ConfigError("--config", None, "required (optional only with --resume, which reads OUT/config.yaml)")
        path = os.path.join(args.out, "config.yaml")
        if not os.path.isfile(path):
            from pathlib import Path

            from plumage_ds.train.loop import no_run_error

            raise no_run_error(Path(args.out))
    return load_job_config(path, overrides, args.steps)


def _train(args) -> int:
    from plumage_ds.train.loop import NonFiniteLossError, train

    try:
        cfg = _job_config(args)
        summary = train(cfg, args.out, overwrite=args.overwrite, resume=args.resume,
                        progress=False if args.no_progress else None)  # fmt: skip
    except NonFiniteLossError as err:
        logger.error("plumage-ds train: error: %s (partial results in %s)", err, args.out)
        return 1
    except (ValueError, FileExistsError) as err:
        logger.error("plumage-ds train: error: %s", str(err).replace("\n", " "))
        return 2
    if summary is not None:
        logger.info(
            "%s (%s, %d rank%s): final eval loss %.4f, train loss %.4f, optimizer state %d B per rank (max), "
            "%.0f tokens/s, %.1f s -> %s",
            cfg.optimizer.estimator, cfg.train.engine, summary["world_size"], "s" if summary["world_size"] > 1 else "",
            summary["final_eval_loss"], summary["final_train_loss"], summary["optimizer_state_bytes"],
            summary["tokens_per_s"] or 0.0, summary["wall_time_s"], args.out,
        )  # fmt: skip
    return 0


def _compare(args) -> int:
    from plumage_ds.train.compare import compare

    try:
        print(compare(args.runs))
    except ValueError as err:
        logger.error("plumage-ds compare: error: %s", err)
        return 2
    return 0


def _plot(args) -> int:
    from plumage_ds.train.plot import plot_runs

    try:
        path = plot_runs(args.runs, args.out)
    except ValueError as err:
        logger.error("plumage-ds plot: error: %s", err)
        return 2
    logger.info("wrote %s", path)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    setup_logging()
    try:
        args = _build_parser().parse_args(argv)
    except _UsageError as err:
        logger.error("%s", err)
        return 2
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)
    return {"train": _train, "compare": _compare, "plot": _plot}[args.command](args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
