"""Configuration: ONE schema for every knob, loaded the same way everywhere.

Every dataclass is ``kw_only`` and validates itself in ``__post_init__``: types are checked
from the annotations (booleans reject anything but ``true``/``false``, integers reject
booleans and floats, floats accept integers), then the values. :func:`from_dict` loads a
mapping strictly: an unknown key is an error naming it, a renamed key names its new name,
nested sections load into their own dataclasses, and every error names the offending key
with its dotted path (``Invalid optimizer.rank=0: must be a positive integer``).

:class:`OptimizerConfig` is the single definition of every optimizer knob. Its field names
are the keyword arguments of :class:`~plumage_ds.optim.PlumageAdamW` (GUM's and the comm
hook's own knobs live in the nested :class:`GumConfig` / :class:`CommHookConfig`, whose
names are *their* constructor keywords), so one mapping turns it into an optimizer. The
main job's YAML ``optimizer:`` section, the DeepSpeed JSON ``"plumage"`` section and the
DDP comm hook's arguments all go through ``from_dict(OptimizerConfig, ...)``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from .estimators.registry import ESTIMATORS, SVD_METHODS, estimator_problem, resolve_svd_method
from .schema import (  # noqa: F401 - re-exported: the config API
    ConfigError,
    ConfigKeyError,
    check_choice,
    check_positive,
    check_nonneg,
    check_bool,
    check_int,
    check_unit,
    check_betas,
    check_types,
    from_dict,
    to_dict,
    read_mapping,
)

DINV_PLACEMENTS = ("coords", "lift", "none")
ENGINES = {
    "local": "local", "ddp": "ddp", "ddp_hook": "ddp", "sharded": "sharded", "deepspeed": "deepspeed",
    "fsdp2": "fsdp", "hsdp": "fsdp",
}  # fmt: skip
"""``train.engine`` names, each with the module of ``plumage_ds.train.engines`` that holds its engine class
(the class whose ``name`` is the key): the one list of engines."""
DATA_SOURCES = ("stdlib", "text", "jsonl", "hf_dataset")
NONFINITE_POLICIES = ("skip", "raise")
QUANTIZE_CHOICES = ("int8", "fp16")
RIGHT_PROJECTORS = ("sharded", "replicated")
DTYPES = ("float32", "bfloat16")
STEP_IMPLS = ("auto", "staged", "streaming", "compiled")


def validate_lowrank_options(
    *,
    rank: Any,
    update_interval: Any,
    scale: Any,
    svd_method: Any,
    estimator: Any = None,
    dinv_placement: Any = "none",
    uniform_mix: Any = 0.0,
    sigma_rank: Any = None,
    sigma_weight: Any = None,
) -> None:
    """The low-rank knobs of :class:`~plumage_ds.optim.PlumageAdamW` (and GUM, the reference).

    ``estimator`` (when given) must be a registered ``lowrank_adam`` estimator.
    """
    check_unit("uniform_mix", uniform_mix)
    check_positive("rank", rank, integer=True)
    check_positive("update_interval", update_interval, integer=True)
    if estimator is not None:
        spec = check_estimator(estimator, family="lowrank_adam")
        check_sigma_rank(sigma_rank, spec)
        check_sigma_weight(sigma_weight, spec)
    check_positive("scale", scale)
    check_choice("dinv_placement", dinv_placement, DINV_PLACEMENTS)
    check_choice("svd_method", svd_method, SVD_METHODS)


def check_sigma_rank(sigma_rank: Any, spec) -> None:
    """``sigma_rank``: ``None`` (the rank ``r`` where ``Σ`` is kept), or an integer >= 0, non-zero only for
    an estimator that keeps ``Σ``."""
    if sigma_rank is None:
        return
    check_nonneg("sigma_rank", sigma_rank, integer=True)
    if sigma_rank:
        _check_keeps_sigma("sigma_rank", sigma_rank, spec)


def check_sigma_weight(sigma_weight: Any, spec) -> None:
    """``sigma_weight``: ``None`` (``Σ`` is the running mean of the refresh gradients' Gram matrices), or
    the constant weight ``w ∈ (0, 1]`` of the newest one, for an estimator that keeps ``Σ``."""
    if sigma_weight is None:
        return
    if isinstance(sigma_weight, bool) or not isinstance(sigma_weight, (int, float)) or not 0.0 < sigma_weight <= 1.0:
        raise ConfigError("sigma_weight", sigma_weight, "must be in (0, 1] (null: the running mean)")
    _check_keeps_sigma("sigma_weight", sigma_weight, spec)


def _check_keeps_sigma(key: str, value: Any, spec) -> None:
    if not spec.keeps_second_moment:
        keepers = " and ".join(repr(n) for n, s in ESTIMATORS.items() if s.keeps_second_moment)
        raise ConfigError(key, value, f"applies to estimator {keepers} only (it keeps Σ), not {spec.name!r}")


def check_estimator(name: Any, *, family: Optional[str] = None):
    """The registry entry of ``name`` (:mod:`plumage_ds.estimators.registry`), or a :class:`ConfigError`."""
    problem = estimator_problem(name, family)
    if problem is not None:
        raise ConfigError("estimator", name, problem)
    return ESTIMATORS[name]


def validate_adam_options(*, lr: Any, betas: Any, eps: Any, weight_decay: Any) -> None:
    check_nonneg("lr", lr)
    check_betas(betas)
    check_nonneg("eps", eps)
    check_nonneg("weight_decay", weight_decay)


# --------------------------------------------------------------------------- optimizer


@dataclass(kw_only=True)
class GumConfig:
    """GUM's own knobs (keyword arguments of :class:`~plumage_ds.optim.GUM`)."""

    gamma: int = 2  # γ: target matrices drawn per period for the full-rank residual branch
    momentum: float = 0.95  # Muon momentum μ
    nesterov: bool = True

    def __post_init__(self) -> None:
        check_types(self)
        check_positive("gamma", self.gamma, integer=True)
        check_unit("momentum", self.momentum, closed=False)


@dataclass(kw_only=True)
class CommHookConfig:
    """The DDP comm hook's own knobs (keyword arguments of ``PlumageHookState`` beyond the optimizer's)."""

    start_iter: int = 10  # warm-up steps that run a plain all-reduce
    min_compression_rate: float = 2.0  # compress a matrix only if s / min(rank, s) >= this
    # plumage/optimal: redraw S every this many steps from the design kept since the refresh (0: one draw)
    resample_interval: int = 0
    quantize: Optional[str] = None  # "int8" | "fp16": unbiased stochastic rounding of R_k (None: fp32)
    # ordinary and warm-up steps: return DDP a Future chained on an async all-reduce (True) or run the
    # collectives inside the hook (False); None: async on NCCL, synchronous on any other backend
    async_comm: Optional[bool] = None

    _renamed = {"sigma_weight": "moved out of 'comm_hook' to 'sigma_weight', beside 'sigma_rank' (the optimizer's Σ takes it too)"}

    def __post_init__(self) -> None:
        check_types(self)
        check_nonneg("start_iter", self.start_iter, integer=True)
        if not self.min_compression_rate >= 1.0 or not math.isfinite(self.min_compression_rate):
            raise ConfigError("min_compression_rate", self.min_compression_rate, "must be a number >= 1")
        check_nonneg("resample_interval", self.resample_interval, integer=True)
        if self.quantize is not None:
            check_choice("quantize", self.quantize, QUANTIZE_CHOICES)


@dataclass(kw_only=True)
class OptimizerConfig:
    """Every optimizer knob, one name each (the keyword names of :class:`PlumageAdamW`).

    ``estimator`` names a registered estimator (:mod:`plumage_ds.estimators.registry`):
    ``adamw`` (``torch.optim.AdamW`` on everything), ``plumage``/``galore``/``haar``/``optimal``
    (:class:`PlumageAdamW` on the matrices matched by ``target_modules``) or ``gum``
    (:class:`GUM`). Knobs that default to ``None`` take the estimator's default; setting a knob
    the chosen estimator does not use (``svd_method`` for ``haar``/``optimal``, ``uniform_mix`` for
    anything but ``plumage``/``optimal``, ``realign`` for ``adamw``/``gum``) is an error, never a
    silent no-op.
    """

    # the default follows the quality ladder (docs/quality.md §10): optimal, Σ kept as r eigenpairs plus a rest
    estimator: str = "optimal"
    lr: float = 1e-3
    # LR of the parameters that stay dense (embeddings, norms, output head, biases, matrices not selected
    # or too small for the rank), for every estimator, adamw included; None: lr. The LR schedule scales both.
    dense_lr: Optional[float] = None
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    rank: int = 8
    update_interval: int = 200  # τ: steps between changes of P (refresh, Haar redraw, GUM period)
    scale: float = 1.0  # lift scale α on P N
    dinv_placement: str = "none"
    realign: Optional[bool] = None  # None: the estimator's default
    svd_method: Optional[str] = None  # None: the estimator's default ("gram"); must stay None for haar/adamw
    uniform_mix: float = 0.0  # plumage/optimal only: floor ε on inclusion probabilities
    # optimal only: between refreshes keep Σ as its top sigma_rank eigenpairs plus an isotropic rest, (s, k+1)
    # floats instead of (s, s); None: k = rank; 0: the whole Σ (so too where s <= k + 1: it is no larger)
    sigma_rank: Optional[int] = None
    # optimal only: Σ ← (1 − w)·Σ + w·G_o G_oᵀ at each refresh with this constant w ∈ (0, 1], weighting recent
    # gradients; None: w = 1/k at the k-th refresh (the running mean)
    sigma_weight: Optional[float] = None
    seed: int = 0  # sampler seed (P draws, GUM's layer draw)
    strict: bool = False  # raise instead of falling back to AdamW for a target that cannot go low-rank
    max_grad_norm: float = 0.0  # global-norm clipping (0: off), on what the optimizer uses
    nonfinite: str = "skip"  # NaN/Inf gradient on any rank: "skip" the step everywhere (counted) or "raise"
    right_projectors: str = "sharded"  # FSDP2, matrices with m >= n: P row-sharded ("sharded") or whole on every rank
    # PlumageAdamW's precision policy (None: float32): the dtype of the projections Pᵀ G and the lifts P N, and the
    # dtype P, M, V are kept in ("bfloat16": half the state; the math stays fp32, rounded once on store)
    compute_dtype: Optional[str] = None
    state_dtype: Optional[str] = None
    # PlumageAdamW's ordinary step: "streaming" (in place, matrix chunks, transient bounded by one matrix; layouts
    # with no collective in the step), "compiled" (streaming, the compressed Adam one torch.compile'd kernel per
    # matrix), "staged" (batched lists, state staged until the last collective), "auto": streaming where it applies
    step_impl: str = "auto"
    collective_timeout: float = 0.0  # seconds a collective of the step may wait (0: the process group's timeout)
    backward_projection: Optional[bool] = None  # keep Pᵀ G (r×l), not G (m×n), from backward to step; None: on for ZeRO-3 only
    # regexes on module names (re.search) and/or "all-linear"; None: the default selection (attention and
    # MLP matrices of LLaMA/Mistral/Qwen, GPT-2, BERT/RoBERTa, T5, ViT naming; see targets.py)
    target_modules: Optional[tuple[str, ...]] = None
    gum: GumConfig = field(default_factory=GumConfig)
    comm_hook: CommHookConfig = field(default_factory=CommHookConfig)

    _renamed = {
        "tau": "renamed to 'update_interval'",
        "kappa": "renamed to 'update_interval' (steps between Haar redraws, as for every estimator)",
        "grad_clip": "renamed to 'max_grad_norm'",
        "gradient_clipping": "renamed to 'max_grad_norm'",
        "gum_gamma": "renamed to 'gum.gamma'",
        "gum_momentum": "renamed to 'gum.momentum'",
        "print_report": "removed: the parameter report is logged at INFO level on rank 0",
        "start_iter": "moved to 'comm_hook.start_iter'",
        "min_compression_rate": "moved to 'comm_hook.min_compression_rate'",
    }

    def __post_init__(self) -> None:
        check_types(self)
        spec = check_estimator(self.estimator)
        validate_adam_options(lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay)
        if self.dense_lr is not None:
            check_positive("dense_lr", self.dense_lr)
        check_positive("rank", self.rank, integer=True)
        check_positive("update_interval", self.update_interval, integer=True)
        check_positive("scale", self.scale)
        check_choice("dinv_placement", self.dinv_placement, DINV_PLACEMENTS)
        check_unit("uniform_mix", self.uniform_mix)
        check_sigma_rank(self.sigma_rank, spec)
        check_sigma_weight(self.sigma_weight, spec)
        check_nonneg("max_grad_norm", self.max_grad_norm)
        check_choice("nonfinite", self.nonfinite, NONFINITE_POLICIES)
        check_nonneg("collective_timeout", self.collective_timeout)
        check_choice("right_projectors", self.right_projectors, RIGHT_PROJECTORS)
        check_choice("step_impl", self.step_impl, STEP_IMPLS)
        for key in ("compute_dtype", "state_dtype", "step_impl"):
            value = getattr(self, key)
            if value is not None and key != "step_impl":
                check_choice(key, value, DTYPES)
            if spec.family != "lowrank_adam" and value not in (None, "auto"):
                raise ConfigError(key, value, f"applies to PlumageAdamW's estimators, not {spec.name!r}; leave it unset")
        if self.svd_method is not None:
            check_choice("svd_method", self.svd_method, SVD_METHODS)
            if spec.default_svd_method is None:
                raise ConfigError("svd_method", self.svd_method, f"estimator {spec.name!r} takes no SVD; leave it null")
        if self.uniform_mix != 0.0 and not spec.uses_uniform_mix:
            users = " and ".join(repr(n) for n, s in ESTIMATORS.items() if s.uses_uniform_mix)
            raise ConfigError("uniform_mix", self.uniform_mix, f"applies to estimators {users} only, not {spec.name!r}")
        if self.realign is not None and spec.family != "lowrank_adam":
            raise ConfigError("realign", self.realign, f"estimator {spec.name!r} keeps no moments in P's basis; leave it null")
        if self.target_modules is not None and not self.target_modules:
            raise ConfigError("target_modules", [], "must list at least one regex (or be null for the default selection)")
        import re

        for t in self.target_modules or ():
            try:
                re.compile(t)
            except re.error as err:
                raise ConfigError("target_modules", t, f"not a valid regex ({err})") from None

    # -- what the factory passes on ------------------------------------------------
    @property
    def spec(self):
        """The estimator's :class:`~plumage_ds.estimators.registry.EstimatorSpec`."""
        return check_estimator(self.estimator)

    def adam_kwargs(self) -> dict:
        """``lr, betas, eps, weight_decay``: every optimizer takes them."""
        return {k: getattr(self, k) for k in ("lr", "betas", "eps", "weight_decay")}

    def lowrank_kwargs(self) -> dict:
        """Keyword arguments of :class:`PlumageAdamW` (all but ``params``), resolved."""
        out = {f: getattr(self, f) for f in PLUMAGE_ADAMW_KEYS}
        out["svd_method"] = resolve_svd_method(self.estimator, self.svd_method) or "gram"  # haar: unused
        out["backward_projection"] = bool(self.backward_projection)  # None: off (the ZeRO-3 composite turns it on)
        return out

    def gum_kwargs(self) -> dict:
        """Keyword arguments of :class:`GUM` (all but ``params``), resolved."""
        out = {f: getattr(self, f) for f in GUM_SHARED_KEYS}
        out["svd_method"] = resolve_svd_method(self.estimator, self.svd_method)
        out.update(dataclasses.asdict(self.gum))
        return out


PLUMAGE_ADAMW_KEYS = (
    "lr", "betas", "eps", "weight_decay", "rank", "update_interval", "estimator", "scale", "dinv_placement",
    "realign", "svd_method", "uniform_mix", "sigma_rank", "sigma_weight", "seed", "strict", "max_grad_norm", "nonfinite",
    "right_projectors", "backward_projection", "collective_timeout", "compute_dtype", "state_dtype", "step_impl",
)  # fmt: skip
"""The :class:`PlumageAdamW` keywords; each is an :class:`OptimizerConfig` field of the same name."""

GUM_SHARED_KEYS = (
    "lr", "betas", "eps", "weight_decay", "rank", "update_interval", "scale", "svd_method", "seed", "strict", "nonfinite",
    "max_grad_norm", "collective_timeout",
)  # fmt: skip


# --------------------------------------------------------------------------- main job


@dataclass(kw_only=True)
class ModelConfig:
    """Any Hugging Face causal-LM config, built without downloading weights.

    ``model_type`` picks the ``transformers`` config class (default ``llama``, or the
    ``model_type`` of the ``config`` file); ``config`` is an optional ``config.json`` (or a
    directory holding one) to start from; every other key is a field of that config class
    (``hidden_size``, ``n_layer``...), checked against it when the job starts. Without a
    ``config`` file, ``llama`` starts from the small byte-level :data:`LLAMA_DEFAULTS`.
    ``vocab_size`` defaults to the tokenizer's.
    """

    model_type: Optional[str] = None
    config: Optional[str] = None
    fields: dict[str, Any] = field(default_factory=dict)

    _extra_field = "fields"

    def __post_init__(self) -> None:
        check_types(self)
        if self.model_type is not None and not self.model_type:
            raise ConfigError("model_type", self.model_type, "must name a transformers model type")
        for k, v in self.fields.items():
            if isinstance(v, (dict, list)) and k not in ("rope_scaling", "rope_parameters"):
                raise ConfigError(k, v, "model fields must be scalars")
            if isinstance(v, int) and not isinstance(v, bool) and v < 0:
                raise ConfigError(k, v, "must be >= 0")


LLAMA_DEFAULTS = {
    "hidden_size": 128,
    "intermediate_size": 344,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}
"""The small LLaMA of ``model_type: llama`` when no ``config`` file is given (fields override)."""


@dataclass(kw_only=True)
class DataConfig:
    """Where the tokens come from (see ``docs/main-job.md``).

    ``source``: ``stdlib`` (the running Python's standard-library ``.py`` sources; ``path``
    overrides the root), ``text`` (a folder, searched recursively for ``extensions``, or a glob),
    ``jsonl`` (a file, folder or glob of JSON-lines files; ``field`` holds the text),
    ``hf_dataset`` (a ``datasets`` dataset saved with ``save_to_disk``; ``field`` column,
    ``split`` of a ``DatasetDict``). ``tokenizer``: ``byte`` or a directory with a
    ``tokenizer.json``. Documents go to the eval split by a hash (fixed across runs); when that
    leaves it too small for one window, eval is the tail of every document instead. A
    ``DatasetDict``'s ``eval_split`` (default: its ``validation`` split, if any) is the eval split.
    """

    source: str = "stdlib"
    path: Optional[str] = None
    field: str = "text"
    split: str = "train"
    eval_split: Optional[str] = None  # hf_dataset: the DatasetDict split to evaluate on (None: "validation" if present)
    extensions: tuple[str, ...] = (".txt", ".md", ".rst", ".py")
    tokenizer: str = "byte"
    seq_len: int = 128
    batch_size: int = 16  # windows per micro-batch per rank
    eval_fraction: float = 0.05
    max_corpus_bytes: int = 8_000_000

    _renamed = {"root": "renamed to 'path'"}

    def __post_init__(self) -> None:
        check_types(self)
        check_choice("source", self.source, DATA_SOURCES)
        if self.source != "stdlib" and not self.path:
            raise ConfigError("path", self.path, f"source {self.source!r} needs a path")
        if not self.field:
            raise ConfigError("field", self.field, "must name the text field")
        if self.eval_split is not None and self.source != "hf_dataset":
            raise ConfigError("eval_split", self.eval_split, f"only for source 'hf_dataset', not {self.source!r}")
        if self.eval_split is not None and self.eval_split == self.split:
            raise ConfigError("eval_split", self.eval_split, "must differ from data.split (the training split)")
        if not self.extensions or not all(e.startswith(".") for e in self.extensions):
            raise ConfigError("extensions", list(self.extensions), "must be a list of suffixes like '.txt'")
        if not self.tokenizer:
            raise ConfigError("tokenizer", self.tokenizer, "must be 'byte' or a directory with tokenizer.json")
        check_positive("seq_len", self.seq_len, integer=True)
        check_positive("batch_size", self.batch_size, integer=True)
        if not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError("eval_fraction", self.eval_fraction, "must be in (0, 1)")
        check_positive("max_corpus_bytes", self.max_corpus_bytes, integer=True)


@dataclass(kw_only=True)
class TrainConfig:
    """The loop, the engine and checkpoints."""

    engine: str = "local"
    deepspeed_config: Optional[str] = None  # engine=deepspeed: the DeepSpeed JSON (ZeRO stage, bf16...)
    steps: int = 200
    warmup_steps: int = 10
    lr_schedule: str = "cosine"
    grad_accum: int = 1
    eval_interval: int = 100
    eval_batches: int = 8
    log_interval: int = 10
    save_interval: int = 0  # steps between checkpoints (0: none; the last step is saved when > 0)
    keep_last: int = 2  # complete checkpoints kept (older ones are deleted)
    hsdp_shard_size: int = 0  # engine=hsdp: ranks per shard group (0: the launcher's processes per node)
    seed: int = 0
    dtype: str = "float32"
    num_threads: int = 0  # 0: leave torch's default

    def __post_init__(self) -> None:
        check_types(self)
        check_choice("engine", self.engine, tuple(ENGINES))
        if (self.engine == "deepspeed") != (self.deepspeed_config is not None):
            if self.engine == "deepspeed":
                raise ConfigError("deepspeed_config", None, "engine 'deepspeed' needs a DeepSpeed JSON (or --deepspeed)")
            raise ConfigError("deepspeed_config", self.deepspeed_config, f"only for engine 'deepspeed', not {self.engine!r}")
        check_positive("steps", self.steps, integer=True)
        check_nonneg("warmup_steps", self.warmup_steps, integer=True)
        check_choice("lr_schedule", self.lr_schedule, ("constant", "cosine"))
        check_positive("grad_accum", self.grad_accum, integer=True)
        check_positive("eval_interval", self.eval_interval, integer=True)
        check_positive("eval_batches", self.eval_batches, integer=True)
        check_positive("log_interval", self.log_interval, integer=True)
        check_nonneg("save_interval", self.save_interval, integer=True)
        check_positive("keep_last", self.keep_last, integer=True)
        check_nonneg("hsdp_shard_size", self.hsdp_shard_size, integer=True)
        if self.hsdp_shard_size and self.engine != "hsdp":
            raise ConfigError("hsdp_shard_size", self.hsdp_shard_size, f"only for engine 'hsdp', not {self.engine!r}")
        check_choice("dtype", self.dtype, ("float32", "bfloat16"))
        check_nonneg("num_threads", self.num_threads, integer=True)


@dataclass(kw_only=True)
class JobConfig:
    """Whole main-job config: ``plumage-ds train --config FILE``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)

    def __post_init__(self) -> None:
        check_types(self)


def load_config(path: str | os.PathLike, cls: type = JobConfig):
    """Load a YAML/JSON file strictly into ``cls`` (errors name the key with its dotted path)."""
    return from_dict(cls, read_mapping(path))
