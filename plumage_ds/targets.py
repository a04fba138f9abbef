"""Which matrices are low-rank targets: one selection rule for every optimizer, engine and hook.

``target_modules`` names the modules whose 2-D weights become targets:

* ``None`` — :data:`DEFAULT_TARGET_MODULES`: the attention and MLP matrices of LLaMA / Mistral /
  Qwen, GPT-2, BERT / RoBERTa, T5 and ViT naming; never embeddings, norms or output heads;
* ``"all-linear"`` — every ``nn.Linear`` and GPT-2 ``Conv1D`` inside the model's repeated blocks
  (the elements of an ``nn.ModuleList``), never the input/output embeddings or the output head;
* one regex string, or a list of them — a module is selected when ``re.search`` finds a pattern
  in its qualified name (a list may also hold ``"all-linear"``: the union).

A parameter reachable under several names (tied weights: GPT-2's ``wte`` and ``lm_head``, BERT's
word embeddings and MLM decoder, T5's ``shared`` and ``lm_head``) is ONE tensor: it is listed
once, under its names joined with ``|``, and it is selected when any of its modules is. A
selection that matches no module raises ``ValueError`` listing the model's module names.

Orientation: the optimizers project a matrix's short side, decided by the stored shape. GPT-2's
``Conv1D`` stores ``Wᵀ`` (``(in, out)``); for a non-square weight the short side is the same
dimension of ``W`` either way, so the update is the transpose of the one an ``nn.Linear`` holding
``W`` would get. For a square ``Conv1D`` weight the projected side is ``W``'s input side (for
``nn.Linear``: its output side); both are unbiased.

Pure module inspection: no collectives.
"""

from __future__ import annotations

import re
from typing import Any, Optional

from torch import Tensor, nn

from .estimators import oriented_shape

ALL_LINEAR = "all-linear"
_ALL_LINEAR_SPELLINGS = ("all-linear", "all_linear")

DEFAULT_TARGET_MODULES: tuple[str, ...] = (
    # LLaMA / Mistral / Qwen / Gemma, and ViT in transformers >= 5: attention and MLP projections
    r"(^|\.)(self_attn|attention|attn)\.(q_proj|k_proj|v_proj|o_proj|qkv_proj)$",
    r"(^|\.)mlp\.(gate_proj|up_proj|down_proj|gate_up_proj|fc1|fc2)$",
    # GPT-2 (Conv1D modules)
    r"(^|\.)attn\.(c_attn|q_attn|c_proj)$",
    r"(^|\.)mlp\.(c_fc|c_proj)$",
    # BERT / RoBERTa, and ViT before transformers 5
    r"(^|\.)attention\.(self|attention)\.(query|key|value)$",
    r"(^|\.)attention\.output\.dense$",
    r"(^|\.)layer\.\d+\.(intermediate|output)\.dense$",
    # T5
    r"(^|\.)(SelfAttention|EncDecAttention)\.(q|k|v|o)$",
    r"(^|\.)DenseReluDense\.(wi|wi_0|wi_1|wo)$",
)
"""Regexes of the default selection (module names, ``re.search``)."""

_LISTED_MODULES = 40  # module names shown in a "selected nothing" error


def _shape(p: Tensor) -> tuple:
    """Logical shape (``ds_shape`` when a ZeRO-3 placeholder)."""
    return tuple(getattr(p, "ds_shape", p.shape))


class _Selection:
    """A parsed ``target_modules``: compiled regexes, the all-linear flag and its text for messages."""

    def __init__(self, target_modules: Any) -> None:
        if target_modules is None:
            entries: list = list(DEFAULT_TARGET_MODULES)
            self.text = "None (the default selection)"
        elif isinstance(target_modules, str):
            entries = [target_modules]
            self.text = repr(target_modules)
        elif isinstance(target_modules, (list, tuple)):
            entries = list(target_modules)
            self.text = repr(entries)
            if not entries:
                raise ValueError("Invalid target_modules=[]: give regexes, 'all-linear', or None for the default")
        else:
            raise ValueError(
                f"Invalid target_modules={target_modules!r}: must be a regex string, a list of regexes, "
                "'all-linear', or None for the default"
            )
        self.all_linear = False
        self.patterns: list[re.Pattern] = []
        for t in entries:
            if not isinstance(t, str):
                raise ValueError(f"Invalid target_modules entry {t!r}: must be a regex string")
            if t in _ALL_LINEAR_SPELLINGS:
                self.all_linear = True
                continue
            try:
                self.patterns.append(re.compile(t))
            except re.error as err:
                raise ValueError(f"Invalid target_modules entry {t!r}: not a regex ({err})") from None


def _is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or transformers' ``Conv1D`` (GPT-2; weight stored as ``(in, out)``)."""
    if isinstance(module, nn.Linear):
        return True
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def _block_prefixes(model: nn.Module) -> list[str]:
    """``"<list>.<i>."`` for every element of every ``nn.ModuleList`` (the repeated blocks)."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            out.extend(f"{name}.{i}." if name else f"{i}." for i in range(len(module)))
    return out


def _embedding_tensors(model: nn.Module) -> set[int]:
    """``id`` of the input/output embedding tensors (``get_input_embeddings``/``get_output_embeddings``)."""
    out: set[int] = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        if not callable(fn):
            continue
        try:
            module = fn()
        except (NotImplementedError, AttributeError):
            continue
        if isinstance(module, nn.Module):
            out.update(id(p) for p in module.parameters())
    return out


class _Tensor:
    """One distinct trainable tensor: its names (first = ``named_parameters()``'s) and module names."""

    def __init__(self, param: Tensor) -> None:
        self.param = param
        self.names: list[str] = []
        self.modules: list[str] = []

    @property
    def name(self) -> str:
        return "|".join(self.names)


def _distinct_tensors(model: nn.Module) -> list[_Tensor]:
    """Trainable tensors in ``named_parameters()`` order, each once with all its names."""
    seen: dict[int, _Tensor] = {}
    for full, p in model.named_parameters(remove_duplicate=False):
        if not p.requires_grad:
            continue
        t = seen.setdefault(id(p), _Tensor(p))
        t.names.append(full)
        t.modules.append(full.rpartition(".")[0])
    return list(seen.values())


def _match(model: nn.Module, tensors: list[_Tensor], sel: _Selection) -> dict[int, str]:
    """``id(param) -> why it is selected`` for the tensors the selection matches (any of their names)."""
    linear_modules: set[str] = set()
    excluded: set[int] = set()
    if sel.all_linear:
        blocks = _block_prefixes(model)
        if not blocks:
            raise ValueError(
                "target_modules='all-linear' needs the model's repeated blocks in an nn.ModuleList (as transformers "
                f"models have); {type(model).__name__} has none: give regexes instead"
            )
        excluded = _embedding_tensors(model)
        for name, module in model.named_modules(remove_duplicate=False):
            if _is_linear(module) and any(name.startswith(b) for b in blocks):
                linear_modules.add(name)
    matched: dict[int, str] = {}
    for t in tensors:
        for module in t.modules:
            hit = next((pat.pattern for pat in sel.patterns if pat.search(module)), None)
            if hit is not None:
                matched[id(t.param)] = f"module {module!r} matched {hit!r}"
                break
            if module in linear_modules and id(t.param) not in excluded:
                matched[id(t.param)] = f"module {module!r}: all-linear"
                break
    return matched


def _nothing_matched(model: nn.Module, sel: _Selection) -> ValueError:
    names = [n for n, m in model.named_modules() if n and any(True for _ in m.parameters(recurse=False))]
    shown = ", ".join(names[:_LISTED_MODULES]) + (f", ... ({len(names) - _LISTED_MODULES} more)" if len(names) > _LISTED_MODULES else "")
    return ValueError(
        f"target_modules={sel.text} selected no matrix of the model: it matches none of its modules. "
        f"Modules holding parameters: {shown}"
    )


def _rows(model: nn.Module, target_modules: Any, rank: Optional[int], strict: bool) -> list[dict]:
    """One row per distinct trainable tensor: ``name``, ``param``, ``shape``, ``mode``, ``reason``, ``matched``."""
    sel = _Selection(target_modules)
    tensors = _distinct_tensors(model)
    matched = _match(model, tensors, sel)
    if not matched:
        raise _nothing_matched(model, sel)
    rows = []
    for t in tensors:
        shape = _shape(t.param)
        why = matched.get(id(t.param))
        if why is None:
            mode, reason = "adamw", "module not matched by target_modules"
        elif len(shape) != 2:
            mode, reason = "adamw", f"{len(shape)}-D parameter in a target module"
        elif rank is not None and rank >= oriented_shape(shape)[0]:
            reason = f"{rank=} >= short side {min(shape)} of shape {shape}"
            if strict:
                raise ValueError(f"Matrix {t.name!r} cannot take the low-rank path (strict=True): {reason}")
            mode = "adamw"
        else:
            mode = "lowrank"
            reason = why if rank is None else f"{why}; rank {rank} of short side {min(shape)}"
        rows.append({"name": t.name, "param": t.param, "shape": list(shape), "mode": mode, "reason": reason,
                     "matched": why is not None})
    if not any(r["mode"] == "lowrank" for r in rows):
        reasons = "; ".join(f"{r['name']}: {r['reason']}" for r in rows if r["matched"])
        raise ValueError(f"target_modules={sel.text} selected no matrix that can take the low-rank path ({reasons})")
    return rows


def select_targets(
    model: nn.Module, target_modules: Any = None, *, rank: Optional[int] = None
) -> list[tuple[str, Tensor, str]]:
    """The target matrices of ``model``: ``[(name, param, reason)]`` in ``named_parameters()`` order.

    Every matched trainable 2-D tensor, once (tied names joined with ``|``); with ``rank``, only
    those whose short side exceeds it. Raises ``ValueError`` when ``target_modules`` matches no
    module (the message lists the model's modules) or no matched matrix qualifies. The
    optimizers' :func:`lowrank_param_groups` and the DDP comm hook share this rule.
    """
    return [(r["name"], r["param"], r["reason"]) for r in _rows(model, target_modules, rank, False) if r["mode"] == "lowrank"]


def lowrank_param_groups(
    model: nn.Module,
    *,
    target_modules: Any = None,
    rank: int,
    strict: bool = False,
    **lowrank_overrides,
) -> tuple[list[dict], list[dict]]:
    """Split ``model``'s trainable tensors into a low-rank and a dense group (each tensor once).

    Returns ``(groups, report)``: ``groups`` for :class:`PlumageAdamW` (or :class:`GUM`), each
    with ``names``; ``report`` one row per distinct tensor ``{"name", "shape", "mode", "reason"}``
    (mode ``"lowrank"`` or ``"adamw"``; the optimizer's :meth:`matrix_report` later names the
    estimator). ``target_modules``: see the module docstring.

    Raises ``ValueError`` when the selection matches no module, or when no matched matrix can
    take the low-rank path; ``strict=True`` also raises for any matched matrix that cannot
    (``rank >= short side``).
    """
    rows = _rows(model, target_modules, rank, strict)
    groups = []
    for lowrank in (True, False):
        part = [r for r in rows if (r["mode"] == "lowrank") == lowrank]
        if part:
            extra = {"lowrank": True, "rank": rank, **lowrank_overrides} if lowrank else {"lowrank": False}
            groups.append({"params": [r["param"] for r in part], "names": [r["name"] for r in part], **extra})
    report = [{k: r[k] for k in ("name", "shape", "mode", "reason")} for r in rows]
    return groups, report


def named_groups(params: Any, target_modules: Any = None) -> list:
    """``params`` as ``torch.optim`` takes them, with ``model.named_parameters()`` understood.

    An iterable of ``(name, tensor)`` pairs becomes named groups split by ``target_modules`` (the
    default selection unless given, matched against each name's module part, ``re.search``): the
    matched tensors in one group (every matched matrix is a target), the rest in a dense group
    (``lowrank=False``). A group whose ``params`` are pairs gets its ``names`` from them (the
    group's own ``lowrank`` decides). Anything else is returned as a list, unchanged
    (``model.parameters()``: every 2-D tensor is a target, rows named ``param{i}``).
    """
    if isinstance(params, Tensor):
        return [params]
    items = list(params)
    if items and all(_is_pair(x) for x in items):
        sel = _Selection(target_modules)
        if sel.all_linear:
            raise ValueError(
                "Invalid target_modules='all-linear' with named parameters: it needs the model's blocks; "
                "use lowrank_param_groups(model, target_modules='all-linear')"
            )
        hit = [any(p.search(n.rpartition(".")[0]) for p in sel.patterns) for n, _ in items]
        if not any(hit):
            shown = ", ".join(n for n, _ in items[:_LISTED_MODULES]) + (", ..." if len(items) > _LISTED_MODULES else "")
            raise ValueError(
                f"target_modules={sel.text} selected none of the {len(items)} named parameters ({shown}); "
                "pass target_modules= regexes that match their module names"
            )
        groups = [{"params": [p for (_, p), h in zip(items, hit) if h], "names": [n for (n, _), h in zip(items, hit) if h]}]
        if not all(hit):
            groups.append({"params": [p for (_, p), h in zip(items, hit) if not h],
                           "names": [n for (n, _), h in zip(items, hit) if not h], "lowrank": False})
        return groups
    if target_modules is not None:
        raise ValueError(
            f"Invalid target_modules={target_modules!r}: it selects by name, so it needs model.named_parameters(); "
            "with parameters or groups, choose the targets in the groups (lowrank_param_groups(model, target_modules=...))"
        )
    out = []
    for x in items:
        if isinstance(x, dict) and x.get("params") is not None and not isinstance(x["params"], Tensor):
            pairs = list(x["params"])
            if pairs and all(_is_pair(q) for q in pairs):
                x = {**x, "params": [p for _, p in pairs], "names": [n for n, _ in pairs]}
            else:
                x = {**x, "params": pairs}
        out.append(x)
    return out


def _is_pair(x: Any) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) and isinstance(x[1], Tensor)
