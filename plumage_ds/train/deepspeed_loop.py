"""The main job under DeepSpeed: ``plumage-ds train --config JOB.yaml --deepspeed DS.json``.

Same outputs as the single-process job (:mod:`plumage_ds.train.loop`, ``docs/main-job.md``),
written by rank 0 only; see ``docs/deepspeed.md`` ("The main job under DeepSpeed").

What comes from where:

* **model, data, train** sections of the job config: the model (same seed on every rank),
  the corpus, steps, eval/log intervals, dtype, and — when the DeepSpeed JSON has no
  ``"scheduler"`` section — the LR schedule (``warmup_steps``, ``lr_schedule``).
* **DeepSpeed JSON**: the optimizer (``optimizer.params``, the ``"plumage"`` section,
  ``gradient_clipping``), ZeRO stage, batch sizes (``train_micro_batch_size_per_gpu``,
  ``gradient_accumulation_steps``, ``train_batch_size``; when none of the three is given
  they are filled from ``data.batch_size`` / ``train.grad_accum``). The job's
  ``optimizer:`` section is *replaced* by the values from the JSON (so ``config.yaml`` and
  ``summary.json`` say what ran); ``--set optimizer.*`` with ``--deepspeed`` is an error.

Invariants: every rank makes the same collective calls in the same order (the loss
all-reduce of every step, the eval forward passes — collective under ZeRO-3 — and the final
gathers); a non-finite loss is detected from the all-reduced loss, so every rank stops at
the same step, before the optimizer step that would apply it.
"""

from __future__ import annotations

import gc
import json
import math
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from plumage_ds.config import JobConfig, from_dict, to_dict

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def read_deepspeed_config(path: str | os.PathLike) -> dict:
    """Load and validate a ``--deepspeed`` JSON without touching ``torch.distributed``.

    Raises ``ValueError`` naming the problem: missing/unreadable file, invalid JSON, no
    ``"plumage"`` section, any error of :func:`~plumage_ds.integrations.deepspeed.split_config`
    (unknown key in ``plumage`` or ``optimizer.params``, unsupported fp16/bf16...).
    """
    from plumage_ds.integrations.deepspeed import split_config

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"Invalid --deepspeed {str(path)!r}: no such file")
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"Invalid --deepspeed {str(path)!r}: cannot read it ({err})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"Invalid --deepspeed {str(path)!r}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"Invalid --deepspeed {str(path)!r}: expected a JSON object")
    if not isinstance(raw.get("plumage"), dict):
        raise ValueError(
            f"Invalid --deepspeed {str(path)!r}: no \"plumage\" section (a mapping of PLUMAGE options, "
            "see configs/deepspeed/zero2.json); the main job needs it to build the optimizer"
        )
    try:
        split_config(raw)
    except (ValueError, NotImplementedError) as err:
        raise ValueError(f"Invalid --deepspeed {str(path)!r}: {err}") from None
    for key in BATCH_KEYS:
        v = raw.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"Invalid --deepspeed {str(path)!r}: {key}={v!r} must be a positive integer")
    return raw


def check_batch_sizes(raw: dict, world_size: int, *, where: str = "--deepspeed") -> None:
    """The check DeepSpeed does at ``initialize`` (``train_batch_size == micro * GAS * W``), done early."""
    tb, mb, gas = (raw.get(k) for k in BATCH_KEYS)
    problem = None
    if tb is not None and mb is not None and gas is not None and tb != mb * gas * world_size:
        problem = f"train_batch_size={tb} != train_micro_batch_size_per_gpu={mb} * gradient_accumulation_steps={gas} * world_size={world_size}"
    elif tb is not None and mb is not None and gas is None and tb % (mb * world_size):
        problem = f"train_batch_size={tb} is not a multiple of train_micro_batch_size_per_gpu={mb} * world_size={world_size}"
    elif tb is not None and gas is not None and mb is None and tb % (gas * world_size):
        problem = f"train_batch_size={tb} is not a multiple of gradient_accumulation_steps={gas} * world_size={world_size}"
    elif tb is not None and mb is None and gas is None and tb % world_size:
        problem = f"train_batch_size={tb} is not a multiple of world_size={world_size}"
    elif tb is None and mb is None and gas is not None:
        problem = "gradient_accumulation_steps alone: give train_micro_batch_size_per_gpu or train_batch_size too"
    if problem:
        raise ValueError(f"Invalid {where} batch sizes: {problem}")


def resolve_config(cfg: JobConfig, raw: dict) -> tuple[JobConfig, dict]:
    """``(job config with the optimizer section taken from the JSON, DeepSpeed config to use)``.

    Batch keys absent from the JSON are filled from the job (``data.batch_size``,
    ``train.grad_accum``) when none of the three is given. Raises ``ValueError`` on
    conflicts (``train.dtype`` vs ``bf16.enabled``).
    """
    from plumage_ds.integrations.deepspeed import split_config

    ds = json.loads(json.dumps(raw))
    if not any(ds.get(k) is not None for k in BATCH_KEYS):
        ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
        ds["gradient_accumulation_steps"] = cfg.train.grad_accum
    _, section, adam, clip, _ = split_config(ds)
    bf16 = bool((ds.get("bf16", {}) or {}).get("enabled"))
    if bf16 != (cfg.train.dtype == "bfloat16"):
        raise ValueError(
            f"Conflicting dtype: train.dtype={cfg.train.dtype!r} but the DeepSpeed config has "
            f"bf16.enabled={str(bf16).lower()}; use train.dtype=bfloat16 exactly when bf16 is enabled"
        )
    data = to_dict(cfg)
    data["optimizer"].update(
        {
            "estimator": section.estimator,
            "lr": adam["lr"],
            "betas": list(adam["betas"]),
            "eps": adam["eps"],
            "weight_decay": adam["weight_decay"],
            "rank": section.rank,
            "update_interval": section.update_interval,
            "scale": section.scale,
            "dinv_placement": section.dinv_placement,
            "realign": section.realign,
            "svd_method": section.svd_method,
            "seed": section.seed,
            "target_modules": list(section.target_modules),
            "strict": section.strict,
            "grad_clip": clip,
        }
    )
    return from_dict(JobConfig, data, where="JobConfig"), ds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def _init_distributed() -> None:
    """``deepspeed.init_distributed`` (gloo on CPU); a plain single process gets env defaults."""
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if "RANK" not in os.environ:  # not under a launcher: a world of one
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    cpu = os.environ.get("DS_ACCELERATOR", "") == "cpu" or not torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="gloo" if cpu else None)


def train_deepspeed(
    cfg: JobConfig,
    out_dir: str | os.PathLike,
    ds_raw: dict,
    *,
    overwrite: bool = False,
    progress: Optional[bool] = None,
) -> Optional[dict]:
    """Run the main job under DeepSpeed; rank 0 returns the summary, other ranks ``None``.

    ``ds_raw`` is the JSON from :func:`read_deepspeed_config`. Creates the process group
    (``deepspeed.init_distributed``) and destroys it before returning. Raises
    :class:`~plumage_ds.train.loop.NonFiniteLossError` on every rank (after rank 0 has
    written ``summary.json``) if the loss diverges; ``ValueError`` for a config DeepSpeed
    rejects (e.g. batch sizes inconsistent with the world size).
    """
    import torch.distributed as dist

    from plumage_ds.train.data import BatchStream, load_corpus
    from plumage_ds.train.loop import (
        NonFiniteLossError,
        StepRecorder,
        _write_json,
        check_job,
        check_out_dir,
        evaluate,
        lr_multiplier,
        prepare_out_dir,
    )
    from plumage_ds.train.model import build_model, causal_lm_loss

    cfg, ds = resolve_config(cfg, ds_raw)
    check_job(cfg)
    check_batch_sizes(ds, world_size_from_env())
    rank0 = int(os.environ.get("RANK", "0") or 0) == 0
    if rank0:
        check_out_dir(out_dir, overwrite=overwrite)
    tc = cfg.train
    if tc.num_threads > 0:
        torch.set_num_threads(tc.num_threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[tc.dtype]

    wall_start = time.perf_counter()
    _init_distributed()
    engine = None
    clean = False  # every rank reached the same point: collectives in teardown are safe
    try:
        from plumage_ds.integrations import deepspeed as pds

        rank, world = dist.get_rank(), dist.get_world_size()
        corpus = load_corpus(cfg.data)
        stream = BatchStream(corpus, cfg.data, seed=tc.seed)
        eval_set = stream.eval_set(tc.eval_batches)
        model = build_model(cfg.model, seed=tc.seed, dtype=dtype)
        model.train()
        kwargs = {}
        if "scheduler" not in ds:
            kwargs["lr_scheduler"] = lambda opt: torch.optim.lr_scheduler.LambdaLR(
                opt,
                lambda s: lr_multiplier(s, steps=tc.steps, warmup_steps=tc.warmup_steps, schedule=tc.lr_schedule),
            )
        try:
            engine, _, _, _ = pds.initialize(model=model, config=ds, **kwargs)
        except AssertionError as err:  # DeepSpeed's config checks are asserts
            raise ValueError(f"Invalid --deepspeed config (rejected by DeepSpeed): {err}") from None
        opt = pds.plumage_optimizer(engine)
        micro, gas = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
        data = to_dict(cfg)
        data["data"]["batch_size"], data["train"]["grad_accum"] = micro, gas
        cfg = from_dict(JobConfig, data, where="JobConfig")
        stream = BatchStream(corpus, cfg.data, seed=tc.seed)
        tokens_per_step = micro * gas * world * cfg.data.seq_len
        summary: dict[str, Any] = {
            "status": "running",
            "config": to_dict(cfg),
            "deepspeed_config": ds_raw,
            "world_size": world,
            "zero_stage": opt.stage,
            "corpus": corpus.describe(),
            "num_params": sum(p.numel() for p in model.parameters()),
            "num_threads": torch.get_num_threads(),
            "versions": {"python": sys.version.split()[0], "torch": torch.__version__},
            "matrices": opt.matrix_report(),
        }
        import deepspeed

        summary["versions"]["deepspeed"] = deepspeed.__version__
        out = None
        if rank0:
            import yaml

            out = prepare_out_dir(out_dir, overwrite=overwrite)
            (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
        from tqdm import tqdm

        if progress is None:
            progress = sys.stderr.isatty()
        bar = tqdm(total=tc.steps, disable=not (progress and rank0), desc=f"{cfg.optimizer.estimator}/ds", unit="step")
        metrics = open(out / "metrics.jsonl", "w", encoding="utf-8") if rank0 else None

        def log(row: dict) -> None:
            if metrics is not None:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()

        rec = StepRecorder(tc, tokens_per_step=tokens_per_step, log=log)
        try:
            for s in range(tc.steps):
                t0 = time.perf_counter()
                lr = float(engine.get_lr()[0])
                local = 0.0
                micros = stream.micro_batches(s, gas, rank=rank, world_size=world)
                for j, mb in enumerate(micros):
                    loss = causal_lm_loss(engine, mb)
                    engine.backward(loss)  # DeepSpeed scales by 1/GAS
                    local += float(loss.detach()) / gas
                    if j < gas - 1:
                        engine.step()  # not a boundary: bookkeeping only
                t = torch.tensor([local], dtype=torch.float64)
                dist.all_reduce(t)
                step_loss = float(t) / world
                if not math.isfinite(step_loss):
                    raise NonFiniteLossError(
                        f"Non-finite training loss={step_loss} at step {s + 1} "
                        f"(estimator={cfg.optimizer.estimator!r}, lr={lr:.3g}, world_size={world}); stopped"
                    )
                engine.step()  # the accumulation boundary: the optimizer step
                # every rank evaluates (ZeRO-3 forward passes are collective); same data → same value
                rec.record(s, step_loss, time.perf_counter() - t0, lr, lambda: evaluate(engine, eval_set))
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.3f}")
            summary["status"] = "completed"
            clean = True
        except NonFiniteLossError as err:
            summary["status"] = "diverged"
            summary["error"] = str(err)
            clean = True  # detected from all-reduced values: every rank raises at the same point
            raise
        finally:
            bar.close()
            if metrics is not None:
                metrics.close()
            detail = opt.state_bytes()
            per_rank = [int(detail["total"])]
            if clean:
                gathered: list = [None] * world
                dist.all_gather_object(gathered, int(detail["total"]))
                per_rank = [int(x) for x in gathered]
            summary.update(rec.summary())
            summary.update(
                {
                    "optimizer_state_bytes": max(per_rank),
                    "optimizer_state_bytes_per_rank": per_rank,
                    "optimizer_state_detail": detail,
                    "comm_bytes_total": opt.comm_stats()["total"],
                    "wall_time_s": time.perf_counter() - wall_start,
                }
            )
            if summary["status"] == "running":
                summary["status"] = "failed"
            if rank0:
                _write_json(out / "summary.json", summary)
        return summary if rank0 else None
    finally:
        # ENGINE-NOTES teardown: drop the engine (its hooks hold the group), collect, barrier, destroy.
        engine = opt = model = None  # noqa: F841
        gc.collect()
        if dist.is_initialized():
            if clean:
                dist.barrier()
            dist.destroy_process_group()
