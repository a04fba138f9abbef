"""``benchmarks/gpu_quality.sh``: the CPU dry run prints the per-seed table; the 40M point is sized or skipped.

The GPU numbers come from running ``benchmarks/gpu_quality.sh`` on a CUDA machine; the tests never need one.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_quality.py"
DRY_RUN_TIMEOUT_S = 300  # ~10 s on a quiet 2-core machine: four tiny runs of the main job, two at a time


@pytest.fixture(scope="module")
def gpu_quality(load_benchmark):
    return load_benchmark("gpu_quality")


def _row(out: str, first: str) -> list[str]:
    line = next((x for x in out.splitlines() if x.startswith(f"| {first} |")), None)
    assert line is not None, f"no row '| {first} |' in:\n{out[-3000:]}"
    return [c.strip() for c in line.strip("|").split("|")]


def test_cpu_tiny_dry_run_prints_the_per_seed_table(tmp_path, gpu_quality) -> None:
    """The shell wrapper → the harness → the main job on CPU, in a child with a deadline: the 11m point's
    4 default arms on one seed (the full dry run, 2 points × 4 arms × 2 seeds, takes ~1 min on 2 cores;
    the 2-seed table is checked below on made-up losses); the table's Δ and gap closed are recomputed."""
    env = dict(os.environ, PYTHON=sys.executable)
    cmd = ["bash", str(ROOT / "benchmarks" / "gpu_quality.sh"), "--device", "cpu", "--tiny", "--points", "11m",
           "--seeds", "1", "--out", str(tmp_path), "--set", "train.log_interval=2"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=DRY_RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"gpu_quality.sh --device cpu --tiny ran over {DRY_RUN_TIMEOUT_S} s:\n{out[-3000:]}\n{err[-3000:]}")
    assert proc.returncode == 0, err[-4000:]
    assert "gpu_quality on CPU" in out and "## 40m" not in out
    assert "## 11m: tiny widths, seq 32 × batch 4, τ = 3, 6 steps" in out  # τ read back from the runs
    for seed in (0,):
        _, a, g, *rest = _row(out, str(seed))
        a, g = float(a), float(g)
        for x, delta, gap in zip(rest[0:2], rest[2:4], rest[4:6]):  # PLUMAGE, optimal
            x = float(x)
            assert float(delta) == pytest.approx(x - g, abs=1.5e-4)
            if a < g:
                assert gap.endswith("%") and float(gap.split()[0]) == pytest.approx(100 * (g - x) / (g - a), abs=1)
            else:
                assert gap.startswith("n/a")
    saved = json.loads((tmp_path / "gpu_quality.json").read_text())
    point = saved["points"]["11m"]
    assert saved["tiny"] and point["steps"] == 6 and point["seeds"] == [0]
    assert set(point["final_eval"]) == {"adamw", "galore", "plumage", "optimal"}
    runs = sorted(tmp_path.glob("11m/embedded/steps=6/*/lr=*/seed=*/summary.json"))
    assert len(runs) == 4
    for summary in runs:  # the LRs and the dense LR the table names reached every run
        s = json.loads(summary.read_text())
        assert s["status"] == "completed" and s["config"]["optimizer"]["dense_lr"] == gpu_quality.DENSE_LR
        assert s["config"]["model"]["hidden_size"] == 32 and s["config"]["optimizer"]["update_interval"] == 3
        assert s["config"]["train"]["log_interval"] == 2  # --set reached the run


def _fake_results(seeds=(0, 1)):
    losses = {"adamw": [1.00, 1.10], "galore": [1.05, 1.08], "plumage": [1.02, 1.09]}
    return {"seeds": list(seeds), "arms": {a: {"final_eval": v} for a, v in losses.items()}}


@pytest.mark.parametrize(("wall_11m", "expect_steps"), [(300.0, 400), (600.0, None)])
def test_the_40m_point_runs_at_the_steps_that_fit_or_is_skipped(gpu_quality, tmp_path, monkeypatch, capsys,
                                                               wall_11m, expect_steps) -> None:  # fmt: skip
    """The 11M point took ``wall_11m`` s for 1000 steps; the 40M point (3.67× per step) gets what fits
    in the rest of a 510 s budget with a 10 % margin, in hundreds, or is skipped below 300 steps."""
    calls = []

    def fake_run_point(name, steps, ns, quality):
        calls.append((name, steps))
        return _fake_results(), wall_11m if name == "11m" else 1.0

    monkeypatch.setattr(gpu_quality, "run_point", fake_run_point)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # main() sets it for --device cpu; restored afterwards
    argv = ["--device", "cpu", "--out", str(tmp_path), "--budget-s", "510", "--arms", "adamw,galore,plumage"]
    assert gpu_quality.main(argv) == 0
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "gpu_quality.json").read_text())["points"]
    assert calls[0] == ("11m", 1000)
    # the 11m table: seed 0 has AdamW ahead of GaLore (gap closed (1.05 − 1.02)/(1.05 − 1.00) = 60 %), seed 1 not
    assert _row(out, "0")[4:] == ["-0.0300", "60 %"] and _row(out, "1")[5].startswith("n/a")
    assert saved["11m"]["delta"]["plumage"] == pytest.approx([-0.03, 0.01])
    if expect_steps is None:
        assert calls == [("11m", 1000)] and saved["40m"]["skipped"]
        assert re.search(r"## 40m: skipped — 200 steps fit in the 5\d\d s left", out), out
    else:
        assert calls == [("11m", 1000), ("40m", expect_steps)] and saved["40m"]["steps"] == expect_steps


def test_more_arms_get_their_own_columns(gpu_quality) -> None:
    """``--arms adamw,galore,plumage,haar``: each non-reference arm gets its loss, its Δ vs GaLore and its
    gap closed, recomputed here from made-up losses."""
    results = _fake_results()
    results["arms"]["haar"] = {"final_eval": [1.01, 1.07]}
    table, data = gpu_quality.per_seed_table(results, [0, 1], ("adamw", "galore", "plumage", "haar"))
    assert table.splitlines()[0] == ("| seed | AdamW | GaLore | PLUMAGE | Haar | PLUMAGE − GaLore | Haar − GaLore | "
                                     "gap closed (PLUMAGE) | gap closed (Haar) |")  # fmt: skip
    assert _row(table, "0")[1:] == ["1.0000", "1.0500", "1.0200", "1.0100", "-0.0300", "-0.0400", "60 %", "80 %"]
    assert _row(table, "1")[-1].startswith("n/a") and data["delta"]["haar"] == pytest.approx([-0.04, -0.01])


def test_size_steps(gpu_quality) -> None:
    # 0.3 s per 11M step × 3.67 = 1.10 s per 40M step; 0.9 · 510 / 1.10 = 417 → 400
    assert gpu_quality.size_steps(300, 1000, 10_873_728, 39_864_960, 510) == 400
    assert gpu_quality.size_steps(30, 1000, 10_873_728, 39_864_960, 510) == 1000  # capped
    assert gpu_quality.size_steps(300, 1000, 10_873_728, 39_864_960, -5) == 0
    assert gpu_quality.size_steps(0, 0, 1, 1, 100) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_it_fails_clearly(gpu_quality, capsys) -> None:
    assert gpu_quality.main([]) == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and "--device cpu --tiny" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--device", "tpu"], "Invalid --device='tpu': must be 'cuda' or 'cpu'"),
        (["--points", "11m,1b"], "Invalid --points='11m,1b': choose from 11m, 40m"),
        (["--lr", "sgd=1"], "Invalid --lr 'sgd=1': expected ARM=VALUE with ARM in adamw, galore, plumage, optimal"),
        (["--lr", "haar=1"], "Invalid --lr 'haar=1': expected ARM=VALUE with ARM in adamw, galore, plumage, optimal"),
        (["--arms", "adamw,plumage"], "Invalid --arms='adamw,plumage': adamw, galore and at least one of plumage, haar, optimal"),
        (["--arms", "adamw,galore,gum"], "Invalid --arms='adamw,galore,gum': adamw, galore and at least one of"),
    ],
)
def test_bad_arguments_exit_2(gpu_quality, capsys, argv, message) -> None:
    assert gpu_quality.main(argv) == 2
    assert message in capsys.readouterr().err
