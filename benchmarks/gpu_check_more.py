"""Parts 4 and 5 of ``benchmarks/gpu_check.py``: a whole training step's peak memory at LLaMA-1B shapes,
and the main job's throughput at ~85M parameters (docstring of ``gpu_check.py``).

Both run on CPU with ``--tiny`` (tiny shapes, a few steps: a dry run of the code; no memory figures,
which need ``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import importlib.util
import tempfile
import warnings

import torch

LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)  # fmt: skip
LLAMA_TINY = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)  # fmt: skip
WHOLE_STEP_METHODS = ("adamw", "adamw_8bit", "galore_torch", "plumage", "plumage_backward_projection")


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _whole_step_optimizer(name: str, model, rank: int, tau: int):
    from plumage_ds import PlumageAdamW
    from plumage_ds.optim import lowrank_param_groups

    if name == "adamw":
        fused = next(model.parameters()).device.type == "cuda"
        return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused, foreach=None if fused else True)
    if name == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(model.parameters(), lr=1e-4)
    if name == "galore_torch":
        import galore_torch

        groups, _ = lowrank_param_groups(model, rank=rank)
        low = [g for g in groups if g["lowrank"]][0]["params"]
        rest = [p for g in groups if not g["lowrank"] for p in g["params"]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return galore_torch.GaLoreAdamW(
                [{"params": rest}, {"params": low, "rank": rank, "update_proj_gap": tau, "scale": 1.0, "proj_type": "std"}],
                lr=1e-4, no_deprecation_warning=True,
            )
    return PlumageAdamW(model.named_parameters(), lr=1e-4, rank=rank, update_interval=tau, compute_dtype="bfloat16",
                        state_dtype="bfloat16", backward_projection=name == "plumage_backward_projection")


def whole_step(device: torch.device, *, tiny: bool, steps: int = 4, tau: int = 2) -> list[dict]:
    """Peak memory of ``steps`` whole training steps (forward, backward, ``step()``) per optimizer.

    A LLaMA built from its config (no weights downloaded), bf16, seeded; tokens random. The second
    step is ordinary (the first refreshes): with ``backward_projection`` its targets' gradients are
    ``Pᵀ G`` from the hook on, which the peak over the whole run shows against AdamW's full ones.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    shapes = LLAMA_TINY if tiny else LLAMA_1B
    batch, seq = (2, 16) if tiny else (4, 512)
    rank = 8 if tiny else 512
    rows = []
    for name in WHOLE_STEP_METHODS:
        if (name == "adamw_8bit" and not _have("bitsandbytes")) or (name == "galore_torch" and not _have("galore_torch")):
            rows.append({"method": name, "peak_bytes": None, "note": "not installed"})
            continue
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**shapes, tie_word_embeddings=False)).to(device, torch.bfloat16)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            opt = _whole_step_optimizer(name, model, rank, tau)
        except Exception as err:  # noqa: BLE001 - a peer that cannot run here is a row, not a crash
            rows.append({"method": name, "peak_bytes": None, "note": f"{type(err).__name__}: {err}"[:80]})
            continue
        gen = torch.Generator().manual_seed(1)
        for _ in range(steps):
            x = torch.randint(0, shapes["vocab_size"], (batch, seq), generator=gen).to(device)
            opt.zero_grad(set_to_none=True)
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        rows.append({"method": name, "peak_bytes": peak, "note": ""})
        del opt, model
    return rows


def whole_step_table(rows: list[dict]) -> str:
    base = next((r["peak_bytes"] for r in rows if r["method"] == "adamw"), None)
    out = ["Whole training step (forward, backward, step), LLaMA-1B shapes, bf16, batch 4 x 512:", "",
           "| optimizer | peak memory allocated | vs AdamW |", "|---|---|---|"]  # fmt: skip
    for r in rows:
        if r["peak_bytes"] is None:
            out.append(f"| {r['method']} | – ({r['note'] or 'CPU'}) | – |")
            continue
        ratio = f"{r['peak_bytes'] / base:.2f}" if base else "–"
        out.append(f"| {r['method']} | {r['peak_bytes'] / 2**30:.2f} GiB | {ratio} |")
    return "\n".join(out)


def main_job(device: torch.device, *, tiny: bool, steps: int = 100) -> list[dict]:
    """Tokens/s of the main job (``plumage_ds.train.loop.train``, engine ``local``) per estimator."""
    from plumage_ds.config import from_dict, JobConfig
    from plumage_ds.train.loop import train

    model = ({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 2, "max_position_embeddings": 64} if tiny else
             {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12,
              "num_key_value_heads": 12, "max_position_embeddings": 512})  # fmt: skip
    seq, batch, steps = (32, 4, 3) if tiny else (512, 32, steps)
    rows = []
    for estimator in ("adamw", "galore", "plumage"):
        cfg = from_dict(JobConfig, {
            "model": model,
            "data": {"seq_len": seq, "batch_size": batch, "max_corpus_bytes": 200_000 if tiny else 8_000_000},
            "train": {"steps": steps, "warmup_steps": 2, "eval_interval": steps, "eval_batches": 1, "log_interval": 10,
                      "dtype": "bfloat16" if device.type == "cuda" else "float32"},
            "optimizer": {"estimator": estimator, "lr": 1e-3, "rank": 8 if tiny else 192, "update_interval": 200,
                          **({} if estimator == "adamw" else {"dense_lr": 1e-3})},
        })  # fmt: skip
        with tempfile.TemporaryDirectory() as out:
            summary = train(cfg, out, progress=False)
        rows.append({"estimator": estimator, "tokens_per_s": summary["tokens_per_s"], "loss": summary["final_eval_loss"]})
    return rows


def main_job_table(rows: list[dict]) -> str:
    base = next(r["tokens_per_s"] for r in rows if r["estimator"] == "adamw")
    out = ["The main job (LLaMA 12 x 768, bf16, seq 512 x batch 32, local engine):", "",
           "| estimator | tokens/s | vs AdamW | final eval loss |", "|---|---|---|---|"]  # fmt: skip
    for r in rows:
        out.append(f"| {r['estimator']} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base:.2f} | {r['loss']:.4f} |")
    return "\n".join(out)
