"""``train.engine: deepspeed`` — DeepSpeed ZeRO 0-3, launched by the ``deepspeed`` launcher.

What comes from where: the optimizer is the job's ``optimizer:`` section, as on every engine
(``--set optimizer.*`` works); the DeepSpeed JSON (``train.deepspeed_config`` or
``--deepspeed``) brings the engine settings — ZeRO stage, ``bf16``, communication options.
Optimizer knobs the JSON also carries (``"plumage"``, ``"optimizer"``, ``gradient_clipping``)
are loaded with the same schema and must agree with the job's; batch sizes default to the
job's (``data.batch_size`` per rank, ``train.grad_accum``) and must agree when given; a
``"scheduler"`` section is refused (the job's ``train.lr_schedule`` drives the LR everywhere).

Low-rank estimators (GUM included) run through :func:`plumage_ds.integrations.deepspeed.initialize`
(the composite client optimizer: PlumageAdamW or GUM owns the target matrices outside ZeRO's
partitions); ``adamw`` hands DeepSpeed a plain ``torch.optim.AdamW`` (ZeRO partitions it as usual,
and clips with ``gradient_clipping = max_grad_norm``).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path

import torch

from plumage_ds.config import ConfigError, JobConfig, OptimizerConfig, to_dict

from .base import Engine, tensor_bytes

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
_OPTIMIZER_KEYS = ("plumage", "optimizer", "gradient_clipping")
_TAG = "state"


def read_deepspeed_json(path: str) -> dict:
    """The JSON at ``path`` as a dict; :class:`ConfigError` naming ``train.deepspeed_config`` otherwise."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("train.deepspeed_config", path, "no such file")
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError("train.deepspeed_config", path, f"cannot read it ({err})") from None
    except json.JSONDecodeError as err:
        raise ConfigError("train.deepspeed_config", path, f"not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError("train.deepspeed_config", path, "expected a JSON object")
    return raw


def _check_agreement(job_cfg: OptimizerConfig, raw: dict, path: str) -> None:
    """Optimizer knobs in the JSON must equal the job's (same schema, same loader)."""
    from plumage_ds.integrations.deepspeed import optimizer_config_from_deepspeed

    given = {k: raw[k] for k in _OPTIMIZER_KEYS if k in raw}
    if not given:
        return
    json_cfg = optimizer_config_from_deepspeed(json.loads(json.dumps(given)))
    keys = {k: f"plumage.{k}" for k in (given.get("plumage") or {})}
    keys.update({k: f"optimizer.params.{k}" for k in ((given.get("optimizer") or {}).get("params") or {})})
    if "gradient_clipping" in given:
        keys["max_grad_norm"] = "gradient_clipping"
    for key, where in keys.items():
        mine, theirs = getattr(job_cfg, key), getattr(json_cfg, key)
        if mine != theirs:
            shown = to_dict(theirs) if hasattr(theirs, "__dataclass_fields__") else theirs
            raise ValueError(
                f"Conflicting optimizer.{key}={to_dict(mine) if hasattr(mine, '__dataclass_fields__') else mine!r} "
                f"(job config) and {where}={shown!r} ({path}): the main job takes the optimizer from the job "
                "config on every engine; drop the key from the JSON or make them equal"
            )


def prepare_deepspeed_config(job: JobConfig, world_size: int) -> dict:
    """The DeepSpeed config the job runs with; every error names the key (no process group needed)."""
    from plumage_ds.integrations.deepspeed import split_config

    path = job.train.deepspeed_config
    raw = read_deepspeed_json(path)
    _check_agreement(job.optimizer, raw, path)
    if "scheduler" in raw:
        raise ConfigError(
            "scheduler", raw["scheduler"].get("type") if isinstance(raw["scheduler"], dict) else raw["scheduler"],
            f"in {path}: the main job's LR schedule is train.lr_schedule / train.warmup_steps; remove the section",
        )
    ds = {k: v for k, v in raw.items() if k not in _OPTIMIZER_KEYS}
    want = {
        "train_micro_batch_size_per_gpu": job.data.batch_size,
        "gradient_accumulation_steps": job.train.grad_accum,
        "train_batch_size": job.data.batch_size * job.train.grad_accum * world_size,
    }
    source = {
        "train_micro_batch_size_per_gpu": "data.batch_size",
        "gradient_accumulation_steps": "train.grad_accum",
        "train_batch_size": f"data.batch_size * train.grad_accum * world_size={world_size}",
    }
    for key, value in want.items():
        if key in ds and ds[key] != value:
            raise ConfigError(key, ds[key], f"in {path}, but the job gives {source[key]} = {value}")
        ds[key] = value
    bf16 = bool((ds.get("bf16", {}) or {}).get("enabled"))
    if bf16 != (job.train.dtype == "bfloat16"):
        raise ConfigError(
            "bf16.enabled", bf16,
            f"in {path}, but train.dtype={job.train.dtype!r}; use train.dtype=bfloat16 exactly when bf16 is enabled",
        )
    # the composite's checks (ZeRO stage, fp16, bf16 + stage) apply to every estimator: like-for-like runs
    try:
        split_config({**ds, "plumage": {"estimator": "plumage"}})
    except NotImplementedError as err:
        raise ConfigError("train.deepspeed_config", path, str(err)) from None
    if job.optimizer.spec.has_projector:
        ds["plumage"] = to_dict(job.optimizer)
    else:
        ds["gradient_clipping"] = job.optimizer.max_grad_norm  # DeepSpeed clips AdamW itself
    return ds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DeepSpeedEngine(Engine):
    name = "deepspeed"
    collective_forward = True

    @classmethod
    def check(cls, job: JobConfig, world_size: int) -> None:
        prepare_deepspeed_config(job, world_size)

    def init_process_group(self) -> None:
        """``deepspeed.init_distributed`` (gloo on CPU); a plain single process gets env defaults."""
        import deepspeed
        import torch.distributed as dist

        if not dist.is_initialized():
            if "RANK" not in os.environ:  # not under a launcher: a world of one
                for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
                    os.environ.setdefault(k, v)
                os.environ.setdefault("MASTER_PORT", str(_free_port()))
            cpu = os.environ.get("DS_ACCELERATOR", "") == "cpu" or not torch.cuda.is_available()
            deepspeed.init_distributed(dist_backend="gloo" if cpu else None)
            self._owns_group = True
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "") != "cpu":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0))

    def setup(self, model) -> None:
        import deepspeed

        from plumage_ds.integrations import deepspeed as pds

        ds = prepare_deepspeed_config(self.job, self.world_size)
        self.stage = int((ds.get("zero_optimization") or {}).get("stage", 0))
        self.model = model
        try:
            if self.cfg.spec.has_projector:  # the composite: a matrix optimizer owns the targets
                engine, _, _, _ = pds.initialize(model=model, config=ds, lr_scheduler=self.make_scheduler)
                self.composite = pds.plumage_optimizer(engine)
                self.rows = self.composite.matrix_report()
            else:
                from plumage_ds.optim.factory import adamw_params, adamw_rows

                params = adamw_params(model, self.cfg)
                self.rows = adamw_rows(model, params)  # before DeepSpeed swaps the groups' tensors for its own
                opt = torch.optim.AdamW(params, **self.cfg.adam_kwargs())
                engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds, lr_scheduler=self.make_scheduler)
                self.composite = None
        except AssertionError as err:  # DeepSpeed's config checks are asserts
            raise ValueError(f"Invalid train.deepspeed_config (rejected by DeepSpeed): {err}") from None
        self.module = self.ds_engine = engine
        self.optimizer = engine.optimizer

    # -- step ------------------------------------------------------------------------
    def micro_step(self, batch: torch.Tensor, index: int, count: int) -> float:
        from plumage_ds.train.model import causal_lm_loss

        loss = causal_lm_loss(self.ds_engine, batch.to(self.ds_engine.device))
        self.ds_engine.backward(loss)  # DeepSpeed scales by 1/GAS itself
        if index < count - 1:
            self.ds_engine.step()  # not a boundary: bookkeeping only
        return float(loss.detach())

    def optimizer_step(self) -> None:
        self.ds_engine.step()  # the accumulation boundary: clip, optimizer step, LR schedule

    def lr(self) -> float:
        return float(self.ds_engine.get_lr()[0])

    def eval_module(self):
        return self.ds_engine  # ZeRO-3 forward passes are collective: every rank evaluates

    # -- reports -----------------------------------------------------------------------
    def state_bytes(self):
        if self.composite is not None:
            detail = self.composite.state_bytes()
            return int(detail["total"]), detail
        inner = getattr(self.ds_engine.optimizer, "optimizer", self.ds_engine.optimizer)
        return tensor_bytes(list(inner.state.values())), None

    def comm_stats(self):
        return self.composite.comm_stats() if self.composite is not None else None

    # -- state -------------------------------------------------------------------------
    @contextlib.contextmanager
    def full_model(self):
        if self.stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None):
                yield self.model
        else:
            yield self.model

    def load_model_weights(self, path: Path) -> None:
        """DeepSpeed's own checkpoint (:meth:`load`) restores the module; nothing to do here."""

    def save(self, path: Path) -> None:
        from plumage_ds.integrations import deepspeed as pds

        target = str(path / "deepspeed")
        if self.composite is not None:
            pds.save_checkpoint(self.ds_engine, target, tag=_TAG)
        else:
            self.ds_engine.save_checkpoint(target, tag=_TAG)

    def load(self, path: Path) -> None:
        from plumage_ds.integrations import deepspeed as pds

        target = str(path / "deepspeed")
        load = pds.load_checkpoint if self.composite is not None else type(self.ds_engine).load_checkpoint
        out = load(self.ds_engine, target, tag=_TAG)
        if out[0] is None:
            raise ValueError(f"Invalid checkpoint {path}: DeepSpeed found no state under {target}")

    def after_load(self, step: int) -> None:
        """DeepSpeed's checkpoint carries its LR scheduler."""

    def close(self, clean: bool = True) -> None:
        self.ds_engine = self.composite = None
        super().close(clean)
