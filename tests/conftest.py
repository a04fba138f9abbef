"""Shared pytest fixtures (keep small; markers are registered in pytest.ini)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (where ``configs/`` and ``setup.py`` live)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def load_benchmark():
    """``load_benchmark(NAME)``: ``benchmarks/NAME.py`` as a module, registered in ``sys.modules``
    (dataclasses resolve their annotations through it) until the session ends."""
    loaded = []

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        loaded.append(name)
        return module

    yield load
    for name in loaded:
        sys.modules.pop(name, None)


@pytest.fixture(scope="session")
def tiny_config_path() -> Path:
    """``configs/tiny.yaml``: the few-second main-job config."""
    return REPO_ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module of thousands of tiny ops: faster, immune to oversubscription.

    Use with ``pytestmark = pytest.mark.usefixtures("single_thread")``.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
