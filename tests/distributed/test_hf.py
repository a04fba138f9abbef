"""HF Trainer and Accelerate routes (``plumage_ds.integrations.hf``) on tiny GPT-2 (tied) and LLaMA.

Every run is compared with the single-process reference: ``PlumageAdamW`` on
:func:`~plumage_ds.optim.lowrank_param_groups` (default selection), the HF models' own loss, batches
read in order (step ``s`` reads examples ``[s·B, (s+1)·B)`` of the global batch ``B``):

* Trainer, single process (GPT-2, LLaMA): within 1e-5, with real parameter names in the report;
  resume from a Trainer checkpoint: bitwise equal to the uninterrupted run (fp32);
* Trainer under the real ``torchrun --nproc_per_node 2`` launcher: LLaMA within 1e-5, replicas
  bitwise equal; GPT-2 with the PLUMAGE comm hook: trains, the hook ran every step;
* one spawned 2-rank job: Trainer + ``TrainingArguments(deepspeed=ZeRO-2)``, Accelerate with its
  DeepSpeed plugin (ZeRO-2) and Accelerate DDP: each within 1e-5 of the reference, report asserted
  (PLUMAGE active: targets in mode ``plumage``, state sharded by owner), DeepSpeed's config without
  an ``"optimizer"`` section enforced.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
pytest.importorskip("accelerate")
pytest.importorskip("deepspeed")

from plumage_ds.optim import PlumageAdamW, lowrank_param_groups  # noqa: E402
from plumage_ds.testing import (  # noqa: E402
    free_port,
    hf_lm_loss,
    hf_training_args,
    lm_examples,
    record,
    run_workers,
    tiny_gpt2,
    tiny_llama,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama}
RANK, TAU, SEED, LR = 4, 2, 1, 3e-3
PLUMAGE = {"estimator": "plumage", "rank": RANK, "update_interval": TAU, "seed": SEED}
W = 2


def reference(family: str, steps: int, batch: int) -> dict:
    """Single-process PlumageAdamW, global batch ``batch``, examples read in order."""
    model = MODELS[family]()
    groups, _ = lowrank_param_groups(model, target_modules=None, rank=RANK)
    opt = PlumageAdamW(groups, lr=LR, rank=RANK, update_interval=TAU, seed=SEED)
    data = lm_examples(steps * batch)
    for s in range(steps):
        opt.zero_grad(set_to_none=True)
        hf_lm_loss(model, data[s * batch : (s + 1) * batch]).backward()
        opt.step()
    return _params(model)


def _params(model) -> dict:
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _trainer(family, out, steps, batch, model=None, **args):
    from plumage_ds.integrations.hf import PlumageTrainer

    model = model if model is not None else MODELS[family]()
    return PlumageTrainer(
        model=model, args=hf_training_args(str(out), steps=steps, batch=batch, lr=LR, **args),
        train_dataset=lm_examples(steps * batch * int(os.environ.get("WORLD_SIZE", "1"))), plumage=PLUMAGE,
    )  # fmt: skip


def _assert_report(report, family):
    modes = {r["name"]: r["mode"] for r in report}
    if family == "gpt2":
        assert modes["transformer.h.0.attn.c_attn.weight"] == "plumage"
        assert modes["transformer.wte.weight|lm_head.weight"].startswith("adamw")
        assert sum(m == "plumage" for m in modes.values()) == 8
    else:
        assert modes["model.layers.0.self_attn.q_proj.weight"] == "plumage"
        assert modes["lm_head.weight"].startswith("adamw")
        assert sum(m == "plumage" for m in modes.values()) == 14


# ----------------------------------------------------------------------------- single process


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_trainer_single_process_matches_reference(tmp_path, family):
    trainer = _trainer(family, tmp_path, steps=4, batch=4)
    trainer.train()
    _assert_report(trainer.plumage_report(), family)
    assert _max_diff(_params(trainer.model), reference(family, 4, 4)) <= 1e-5


def test_trainer_resume_is_bitwise(tmp_path):
    full = _trainer("gpt2", tmp_path / "full", steps=6, batch=4, save_strategy="steps", save_steps=3)
    full.train()
    ckpt = tmp_path / "full" / "checkpoint-3"
    assert (ckpt / "optimizer.pt").is_file()
    resumed = _trainer("gpt2", tmp_path / "resumed", steps=6, batch=4, model=tiny_gpt2(seed=7))
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.plumage_optimizer().state[resumed.model.lm_head.weight]["step"] == 6
    a, b = _params(full.model), _params(resumed.model)
    assert _max_diff(a, b) == 0.0


def test_trainer_rejects_bad_options(tmp_path):
    with pytest.raises(ValueError, match="rnak"):
        _trainer_with(tmp_path, plumage={"rnak": 4})
    with pytest.raises(ValueError, match="do not pass optimizers="):
        _trainer_with(tmp_path, optimizers=(torch.optim.SGD(tiny_gpt2().parameters(), lr=1.0), None))


def _trainer_with(tmp_path, **kw):
    from plumage_ds.integrations.hf import PlumageTrainer

    return PlumageTrainer(model=tiny_gpt2(), args=hf_training_args(str(tmp_path), steps=1, batch=2),
                          train_dataset=lm_examples(2), **kw)  # fmt: skip


# ----------------------------------------------------------------------------- real torchrun launcher



def _launcher_env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


@pytest.mark.distributed
def test_trainer_under_torchrun(tmp_path):
    exe = Path(sys.executable).parent / "torchrun"
    if not exe.is_file():
        pytest.fail(f"torchrun launcher missing: {exe}")
    result = tmp_path / "result.json"
    cmd = [
        str(exe), "--nproc_per_node", str(W), "--master_port", str(free_port()), str(REPO_ROOT / "launch" / "hf_trainer.py"),
        "--job", "llama", "--job", "gpt2:hook", "--steps", "4", "--batch", "2", "--out", str(tmp_path), "--result", str(result),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=_launcher_env(), cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.loads(result.read_text())
    assert res["world_size"] == W
    llama, gpt2 = res["runs"]["llama"], res["runs"]["gpt2:hook"]
    for run, family in ((llama, "llama"), (gpt2, "gpt2")):
        assert run["ddp"] == "DistributedDataParallel" and run["replicas_equal"]
        _assert_report(run["report"], family)
        assert len(run["losses"]) == 4 and all(torch.isfinite(torch.tensor(run["losses"])))
    ref = reference("llama", 4, 2 * W)
    assert _max_diff(torch.load(tmp_path / "llama.pt"), ref) <= 1e-5
    assert gpt2["hook_steps"] == 4 and "transformer.h.0.mlp.c_fc.weight" in gpt2["hook_compressed"]


# ----------------------------------------------------------------------------- one spawned job: DeepSpeed / Accelerate


STEPS, MB = 4, 2  # micro-batch per rank


def _ds_config(stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": MB, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
        "zero_optimization": {"stage": stage}, "steps_per_print": 10**6,
    }  # fmt: skip



def _reset_accelerate():
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    AcceleratorState._reset_state(reset_partial_state=True)
    unset_hf_deepspeed_config()
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)  # set by an Accelerator given a DeepSpeed plugin


def _worker(rank, world, port, out_dir):
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu"})
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    from plumage_ds.integrations import hf

    out: dict = {}

    def loader():
        data = lm_examples(STEPS * MB * world)
        collate = lambda rows: rows  # noqa: E731 - the loss takes the rows
        return torch.utils.data.DataLoader(data, batch_size=MB, shuffle=False, collate_fn=collate)

    def accelerate_run(kind):
        def fn():
            _reset_accelerate()
            if kind == "deepspeed":
                # not cpu=True (Accelerate then ignores the DeepSpeed plugin); on a machine without GPUs the gloo
                # backend must be named, else Accelerate counts 1 process (hf.prepare raises on that)
                acc = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=_ds_config(2)),
                                  kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
            else:
                acc = Accelerator(cpu=True)
            model = tiny_gpt2()
            engine, opt, dl = hf.prepare(acc, model, loader(), lr=LR, plumage=PLUMAGE)
            for rows in dl:
                loss = hf_lm_loss(engine, rows)
                acc.backward(loss)
                opt.step()
                opt.zero_grad()
            inner = hf.inner_optimizer(opt)
            res = {"params": _params(model), "report": inner.matrix_report(), "state_bytes": inner.state_bytes(),
                   "distributed_type": str(acc.distributed_type), "model_type": type(engine).__name__}  # fmt: skip
            del engine, opt, acc
            return res

        return fn

    def trainer_deepspeed():
        _reset_accelerate()
        trainer = _trainer("gpt2", os.path.join(out_dir, "ds"), steps=STEPS, batch=MB, deepspeed=_ds_config(2))
        trainer.train()
        inner = trainer.plumage_optimizer()
        res = {"params": _params(trainer.model), "report": inner.matrix_report(), "state_bytes": inner.state_bytes(),
               "engine": type(trainer.model_wrapped).__name__, "composite": type(inner).__name__}  # fmt: skip
        bad = _ds_config(2)
        bad["optimizer"] = {"type": "AdamW", "params": {"lr": LR}}
        _reset_accelerate()
        try:
            _trainer("gpt2", os.path.join(out_dir, "bad"), steps=1, batch=MB, deepspeed=bad)
            res["optimizer_section"] = None
        except ValueError as exc:
            res["optimizer_section"] = str(exc)
        del trainer
        return res

    record(out, "accelerate_ddp", accelerate_run("ddp"))
    record(out, "accelerate_deepspeed", accelerate_run("deepspeed"))
    record(out, "trainer_deepspeed", trainer_deepspeed)
    return out


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    return run_workers(_worker, W, free_port(), str(tmp_path_factory.mktemp("hf")))


def _get(runs, name):
    for r in runs:
        if not r[name]["ok"]:
            pytest.fail(f"run {name!r} failed:\n{r[name]['error']}")
    return runs[0][name]


@pytest.fixture(scope="module")
def gpt2_reference():
    return reference("gpt2", STEPS, MB * W)


def _owner_sharded(runs, name):
    """Target moments live on their owner only: per-rank moment bytes add up to the total, each rank holds some."""
    moments = [r[name]["state_bytes"]["moments"] for r in runs]
    return all(m > 0 for m in moments)


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["accelerate_ddp", "accelerate_deepspeed", "trainer_deepspeed"])
def test_engine_routes_match_reference(spawned, gpt2_reference, name):
    run = _get(spawned, name)
    _assert_report(run["report"], "gpt2")
    assert _max_diff(run["params"], gpt2_reference) <= 1e-5
    assert _max_diff(spawned[1][name]["params"], gpt2_reference) <= 1e-5
    owners = {r["owner"] for r in run["report"] if r["mode"] == "plumage"}
    assert owners == {0, 1}  # targets' state split between the ranks
    assert _owner_sharded(spawned, name)


@pytest.mark.distributed
def test_route_details(spawned):
    ddp = _get(spawned, "accelerate_ddp")
    assert ddp["distributed_type"] == "DistributedType.MULTI_CPU" and ddp["model_type"] == "GPT2LMHeadModel"
    ds = _get(spawned, "accelerate_deepspeed")
    assert ds["distributed_type"] == "DistributedType.DEEPSPEED" and ds["model_type"] == "DeepSpeedEngine"
    tr = _get(spawned, "trainer_deepspeed")
    assert tr["engine"] == "DeepSpeedEngine" and tr["composite"] == "PlumageDeepSpeedOptimizer"
    assert tr["state_bytes"]["deepspeed_partition"] > 0
    assert tr["optimizer_section"] is not None and "'optimizer' section" in tr["optimizer_section"]
