"""Engines of the main job: one small class per way of running data parallelism.

``train.engine`` names one of :data:`plumage_ds.config.ENGINES` (the one list), which also names the
module of this package holding the engine class (the :class:`~plumage_ds.train.engines.base.Engine`
subclass whose ``name`` is the key). Adding an engine is one module here plus one line there.
Modules are imported lazily, so ``deepspeed`` is only imported by the engine that needs it.
"""

from __future__ import annotations

import importlib

from plumage_ds.config import ENGINES

from .base import Engine


def engine_class(name: str) -> type[Engine]:
    """The engine class registered under ``name``."""
    if name not in ENGINES:
        raise ValueError(f"Invalid train.engine={name!r}: must be one of {list(ENGINES)}")
    module = importlib.import_module(f"{__name__}.{ENGINES[name]}")
    found = [c for c in vars(module).values() if isinstance(c, type) and issubclass(c, Engine) and c.name == name]
    if len(found) != 1:
        raise RuntimeError(f"{module.__name__} defines {len(found)} engine classes named {name!r}; expected one")
    return found[0]


__all__ = ["Engine", "engine_class"]
