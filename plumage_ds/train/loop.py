"""The single-process main job: train a small LLaMA on the embedded corpus.

Outputs in the run directory (see ``docs/main-job.md``):

* ``config.yaml`` — the fully resolved config (reloads with ``load_config``);
* ``metrics.jsonl`` — one JSON object per line, flushed as written:
  ``{"step", "loss", "lr", "tokens_per_s"}`` every ``log_interval`` steps and on the last
  step, and ``{"step", "eval_loss"}`` every ``eval_interval`` steps and on the last step;
* ``summary.json`` — written at the end, and also when training stops on a non-finite
  loss (``status="diverged"``) so what was logged is never lost.

Invariants: ``step`` counts optimizer steps done (1-based); ``loss`` is the mean training
loss over the steps since the previous log line; ``tokens_per_s`` counts training tokens
(inputs, not the shifted targets) over training time only (eval time excluded); the LR
multiplier for optimizer step ``s`` (0-based) is :func:`lr_multiplier`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from plumage_ds.config import JobConfig, TrainConfig, to_dict
from plumage_ds.train.data import BatchStream, load_corpus
from plumage_ds.train.model import build_model, causal_lm_loss

MIN_LR_RATIO = 0.1
"""Cosine schedules decay to ``MIN_LR_RATIO * lr`` (GaLore's pre-training recipe)."""

OUTPUT_FILES = ("config.yaml", "metrics.jsonl", "summary.json")


class NonFiniteLossError(RuntimeError):
    """Training loss became NaN/inf; ``summary.json`` has ``status="diverged"``."""


class StepRecorder:
    """Per-step bookkeeping shared by the single-process and the DeepSpeed loops.

    ``record`` adds one finished step: the windowed train loss and tokens/s go to ``log``
    every ``log_interval`` steps (and at the last step), and ``evaluate()`` runs every
    ``eval_interval`` steps (and at the last); a non-finite eval loss raises
    :class:`NonFiniteLossError`. Eval time is not counted in ``train_time``.
    """

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
                    "tokens_per_s": self.tokens_per_step * len(self.window_losses) / self.window_time,
                }
            )
            self.window_time, self.window_losses = 0.0, []
        if self.steps_done % self.eval_interval == 0 or last:
            self.final_eval_loss = evaluate()
            self.log({"step": self.steps_done, "eval_loss": self.final_eval_loss})
            if not math.isfinite(self.final_eval_loss):
                raise NonFiniteLossError(f"Non-finite eval loss={self.final_eval_loss} at step {self.steps_done}; stopped")

    def summary(self) -> dict:
        """The bookkeeping keys of ``summary.json``."""
        return {
            "steps_completed": self.steps_done,
            "final_train_loss": self.final_train_loss,
            "final_eval_loss": self.final_eval_loss,
            "train_time_s": self.train_time,
            "tokens_per_s": self.tokens_per_step * self.steps_done / self.train_time if self.train_time > 0 else None,
        }


def lr_multiplier(step: int, *, steps: int, warmup_steps: int, schedule: str) -> float:
    """Factor on the base LR for optimizer step ``step`` (0-based).

    Linear warmup ``(step + 1) / warmup_steps`` for ``step < warmup_steps``; then 1
    (``constant``) or a cosine from 1 at ``step = warmup_steps`` down to
    :data:`MIN_LR_RATIO` at ``step = steps - 1`` (``cosine``).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"Invalid lr_schedule={schedule!r}: must be 'constant' or 'cosine'")
    span = max(1, steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return MIN_LR_RATIO + (1.0 - MIN_LR_RATIO) * 0.5 * (1.0 + math.cos(math.pi * progress))


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> tuple[int, Optional[dict]]:
    """Bytes of optimizer state, measured from tensors.

    Uses ``optimizer.state_bytes()["total"]`` when the optimizer provides it (it knows
    about buffers outside ``optimizer.state``, e.g. projectors); otherwise sums
    ``numel * element_size`` over every tensor in ``optimizer.state``. Returns
    ``(total, detail)`` where ``detail`` is the ``state_bytes()`` dict or ``None``.
    """
    if callable(getattr(optimizer, "state_bytes", None)):
        detail = optimizer.state_bytes()
        return int(detail["total"]), detail

    def size(v: Any) -> int:
        if torch.is_tensor(v):
            return v.numel() * v.element_size()
        if isinstance(v, (list, tuple)):
            return sum(size(x) for x in v)
        if isinstance(v, dict):
            return sum(size(x) for x in v.values())
        return 0

    return sum(size(s) for s in optimizer.state.values()), None


def check_job(cfg: JobConfig) -> None:
    """Cross-section checks the per-section dataclasses cannot do alone."""
    if cfg.model.vocab_size < 256:
        raise ValueError(f"Invalid model.vocab_size={cfg.model.vocab_size}: byte tokens need >= 256")
    if cfg.data.seq_len > cfg.model.max_position_embeddings:
        raise ValueError(
            f"Invalid data.seq_len={cfg.data.seq_len}: exceeds "
            f"model.max_position_embeddings={cfg.model.max_position_embeddings}"
        )


def check_out_dir(out_dir: str | os.PathLike, *, overwrite: bool) -> Path:
    """Refuse a non-directory or a non-empty ``out_dir`` (unless ``overwrite``); create nothing."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"Invalid out_dir={str(out)!r}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"Invalid out_dir={str(out)!r}: not empty; pass --overwrite to replace its results")
    return out


def prepare_out_dir(out_dir: str | os.PathLike, *, overwrite: bool) -> Path:
    """Create ``out_dir``; refuse a non-empty one unless ``overwrite``.

    With ``overwrite`` only this job's own output files are removed; anything else in
    the directory is left alone.
    """
    out = check_out_dir(out_dir, overwrite=overwrite)
    for name in OUTPUT_FILES:
        (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Size):
        return list(obj)
    if torch.is_tensor(obj) and obj.numel() == 1:
        return obj.item()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n", encoding="utf-8")
    os.replace(tmp, path)


@torch.no_grad()
def evaluate(model, batches: list[torch.Tensor]) -> float:
    """Mean loss over ``batches`` (equal sizes, so the mean of means is the token mean)."""
    was_training = model.training
    model.eval()
    total = sum(causal_lm_loss(model, b).item() for b in batches)
    model.train(was_training)
    return total / len(batches)


def train(
    cfg: JobConfig,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    progress: Optional[bool] = None,
) -> dict:
    """Run the main job described by ``cfg`` into ``out_dir``; return the summary dict.

    ``progress=None`` shows a progress bar only when stderr is a terminal. Raises
    :class:`NonFiniteLossError` (after writing ``summary.json``) if the loss diverges.
    """
    check_job(cfg)
    check_out_dir(out_dir, overwrite=overwrite)  # fail fast; create it once setup has worked
    import yaml

    from plumage_ds.optim import build_optimizer

    tc = cfg.train
    if tc.num_threads > 0:
        torch.set_num_threads(tc.num_threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[tc.dtype]

    wall_start = time.perf_counter()
    corpus = load_corpus(cfg.data)
    stream = BatchStream(corpus, cfg.data, seed=tc.seed)
    eval_set = stream.eval_set(tc.eval_batches)
    model = build_model(cfg.model, seed=tc.seed, dtype=dtype)
    model.train()
    optimizer, matrices = build_optimizer(model, cfg.optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_multiplier(s, steps=tc.steps, warmup_steps=tc.warmup_steps, schedule=tc.lr_schedule),
    )
    # An optimizer with a ``max_grad_norm`` attribute clips by itself (PlumageAdamW clips
    # on the projected gradients it actually uses); clipping here too would change that.
    loop_clips = cfg.optimizer.grad_clip > 0 and not hasattr(optimizer, "max_grad_norm")
    tokens_per_step = cfg.data.batch_size * tc.grad_accum * cfg.data.seq_len
    out = prepare_out_dir(out_dir, overwrite=overwrite)
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")

    summary: dict[str, Any] = {
        "status": "running",
        "config": to_dict(cfg),
        "corpus": corpus.describe(),
        "num_params": sum(p.numel() for p in model.parameters()),
        "num_threads": torch.get_num_threads(),
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__},
        "matrices": matrices,
    }
    if progress is None:
        progress = sys.stderr.isatty()
    from tqdm import tqdm

    bar = tqdm(total=tc.steps, disable=not progress, desc=cfg.optimizer.estimator, unit="step")
    rec: Optional[StepRecorder] = None
    try:
        with open(out / "metrics.jsonl", "w", encoding="utf-8") as metrics:

            def log(row: dict) -> None:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()

            rec = StepRecorder(tc, tokens_per_step=tokens_per_step, log=log)

            for s in range(tc.steps):
                t0 = time.perf_counter()
                lr = optimizer.param_groups[0]["lr"]
                step_loss = 0.0
                for micro in stream.micro_batches(s, tc.grad_accum):
                    loss = causal_lm_loss(model, micro) / tc.grad_accum
                    loss.backward()
                    step_loss += loss.item()
                if not math.isfinite(step_loss):
                    raise NonFiniteLossError(
                        f"Non-finite training loss={step_loss} at step {s + 1} "
                        f"(estimator={cfg.optimizer.estimator!r}, lr={lr:.3g}); stopped"
                    )
                if loop_clips:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                rec.record(s, step_loss, time.perf_counter() - t0, lr, lambda: evaluate(model, eval_set))
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.3f}")
        summary["status"] = "completed"
    except NonFiniteLossError as err:
        summary["status"] = "diverged"
        summary["error"] = str(err)
        raise
    finally:
        bar.close()
        state_total, state_detail = optimizer_state_bytes(optimizer)
        summary.update(rec.summary() if rec is not None else {"steps_completed": 0})
        summary.update(
            {
                "optimizer_state_bytes": state_total,
                "optimizer_state_detail": state_detail,
                "wall_time_s": time.perf_counter() - wall_start,
            }
        )
        if summary["status"] == "running":
            summary["status"] = "failed"
        _write_json(out / "summary.json", summary)
    return summary
