#!/usr/bin/env python
"""One-device GPU check: correctness of the CUDA/bf16 path against the CPU oracle, then timings and memory.

    benchmarks/gpu_check.sh                      # on a CUDA machine: < 8 min, prints a table for docs/benchmarks.md
    python benchmarks/gpu_check.py --device cpu --tiny   # dry run of every part on CPU with tiny shapes (seconds)

Parts (each prints its rows; the script exits 1 if a correctness check fails, 2 on bad input or
when ``--device cuda`` finds no CUDA device):

1. **Correctness**, for every estimator of the Adam family, against
   :class:`~plumage_ds.optim.reference.ReferencePlumageAdam` on CPU in fp32: a tiny MLP (both
   orientations, biases) trained ``--check-steps`` steps on the device with
   :class:`~plumage_ds.PlumageAdamW` in fp32 (within ``1e-4``: decompositions and reductions differ
   on the device); the batched path against the per-matrix path on the device (within ``1e-6``);
   bf16 weights (fp32 state) fed the same replayed gradients as the oracle (within
   ``steps·2⁻⁸·max|W|``: half a bf16 ulp of rounding per step). The DDP comm hook on one NCCL
   rank: its asynchronous path (Future-chained, NCCL's default) bitwise equal to the synchronous one.
2. **Speed and memory at 1B-layer shapes.** ``--layers`` decoder layers of a LLaMA-1B (hidden 2048,
   intermediate 5632, 32 heads, 4 KV heads: q/o ``2048²``, k/v ``256 × 2048``, gate/up ``5632 × 2048``,
   down ``2048 × 5632``), bf16 weights and gradients (random, set by hand: no model), rank 512:
   ``torch.optim.AdamW(fused=True)``, galore-torch ``GaLoreAdamW`` and ``PlumageAdamW``. Per optimizer: the
   median ordinary ``step()`` and the extra time of a refresh step (CUDA-synchronised wall time), and
   the peak ``torch.cuda.max_memory_allocated`` over its steps (weights, gradients and state).
3. **Stacking on this device.** ``Pᵀ G``, ``P N`` and the Gram ``eigh`` of 16 same-shape matrices, stacked
   and one call per matrix (``benchmarks/bench_hot_path.py``'s sweep): what ``STACK_ELEMENTS`` should be
   for the device (``plumage_ds/kernels/batched.py``; CPU measured, GPU not yet).
4. **A whole training step** (forward, backward, step) of a LLaMA-1B-shaped model (22 layers, vocab
   32000, bf16, batch 4 × 512): the peak ``torch.cuda.max_memory_allocated`` of AdamW (fused),
   8-bit AdamW (bitsandbytes, when installed), galore-torch and ``PlumageAdamW`` (bf16 state and
   compute) with and without ``backward_projection`` (target gradients kept as ``Pᵀ G``).
5. **The main job** at ~85M parameters (LLaMA 12 × 768, bf16, seq 512 × batch 32): tokens/s of AdamW,
   GaLore and PLUMAGE through ``plumage_ds.train.loop.train`` (same config, same corpus).

Part 2 also reports each optimizer's state and its peak above the weights and gradients, and runs
``PlumageAdamW`` with the bf16 precision policy (``compute_dtype``/``state_dtype``) beside the fp32 one,
and ``estimator="optimal"`` (the main job's default; ``Σ`` compact, float64) under that policy. Part 1's
step-path checks (precision policy, staged, compiled, host synchronisations) run for ``plumage`` and
``optimal``.
Parts 4 and 5 take ``--skip-whole-step`` / ``--skip-main-job``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_hot_path

import torch  # noqa: E402
from torch import nn  # noqa: E402

LAYER_1B = dict(hidden=2048, intermediate=5632, kv=256)
LAYER_TINY = dict(hidden=64, intermediate=176, kv=16)
ESTIMATORS = ("plumage", "galore", "haar", "optimal")
DEEP_CHECKS = ("plumage", "optimal")  # the paper's estimator and the main job's default: every step path
METHODS = ("adamw", "galore_torch", "plumage", "plumage_bf16", "plumage_bf16_compiled", "optimal_bf16")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- part 1: correctness


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 40), nn.Tanh(), nn.Linear(40, 16), nn.Tanh(), nn.Linear(16, 24))


def _train(model: nn.Module, opt, steps: int, device: torch.device, per_matrix: bool = False) -> None:
    from plumage_ds.kernels import batched

    for step in range(steps):
        g = torch.Generator().manual_seed(1000 + step)
        x, y = torch.randn(64, 24, generator=g), torch.randn(64, 24, generator=g)
        x, y = x.to(device, next(model.parameters()).dtype), y.to(device, next(model.parameters()).dtype)
        opt.zero_grad()
        ((model(x).float() - y.float()) ** 2).mean().backward()
        if per_matrix:
            with batched.per_matrix():
                opt.step()
        else:
            opt.step()


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p.detach().float().cpu() - q.detach().float().cpu()).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def _replay(params: list[torch.Tensor], opt, steps: int) -> None:
    """Steps with gradients drawn from a fixed seed (independent of the weights), rounded to the weights' dtype."""
    for step in range(steps):
        g = torch.Generator().manual_seed(2000 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype).to(p.device)
        opt.step()


def correctness(device: torch.device, steps: int) -> list[tuple[str, float, float, bool]]:
    """``(check, measured, bound, ok)`` rows."""
    from plumage_ds import PlumageAdamW
    from plumage_ds.optim.reference import ReferencePlumageAdam

    rows = []
    kw = dict(lr=1e-2, rank=4, update_interval=3, seed=7, weight_decay=0.05)
    for estimator in ESTIMATORS:
        oracle = _mlp()
        _train(oracle, ReferencePlumageAdam(oracle.parameters(), estimator=estimator, **kw), steps, torch.device("cpu"))
        fp32 = _mlp().to(device)
        _train(fp32, PlumageAdamW(fp32.parameters(), estimator=estimator, **kw), steps, device)
        d = _max_diff(fp32, oracle)
        rows.append((f"{estimator}: training on {device.type} (fp32) vs CPU oracle", d, 1e-4, d <= 1e-4))
        single = _mlp().to(device)
        _train(single, PlumageAdamW(single.parameters(), estimator=estimator, **kw), steps, device, per_matrix=True)
        d = _max_diff(fp32, single)
        rows.append((f"{estimator}: batched vs per-matrix path on {device.type}", d, 1e-6, d <= 1e-6))
        # bf16 weights, fp32 state: the same gradients replayed to both; the weights may differ by the
        # rounding of each step (at most half a bf16 ulp, 2⁻⁸ relative, per step)
        ref = [p.detach().clone().requires_grad_() for p in _mlp().to(torch.bfloat16).float().parameters()]
        _replay(ref, ReferencePlumageAdam(ref, estimator=estimator, **kw), steps)
        bf16 = [p.detach().clone().requires_grad_() for p in _mlp().to(device, torch.bfloat16).parameters()]
        _replay(bf16, PlumageAdamW(bf16, estimator=estimator, **kw), steps)
        bound = steps * 2**-8 * max(p.abs().max().item() for p in ref)
        d = max((a.detach().float().cpu() - b.detach()).abs().max().item() for a, b in zip(bf16, ref))
        rows.append((f"{estimator}: bf16 weights on {device.type} vs CPU fp32 oracle (same gradients)", d, bound, d <= bound))
        if estimator not in DEEP_CHECKS:
            continue
        policy = [p.detach().clone().requires_grad_() for p in _mlp().to(device, torch.bfloat16).parameters()]
        _replay(policy, PlumageAdamW(policy, estimator=estimator, compute_dtype="bfloat16", state_dtype="bfloat16", **kw), steps)
        d = max((a.detach().float().cpu() - b.detach()).abs().max().item() for a, b in zip(policy, ref))
        rows.append((f"{estimator}: bf16 weights, bf16 compute and state on {device.type} vs CPU fp32 oracle (same gradients)",
                     d, bound, d <= bound))  # fmt: skip
        staged = _mlp().to(device)
        _train(staged, PlumageAdamW(staged.parameters(), estimator=estimator, step_impl="staged", **kw), steps, device)
        d = _max_diff(fp32, staged)
        rows.append((f"{estimator}: streaming vs staged step on {device.type}", d, 1e-6, d <= 1e-6))
        compiled = _mlp().to(device)
        _train(compiled, PlumageAdamW(compiled.parameters(), estimator=estimator, step_impl="compiled", **kw), steps, device)
        d = _max_diff(fp32, compiled)
        rows.append((f"{estimator}: compiled vs streaming step on {device.type}", d, 1e-6, d <= 1e-6))
        for impl in ("streaming", "compiled"):
            n = _host_syncs(device, {**kw, "estimator": estimator, "step_impl": impl})
            rows.append((f"{estimator}: host synchronisations in an ordinary {impl} step on {device.type}", n, 0, n == 0))
    return rows


def _host_syncs(device: torch.device, kw: dict) -> int:
    """Host synchronisations during one ordinary (streamed) step: counted by CUDA's sync debug mode;
    on other devices every read of a tensor's value on the host (``item``, ``tolist``, ``bool``, ...)."""
    from plumage_ds import PlumageAdamW

    params = [p.detach().clone().requires_grad_() for p in _mlp().to(device).parameters()]
    opt = PlumageAdamW(params, **kw)
    _replay(params, opt, 2)  # the refresh (it may synchronise) and a first ordinary step (it may compile)
    assert opt.skipped_steps == 0  # settles that step's flag here, not in the step measured
    for p in params:
        p.grad = torch.randn_like(p)
    _sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
            return sum("synchroniz" in str(w.message) for w in caught)
    reads = []
    originals = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__bool__", "__float__", "__int__")}
    for name, original in originals.items():
        setattr(torch.Tensor, name, lambda self, *a, _n=name, _o=original, **k: reads.append(_n) or _o(self, *a, **k))
    try:
        opt.step()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return len(reads)


def comm_hook_check(device: torch.device, steps: int) -> list[tuple[str, float, float, bool]]:
    """DDP + :func:`~plumage_ds.distributed.comm_hook.plumage_hook` on one rank of an NCCL group (gloo on
    CPU): the asynchronous path (Futures of ``async_op`` all-reduces, lift chained by ``.then``) against
    the synchronous one, bitwise, fp32 and int8 coefficients, over ``steps`` steps with refreshes.

    One rank shows neither overlap nor bytes; it checks the CUDA Future and stream plumbing of the
    NCCL path (the multi-rank async path is tested on gloo by the test suite)."""
    import torch.distributed as dist

    from plumage_ds.distributed.comm_hook import PlumageHookState, plumage_hook

    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    rows = []
    try:
        for name, knobs in (("plumage", {}), ("plumage, int8", {"quantize": "int8"})):
            final = {}
            for async_comm in (False, True):
                model = _mlp().to(device)
                ddp = nn.parallel.DistributedDataParallel(
                    model, device_ids=[device] if device.type == "cuda" else None, bucket_cap_mb=0.002)
                state = PlumageHookState(ddp, rank=4, update_interval=3, start_iter=1, uniform_mix=0.1,
                                         target_modules=[r"^\d+$"], async_comm=async_comm, **knobs)  # fmt: skip
                ddp.register_comm_hook(state, plumage_hook)
                opt = torch.optim.SGD(model.parameters(), lr=0.1)
                gen = torch.Generator().manual_seed(0)
                for _ in range(steps):
                    opt.zero_grad()
                    ddp(torch.randn(8, 24, generator=gen).to(device)).pow(2).mean().backward()
                    opt.step()
                final[async_comm] = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cpu()
            diff = float((final[True] - final[False]).abs().max())
            rows.append((f"comm hook ({name}): async vs sync path on {backend}, 1 rank", diff, 0.0,
                         torch.equal(final[True], final[False])))  # fmt: skip
    finally:
        dist.destroy_process_group()
    return rows


# ----------------------------------------------------------------------------- part 2: speed and memory


def layer_shapes(layers: int, shapes: dict) -> list[tuple[int, int]]:
    h, i, kv = shapes["hidden"], shapes["intermediate"], shapes["kv"]
    one = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]  # q, k, v, o, gate, up, down
    return one * layers


def _optimizer(name: str, params: list[torch.Tensor], rank: int, tau: int):
    from plumage_ds import PlumageAdamW

    if name == "adamw":
        fused = params[0].device.type == "cuda"
        return torch.optim.AdamW(params, lr=1e-3, fused=fused, foreach=None if fused else True)
    if name == "plumage":
        return PlumageAdamW(params, lr=1e-3, rank=rank, update_interval=tau)
    if name in ("plumage_bf16", "plumage_bf16_compiled", "optimal_bf16"):
        impl = "compiled" if name.endswith("compiled") else "auto"
        return PlumageAdamW(params, lr=1e-3, rank=rank, update_interval=tau, compute_dtype="bfloat16", state_dtype="bfloat16",
                            step_impl=impl, estimator=name.split("_")[0])  # optimal: Σ compact, (s, rank+1) float64
    import galore_torch

    low = [p for p in params if min(p.shape) > rank]
    rest = [p for p in params if min(p.shape) <= rank]
    groups = [{"params": low, "rank": rank, "update_proj_gap": tau, "scale": 1.0, "proj_type": "std"}]
    if rest:
        groups.append({"params": rest})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return galore_torch.GaLoreAdamW(groups, lr=1e-3, no_deprecation_warning=True)


def _state_bytes(opt) -> int:
    """The optimizer's state tensors, measured (galore-torch keeps its projectors in the state's ``projector``)."""
    if callable(getattr(opt, "state_bytes", None)):
        return int(opt.state_bytes()["total"])
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
            elif hasattr(v, "ortho_matrix") and torch.is_tensor(v.ortho_matrix):
                total += v.ortho_matrix.numel() * v.ortho_matrix.element_size()
    return total


def speed(device: torch.device, shapes: list[tuple[int, int]], rank: int, dtype: torch.dtype, steps: int, tau: int,
          methods: list[str]) -> list[dict]:
    rows = []
    for name in methods:
        g = torch.Generator().manual_seed(0)
        params = [nn.Parameter((torch.randn(s, generator=g) * 0.02).to(device, dtype)) for s in shapes]
        grads = [(torch.randn(s, generator=g) * 1e-3).to(device, dtype) for s in shapes]
        for p, G in zip(params, grads):
            p.grad = G.clone()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None  # weights + gradients (+ G)
        opt = _optimizer(name, params, rank, tau)
        times = []
        for step in range(steps):
            for p, G in zip(params, grads):
                p.grad = G.clone()
            _sync(device)
            t0 = time.perf_counter()
            opt.step()
            _sync(device)
            times.append(time.perf_counter() - t0)
        refresh = [times[s] for s in range(1, steps) if s % tau == 0] if name != "adamw" else []
        ordinary = [times[s] for s in range(1, steps) if name == "adamw" or s % tau != 0]
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        rows.append({
            "method": name, "step_ms": 1e3 * statistics.median(ordinary),
            "refresh_ms": 1e3 * (statistics.median(refresh) - statistics.median(ordinary)) if refresh else None,
            "peak_bytes": peak, "peak_above": None if peak is None else peak - before, "state_bytes": _state_bytes(opt),
        })
        del opt, params, grads
    return rows


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (dry run)")
    p.add_argument("--tiny", action="store_true", help="tiny layer shapes and few steps (dry run of every part)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers timed (default 4, 1 with --tiny)")
    p.add_argument("--rank", type=int, default=None, help="default 512 (1B shapes), 8 with --tiny")
    p.add_argument("--steps", type=int, default=None, help="timed steps per optimizer (default 12, 3 with --tiny)")
    p.add_argument("--tau", type=int, default=None, help="refresh interval inside the timed run (default 5, 2 with --tiny)")
    p.add_argument("--check-steps", type=int, default=None, help="correctness steps (default 10, 4 with --tiny)")
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--skip-whole-step", action="store_true", help="skip part 4 (whole training step, 1B shapes)")
    p.add_argument("--skip-main-job", action="store_true", help="skip part 5 (the main job at ~85M)")
    args = p.parse_args(argv)
    if args.device not in ("cuda", "cpu"):
        print(f"Invalid --device={args.device!r}: must be 'cuda' or 'cpu'", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available (torch.cuda.is_available() is False, torch "
              f"{torch.__version__}); run it on a machine with a CUDA device, or use --device cpu --tiny for a "
              "dry run", file=sys.stderr)
        return 2
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        print(f"Invalid --methods {unknown}: choose from {', '.join(METHODS)}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    shapes_cfg = LAYER_TINY if args.tiny else LAYER_1B
    rank = args.rank or (8 if args.tiny else 512)
    steps = args.steps or (3 if args.tiny else 12)
    tau = args.tau or (2 if args.tiny else 5)
    layers = args.layers or (1 if args.tiny else 4)
    check_steps = args.check_steps or (4 if args.tiny else 10)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"gpu_check on {name}, torch {torch.__version__}{' (tiny dry run)' if args.tiny else ''}\n")

    t0 = time.perf_counter()
    rows = correctness(device, check_steps) + comm_hook_check(device, check_steps + 2)
    print("| check | measured max abs diff | bound | ok |")
    print("|---|---|---|---|")
    for check, value, bound, ok in rows:
        print(f"| {check} | {value:.2e} | {bound:.1e} | {'yes' if ok else 'NO'} |")
    print(f"\n(correctness: {time.perf_counter() - t0:.0f} s)\n")

    shapes = layer_shapes(layers, shapes_cfg)
    n = sum(a * b for a, b in shapes)
    t0 = time.perf_counter()
    methods = [m for m in args.methods if m != "galore_torch" or _have("galore_torch")]
    timing = speed(device, shapes, rank, torch.bfloat16, steps, tau, methods)
    print(f"{layers} layer(s) of shapes {shapes[:7]} ({n / 1e6:.1f}M parameters), bf16 weights, rank {rank}, "
          f"{steps} steps, refresh every {tau}:\n")
    base = next((r for r in timing if r["method"] == "adamw"), None)
    print("| optimizer | step (ms) | vs AdamW | refresh extra (ms) | state | peak above weights + gradients | peak memory allocated |")
    print("|---|---|---|---|---|---|---|")
    for r in timing:
        ratio = f"{r['step_ms'] / base['step_ms']:.2f}" if base else "–"
        refresh = "–" if r["refresh_ms"] is None else f"{r['refresh_ms']:.1f}"
        peak = "– (CPU)" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**30:.2f} GiB"
        above = "– (CPU)" if r["peak_above"] is None else f"{r['peak_above'] / 2**20:.0f} MiB"
        print(f"| {r['method']} | {r['step_ms']:.2f} | {ratio} | {refresh} | {r['state_bytes'] / 2**20:.1f} MiB | {above} | {peak} |")
    print(f"\n(speed: {time.perf_counter() - t0:.0f} s)\n")

    from bench_hot_path import sweep, sweep_table

    t0 = time.perf_counter()
    count = 4 if args.tiny else 16
    print(sweep_table(sweep([8, 16] if args.tiny else [64, 256, 1024, 2048], count, 3 if args.tiny else 5, device), count))
    print(f"\n(stacking: {time.perf_counter() - t0:.0f} s)\n")

    if not args.skip_whole_step:
        from gpu_check_more import whole_step, whole_step_table

        t0 = time.perf_counter()
        print(whole_step_table(whole_step(device, tiny=args.tiny)))
        print(f"\n(whole step: {time.perf_counter() - t0:.0f} s)\n")
    if not args.skip_main_job:
        from gpu_check_more import main_job, main_job_table

        t0 = time.perf_counter()
        print(main_job_table(main_job(device, tiny=args.tiny)))
        print(f"\n(main job: {time.perf_counter() - t0:.0f} s)")
    return 0 if all(ok for *_, ok in rows) else 1


def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    sys.exit(main())
