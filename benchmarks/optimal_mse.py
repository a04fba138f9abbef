"""Mean-squared error of PLUMAGE, the optimal design and Haar on real mini-batch gradients.

A LLaMA built from a job config (default ``configs/demo.yaml``) is trained with AdamW for
``--at`` steps; at that point ``θ`` the script takes ``--fit + --test`` mini-batch gradients
(independent batches of the training stream, ``θ`` fixed). For every target matrix, with the
oriented gradients ``G_o`` ``(s, l)``:

* **PLUMAGE**: the design ``(U, p ∝ σ)`` of *one* gradient (what a refresh sees), ``ε = uniform_mix``;
* **optimal**: ``(Q, π ∝ √λ(Σ))`` with ``Σ`` the mean of ``G_o G_oᵀ`` over the first ``k`` fit
  gradients (``k = 1`` is PLUMAGE's design);
* **kept in float32**: the same ``Σ`` rounded to float32 after every update (what halving its memory
  would do; the eigenvalue floor stays float64's);
* **kept as k eigenpairs + isotropic** (``sigma_rank = k``, ``k = r`` and ``r/4``): between updates ``Σ``
  is its top ``k`` eigenpairs plus the mean of the other eigenvalues on the complement, ``(s, k+1)``
  floats; the last update, which the design is drawn from, is whole (as in the optimizer);
* **oracle**: the optimal design for the held-out gradients' own second moment (a lower bound);
* **Haar**: uniform on the Stiefel manifold, ``(s/r − 1)‖G‖²``.

The error is **exact** (no sampling): for a design ``(Q, π)`` and a held-out gradient ``G``,
``E_S‖Ĝ − G‖² = Σ_{π_i > 0} (1/π_i − 1)·‖q_iᵀG‖² + Σ_{π_i = 0} ‖q_iᵀG‖²`` (the last sum is the
squared bias of never-sampled directions), averaged over the ``--test`` held-out gradients via
their second moment (:func:`plumage_ds.estimators.expected_error`). Reported: total error over
all target matrices divided by total ``‖G‖²`` (lower is better; Haar is ``s/r − 1``).

    PYTHONPATH=. python benchmarks/optimal_mse.py --at 0 100 --rank 32 --fit 32 --test 32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plumage_ds.config import load_config  # noqa: E402
from plumage_ds.estimators import (  # noqa: E402
    compact_second_moment,
    expected_error,
    is_left,
    optimal_basis,
    optimal_design,
    orient,
    plumage_design,
    second_moment_update,
)
from plumage_ds.targets import lowrank_param_groups  # noqa: E402
from plumage_ds.train.data import BatchStream, load_corpus  # noqa: E402
from plumage_ds.train.model import build_model, causal_lm_loss  # noqa: E402


def gradients(model, stream: BatchStream, targets: list[str], steps: range) -> dict[str, list[torch.Tensor]]:
    """Mini-batch gradients (oriented, float64) of the named matrices at the current ``θ``."""
    params = dict(model.named_parameters())
    out = {n: [] for n in targets}
    for s in steps:
        model.zero_grad(set_to_none=True)
        (x,) = stream.micro_batches(s, 1)
        causal_lm_loss(model, x).backward()
        for n in targets:
            g = params[n].grad.detach().double()
            out[n].append(orient(g, is_left(g.shape)).clone())
    return out


def second_moment(Gs: list[torch.Tensor], kept: torch.dtype = torch.float64, compact: int = 0) -> torch.Tensor:
    """The running mean of ``G_o G_oᵀ`` (each update in float64), kept in ``kept`` between updates
    (``float32``: what a half-size ``Σ`` would be), or low-rank plus isotropic with ``compact`` = k
    eigenpairs between updates (the last update, which the design is drawn from, is whole)."""
    Sigma = None
    for k, G in enumerate(Gs):
        if compact and Sigma is not None:
            Sigma = compact_second_moment(*optimal_basis(Sigma), compact)
        Sigma = second_moment_update(Sigma, G, 1.0 / (k + 1)).to(kept)
    return Sigma.double()


def measure(fit: dict, test: dict, rank: int, ks: list[int], mixes: list[float]) -> dict[str, float]:
    """Total exact error / total ‖G‖² over matrices, per design."""
    err: dict[str, float] = {}
    norm = 0.0
    for name, Gs in fit.items():
        M = second_moment(test[name])  # (s, s): mean of G Gᵀ over held-out gradients
        s = M.shape[0]
        r = min(rank, s)
        norm += float(torch.trace(M))

        def add(key: str, Q, p) -> None:
            err[key] = err.get(key, 0.0) + expected_error(Q, p, M)

        err["haar"] = err.get("haar", 0.0) + (s / r - 1.0) * float(torch.trace(M))
        for eps in mixes:
            U, p = plumage_design(Gs[0], r, svd_method="gram", uniform_mix=eps)
            add(f"plumage (one gradient, ε={eps:g})", U.double(), p)
        for k in ks:
            for eps in mixes:
                Q, pi = optimal_design(second_moment(Gs[:k]), r, uniform_mix=eps)
                add(f"optimal (Σ of {k} gradients, ε={eps:g})", Q, pi)
            Q, pi = optimal_design(second_moment(Gs[:k], torch.float32), r)
            add(f"optimal (Σ of {k} gradients kept in float32, ε=0)", Q, pi)
            for label, c in (("r", r), ("r/4", max(1, r // 4))):
                if k > 1 and c <= s - 2:
                    Q, pi = optimal_design(second_moment(Gs[:k], compact=c), r)
                    add(f"optimal (Σ of {k} gradients kept as {label} eigenpairs + isotropic, ε=0)", Q, pi)
        Q, pi = optimal_design(M, r)
        add("oracle (Σ of the held-out gradients)", Q, pi)
    return {k: v / norm for k, v in err.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"))
    ap.add_argument("--at", type=int, nargs="+", default=[0, 100], help="AdamW steps before measuring")
    ap.add_argument("--rank", type=int, nargs="+", default=[32])
    ap.add_argument("--fit", type=int, default=32, help="gradients averaged into Σ (the largest k)")
    ap.add_argument("--test", type=int, default=32, help="held-out gradients the error is measured on")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ns = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config(ns.config)
    corpus = load_corpus(cfg.data)
    stream = BatchStream(corpus, cfg.data, seed=ns.seed)
    model = build_model(cfg.model, seed=ns.seed)
    groups, _ = lowrank_param_groups(model, target_modules=cfg.optimizer.target_modules, rank=max(ns.rank))
    targets = [n for g in groups if g.get("lowrank") for n in g["names"]]
    opt = torch.optim.AdamW(model.parameters(), lr=ns.lr)
    ks = sorted({1, 4, 16, ns.fit} & set(range(1, ns.fit + 1)))
    results, done, t0 = {}, 0, time.time()
    for at in sorted(ns.at):
        for s in range(done, at):  # train with AdamW to the measuring point
            opt.zero_grad(set_to_none=True)
            (x,) = stream.micro_batches(s, 1)
            causal_lm_loss(model, x).backward()
            opt.step()
        done = at
        base = 1_000_000 * (at + 1)  # batches the training never used
        fit = gradients(model, stream, targets, range(base, base + ns.fit))
        test = gradients(model, stream, targets, range(base + ns.fit, base + ns.fit + ns.test))
        for rank in ns.rank:
            results[f"step {at}, r={rank}"] = measure(fit, test, rank, ks, [0.0, 0.1])
    model.zero_grad(set_to_none=True)
    keys = list(next(iter(results.values())))
    print(f"{len(targets)} target matrices, {ns.fit} fit + {ns.test} held-out mini-batch gradients, wall {time.time() - t0:.0f} s\n")
    print("| design | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for k in keys:
        print(f"| {k} | " + " | ".join(f"{results[c][k]:.3f}" for c in results) + " |")
    if ns.json:
        Path(ns.json).write_text(json.dumps({"args": vars(ns), "results": results}, indent=2))


if __name__ == "__main__":
    main()
