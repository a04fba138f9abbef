"""Small PLUMAGE + DeepSpeed training script for the real ``deepspeed`` launcher.

    DS_ACCELERATOR=cpu deepspeed --num_nodes 1 --num_accelerators 2 launch/deepspeed_train.py \
        --deepspeed_config configs/deepspeed/zero2.json --steps 20

Tiny LLaMA (vocab 256) on bytes of the running Python's standard library (``os.py`` and
neighbours), global batch from the DeepSpeed config, each rank its contiguous slice.
``--result PATH`` (rank 0) writes losses, world size, stage and a replica check as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sysconfig

import torch
import torch.distributed as dist
import torch.nn.functional as F


def corpus_tokens(max_bytes: int = 1 << 20) -> torch.Tensor:
    root = sysconfig.get_paths()["stdlib"]
    data = b""
    for name in sorted(os.listdir(root)):
        if name.endswith(".py"):
            with open(os.path.join(root, name), "rb") as f:
                data += f.read()
        if len(data) >= max_bytes:
            break
    return torch.frombuffer(bytearray(data[:max_bytes]), dtype=torch.uint8).long()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--deepspeed_config", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq_len", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--result", default=None)
    parser.add_argument("--local_rank", type=int, default=-1)  # passed by the deepspeed launcher
    args, _ = parser.parse_known_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    from plumage_ds.integrations import deepspeed as pds

    with open(args.deepspeed_config, encoding="utf-8") as f:
        config = json.load(f)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=256,
            hidden_size=args.hidden,
            intermediate_size=args.hidden * 2,
            num_hidden_layers=args.layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=args.seq_len,
            use_cache=False,
        )
    ).float()
    engine, _, _, _ = pds.initialize(model=model, config=config)
    rank, world = dist.get_rank(), dist.get_world_size()
    gas = engine.gradient_accumulation_steps()
    micro = engine.train_micro_batch_size_per_gpu()
    tokens = corpus_tokens()
    losses = []
    for step in range(args.steps):
        g = torch.Generator().manual_seed(10_007 * step + 1)
        starts = torch.randint(0, tokens.numel() - args.seq_len - 1, (micro * gas * world,), generator=g)
        windows = torch.stack([tokens[s : s + args.seq_len + 1] for s in starts.tolist()])
        total = 0.0
        for j in range(gas):
            k = rank * gas + j
            x = windows[k * micro : (k + 1) * micro]
            logits = engine(input_ids=x[:, :-1]).logits
            loss = F.cross_entropy(logits.float().reshape(-1, 256), x[:, 1:].reshape(-1))
            engine.backward(loss)
            engine.step()
            total += float(loss.detach()) / gas
        t = torch.tensor([total], dtype=torch.float64)
        dist.all_reduce(t)
        losses.append(float(t) / world)
        if rank == 0:
            print(f"[plumage_ds] step {step} loss {losses[-1]:.4f} lr {engine.get_lr()[0]:.2e}", flush=True)
    flat = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    opt = pds.plumage_optimizer(engine)
    if rank == 0 and args.result:
        with open(args.result, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "world_size": world,
                    "stage": opt.stage,
                    "losses": losses,
                    "replicas_equal": all(torch.equal(gathered[0], x) for x in gathered),
                    "state_bytes": opt.state_bytes(),
                },
                f,
            )
    del engine, opt
    import gc

    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
