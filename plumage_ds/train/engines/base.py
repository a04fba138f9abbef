"""The engine interface the one training loop (:mod:`plumage_ds.train.loop`) runs on.

An engine owns the process group (when it created it), wraps the model, builds the optimizer
from the job's :class:`~plumage_ds.config.OptimizerConfig` and knows how to save and load
its state. The loop only ever calls:

* ``check(job, world_size)`` (class method, before any process group exists: every error a
  config can cause is raised here, so the CLI exits 2 without starting anything),
* ``init_process_group()``, ``setup(model)``,
* per step: ``micro_step(batch, index, count)`` for each micro-batch, ``all_reduce_mean`` of
  the loss, ``optimizer_step()``; ``lr()``; ``eval_module()``,
* ``save(dir)`` / ``load(dir)`` (collective: every rank calls them), ``full_model()`` (a
  context giving the whole model, for ``save_pretrained``), ``state_bytes()``, ``comm_stats()``,
* ``close()``.

Invariant: every rank makes the same collective calls in the same order; errors that depend on
data (a non-finite loss) are decided from all-reduced values so every rank raises together.
"""

from __future__ import annotations

import contextlib
import gc
import os
import tempfile
from pathlib import Path
from typing import Any, ClassVar, Iterator, Optional

import torch
import torch.distributed as dist

from plumage_ds.config import ConfigError, JobConfig
from plumage_ds.io import atomic_torch_save


def lr_multiplier(step: int, *, steps: int, warmup_steps: int, schedule: str) -> float:
    """Factor on the base LR for optimizer step ``step`` (0-based).

    Linear warmup ``(step + 1) / warmup_steps`` for ``step < warmup_steps``; then 1
    (``constant``) or a cosine from 1 at ``step = warmup_steps`` down to
    :data:`MIN_LR_RATIO` at ``step = steps - 1`` (``cosine``).
    """
    import math

    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"Invalid lr_schedule={schedule!r}: must be 'constant' or 'cosine'")
    span = max(1, steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return MIN_LR_RATIO + (1.0 - MIN_LR_RATIO) * 0.5 * (1.0 + math.cos(math.pi * progress))


MIN_LR_RATIO = 0.1
"""Cosine schedules decay to ``MIN_LR_RATIO * lr`` (GaLore's pre-training recipe)."""


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a (nested) container."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(x) for x in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(x) for x in obj.values())
    return 0


def unsupported(engine: str, estimator: str, why: str) -> ConfigError:
    """The error for an estimator an engine cannot run (names both and the reason)."""
    return ConfigError("optimizer.estimator", estimator, f"not available on train.engine={engine!r}: {why}")


class Engine:
    """Base engine: a single process group (or none), a replicated optimizer, rank-0 state files."""

    name: ClassVar[str] = ""
    needs_process_group: ClassVar[bool] = True
    collective_forward: ClassVar[bool] = False
    """Every rank must run the same forward passes (ZeRO-3 gathers weights in forward): eval on all ranks."""

    def __init__(self, job: JobConfig) -> None:
        self.job = job
        self.cfg = job.optimizer
        self.rank, self.world_size = 0, 1
        self.device = torch.device("cpu")
        self.model: Optional[torch.nn.Module] = None  # the plain model
        self.module: Optional[torch.nn.Module] = None  # what forward/backward go through
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.scheduler = None
        self.rows: list[dict] = []
        self._owns_group = False
        self._store_dir: Optional[tempfile.TemporaryDirectory] = None

    # ------------------------------------------------------------------ checks (no process group)
    @classmethod
    def check(cls, job: JobConfig, world_size: int) -> None:
        """Raise :class:`ConfigError` for anything this engine cannot run (called before any process group)."""

    # ------------------------------------------------------------------ process group
    def _backend(self) -> str:
        return "nccl" if torch.cuda.is_available() else "gloo"

    def init_process_group(self) -> None:
        """Join the launcher's process group (``torchrun`` env), reuse an existing one, or make a world of one."""
        if self.needs_process_group and not dist.is_initialized():
            if "RANK" in os.environ and "MASTER_ADDR" in os.environ:
                dist.init_process_group(self._backend())  # env:// from torchrun / the deepspeed launcher
            else:  # not under a launcher: a world of one through a private file store
                self._store_dir = tempfile.TemporaryDirectory(prefix="plumage_ds_pg_")
                store = f"file://{self._store_dir.name}/store"
                dist.init_process_group(self._backend(), init_method=store, rank=0, world_size=1)
            self._owns_group = True
        if dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0") or 0)
            torch.cuda.set_device(local)
            self.device = torch.device("cuda", local)

    # ------------------------------------------------------------------ build
    def make_scheduler(self, optimizer: torch.optim.Optimizer):
        tc = self.job.train
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: lr_multiplier(s, steps=tc.steps, warmup_steps=tc.warmup_steps, schedule=tc.lr_schedule),
        )

    def setup(self, model: torch.nn.Module) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ step
    def _no_sync(self, last: bool):
        return contextlib.nullcontext()

    def micro_step(self, batch: torch.Tensor, index: int, count: int) -> float:
        """Forward + backward of micro-batch ``index`` of ``count``; returns its mean loss (unscaled)."""
        from plumage_ds.train.model import causal_lm_loss

        with self._no_sync(index == count - 1):
            loss = causal_lm_loss(self.module, batch.to(self.device))
            (loss / count).backward()
        return float(loss.detach())

    def clips_itself(self) -> bool:
        """Whether the optimizer applies ``max_grad_norm`` itself (PlumageAdamW clips what it uses)."""
        return hasattr(self.optimizer, "max_grad_norm")

    def optimizer_step(self) -> None:
        """Clip (unless the optimizer does), step, advance the LR schedule, drop gradients."""
        max_norm = self.cfg.max_grad_norm
        if max_norm > 0 and not self.clips_itself():
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def eval_module(self) -> torch.nn.Module:
        return self.model

    # ------------------------------------------------------------------ collectives
    def all_reduce_sum(self, values: list[float]) -> list[float]:
        if self.world_size == 1 or not dist.is_initialized():
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return [float(x) for x in t.tolist()]

    def all_reduce_mean(self, value: float) -> float:
        return self.all_reduce_sum([value])[0] / self.world_size

    def broadcast_object(self, obj: Any) -> Any:
        if self.world_size == 1 or not dist.is_initialized():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_object(self, obj: Any) -> list:
        if self.world_size == 1 or not dist.is_initialized():
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.barrier()

    def _comm_device(self) -> torch.device:
        return self.device if dist.is_initialized() and dist.get_backend() == "nccl" else torch.device("cpu")

    # ------------------------------------------------------------------ reports
    def state_bytes(self) -> tuple[int, Optional[dict]]:
        """This rank's optimizer-state bytes, measured (``state_bytes()`` when the optimizer has it)."""
        if callable(getattr(self.optimizer, "state_bytes", None)):
            detail = self.optimizer.state_bytes()
            return int(detail["total"]), detail
        return tensor_bytes(list(self.optimizer.state.values())), None

    def comm_stats(self) -> Optional[dict]:
        stats = getattr(self.optimizer, "comm_stats", None)
        return stats() if callable(stats) else None

    # ------------------------------------------------------------------ state
    @contextlib.contextmanager
    def full_model(self) -> Iterator[torch.nn.Module]:
        """The whole model with full weights (collective where weights are partitioned)."""
        yield self.model

    def load_model_weights(self, path: Path) -> None:
        """Load ``model.safetensors`` (written by ``save_pretrained``) into the model, bitwise."""
        from safetensors.torch import load_file

        state = load_file(str(path), device=str(self.device))
        result = self.model.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise ValueError(f"Invalid checkpoint {path}: unexpected weights {result.unexpected_keys[:5]}")
        loaded = {p.data_ptr() for n, p in self.model.named_parameters(remove_duplicate=False) if n in state}
        params = dict(self.model.named_parameters(remove_duplicate=False))
        missing = [k for k in result.missing_keys if k not in params or params[k].data_ptr() not in loaded]
        if missing:  # tied weights (saved once) are fine; anything else is not
            raise ValueError(f"Invalid checkpoint {path}: missing weights {missing[:5]}")

    def save(self, path: Path) -> None:
        """Engine state into ``path`` (collective). Default: the replicated optimizer, from rank 0."""
        if self.rank == 0:
            atomic_torch_save(self.optimizer.state_dict(), path / "optimizer.pt")

    def load(self, path: Path) -> None:
        """Inverse of :meth:`save` (collective); model weights are loaded before this."""
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=self.device, weights_only=True))

    def after_load(self, step: int) -> None:
        """Put the LR schedule at ``step``; the optimizer's lr (set by the schedule for ``step``
        before the save) came back with its state, bit for bit."""
        if self.scheduler is not None:
            self.scheduler.last_epoch = step
            self.scheduler._last_lr = [float(g["lr"]) for g in self.optimizer.param_groups]

    # ------------------------------------------------------------------ teardown
    def close(self, clean: bool = True) -> None:
        """Drop engine objects, then (if this engine created it) destroy the process group.

        ``clean``: every rank reached the same point, so a barrier in teardown is safe.
        """
        self.module = self.optimizer = self.scheduler = None
        gc.collect()
        if self._owns_group and dist.is_initialized():
            if clean and self.world_size > 1:
                dist.barrier()
            dist.destroy_process_group()
        if self._store_dir is not None:
            self._store_dir.cleanup()
