"""A small LLaMA built from :class:`~plumage_ds.config.ModelConfig` (no downloads).

Invariant: for the same ``ModelConfig`` and ``seed`` the initial weights are identical
(the global torch RNG is seeded right before construction, and nothing else draws from
it in between).
"""

from __future__ import annotations

import torch

from plumage_ds.config import ModelConfig

ATTN_IMPLEMENTATION = "sdpa"
"""``torch.nn.functional.scaled_dot_product_attention``: runs on CPU and GPU, no extra
package, and gives the same losses as ``eager`` on CPU in fp32."""


def build_model(cfg: ModelConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """``transformers.LlamaForCausalLM`` for ``cfg`` with a seeded init, in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        attn_implementation=ATTN_IMPLEMENTATION,
        use_cache=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(hf_cfg)
    return model.to(dtype=dtype)


def causal_lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (fp32) of ``batch`` windows ``(B, seq_len + 1)``."""
    logits = model(input_ids=batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
    )
