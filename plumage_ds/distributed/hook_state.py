"""The comm hook's state: its configuration, plan, schedule, per-matrix ``(P, d)`` and checkpoints.

:class:`PlumageHookState` is what :func:`~plumage_ds.distributed.comm_hook.plumage_hook` runs on
(PowerSGD's shape: ``__slots__``, pickles without its process group); the data path and the
collectives are in :mod:`.comm_hook`. The estimator's strategy (:mod:`plumage_ds.estimators.registry`)
decides every per-estimator behaviour; the ownership plan is the optimizers' (:func:`lowrank_load`).
"""

import dataclasses
import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..config import CommHookConfig, ConfigError, OptimizerConfig, check_estimator, from_dict, to_dict
from ..estimators import (
    convert_second_moment, is_refresh, is_second_moment_form, oriented_shape, projection_from_design, refresh_index,
    resolve_sigma_rank, sampler_generator, second_moment_forms,
)
from ..estimators.registry import ESTIMATORS, estimator_names, get_estimator, resolve_svd_method
from ..estimators.rounding import QUANTIZERS
from ..targets import select_targets
from .comm import Collectives
from .ownership import greedy_ownership, lowrank_load

__all__ = ["HOOK_ESTIMATORS", "PlumageHookState", "hook_config"]

HOOK_ESTIMATORS = estimator_names("lowrank_adam")
"""The registry's low-rank estimators; ``galore`` is biased (top-r, ``d = 1``): a baseline knob."""

RESAMPLE_TAG = 1 << 40
"""Offset of the per-step redraws in the ``draw_index`` of :func:`sampler_generator` (the
refresh draws use the refresh index itself), so the two streams never share a seed."""

_ROUNDING_TAG = 0x5EA1

_HOOK_KEYS = tuple(f.name for f in dataclasses.fields(CommHookConfig))
_STATE_FORMAT = 1


def _listed(has) -> str:
    """The low-rank estimators with a property, as ``'a' and 'b'`` (for messages)."""
    names = [repr(n) for n in estimator_names("lowrank_adam") if has(ESTIMATORS[n])]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def hook_config(config=None, **knobs) -> OptimizerConfig:
    """The hook's :class:`OptimizerConfig`: ``config`` (a config, a mapping or ``None``) plus ``knobs``.

    Goes through ``from_dict(OptimizerConfig, ...)``, so a bad key or value gets the same message
    as in the main job's YAML (``Invalid rank=0: must be a positive integer``). The hook's own
    keys (``start_iter``, ``min_compression_rate``, ``resample_interval``, ``quantize``,
    ``async_comm``) may be given as plain keywords; they land in ``comm_hook``. The estimator
    must be a low-rank one (``plumage``, ``galore``, ``haar`` or ``optimal``).
    """
    data = to_dict(config) if isinstance(config, OptimizerConfig) else dict(config or {})
    for key, value in knobs.items():
        if key in _HOOK_KEYS:
            data["comm_hook"] = {**dict(data.get("comm_hook") or {}), key: value}
        else:
            data[key] = value
    cfg = from_dict(OptimizerConfig, data)
    check_estimator(cfg.estimator, family="lowrank_adam")
    return cfg


def _named_trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """``(name, param)`` in DDP's order; names without DDP's ``module.`` prefix."""
    module = getattr(model, "module", model) if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


class PlumageHookState:
    """State of :func:`plumage_hook`: configuration, step counter and per-matrix ``(P, d)``.

    Args:
        model: the DDP-wrapped model (or its module). Parameters are identified by their
            position in ``named_parameters()`` (trainable ones, DDP's order), which is the
            ``param_id`` mixed into every seed; the hook maps ``bucket.parameters()`` to that
            index through the parameter objects, so DDP's bucket rebuild after iteration 1
            changes nothing.
        config: an :class:`~plumage_ds.config.OptimizerConfig` (or a mapping of its keys); the
            hook reads ``estimator`` (``optimal``, the schema's default, ``plumage``, ``galore`` —
            biased, a baseline — or ``haar``),
            ``rank`` (capped at each matrix's short side), ``update_interval`` (steps between
            refreshes of ``P``; for ``haar`` between redraws, 1 = a fresh ``P`` every step),
            ``seed`` (every draw comes from ``sampler_generator(seed, param_id, draw)``),
            ``svd_method`` and ``uniform_mix`` (PLUMAGE: mix ``ε`` of uniform probability into the
            design so no direction has ``p = 0``; that keeps ``E[Ĝ_t] = G_t`` for the gradients
            *between* refreshes too — 0.1 cost no loss in the measurements of ``docs/benchmarks.md``;
            0, the default of the one schema, is the paper's design), ``sigma_rank`` (``optimal``:
            keep ``Σ`` as that many eigenpairs plus an isotropic rest between refreshes; ``None``, the
            default: ``rank``; 0: whole), ``sigma_weight`` (``optimal``: weight of the newest
            refresh gradient in ``Σ``; ``None``: the running mean), and
            ``comm_hook.start_iter`` (warm-up steps with a plain all-reduce) and
            ``comm_hook.min_compression_rate`` (compress a matrix only if ``s / min(rank, s) >=`` it).
        process_group: group to communicate on (``None``: the default group).
        **knobs: config keys given directly (``rank=4``, ``start_iter=0``...), applied over ``config``.
            The hook's own section ``comm_hook`` also holds ``resample_interval`` (``plumage`` /
            ``optimal``: redraw ``S`` every that many steps from the design ``(U, p)`` broadcast at
            the refresh; 0 = one draw per refresh), ``quantize`` (``None``: fp32 coefficients;
            ``"int8"``/``"fp16"``: unbiased stochastic rounding of ``R_k`` onto a shared integer grid,
            1 or 2 bytes per coefficient) and ``async_comm`` (``True``: return DDP a
            Future chained on ``async_op`` all-reduces; ``False``: collectives inside the hook; ``None``:
            asynchronous on NCCL only — :meth:`uses_async`).

    Invariant: every rank holds the same ``iter`` and the same ``(P, d)`` for every matrix, so
    the decompressed gradient is bit-identical across ranks and DDP replicas stay in sync.

    Pickling drops the process group, the collective layer (its byte counters restart) and the
    parameter-object map; after ``pickle.loads`` the group is the default group and
    :meth:`bind` must be called with the (new) model before the hook runs.
    """

    __slots__ = [
        "process_group",
        "estimator",
        "rank",
        "tau",
        "kappa",
        "start_iter",
        "min_compression_rate",
        "seed",
        "svd_method",
        "uniform_mix",
        "resample",
        "quantize",
        "sigma_weight",
        "sigma_rank",
        "async_comm",
        "iter",
        "param_names",
        "param_shapes",
        "projections",
        "designs",
        "sigma",
        "deterministic",
        "targets",
        "skipped_refreshes",
        "_param_index",
        "_collectives",
        "_owners",
    ]

    def __init__(
        self,
        model: torch.nn.Module,
        config=None,
        *,
        process_group: Optional[dist.ProcessGroup] = None,
        **knobs,
    ) -> None:
        cfg = hook_config(config, **knobs)
        self.process_group = process_group
        self.estimator = cfg.estimator
        self.rank = cfg.rank
        self.tau = cfg.update_interval  # refresh interval (estimators that need the gradient)
        hook = cfg.comm_hook
        spec = cfg.spec
        # redraw interval: an estimator that draws P from the seed (haar) draws a new one every
        # update_interval steps (the same knob as in the optimizer); one with a random design
        # (plumage, optimal) redraws S from the kept design every resample_interval steps
        self.kappa = max(1, hook.resample_interval) if spec.needs_gradient else cfg.update_interval
        self.start_iter = hook.start_iter
        self.min_compression_rate = hook.min_compression_rate
        self.seed = cfg.seed
        self.svd_method = resolve_svd_method(cfg.estimator, cfg.svd_method) or "gram"  # haar: unused
        self.uniform_mix = cfg.uniform_mix
        if hook.resample_interval and not spec.redraws:
            raise ConfigError(
                "comm_hook.resample_interval", hook.resample_interval,
                f"only {_listed(lambda e: e.redraws)} keep a design to redraw from, not {cfg.estimator!r}",
            )
        self.resample = hook.resample_interval > 0
        self.quantize = hook.quantize
        self.sigma_weight = cfg.sigma_weight
        self.sigma_rank = resolve_sigma_rank(cfg.sigma_rank, cfg.rank)
        self.async_comm = hook.async_comm
        self.iter = 0
        named = _named_trainable(model)
        if not named:
            raise ValueError("Invalid model: it has no trainable parameters")
        self.param_names = [n for n, _ in named]
        self.param_shapes = [tuple(p.shape) for _, p in named]
        self.projections: dict[int, tuple[int, Tensor, Tensor]] = {}  # pid -> (draw, P (s, r), d (r,))
        self.designs: dict[int, tuple[int, Tensor, Tensor]] = {}  # resample: pid -> (refresh, U (s, s), p (s,))
        self.sigma: dict[int, tuple[int, Tensor]] = {}  # optimal, on the owner: pid -> (count, Σ (s, s) or (s, k+1) fp64)
        self.deterministic: set[int] = set()  # pids whose current PLUMAGE design has no randomness
        # the optimizers' selection rule (target_modules: regexes, "all-linear", None = the default)
        module = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
        chosen = {id(p) for _, p, _ in select_targets(module, cfg.target_modules)}
        self.targets: set[int] = {i for i, (_, p) in enumerate(named) if id(p) in chosen}
        self.skipped_refreshes = 0  # refreshes left out because the averaged gradient held NaN/Inf
        self._param_index = {id(p): i for i, (_, p) in enumerate(named)}
        self._collectives: Optional[Collectives] = None
        self._owners: Optional[list[int]] = None

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict:
        """Plain data only: no process group, collective layer or parameter-object map."""
        skip = {"process_group", "_collectives", "_param_index", "_owners"}
        return {slot: getattr(self, slot) for slot in self.__slots__ if slot not in skip}

    def __setstate__(self, state: dict) -> None:
        """Restore; the process group becomes the default group. Call :meth:`bind` next."""
        for slot, value in state.items():
            setattr(self, slot, value)
        self.process_group = dist.distributed_c10d._get_default_group() if dist.is_initialized() else None
        self._collectives = None
        self._owners = None
        self._param_index = {}

    def bind(self, model: torch.nn.Module) -> "PlumageHookState":
        """Map ``model``'s parameter objects to the stored parameter ids (after unpickling)."""
        named = _named_trainable(model)
        names = [n for n, _ in named]
        shapes = [tuple(p.shape) for _, p in named]
        if names != self.param_names or shapes != self.param_shapes:
            diff = next(
                (i for i in range(max(len(names), len(self.param_names)))
                 if i >= len(names) or i >= len(self.param_names)
                 or (names[i], shapes[i]) != (self.param_names[i], self.param_shapes[i])),
                None,
            )
            raise ValueError(
                f"Invalid model for this hook state: parameter #{diff} differs "
                f"(state has {len(self.param_names)} parameters, model has {len(names)})"
            )
        self._param_index = {id(p): i for i, (_, p) in enumerate(named)}
        return self

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Everything the hook carries from one step to the next, as tensors and plain values
        (``torch.load(weights_only=True)`` safe): the step counter, every matrix's current ``(P, d)``
        (or kept design ``(U, p)``), the deterministic flags, the skipped-refresh counter and, on
        each matrix's owner, ``optimal``'s ``Σ``. The designs and projections are the same on every
        rank; ``sigma`` is this rank's (merge the ranks' ``sigma`` to resume on another world size).
        """
        return {
            "format": _STATE_FORMAT, "estimator": self.estimator, "iter": self.iter,
            "param_names": list(self.param_names), "param_shapes": [list(s) for s in self.param_shapes],
            "projections": {pid: {"draw": k, "P": P.clone(), "d": d.clone()} for pid, (k, P, d) in self.projections.items()},
            "designs": {pid: {"refresh": k, "U": U.clone(), "p": p.clone()} for pid, (k, U, p) in self.designs.items()},
            "sigma": {pid: {"count": c, "Sigma": S.clone()} for pid, (c, S) in self.sigma.items()},
            "deterministic": sorted(self.deterministic), "skipped_refreshes": self.skipped_refreshes,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Install a :meth:`state_dict` (``sigma`` may hold every rank's: each keeps the matrices it owns).

        Everything is validated first (format, estimator, parameters, every tensor's shape and
        finiteness, counters); a bad state raises ``ValueError`` and changes nothing. A ``Σ`` saved whole
        or compact, under any ``sigma_rank``, is kept in the form of this hook's ``sigma_rank``.
        """
        sd = state_dict
        if not isinstance(sd, dict) or sd.get("format") != _STATE_FORMAT:
            raise ValueError("Invalid comm hook state_dict: missing or unknown format")
        if sd.get("estimator") != self.estimator:
            raise ValueError(f"Invalid comm hook state_dict: estimator={sd.get('estimator')!r}, hook has {self.estimator!r}")
        if sd.get("param_names") != self.param_names or [tuple(s) for s in sd.get("param_shapes", [])] != self.param_shapes:
            raise ValueError("Invalid comm hook state_dict: it is for other parameters (names or shapes differ)")
        for key in ("iter", "skipped_refreshes"):
            v = sd.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"Invalid comm hook state_dict: {key}={v!r}")

        def checked(kind: str, pid, items: dict, shapes: dict) -> dict:
            if not isinstance(pid, int) or not 0 <= pid < len(self.param_names) or not self.is_compressed(pid):
                raise ValueError(f"Invalid comm hook state_dict: {kind} for parameter {pid!r}, which is not compressed")
            s = min(self.matrix_shape(pid))
            for key, shape in shapes.items():
                t = items.get(key)
                if shape is None:  # Σ whole or compact, under any sigma_rank (converted to this hook's form)
                    want, ok = second_moment_forms(s), torch.is_tensor(t) and is_second_moment_form(tuple(t.shape), s)
                else:
                    want = tuple(x if x >= 0 else s for x in shape)
                    ok = torch.is_tensor(t) and tuple(t.shape) == want
                if not ok or not bool(torch.isfinite(t).all()):
                    raise ValueError(f"Invalid comm hook state_dict: {kind}[{pid}].{key} must be a finite tensor of shape {want}")
            return items

        r = lambda pid: self.effective_rank(pid)  # noqa: E731
        projections = {pid: checked("projections", pid, v, {"P": (-1, r(pid)), "d": (r(pid),)}) for pid, v in sd["projections"].items()}
        designs = {pid: checked("designs", pid, v, {"U": (-1, -1), "p": (-1,)}) for pid, v in sd["designs"].items()}
        owners = self.owners()
        sigma = {pid: checked("sigma", pid, v, {"Sigma": None}) for pid, v in sd["sigma"].items()}
        me = self.collectives().rank
        sigma = {pid: (int(v["count"]), convert_second_moment(v["Sigma"].double(), self.sigma_rank))
                 for pid, v in sigma.items() if owners[pid] == me}
        self.iter, self.skipped_refreshes = sd["iter"], sd["skipped_refreshes"]
        self.projections = {pid: (int(v["draw"]), v["P"].float(), v["d"].float()) for pid, v in projections.items()}
        self.designs = {pid: (int(v["refresh"]), v["U"].float(), v["p"].double()) for pid, v in designs.items()}
        self.sigma = sigma
        self.deterministic = set(sd["deterministic"])

    # ------------------------------------------------------------------ plan
    def matrix_shape(self, pid: int) -> Optional[tuple[int, int]]:
        """``(shape[0], numel / shape[0])`` for ``ndim >= 2`` parameters, else ``None``."""
        shape = self.param_shapes[pid]
        if len(shape) < 2:
            return None
        return (shape[0], math.prod(shape[1:]))

    def effective_rank(self, pid: int) -> int:
        """``min(rank, s)`` of a matrix parameter."""
        return min(self.rank, min(self.matrix_shape(pid)))

    def is_compressed(self, pid: int) -> bool:
        """The compression rule: a target (``target_modules``), ``ndim >= 2`` and
        ``s / min(rank, s) >= min_compression_rate``."""
        mshape = self.matrix_shape(pid)
        if mshape is None or 0 in mshape or pid not in self.targets:
            return False
        s = min(mshape)
        return s / min(self.rank, s) >= self.min_compression_rate

    def param_modes(self) -> dict[str, tuple[str, str]]:
        """``name -> (mode, reason)`` with mode ``lowrank`` or ``dense`` (no silent fallback)."""
        out = {}
        for pid, name in enumerate(self.param_names):
            mshape = self.matrix_shape(pid)
            if mshape is None:
                out[name] = ("dense", f"{len(self.param_shapes[pid])}-D tensor")
            elif pid not in self.targets:
                out[name] = ("dense", "not a target (target_modules)")
            elif not self.is_compressed(pid):
                s = min(mshape)
                out[name] = (
                    "dense",
                    f"compression rate s/r={s}/{min(self.rank, s)} < min_compression_rate={self.min_compression_rate:g}",
                )
            else:
                s, l = oriented_shape(mshape)
                r = self.effective_rank(pid)
                note = " (deterministic design: refresh gradient rank-deficient)" if pid in self.deterministic else ""
                extra = "".join(
                    f", {k}" for k, on in (("resampled", self.resample), (f"{self.quantize}", self.quantize)) if on
                )
                rate = s * 4 / (r * (QUANTIZERS[self.quantize][0].itemsize if self.quantize else 4))
                out[name] = ("lowrank", f"{self.estimator} r={r} of s={s}, l={l}{extra}: {rate:.3g}x fewer bytes{note}")
        return out

    def owners(self) -> list[int]:
        """Owner rank (in the group) of each parameter's refresh (``-1``: not compressed).

        The optimizers' cost model (:func:`~plumage_ds.distributed.ownership.lowrank_load`: the
        decomposition ``s²·l``, ``Σ``'s bytes; the hook keeps no moments) and greedy balance; a pure
        function of shapes and world size, recomputed (never pickled).
        """
        if self._owners is None:
            world = self.collectives().world_size
            pids = [i for i in range(len(self.param_names)) if self.is_compressed(i)]
            spec = self.spec
            costs, sizes = [], []
            for pid in pids:
                s, l = oriented_shape(self.matrix_shape(pid))
                c, b = lowrank_load(s, l, self.effective_rank(pid), decomposes=spec.needs_gradient, keeps_moments=False,
                                    keeps_second_moment=spec.keeps_second_moment, sigma_rank=self.sigma_rank)
                costs.append(c)
                sizes.append(b)
            plan = greedy_ownership(costs, sizes, world)
            owners = [-1] * len(self.param_names)
            for pid, owner in zip(pids, plan):
                owners[pid] = owner
            self._owners = owners
        return self._owners

    def collectives(self) -> Collectives:
        """The accounted collective layer on ``process_group`` (created on first use)."""
        if self._collectives is None:
            self._collectives = Collectives(self.process_group)
        return self._collectives

    def uses_async(self) -> bool:
        """Whether ordinary and warm-up steps return a Future chained on an async all-reduce:
        ``comm_hook.async_comm``, or (``None``) whether the group's backend is NCCL."""
        if self.async_comm is not None:
            return self.async_comm
        return dist.get_backend(self.process_group) == "nccl"

    def comm_stats(self) -> dict:
        """Bytes per ``tag/kind``: ``last_step`` (last completed iteration) and ``total``."""
        return self.collectives().comm_stats()

    @property
    def spec(self):
        """The estimator's strategy (:mod:`plumage_ds.estimators.registry`)."""
        return get_estimator(self.estimator)

    # ------------------------------------------------------------------ schedule
    def phase(self, it: Optional[int] = None) -> str:
        """``warmup``, ``refresh`` or ``lowrank`` for iteration ``it`` (default: ``self.iter``)."""
        it = self.iter if it is None else it
        if it < self.start_iter:
            return "warmup"
        if self.spec.needs_gradient and is_refresh(it - self.start_iter, self.tau):
            return "refresh"
        return "lowrank"

    def _pid(self, p: Tensor) -> int:
        try:
            return self._param_index[id(p)]
        except KeyError:
            raise RuntimeError(
                "plumage_hook got a parameter this state does not know; after unpickling "
                "call state.bind(ddp_model) before training"
            ) from None

    def _seeded(self, pid: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(P, d)`` drawn from the shared seed for this step's draw index (estimators that need no gradient)."""
        draw = refresh_index(self.iter - self.start_iter, self.kappa)
        cached = self.projections.get(pid)
        if cached is None or cached[0] != draw or cached[1].device != device:
            s = min(self.matrix_shape(pid))
            proj = self.spec.draw(s, self.rank, sampler_generator(self.seed, pid, draw), device=device)
            cached = (draw, proj.P, proj.d)
            self.projections[pid] = cached
        return cached[1], cached[2]

    def _resampled(self, pid: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(P, d)`` drawn from the kept design ``(U, p)`` for this step's draw index (cached)."""
        draw = RESAMPLE_TAG + refresh_index(self.iter - self.start_iter, self.kappa)
        cached = self.projections.get(pid)
        if cached is None or cached[0] != draw or cached[1].device != device:
            _, U, p = self.designs[pid]
            proj = projection_from_design(U, p, sampler_generator(self.seed, pid, draw), device=device)
            cached = (draw, proj.P, proj.d)
            self.projections[pid] = cached
        return cached[1], cached[2]

    def _current(self, pid: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """This step's ``(P, d)`` of a compressed matrix."""
        if not self.spec.needs_gradient:  # haar: drawn from the seed
            return self._seeded(pid, device)
        if self.resample:
            return self._resampled(pid, device)
        _, P, d = self.projections[pid]
        return P, d

    def _has_projection(self, pid: int) -> bool:
        return not self.spec.needs_gradient or pid in (self.designs if self.resample else self.projections)

    def _end_bucket(self, bucket) -> None:
        if bucket.is_last():
            self.iter += 1
            self.collectives().end_step()
