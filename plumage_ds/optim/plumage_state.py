""":class:`~plumage_ds.optim.PlumageAdamW`'s checkpoints: its ``state_dict`` section, what a loaded
state must hold per parameter, and :func:`merge_shards` (owner-sharded states of any world size).
"""

from __future__ import annotations

from typing import Any

import torch

from ..distributed.layouts import EVERY_RANK, Entry
from ..estimators.optimal import convert_second_moment, is_second_moment_form, resolve_sigma_rank, second_moment_forms
from ..estimators.registry import get_estimator

_STATE_FORMAT = 1


class PlumageStateMixin:
    """``state_dict`` / ``load_state_dict`` of :class:`PlumageAdamW` (on :class:`~.checkpoints.CheckpointMixin`)."""

    _state_section = "plumage"
    _state_format = _STATE_FORMAT
    _projector_keys = ("P", "d")
    _second_moment_keys = ("Sigma",)
    _state_dtypes = {"Sigma": torch.float64}

    def _holds_sigma(self, e: Entry) -> bool:
        """``optimal`` targets: the owner (the rank that draws ``P``) keeps ``Σ``, in every sharding case."""
        return e.lowrank and get_estimator(e.group["estimator"]).keeps_second_moment and e.owner == self._layout.rank

    def state_dict(self) -> dict:
        """Tensors and plain scalars only (``torch.load(weights_only=True)`` safe).

        ``state[i]`` holds this rank's state of parameter ``i``: replicated weights keep ``P, d``
        on every rank and moments on the owner; under FSDP2 every rank holds its shard of
        ``P``/``M``/``V`` as ``DTensor`` s (``torch.distributed.checkpoint`` reshards them).
        ``optimal``: ``Sigma`` (float64 ``(s, s)``, or ``(s, k+1)`` with ``sigma_rank``) and ``sigma_count`` on the matrix's owner only,
        in every case (plain values: DCP writes them once, the new owner loads them).
        ``plumage`` records the ownership plan and world size.
        """
        return self._state_dict_with({"format": _STATE_FORMAT, "kind": "shard", "seed": self.seed})

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a :meth:`state_dict`; everything is validated before anything changes.

        Owner-sharded (replicated and ZeRO-3) layouts: this rank's shard saved under the same world
        size and ownership plan, or a full state from :func:`merge_shards` (any world size), from
        which each rank keeps the moments it owns. FSDP2: the state this rank gets from
        ``torch.distributed.checkpoint`` (any world size; the ``plumage`` section may be
        absent) or from :meth:`state_dict` on the same layout. Checks: group count and
        sizes, every hyperparameter, modes, ownership, seed, tensor shapes, finiteness. The saved
        hyperparameters are installed (as in ``torch.optim``); an ``optimal`` ``Sigma`` saved whole or
        compact is converted to the form the installed ``sigma_rank`` keeps (so a state saved after
        ``sigma_rank`` changed, before the next refresh, still loads).
        """
        meta, groups = self._check_saved_groups(state_dict, ("rank", "estimator", "lowrank"))
        full = meta is not None and meta.get("kind") == "full"
        self._check_saved_layout(meta, merged_ok=True)
        self._check_saved_modes(meta)
        if meta is not None and meta["seed"] != self.seed:
            raise ValueError(f"Invalid state_dict: seed={meta['seed']}, optimizer has seed={self.seed}")
        layout = self._layout
        saved_group = {id(g): saved for g, saved in zip(self.param_groups, groups)}

        def prepare(e: Entry, st: dict) -> dict:
            if full and not layout.holds_moments(e):  # keep only what this rank owns
                st = {k: v for k, v in st.items() if k not in ("exp_avg", "exp_avg_sq")}
            if full and not self._holds_sigma(e):
                st = {k: v for k, v in st.items() if k not in ("Sigma", "sigma_count")}
            if full and not e.lowrank:  # whole dense moments: keep this rank's piece
                st = {k: layout.chunk_of_full(e, k, v) for k, v in st.items()}
            self._check_entry_state(e, st)
            if "Sigma" in st:  # kept in the form of the sigma_rank being installed (it may differ from the saved form)
                saved = saved_group[id(e.group)]
                k = resolve_sigma_rank(saved.get("sigma_rank", e.group.get("sigma_rank")), saved.get("rank", e.group["rank"]))
                st = dict(st, Sigma=convert_second_moment(st["Sigma"].double(), k))
            return st

        self._install_state(self._load_entry_states(state_dict, prepare), groups, meta)

    def _check_entry_state(self, e: Entry, st: dict) -> None:
        if e.lowrank:
            a, b = e.p_rows
            expect = {"P": (b - a, e.r), "d": (e.r,), "exp_avg": (e.r, e.cols[1] - e.cols[0])}
        else:
            expect = {"exp_avg": self._layout.dense_shape(e)}
        expect["exp_avg_sq"] = expect["exp_avg"]
        if self._holds_sigma(e):  # whole or compact, whatever sigma_rank it was saved under (converted on load)
            S = st.get("Sigma")
            ok = torch.is_tensor(S) and is_second_moment_form(tuple(S.shape), e.s)
            expect["Sigma"] = tuple(S.shape) if ok else second_moment_forms(e.s)
        self._check_state_tensors(e, st, expect, ("step", "sigma_count"))
        if "step" not in st:
            raise ValueError(f"Invalid state_dict: {e.name} has no step")
        if e.lowrank and st["step"] > 0 and not {"P", "d"} <= set(st):
            raise ValueError(f"Invalid state_dict: {e.name} lacks its projector (P, d) after {st['step']} steps")
        if self._layout.holds_moments(e) and st["step"] > 0 and not {"exp_avg", "exp_avg_sq"} <= set(st):
            raise ValueError(f"Invalid state_dict: {e.name} lacks its moments after {st['step']} steps")
        self._check_sigma_state(e, st)

    def _check_sigma_state(self, e: Entry, st: dict) -> None:
        """``optimal``: the owner holds ``Sigma``  # (s, s) or compact (s, k+1) (shape and finiteness checked
        with the rest), symmetric (compact: isotropic part >= 0), with ``sigma_count >= 1``; both or
        neither, and both once a refresh ran."""
        kept = {"Sigma", "sigma_count"} & set(st)
        if not self._holds_sigma(e):
            if kept:
                raise ValueError(
                    f"Invalid state_dict: {e.name} holds {sorted(kept)} but its second moment lives on rank {e.owner} "
                    f"(its owner), not on rank {self._layout.rank}"
                )
            return
        if len(kept) == 1 or (st["step"] > 0 and not kept):
            raise ValueError(
                f"Invalid state_dict: {e.name} lacks its second moment (Sigma and sigma_count) after {st['step']} steps"
            )
        if not kept:
            return
        if st["sigma_count"] < 1:
            raise ValueError(f"Invalid state_dict: {e.name} sigma_count={st['sigma_count']!r}: must be >= 1")
        S = st["Sigma"].double()
        if S.shape[0] != S.shape[1]:  # compact [F | c]: the isotropic part c must be >= 0
            if bool((S[:, -1] < 0).any()):
                raise ValueError(f"Invalid state_dict: {e.name}.Sigma is compact with a negative isotropic part")
            return
        asym = float((S - S.mT).abs().max())
        if asym > 1e-10 * float(S.abs().max()):
            raise ValueError(f"Invalid state_dict: {e.name}.Sigma is not symmetric (max |Σ − Σᵀ| = {asym:.3g})")


def merge_shards(shards: list[dict]) -> dict:
    """Merge the per-rank :meth:`PlumageAdamW.state_dict` shards of one run into a full state.

    Pure (no collectives): read every rank's shard file, merge, and load the
    result on any world size — each rank keeps the moments it owns under its new
    plan. Target matrices come from their owner's shard; the flat chunks of a dense
    parameter (owner ``EVERY_RANK``) are concatenated in rank order into its whole (flat)
    moments. Raises ``ValueError`` if shards are missing, duplicated or disagree.
    """
    if not shards:
        raise ValueError("Invalid shards: empty list")
    metas = [sd.get("plumage") for sd in shards]
    if any(not isinstance(m, dict) or m.get("kind") != "shard" for m in metas):
        raise ValueError("Invalid shards: every element must be a PlumageAdamW shard state_dict")
    world = metas[0]["world_size"]
    ranks = sorted(m["rank"] for m in metas)
    if ranks != list(range(world)):
        raise ValueError(f"Invalid shards: got ranks {ranks} for world_size={world}")
    for m in metas:
        for key in ("ownership", "modes", "seed", "world_size"):
            if m[key] != metas[0][key]:
                raise ValueError(f"Invalid shards: shards disagree on {key!r}")
    by_rank: dict[int, Any] = {m["rank"]: sd for m, sd in zip(metas, shards)}
    state: dict = {}
    for index, owner in enumerate(metas[0]["ownership"]):
        if owner != EVERY_RANK:
            owner_state = by_rank[owner]["state"].get(index)
            if owner_state is not None:
                state[index] = dict(owner_state)
            continue
        pieces = [by_rank[k]["state"].get(index) for k in range(world)]
        if all(p is None for p in pieces):
            continue
        if any(p is None or p.get("step") != pieces[0].get("step") for p in pieces):
            raise ValueError(f"Invalid shards: the chunks of parameter {index} disagree on their step")
        merged = dict(pieces[0])
        for key in ("exp_avg", "exp_avg_sq"):
            if key in merged:
                merged[key] = torch.cat([p[key].reshape(-1) for p in pieces])
        state[index] = merged
    meta = dict(metas[0], kind="full", rank=None, world_size=None, ownership=None)
    return {"state": state, "param_groups": shards[0]["param_groups"], "plumage": meta}
