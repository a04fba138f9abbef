"""Engines of the main job: one small class per way of running data parallelism.

``train.engine`` names one of :data:`ENGINES`; each maps to a module in this package whose
class subclasses :class:`~plumage_ds.train.engines.base.Engine`. Adding an engine is one module
here plus one line in :data:`ENGINES` and in ``config.ENGINES``.
Modules are imported lazily, so ``deepspeed`` is only imported by the engine that needs it.
"""

from __future__ import annotations

import importlib

from .base import Engine

ENGINES = {
    "local": "plumage_ds.train.engines.local:LocalEngine",
    "ddp": "plumage_ds.train.engines.ddp:DDPEngine",
    "ddp_hook": "plumage_ds.train.engines.ddp:DDPHookEngine",
    "sharded": "plumage_ds.train.engines.sharded:ShardedEngine",
    "deepspeed": "plumage_ds.train.engines.deepspeed:DeepSpeedEngine",
    "fsdp2": "plumage_ds.train.engines.fsdp:FSDP2Engine",
    "hsdp": "plumage_ds.train.engines.fsdp:HSDPEngine",
}
"""``train.engine`` → ``module:class``."""


def engine_class(name: str) -> type[Engine]:
    """The engine class registered under ``name``."""
    if name not in ENGINES:
        raise ValueError(f"Invalid train.engine={name!r}: must be one of {list(ENGINES)}")
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["ENGINES", "Engine", "engine_class"]
