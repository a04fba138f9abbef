"""Shared pytest fixtures (keep small; markers are registered in pytest.ini)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (where ``configs/`` and ``setup.py`` live)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def tiny_config_path() -> Path:
    """``configs/tiny.yaml``: the few-second main-job config."""
    return REPO_ROOT / "configs" / "tiny.yaml"
