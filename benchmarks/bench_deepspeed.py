"""PLUMAGE under DeepSpeed vs DeepSpeed's own AdamW: per-rank optimizer-state bytes, communicated
bytes of the target matrices, step time (W ranks on CPU/gloo, spawned; tiny LLaMA by default).

    DS_ACCELERATOR=cpu PYTHONPATH=. python benchmarks/bench_deepspeed.py --stages 0 2 --hidden 128 --steps 8

All numbers are measured: state bytes from the optimizer tensors on each rank (PLUMAGE:
``composite.state_bytes()``; baseline: the torch AdamW state DeepSpeed keeps for its partition),
bytes from the accounted collective layer (PLUMAGE's traffic only; DeepSpeed's own reduction of the
non-targets is not counted), step time = median wall time of the ordinary steps (refresh at step 0
excluded). Prints one JSON line per (stage, optimizer).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from plumage_ds.testing import run_workers  # noqa: E402


def _model(hidden, layers, vocab):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=False)
    ).float()


def _worker(rank, world, port, args):
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu"})
    import deepspeed

    from plumage_ds.integrations import deepspeed as pds

    rows = []
    mb = 4
    for stage in args.stages:
        for kind in ("plumage", "adamw"):
            model = _model(args.hidden, args.layers, args.vocab)
            cfg = {"train_batch_size": mb * world, "train_micro_batch_size_per_gpu": mb, "gradient_clipping": 0.0,
                   "zero_optimization": {"stage": stage}, "steps_per_print": 10**6,
                   "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
            if kind == "plumage":
                cfg["plumage"] = {"rank": args.rank, "update_interval": 200, "target_modules": ["self_attn|mlp"]}
                engine, *_ = pds.initialize(model=model, config=cfg)
            else:
                cfg.pop("optimizer")
                cfg["zero_allow_untested_optimizer"] = True
                engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                                                  config=cfg)
            times = []
            for step in range(args.steps):
                g = torch.Generator().manual_seed(step)
                x = torch.randint(0, args.vocab, (mb * world, 33), generator=g)[rank * mb:(rank + 1) * mb]
                t0 = time.perf_counter()
                logits = engine(input_ids=x[:, :-1]).logits
                loss = F.cross_entropy(logits.float().reshape(-1, args.vocab), x[:, 1:].reshape(-1))
                engine.backward(loss)
                engine.step()
                times.append(time.perf_counter() - t0)
            row = {"stage": stage, "optimizer": kind, "rank": rank, "step_s": statistics.median(times[1:])}
            if kind == "plumage":
                opt = pds.plumage_optimizer(engine)
                row["state_bytes"] = opt.state_bytes()
                last = opt.comm_stats()["last_step"]
                row["target_comm_bytes_per_step"] = sum(v["bytes"] for k, v in last.items() if k.startswith("lowrank_"))
                tgt = [p for gr in opt.plumage.param_groups for p in gr["params"]]
                numel = sum(int(torch.Size(getattr(p, "ds_shape", p.shape)).numel()) for p in tgt)
                row["ddp_allreduce_bytes_targets"] = 2 * (world - 1) / world * numel * 4
                row["adamw_moment_bytes_targets_replicated"] = 2 * numel * 4
            else:
                basic = engine.basic_optimizer
                row["state_bytes"] = {"total": sum(t.numel() * t.element_size() for st in basic.state.values()
                                                   for t in st.values() if torch.is_tensor(t) and t.dim() > 0)}
            rows.append(row)
            del engine
            gc.collect()
            torch.distributed.barrier()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    for rows in zip(*run_workers(_worker, args.world, port, args)):
        for row in rows:
            print(json.dumps(row))


if __name__ == "__main__":
    main()
