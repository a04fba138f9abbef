#!/usr/bin/env python
"""Memory of the optimizer step on CPU, measured with PyTorch's own ``MemTracker`` (docs/benchmarks.md "Memory").

    PYTHONPATH=. python benchmarks/bench_memory.py          # ~1 min on 2 cores

1. **One ordinary ``step()``** on bf16 weights: the 14 matrices of a 256-wide LLaMA block pair (q, k,
   v, o 256², gate, up 688 × 256, down 256 × 688, twice), random gradients, r = s/4 = 64. Per
   optimizer: the peak allocated during the step above what was allocated before it (the step's
   transient), and the state. AdamW (``torch.optim.AdamW``), galore-torch's ``GaLoreAdamW`` (when
   installed), ``PlumageAdamW`` staged and streaming, fp32 and bf16 state. Target (docs/design.md
   §5.1): transient ≤ 2 × the largest matrix in fp32; bf16 state ≤ 1.05 × galore-torch's.
2. **A whole training step** (forward, backward, ``step()``; an ordinary one, after the refresh) of a
   4-layer 256-wide LLaMA in bf16, batch 2 × 32 (few tokens, so that gradients rather than activations
   set the peak): the peak above the weights (state, gradients, activations, transients), AdamW against
   ``PlumageAdamW`` with and without ``backward_projection`` (target gradients kept as ``Pᵀ G``) and
   against galore-torch.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_check

import torch  # noqa: E402
from torch.distributed._tools.mem_tracker import MemTracker  # noqa: E402

from plumage_ds import PlumageAdamW  # noqa: E402
from plumage_ds.optim import lowrank_param_groups  # noqa: E402
from gpu_check import _state_bytes  # noqa: E402  (galore-torch's projectors counted too)

WIDTH, FFN, RANK = 256, 688, 64
BATCH, SEQ = 2, 32  # few tokens: gradients, not activations, set the peak (as at 1B scale with activation checkpointing)
SHAPES = ([(WIDTH, WIDTH)] * 4 + [(FFN, WIDTH), (FFN, WIDTH), (WIDTH, FFN)]) * 2


def _total(snapshot: dict) -> int:
    return sum(v for per_device in snapshot.values() for k, v in per_device.items() if str(k).endswith("Total"))


def _galore(params_or_groups, tau: int):
    import galore_torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return galore_torch.GaLoreAdamW(params_or_groups, lr=1e-3, no_deprecation_warning=True)


def step_transient() -> list[tuple[str, int, int]]:
    """``(optimizer, transient bytes of one ordinary step, state bytes)``."""
    makers = {
        "torch AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
        "PlumageAdamW, staged": lambda ps: PlumageAdamW(ps, lr=1e-3, rank=RANK, update_interval=100, step_impl="staged"),
        "PlumageAdamW, streaming": lambda ps: PlumageAdamW(ps, lr=1e-3, rank=RANK, update_interval=100),
        "PlumageAdamW, streaming, bf16 state": lambda ps: PlumageAdamW(ps, lr=1e-3, rank=RANK, update_interval=100,
                                                                     state_dtype="bfloat16"),
    }
    try:
        import galore_torch  # noqa: F401

        makers["galore-torch GaLoreAdamW"] = lambda ps: _galore(
            [{"params": ps, "rank": RANK, "update_proj_gap": 100, "scale": 1.0, "proj_type": "std"}], 100)
    except ImportError:
        pass
    rows = []
    for name, make in makers.items():
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter((torch.randn(s, generator=g) * 0.02).bfloat16()) for s in SHAPES]
        opt = make(params)
        for step in range(3):  # the refresh, an ordinary step, then the measured one
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).bfloat16()
            if step < 2:
                opt.step()
        tracker = MemTracker()
        tracker.track_external(opt, *params, *[p.grad for p in params])
        with tracker:
            before = tracker.get_tracker_snapshot("current")
            opt.step()
        rows.append((name, _total(tracker.get_tracker_snapshot("peak")) - _total(before), _state_bytes(opt)))
    return rows


def whole_step() -> list[tuple[str, int]]:
    """``(optimizer, peak bytes above the weights of an ordinary whole training step)``: the optimizer
    state, gradients, activations and the step's transients at their peak."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=WIDTH, intermediate_size=FFN, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=256, max_position_embeddings=128, tie_word_embeddings=False)
    makers = {
        "torch AdamW": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=True),
        "PlumageAdamW": lambda m: PlumageAdamW(m.named_parameters(), lr=1e-3, rank=RANK, update_interval=100),
        "PlumageAdamW, backward_projection": lambda m: PlumageAdamW(m.named_parameters(), lr=1e-3, rank=RANK,
                                                                    update_interval=100, backward_projection=True),
        "PlumageAdamW, backward_projection, bf16 state": lambda m: PlumageAdamW(
            m.named_parameters(), lr=1e-3, rank=RANK, update_interval=100, backward_projection=True, state_dtype="bfloat16"),
    }
    try:
        import galore_torch  # noqa: F401

        def galore(m):
            groups, _ = lowrank_param_groups(m, rank=RANK)
            low = [g for g in groups if g["lowrank"]][0]["params"]
            rest = [p for g in groups if not g["lowrank"] for p in g["params"]]
            return _galore([{"params": rest}, {"params": low, "rank": RANK, "update_proj_gap": 100, "scale": 1.0,
                                               "proj_type": "std"}], 100)  # fmt: skip

        makers["galore-torch GaLoreAdamW"] = galore
    except ImportError:
        pass
    rows = []
    for name, make in makers.items():
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).bfloat16()
        opt = make(model)
        g = torch.Generator().manual_seed(1)
        batches = [torch.randint(0, 256, (BATCH, SEQ), generator=g) for _ in range(3)]

        def train_step(x):
            opt.zero_grad(set_to_none=True)
            model(input_ids=x, labels=x).loss.backward()
            opt.step()

        for x in batches[:2]:  # the refresh, an ordinary step; then the measured ordinary one
            train_step(x)
        opt.zero_grad(set_to_none=True)
        tracker = MemTracker()
        tracker.track_external(opt, *model.parameters())
        with tracker:
            train_step(batches[2])
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        rows.append((name, _total(tracker.get_tracker_snapshot("peak")) - weights))
    return rows


def main() -> None:
    torch.set_num_threads(1)
    largest = max(m * n for m, n in SHAPES) * 4
    rows = step_transient()
    print(f"One ordinary step(), bf16 weights, {len(SHAPES)} matrices of a {WIDTH}-wide LLaMA block pair, r = {RANK}; "
          f"largest matrix in fp32: {largest / 2**20:.2f} MiB\n")
    galore = next((state for name, _, state in rows if name.startswith("galore")), None)
    print("| optimizer | step transient | × largest matrix | state | × galore-torch's state |")
    print("|---|---|---|---|---|")
    for name, transient, state in rows:
        vs = f"{state / galore:.2f}" if galore else "–"
        print(f"| {name} | {transient / 2**20:.2f} MiB | {transient / largest:.2f} | {state / 2**20:.2f} MiB | {vs} |")
    print(f"\nWhole ordinary training step (forward, backward, step), 4-layer LLaMA, bf16, batch {BATCH} x {SEQ}: peak "
          "above the weights (optimizer state, gradients, activations, transients)\n")
    whole = whole_step()
    base = next(b for name, b in whole if name == "torch AdamW")
    print("| optimizer | peak above weights | vs AdamW |")
    print("|---|---|---|")
    for name, b in whole:
        print(f"| {name} | {b / 2**20:.1f} MiB | {b / base:.2f} |")


if __name__ == "__main__":
    main()
