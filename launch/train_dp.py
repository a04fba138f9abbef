#!/usr/bin/env python
"""Minimal ``torchrun`` entry: a tiny LLaMA trained with ``ShardedPlumageAdamW`` (DESIGN §4.1).

    torchrun --nproc_per_node=2 --rdzv-backend=c10d --rdzv-endpoint=localhost:0 \\
        launch/train_dp.py --steps 50 --rank 8 --update-interval 10

(or ``launch/torchrun_dp.sh --steps 50``). One process per rank; gloo on CPU, nccl when CUDA is
available (one GPU per local rank). No DDP wrapper: the optimizer averages the gradients itself
(compressed ``r × l`` projections for target matrices, full gradients only on refresh steps), so
each rank only runs forward/backward on its slice of the global batch and calls ``step()``.

Data: the embedded byte-level corpus (the standard library's ``.py`` sources,
:mod:`plumage_ds.train.data`); step ``s`` uses the same ``--global-batch`` windows for every world
size; rank ``k`` runs its contiguous slice of them, split into ``--grad-accum`` micro-batches.
Rank 0 prints ``step … loss …`` lines, a ``comm`` / ``state`` summary and ``final loss: X``
(the global mean loss of the last step).

Checkpoints: ``--save-dir D`` writes ``D/model.pt``, ``D/optim_rank{k}.pt`` (each rank its shard)
and ``D/meta.json`` at the end; ``--resume-dir D`` continues from such a directory on any world
size (same world size: each rank loads its shard; otherwise the shards are merged with
:func:`plumage_ds.optim.merge_shards`). Everything is loaded with ``weights_only=True``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

try:
    import plumage_ds  # noqa: F401
except ImportError:  # run from a checkout without installing: torchrun puts launch/ on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import warnings

import torch
import torch.distributed as dist

# torch 2.13 deprecates reduce_scatter_tensor / all_gather_into_tensor by name; not actionable here
warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed\.", category=FutureWarning)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="optimizer steps (total, counting resumed ones)")
    p.add_argument("--rank", type=int, default=8, help="projection rank r of the target matrices")
    p.add_argument("--update-interval", type=int, default=10, help="τ: steps between projector refreshes")
    p.add_argument("--estimator", default="plumage", choices=["plumage", "galore", "haar"])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--scale", type=float, default=1.0, help="lift scale α")
    p.add_argument("--max-grad-norm", type=float, default=0.0, help="global-norm clip (0: off)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--global-batch", type=int, default=8,
                   help="windows per optimizer step over all ranks and micro-batches (same for every world size)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--intermediate-size", type=int, default=172)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--target-modules", default=r"self_attn|mlp", help="regex on module names")
    p.add_argument("--corpus-bytes", type=int, default=400_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-interval", type=int, default=1)
    p.add_argument("--save-dir", default=None)
    p.add_argument("--resume-dir", default=None)
    p.add_argument("--backend", default=None, choices=["gloo", "nccl"], help="default: nccl with CUDA, else gloo")
    args = p.parse_args(argv)
    if args.steps < 1 or args.grad_accum < 1 or args.global_batch < 1:
        p.error("--steps, --grad-accum and --global-batch must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from plumage_ds.config import DataConfig, ModelConfig, OptimizerConfig
    from plumage_ds.distributed import DataParallelDistributor
    from plumage_ds.optim import build_optimizer, merge_shards
    from plumage_ds.train.data import BatchStream, load_corpus
    from plumage_ds.train.model import build_model, causal_lm_loss

    backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend)  # env:// (torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT)
    rank, world = dist.get_rank(), dist.get_world_size()
    log = print if rank == 0 else (lambda *a, **k: None)
    if args.global_batch % (world * args.grad_accum):
        raise SystemExit(f"--global-batch={args.global_batch} must be divisible by world_size*grad_accum="
                         f"{world * args.grad_accum}")
    micro = args.global_batch // (world * args.grad_accum)  # windows per rank per micro-batch

    model_cfg = ModelConfig(
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(args.seq_len, 16),
    )
    data_cfg = DataConfig(seq_len=args.seq_len, batch_size=micro, max_corpus_bytes=args.corpus_bytes)
    model = build_model(model_cfg, seed=args.seed).to(device)
    stream = BatchStream(load_corpus(data_cfg), data_cfg, seed=args.seed)
    opt_cfg = OptimizerConfig(
        estimator=args.estimator,
        lr=args.lr,
        weight_decay=args.weight_decay,
        rank=args.rank,
        update_interval=args.update_interval,
        scale=args.scale,
        seed=args.seed,
        grad_clip=args.max_grad_norm,
        target_modules=(args.target_modules,),
    )
    # the factory's PlumageAdamW with the sharded data-parallel distributor == ShardedPlumageAdamW
    opt, _ = build_optimizer(model, opt_cfg, distributor=DataParallelDistributor())

    start = 0
    if args.resume_dir:
        rd = Path(args.resume_dir)
        meta = json.loads((rd / "meta.json").read_text())
        model.load_state_dict(torch.load(rd / "model.pt", map_location=device, weights_only=True))
        if meta["world_size"] == world:
            opt.load_state_dict(torch.load(rd / f"optim_rank{rank}.pt", map_location=device, weights_only=True))
        else:
            shards = [torch.load(rd / f"optim_rank{k}.pt", map_location=device, weights_only=True)
                      for k in range(meta["world_size"])]
            opt.load_state_dict(merge_shards(shards))
        start = int(meta["step"])
        log(f"resumed from {rd} at step {start} (saved on world_size={meta['world_size']})")

    modes = [row["mode"] for row in opt.matrix_report()]
    log(f"world_size={world} backend={backend} device={device} params={sum(p.numel() for p in model.parameters())} "
        f"targets={sum(m != 'adamw' for m in modes)} dense={modes.count('adamw')} rank={args.rank} "
        f"tau={args.update_interval} global_batch={args.global_batch}x{args.seq_len} "
        f"micro_batch={micro}x{args.grad_accum}")

    loss_value = float("nan")
    t0 = time.perf_counter()
    for step in range(start, args.steps):
        total = torch.zeros((), device=device)
        for mb in stream.micro_batches(step, args.grad_accum, rank=rank, world_size=world):
            loss = causal_lm_loss(model, mb.to(device)) / args.grad_accum
            loss.backward()
            total += loss.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dist.all_reduce(total)  # report the global mean loss (not part of the optimizer's accounting)
        loss_value = total.item() / world
        if not torch.isfinite(torch.tensor(loss_value)):
            raise RuntimeError(f"non-finite loss {loss_value} at step {step}")
        if (step + 1) % args.log_interval == 0 or step + 1 == args.steps:
            log(f"step {step + 1}/{args.steps} loss {loss_value:.4f}")
    elapsed = time.perf_counter() - t0

    stats = opt.comm_stats()
    n_steps = max(args.steps - start, 1)  # steps run by this process (``total`` counts them all)
    sent = sum(v["bytes"] for v in stats["total"].values())
    sb = opt.state_bytes()
    mine = torch.tensor([float(sb["total"])], device=device)
    every = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    log(f"comm: {sent / n_steps:.0f} bytes/step/rank (ring model, all tags) over {n_steps} steps")
    log("state bytes per rank: " + ", ".join(str(int(t.item())) for t in every))
    log(f"time: {elapsed / max(args.steps - start, 1) * 1e3:.1f} ms/step")

    if args.save_dir:
        sd = Path(args.save_dir)
        if rank == 0:
            sd.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        torch.save(opt.state_dict(), sd / f"optim_rank{rank}.pt")
        if rank == 0:
            torch.save(model.state_dict(), sd / "model.pt")
            (sd / "meta.json").write_text(json.dumps({"step": args.steps, "world_size": world}))
        dist.barrier()
        log(f"saved checkpoint to {sd}")

    log(f"final loss: {loss_value:.4f}")
    del opt, model
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
