"""``benchmarks/gpu_check.py``: every part runs as a CPU dry run, and without CUDA it refuses clearly.

The GPU numbers themselves come from running ``benchmarks/gpu_check.sh`` on a CUDA machine; the
test suite never needs one.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check(load_benchmark):
    return load_benchmark("gpu_check")


DRY_RUN_TIMEOUT_S = 240  # ~5 s when healthy; below pytest-timeout (600 s), so a hang prints its stacks


def test_cpu_tiny_dry_run_prints_every_table() -> None:
    """In a child process with a deadline: a hang (the comm hook's async path runs on a gloo
    thread) fails the test with every thread's Python stack instead of stalling the suite."""
    pytest.importorskip("galore_torch")
    proc = subprocess.Popen([sys.executable, "-X", "faulthandler", str(SCRIPT), "--device", "cpu", "--tiny"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=DRY_RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack
        out, err = proc.communicate()
        pytest.fail(f"gpu_check.py --device cpu --tiny hung for {DRY_RUN_TIMEOUT_S} s; stacks:\n{err[-8000:]}")
    assert proc.returncode == 0, err[-4000:]
    for estimator in ("plumage", "galore", "haar", "optimal"):
        for check in ("training on cpu (fp32) vs CPU oracle", "batched vs per-matrix path on cpu",
                      "bf16 weights on cpu vs CPU fp32 oracle (same gradients)"):
            row = next(line for line in out.splitlines() if line.startswith(f"| {estimator}: {check} |"))
            assert row.endswith("| yes |"), row
    for variant in ("plumage", "plumage, int8"):  # the comm hook's async path on one gloo rank
        row = next(line for line in out.splitlines() if line.startswith(f"| comm hook ({variant}): async vs sync path on gloo"))
        assert row.endswith("| yes |"), row
    for check in ("bf16 weights, bf16 compute and state on cpu vs CPU fp32 oracle (same gradients)",
                  "streaming vs staged step on cpu", "compiled vs streaming step on cpu",
                  "host synchronisations in an ordinary streaming step on cpu",
                  "host synchronisations in an ordinary compiled step on cpu"):
        for estimator in ("plumage", "optimal"):
            row = next(line for line in out.splitlines() if line.startswith(f"| {estimator}: {check} |"))
            assert row.endswith("| yes |"), row
    for method in ("adamw", "galore_torch", "plumage", "plumage_bf16", "plumage_bf16_compiled", "optimal_bf16"):
        assert any(line.startswith(f"| {method} | ") for line in out.splitlines()), method
    assert "| state | peak above weights + gradients |" in out
    assert "| Gram eigh: batched / one by one |" in out and "| 16 × 43 |" in out  # the stacking sweep
    whole = out.split("Whole training step")[1].split("(whole step")[0]  # part 4: every optimizer ran
    for method in ("adamw", "galore_torch", "plumage", "plumage_backward_projection"):
        assert f"| {method} | – (CPU) | – |" in whole, method
    job = out.split("The main job")[1]  # part 5: the three estimators through the main job
    for estimator in ("adamw", "galore", "plumage"):
        row = next(line for line in job.splitlines() if line.startswith(f"| {estimator} | "))
        assert float(row.split("|")[2]) > 0, row


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_it_fails_clearly(gpu_check, capsys) -> None:
    assert gpu_check.main([]) == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and "--device cpu --tiny" in err


def test_bad_device_is_rejected(gpu_check, capsys) -> None:
    assert gpu_check.main(["--device", "tpu"]) == 2
    assert "Invalid --device='tpu': must be 'cuda' or 'cpu'" in capsys.readouterr().err
