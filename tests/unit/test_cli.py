"""The main job end to end (``plumage-ds train`` / ``compare``) on ``configs/tiny.yaml``."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from plumage_ds.cli import apply_overrides, load_job_config, main, parse_value
from plumage_ds.config import TRAIN_ESTIMATORS, JobConfig, load_config, to_dict
from plumage_ds.train.compare import compare_rows, gap_closed
from plumage_ds.train.loop import MIN_LR_RATIO, lr_multiplier

METRIC_KEYS = {"step", "loss", "lr", "tokens_per_s"}
SUMMARY_KEYS = {
    "status",
    "config",
    "corpus",
    "matrices",
    "steps_completed",
    "final_eval_loss",
    "final_train_loss",
    "optimizer_state_bytes",
    "wall_time_s",
    "tokens_per_s",
}
ROW_KEYS = {"name", "shape", "mode", "reason"}


def read_run(out: Path) -> tuple[list[dict], list[dict], dict]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if "loss" in x]
    evals = [x for x in lines if "eval_loss" in x]
    assert len(train) + len(evals) == len(lines), lines
    return train, evals, json.loads((out / "summary.json").read_text())


def check_completed_run(out: Path, cfg: JobConfig) -> dict:
    """Everything a finished run must have written; returns the summary."""
    train, evals, summary = read_run(out)
    tc = cfg.train
    assert all(set(x) == METRIC_KEYS for x in train)
    assert [x["step"] for x in train] == sorted({*range(tc.log_interval, tc.steps + 1, tc.log_interval), tc.steps})
    assert [x["step"] for x in evals] == sorted({*range(tc.eval_interval, tc.steps + 1, tc.eval_interval), tc.steps})
    assert all(math.isfinite(x["loss"]) and x["tokens_per_s"] > 0 for x in train)
    assert all(math.isfinite(x["eval_loss"]) for x in evals)
    assert SUMMARY_KEYS <= set(summary)
    assert summary["status"] == "completed" and summary["steps_completed"] == tc.steps
    assert summary["config"] == to_dict(cfg)
    assert summary["final_eval_loss"] == evals[-1]["eval_loss"]
    assert summary["final_train_loss"] == train[-1]["loss"]
    assert 0 < summary["final_eval_loss"] < 10 and summary["optimizer_state_bytes"] > 0
    assert summary["matrices"] and all(ROW_KEYS <= set(r) for r in summary["matrices"])
    assert load_config(out / "config.yaml") == cfg
    return summary


def test_train_subprocess(tmp_path, tiny_config_path, repo_root):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "plumage_ds", "train", "--config", str(tiny_config_path), "--out", str(out),
         "--steps", "4", "--no-progress"],
        cwd=repo_root, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "final eval loss" in proc.stdout
    check_completed_run(out, load_job_config(str(tiny_config_path), steps=4))


@pytest.mark.parametrize("estimator", TRAIN_ESTIMATORS)
def test_train_in_process_every_estimator(tmp_path, tiny_config_path, estimator):
    out = tmp_path / estimator
    sets = [f"optimizer.estimator={estimator}"]
    argv = ["train", "--config", str(tiny_config_path), "--out", str(out), "--no-progress"]
    assert main(argv + [x for s in sets for x in ("--set", s)]) == 0
    summary = check_completed_run(out, load_job_config(str(tiny_config_path), sets))
    modes = {r["mode"] for r in summary["matrices"]}
    assert modes == {"adamw"} if estimator == "adamw" else estimator in modes


def test_same_seed_same_losses(tmp_path, tiny_config_path):
    argv = ["train", "--config", str(tiny_config_path), "--steps", "2", "--no-progress", "--set", "train.log_interval=1"]
    assert main(argv + ["--out", str(tmp_path / "a")]) == 0
    assert main(argv + ["--out", str(tmp_path / "b")]) == 0
    assert main(argv + ["--out", str(tmp_path / "c"), "--set", "train.seed=1"]) == 0
    losses = {k: [x["loss"] for x in read_run(tmp_path / k)[0]] for k in "abc"}
    assert losses["a"] == losses["b"]
    assert losses["a"] != losses["c"]


def test_grad_accum_equals_big_batch(tmp_path, tiny_config_path):
    """2 micro-batches of 2 are the same global batch (same windows) as 1 batch of 4."""
    argv = ["train", "--config", str(tiny_config_path), "--steps", "3", "--no-progress", "--set", "train.log_interval=1"]
    assert main(argv + ["--out", str(tmp_path / "big")]) == 0
    assert main(argv + ["--out", str(tmp_path / "acc"), "--set", "data.batch_size=2", "--set", "train.grad_accum=2"]) == 0
    big, acc = ([x["loss"] for x in read_run(tmp_path / k)[0]] for k in ("big", "acc"))
    assert acc == pytest.approx(big, rel=1e-5)


def test_bf16_run(tmp_path, tiny_config_path):
    argv = ["train", "--config", str(tiny_config_path), "--steps", "2", "--no-progress"]
    assert main(argv + ["--out", str(tmp_path / "bf16"), "--set", "train.dtype=bfloat16"]) == 0
    assert main(argv + ["--out", str(tmp_path / "fp32")]) == 0
    bf16, fp32 = (read_run(tmp_path / k)[2] for k in ("bf16", "fp32"))
    assert bf16["status"] == "completed" and math.isfinite(bf16["final_eval_loss"])
    # AdamW moments live in the parameter dtype: about half the bytes
    assert bf16["optimizer_state_bytes"] < 0.6 * fp32["optimizer_state_bytes"]


def test_out_dir_must_be_empty_unless_overwrite(tmp_path, tiny_config_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    argv = ["train", "--config", str(tiny_config_path), "--out", str(out), "--steps", "1", "--no-progress"]
    assert main(argv) == 2
    assert "not empty" in capsys.readouterr().err and not (out / "summary.json").exists()
    assert main(argv + ["--overwrite"]) == 0
    assert (out / "summary.json").exists() and (out / "keep.txt").exists()


def test_nonfinite_loss_stops_and_keeps_logs(tmp_path, tiny_config_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--config", str(tiny_config_path), "--out", str(out), "--no-progress",
            "--set", "optimizer.lr=1e30", "--set", "train.log_interval=1", "--set", "train.warmup_steps=0"]
    assert main(argv) == 1
    assert "Non-finite training loss" in capsys.readouterr().err
    train, _, summary = read_run(out)
    assert summary["status"] == "diverged" and "Non-finite" in summary["error"]
    assert 1 <= summary["steps_completed"] < 6
    assert [x["step"] for x in train] == list(range(1, summary["steps_completed"] + 1))


# --------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    "yaml_text, key",
    [("modle:\n  hidden_size: 8\n", "modle"), ("train:\n  stpes: 3\n", "stpes"), ("data:\n  seq_len: 0\n", "seq_len=0")],
)
def test_bad_yaml_key_raises_naming_it(tmp_path, yaml_text, key, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ValueError, match=key):
        load_config(path)
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
    assert key in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.rank=0", "rank=0"),
        ("optimizer.estimator=sgd", "estimator='sgd'"),
        ("train.bogus=1", "bogus"),
        ("nosection.x=1", "'nosection'"),
        ("optimizer.rank", "section.key=value"),
    ],
)
def test_bad_override_raises_naming_it(tiny_config_path, override, message, tmp_path, capsys):
    with pytest.raises(ValueError, match=message):
        load_job_config(str(tiny_config_path), [override])
    assert main(["train", "--config", str(tiny_config_path), "--out", str(tmp_path / "o"), "--set", override]) == 2
    assert message in capsys.readouterr().err


def test_overrides_and_steps_shortcut(tiny_config_path):
    cfg = load_job_config(
        str(tiny_config_path),
        ["optimizer.lr=1e-2", "optimizer.betas=[0.8, 0.9]", "optimizer.estimator=galore", "data.root=null"],
        steps=3,
    )
    assert cfg.optimizer.lr == 0.01 and isinstance(cfg.optimizer.lr, float)
    assert cfg.optimizer.betas == (0.8, 0.9) and cfg.optimizer.estimator == "galore"
    assert cfg.train.steps == 3 and cfg.data.root is None
    base = load_config(tiny_config_path)
    assert apply_overrides(base, []) == base


@pytest.mark.parametrize("text, value", [("1e-3", 1e-3), ("3", 3), ("-2.5E2", -250.0), ("gram", "gram"), ("true", True)])
def test_parse_value(text, value):
    got = parse_value(text)
    assert got == value and type(got) is type(value)


# --------------------------------------------------------------------------- schedule and compare


def test_lr_schedule_warmup_then_cosine_to_floor():
    mult = [lr_multiplier(s, steps=20, warmup_steps=4, schedule="cosine") for s in range(20)]
    assert mult[:5] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert all(a >= b for a, b in zip(mult[4:], mult[5:]))
    assert mult[-1] == pytest.approx(MIN_LR_RATIO)
    assert [lr_multiplier(s, steps=5, warmup_steps=0, schedule="constant") for s in range(5)] == [1.0] * 5


def _fake_run(path: Path, config: Path, estimator: str, loss: float, *sets: str) -> Path:
    cfg = to_dict(load_job_config(str(config), [f"optimizer.estimator={estimator}", *sets]))
    path.mkdir(parents=True)
    summary = {"status": "completed", "config": cfg, "final_eval_loss": loss, "final_train_loss": loss,
               "optimizer_state_bytes": 1000, "tokens_per_s": 50.0}
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def test_compare_gap_closed(tmp_path, tiny_config_path, capsys):
    runs = [("adamw", 2.0, "train.num_threads=1"), ("galore", 3.0, "optimizer.rank=2"), ("plumage", 2.6, "optimizer.lr=0.1")]
    dirs = [_fake_run(tmp_path / e, tiny_config_path, e, loss, s) for e, loss, s in runs]
    rows, warnings = compare_rows(dirs)
    gaps = {r["estimator"]: r["gap_closed"] for r in rows}
    assert gaps == {"adamw": 1.0, "galore": 0.0, "plumage": pytest.approx(0.4)}
    assert warnings == []
    assert main(["compare", *map(str, dirs)]) == 0
    out = capsys.readouterr().out
    assert "40.0%" in out and "plumage" in out
    # not like-for-like: warned
    other = _fake_run(tmp_path / "haar", tiny_config_path, "haar", 2.9, "train.steps=11")
    assert any("not like-for-like" in w for w in compare_rows(dirs + [other])[1])
    assert gap_closed(1.0, galore=2.0, adamw=2.0) is None
    # AdamW worse than GaLore: the figure is meaningless, and said so
    inverted = [_fake_run(tmp_path / f"inv-{e}", tiny_config_path, e, loss) for e, loss in [("adamw", 3.0), ("galore", 2.0)]]
    rows, warnings = compare_rows(inverted)
    assert [r["gap_closed"] for r in rows] == [1.0, 0.0]
    assert any("not better than galore" in w for w in warnings)
    capsys.readouterr()
    assert main(["compare", *map(str, inverted)]) == 0
    out = capsys.readouterr().out
    assert " 0.0%" in out and "-0.0%" not in out and "warning: adamw" in out
    assert main(["compare", str(tmp_path / "missing")]) == 2


# ------------------------------------------------------------------------------------- --deepspeed (no spawn)

DS_SHIPPED = Path(__file__).resolve().parents[2] / "configs" / "deepspeed" / "zero2.json"


def _ds_json(tmp_path, mutate=None, name="ds.json") -> Path:
    cfg = json.loads(DS_SHIPPED.read_text())
    cfg.pop("scheduler", None)
    cfg.update(train_batch_size=2, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1)
    if mutate is not None:
        mutate(cfg)
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture
def no_process_group(monkeypatch):
    """Fails the test if anything tries to create a process group."""
    import torch.distributed as dist

    def refuse(*a, **k):
        raise AssertionError("a process group was created before the config was validated")

    monkeypatch.setattr(dist, "init_process_group", refuse)
    try:
        import deepspeed

        monkeypatch.setattr(deepspeed, "init_distributed", refuse)
    except ImportError:
        pass
    yield
    assert not dist.is_initialized()


def _del(section, key):
    def f(cfg):
        cfg[section].pop(key) if key else cfg.pop(section)

    return f


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: tmp / "missing.json", "no such file"),
        (lambda tmp: (tmp / "bad.json").write_text("{not json") and tmp / "bad.json", "not valid JSON"),
        (lambda tmp: _ds_json(tmp, _del("plumage", None)), 'no "plumage" section'),
        (lambda tmp: _ds_json(tmp, lambda c: c["plumage"].update(rnak=3)), "rnak"),
        (lambda tmp: _ds_json(tmp, lambda c: c["optimizer"]["params"].update(momentum=0.9)), "momentum"),
        (lambda tmp: _ds_json(tmp, lambda c: c["optimizer"].update(type="SGD")), "SGD"),
        (lambda tmp: _ds_json(tmp, lambda c: c.update(fp16={"enabled": True})), "fp16"),
        (lambda tmp: _ds_json(tmp, lambda c: c.update(train_batch_size=3)), "train_batch_size=3"),
        (lambda tmp: _ds_json(tmp, lambda c: c.update(bf16={"enabled": True})), "bf16.enabled=true"),
    ],
    ids=["missing", "not-json", "no-plumage", "unknown-plumage-key", "unknown-adam-key", "sgd", "fp16",
         "batch-vs-world", "dtype-conflict"],
)  # fmt: skip
def test_deepspeed_bad_config_exit_2_before_process_group(
    tmp_path, tiny_config_path, make, message, capsys, no_process_group, monkeypatch
):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    path = make(tmp_path)
    out = tmp_path / "run"
    argv = ["train", "--config", str(tiny_config_path), "--deepspeed", str(path), "--out", str(out), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("plumage-ds train: error:") and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_deepspeed_rejects_optimizer_override(tmp_path, tiny_config_path, capsys, no_process_group):
    argv = ["train", "--config", str(tiny_config_path), "--deepspeed", str(_ds_json(tmp_path)),
            "--out", str(tmp_path / "run"), "--set", "optimizer.lr=1e-2"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "optimizer.lr=1e-2" in err and "--deepspeed" in err


def test_deepspeed_batch_sizes_checked_against_launcher_world(tmp_path, tiny_config_path, capsys, no_process_group, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    argv = ["train", "--config", str(tiny_config_path), "--deepspeed", str(_ds_json(tmp_path)),
            "--out", str(tmp_path / "run")]  # fmt: skip
    assert main(argv) == 2
    assert "world_size=2" in capsys.readouterr().err


def test_local_rank_is_accepted_and_ignored():
    from plumage_ds.cli import _build_parser

    args = _build_parser().parse_args(["--local_rank=1", "train", "--config", "c", "--out", "o", "--local_rank", "0"])
    assert args.command == "train" and args.deepspeed is None


def test_deepspeed_resolved_config(tiny_config_path):
    from plumage_ds.train.deepspeed_loop import resolve_config

    cfg = load_job_config(str(tiny_config_path))
    raw = json.loads(DS_SHIPPED.read_text())
    for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        raw.pop(k)
    resolved, ds = resolve_config(cfg, raw)
    # optimizer from the JSON, batch sizes from the job when the JSON has none
    assert resolved.optimizer.estimator == "plumage" and resolved.optimizer.lr == 0.003
    assert resolved.optimizer.grad_clip == 1.0 and resolved.optimizer.rank == 8
    assert ds["train_micro_batch_size_per_gpu"] == cfg.data.batch_size
    assert ds["gradient_accumulation_steps"] == cfg.train.grad_accum
    assert resolved.model == cfg.model and resolved.data == cfg.data and resolved.train == cfg.train


def test_deepspeed_single_process(tmp_path, tiny_config_path, repo_root):
    """``--deepspeed`` without a launcher: a world of one (subprocess: it owns the process group)."""
    pytest.importorskip("deepspeed")
    import os

    out = tmp_path / "run"
    ds = _ds_json(tmp_path, lambda c: c["plumage"].update(rank=4, update_interval=2, print_report=False))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(repo_root))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    proc = subprocess.run(
        [sys.executable, "-m", "plumage_ds", "train", "--config", str(tiny_config_path), "--deepspeed", str(ds),
         "--out", str(out), "--steps", "3", "--no-progress"],
        cwd=repo_root, capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "DeepSpeed ZeRO-2, 1 ranks" in proc.stdout
    cfg = load_job_config(str(out / "config.yaml"))
    summary = check_completed_run(out, cfg)
    assert summary["world_size"] == 1 and summary["zero_stage"] == 2
    assert summary["optimizer_state_bytes_per_rank"] == [summary["optimizer_state_bytes"]]
    assert summary["comm_bytes_total"] and cfg.optimizer.estimator == "plumage" and cfg.data.batch_size == 2
