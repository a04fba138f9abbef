"""Spawn gloo process groups for tests and benchmarks (no launcher, no fixed ports).

``run_workers(fn, world_size, *args)`` starts ``world_size`` processes with
``torch.multiprocessing`` (spawn), initializes a gloo process group through a
``file://`` rendezvous in a fresh temporary directory, calls
``fn(rank, world_size, *args)`` in each, and returns the list of per-rank return
values (anything ``torch.save`` can store). A failure on any rank raises
``RuntimeError`` carrying that rank's traceback. Teardown follows
the order ``docs/design.md`` §6 gives: ``gc.collect(); barrier(); destroy_process_group()``.
"""

from __future__ import annotations

import gc
import os
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world_size: int, init_file: str, out_dir: str, fn, args, threads: int, clean: bool) -> None:
    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size)}
    )
    torch.set_num_threads(threads)
    result_path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, result_path)
        if not clean:  # collectives were left unmatched on purpose: no teardown collective can be trusted
            os._exit(0)
    except BaseException:  # noqa: BLE001 - reported to the parent
        torch.save({"ok": False, "error": traceback.format_exc()}, result_path)
        raise
    finally:
        gc.collect()
        if dist.is_initialized():
            try:
                dist.barrier()
            finally:
                dist.destroy_process_group()


def free_port() -> int:
    """A TCP port that was free a moment ago (for launchers that need ``MASTER_PORT`` / an endpoint)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def record(out: dict, name: str, fn) -> None:
    """Run one scenario inside a spawned worker: ``out[name]`` is ``{"ok": True, **fn()}`` or the
    traceback (``{"ok": False, "error": ...}``); then every rank meets at a barrier, so the next
    scenario starts together even after a failure."""
    try:
        out[name] = {"ok": True, **fn()}
    except Exception:  # noqa: BLE001 - reported per scenario
        out[name] = {"ok": False, "error": traceback.format_exc()}
    gc.collect()
    dist.barrier()


def run_workers(fn, world_size: int, *args, threads: int = 1, clean_teardown: bool = True) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return per-rank results.

    ``clean_teardown=False``: for jobs that leave collectives unmatched on purpose (timeouts), each
    worker exits right after saving its result, without the teardown barrier.
    """
    with tempfile.TemporaryDirectory(prefix="plumage_ds_") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        try:
            mp.spawn(_entry, args=(world_size, init_file, tmp, fn, args, threads, clean_teardown), nprocs=world_size, join=True)
        except Exception as exc:  # surface the worker's own traceback
            errors = []
            for r in range(world_size):
                path = os.path.join(tmp, f"rank{r}.pt")
                if os.path.exists(path):
                    rec = torch.load(path, weights_only=False)
                    if not rec["ok"]:
                        errors.append(f"--- rank {r} ---\n{rec['error']}")
            raise RuntimeError("distributed worker failed:\n" + ("\n".join(errors) or str(exc))) from None
        results = []
        for r in range(world_size):
            rec = torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False)
            results.append(rec["result"])
        return results


# ----------------------------------------------------------------------------- tiny models and data

TINY_VOCAB = 64


def tiny_llama(seed: int = 0, *, vocab: int = TINY_VOCAB, hidden: int = 32, intermediate: int = 48,
               layers: int = 2, heads: int = 4, kv_heads: int = 2, tie: bool = False):
    """A few-thousand-parameter ``LlamaForCausalLM`` built from a config (no download).

    With the defaults its matrices cover both orientations: gate/up ``(48, 32)`` are right
    projections, down ``(32, 48)``, q/o ``(32, 32)`` and k/v ``(16, 32)`` left ones.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        use_cache=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).float()


def token_batch(step: int, batch: int, *, seq: int = 16, vocab: int = TINY_VOCAB, salt: int = 0,
                learnable: bool = False) -> torch.Tensor:
    """``(batch, seq + 1)`` token ids for ``step``, from a generator seeded by ``(step, salt)``.

    ``learnable=False``: uniform tokens (full-rank gradients, loss stays near ``ln(vocab)``);
    ``True``: arithmetic sequences a model can learn.
    """
    g = torch.Generator().manual_seed(1_000_003 * step + salt)
    if not learnable:
        return torch.randint(0, vocab, (batch, seq + 1), generator=g)
    start = torch.randint(0, vocab, (batch, 1), generator=g)
    stride = torch.randint(1, 4, (batch, 1), generator=g)
    return (start + stride * torch.arange(seq + 1)) % vocab


def lm_loss(model, x: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy of a causal LM on ``x`` ``(batch, seq + 1)`` (fp32 logits)."""
    import torch.nn.functional as F

    logits = model(input_ids=x[:, :-1]).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


def _seeded(seed: int, build):
    torch.manual_seed(seed)
    return build().float()


def tiny_gpt2(seed: int = 0, *, vocab: int = TINY_VOCAB, hidden: int = 32, layers: int = 2, heads: int = 2,
              tie: bool = True):
    """A tiny ``GPT2LMHeadModel`` (``Conv1D`` layers, ``wte`` tied to ``lm_head`` by default; no dropout)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=vocab, n_positions=64, n_embd=hidden, n_layer=layers, n_head=heads, tie_word_embeddings=tie,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, use_cache=False,
    )
    model = _seeded(seed, lambda: GPT2LMHeadModel(cfg))
    # the class name does not say "ForCausalLM": without this, transformers.Trainer would count the
    # unshifted labels as the loss's denominator (loss scaled by (seq-1)/seq) and warn
    model.loss_type = "ForCausalLM"
    return model


def _bert_like_config(cls, vocab: int, hidden: int, layers: int):
    return cls(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=48, max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )


def tiny_bert(seed: int = 0, *, vocab: int = TINY_VOCAB, hidden: int = 32, layers: int = 2):
    """A tiny ``BertForMaskedLM`` (word embeddings tied to the MLM decoder)."""
    from transformers import BertConfig, BertForMaskedLM

    return _seeded(seed, lambda: BertForMaskedLM(_bert_like_config(BertConfig, vocab, hidden, layers)))


def tiny_roberta(seed: int = 0, *, vocab: int = TINY_VOCAB, hidden: int = 32, layers: int = 2):
    """A tiny ``RobertaForMaskedLM`` (BERT naming under ``roberta.``; ``lm_head`` holds the MLM decoder)."""
    from transformers import RobertaConfig, RobertaForMaskedLM

    return _seeded(seed, lambda: RobertaForMaskedLM(_bert_like_config(RobertaConfig, vocab, hidden, layers)))


def tiny_t5(seed: int = 0, *, vocab: int = TINY_VOCAB, hidden: int = 32, layers: int = 2):
    """A tiny ``T5ForConditionalGeneration`` (``shared`` tied to both embeddings and ``lm_head``)."""
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=vocab, d_model=hidden, d_kv=8, d_ff=48, num_layers=layers, num_heads=2, dropout_rate=0.0)
    return _seeded(seed, lambda: T5ForConditionalGeneration(cfg))


def tiny_vit(seed: int = 0, *, hidden: int = 32, layers: int = 2, labels: int = 3):
    """A tiny ``ViTForImageClassification`` on 16x16 images (4 patches of 8x8)."""
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        image_size=16, patch_size=8, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=48, num_labels=labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return _seeded(seed, lambda: ViTForImageClassification(cfg))


TINY_MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert, "roberta": tiny_roberta, "t5": tiny_t5,
               "vit": tiny_vit}
"""Builders of the tiny models by family name (all from configs, no download)."""


def groups_listed_once(model, rank: int, target_modules=None) -> list[dict]:
    """Param groups with every tensor listed ONCE, straight from ``named_parameters()`` (which skips
    repeats): the reference that tied-weight runs through :func:`~plumage_ds.optim.lowrank_param_groups`
    must equal. Targets as :func:`~plumage_ds.optim.select_targets` chooses them, in the same order."""
    from plumage_ds.optim import select_targets

    targets = {id(p) for _, p, _ in select_targets(model, target_modules, rank=rank)}
    named = list(model.named_parameters())
    return [
        {"params": [p for _, p in named if id(p) in targets], "names": [n for n, p in named if id(p) in targets],
         "lowrank": True},
        {"params": [p for _, p in named if id(p) not in targets], "names": [n for n, p in named if id(p) not in targets],
         "lowrank": False},
    ]


def lm_examples(n: int, *, seq: int = 16, vocab: int = TINY_VOCAB, salt: int = 0) -> list[dict]:
    """``n`` causal-LM examples ``{"input_ids", "labels"}`` (labels = inputs: the model shifts them), a
    dataset for ``transformers.Trainer`` / Accelerate loops; example ``i`` is fixed by ``(i, salt)``."""
    rows = []
    for i in range(n):
        x = token_batch(i, 1, seq=seq - 1, vocab=vocab, salt=salt)[0]
        rows.append({"input_ids": x, "labels": x.clone()})
    return rows


def hf_lm_loss(model, rows: list[dict]) -> torch.Tensor:
    """The HF models' own causal-LM loss on a batch of :func:`lm_examples` rows, computed as
    ``transformers.Trainer`` does it (summed token losses over ``num_items_in_batch`` targets)."""
    x = torch.stack([r["input_ids"] for r in rows])
    y = torch.stack([r["labels"] for r in rows])
    return model(input_ids=x, labels=y, num_items_in_batch=y[:, 1:].ne(-100).sum()).loss


def hf_training_args(out_dir: str, *, steps: int, batch: int, lr: float = 3e-3, **overrides):
    """``TrainingArguments`` for deterministic tiny Trainer runs: CPU, constant lr, no clipping,
    sequential sampling (step ``s`` on ``W`` ranks reads examples ``[s·W·batch, (s+1)·W·batch)``),
    no logging integrations, no checkpoints unless ``overrides`` ask for them."""
    from transformers import TrainingArguments

    kw = dict(
        output_dir=out_dir, per_device_train_batch_size=batch, max_steps=steps, learning_rate=lr,
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0, weight_decay=0.0,
        train_sampling_strategy="sequential", report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    kw.update(overrides)
    return TrainingArguments(**kw)


def canonical_svd(monkeypatch) -> None:
    """Make ``torch.linalg.svd`` return its singular vectors in :func:`~plumage_ds.estimators.spectral.canonical_signs`'
    form (``U`` or ``Vᵀ``'s rows, whichever is the short side's basis, and the other factor flipped alike):
    a peer that takes raw LAPACK signs (galore-torch) then follows the project's sign convention."""
    from plumage_ds.estimators.spectral import canonical_signs

    svd = torch.linalg.svd

    def canonical(A, *args, **kwargs):
        U, S, Vh = svd(A, *args, **kwargs)
        basis = U if A.shape[-2] < A.shape[-1] else Vh.mT
        D = (canonical_signs(basis) * basis).sum(-2).sign()  # +1 kept, −1 flipped, per singular vector
        return U * D, S, Vh * D[..., :, None]

    monkeypatch.setattr(torch.linalg, "svd", canonical)
