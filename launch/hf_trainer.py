"""HF Trainer with PLUMAGE (:class:`plumage_ds.integrations.hf.PlumageTrainer`) on tiny models.

    torchrun --nproc_per_node 2 launch/hf_trainer.py --job gpt2:hook --job llama --out DIR --result res.json

Each ``--job MODEL[:hook]`` (``gpt2``/``llama``, built from configs) trains ``--steps`` steps on
synthetic token sequences, sequential sampling; ``:hook`` also registers the PLUMAGE DDP comm hook.
Rank 0 writes ``--result`` (JSON: world size, per run the report rows, losses, whether the replicas
are bitwise equal) and ``DIR/<run>.pt`` (final parameters).
"""

from __future__ import annotations

import argparse
import gc
import json
import os

import torch
import torch.distributed as dist

from plumage_ds.integrations.hf import PlumageTrainer
from plumage_ds.testing import hf_training_args, lm_examples, tiny_gpt2, tiny_llama

MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama}


def replicas_equal(model) -> bool:
    if not dist.is_initialized():
        return True
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    parts = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, flat)
    return all(torch.equal(parts[0], q) for q in parts)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--job", action="append", required=True, help="MODEL or MODEL:hook")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2, help="per-device batch")
    parser.add_argument("--estimator", default="plumage", help="optimizer.estimator (the config's default: optimal)")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--update-interval", type=int, default=2)
    parser.add_argument("--out", required=True)
    parser.add_argument("--result", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    result: dict = {"world_size": world, "runs": {}}
    for spec in args.job:
        name, _, hook = spec.partition(":")
        model = MODELS[name]()
        targs = hf_training_args(os.path.join(args.out, spec.replace(":", "_")), steps=args.steps, batch=args.batch)
        hook_kw = {"estimator": args.estimator, "rank": 2, "update_interval": 2, "start_iter": 1} if hook == "hook" else None
        trainer = PlumageTrainer(
            model=model, args=targs, train_dataset=lm_examples(args.steps * args.batch * world),
            plumage={"estimator": args.estimator, "rank": args.rank, "update_interval": args.update_interval, "seed": 1},
            comm_hook=hook_kw,
        )
        trainer.train()
        state = getattr(trainer, "comm_hook_state", None)
        result["runs"][spec] = {
            "report": [{"name": r["name"], "mode": r["mode"]} for r in trainer.plumage_report()],
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "replicas_equal": replicas_equal(model),
            "ddp": type(trainer.model_wrapped).__name__,
            "hook_compressed": None if state is None else sorted(n for n, (m, _) in state.param_modes().items() if m == "lowrank"),
            "hook_steps": None if state is None else state.iter,
        }
        if int(os.environ.get("RANK", "0")) == 0:
            torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, os.path.join(args.out, f"{spec.replace(':', '_')}.pt"))
        del trainer, state, model  # no DDP object may outlive the process group (teardown below)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(args.result, "w", encoding="utf-8") as f:
            json.dump(result, f)
    gc.collect()  # teardown: engine objects gone, then barrier and destroy (a live DDP aborts at exit)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
