"""Configuration dataclasses: the single source of truth for every knob.

Every dataclass is ``kw_only``, validates itself in ``__post_init__`` and loads
strictly: :func:`from_dict` rejects unknown keys (naming them) and nested
sections load into their own dataclasses. YAML/JSON files in ``configs/`` load
through :func:`load_config`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

ESTIMATORS = ("plumage", "galore", "haar")
"""Low-rank estimators understood by :class:`~plumage_ds.optim.PlumageAdamW`."""

TRAIN_ESTIMATORS = ("adamw",) + ESTIMATORS + ("gum",)
"""Values the main job accepts for ``optimizer.estimator``."""

DINV_PLACEMENTS = ("coords", "lift", "none")
SVD_METHODS = ("svd", "gram")


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"Invalid {name}={value!r}: must be one of {list(choices)}")


def _check_positive(name: str, value: Any, *, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not value > 0 or (
        not integer and not math.isfinite(value)
    ):
        what = "a positive integer" if integer else "a positive finite number"
        raise ValueError(f"Invalid {name}={value!r}: must be {what}")


def _check_nonneg(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or not math.isfinite(value):
        raise ValueError(f"Invalid {name}={value!r}: must be a finite number >= 0")


def _check_betas(betas: Any) -> None:
    ok = isinstance(betas, (tuple, list)) and len(betas) == 2 and all(
        isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in betas
    )
    if not ok:
        raise ValueError(f"Invalid betas={betas!r}: must be two numbers in [0, 1)")


def validate_lowrank_options(
    *,
    rank: Any,
    update_interval: Any,
    estimator: Any,
    scale: Any,
    dinv_placement: Any,
    svd_method: Any,
    uniform_mix: Any = 0.0,
) -> None:
    """Validate the low-rank knobs shared by the config and the optimizer constructor."""
    if isinstance(uniform_mix, bool) or not isinstance(uniform_mix, (int, float)) or not 0.0 <= uniform_mix <= 1.0:
        raise ValueError(f"Invalid uniform_mix={uniform_mix!r}: must be in [0, 1]")
    _check_positive("rank", rank, integer=True)
    _check_positive("update_interval", update_interval, integer=True)
    _check_choice("estimator", estimator, ESTIMATORS)
    _check_positive("scale", scale)
    _check_choice("dinv_placement", dinv_placement, DINV_PLACEMENTS)
    _check_choice("svd_method", svd_method, SVD_METHODS)


def validate_adam_options(*, lr: Any, betas: Any, eps: Any, weight_decay: Any) -> None:
    _check_nonneg("lr", lr)
    _check_betas(betas)
    _check_nonneg("eps", eps)
    _check_nonneg("weight_decay", weight_decay)


# --------------------------------------------------------------------------- strict loading


def _unwrap_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def from_dict(cls: type, data: Any, *, where: str = ""):
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys.

    Nested dataclass fields are loaded recursively; lists given for tuple fields
    become tuples. Errors name the offending key with its dotted path.
    """
    label = where or cls.__name__
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"Invalid {label}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"Unknown config key(s) {unknown} in {label}; valid keys: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        tp = _unwrap_optional(hints[key])
        if dataclasses.is_dataclass(tp) and value is not None:
            value = from_dict(tp, value, where=f"{label}.{key}")
        elif typing.get_origin(tp) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def to_dict(obj: Any) -> dict:
    """Plain-data dict (tuples become lists) that :func:`from_dict` loads back."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(obj)


def read_mapping(path: str | os.PathLike) -> dict:
    """Read a YAML (``.yaml``/``.yml``) or JSON file into a dict."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    if path.endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text)
    elif path.endswith(".json"):
        data = json.loads(text)
    else:
        raise ValueError(f"Invalid config path={path!r}: must end in .yaml, .yml or .json")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"Invalid config file {path!r}: top level must be a mapping")
    return data


# --------------------------------------------------------------------------- optimizer


@dataclass(kw_only=True)
class OptimizerConfig:
    """Optimizer section of a job config.

    ``estimator`` picks the whole optimizer: ``adamw`` (torch AdamW on every
    parameter), ``plumage``/``galore``/``haar`` (:class:`PlumageAdamW`) or
    ``gum`` (:class:`GUM`). Low-rank knobs are ignored by ``adamw``.
    """

    estimator: str = "plumage"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    rank: int = 8
    update_interval: int = 200
    scale: float = 1.0
    dinv_placement: str = "none"
    realign: Optional[bool] = None
    svd_method: str = "gram"
    uniform_mix: float = 0.0
    seed: int = 0
    target_modules: tuple[str, ...] = (r".*(attn|attention|mlp).*",)
    strict: bool = False
    # GUM only
    gum_gamma: int = 2
    gum_momentum: float = 0.95
    grad_clip: float = 0.0

    def __post_init__(self) -> None:
        _check_choice("estimator", self.estimator, TRAIN_ESTIMATORS)
        validate_adam_options(lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay)
        validate_lowrank_options(
            rank=self.rank,
            update_interval=self.update_interval,
            estimator="plumage" if self.estimator in ("adamw", "gum") else self.estimator,
            scale=self.scale,
            dinv_placement=self.dinv_placement,
            svd_method=self.svd_method,
            uniform_mix=self.uniform_mix,
        )
        if self.realign is not None and not isinstance(self.realign, bool):
            raise ValueError(f"Invalid realign={self.realign!r}: must be true, false or null")
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        if not all(isinstance(t, str) for t in self.target_modules):
            raise ValueError(f"Invalid target_modules={self.target_modules!r}: must be regex strings")
        _check_positive("gum_gamma", self.gum_gamma, integer=True)
        if not 0.0 <= self.gum_momentum < 1.0:
            raise ValueError(f"Invalid gum_momentum={self.gum_momentum!r}: must be in [0, 1)")
        _check_nonneg("grad_clip", self.grad_clip)


# --------------------------------------------------------------------------- main job


@dataclass(kw_only=True)
class ModelConfig:
    """A small LLaMA built from ``transformers.LlamaConfig`` (no weight download)."""

    vocab_size: int = 256  # byte-level
    hidden_size: int = 128
    intermediate_size: int = 344
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 256
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        ):
            _check_positive(name, getattr(self, name), integer=True)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"Invalid hidden_size={self.hidden_size}: must be divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"Invalid num_key_value_heads={self.num_key_value_heads}: must divide "
                f"num_attention_heads={self.num_attention_heads}"
            )


@dataclass(kw_only=True)
class DataConfig:
    """Embedded corpus: the standard library's ``.py`` sources, byte-level.

    Files are assigned to train/eval by a hash of their relative path, so the
    split is fixed across runs and machines with the same Python version.
    """

    seq_len: int = 128
    batch_size: int = 16
    eval_fraction: float = 0.05
    max_corpus_bytes: int = 8_000_000
    root: Optional[str] = None  # default: the running interpreter's stdlib directory

    def __post_init__(self) -> None:
        _check_positive("seq_len", self.seq_len, integer=True)
        _check_positive("batch_size", self.batch_size, integer=True)
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"Invalid eval_fraction={self.eval_fraction!r}: must be in (0, 1)")
        _check_positive("max_corpus_bytes", self.max_corpus_bytes, integer=True)


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 200
    warmup_steps: int = 10
    lr_schedule: str = "cosine"
    grad_accum: int = 1
    eval_interval: int = 100
    eval_batches: int = 8
    log_interval: int = 10
    seed: int = 0
    dtype: str = "float32"
    num_threads: int = 0  # 0: leave torch's default

    def __post_init__(self) -> None:
        _check_positive("steps", self.steps, integer=True)
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"Invalid warmup_steps={self.warmup_steps!r}: must be an integer >= 0")
        _check_choice("lr_schedule", self.lr_schedule, ("constant", "cosine"))
        _check_positive("grad_accum", self.grad_accum, integer=True)
        _check_positive("eval_interval", self.eval_interval, integer=True)
        _check_positive("eval_batches", self.eval_batches, integer=True)
        _check_positive("log_interval", self.log_interval, integer=True)
        _check_choice("dtype", self.dtype, ("float32", "bfloat16"))
        if isinstance(self.num_threads, bool) or not isinstance(self.num_threads, int) or self.num_threads < 0:
            raise ValueError(f"Invalid num_threads={self.num_threads!r}: must be an integer >= 0")


@dataclass(kw_only=True)
class JobConfig:
    """Whole main-job config: ``plumage-ds train --config FILE``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)


def load_config(path: str | os.PathLike, cls: type = JobConfig):
    """Load a YAML/JSON file strictly into ``cls`` (unknown keys raise ``ValueError``)."""
    return from_dict(cls, read_mapping(path), where=os.path.basename(os.fspath(path)))
