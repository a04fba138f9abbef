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


def _entry(rank: int, world_size: int, init_file: str, out_dir: str, fn, args, threads: int) -> None:
    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size)}
    )
    torch.set_num_threads(threads)
    result_path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, result_path)
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


def run_workers(fn, world_size: int, *args, threads: int = 1) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return per-rank results."""
    with tempfile.TemporaryDirectory(prefix="plumage_ds_") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        try:
            mp.spawn(_entry, args=(world_size, init_file, tmp, fn, args, threads), nprocs=world_size, join=True)
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
