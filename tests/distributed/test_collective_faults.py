"""Collective failure semantics on 2 gloo ranks (docs/reliability.md): nothing half-applied, nobody waits forever.

One spawned job runs the scenarios that leave the process group healthy; the collective timeout,
which leaves collectives unmatched on purpose, runs in its own job. Checked with
``ShardedPlumageAdamW`` (owner-sharded state, compressed reduction; τ = 3):

* NaN on ONE rank at an ordinary and at a refresh step: both ranks skip the step (agreed in the
  step's first small all-reduce), parameters and state bitwise unchanged, and training then
  continues exactly as a run that never saw the bad step; ``nonfinite="raise"``: both ranks
  raise the same error naming the parameter;
* an ``eigh`` that fails on ONE rank (the owner of a matrix) during a refresh: both ranks raise
  the same ``CollectiveStepError`` naming the rank and the matrix, nothing changed, and the next
  healthy step goes through on both;
* ranks built with different parameter shapes, or a different number of parameters: a clear
  ``ValueError`` on both ranks at construction, naming the first difference, within seconds;
* a rank that does not come to the step: the waiting rank raises ``CollectiveTimeoutError``
  naming the collective after ``collective_timeout`` seconds.
"""

from __future__ import annotations

import io
import time
from typing import Optional

import pytest
import torch
import torch.distributed as dist
from torch import nn

from plumage_ds.testing import run_workers

pytestmark = pytest.mark.distributed

KW = dict(lr=1e-2, rank=3, update_interval=3, seed=7, weight_decay=0.05)


def _model(width: int = 20, extra: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(12, width), nn.Tanh(), nn.Linear(width, 8), nn.Tanh(), nn.Linear(8, 24)]
    if extra:
        layers.append(nn.Linear(24, 24))
    return nn.Sequential(*layers)


def _backward(model, step: int, rank: int, poison: bool = False) -> None:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x, y = torch.randn(16, 12, generator=g), torch.randn(16, 24, generator=g)
    ((model(x) - y) ** 2).mean().backward()
    if poison:
        model[2].weight.grad[1, 3] = float("nan")


def _snapshot(model, opt) -> tuple:
    buf = io.BytesIO()
    sd = opt.state_dict()
    sd["plumage"].pop("skipped_steps")
    torch.save(sd, buf)
    return [p.detach().clone() for p in model.parameters()], buf.getvalue()


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a[0], b[0])) and a[1] == b[1]


def _step_error(opt) -> tuple[Optional[str], float]:
    """``(error, seconds)`` of one ``opt.step()``: ``"Type: message"`` of its RuntimeError, or ``None``."""
    t0 = time.perf_counter()
    try:
        opt.step()
        return None, time.perf_counter() - t0
    except RuntimeError as err:
        return f"{type(err).__name__}: {err}", time.perf_counter() - t0


def _run(out, name, fn):
    try:
        out[name] = fn()
    except Exception as err:  # noqa: BLE001 - the error itself is what is checked
        out[name] = {"error": f"{type(err).__name__}: {err}"}
    dist.barrier()


def job(rank: int, world: int) -> dict:
    import plumage_ds.estimators.spectral as spectral
    from plumage_ds.optim import ShardedPlumageAdamW

    out: dict = {}

    def nan_skip(bad_step):
        def fn():
            model, clean_model = _model(), _model()
            opt, clean = ShardedPlumageAdamW(model.parameters(), **KW), ShardedPlumageAdamW(clean_model.parameters(), **KW)
            for s in range(bad_step + 4):
                for m, o in ((model, opt), (clean_model, clean)):
                    if m is clean_model and s == bad_step:
                        continue  # the clean run never sees the bad step
                    o.zero_grad()
                    _backward(m, s, rank, poison=(m is model and s == bad_step and rank == 1))
                    before = _snapshot(m, o) if s == bad_step else None
                    o.step()
                    if before is not None:
                        unchanged = _same(before, _snapshot(m, o))
            same_as_clean = all(torch.equal(p, q) for p, q in zip(model.parameters(), clean_model.parameters()))
            return {"unchanged": unchanged, "same_as_clean": same_as_clean, "skipped": opt.skipped_steps,
                    "names": opt.last_nonfinite}

        return fn

    def nan_raise():
        model = _model()
        opt = ShardedPlumageAdamW(model.parameters(), nonfinite="raise", **KW)
        _backward(model, 0, rank)
        opt.step()
        opt.zero_grad()
        _backward(model, 1, rank, poison=(rank == 0))
        before = _snapshot(model, opt)
        try:
            opt.step()
            return {"error": None}
        except FloatingPointError as err:
            return {"error": str(err), "unchanged": _same(before, _snapshot(model, opt))}

    def failed_refresh():
        model = _model()
        opt = ShardedPlumageAdamW(model.parameters(), **KW)
        for s in range(3):
            opt.zero_grad()
            _backward(model, s, rank)
            opt.step()
        opt.zero_grad()
        _backward(model, 3, rank)  # step 3 refreshes every target
        before = _snapshot(model, opt)
        healthy = spectral.torch.linalg.eigh
        if rank == 0:  # only this rank's SVDs fail
            def broken(*a, **k):
                raise torch.linalg.LinAlgError("eigh failed to converge (injected)")

            spectral.torch.linalg.eigh = broken
        try:
            error, seconds = _step_error(opt)
        finally:
            spectral.torch.linalg.eigh = healthy
        res = {"error": error, "seconds": seconds, "unchanged": _same(before, _snapshot(model, opt)),
               "owners": sorted({r["owner"] for r in opt.matrix_report() if r["mode"] == "plumage"})}
        opt.step()  # the same gradients, healthy eigh everywhere
        res["moved"] = not all(torch.equal(a, b) for a, b in zip(before[0], model.parameters()))
        return res

    def mismatch(**build):
        def fn():
            t0 = time.perf_counter()
            try:
                ShardedPlumageAdamW(_model(**(build if rank == 1 else {})).parameters(), **KW)
                return {"error": None}
            except ValueError as err:
                return {"error": str(err), "seconds": time.perf_counter() - t0}

        return fn

    _run(out, "nan_ordinary", nan_skip(4))
    _run(out, "nan_refresh", nan_skip(3))
    _run(out, "nan_raise", nan_raise)
    _run(out, "failed_refresh", failed_refresh)
    _run(out, "shape", mismatch(width=24))
    _run(out, "count", mismatch(extra=True))
    return out


def timeout_job(rank: int, world: int) -> dict:
    from plumage_ds.optim import ShardedPlumageAdamW

    model = _model()
    opt = ShardedPlumageAdamW(model.parameters(), collective_timeout=1.5, **KW)
    _backward(model, 0, rank)
    before = _snapshot(model, opt)
    if rank == 1:
        time.sleep(4.0)  # late: rank 0 has given up on the step's first collective
    error, seconds = _step_error(opt)
    return {"error": error, "seconds": seconds, "unchanged": _same(before, _snapshot(model, opt))}


@pytest.fixture(scope="module")
def results():
    return run_workers(job, 2)


@pytest.mark.parametrize("scenario", ["nan_ordinary", "nan_refresh"])
def test_nan_on_one_rank_skips_the_step_everywhere(results, scenario):
    for res in results:
        run = res[scenario]
        assert "error" not in run, run
        assert run["unchanged"] and run["same_as_clean"], run
        assert run["skipped"] == 1 and run["names"] == ["param2"]


def test_nan_raise_policy_raises_on_every_rank(results):
    for res in results:
        run = res["nan_raise"]
        assert "Non-finite gradient in ['param2']; step not applied" in run["error"] and run["unchanged"]


def test_refresh_failing_on_one_rank_raises_on_both(results):
    errors = [res["failed_refresh"]["error"] for res in results]
    assert errors[0] == errors[1], errors  # the same error, everywhere
    assert errors[0].startswith("CollectiveStepError: ShardedPlumageAdamW step failed (rank 0: refresh of 'param")
    assert "injected" in errors[0] and "parameters and optimizer state are unchanged" in errors[0]
    for res in results:
        run = res["failed_refresh"]
        assert run["owners"] == [0, 1]  # rank 1 owns matrices too: it did not fail, yet raised
        assert run["unchanged"] and run["moved"] and run["seconds"] < 20


@pytest.mark.parametrize("scenario, difference", [
    ("shape", "rank 0 has 'param0: shape (20, 12), plumage', rank 1 has 'param0: shape (24, 12), plumage'"),
    ("count", "rank 0 has '6 parameters in 1 groups', rank 1 has '8 parameters in 1 groups'"),
])  # fmt: skip
def test_mismatched_ranks_fail_clearly_at_construction(results, scenario, difference):
    for res in results:
        run = res[scenario]
        assert run["error"] is not None and run["error"].startswith("Invalid ShardedPlumageAdamW setup: ranks disagree")
        assert difference in run["error"], run["error"]
        assert run["seconds"] < 20


def test_a_rank_that_never_arrives_times_out_naming_the_collective():
    results = run_workers(timeout_job, 2, clean_teardown=False)
    waited = results[0]
    assert waited["error"].startswith("CollectiveTimeoutError: Collective all_reduce 'grad_flags' did not complete on rank 0")
    assert 1.0 < waited["seconds"] < 10 and waited["unchanged"]
    late = results[1]  # its first collective met rank 0's abandoned one; the next found nobody
    assert late["error"].startswith("CollectiveTimeoutError: Collective ") and late["unchanged"]
