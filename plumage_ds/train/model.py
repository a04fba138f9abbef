"""Causal language models built from a :class:`~plumage_ds.config.ModelConfig` (no downloads).

Any ``transformers`` model type with a causal-LM head: the config class comes from
``model_type`` (or the ``config`` file), every other key of the ``model:`` section must be a
field of that class (an unknown key is an error naming it, even though ``transformers`` would
accept it silently), ``vocab_size`` defaults to the tokenizer's and may not be smaller, and
special-token ids the vocabulary cannot hold (GPT-2's 50256 with a byte vocabulary) are
cleared unless given. Weights are initialised from the config only. A value the config class
rejects, attention heads that do not split into key/value heads, or a model that cannot run one
forward pass with the values given is a :class:`ConfigError` naming the key (or the section),
raised before the run directory exists.

Invariant: for the same resolved config and ``seed`` the initial weights are identical (the
global torch RNG is seeded right before construction, and nothing else draws from it in between).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from plumage_ds.config import LLAMA_DEFAULTS, ConfigError, ModelConfig

ATTN_IMPLEMENTATION = "sdpa"
"""``torch.nn.functional.scaled_dot_product_attention`` where the model class supports it (runs on
CPU and GPU, no extra package, same losses as ``eager`` on CPU in fp32); ``eager`` otherwise —
``summary.json["model"]["attn_implementation"]`` says which."""

_SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def hf_config(cfg: ModelConfig, *, vocab_size: int, seq_len: int):
    """The resolved ``transformers`` config; ``ConfigError`` naming the key for anything wrong."""
    from transformers import CONFIG_MAPPING, AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    fields: dict[str, Any] = dict(cfg.fields)
    if cfg.config is not None:
        path = Path(cfg.config)
        if not (path.is_file() or (path / "config.json").is_file()):
            raise ConfigError("model.config", cfg.config, "no such config.json (or directory holding one)")
        try:
            base = AutoConfig.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as err:
            raise ConfigError("model.config", cfg.config, f"not a transformers config ({str(err).splitlines()[0]})") from None
        if cfg.model_type is not None and cfg.model_type != base.model_type:
            raise ConfigError("model.model_type", cfg.model_type, f"but {cfg.config} is a {base.model_type!r} config")
        model_type = base.model_type
    else:
        model_type = cfg.model_type or "llama"
        if model_type not in CONFIG_MAPPING:
            raise ConfigError("model.model_type", model_type, "not a transformers model type (e.g. llama, gpt2, qwen2)")
        base = CONFIG_MAPPING[model_type]()
        if model_type == "llama":
            fields = {**LLAMA_DEFAULTS, **fields}
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError("model.model_type", model_type, "has no causal-LM head in transformers")
    for key in cfg.fields:
        if key in ("model_type", "architectures") or not hasattr(base, key):
            raise ConfigError(f"model.{key}", cfg.fields[key], f"not a field of the {model_type!r} config")
    given_vocab = fields.get("vocab_size", base.vocab_size if cfg.config is not None else None)
    if given_vocab is None:
        fields["vocab_size"] = vocab_size
    elif given_vocab < vocab_size:
        raise ConfigError("model.vocab_size", given_vocab, f"smaller than the tokenizer's vocabulary ({vocab_size})")
    final_vocab = fields.get("vocab_size", base.vocab_size)
    for key in _SPECIAL_IDS:  # ids the vocabulary cannot hold, unless the user set them
        value = getattr(base, key, None)
        if key not in cfg.fields and isinstance(value, int) and value >= final_vocab:
            fields[key] = None
    # construct with the fields (configs derive attributes such as LLaMA's head_dim in __init__)
    try:
        if cfg.config is not None:
            base = AutoConfig.from_pretrained(str(Path(cfg.config)), local_files_only=True, **fields)
        else:
            base = CONFIG_MAPPING[model_type](**fields)
    except Exception as err:  # transformers' (strict dataclass) validation: a type or a value it rejects
        raise _rejected(err, cfg, model_type) from None
    base.use_cache = False
    heads, kv_heads = getattr(base, "num_attention_heads", None), getattr(base, "num_key_value_heads", None)
    if isinstance(heads, int) and isinstance(kv_heads, int) and (kv_heads < 1 or heads % kv_heads):
        raise ConfigError("model.num_key_value_heads", kv_heads, f"must divide num_attention_heads={heads} (grouped-query attention)")
    max_pos = getattr(base, "max_position_embeddings", None)
    if isinstance(max_pos, int) and seq_len > max_pos:
        raise ConfigError("data.seq_len", seq_len, f"exceeds the model's max_position_embeddings={max_pos}")
    return base


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0].strip() if text else type(err).__name__


def _rejected(err: Exception, cfg: ModelConfig, model_type: str) -> ConfigError:
    """The one-line error for a config the ``transformers`` class rejects, naming the field it names."""
    cause = err.__cause__ or err
    text = str(err)
    key = getattr(err, "field", None)
    if key not in cfg.fields:
        words = text.replace("`", " ").replace("'", " ").lower()
        key = next((k for k in cfg.fields if f" {k} " in words or f" {k.replace('_', ' ')} " in words), None)
    reason = f"rejected by the {model_type!r} config ({_first_line(cause)})"
    if key is None:
        return ConfigError("model", dict(cfg.fields), reason)
    return ConfigError(f"model.{key}", cfg.fields[key], reason)


def build_meta_model(cfg: ModelConfig, *, vocab_size: int, seq_len: int):
    """The model of ``cfg`` on the ``meta`` device: shapes only, no memory, no initialisation (for checks)."""
    conf = hf_config(cfg, vocab_size=vocab_size, seq_len=seq_len)
    with torch.device("meta"):
        return _from_config(conf, cfg)


def _from_config(conf, cfg: ModelConfig, **kw):
    """``AutoModelForCausalLM.from_config``; what the model's constructor rejects (GPT-2's ``n_embd``
    not divisible by ``n_head``...) is a one-line :class:`ConfigError` naming the section."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_config(conf, **kw)
    except Exception as err:
        raise ConfigError("model", dict(cfg.fields), f"the model cannot be built ({_first_line(err)})") from None


def probe_forward(model, cfg: ModelConfig, *, seq_len: int) -> None:
    """One eval-mode forward of ``min(8, seq_len)`` tokens (no dropout, so no RNG draw): a config the model cannot run
    fails here, before the run directory exists, as a :class:`ConfigError` naming the section."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, min(8, seq_len), dtype=torch.long, device=next(model.parameters()).device))
    except Exception as err:  # shapes the config makes inconsistent surface in the model's own code
        raise ConfigError(
            "model", dict(cfg.fields), f"the model cannot run a forward pass ({type(err).__name__}: {_first_line(err)})"
        ) from None
    finally:
        model.train(was_training)


def build_model(cfg: ModelConfig, *, vocab_size: int = 256, seq_len: int = 1, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A freshly initialised causal LM for ``cfg`` with a seeded init, in ``dtype``."""
    from transformers import AutoModelForCausalLM

    conf = hf_config(cfg, vocab_size=vocab_size, seq_len=seq_len)
    model_cls = AutoModelForCausalLM._model_mapping[type(conf)]
    attn = ATTN_IMPLEMENTATION if getattr(model_cls, "_supports_sdpa", False) else "eager"
    torch.manual_seed(seed)
    model = _from_config(conf, cfg, attn_implementation=attn)
    return model.to(dtype=dtype)


def describe_model(model) -> dict:
    """``{model_type, attn_implementation, num_params}`` for ``summary.json``."""
    conf = model.config
    return {
        "model_type": conf.model_type,
        "attn_implementation": getattr(conf, "_attn_implementation", None),
        "num_params": sum(p.numel() for p in model.parameters()),
    }


def causal_lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (fp32) of ``batch`` windows ``(B, seq_len + 1)``."""
    logits = model(input_ids=batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
    )
