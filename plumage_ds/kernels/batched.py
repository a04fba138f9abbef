"""Batched kernels of the optimizer step: same-shape matrices stacked, lists through ``torch._foreach_*``.

Pure tensor code (no ``torch.distributed``). The optimizers, the layouts and the comm hook call these
on lists that hold one tensor per matrix. Elementwise work (weight updates, norms, finiteness; the
Adam arithmetic of :mod:`plumage_ds.kernels.adam`) always goes through ``_foreach`` ops on whole lists. Products and decompositions are stacked per
shape where that pays on the device: on accelerators, where each small kernel costs a launch,
same-shape matrices go through one ``bmm`` / batched ``eigh``; on CPU a ``matmul`` per matrix
costs ~3 µs of overhead and stacking (a copy of every operand) was slower at every size measured
(docs/benchmarks.md, "Hot path"), so CPU keeps one ``matmul`` per matrix and batches only the
``eigh`` of small Gram matrices:

* :func:`matmuls`: ``[A_i @ B_i]``; pairs of the same shapes, dtype and device whose operands
  hold at most :data:`STACK_ELEMENTS` elements each (per device type) are stacked into ``bmm``
  calls of at most :data:`STACK_BATCH_BYTES` of stacked operands;
* :func:`map_stacked`: the same for a batch-capable function (``eigh``, ``svd``);
* :func:`projections`: the compressed gradients ``Pᵀ G_o`` in the precision policy's dtype, fp32 out;
* :func:`apply_lifts`: ``W ← W·(1 − decay) − A B`` in place (``addmm_``, no ``ΔW`` allocated);
* :func:`pack`, :func:`unpack`, :func:`unpack_into`: tensors flattened into one buffer and back
  (every packed collective of the package goes through them);
* :func:`nonfinite_flags`, :func:`sq_norm_sum`: per-tensor "holds NaN/Inf" and ``Σ ‖t‖²`` (float64)
  with one host synchronisation each (in the common case); :func:`nonfinite_mask`,
  :func:`sq_norm_total`: the same left on the device (no synchronisation).

:func:`per_matrix` switches stacking and grouping off (groups of one matrix): the per-matrix
path that the tests compare the batched one against.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Any, Callable, Hashable, Iterator, Optional, Sequence

import torch
from torch import Tensor

STACK_ELEMENTS = {"cpu": 0}
"""Largest operand (elements) of a matrix that is stacked with its peers, per device type.

CPU: 0 (never; measured slower from ``32 × 86`` to ``512 × 1376``, 16 to 256 matrices). Other
devices use :data:`STACK_ELEMENTS_DEFAULT` (``2²²``, 16 MiB of fp32 per operand: launch-bound
kernels below; not yet measured on a GPU — ``benchmarks/gpu_check.sh`` prints both ways)."""
STACK_ELEMENTS_DEFAULT = 1 << 22
DECOMPOSITION_STACK_ELEMENTS = {"cpu": 1 << 12}
"""The same for :func:`map_stacked` (batched ``eigh`` / ``svd``). CPU: up to ``64 × 64`` Gram matrices a
batched ``eigh`` was faster (0.54–0.82× the time of one call per matrix), from ``128 × 128`` on it was
not (0.93–1.31×). Other devices: :data:`STACK_ELEMENTS_DEFAULT`."""
STACK_BATCH_BYTES = 64 << 20
"""Cap on the stacked operands of one ``bmm`` (bounds the transient copy)."""

_PER_MATRIX = False


@contextlib.contextmanager
def per_matrix() -> Iterator[None]:
    """Within the block every group holds one matrix (no stacking, one ``_foreach`` list per tensor)."""
    global _PER_MATRIX
    old, _PER_MATRIX = _PER_MATRIX, True
    try:
        yield
    finally:
        _PER_MATRIX = old


def group_indices(keys: Sequence[Hashable]) -> list[list[int]]:
    """Indices grouped by equal key, in first-appearance order (singletons under :func:`per_matrix`)."""
    if _PER_MATRIX:
        return [[i] for i in range(len(keys))]
    groups: dict = defaultdict(list)
    for i, k in enumerate(keys):
        groups[k].append(i)
    return list(groups.values())


def _stack_limit(device: torch.device, table: Optional[dict] = None) -> int:
    table = STACK_ELEMENTS if table is None else table
    return 0 if _PER_MATRIX else table.get(device.type, STACK_ELEMENTS_DEFAULT)


def matmuls(As: Sequence[Tensor], Bs: Sequence[Tensor], *, dtype: Optional[torch.dtype] = None) -> list[Tensor]:
    """``[A_i @ B_i]`` with small same-shape pairs stacked into ``bmm`` (see the module docstring).

    ``dtype``: the dtype of the products (operands cast to it pair by pair, so the cast of a big
    operand, e.g. a bf16 gradient to fp32, is alive only during its own product; on CUDA a bf16
    product accumulates in fp32). ``None``: the operands' own dtype. The results of a stacked group
    are views of one ``(B, p, q)`` tensor.
    """
    cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))
    if not As or _stack_limit(As[0].device) == 0:
        return [cast(A) @ cast(B) for A, B in zip(As, Bs)]
    out: list = [None] * len(As)
    keys = [(tuple(A.shape), tuple(B.shape), A.dtype, B.dtype, A.device) for A, B in zip(As, Bs)]
    for idx in group_indices(keys):
        A0, B0 = As[idx[0]], Bs[idx[0]]
        biggest = max(A0.numel(), B0.numel())
        if len(idx) == 1 or biggest > _stack_limit(A0.device):
            for i in idx:
                out[i] = cast(As[i]) @ cast(Bs[i])
            continue
        size = (dtype or A0.dtype).itemsize
        per = max(1, STACK_BATCH_BYTES // max(1, (A0.numel() + B0.numel()) * size))
        for start in range(0, len(idx), per):
            part = idx[start : start + per]
            C = torch.bmm(torch.stack([cast(As[i]) for i in part]), torch.stack([cast(Bs[i]) for i in part]))
            for i, c in zip(part, C.unbind(0)):
                out[i] = c
    return out


def projections(As: Sequence[Tensor], Bs: Sequence[Tensor], dtype: torch.dtype = torch.float32) -> list[Tensor]:
    """:func:`matmuls` computed in ``dtype`` (the precision policy's), returned in fp32: the compressed
    gradients ``Pᵀ G_o`` that Adam and the collectives take. Never an fp32 copy of every gradient: a
    bf16 gradient is cast (fp32 policy) or used as it is (bf16 policy) one product at a time."""
    return [R if R.dtype == torch.float32 else R.float() for R in matmuls(As, Bs, dtype=dtype)]


def stack_plan(keys: Sequence[Hashable], numels: Sequence[int], nbytes: Sequence[int], device: torch.device,
               table: Optional[dict] = None) -> list[list[int]]:
    """How same-key items are processed: lists of indices run together as one stack (items of at most
    the device's stack limit of elements, at most :data:`STACK_BATCH_BYTES` per stack), singletons
    otherwise, in first-appearance order."""
    limit = _stack_limit(device, table)
    plan: list[list[int]] = []
    for idx in group_indices(keys):
        if len(idx) == 1 or numels[idx[0]] > limit:
            plan.extend([i] for i in idx)
            continue
        per = max(1, STACK_BATCH_BYTES // max(1, nbytes[idx[0]]))
        plan.extend(idx[start : start + per] for start in range(0, len(idx), per))
    return plan


def map_stacked(fn: Callable[[Tensor], Any], tensors: Sequence[Tensor]) -> list:
    """``[fn(t) for t in tensors]`` where ``fn`` runs once per stack of small same-shape tensors
    (:func:`stack_plan` with :data:`DECOMPOSITION_STACK_ELEMENTS`).

    ``fn`` takes a leading batch dimension and returns a tensor or a tuple of tensors that carry
    it (``torch.linalg.eigh``-like); each item gets its slice (a view).
    """
    out: list = [None] * len(tensors)
    if not tensors:
        return out
    keys = [(tuple(t.shape), t.dtype, t.device) for t in tensors]
    plan = stack_plan(keys, [t.numel() for t in tensors], [t.numel() * t.element_size() for t in tensors],
                      tensors[0].device, DECOMPOSITION_STACK_ELEMENTS)
    for part in plan:
        if len(part) == 1:
            out[part[0]] = fn(tensors[part[0]])
            continue
        res = fn(torch.stack([tensors[i] for i in part]))
        for k, i in enumerate(part):
            out[i] = tuple(x[k] for x in res) if isinstance(res, tuple) else res[k]
    return out


def apply_lifts(params: Sequence[Tensor], As: Sequence[Tensor], Bs: Sequence[Tensor], decays: Sequence[float], *,
                in_weight_dtype: bool = False, skip: Optional[Tensor] = None) -> None:
    """``W ← W·(1 − decay) − A B`` for every target, in place, without materialising ``ΔW = A B``
    where possible: one ``addmm_`` per fp32 weight (``β = 1 − decay``, ``α = −1``: one pass over ``W``);
    small same-shape groups are stacked into one ``bmm`` and subtracted with ``_foreach_sub_`` where
    the device stacks. Other dtypes (bf16): the fp32 math rounded once into ``W`` (an fp32 copy of one
    weight at a time), or with ``in_weight_dtype`` one ``addmm_`` in the weight's dtype (``A, B``
    cast to it; on CUDA the product accumulates in fp32 and is rounded once into ``W``; no copy).

    ``skip`` (a 0-dim bool tensor on the device, nobody reads it on the host): where it holds every
    ``W`` stays as it was — the caller zeroed ``B``, and a decay is undone by selecting the old
    ``W`` (the update out of place: one matrix alive at a time); the same bits where it does not.
    """
    keys = [(tuple(W.shape), tuple(A.shape), W.dtype, W.device, float(d)) for W, A, d in zip(params, As, decays)]
    for idx in group_indices(keys):
        W0 = params[idx[0]]
        decay = float(decays[idx[0]])
        select = skip is not None and decay != 0.0  # the decay must not touch a skipped W
        if W0.dtype != torch.float32 and in_weight_dtype:
            for i in idx:
                A, B = As[i].to(W0.dtype), Bs[i].to(W0.dtype)
                if select:
                    torch.where(skip, params[i], torch.addmm(params[i], A, B, beta=1.0 - decay, alpha=-1.0), out=params[i])
                else:
                    params[i].addmm_(A, B, beta=1.0 - decay, alpha=-1.0)
            continue
        if W0.dtype != torch.float32:
            for i in idx:
                W32 = params[i].float()
                W32.addmm_(As[i].float(), Bs[i].float(), beta=1.0 - decay, alpha=-1.0)
                params[i].copy_(torch.where(skip, params[i], W32, out=W32) if select else W32)
            continue
        if len(idx) > 1 and W0.numel() <= _stack_limit(W0.device):
            W = [params[i] for i in idx]
            if decay:
                keep = 1.0 - decay if skip is None else torch.where(skip, 1.0, 1.0 - decay).to(torch.float32)
                torch._foreach_mul_(W, keep)
            torch._foreach_sub_(W, matmuls([As[i] for i in idx], [Bs[i] for i in idx], dtype=torch.float32))
            continue
        for i in idx:
            if select:
                new = torch.addmm(params[i], As[i].float(), Bs[i].float(), beta=1.0 - decay, alpha=-1.0)
                torch.where(skip, params[i], new, out=params[i])
            else:
                params[i].addmm_(As[i].float(), Bs[i].float(), beta=1.0 - decay, alpha=-1.0)


def nonfinite_flags(tensors: Sequence[Tensor]) -> list[bool]:
    """``[t holds NaN or ±Inf]`` with one host synchronisation in the common case.

    One ``_foreach_norm`` (L2, the fast vectorised one) over every non-empty tensor: a finite norm
    proves the tensor finite. A non-finite norm is either a NaN/Inf element or an overflow of
    ``Σ x²`` (elements beyond ~1e19); those tensors alone are checked element by element.
    """
    live = [i for i, t in enumerate(tensors) if t.numel() > 0]
    flags = [False] * len(tensors)
    if not live:
        return flags
    norms = torch._foreach_norm([tensors[i] for i in live], 2, dtype=torch.float32)
    for i, ok in zip(live, torch.isfinite(torch.stack(list(norms))).tolist()):
        flags[i] = not ok and not bool(torch.isfinite(tensors[i]).all())
    return flags


def nonfinite_mask(tensors: Sequence[Tensor]) -> Tensor:
    """``[t holds NaN or ±Inf]`` as a bool tensor on the tensors' device, no host synchronisation.

    One ``_foreach_norm`` in float64: the sum of squares of fp32 or bf16 values (at most ~1e77 each)
    cannot overflow it, so a non-finite norm is exactly a NaN/Inf element."""
    return ~torch.isfinite(torch.stack(list(torch._foreach_norm(list(tensors), 2, dtype=torch.float64))))


def sq_norm_total(tensors: Sequence[Tensor]) -> Optional[Tensor]:
    """``Σ ‖t‖²`` in float64 as a 0-dim tensor on the tensors' device, no host synchronisation
    (``None`` for a list with nothing in it)."""
    live = [t for t in tensors if t.numel() > 0]
    if not live:
        return None
    return torch.stack(list(torch._foreach_norm(live, 2, dtype=torch.float64))).pow(2).sum()


def sq_norm_sum(tensors: Sequence[Tensor]) -> float:
    """``Σ ‖t‖²`` in float64 (one host synchronisation; 0.0 for an empty list)."""
    total = sq_norm_total(tensors)
    return 0.0 if total is None else float(total)


def pack(tensors: Sequence[Tensor], out: Optional[Tensor] = None, *, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``tensors`` flattened into one 1-D buffer, in order: ``out`` (at least ``Σ numel`` long) or a new one
    (``dtype``: of the buffer, default the first tensor's; empty list: an empty fp32 tensor)."""
    if out is None:
        if not tensors:
            return torch.empty(0, dtype=dtype or torch.float32)
        out = torch.empty(sum(t.numel() for t in tensors), dtype=dtype or tensors[0].dtype, device=tensors[0].device)
    off = 0
    for t in tensors:
        out[off : off + t.numel()].copy_(t.reshape(-1))
        off += t.numel()
    return out


def unpack(flat: Tensor, shapes: Sequence[Sequence[int]]) -> list[Tensor]:
    """Views of ``flat`` shaped as ``shapes``, in order (the inverse of :func:`pack`)."""
    out, off = [], 0
    for shape in shapes:
        n = int(torch.Size(shape).numel())
        out.append(flat[off : off + n].view(*shape))
        off += n
    return out


def unpack_into(flat: Tensor, tensors: Sequence[Tensor]) -> None:
    """Copy consecutive pieces of ``flat`` back into ``tensors`` (the inverse of :func:`pack`, in place)."""
    for t, piece in zip(tensors, unpack(flat, [t.shape for t in tensors])):
        t.copy_(piece)
