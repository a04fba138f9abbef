"""``benchmarks/quality.py`` end to end on ``configs/tiny.yaml``: sweep, seeds, table, PNG, resume."""

from __future__ import annotations

import json
import math
import re

import pytest


@pytest.fixture(scope="module")
def quality(load_benchmark):
    return load_benchmark("quality")


def test_harness_end_to_end_and_resume(quality, tiny_config_path, tmp_path, capsys):
    """2 seeds, 12 steps: a 2-point LR sweep picks PLUMAGE's LR, an ablation arm reuses it, the gap
    closed is 1 for AdamW and 0 for GaLore on every seed, the PNG is written; a rerun starts nothing."""
    out = tmp_path / "q"
    argv = [
        "--config", str(tiny_config_path), "--out", str(out), "--steps", "12", "--seeds", "2", "--jobs", "2",
        "--nice", "0", "--quiet", "--estimators", "adamw,galore,plumage",
        "--lr", "adamw=1e-3", "--lr", "galore=1e-3", "--lr-grid", "plumage=1e-3:3e-3",
        "--arm", "plumage-norealign=plumage,optimizer.realign=false", "--lr-from", "plumage-norealign=plumage",
    ]
    assert quality.main(argv) == 0
    first = capsys.readouterr().out
    assert "9 runs started, 1 reused" in first  # 2 sweep + 4 arms × 2 seeds − the reused sweep run
    res = json.loads((out / "results.json").read_text())["corpora"]["embedded"]
    arms = res["arms"]
    assert set(arms) == {"adamw", "galore", "plumage", "plumage-norealign"}
    assert set(arms["plumage"]["sweep"]) == {"0.001", "0.003"}
    best = min(arms["plumage"]["sweep"], key=arms["plumage"]["sweep"].get)
    assert arms["plumage"]["lr"] == float(best) == arms["plumage-norealign"]["lr"]
    assert arms["galore"]["overrides"] == ["optimizer.svd_method=svd"]
    assert arms["adamw"]["gap_closed"] == [1.0, 1.0] and arms["galore"]["gap_closed"] == [0.0, 0.0]
    assert arms["galore"]["delta_vs_galore"] == [0.0, 0.0]
    for name in ("plumage", "plumage-norealign"):
        assert len(arms[name]["final_eval"]) == 2 and all(math.isfinite(x) for x in arms[name]["final_eval"])
        assert arms[name]["refresh_spike"]["n"] == 2  # refresh at step 6 (step 3 lacks a full window), 2 seeds
    assert arms["plumage"]["final_eval"] != arms["plumage-norealign"]["final_eval"]  # the override took effect
    table = (out / "quality.md").read_text()
    for name in arms:
        assert re.search(rf"^\| {re.escape(name)} \|", table, re.M), table
    png = out / res["png"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    assert quality.main(argv) == 0  # resumable: every run is finished, nothing starts
    assert "0 runs started, 10 reused" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["corpora"]["embedded"]["arms"] == arms
    # a run folder is reused only for the overrides it was made with: a new --set into the same --out is refused
    assert quality.main(argv + ["--set", "optimizer.dense_lr=0.01"]) == 2
    err = capsys.readouterr().err
    assert "was made with other overrides (only there: []; only now: ['optimizer.dense_lr=0.01'])" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--corpus", "bogus"], "Invalid corpus='bogus': must be 'embedded', 'manpages' or 'text:DIR'"),
        (["--arm", "x"], "Invalid --arm 'x': expected NAME=ESTIMATOR"),
        (["--lr-from", "plumage=nope"], "Invalid --lr-from plumage=nope: must name an arm with its own LR"),
        (["--lr", "nope=1e-3"], "Invalid --lr: unknown arm(s) ['nope']"),
        (["--seeds", "2", "--sweep-seeds", "3"], "Invalid --sweep-seeds=3: more than --seeds=2"),
    ],
)
def test_bad_arguments_exit_2(quality, tmp_path, capsys, argv, message):
    assert quality.main(["--out", str(tmp_path), "--quiet", *argv]) == 2
    assert message in capsys.readouterr().err


def test_corpus_overrides_map_text_folders(quality, tiny_config_path, tmp_path):
    """The overrides are valid for the main job's config (applied as its ``--set`` would apply them)."""
    from plumage_ds.cli import apply_overrides
    from plumage_ds.config import load_config

    assert quality.corpus_overrides("embedded", tmp_path) == []
    overrides = quality.corpus_overrides(f"text:{tmp_path}", tmp_path)
    assert overrides == ["data.source=text", f"data.path={tmp_path.resolve()}"]
    cfg = apply_overrides(load_config(tiny_config_path), overrides)
    assert (cfg.data.source, cfg.data.path) == ("text", str(tmp_path.resolve()))


def test_refresh_spikes_pair_against_adamw(quality):
    """A jump of +0.5 right after each refresh (τ = 10) on top of AdamW's curve reads as +0.5."""
    adamw = quality.Outcome("completed", 1.0, train_curve=[(t, 3.0 - 0.01 * t + 0.1 * (t % 3)) for t in range(1, 41)])
    jump = {t for k in (10, 20, 30) for t in range(k + 2, k + 2 + quality.SPIKE_WINDOW)}
    arm = quality.Outcome(
        "completed", 1.0, train_curve=[(t, v + (0.5 if t in jump else 0.0)) for t, v in adamw.train_curve], update_interval=10
    )
    assert quality.refresh_spikes(arm, adamw) == pytest.approx([0.5, 0.5, 0.5])
    assert quality.refresh_spikes(adamw, adamw) == []


def test_dense_lr_sweep_and_grid_extension(quality, tiny_config_path, tmp_path, monkeypatch, capsys):
    """No training: ``Runner.one`` returns a made-up loss with its minimum at matrix LR 4e-3 (every arm) and
    dense LR 2.8e-3. PLUMAGE's grid 1e-3:2e-3 grows to 4e-3 and 8e-3 (best inside); AdamW's 1e-3:2e-3
    grows once (K = 1) and its best stays at the upper edge; the dense grid 4e-3:8e-3 grows down to 2e-3
    and 1e-3 and picks 2e-3. Runs at the base dense LR keep the old folder; the others carry it."""
    made = {}

    def fake_one(self, run, corpus_sets):
        dense = run.dense_lr if run.dense_lr is not None else 0.004
        made[run.dir(self.out).relative_to(self.out).as_posix()] = quality.run_overrides(run, corpus_sets, self.ns.set)
        loss = 1 + 0.1 * math.log2(run.lr / 4e-3) ** 2 + 0.05 * math.log2(dense / 2.8e-3) ** 2 + 0.01 * run.seed
        return quality.Outcome("completed", loss + (0.02 if run.arm.name == "galore" else 0.0))

    monkeypatch.setattr(quality.Runner, "one", fake_one)
    out = tmp_path / "q"
    argv = ["--config", str(tiny_config_path), "--out", str(out), "--steps", "5", "--seeds", "2", "--quiet",
            "--estimators", "adamw,galore,plumage", "--lr-grid", "adamw=1e-3:2e-3", "--lr", "galore=4e-3",
            "--lr-grid", "plumage=1e-3:2e-3", "--arm", "knob=plumage,optimizer.realign=false",
            "--lr-from", "knob=plumage", "--set", "optimizer.dense_lr=0.004", "--dense-lr-grid", "0.004:0.008"]  # fmt: skip
    assert quality.main(argv + ["--extend-grid", "1"]) == 0
    res = json.loads((out / "results.json").read_text())["corpora"]["embedded"]
    arms, dense = res["arms"], res["dense_lr"]
    assert set(arms["plumage"]["sweep"]) == {"0.001", "0.002", "0.004"} and arms["plumage"]["lr_edge"] == "upper edge"
    assert dense["grid"] == [0.002, 0.004, 0.008] and dense["chosen"] == 0.002 and dense["edge"] == "lower edge"

    made.clear()
    assert quality.main(argv + ["--extend-grid", "2"]) == 0
    res = json.loads((out / "results.json").read_text())["corpora"]["embedded"]
    arms, dense = res["arms"], res["dense_lr"]
    assert set(arms["plumage"]["sweep"]) == {"0.001", "0.002", "0.004", "0.008"}
    assert arms["plumage"]["lr"] == 0.004 == arms["knob"]["lr"] and arms["plumage"]["lr_edge"] == "inside"
    assert set(arms["adamw"]["sweep"]) == {"0.001", "0.002", "0.004", "0.008"} and arms["adamw"]["lr_edge"] == "inside"
    assert arms["galore"]["lr"] == 0.004 and "lr_edge" not in arms["galore"]
    assert dense["grid"] == [0.001, 0.002, 0.004, 0.008] and dense["chosen"] == 0.002 and dense["edge"] == "inside"
    assert set(dense["sweep"]["0.002"]) == {"adamw", "galore", "plumage", "mean"}  # arms with their own LR only
    assert dense["best_per_arm"] == {"adamw": 0.002, "galore": 0.002, "plumage": 0.002}
    # folders: matrix sweep at the base dense LR (old layout), the dense sweep's other values and every seed at 2e-3
    assert "embedded/steps=5/plumage/lr=0.008/seed=0" in made
    assert made["embedded/steps=5/adamw/lr=0.004/seed=0"][-1] == "optimizer.dense_lr=0.004"  # the --set, no override
    assert made["embedded/steps=5/galore/dense_lr=0.008/lr=0.004/seed=0"][-1] == "optimizer.dense_lr=0.008"
    for arm in ("adamw", "galore", "plumage", "knob"):
        for seed in (0, 1):
            assert made[f"embedded/steps=5/{arm}/dense_lr=0.002/lr=0.004/seed={seed}"][-1] == "optimizer.dense_lr=0.002"
    assert not any(k.startswith("embedded/steps=5/knob/dense_lr=0.008") for k in made)  # knob arms are not swept
    table = (out / "quality.md").read_text()
    assert re.search(r"^\| plumage \| - \| 0\.004 \(inside\) \|", table, re.M), table
    assert "Chosen: **0.002** (inside; per arm: adamw 0.002, galore 0.002, plumage 0.002)" in table
    per_seed = next(line for line in table.splitlines() if line.startswith("| galore |")).split("|")[6].strip()
    galore = 1.02 + 0.05 * math.log2(2e-3 / 2.8e-3) ** 2  # at its matrix optimum and the chosen dense LR
    assert per_seed == f"{galore:.4f}, {galore + 0.01:.4f}"  # seeds 0 and 1
    capsys.readouterr()
