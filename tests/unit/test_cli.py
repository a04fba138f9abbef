"""The main job's command line (``plumage-ds train`` / ``compare`` / ``plot``) on ``configs/tiny.yaml``."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from plumage_ds.cli import apply_overrides, load_job_config, main, parse_value
from plumage_ds.config import JobConfig, load_config, to_dict
from plumage_ds.estimators.registry import ESTIMATORS, estimator_names
from plumage_ds.train.compare import compare_rows, gap_closed
from plumage_ds.train.loop import MIN_LR_RATIO, lr_multiplier

METRIC_KEYS = {"step", "loss", "lr", "tokens_per_s"}
SUMMARY_KEYS = {
    "status", "config", "corpus", "matrices", "steps_completed", "final_eval_loss", "final_train_loss",
    "optimizer_state_bytes", "optimizer_state_bytes_per_rank", "wall_time_s", "tokens_per_s", "engine",
    "world_size", "model", "tokens_per_step",
}  # fmt: skip
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
    assert SUMMARY_KEYS <= set(summary), SUMMARY_KEYS - set(summary)
    assert summary["status"] == "completed" and summary["steps_completed"] == tc.steps
    assert summary["config"] == to_dict(cfg)
    assert summary["final_eval_loss"] == evals[-1]["eval_loss"]
    assert summary["final_train_loss"] == train[-1]["loss"]
    assert 0 < summary["final_eval_loss"] < 10 and summary["optimizer_state_bytes"] > 0
    assert summary["matrices"] and all(ROW_KEYS <= set(r) for r in summary["matrices"])
    assert load_config(out / "config.yaml") == cfg
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "config.json").is_file()
    return summary


def run_main(*argv) -> int:
    return main([str(a) for a in argv])


def test_train_subprocess_and_weights_load_in_transformers(tmp_path, tiny_config_path, repo_root):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "plumage_ds", "train", "--config", str(tiny_config_path), "--out", str(out),
         "--steps", "4", "--no-progress"],
        cwd=repo_root, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "final eval loss" in proc.stderr and "local, 1 rank" in proc.stderr
    check_completed_run(out, load_job_config(str(tiny_config_path), steps=4))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert type(model).__name__ == "LlamaForCausalLM"


@pytest.mark.parametrize("estimator", [n for n in estimator_names() if ESTIMATORS[n].in_optimizer])
def test_train_in_process_every_estimator(tmp_path, tiny_config_path, estimator):
    out = tmp_path / estimator
    sets = [f"optimizer.estimator={estimator}", "train.steps=3"]
    assert run_main("train", "--config", tiny_config_path, "--out", out, "--no-progress", "--set", sets[0], "--set", sets[1]) == 0
    summary = check_completed_run(out, load_job_config(str(tiny_config_path), sets))
    modes = {r["mode"] for r in summary["matrices"]}
    assert modes == {"adamw"} if estimator == "adamw" else estimator in modes


def test_same_seed_same_losses(tmp_path, tiny_config_path):
    argv = ["train", "--config", tiny_config_path, "--steps", "2", "--no-progress", "--set", "train.log_interval=1"]
    assert run_main(*argv, "--out", tmp_path / "a") == 0
    assert run_main(*argv, "--out", tmp_path / "b") == 0
    assert run_main(*argv, "--out", tmp_path / "c", "--set", "train.seed=1") == 0
    losses = {k: [x["loss"] for x in read_run(tmp_path / k)[0]] for k in "abc"}
    assert losses["a"] == losses["b"]
    assert losses["a"] != losses["c"]


def test_grad_accum_equals_big_batch(tmp_path, tiny_config_path):
    """2 micro-batches of 2 are the same global batch (same windows) as 1 batch of 4."""
    argv = ["train", "--config", tiny_config_path, "--steps", "3", "--no-progress", "--set", "train.log_interval=1"]
    assert run_main(*argv, "--out", tmp_path / "big") == 0
    assert run_main(*argv, "--out", tmp_path / "acc", "--set", "data.batch_size=2", "--set", "train.grad_accum=2") == 0
    big, acc = ([x["loss"] for x in read_run(tmp_path / k)[0]] for k in ("big", "acc"))
    assert acc == pytest.approx(big, rel=1e-5)


def test_bf16_run(tmp_path, tiny_config_path):
    argv = ["train", "--config", tiny_config_path, "--steps", "2", "--no-progress"]
    assert run_main(*argv, "--out", tmp_path / "bf16", "--set", "train.dtype=bfloat16") == 0
    assert run_main(*argv, "--out", tmp_path / "fp32") == 0
    bf16, fp32 = (read_run(tmp_path / k)[2] for k in ("bf16", "fp32"))
    assert bf16["status"] == "completed" and math.isfinite(bf16["final_eval_loss"])
    # AdamW moments live in the parameter dtype: about half the bytes
    assert bf16["optimizer_state_bytes"] < 0.6 * fp32["optimizer_state_bytes"]


def test_step_impls_through_the_main_job(tmp_path, tiny_config_path):
    """``optimizer.step_impl`` reaches PlumageAdamW: the staged, streamed and compiled steps train the
    same run (losses within 1e-5 relative over 6 steps with a refresh)."""
    argv = ["train", "--config", tiny_config_path, "--steps", "6", "--no-progress", "--set", "train.log_interval=1",
            "--set", "optimizer.estimator=plumage", "--set", "optimizer.update_interval=3"]
    for impl in ("staged", "streaming", "compiled"):
        assert run_main(*argv, "--out", tmp_path / impl, "--set", f"optimizer.step_impl={impl}") == 0
    staged, streamed, compiled = ([x["loss"] for x in read_run(tmp_path / k)[0]] for k in ("staged", "streaming", "compiled"))
    assert streamed == staged  # the same arithmetic in place
    assert compiled == pytest.approx(streamed, rel=1e-5)


def test_out_dir_must_be_empty_unless_overwrite(tmp_path, tiny_config_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    argv = ["train", "--config", tiny_config_path, "--out", out, "--steps", "1", "--no-progress"]
    assert run_main(*argv) == 2
    assert "not empty" in capsys.readouterr().err and not (out / "summary.json").exists()
    assert run_main(*argv, "--overwrite") == 0
    assert (out / "summary.json").exists() and (out / "keep.txt").exists()


def test_nonfinite_loss_stops_and_keeps_logs(tmp_path, tiny_config_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--config", tiny_config_path, "--out", out, "--no-progress",
            "--set", "optimizer.lr=1e30", "--set", "train.log_interval=1", "--set", "train.warmup_steps=0"]  # fmt: skip
    assert run_main(*argv) == 1
    assert "Non-finite training loss" in capsys.readouterr().err
    train, _, summary = read_run(out)
    assert summary["status"] == "diverged" and "Non-finite" in summary["error"]
    assert 1 <= summary["steps_completed"] < 6
    assert [x["step"] for x in train] == list(range(1, summary["steps_completed"] + 1))


# --------------------------------------------------------------------------- checkpoints and resume


def test_local_kill_and_resume_is_bitwise(tmp_path, tiny_config_path, repo_root):
    """A real SIGKILL after step 3 (checkpoint at 2), then ``--resume``: same weights and losses as one run."""
    from safetensors.torch import load_file

    sets = ["--set", "train.save_interval=2", "--set", "train.log_interval=1", "--set", "optimizer.estimator=plumage",
            "--set", "optimizer.update_interval=2", "--set", "train.keep_last=1"]  # fmt: skip
    base = [sys.executable, "-m", "plumage_ds", "train", "--config", str(tiny_config_path), "--no-progress", *sets]
    env = dict(os.environ, PLUMAGE_DS_KILL_AFTER_STEP="3")
    killed = subprocess.run(base + ["--out", str(tmp_path / "b")], cwd=repo_root, env=env, capture_output=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step_00000002"]
    assert not (tmp_path / "b" / "summary.json").exists()
    assert run_main("train", "--out", tmp_path / "b", "--resume", "--no-progress") == 0  # config from OUT/config.yaml
    assert run_main("train", "--config", tiny_config_path, "--out", tmp_path / "a", "--no-progress", *sets) == 0
    a, b = (load_file(str(tmp_path / k / "model" / "model.safetensors")) for k in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la, lb = ([(x["step"], x["loss"]) for x in read_run(tmp_path / k)[0]] for k in "ab")
    assert la == lb and len(la) == 6
    assert read_run(tmp_path / "b")[2]["resumed_from_step"] == 2
    # keep_last=1: only the newest complete checkpoint is left
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == ["step_00000006"]


def test_resume_errors(tmp_path, tiny_config_path, capsys):
    out = tmp_path / "run"
    assert run_main("train", "--config", tiny_config_path, "--out", out, "--steps", "2", "--no-progress") == 0
    capsys.readouterr()
    assert run_main("train", "--out", out, "--resume") == 2  # save_interval=0: nothing to resume from
    err = capsys.readouterr().err
    assert "Invalid --resume: no complete checkpoint" in err and len(err.strip().splitlines()) == 1
    assert run_main("train", "--out", tmp_path / "nothing", "--resume") == 2
    err = capsys.readouterr().err
    assert f"Invalid --resume: no complete checkpoint in {tmp_path / 'nothing' / 'checkpoints'} (no run in " in err
    assert "it has no config.yaml)" in err and len(err.strip().splitlines()) == 1
    assert run_main("train", "--config", tiny_config_path, "--out", out, "--resume", "--steps", "3") == 2
    assert "Conflicting train.steps=3 with --resume" in capsys.readouterr().err


# --------------------------------------------------------------------------- bad input: exit 2, one line naming key


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


BAD_YAML = [
    ("modle:\n  hidden_size: 8\n", "Unknown config key 'modle'"),
    ("train:\n  stpes: 3\n", "Unknown config key 'train.stpes'"),
    ("data:\n  seq_len: 0\n", "Invalid data.seq_len=0"),
    ("optimizer:\n  lr: 1e-3\n", "Invalid optimizer.lr='1e-3': must be a number"),
    ("optimizer:\n  strict: 'yes'\n", "Invalid optimizer.strict='yes': must be true or false"),
    ("optimizer:\n  rank: 2.5\n", "Invalid optimizer.rank=2.5: must be an integer"),
    ("optimizer:\n  tau: 3\n", "Invalid config key 'optimizer.tau': renamed to 'update_interval'"),
    ("optimizer:\n  grad_clip: 1.0\n", "Invalid config key 'optimizer.grad_clip': renamed to 'max_grad_norm'"),
    ("optimizer:\n  estimator: topr\n", "Invalid optimizer.estimator='topr': renamed to 'galore'"),
    ("optimizer:\n  estimator: haar\n  svd_method: svd\n", "Invalid optimizer.svd_method='svd'"),
    ("optimizer:\n  estimator: galore\n  uniform_mix: 0.1\n", "Invalid optimizer.uniform_mix=0.1"),
    ("optimizer:\n  estimator: gum\n  realign: true\n", "Invalid optimizer.realign=True"),
    ("optimizer:\n  gum:\n    gamma: 0\n", "Invalid optimizer.gum.gamma=0"),
    ("optimizer:\n  betas: [0.9]\n", "Invalid optimizer.betas=[0.9]"),
    ("optimizer:\n  target_modules: ['(']\n", "Invalid optimizer.target_modules='('"),
    ("data:\n  root: /tmp\n", "Invalid config key 'data.root': renamed to 'path'"),
    ("data:\n  source: text\n", "Invalid data.path=None: source 'text' needs a path"),
    ("data:\n  tokenizer: /no/such/dir\n", "Invalid data.tokenizer='/no/such/dir'"),
    ("model:\n  model_type: gpt2\n  n_layr: 2\n", "Invalid model.n_layr=2: not a field of the 'gpt2' config"),
    ("model:\n  model_type: nosuchmodel\n", "Invalid model.model_type='nosuchmodel'"),
    ("model:\n  vocab_size: 100\n", "Invalid model.vocab_size=100"),
    ("model:\n  max_position_embeddings: 8\n", "Invalid data.seq_len=32: exceeds the model's max_position_embeddings=8"),
    ("model:\n  tie_word_embeddings: 'no'\n", "Invalid model.tie_word_embeddings='no': rejected by the 'llama' config (Field "),
    ("model:\n  hidden_size: 30\n  num_attention_heads: 4\n  num_key_value_heads: 4\n",
     "Invalid model.hidden_size=30: rejected by the 'llama' config (The hidden size (30) is not a multiple of the number"),
    ("model:\n  num_key_value_heads: 3\n", "Invalid model.num_key_value_heads=3: must divide num_attention_heads=2"),
    ("model:\n  model_type: gpt2\n  n_embd: 32\n  n_head: 3\n",
     "Invalid model={'n_embd': 32, 'n_head': 3}: the model cannot be built (`embed_dim` must be divisible by num_heads"),
    ("optimizer:\n  estimator: plumage\n  rank: 1000\n", "Invalid optimizer.rank=1000: no target matrix can take the "
     "low-rank path: the rank must be below a matrix's short side, and the largest of the 14 targets is 32 (largest usable: 31)"),
    ("optimizer:\n  estimator: galore\n  rank: 32\n  target_modules: ['mlp']\n", "(largest usable: 31)"),
    ("optimizer:\n  estimator: galore\n  rank: 32\n  strict: true\n", "Invalid optimizer.rank=32: optimizer.strict=true "
     "and target 'model.layers.0.self_attn.q_proj.weight' has short side 32 (largest usable: 31)"),
    ("train:\n  engine: fsdp\n", "Invalid train.engine='fsdp'"),
    ("train:\n  engine: deepspeed\n", "Invalid train.deepspeed_config=None"),
    ("train:\n  engine: ddp_hook\noptimizer:\n  estimator: gum\n", "Invalid optimizer.estimator='gum': not available on train.engine='ddp_hook'"),
    ("train:\n  engine: ddp_hook\noptimizer:\n  estimator: adamw\n", "not available on train.engine='ddp_hook'"),
    ("train:\n  engine: ddp_hook\noptimizer:\n  estimator: haar\n  scale: 0.5\n", "Invalid optimizer.scale=0.5: does not apply to train.engine='ddp_hook'"),
    ("train:\n  keep_last: 0\n", "Invalid train.keep_last=0"),
    ("[1, 2]\n", "top level must be a mapping"),
    ("optimizer: [\n", "not valid YAML"),
]


@pytest.mark.parametrize("text, message", BAD_YAML, ids=[m[:40] for _, m in BAD_YAML])
def test_bad_config_exit_2_one_line(tmp_path, tiny_config_path, text, message, capsys):
    import yaml

    base = yaml.safe_load(tiny_config_path.read_text())
    extra = yaml.safe_load(text) if not text.startswith(("[", "optimizer: [")) else None
    if isinstance(extra, dict):  # the tiny config with the bad bit merged in
        for section, values in extra.items():
            if section == "model" and "model_type" in values:
                base[section] = {}  # another model type: the tiny LLaMA's fields do not apply
            base.setdefault(section, {}).update(values)
        path = _write(tmp_path, yaml.safe_dump(base))
    else:
        path = _write(tmp_path, text)
    out = tmp_path / "out"
    assert run_main("train", "--config", path, "--out", out) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and len(err) < 400, err
    assert not out.exists()


def test_a_model_that_cannot_run_a_forward_is_a_config_error():
    from plumage_ds.config import ConfigError, ModelConfig
    from plumage_ds.train.model import probe_forward

    class Broken(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(3, 4))

        def forward(self, input_ids):
            assert not self.training  # probed in eval mode: no dropout draws
            return input_ids.float() @ self.w  # (1, n) @ (3, 4): the shapes do not fit

    model = Broken()
    with pytest.raises(ConfigError, match=r"^Invalid model=\{'n_head': 3\}: the model cannot run a forward pass \(RuntimeError: "):
        probe_forward(model, ModelConfig(fields={"n_head": 3}), seq_len=32)
    assert model.training


BAD_ARGS = [
    (["--set", "optimizer.rank=0"], "Invalid optimizer.rank=0: must be a positive integer"),
    (["--set", "optimizer.estimator=sgd"], "Invalid optimizer.estimator='sgd'"),
    (["--set", "train.bogus=1"], "Unknown config key 'train.bogus'"),
    (["--set", "nosection.x=1"], "unknown config section 'nosection'"),
    (["--set", "optimizer.rank"], "expected section.key=value"),
    (["--set", "optimizer.target_modules=*attn"], "Invalid --set optimizer.target_modules='*attn': not a YAML value"),
    (["--set", "optimizer.target_modules='*attn'"], "Invalid optimizer.target_modules='*attn': not a valid regex"),
    (["--steps", "0"], "Invalid --steps=0"),
    (["--steps", "x"], "argument --steps: invalid int value: 'x'"),
    (["--engine", "fsdp"], "Invalid train.engine='fsdp'"),
    (["--engine", "ddp", "--deepspeed", "x.json"], "Invalid --engine='ddp': conflicts with --deepspeed"),
    (["--deepspeed", "/no/such.json"], "Invalid train.deepspeed_config='/no/such.json': no such file"),
    (["--overwrite", "--resume"], "not allowed with argument"),
    (["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
]


@pytest.mark.parametrize("extra, message", BAD_ARGS, ids=[m[:40] for _, m in BAD_ARGS])
def test_bad_flags_and_overrides_exit_2_one_line(tmp_path, tiny_config_path, extra, message, capsys):
    out = tmp_path / "o"
    assert run_main("train", "--config", tiny_config_path, "--out", out, *extra) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_missing_config_and_subcommand(tmp_path, capsys):
    assert run_main("train", "--out", tmp_path / "o") == 2
    assert "Invalid --config=None: required" in capsys.readouterr().err
    assert run_main() == 2
    assert "required: command" in capsys.readouterr().err
    assert run_main("train", "--config", tmp_path / "none.yaml", "--out", tmp_path / "o") == 2
    assert "Invalid config path=" in capsys.readouterr().err


def test_overrides_and_steps_shortcut(tiny_config_path):
    cfg = load_job_config(
        str(tiny_config_path),
        ["optimizer.lr=1e-2", "optimizer.betas=[0.8, 0.9]", "optimizer.estimator=galore", "data.path=null",
         "model.num_hidden_layers=1"],
        steps=3,
    )  # fmt: skip
    assert cfg.optimizer.lr == 0.01 and isinstance(cfg.optimizer.lr, float)
    assert cfg.optimizer.betas == (0.8, 0.9) and cfg.optimizer.estimator == "galore"
    assert cfg.train.steps == 3 and cfg.data.path is None and cfg.model.fields["num_hidden_layers"] == 1
    base = load_config(tiny_config_path)
    assert apply_overrides(base, []) == base


@pytest.mark.parametrize("text, value", [("1e-3", 1e-3), ("3", 3), ("-2.5E2", -250.0), ("gram", "gram"), ("true", True)])
def test_parse_value(text, value):
    got = parse_value(text)
    assert got == value and type(got) is type(value)


def test_local_rank_is_accepted_and_ignored():
    from plumage_ds.cli import _build_parser

    args = _build_parser().parse_args(["--local_rank=1", "train", "--config", "c", "--out", "o", "--local_rank", "0"])
    assert args.command == "train" and args.deepspeed is None


def test_engine_table_of_the_docs_is_what_the_engines_accept(tmp_path, repo_root, tiny_config_path):
    """docs/main-job.md's engine table lists, per engine, exactly the estimators its check accepts."""
    import re

    from plumage_ds.config import ConfigError
    from plumage_ds.train.loop import check_job

    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    names = set(estimator_names())
    section = (repo_root / "docs" / "main-job.md").read_text().split("## Engines")[1].split("\n## ")[0]
    rows = re.findall(r"^\| (`\w+`[^|]*) \| [^|]+ \| [^|]+ \| ([^|]+) \|$", section, re.M)
    documented = {}
    for engines, cell in rows:
        cell = cell.strip()
        listed = names if cell == "all six" else names - {"gum"} if cell == "all but gum" else set(cell.split(", "))
        assert listed <= names, cell
        documented.update({e: listed for e in re.findall(r"`(\w+)`", engines)})
    assert set(documented) == {"local", "ddp", "ddp_hook", "sharded", "deepspeed", "fsdp2", "hsdp"}
    for engine, listed in documented.items():
        accepted = set()
        for est in names:
            sets = [f"train.engine={engine}", f"optimizer.estimator={est}"]
            sets += [f"train.deepspeed_config={ds_json}"] if engine == "deepspeed" else []
            try:
                check_job(load_job_config(str(tiny_config_path), sets), world_size=1 if engine == "local" else 2)
                accepted.add(est)
            except ConfigError as err:
                assert "not available on train.engine" in str(err), err
        assert accepted == listed, engine


# --------------------------------------------------------------------------- schedule, compare, plot


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
               "optimizer_state_bytes": 1000, "tokens_per_s": 50.0}  # fmt: skip
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def test_compare_gap_closed(tmp_path, tiny_config_path, capsys):
    runs = [("adamw", 2.0, "train.num_threads=1"), ("galore", 3.0, "optimizer.rank=2"), ("plumage", 2.6, "optimizer.lr=0.1")]
    dirs = [_fake_run(tmp_path / e, tiny_config_path, e, loss, s) for e, loss, s in runs]
    rows, warnings = compare_rows(dirs)
    gaps = {r["estimator"]: r["gap_closed"] for r in rows}
    assert gaps == {"adamw": 1.0, "galore": 0.0, "plumage": pytest.approx(0.4)}
    assert [r["vs_galore"] for r in rows] == [pytest.approx(-1.0), 0.0, pytest.approx(-0.4)]
    assert warnings == []
    assert run_main("compare", *dirs) == 0
    out = capsys.readouterr().out
    assert "40.0%" in out and "plumage" in out
    other = _fake_run(tmp_path / "haar", tiny_config_path, "haar", 2.9, "train.steps=11")
    assert any("not like-for-like" in w for w in compare_rows(dirs + [other])[1])
    older = _fake_run(tmp_path / "older", tiny_config_path, "haar", 2.9)  # written before data.eval_split existed
    summary = json.loads((older / "summary.json").read_text())
    del summary["config"]["data"]["eval_split"]
    (older / "summary.json").write_text(json.dumps(summary))
    assert compare_rows(dirs + [older])[1] == []
    assert gap_closed(1.0, galore=2.0, adamw=2.0) is None
    inverted = [_fake_run(tmp_path / f"inv-{e}", tiny_config_path, e, loss) for e, loss in [("adamw", 3.0), ("galore", 2.0)]]
    rows, warnings = compare_rows(inverted)
    assert [r["gap_closed"] for r in rows] == [None, None]
    assert [r["vs_galore"] for r in rows] == [1.0, 0.0]
    assert any("not better than galore" in w and "not shown" in w for w in warnings)
    capsys.readouterr()
    assert run_main("compare", *inverted) == 0
    out = capsys.readouterr().out
    assert "%" not in out and "+1.0000" in out and "+0.0000" in out and "-0.0000" not in out and "warning: adamw" in out
    assert run_main("compare", tmp_path / "missing") == 2


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_plot_writes_png(tmp_path, tiny_config_path, capsys, umask_022):
    import stat
    import struct

    for est in ("adamw", "plumage"):
        argv = ["train", "--config", tiny_config_path, "--out", tmp_path / est, "--steps", "4", "--no-progress",
                "--set", f"optimizer.estimator={est}", "--set", "optimizer.update_interval=2", "--set", "train.save_interval=4"]  # fmt: skip
        assert run_main(*argv) == 0
    png = tmp_path / "fig" / "runs.png"
    assert run_main("plot", tmp_path / "adamw", tmp_path / "plumage", "--out", png) == 0
    # every file the job writes is readable by the group and others under umask 022, every directory searchable
    run = tmp_path / "plumage"
    written = [png, *(p for p in run.rglob("*"))]
    assert len(written) > 15 and (run / "checkpoints" / "step_00000004" / "MANIFEST.json") in written
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in written}
    assert modes == {k: 0o755 if (tmp_path / k).is_dir() else 0o644 for k in modes}
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 800 and height > 300
    from PIL import Image

    Image.open(png).verify()
    from plumage_ds.train.plot import refresh_steps

    assert refresh_steps(read_run(tmp_path / "plumage")[2]["config"], 4) == [0, 2]
    assert refresh_steps(read_run(tmp_path / "adamw")[2]["config"], 4) == []
    capsys.readouterr()
    assert run_main("plot", tmp_path / "nope", "--out", png) == 2
    assert "needs summary.json" in capsys.readouterr().err
    assert run_main("plot", tmp_path / "adamw", "--out", tmp_path / "x.jpg") == 2
