"""DeepSpeed adapter (``plumage_ds.integrations.deepspeed``): PLUMAGE owns the target matrices.

All W=2 DeepSpeed runs share ONE spawned job (module fixture ``ds_runs``; each run is recorded
separately, so one failing run fails only the tests that read it). Checked, on a tiny LLaMA (fp32,
``τ=2`` so 3 refreshes in 6 steps), against the single-device ``PlumageAdamW`` with the same targets
and hyperparameters (non-targets: AdamW, same arithmetic):

* stages 0, 1, 2, 3: parameters after 6 steps within 1e-5 (stage 1 with DeepSpeed's WarmupLR and
  ``plumage.dense_lr``, the reference fed the same per-step lr, times ``dense_lr / lr`` for the
  non-targets; stage 3 with every parameter partitioned, persistence
  threshold 0, and with the default threshold where the small targets stay gathered); replicas
  bitwise identical; target gradients after backward differ per rank (so
  DeepSpeed did not reduce them — PLUMAGE did, compressed);
* stages 0–3 with gradient_accumulation_steps=2 and an active global-norm clip: within 1e-5
  (reference: one global batch, ``max_grad_norm``), which pins the clipping definition;
* per-rank PLUMAGE state bytes == ``Σ_owned 2·r·l·4 + Σ_all (s·r + r)·4`` (stages 0–3);
* target-gradient bytes of an ordinary step == the reduce-scatter / all-gather formula of
  ``plumage_ds/distributed/data_parallel.py`` (``(W−1)·4·max_o L_o`` each), below DDP's all-reduce;
* checkpoints through the engine API (stages 2 and 3: DeepSpeed's own files; stage 0: the adapter's
  per-rank side files): resumed run bitwise equal to the uninterrupted one;
* bf16 (stage 2): finite loss, decreasing, within 0.05 of the fp32 run at every step;
* strict mode raises naming the matrix;
* stage 3's one DeepSpeed internal (``ds_tensor`` layout) is version-guarded.

Plus pure config tests (no spawn); the main job through the real ``deepspeed`` launcher is in
``tests/distributed/test_main_job.py``.
"""

from __future__ import annotations

import gc
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed picks an accelerator (also in spawned workers)
pytest.importorskip("deepspeed")

from plumage_ds.config import OptimizerConfig  # noqa: E402
from plumage_ds.estimators import kept_sigma_columns  # noqa: E402
from plumage_ds.integrations.deepspeed import split_config  # noqa: E402
from plumage_ds.optim import PlumageAdamW, lowrank_param_groups  # noqa: E402
from plumage_ds.testing import free_port, lm_loss, record, run_workers, tiny_llama, token_batch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
W = 2
VOCAB, SEQ, GLOBAL_BATCH = 64, 16, 8
RANK, TAU, STEPS, SAVE_AT = 4, 2, 6, 3
LR, WD, SEED = 3e-3, 0.1, 1
CLIP = 0.05
DENSE_LR = 1e-2  # stage 1: the non-targets' LR (DeepSpeed's WarmupLR writes lr's schedule; the dense step scales it)
TARGETS = [r"self_attn|mlp"]


def batch(step: int, learnable: bool = False) -> torch.Tensor:
    return token_batch(step, GLOBAL_BATCH, seq=SEQ, vocab=VOCAB, salt=11, learnable=learnable)


def ds_config(
    stage: int, *, gas: int = 1, clip: float = 0.0, bf16: bool = False, warmup: bool = False, persistent: bool = False,
    estimator: str = "plumage", dense_lr: float | None = None,
) -> dict:
    cfg = {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // (W * gas),
        "gradient_accumulation_steps": gas,
        "gradient_clipping": clip,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WD}},
        "plumage": {
            "rank": RANK,
            "update_interval": TAU,
            "estimator": estimator,
            "target_modules": TARGETS,
            "seed": SEED,
        },
        "steps_per_print": 10_000,
    }
    if dense_lr is not None:
        cfg["plumage"]["dense_lr"] = dense_lr
    if stage == 3 and not persistent:  # partition every parameter (the default keeps params < 1e5 elements whole)
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    if bf16:
        cfg["bf16"] = {"enabled": True}
    if warmup:
        cfg["scheduler"] = {
            "type": "WarmupLR",
            "params": {"warmup_min_lr": 0.0, "warmup_max_lr": LR, "warmup_num_steps": 4, "warmup_type": "linear"},
        }
    return cfg


# ------------------------------------------------------------------------------------- worker


def _train(engine, model, rank, gas, steps, start=0, learnable=False, probe=None):
    mb = GLOBAL_BATCH // (W * gas)
    losses, lrs, probes = [], [], []
    for step in range(start, start + steps):
        x = batch(step, learnable)
        lrs.append(float(engine.get_lr()[0]))
        total = 0.0
        for j in range(gas):
            k = rank * gas + j
            loss = lm_loss(engine, x[k * mb : (k + 1) * mb])
            engine.backward(loss)
            if probe is not None and j == 0:
                probes.append(_probe(probe))
            engine.step()
            total += float(loss.detach()) / gas
        losses.append(total)
    return losses, lrs, probes


def _probe(comp) -> dict:
    """Right after backward: target 0's gradient on this rank (full, or projected to Pᵀ G_o during
    backward) — local or reduced? — and the bytes every target holds until step()."""
    opt = comp.plumage
    first = opt._entries[0]
    g = first.param.grad if first.param.grad is not None else opt._projected[first.index]
    return {
        "norm": float(g.double().norm()),
        "grad_bytes": sum(e.param.grad.numel() * 4 for e in opt._entries if e.param.grad is not None),
        "projected_bytes": sum(t.numel() * 4 for t in opt._projected.values()),
        "full_bytes": sum(e.shape[0] * e.shape[1] * 4 for e in opt._entries),
        "compressed_bytes": sum(e.r * e.l * 4 for e in opt._entries),
    }


def _state_bytes(comp) -> bytes:
    """The composite's state, serialised (but the skipped-step counter)."""
    sd = comp.state_dict()
    sd["plumage"]["plumage"].pop("skipped_steps")
    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.getvalue()


def _params(model):
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def _free(*objs):
    del objs
    gc.collect()



def _worker(rank, world, port, ckpt_root):
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu"})
    import torch.distributed as dist

    from plumage_ds.integrations import deepspeed as pds

    out: dict = {}

    def plain(stage, gas=1, clip=0.0, bf16=False, warmup=False, ckpt=False, learnable=False, persistent=False,
              estimator="plumage", dense_lr=None):
        def fn():
            model = tiny_llama()
            cfg = ds_config(stage, gas=gas, clip=clip, bf16=bf16, warmup=warmup, persistent=persistent, estimator=estimator,
                            dense_lr=dense_lr)
            engine, _, _, _ = pds.initialize(model=model, config=cfg)
            comp = pds.plumage_optimizer(engine)
            res = {}
            probe = comp
            if ckpt:
                losses, lrs, probes = _train(engine, model, rank, gas, SAVE_AT, probe=probe)
                pds.save_checkpoint(engine, ckpt_root, tag=f"s{stage}")
                more, lrs2, probes2 = _train(engine, model, rank, gas, STEPS - SAVE_AT, start=SAVE_AT, probe=probe)
                losses, lrs, probes = losses + more, lrs + lrs2, probes + probes2
            else:
                losses, lrs, probes = _train(engine, model, rank, gas, STEPS, learnable=learnable, probe=probe)
            res["probe"] = probes
            res.update(
                losses=losses,
                lrs=lrs,
                params=_params(model),
                state_bytes=comp.state_bytes(),
                sigma_counts=sorted({st["sigma_count"] for st in comp.plumage.state.values() if "sigma_count" in st}),
                comm=comp.comm_stats(),
                report=comp.plumage.matrix_report(),
                target_grads_none=all(p.grad is None for p in comp._targets),
            )
            if stage == 3:  # private-API guard, real partitioning, full weights for comparison
                import deepspeed

                for g in comp.plumage.param_groups:
                    for p, n in zip(g["params"], g["names"]):
                        pds.check_zero3_param(p, n)
                res["version"] = deepspeed.__version__
                res["placeholders"] = all(p.data.numel() == 0 for p in comp._targets)
                res["gathered"] = all(p.data.numel() == p.ds_numel for p in comp._targets)
                from deepspeed import zero

                with zero.GatheredParameters(list(model.parameters())):
                    res["params"] = _params(model)
            flat = torch.cat([res["params"][n].reshape(-1) for n, _ in model.named_parameters()])
            gathered = [torch.empty_like(flat) for _ in range(world)]
            dist.all_gather(gathered, flat)
            res["replicas_equal"] = all(torch.equal(gathered[0], g) for g in gathered)
            _free(engine, comp)
            return res

        return fn

    def resume(stage):
        def fn():
            model = tiny_llama(seed=123)  # different init: everything must come from the checkpoint
            engine, _, _, _ = pds.initialize(model=model, config=ds_config(stage))
            pds.load_checkpoint(engine, ckpt_root, tag=f"s{stage}")
            losses, _, _ = _train(engine, model, rank, 1, STEPS - SAVE_AT, start=SAVE_AT)
            if stage == 3:
                from deepspeed import zero

                with zero.GatheredParameters(list(model.parameters())):
                    res = {"params": _params(model), "losses": losses}
            else:
                res = {"params": _params(model), "losses": losses}
            _free(engine)
            return res

        return fn

    def strict():
        model = tiny_llama()
        cfg = ds_config(2)
        cfg["plumage"].update(rank=16, strict=True)  # k/v_proj are (16, 32): rank 16 >= short side 16
        try:
            pds.initialize(model=model, config=cfg)
        except ValueError as exc:
            return {"raised": str(exc)}
        return {"raised": None}

    def nonfinite(policy, where):
        """ZeRO-2: a NaN on rank 1 only (in a target's gradient, or in every gradient via the loss)
        at step 2; the whole step must be skipped (or raise) on both ranks, nothing changed."""

        def fn():
            model = tiny_llama()
            cfg = ds_config(2)
            cfg["plumage"]["nonfinite"] = policy
            engine, _, _, _ = pds.initialize(model=model, config=cfg)
            comp = pds.plumage_optimizer(engine)
            mb = GLOBAL_BATCH // W
            res = {"raised": None}
            for step in range(5):
                x = batch(step)[rank * mb : (rank + 1) * mb]
                loss = lm_loss(engine, x)
                bad = step == 2 and rank == 1
                engine.backward(loss * float("nan") if bad and where == "all" else loss)
                if bad and where == "target":
                    comp._targets[3].grad[0, 0] = float("inf")
                if step == 2:
                    before = (_params(model), _state_bytes(comp))
                try:
                    engine.step()
                except FloatingPointError as exc:
                    res["raised"] = str(exc)
                    res["unchanged_params"] = max_diff(_params(model), before[0]) == 0.0
                    break
                if step == 2:
                    res["unchanged_params"] = max_diff(_params(model), before[0]) == 0.0
                    res["unchanged_state"] = _state_bytes(comp) == before[1]
            res.update(skipped=comp.skipped_steps, engine_skipped=engine.skipped_steps,
                       finite=all(bool(torch.isfinite(p).all()) for p in model.parameters()))
            _free(engine, comp)
            return res

        return fn

    for stage in (0, 1, 2, 3):
        record(out, f"stage{stage}", plain(stage, warmup=(stage == 1), ckpt=(stage in (0, 2, 3)),
                                           dense_lr=DENSE_LR if stage == 1 else None))
    for policy in ("skip", "raise"):
        for where in ("target", "all"):
            record(out, f"nonfinite_{policy}_{where}", nonfinite(policy, where))
    record(out, "resume0", resume(0))
    record(out, "resume2", resume(2))
    record(out, "resume3", resume(3))
    for stage in (0, 1, 2, 3):
        record(out, f"gas_clip{stage}", plain(stage, gas=2, clip=CLIP))
    record(out, "stage3_persistent", plain(3, persistent=True))
    record(out, "stage3_optimal", plain(3, estimator="optimal"))
    record(out, "fp32_learn", plain(2, learnable=True))
    record(out, "bf16", plain(2, bf16=True, learnable=True))
    record(out, "strict", strict)
    return out



@pytest.fixture(scope="module")
def ds_runs():
    tmp = tempfile.mkdtemp(prefix="plumage_ds_ckpt_")
    try:
        return run_workers(_worker, W, free_port(), tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _get(ds_runs, name):
    for r in ds_runs:
        if not r[name]["ok"]:
            pytest.fail(f"DeepSpeed run {name!r} failed:\n{r[name]['error']}")
    return ds_runs[0][name], ds_runs


# ------------------------------------------------------------------------------------- reference


def reference(steps=STEPS, clip=0.0, lrs=None, estimator="plumage", dense_lr=None):
    model = tiny_llama()
    groups, _ = lowrank_param_groups(model, target_modules=TARGETS, rank=RANK)
    opt = PlumageAdamW(
        groups, lr=LR, weight_decay=WD, update_interval=TAU, estimator=estimator, seed=SEED, max_grad_norm=clip
    )
    losses = []
    for step in range(steps):
        if lrs is not None:
            for g in opt.param_groups:
                g["lr"] = lrs[step] * (dense_lr / LR if dense_lr is not None and not g["lowrank"] else 1.0)
        opt.zero_grad(set_to_none=True)
        loss = lm_loss(model, batch(step))
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    if clip:
        assert opt.last_grad_norm > clip, "the clip must be active for the test to mean anything"
    return _params(model), losses


def mean_losses(ds_runs, name):
    """Per-step loss averaged over ranks (each rank records the loss of its own slice)."""
    per_rank = [r[name]["losses"] for r in ds_runs]
    return [sum(v) / len(v) for v in zip(*per_rank)]


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# ------------------------------------------------------------------------------------- tests


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_matches_single_device(ds_runs, stage):
    run, _ = _get(ds_runs, f"stage{stage}")
    lrs = run["lrs"] if stage == 1 else None
    if stage == 1:
        assert lrs[0] == 0.0 and lrs[-1] == pytest.approx(LR), lrs  # WarmupLR really drove the lr
    ref, ref_losses = reference(lrs=lrs, dense_lr=DENSE_LR if stage == 1 else None)
    assert run["replicas_equal"]
    assert run["target_grads_none"]
    # DeepSpeed did not reduce the target gradients (they differ per rank after backward): PLUMAGE did
    p0, p1 = ds_runs[0][f"stage{stage}"]["probe"], ds_runs[1][f"stage{stage}"]["probe"]
    assert len(p0) == STEPS and all(a["norm"] != b["norm"] for a, b in zip(p0, p1)), (p0, p1)
    # ZeRO-3 projects target gradients during backward: r·l per matrix (not m·n) until step(), but
    # before a refresh, which needs the whole gradient; the other stages keep the full gradient
    for step, pr in enumerate(p0):
        if stage == 3 and step % TAU:
            assert (pr["grad_bytes"], pr["projected_bytes"]) == (0, pr["compressed_bytes"]), (step, pr)
        else:
            assert (pr["grad_bytes"], pr["projected_bytes"]) == (pr["full_bytes"], 0), (step, pr)
    assert p0[0]["compressed_bytes"] < p0[0]["full_bytes"] / 2
    assert max_diff(run["params"], ref) <= 1e-5
    assert mean_losses(ds_runs, f"stage{stage}") == pytest.approx(ref_losses, abs=1e-5)
    modes = {row["mode"] for row in run["report"]}
    assert modes == {"plumage"}


@pytest.mark.distributed
def test_optimal_matches_single_device_under_zero3(ds_runs):
    """``estimator="optimal"`` in the composite (ZeRO-3, gradients projected during backward): the
    owners keep ``Σ`` (one Gram per refresh) and the run follows single-device ``PlumageAdamW``."""
    run, runs = _get(ds_runs, "stage3_optimal")
    ref, ref_losses = reference(estimator="optimal")
    assert run["replicas_equal"] and {row["mode"] for row in run["report"]} == {"optimal"}
    assert all(r["stage3_optimal"]["sigma_counts"] == [len(range(0, STEPS, TAU))] for r in runs)
    for k, r in enumerate(runs):  # Σ (float64; by default compact, (s, RANK + 1)) of the targets this rank owns
        owned = [row for row in run["report"] if row["owner"] == k]
        assert owned and r["stage3_optimal"]["state_bytes"]["second_moment"] == sum(
            8 * s * kept_sigma_columns(s, RANK) for s in (_oriented(row["shape"])[0] for row in owned))
    assert max_diff(run["params"], ref) <= 1e-5
    assert mean_losses(ds_runs, "stage3_optimal") == pytest.approx(ref_losses, abs=1e-5)


@pytest.mark.distributed
@pytest.mark.parametrize("where", ["target", "all"])
@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_nonfinite_on_one_rank_skips_or_raises_the_whole_step(ds_runs, policy, where):
    for res in ds_runs:
        run = res[f"nonfinite_{policy}_{where}"]
        assert run["ok"], run.get("error")
        assert run["unchanged_params"] and run["finite"]
        if where == "all":
            # NaN in DeepSpeed's own partitions: ZeRO's overflow check (fp32) skips the step before it
            # calls the composite; the targets' gradients of that step are dropped with DeepSpeed's
            assert run["raised"] is None and run["engine_skipped"] == 1 and run["skipped"] == 0
            assert run["unchanged_state"]
        elif policy == "skip":
            assert run["raised"] is None and run["skipped"] == 1 and run["unchanged_state"]
        else:
            assert run["raised"].startswith("Non-finite gradient in ['model.layers.0.self_attn.o_proj.weight']")


@pytest.mark.distributed
def test_stage3_persistent_targets(ds_runs):
    """Default persistence threshold: the small targets stay gathered between steps; updating
    ``ds_tensor`` is still right because DeepSpeed re-gathers persistent params after each step."""
    run, _ = _get(ds_runs, "stage3_persistent")
    assert run["gathered"]
    ref, _ = reference()
    assert max_diff(run["params"], ref) <= 1e-5


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_grad_accumulation_and_global_clip(ds_runs, stage):
    run, _ = _get(ds_runs, f"gas_clip{stage}")
    ref, ref_losses = reference(clip=CLIP)
    assert max_diff(run["params"], ref) <= 1e-5
    assert mean_losses(ds_runs, f"gas_clip{stage}") == pytest.approx(ref_losses, abs=1e-5)


def _oriented(shape):
    m, n = shape
    return (m, n) if m <= n else (n, m)


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_state_bytes_sharded(ds_runs, stage):
    _get(ds_runs, f"stage{stage}")
    report = ds_runs[0][f"stage{stage}"]["report"]
    proj = sum((_oriented(r["shape"])[0] * RANK + RANK) * 4 for r in report)
    total_moments = 0
    for k in range(W):
        sb = ds_runs[k][f"stage{stage}"]["state_bytes"]
        assert sb["total"] == sb["plumage_total"] + sb["deepspeed_partition"] and sb["deepspeed_partition"] > 0
        owned = sum(2 * RANK * _oriented(r["shape"])[1] * 4 for r in report if r["owner"] == k)
        assert sb["moments"] == owned
        assert sb["projectors"] == proj
        assert sb["non_target"] == 0
        assert sb["moments"] + sb["projectors"] == owned + proj
        total_moments += sb["moments"]
    assert total_moments == sum(2 * RANK * _oriented(r["shape"])[1] * 4 for r in report)
    assert 0 < ds_runs[0][f"stage{stage}"]["state_bytes"]["moments"] < total_moments  # really sharded


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_target_gradient_bytes_compressed(ds_runs, stage):
    _get(ds_runs, f"stage{stage}")
    report = ds_runs[0][f"stage{stage}"]["report"]
    L = max(sum(RANK * _oriented(r["shape"])[1] for r in report if r["owner"] == o) for o in range(W))
    for k in range(W):
        cur = ds_runs[k][f"stage{stage}"]["comm"]["last_step"]  # step 6: ordinary (refreshes at 0, 2, 4)
        assert not any(key.startswith(("refresh_grad", "projector")) for key in cur)
        assert cur["lowrank_grad/reduce_scatter"]["bytes"] == (W - 1) * 4 * L
        assert cur["lowrank_update/all_gather"]["bytes"] == (W - 1) * 4 * L
        ddp = 2 * (W - 1) / W * sum(r["shape"][0] * r["shape"][1] * 4 for r in report)
        compressed = cur["lowrank_grad/reduce_scatter"]["bytes"] + cur["lowrank_update/all_gather"]["bytes"]
        assert compressed < ddp / 4
        if stage == 0:  # non-targets: one accounted all-reduce of the averaged gradient
            assert cur["dense_grad/all_reduce"]["calls"] == 1
        else:  # ZeRO reduces the non-targets itself
            assert "dense_grad/all_reduce" not in cur


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_checkpoint_roundtrip_bitwise(ds_runs, stage):
    full, _ = _get(ds_runs, f"stage{stage}")
    _get(ds_runs, f"resume{stage}")
    for k in range(W):
        a, b = ds_runs[k][f"stage{stage}"], ds_runs[k][f"resume{stage}"]
        assert max_diff(a["params"], b["params"]) == 0.0
        assert a["losses"][SAVE_AT:] == b["losses"]


@pytest.mark.distributed
def test_bf16_tracks_fp32(ds_runs):
    run, _ = _get(ds_runs, "bf16")
    _get(ds_runs, "fp32_learn")
    losses, ref = mean_losses(ds_runs, "bf16"), mean_losses(ds_runs, "fp32_learn")
    print("bf16", losses, "fp32", ref)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.05 and ref[-1] < ref[0] - 0.05
    assert max(abs(a - b) for a, b in zip(losses, ref)) < 0.05


@pytest.mark.distributed
def test_strict_names_matrix(ds_runs):
    run, _ = _get(ds_runs, "strict")
    assert run["raised"] is not None
    assert "self_attn.k_proj.weight" in run["raised"] and "strict=True" in run["raised"]


@pytest.mark.distributed
def test_private_api_guard(ds_runs):
    """Stage 3 relies on ``param.ds_tensor`` (this rank's flat ``ceil(numel/W)`` chunk), ``ds_shape``,
    ``ds_numel``: checked on every target of a live ZeRO-3 engine; a failure names what changed."""
    from plumage_ds.integrations.deepspeed import VERIFIED_DEEPSPEED

    run, _ = _get(ds_runs, "stage3")
    if run["version"] != VERIFIED_DEEPSPEED:
        print(f"note: DeepSpeed {run['version']} (adapter verified with {VERIFIED_DEEPSPEED}); layout checks passed")
    assert run["placeholders"]  # the targets really were partitioned (persistence threshold 0)



# ------------------------------------------------------------------------------------- config (no spawn)


def test_config_split_and_validation():
    ds, cfg, stage = split_config(ds_config(2, clip=0.5))
    assert "plumage" not in ds and "optimizer" not in ds
    assert ds["gradient_clipping"] == 0.0 and ds["zero_allow_untested_optimizer"] is True
    assert cfg.max_grad_norm == 0.5 and stage == 2 and cfg.lr == LR and cfg.betas == (0.9, 0.999)
    assert isinstance(cfg, OptimizerConfig) and cfg.rank == RANK and cfg.weight_decay == WD
    bad = ds_config(2)
    bad["plumage"]["rnak"] = 3
    with pytest.raises(ValueError, match="rnak"):
        split_config(bad)
    bad = ds_config(2)
    bad["optimizer"]["type"] = "SGD"
    with pytest.raises(ValueError, match="SGD"):
        split_config(bad)
    bad = ds_config(2)
    bad["fp16"] = {"enabled": True}
    with pytest.raises(NotImplementedError, match="fp16"):
        split_config(bad)
    # dense_lr scales DeepSpeed's schedule of lr: lr = 0 leaves nothing to scale
    from plumage_ds.integrations.deepspeed import PlumageDeepSpeedOptimizer

    with pytest.raises(ValueError, match=r"^Invalid dense_lr=0.01: needs lr > 0 under DeepSpeed \(lr=0.0 is the schedule's base\)"):
        PlumageDeepSpeedOptimizer([{"params": [torch.zeros(2)], "lowrank": False}], config=OptimizerConfig(lr=0.0, dense_lr=0.01), stage=1)


@pytest.mark.parametrize("name", ["zero0", "zero1", "zero2", "zero3", "zero2_bf16", "integration_zero2"])
def test_shipped_configs_load(name):
    import re

    path = REPO_ROOT / "configs" / "deepspeed" / f"{name}.json"
    ds, cfg, stage = split_config(str(path))
    assert stage == int(re.search(r"zero(\d)", name).group(1))
    if name == "integration_zero2":  # the integration API's example: every optimizer key in one schema
        assert (cfg.rank, cfg.lr, cfg.max_grad_norm) == (8, 0.003, 1.0)
    else:  # the main job's engine configs carry no optimizer keys (the job config does)
        assert not {"plumage", "optimizer", "scheduler", "train_batch_size"} & set(json.loads(path.read_text()))
    json.dumps(ds)
