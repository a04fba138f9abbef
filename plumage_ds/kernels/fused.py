"""The compressed Adam of an ordinary step as one compiled kernel per matrix (``step_impl="compiled"``).

The streamed step (``step_impl="streaming"``) runs the compressed Adam as a chain of ``_foreach``
operations: scale the moments, add the gradient, square it in, take the root, add ``eps``, divide —
and, with a bf16 state, cast the moments to fp32 and back. Each is a pass over the ``(r, l)`` tensors
and, on an accelerator, a kernel launch. :func:`compressed_adam_` is the same arithmetic as one
function, which ``torch.compile`` fuses into one pass that reads ``M, V, R`` once and writes ``M, V``
(in their dtype) and ``N`` once. The streamed step's ``_foreach`` chain is the reference it is
tested against (weights within 1e-6, moments within 1e-5 relative after 8 steps: the compiler may
contract ``a·b + c``).

The constants are 0-dim fp32 tensors, so one compiled graph serves every step, every
hyperparameter and both the ordinary and the skipped-on-the-device step (:func:`adam.skip_constants`);
shapes are dynamic, so one graph serves every matrix shape. Graphs differ only by the moments'
dtype. Pure tensor code: no ``torch.distributed``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor


def compressed_adam_(M: Tensor, V: Tensor, R: Tensor, keep1: Tensor, keep2: Tensor, eps: Tensor,
                     w1: Tensor, w2: Tensor) -> Tensor:
    """In place ``M ← keep1·M + w1·R``, ``V ← keep2·V + w2·R∘R``  # (r, l), fp32 arithmetic, stored in
    ``M``'s and ``V``'s dtype; returns ``N = M'/(√V' + eps)``  # (r, l) fp32, from the unrounded moments.

    ``keep1 = β1``, ``keep2 = β2``, ``w1 = 1 − β1``, ``w2 = 1 − β2`` for a step; ``keep = 1``,
    ``eps = ∞`` and a zeroed ``R`` leave ``M, V`` as they were and give ``N = 0`` (a skipped step).
    The operations of :func:`~plumage_ds.kernels.adam.adam_moments` and
    :func:`~plumage_ds.kernels.adam.adam_direction`, in their order."""
    M32 = M.float() * keep1 + R * w1
    V32 = V.float() * keep2 + R * R * w2
    M.copy_(M32)
    V.copy_(V32)
    return M32 / (V32.sqrt() + eps)


_compiled: Optional[Callable] = None


def compiled_compressed_adam() -> Callable:
    """:func:`compressed_adam_` under ``torch.compile`` (whole graph, dynamic shapes), built once per
    process; compiling happens at its first call for a dtype of the moments."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(compressed_adam_, fullgraph=True, dynamic=True)
    return _compiled


def refuse_under_dispatch_mode() -> None:
    """Raise ``RuntimeError`` when a (non-infrastructure) ``TorchDispatchMode`` is active — ``MemTracker``,
    ``FlopCounterMode``, a debug mode: ``torch.compile`` does not trace under one, so the compiled kernel
    would fail at its first call. A step calls this before it writes anything."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode, is_in_torch_dispatch_mode

    if is_in_torch_dispatch_mode(include_infra_modes=False):
        mode = type(_get_current_dispatch_mode()).__name__
        raise RuntimeError(
            f"step_impl='compiled' cannot run under an active TorchDispatchMode ({mode}): torch.compile "
            "does not trace under one; use step_impl='streaming' while it is active"
        )


def warm_up(dtypes, device: torch.device) -> None:
    """Compile :func:`compiled_compressed_adam` for moments of each dtype in ``dtypes`` on ``device``, on
    scratch tensors: a step calls this before it writes anything, so a compiler failure leaves the
    parameters and the state as they were. Raises ``RuntimeError`` naming the cause."""
    fused = compiled_compressed_adam()
    one = torch.ones((), dtype=torch.float32, device=device)
    for dtype in dtypes:
        M, V = torch.zeros(2, 3, dtype=dtype, device=device), torch.zeros(2, 3, dtype=dtype, device=device)
        try:
            fused(M, V, torch.zeros(2, 3, device=device), one, one, one, one, one)
        except Exception as exc:  # the compiler's own errors have no common base class
            raise RuntimeError(
                f"step_impl='compiled': torch.compile failed for {dtype} moments on {device} "
                f"({type(exc).__name__}: {exc}); use step_impl='streaming'"
            ) from exc
