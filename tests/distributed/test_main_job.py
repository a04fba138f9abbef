"""The one training loop on every engine (``plumage-ds train``), with spawned gloo ranks and the real launchers.

ONE spawned W=2 job (module fixture ``runs``) trains the estimator × engine matrix a few steps
through :func:`plumage_ds.train.loop.train` (ddp, ddp_hook, sharded, deepspeed ZeRO-1), plus the
uninterrupted reference of the resume test. Checked:

* every pairing the engines support completes (finite losses, both ranks' state measured), and
  the pairings they do not support fail before any process group with a message naming both;
* ``adamw`` equals ``torch.optim.AdamW`` (single process, same global batches and LR schedule) on
  every engine, local included, with ``optimizer.dense_lr`` splitting the LR (attention/MLP
  matrices at ``lr``, the rest at ``dense_lr``): max |Δw| ≤ 1e-5 after 3 steps;
* an FSDP2 checkpoint saved on W=2 resumes in one process (W=1) with the same global batch
  (``train.grad_accum`` doubled) and ends where the W=2 run ended;
* the sharded engine under the real ``torchrun`` launcher, killed with SIGKILL after step 3
  (checkpoint at step 2) and resumed with ``--resume``, ends bitwise equal to the uninterrupted run;
* the deepspeed engine under the real ``deepspeed`` launcher trains, checkpoints and saves weights
  ``transformers`` loads;
* the hsdp engine as 2 "nodes" x 2 processes: two ``torchrun --nnodes 2`` invocations sharing one
  rendezvous endpoint (``launch/torchrun_fsdp.sh``); FSDP shards inside each node and the optimizer
  syncs the nodes with compressed projections.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from plumage_ds.cli import load_job_config  # noqa: E402
from plumage_ds.testing import free_port, run_workers  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = REPO_ROOT / "configs" / "tiny.yaml"
W = 2
STEPS = 3
MATRIX = {
    "ddp": ["adamw", "plumage", "galore", "haar", "gum"],
    "ddp_hook": ["plumage", "galore", "haar"],
    "sharded": ["adamw", "plumage", "galore", "haar", "gum"],
    "deepspeed": ["adamw", "plumage", "galore", "haar", "gum"],
    "fsdp2": ["adamw", "plumage", "galore", "haar", "gum"],
    "hsdp": ["adamw", "plumage", "gum"],  # 2 replicas x 1 shard: the optimizer's compressed cross-replica sync
}
REFUSED = {("ddp_hook", "adamw"), ("ddp_hook", "gum")}
EXTRA = {"hsdp": ["train.hsdp_shard_size=1"]}
COMMON = [f"train.steps={STEPS}", "data.batch_size=2", "train.eval_batches=2", "train.log_interval=1",
          "train.eval_interval=3", "optimizer.rank=4", "optimizer.update_interval=2", "optimizer.comm_hook.start_iter=1",
          "train.warmup_steps=1"]  # fmt: skip
ADAMW = ["optimizer.dense_lr=3e-3"]  # every adamw run: two LRs, by the low-rank arms' target selection
RESUME = ["train.steps=6", "train.save_interval=2", "optimizer.estimator=plumage", "train.engine=sharded"]
# ddp_hook resumes carrying the hook's whole state: optimal's Σ (on each matrix's owner), resampled designs
HOOK_RESUME = {
    "optimal": ["optimizer.estimator=optimal", "optimizer.sigma_rank=2"],  # Σ kept compact (s, 3) between refreshes
    "plumage-resample": ["optimizer.estimator=plumage", "optimizer.uniform_mix=0.1", "optimizer.comm_hook.resample_interval=2"],
}
HOOK_COMMON = ["train.engine=ddp_hook", "train.steps=6", "train.save_interval=2", "train.keep_last=3"]
CUT_AT = 2  # the resumed copy keeps the step-2 checkpoint only, as a run killed after step 3 would


def job(engine: str, estimator: str, ds_json: str, extra=()):
    sets = COMMON + [f"train.engine={engine}", f"optimizer.estimator={estimator}", *EXTRA.get(engine, []), *extra]
    if estimator == "adamw":
        sets += ADAMW
    if engine == "deepspeed":
        sets.append(f"train.deepspeed_config={ds_json}")
    return load_job_config(str(TINY), sets)


def _worker(rank, world, out_root, ds_json, resume_sets):
    from plumage_ds.train.loop import train

    results = {}
    for engine, estimators in MATRIX.items():
        for est in estimators:
            out = f"{out_root}/{engine}-{est}"
            try:
                s = train(job(engine, est, ds_json), out, progress=False)
                results[(engine, est)] = {"ok": True, "summary": s}
            except Exception as err:  # noqa: BLE001 - reported per run
                results[(engine, est)] = {"ok": False, "error": repr(err)}
    train(load_job_config(str(TINY), COMMON + resume_sets), f"{out_root}/resume-reference", progress=False)
    import torch.distributed as dist

    for name, sets in HOOK_RESUME.items():
        cfg = load_job_config(str(TINY), COMMON + HOOK_COMMON + sets)
        full, cut = Path(out_root) / f"hook-{name}", Path(out_root) / f"hook-{name}-resumed"
        train(cfg, full, progress=False)
        if rank == 0:
            _cut_after(full, cut, CUT_AT)
        dist.barrier()
        train(cfg, cut, resume=True, progress=False)
    results["fsdp2-saved"] = train(job("fsdp2", "adamw", ds_json, ["train.save_interval=2"]), f"{out_root}/fsdp2-saved",
                                   progress=False)  # fmt: skip
    return results


def _cut_after(src: Path, dst: Path, step: int) -> None:
    """A copy of run ``src`` as a kill after ``step + 1`` leaves it: later checkpoints, the summary and
    the final weights gone."""
    shutil.copytree(src, dst)
    for ckpt in (dst / "checkpoints").iterdir():
        if int(ckpt.name.split("_")[-1]) > step:
            shutil.rmtree(ckpt)
    (dst / "summary.json").unlink()
    shutil.rmtree(dst / "model")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("main_job")
    ds_json = root / "zero1.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 1}, "steps_per_print": 10**6}))
    results = run_workers(_worker, W, str(root), str(ds_json), RESUME)
    return root, results


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model" / "model.safetensors"))


@pytest.mark.distributed
@pytest.mark.parametrize("engine, estimator", [(e, x) for e, xs in MATRIX.items() for x in xs])
def test_matrix_trains_through_the_one_loop(runs, engine, estimator):
    root, results = runs
    rec = results[0][(engine, estimator)]
    assert rec["ok"], rec.get("error")
    s = rec["summary"]
    assert s["status"] == "completed" and s["steps_completed"] == STEPS and s["world_size"] == W
    assert s["engine"] == engine and len(s["optimizer_state_bytes_per_rank"]) == W
    assert all(b > 0 for b in s["optimizer_state_bytes_per_rank"])
    assert 0 < s["final_eval_loss"] < 10
    assert results[1][(engine, estimator)] == {"ok": True, "summary": None}  # other ranks return nothing
    modes = {r["mode"] for r in s["matrices"]}
    if engine == "ddp_hook":
        assert "lowrank" in modes and s["comm_bytes_total"]  # the hook compressed (after 1 warm-up step)
    elif estimator != "adamw":
        assert estimator in modes
    if engine == "sharded" and estimator != "adamw":  # moments sharded by owner: ranks differ
        tag = "gum_grad" if estimator == "gum" else "lowrank_grad"
        assert s["comm_bytes_total"][f"{tag}/reduce_scatter"]["bytes"] > 0
    if engine in ("fsdp2", "hsdp") and estimator != "adamw":
        assert {r["sharding"] for r in s["matrices"]} == {"fsdp_rows"}
        # state sharded like the weights: each rank holds about half
        per_rank = s["optimizer_state_bytes_per_rank"]
        assert max(per_rank) < 0.75 * sum(per_rank)
    if engine == "hsdp" and estimator != "adamw":
        rows = {r["name"]: r for r in s["matrices"]}
        assert rows["model.layers.0.mlp.up_proj.weight"]["mode"] == estimator


@pytest.mark.parametrize("engine, estimator", sorted(REFUSED))
def test_unsupported_pairs_refused_before_any_process_group(engine, estimator, tmp_path):
    import torch.distributed as dist

    from plumage_ds.train.loop import check_job

    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    with pytest.raises(ValueError, match=rf"^Invalid optimizer.estimator='{estimator}': not available on train.engine='{engine}'"):
        check_job(job(engine, estimator, str(ds_json)), world_size=W)
    assert not dist.is_initialized()


def _reference_adamw(cfg) -> dict:
    """Single-process torch.optim.AdamW on the same global batches and LR schedule; ``dense_lr`` for
    everything but the attention/MLP projection matrices (selected by name here, independently)."""
    from plumage_ds.train.data import BatchStream, load_corpus
    from plumage_ds.train.engines.base import lr_multiplier
    from plumage_ds.train.model import build_model, causal_lm_loss

    corpus = load_corpus(cfg.data)
    stream = BatchStream(corpus, cfg.data, seed=cfg.train.seed)
    model = build_model(cfg.model, vocab_size=corpus.vocab_size, seq_len=cfg.data.seq_len, seed=cfg.train.seed)
    named = list(model.named_parameters())
    matrices = [p for n, p in named if n.endswith("_proj.weight")]
    rest = [p for n, p in named if not n.endswith("_proj.weight")]
    assert matrices and rest and cfg.optimizer.dense_lr != cfg.optimizer.lr
    opt = torch.optim.AdamW(
        [{"params": matrices}, {"params": rest, "lr": cfg.optimizer.dense_lr}], **cfg.optimizer.adam_kwargs()
    )
    tc = cfg.train
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_multiplier(s, steps=tc.steps, warmup_steps=tc.warmup_steps, schedule=tc.lr_schedule)
    )
    for s in range(tc.steps):
        causal_lm_loss(model, stream.global_batch(s, cfg.data.batch_size * W)).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


@pytest.mark.distributed
def test_adamw_equals_torch_adamw_on_every_engine(runs, tmp_path):
    from plumage_ds.train.loop import train

    root, results = runs
    ref = _reference_adamw(job("ddp", "adamw", ""))
    # local: one process with the whole global batch (batch_size * W windows per step)
    local = load_job_config(str(TINY), COMMON + ADAMW + ["optimizer.estimator=adamw", f"data.batch_size={2 * W}"])
    train(local, tmp_path / "local", progress=False)
    outs = {"local": tmp_path / "local", **{e: root / f"{e}-adamw" for e in ("ddp", "sharded", "deepspeed", "fsdp2", "hsdp")}}
    for engine, out in outs.items():
        got = _weights(out)
        worst = max(float((got[k].float() - ref[k].float()).abs().max()) for k in got)
        assert worst <= 1e-5, (engine, worst)


@pytest.mark.distributed
@pytest.mark.parametrize("name", sorted(HOOK_RESUME))
def test_ddp_hook_resume_is_bitwise(runs, name):
    """The hook's state (``Σ`` of ``optimal`` on its owners, the kept designs of ``resample_interval``) is
    saved per rank and restored: the resumed run ends bitwise equal to the uninterrupted one."""
    root, _ = runs
    full, cut = root / f"hook-{name}", root / f"hook-{name}-resumed"
    assert json.loads((cut / "summary.json").read_text())["resumed_from_step"] == CUT_AT
    hook_files = sorted(p.name for p in (full / "checkpoints" / f"step_{CUT_AT:08d}" / "engine").iterdir() if "hook" in p.name)
    assert hook_files == [f"comm_hook_rank{k}_of_{W}.pt" for k in range(W)]
    if name == "optimal":  # each owner's Σ, kept compact: (s, sigma_rank + 1)
        saved = [torch.load(full / "checkpoints" / f"step_{CUT_AT:08d}" / "engine" / f, weights_only=True) for f in hook_files]
        shapes = {tuple(v["Sigma"].shape) for sd in saved for v in sd["sigma"].values()}
        assert shapes and all(s[1] == 3 < s[0] for s in shapes), shapes
    ref, got = _weights(full), _weights(cut)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    losses = [[json.loads(x)["loss"] for x in (p / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(x)]
              for p in (full, cut)]  # fmt: skip
    assert losses[0] == losses[1] and len(losses[0]) == 6


@pytest.mark.distributed
def test_gum_matches_one_process_on_every_engine(runs, tmp_path):
    """GUM on every engine (its layouts: replicated, owner-sharded, ZeRO-1 composite, FSDP2 rows, compressed
    HSDP) follows the single-process run on the same global batches: max |Δw| ≤ 1e-5 after 3 steps."""
    from plumage_ds.train.loop import train

    root, _ = runs
    local = load_job_config(str(TINY), COMMON + ["optimizer.estimator=gum", f"data.batch_size={2 * W}"])
    train(local, tmp_path / "local", progress=False)
    ref = _weights(tmp_path / "local")
    for engine in ("ddp", "sharded", "deepspeed", "fsdp2", "hsdp"):
        got = _weights(root / f"{engine}-gum")
        worst = max(float((got[k].float() - ref[k].float()).abs().max()) for k in got)
        assert worst <= 1e-5, (engine, worst)


@pytest.mark.distributed
def test_resume_on_another_world_size_keeps_the_global_batch(runs, tmp_path):
    """The FSDP2 checkpoint of step 2 saved on W=2, resumed here on W=1: ``grad_accum`` 1 -> 2 keeps the
    global batch of 4 windows, and step 3 ends where the W=2 run ended (with 2 windows it does not)."""
    from plumage_ds.config import load_config
    from plumage_ds.train.loop import train

    root, results = runs
    two = results[0]["fsdp2-saved"]
    out = Path(shutil.copytree(root / "fsdp2-saved", tmp_path / "run"))
    shutil.rmtree(out / "checkpoints" / "step_00000003")
    one = train(load_config(out / "config.yaml"), out, resume=True, progress=False)
    assert one["resumed_from_step"] == 2 and one["world_size"] == 1 and two["world_size"] == W
    assert one["tokens_per_step"] == two["tokens_per_step"] == 2 * W * 32
    assert one["config"]["train"]["grad_accum"] == W and one["config"]["data"]["batch_size"] == 2
    ref, got = _weights(root / "fsdp2-saved"), _weights(out)
    assert max(float((ref[k] - got[k]).abs().max()) for k in ref) <= 1e-5


# ------------------------------------------------------------------------------------- real launchers



def _env() -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


@pytest.mark.distributed
def test_sharded_kill_and_resume_under_torchrun_is_bitwise(runs, tmp_path):
    root, _ = runs
    out = tmp_path / "run"
    sets = [x for s in COMMON + RESUME for x in ("--set", s)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=localhost:{free_port()}", "-m", "plumage_ds", "train", "--config", str(TINY),
           "--out", str(out), "--no-progress", *sets]  # fmt: skip
    killed = subprocess.run(cmd, env=dict(_env(), PLUMAGE_DS_KILL_AFTER_STEP="3"), cwd=tmp_path,
                            capture_output=True, text=True, timeout=400)  # fmt: skip
    assert killed.returncode != 0 and not (out / "summary.json").exists(), killed.stderr[-3000:]
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step_00000002"]
    cmd[5] = f"--rdzv-endpoint=localhost:{free_port()}"
    resumed = subprocess.run(cmd + ["--resume"], env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "(sharded, 2 ranks)" in resumed.stderr
    ref, got = _weights(root / "resume-reference"), _weights(out)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    ref_losses, got_losses = ([json.loads(x)["loss"] for x in (p / "metrics.jsonl").read_text().splitlines()
                               if "loss" in json.loads(x)] for p in (root / "resume-reference", out))  # fmt: skip
    assert got_losses == ref_losses and len(ref_losses) == 6


@pytest.mark.distributed
def test_deepspeed_launcher_trains_checkpoints_and_saves_weights(tmp_path):
    launcher = Path(sys.executable).parent / "deepspeed"
    if not launcher.is_file():
        pytest.fail(f"deepspeed launcher missing: {launcher} (pip install deepspeed into this environment)")
    out = tmp_path / "run"
    cmd = [str(launcher), "--num_nodes", "1", "--num_accelerators", "2", "--master_port", str(free_port()),
           "--module", "plumage_ds", "train", "--config", str(TINY), "--deepspeed",
           str(REPO_ROOT / "configs" / "deepspeed" / "zero2.json"), "--out", str(out), "--steps", "3", "--no-progress",
           "--set", "optimizer.estimator=plumage", "--set", "data.batch_size=2", "--set", "train.save_interval=2"]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "plumage (deepspeed, 2 ranks)" in proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["zero_stage"] == 2 and summary["world_size"] == 2
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["engine"] == "deepspeed"
    from plumage_ds.io import newest_complete

    assert newest_complete(out / "checkpoints")[0] == 3
    assert (out / "checkpoints" / "step_00000002" / "engine" / "deepspeed").is_dir()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "model")


@pytest.mark.distributed
def test_hsdp_two_nodes_of_two_processes_under_torchrun(tmp_path):
    out = tmp_path / "run"
    port = free_port()
    args = [str(REPO_ROOT / "launch" / "torchrun_fsdp.sh"), "hsdp", "--config", str(TINY), "--out", str(out),
            "--no-progress", *[x for s in COMMON + ["optimizer.estimator=plumage", "train.save_interval=2"]
                               for x in ("--set", s)]]  # fmt: skip
    env = dict(_env(), NNODES="2", NPROC="2", RDZV_ENDPOINT=f"localhost:{port}",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")  # fmt: skip
    nodes = [subprocess.Popen(args, env=dict(env, NODE_RANK=str(k)), cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for k in (0, 1)]  # fmt: skip
    logs = [p.communicate(timeout=400)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(log[-3000:] for log in logs)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["engine"] == "hsdp" and summary["world_size"] == 4
    assert {r["sharding"] for r in summary["matrices"] if r["mode"] == "plumage"} == {"fsdp_rows"}
    # the inter-node (replicate) link carried compressed projections, and the intra-node one its reduce-scatter
    assert summary["comm_bytes_replicate_total"]["lowrank_grad/all_reduce"]["bytes"] > 0
    assert summary["comm_bytes_total"]["lowrank_grad/reduce_scatter"]["bytes"] > 0
    from plumage_ds.io import newest_complete

    assert newest_complete(out / "checkpoints")[0] == STEPS
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "model")


@pytest.mark.distributed
def test_kill_during_a_checkpoint_save_then_resume(runs, tmp_path):
    """SIGKILL after the files of checkpoint 4 but before its manifest: checkpoint 2 is the newest
    complete one, ``--resume`` continues from it and ends bitwise equal to an uninterrupted run."""
    from plumage_ds.io import list_checkpoints, newest_complete

    out = tmp_path / "run"
    sets = [x for s in COMMON + ["train.steps=6", "train.save_interval=2", "optimizer.estimator=plumage"]
            for x in ("--set", s)]  # fmt: skip
    cmd = [sys.executable, "-m", "plumage_ds", "train", "--config", str(TINY), "--out", str(out), "--no-progress", *sets]
    killed = subprocess.run(cmd, env=dict(_env(), PLUMAGE_DS_KILL_DURING_SAVE="4"), cwd=tmp_path,
                            capture_output=True, text=True, timeout=400)  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [2, 4]  # 4 exists, half-written
    assert newest_complete(out / "checkpoints")[0] == 2
    resumed = subprocess.run(cmd + ["--resume"], env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "step_00000002" in resumed.stderr
    reference = tmp_path / "reference"
    done = subprocess.run(cmd[:-len(sets) - 3] + ["--out", str(reference), "--no-progress", *sets], env=_env(),
                          cwd=tmp_path, capture_output=True, text=True, timeout=400)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    ref, got = _weights(reference), _weights(out)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


@pytest.mark.distributed
def test_elastic_restart_after_a_rank_dies_is_bitwise(runs, tmp_path):
    """``torchrun --max-restarts=1``: rank 1 is SIGKILLed after step 3 (checkpoint at step 2); torchrun
    restarts both ranks, the job resumes from step 2 by itself and ends bitwise equal to the
    uninterrupted run."""
    root, _ = runs
    out = tmp_path / "run"
    sets = [x for s in COMMON + RESUME for x in ("--set", s)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--max-restarts=1", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=localhost:{free_port()}", "-m", "plumage_ds", "train", "--config", str(TINY),
           "--out", str(out), "--no-progress", *sets]  # fmt: skip
    # a fresh rendezvous store per attempt (launch/torchrun.sh sets it; pytorch/pytorch#135712)
    env = dict(_env(), PLUMAGE_DS_KILL_AFTER_STEP="3", PLUMAGE_DS_KILL_RANK="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "elastic restart 1: resuming" in proc.stderr and "resumed from" in proc.stderr
    ref, got = _weights(root / "resume-reference"), _weights(out)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
