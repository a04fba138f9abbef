"""The checkpoint half of :class:`~plumage_ds.optim.base.MatrixOptimizer`: save, validate, install.

``state_dict()`` holds tensors and plain scalars only (``torch.load(weights_only=True)`` safe): the
per-parameter state by parameter index (each value as the layout exports it: a clone, a ``DTensor``
for FSDP2 shards), the param groups, and the optimizer's own section. Loading validates everything
first (group count and sizes, every hyperparameter, modes, tensor shapes, finiteness) and only then
replaces the state, so a bad checkpoint leaves the optimizer untouched.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..config import validate_adam_options
from ..distributed.layouts import Entry, is_dtensor, local


class CheckpointMixin:
    """State-dict plumbing shared by the matrix optimizers (their own sections and checks stay theirs)."""

    _state_section = ""  # key of the optimizer's own section in state_dict()
    _state_format = 1
    _projector_keys: tuple = ("P",)  # lowrank state counted as "projectors" by state_bytes()
    _second_moment_keys: tuple = ()  # lowrank state counted as "second_moment" by state_bytes()
    _state_dtypes: dict = {}  # state tensors loaded in another dtype than fp32 (by key)

    def state_bytes(self) -> dict:
        """Optimizer-state bytes held by this rank, measured from the tensors.

        ``projectors``: the targets' projector tensors; ``second_moment``: their gradient
        second moments ``Σ`` (``estimator="optimal"``, on the owner); ``moments``: their other
        state (moments / momentum buffers); ``non_target``: AdamW moments.
        """
        out = {"projectors": 0, "second_moment": 0, "moments": 0, "non_target": 0}
        for e in self._entries:
            for key, t in self.state.get(e.param, {}).items():
                if not torch.is_tensor(t):
                    continue
                nbytes = t.numel() * t.element_size()
                if not e.lowrank:
                    out["non_target"] += nbytes
                elif key in self._projector_keys:
                    out["projectors"] += nbytes
                elif key in self._second_moment_keys:
                    out["second_moment"] += nbytes
                else:
                    out["moments"] += nbytes
        out["total"] = sum(out.values())
        return out

    def _state_dict_with(self, meta: dict) -> dict:
        """``state`` (by parameter index), ``param_groups`` (params as indices), and the optimizer's
        section: ``meta`` followed by ``world_size``, ``rank``, ``ownership``, ``modes``, ``skipped_steps``."""
        layout = self._layout
        meta = {
            **meta,
            "world_size": layout.world_size,
            "rank": layout.rank,
            "ownership": self.ownership(),
            "modes": [e.mode for e in self._entries],
            "skipped_steps": self.skipped_steps,
        }
        state = {}
        for e in self._entries:
            st = self.state.get(e.param)
            if st:
                state[e.index] = {k: layout.export_state(e, k, v) for k, v in st.items()}
        groups = []
        index = {id(e.param): e.index for e in self._entries}
        for g in self.param_groups:
            groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"})
            groups[-1]["params"] = [index[id(p)] for p in g["params"]]
        return {"state": state, "param_groups": groups, self._state_section: meta}

    def _check_saved_groups(self, state_dict: dict, keys: tuple[str, ...]) -> tuple[Optional[dict], list]:
        """Checks the optimizer's section format, group count and sizes, and ``keys`` of every group.

        The section may be missing only where the layout's state is symmetric across ranks (FSDP2),
        since ``torch.distributed.checkpoint.state_dict`` keeps only ``state`` and ``param_groups``.
        """
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("Invalid state_dict: expected a mapping with 'state' and 'param_groups'")
        meta = state_dict.get(self._state_section)
        if meta is None and self._entries and self._layout.symmetric_state:
            pass
        elif not isinstance(meta, dict) or meta.get("format") != self._state_format:
            raise ValueError(f"Invalid optimizer state_dict: missing or unknown {self._state_section!r} section")
        groups = state_dict["param_groups"]
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            n = len(groups) if isinstance(groups, list) else type(groups).__name__
            raise ValueError(f"Invalid state_dict: {n} param groups, optimizer has {len(self.param_groups)}")
        for i, (saved, mine) in enumerate(zip(groups, self.param_groups)):
            if not isinstance(saved, dict) or len(saved.get("params", ())) != len(mine["params"]):
                n = len(saved.get("params", ())) if isinstance(saved, dict) else "?"
                raise ValueError(f"Invalid state_dict: group {i} has {n} params, optimizer has {len(mine['params'])}")
            for key in keys:
                if saved.get(key) != mine.get(key):
                    raise ValueError(f"Invalid state_dict: group {i} {key}={saved.get(key)!r}, optimizer has {mine.get(key)!r}")
            self._check_saved_hyperparameters(i, saved)
        return meta, groups

    def _check_saved_hyperparameters(self, i: int, saved: dict) -> None:
        """Every hyperparameter that :meth:`_install_state` would install is validated first."""
        trial = dict(self.param_groups[i])
        for k, v in saved.items():
            if k in ("params", "names"):
                continue
            if k not in trial:
                raise ValueError(f"Invalid state_dict: group {i} has unknown hyperparameter {k!r}")
            trial[k] = tuple(v) if k == "betas" and isinstance(v, list) else v
        try:
            validate_adam_options(lr=trial["lr"], betas=trial["betas"], eps=trial["eps"], weight_decay=trial["weight_decay"])
            self._validate_group(trial)
        except ValueError as err:
            raise ValueError(f"Invalid state_dict: group {i}: {err}") from None

    def _check_saved_modes(self, meta: Optional[dict]) -> None:
        if meta is not None and meta["modes"] != [e.mode for e in self._entries]:
            raise ValueError("Invalid state_dict: matrix modes differ from this optimizer's")

    def _check_saved_layout(self, meta: Optional[dict], *, merged_ok: bool) -> None:
        """An owner-sharded state must come from the same world size and ownership plan (or be merged
        first, where ``merged_ok``); symmetric layouts load any world size."""
        if meta is None or self._layout.symmetric_state or (merged_ok and meta.get("kind") == "full"):
            return
        if meta["world_size"] != self._layout.world_size or meta["ownership"] != self.ownership():
            hint = "; merge all shards with plumage_ds.optim.merge_shards(...) and load the result" if merged_ok else ""
            raise ValueError(
                f"Invalid state_dict: a shard saved for world_size={meta['world_size']} with a different ownership plan{hint}"
            )

    def _saved_entry_states(self, state_dict: dict) -> dict:
        """Saved per-parameter states keyed by entry index.

        Saved states are keyed by whatever ``param_groups[i]["params"]`` lists (indices from
        :meth:`state_dict`, fully qualified names from ``torch.distributed.checkpoint``) and
        matched to this optimizer's parameters by position, as ``torch.optim`` does.
        """
        saved_state = state_dict["state"]
        out = {}
        position = 0
        for saved, _ in zip(state_dict["param_groups"], self.param_groups):
            for key in saved["params"]:
                if key in saved_state:
                    out[self._entries[position].index] = saved_state[key]
                position += 1
        unknown = set(saved_state) - {k for g in state_dict["param_groups"] for k in g["params"]}
        if unknown:
            raise ValueError(f"Invalid state_dict: state for parameters {sorted(map(str, unknown))[:5]} not in any group")
        return out

    def _load_entry_states(self, state_dict: dict, prepare: Callable[[Entry, dict], dict]) -> dict:
        """New ``state`` (by parameter): each saved entry made local, checked by ``prepare``, on the device in
        fp32 (or its dtype in ``_state_dtypes``)."""
        saved = self._saved_entry_states(state_dict)
        new_state: dict = {}
        for e in self._entries:
            st = saved.get(e.index)
            if st is None:
                continue
            if not isinstance(st, dict):
                raise ValueError(f"Invalid state_dict: state of {e.name} is a {type(st).__name__}, expected a mapping")
            st = prepare(e, {k: (local(v) if is_dtensor(v) else v) for k, v in st.items()})
            device = local(e.param).device
            new_state[e.param] = {
                k: (v.to(device=device, dtype=self._state_dtypes.get(k, torch.float32)).clone() if torch.is_tensor(v) else v)
                for k, v in st.items()
            }
        return new_state

    def _install_state(self, new_state: dict, groups: list, meta: Optional[dict] = None) -> None:
        """Replace group hyperparameters (but ``params``/``names``) and the whole state."""
        self._settle()  # a step still pending on the device belongs to the state being replaced
        for g, saved in zip(self.param_groups, groups):
            for k, v in saved.items():
                if k in ("params", "names"):
                    continue
                g[k] = tuple(v) if k == "betas" else v
        self.state.clear()
        for p, st in new_state.items():
            self.state[p] = st
        if meta is not None:
            self.skipped_steps = int(meta.get("skipped_steps", 0))

    @staticmethod
    def _check_state_tensors(e: Entry, st: dict, expect: dict, ints: tuple[str, ...]) -> None:
        """Every key but ``ints`` is expected, a tensor of the expected shape, and finite; ``ints`` are ints >= 0."""
        for key, t in st.items():
            if key in ints:
                if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                    raise ValueError(f"Invalid state_dict: {e.name} {key}={t!r}")
                continue
            if key not in expect:
                raise ValueError(f"Invalid state_dict: unexpected key {key!r} for {e.name}")
            if not torch.is_tensor(t) or tuple(t.shape) != expect[key]:
                shape = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
                raise ValueError(f"Invalid state_dict: {e.name}.{key} has shape {shape}, expected {expect[key]}")
            if not torch.isfinite(t).all():
                raise ValueError(f"Invalid state_dict: {e.name}.{key} holds non-finite values")
