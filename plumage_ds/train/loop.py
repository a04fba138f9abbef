"""The main job's one training loop, for every engine (:mod:`plumage_ds.train.engines`).

Outputs in the run directory (see ``docs/main-job.md``), written by rank 0:

* ``config.yaml`` — the fully resolved config (reloads with ``load_config``);
* ``metrics.jsonl`` — one JSON object per line, flushed as written:
  ``{"step", "loss", "lr", "tokens_per_s"}`` every ``log_interval`` steps and on the last
  step, and ``{"step", "eval_loss"}`` every ``eval_interval`` steps and on the last step;
* ``checkpoints/step_<N>/`` every ``save_interval`` steps and at the last step
  (:mod:`plumage_ds.train.checkpoint`);
* ``model/`` — the final weights, ``save_pretrained`` (safetensors), loadable by ``transformers``;
* ``summary.json`` — written at the end, and also when training stops on a non-finite
  loss (``status="diverged"``) or fails after the run directory exists (``status="failed"``,
  a refused ``--resume`` included), with the one-line ``error``, so what was logged is never lost.

Paths in the config are made absolute when the job starts (:func:`resolve_paths`). A resume takes
the newest checkpoint whose files match their manifest's digests and keeps the checkpoint's global
batch on another world size (:func:`check_resume`, :func:`keep_global_batch`).

Invariants: ``step`` counts optimizer steps done (1-based); ``loss`` is the mean training
loss (over ranks and micro-batches) over the steps since the previous log line;
``tokens_per_s`` counts training tokens (inputs, not the shifted targets) over training time
only (eval and checkpoint time excluded); the LR multiplier for optimizer step ``s`` (0-based)
is :func:`lr_multiplier`. Every rank makes the same collective calls in the same order; a
non-finite loss is detected from the all-reduced loss, so every rank stops at the same step,
before the optimizer step that would apply it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from plumage_ds.config import ConfigError, JobConfig, TrainConfig, from_dict, to_dict
from plumage_ds.io import atomic_write_json, atomic_write_text
from plumage_ds.train.engines.base import MIN_LR_RATIO, lr_multiplier

__all__ = [
    "MIN_LR_RATIO", "NonFiniteLossError", "StepRecorder", "check_job", "keep_global_batch", "lr_multiplier",
    "resolve_paths", "train",
]  # fmt: skip

logger = logging.getLogger("plumage_ds.train")

OUTPUT_FILES = ("config.yaml", "metrics.jsonl", "summary.json")
OUTPUT_DIRS = ("checkpoints", "model")
KILL_ENV = "PLUMAGE_DS_KILL_AFTER_STEP"
"""Fault injection for tests: after this step (and its checkpoint, if any) the process kills
itself with SIGKILL — no cleanup runs, exactly as a ``kill -9`` would leave things. Only in the
first attempt of an elastic job, and only on rank ``$PLUMAGE_DS_KILL_RANK`` when that is set."""
KILL_RANK_ENV = "PLUMAGE_DS_KILL_RANK"
RESTART_ENV = "TORCHELASTIC_RESTART_COUNT"
"""Set by ``torchrun`` (0 in the first attempt): a restarted attempt continues the run in ``--out``."""


def elastic_restart() -> int:
    """How many times ``torchrun --max-restarts`` restarted this job (0: first attempt or no torchrun)."""
    return int(os.environ.get(RESTART_ENV, "0") or 0)


def _kill_point(step: int, rank: int) -> bool:
    """Whether the test fault injection (:data:`KILL_ENV`) fires after ``step`` on ``rank``."""
    after = int(os.environ.get(KILL_ENV, "0") or 0)
    victim = os.environ.get(KILL_RANK_ENV)
    return bool(after) and step == after and elastic_restart() == 0 and (victim is None or int(victim) == rank)


class NonFiniteLossError(RuntimeError):
    """Training loss became NaN/inf; ``summary.json`` has ``status="diverged"``."""


class StepRecorder:
    """Per-step bookkeeping: windowed train loss and tokens/s every ``log_interval`` steps (and
    at the last), eval every ``eval_interval`` steps (and at the last); a non-finite eval loss
    raises :class:`NonFiniteLossError`. Eval time is not counted in ``train_time``.
    :meth:`state` / :meth:`load_state` carry the loss window across a resume, bit for bit."""

    def __init__(self, train_cfg: TrainConfig, *, tokens_per_step: int, log) -> None:
        self.tokens_per_step = tokens_per_step
        self.log_interval = train_cfg.log_interval
        self.eval_interval = train_cfg.eval_interval
        self.total_steps = train_cfg.steps
        self.log = log
        self.train_time = 0.0  # seconds spent in training steps (eval excluded)
        self.window_time, self.window_losses = 0.0, []
        self.final_train_loss: Optional[float] = None
        self.final_eval_loss: Optional[float] = None
        self.steps_done = 0

    def record(self, step_index: int, step_loss: float, dt: float, lr: float, evaluate) -> None:
        self.train_time += dt
        self.window_time += dt
        self.window_losses.append(step_loss)
        self.steps_done = step_index + 1
        last = self.steps_done == self.total_steps
        if self.steps_done % self.log_interval == 0 or last:
            self.final_train_loss = sum(self.window_losses) / len(self.window_losses)
            self.log(
                {
                    "step": self.steps_done,
                    "loss": self.final_train_loss,
                    "lr": lr,
                    "tokens_per_s": self.tokens_per_step * len(self.window_losses) / max(self.window_time, 1e-9),
                }
            )
            self.window_time, self.window_losses = 0.0, []
        if self.steps_done % self.eval_interval == 0 or last:
            self.final_eval_loss = evaluate()
            self.log({"step": self.steps_done, "eval_loss": self.final_eval_loss})
            if not math.isfinite(self.final_eval_loss):
                raise NonFiniteLossError(f"Non-finite eval loss={self.final_eval_loss} at step {self.steps_done}; stopped")

    def state(self) -> dict:
        keys = ("train_time", "window_time", "window_losses", "final_train_loss", "final_eval_loss", "steps_done")
        return {k: getattr(self, k) for k in keys}

    def load_state(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, list(v) if k == "window_losses" else v)

    def summary(self) -> dict:
        """The bookkeeping keys of ``summary.json``."""
        return {
            "steps_completed": self.steps_done,
            "final_train_loss": self.final_train_loss,
            "final_eval_loss": self.final_eval_loss,
            "train_time_s": self.train_time,
            "tokens_per_s": self.tokens_per_step * self.steps_done / self.train_time if self.train_time > 0 else None,
        }


# --------------------------------------------------------------------------- checks (no process group)


def world_size_from_env() -> int:
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def rank_from_env() -> int:
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


def check_job(cfg: JobConfig, world_size: Optional[int] = None):
    """Every check a config can fail, before any process group: tokenizer, model (its config, and the
    model itself built on the ``meta`` device), ``optimizer.rank`` against its target matrices, engine.

    Returns the tokenizer. Raises :class:`ValueError` (naming the key) for anything wrong.
    """
    from plumage_ds.train.data import Tokenizer
    from plumage_ds.train.engines import engine_class
    from plumage_ds.train.model import build_meta_model

    tokenizer = Tokenizer(cfg.data.tokenizer)
    check_rank(cfg, build_meta_model(cfg.model, vocab_size=tokenizer.vocab_size, seq_len=cfg.data.seq_len))
    world = world_size if world_size is not None else world_size_from_env()
    batch = cfg.data.batch_size * cfg.train.grad_accum * world
    if cfg.train.eval_batches * cfg.data.batch_size < 1 or batch < 1:
        raise ConfigError("data.batch_size", cfg.data.batch_size, "must be >= 1")
    spec = cfg.optimizer.spec
    if not spec.in_optimizer and cfg.train.engine != "ddp_hook":
        from plumage_ds.train.engines.base import unsupported

        raise unsupported(cfg.train.engine, spec.name, "it runs in the DDP comm hook only (train.engine=ddp_hook)")
    engine_class(cfg.train.engine).check(cfg, world)
    return tokenizer


def check_rank(cfg: JobConfig, model: torch.nn.Module) -> None:
    """``optimizer.rank`` must be below the short side of some target matrix (of every one with
    ``optimizer.strict``), checked on ``model``'s shapes (built on the ``meta`` device) before anything is built.

    Applies wherever the target selection is used: every estimator but ``adamw`` without ``dense_lr``."""
    opt = cfg.optimizer
    if opt.spec.family == "adamw" and opt.dense_lr is None:
        return
    from plumage_ds.optim import select_targets

    sides = {name: min(p.shape) for name, p, _ in select_targets(model, opt.target_modules)}
    if opt.strict and opt.rank >= min(sides.values()):
        name = min(sides, key=sides.get)
        raise ConfigError(
            "optimizer.rank", opt.rank,
            f"optimizer.strict=true and target {name!r} has short side {sides[name]} (largest usable: {sides[name] - 1})",
        )  # fmt: skip
    if opt.rank >= max(sides.values()):
        raise ConfigError(
            "optimizer.rank", opt.rank,
            f"no target matrix can take the low-rank path: the rank must be below a matrix's short side, and the "
            f"largest of the {len(sides)} targets is {max(sides.values())} (largest usable: {max(sides.values()) - 1})",
        )  # fmt: skip


def resolve_paths(cfg: JobConfig, base: Optional[str] = None) -> JobConfig:
    """``cfg`` with every file/folder path absolute (``~`` expanded, relative ones joined to ``base``,
    default the working directory): ``data.path`` (a glob too), ``data.tokenizer`` (unless ``byte``),
    ``model.config``, ``train.deepspeed_config``. ``config.yaml`` records them so, and a resume works
    from any directory."""
    import dataclasses

    def absolute(path: Optional[str]) -> Optional[str]:
        if path is None:
            return None
        path = os.path.expanduser(path)
        return path if os.path.isabs(path) else os.path.abspath(os.path.join(base or os.getcwd(), path))

    tok = cfg.data.tokenizer
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, path=absolute(cfg.data.path), tokenizer=tok if tok == "byte" else absolute(tok)),
        model=dataclasses.replace(cfg.model, config=absolute(cfg.model.config)),
        train=dataclasses.replace(cfg.train, deepspeed_config=absolute(cfg.train.deepspeed_config)),
    )


BATCH_KEYS = (("data", "batch_size"), ("train", "grad_accum"))
"""The keys a resume may change (they set how the global batch splits over ranks)."""


def keep_global_batch(cfg: JobConfig, saved: JobConfig, *, global_batch: int, saved_world: int, world: int):
    """``(config to run, note or None)`` for resuming on ``world`` ranks a checkpoint whose steps took
    ``global_batch`` windows (``saved_world`` ranks, ``saved`` the run's config).

    ``data.batch_size`` / ``train.grad_accum`` set differently from ``saved`` are used as given (the
    note says when the global batch changes). Left as saved, they are re-chosen so that
    ``batch_size * grad_accum * world == global_batch``: ``grad_accum`` scaled when that divides,
    else the largest ``batch_size`` not above the saved one that does; the note says what changed.
    A global batch ``world`` does not divide is a ``ConfigError``."""
    import dataclasses

    b, a = cfg.data.batch_size, cfg.train.grad_accum
    now = b * a * world
    if now == global_batch:
        return cfg, None
    if (b, a) != (saved.data.batch_size, saved.train.grad_accum):
        return cfg, (
            f"--resume: the global batch changes from {global_batch} to {now} windows per step "
            f"(data.batch_size={b} x train.grad_accum={a} x {world} rank{'s' if world > 1 else ''}, as set)"
        )
    if global_batch % world:
        raise ConfigError(
            "--resume", f"{world} ranks",
            f"the checkpoint's global batch of {global_batch} windows per step (saved on {saved_world} ranks) does not "
            f"split over {world} ranks; resume on a world size dividing {global_batch}, or set data.batch_size and "
            "train.grad_accum (global batch = batch_size x grad_accum x world size)",
        )  # fmt: skip
    per_rank = global_batch // world
    b2 = b if per_rank % b == 0 else max(d for d in range(1, min(b, per_rank) + 1) if per_rank % d == 0)
    a2 = per_rank // b2
    changed = ", ".join(f"{k} {x} -> {y}" for k, x, y in (("data.batch_size", b, b2), ("train.grad_accum", a, a2)) if x != y)
    new = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, batch_size=b2), train=dataclasses.replace(cfg.train, grad_accum=a2)
    )
    return new, (
        f"--resume on {world} rank{'s' if world > 1 else ''} of a run saved on {saved_world}: {changed} "
        f"keep{'s' if ',' not in changed else ''} the global batch of {global_batch} windows per step"
    )


def no_run_error(out: Path) -> ValueError:
    """``--resume`` on a directory that holds no run."""
    return ValueError(
        f"Invalid --resume: no complete checkpoint in {out / 'checkpoints'} (no run in {str(out)!r}: it has no config.yaml)"
    )


def check_out_dir(out_dir: str | os.PathLike, *, overwrite: bool) -> Path:
    """Refuse a non-directory or a non-empty ``out_dir`` (unless ``overwrite``); create nothing."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError("--out", str(out), "exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"Invalid --out={str(out)!r}: not empty; pass --overwrite to replace its results or --resume")
    return out


def check_resume(out_dir: str | os.PathLike, cfg: JobConfig, world_size: Optional[int] = None) -> tuple[int, Path, JobConfig]:
    """``--resume``: ``out_dir`` holds this config and a usable checkpoint; return ``(step, path, config to run)``.

    The config must equal ``OUT/config.yaml`` (paths compared absolute) except :data:`BATCH_KEYS`,
    which :func:`keep_global_batch` settles against the checkpoint's global batch (one logged line
    when anything changes). The checkpoint is the newest whose files match their manifest's
    SHA-256 (:func:`~plumage_ds.train.checkpoint.find_resume_point`).
    """
    from plumage_ds.config import load_config
    from plumage_ds.train.checkpoint import find_resume_point, read_trainer

    out = Path(out_dir)
    saved_path = out / "config.yaml"
    if not saved_path.is_file():
        raise no_run_error(out)
    saved = resolve_paths(load_config(saved_path))
    mine, theirs = to_dict(cfg), to_dict(saved)
    for section in mine:
        for key in sorted(set(mine[section]) | set(theirs[section])):
            if (section, key) not in BATCH_KEYS and mine[section].get(key) != theirs[section].get(key):
                raise ValueError(
                    f"Conflicting {section}.{key}={mine[section].get(key)!r} with --resume: {saved_path} has "
                    f"{theirs[section].get(key)!r}; a resumed run must use the config it started with"
                )
    step, path = find_resume_point(out)
    trainer = read_trainer(path)
    saved_world = int(trainer.get("world_size", 1))
    global_batch = int(trainer.get("global_batch") or saved.data.batch_size * saved.train.grad_accum * saved_world)
    world = world_size if world_size is not None else world_size_from_env()
    run_cfg, note = keep_global_batch(cfg, saved, global_batch=global_batch, saved_world=saved_world, world=world)
    if note:
        logger.warning("%s", note)
    return step, path, run_cfg


def _one_line(err: BaseException) -> str:
    return str(err).replace("\n", " ").strip() or type(err).__name__


def _record_refused_resume(out: Path, cfg: JobConfig, err: BaseException) -> None:
    """A resume refused before it started still leaves ``summary.json`` with ``status: failed`` and the
    ``error`` (a completed run's summary is kept as it is)."""
    if not (out / "config.yaml").is_file():
        return
    try:
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = {"config": to_dict(cfg), "engine": cfg.train.engine}
    if not isinstance(summary, dict) or summary.get("status") == "completed":
        return
    summary.update(status="failed", error=_one_line(err))
    atomic_write_json(out / "summary.json", summary)


def prepare_out_dir(out_dir: str | os.PathLike, *, overwrite: bool) -> Path:
    """Create ``out_dir``; with ``overwrite`` remove only this job's own outputs."""
    import shutil

    out = check_out_dir(out_dir, overwrite=overwrite)
    for name in OUTPUT_FILES:
        (out / name).unlink(missing_ok=True)
    for name in OUTPUT_DIRS:
        shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Size):
        return list(obj)
    if torch.is_tensor(obj) and obj.numel() == 1:
        return obj.item()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the metric lines up to ``step`` (a killed run may have logged beyond its checkpoint)."""
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    kept = [x for x in lines if x.strip() and json.loads(x)["step"] <= step]
    atomic_write_text(path, "".join(x + "\n" for x in kept))


# --------------------------------------------------------------------------- the loop


@torch.no_grad()
def evaluate(engine, batches: list[torch.Tensor]) -> float:
    """Mean loss over the (equal-sized) eval batches, the same value on every rank.

    Engines whose forward is collective (ZeRO-3) evaluate every batch on every rank; the others
    split the batches across ranks (rank ``k`` takes ``k, k+W, ...``) and all-reduce the sum.
    """
    from plumage_ds.train.model import causal_lm_loss

    module = engine.eval_module()
    was_training = module.training
    module.eval()
    if engine.collective_forward:
        mine = batches
    else:
        mine = batches[engine.rank :: engine.world_size]
    total = sum(causal_lm_loss(module, b.to(engine.device)).item() for b in mine)
    module.train(was_training)
    if engine.collective_forward:
        return total / len(batches)
    return engine.all_reduce_sum([total])[0] / len(batches)


def train(
    cfg: JobConfig,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: Optional[bool] = None,
) -> Optional[dict]:
    """Run the job described by ``cfg`` into ``out_dir``; rank 0 returns the summary, others ``None``.

    Creates the process group the engine needs (or joins the launcher's / an existing one) and
    destroys what it created before returning. Raises :class:`NonFiniteLossError` on every rank
    (after rank 0 has written ``summary.json``) if the loss diverges; ``ValueError`` for bad input.
    """
    from plumage_ds.train.checkpoint import CHECKPOINTS, load_checkpoint, save_checkpoint, save_pretrained
    from plumage_ds.train.data import BatchStream, load_corpus
    from plumage_ds.train.engines import engine_class
    from plumage_ds.train.model import build_model, describe_model, probe_forward

    cfg = resolve_paths(cfg)
    tokenizer = check_job(cfg)
    out = Path(out_dir)
    if elastic_restart() and not resume:
        # torchrun restarted the job after a failure: continue from the newest complete checkpoint
        # of this run, or start it over when it saved none (every rank decides alike)
        from plumage_ds.io import newest_complete

        resume = newest_complete(out / CHECKPOINTS) is not None
        overwrite = overwrite or not resume
        logger.info("elastic restart %d: %s", elastic_restart(), "resuming" if resume else "starting over")
    resume_point: Optional[str] = None
    if rank_from_env() == 0:  # fail fast, before any process group exists
        if resume:
            try:
                _, path, cfg = check_resume(out, cfg)
                tokenizer = check_job(cfg)  # the batch split may have been re-chosen for this world size
            except ValueError as err:
                _record_refused_resume(out, cfg, err)
                raise
            resume_point = str(path)
        else:
            check_out_dir(out, overwrite=overwrite)
    tc = cfg.train
    if tc.num_threads > 0:
        torch.set_num_threads(tc.num_threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[tc.dtype]
    wall_start = time.perf_counter()
    engine = engine_class(tc.engine)(cfg)
    engine.init_process_group()
    rank0 = engine.rank == 0
    clean = False  # every rank reached the same point: collectives in teardown are safe
    summary: dict[str, Any] = {"status": "running", "config": to_dict(cfg), "engine": tc.engine}
    rec: Optional[StepRecorder] = None
    metrics = None
    bar = None
    try:
        # rank 0 chose the checkpoint and the batch split: every rank runs with them
        resume_from, job = engine.broadcast_object((resume_point, to_dict(cfg)) if rank0 else None)
        cfg = engine.job = from_dict(JobConfig, job)
        engine.cfg = cfg.optimizer
        tc = cfg.train
        summary["config"] = job
        corpus = load_corpus(cfg.data, tokenizer)
        corpus_desc = corpus.describe()
        if rank0 and corpus.note:
            logger.warning("%s", corpus.note)
        stream = BatchStream(corpus, cfg.data, seed=tc.seed)
        eval_set = stream.eval_set(tc.eval_batches)
        model = build_model(cfg.model, vocab_size=corpus.vocab_size, seq_len=cfg.data.seq_len, seed=tc.seed, dtype=dtype)
        probe_forward(model, cfg.model, seq_len=cfg.data.seq_len)
        model.train()
        engine.setup(model)
        global_batch = cfg.data.batch_size * tc.grad_accum * engine.world_size
        tokens_per_step = global_batch * cfg.data.seq_len
        start = 0

        def log(row: dict) -> None:
            if metrics is not None:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()

        rec = StepRecorder(tc, tokens_per_step=tokens_per_step, log=log)
        if resume_from is not None:
            trainer = load_checkpoint(engine, Path(resume_from))
            start = int(trainer["step"])
            rec.load_state(trainer["recorder"])
            logger.info("resumed from %s at step %d (saved on world_size=%d)", resume_from, start, trainer["world_size"])
            if rank0 and trainer.get("corpus_sha1", corpus_desc["sha1"]) != corpus_desc["sha1"]:
                logger.warning(
                    "--resume: the corpus differs from the one the checkpoint trained on (token sha1 %s, now %s): "
                    "data.path=%r changed since", trainer["corpus_sha1"][:12], corpus_desc["sha1"][:12], cfg.data.path,
                )  # fmt: skip
        if rank0:
            import yaml

            if resume_from is None:
                prepare_out_dir(out, overwrite=overwrite)
                atomic_write_text(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
            _truncate_metrics(out / "metrics.jsonl", start)
            metrics = open(out / "metrics.jsonl", "a", encoding="utf-8")
        summary.update(
            {
                "world_size": engine.world_size,
                "corpus": corpus_desc,
                "model": describe_model(model),
                "num_params": sum(p.numel() for p in model.parameters()),
                "num_threads": torch.get_num_threads(),
                "tokens_per_step": tokens_per_step,
                "versions": {"python": sys.version.split()[0], "torch": torch.__version__},
                "matrices": engine.rows,
                "resumed_from_step": start if resume_from is not None else None,
            }
        )
        if engine.name == "deepspeed":
            import deepspeed

            summary["versions"]["deepspeed"] = deepspeed.__version__
            summary["zero_stage"] = engine.stage
        tok_file = getattr(tokenizer, "file", None)
        ckpt_root = out / CHECKPOINTS
        if progress is None:
            progress = sys.stderr.isatty()
        from tqdm import tqdm

        bar = tqdm(total=tc.steps, initial=start, disable=not (progress and rank0), desc=cfg.optimizer.estimator, unit="step")
        for s in range(start, tc.steps):
            t0 = time.perf_counter()
            lr = engine.lr()
            micros = stream.micro_batches(s, tc.grad_accum, rank=engine.rank, world_size=engine.world_size)
            local = sum(engine.micro_step(mb, j, len(micros)) for j, mb in enumerate(micros)) / len(micros)
            step_loss = engine.all_reduce_mean(local)
            if not math.isfinite(step_loss):
                raise NonFiniteLossError(
                    f"Non-finite training loss={step_loss} at step {s + 1} "
                    f"(estimator={cfg.optimizer.estimator!r}, lr={lr:.3g}, engine={tc.engine!r}); stopped"
                )
            engine.optimizer_step()
            rec.record(s, step_loss, time.perf_counter() - t0, lr, lambda: evaluate(engine, eval_set))
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}")
            if tc.save_interval and ((s + 1) % tc.save_interval == 0 or s + 1 == tc.steps):
                saved = {"recorder": rec.state(), "global_batch": global_batch, "corpus_sha1": corpus_desc["sha1"]}
                path = save_checkpoint(engine, ckpt_root, s + 1, saved, keep_last=tc.keep_last, tokenizer_file=tok_file)
                logger.info("checkpoint %s", path)
            if _kill_point(s + 1, engine.rank):
                if metrics is not None:
                    metrics.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        save_pretrained(engine, out / "model", tok_file)
        summary["status"] = "completed"
        clean = True
    except NonFiniteLossError as err:
        summary["status"] = "diverged"
        summary["error"] = str(err)
        clean = True  # decided from all-reduced values: every rank raises at the same point
        raise
    except BaseException as err:
        summary["error"] = _one_line(err)
        raise
    finally:
        if bar is not None:
            bar.close()
        if metrics is not None:
            metrics.close()
        if engine.optimizer is not None:
            total, detail = engine.state_bytes()
            per_rank = engine.gather_object(total) if clean else [total]
            stats = engine.comm_stats()
            summary.update(
                {
                    "optimizer_state_bytes": max(per_rank),
                    "optimizer_state_bytes_per_rank": per_rank,
                    "optimizer_state_detail": detail,
                    "comm_bytes_total": stats["total"] if stats else None,
                    # HSDP: the replicate group (inter-node links) is counted on its own
                    "comm_bytes_replicate_total": (stats.get("replicate") or {}).get("total") if stats else None,
                }
            )
        summary.update(rec.summary() if rec is not None else {"steps_completed": 0})
        summary["wall_time_s"] = time.perf_counter() - wall_start
        if summary["status"] == "running":
            summary["status"] = "failed"
        if rank0 and out.is_dir() and (out / "config.yaml").is_file():
            atomic_write_json(out / "summary.json", summary, default=_json_default)
        engine.close(clean)
    return summary if rank0 else None
