"""Optimizers: the readable reference (test oracle) and the production ones."""

from .distributor import Distributor, LocalDistributor
from .factory import build_optimizer
from .param_groups import ALL_LINEAR, DEFAULT_TARGET_MODULES, lowrank_param_groups, select_targets
from .gum import GUM
from .plumage_adamw import PlumageAdamW, merge_shards

__all__ = [
    "ALL_LINEAR", "DEFAULT_TARGET_MODULES", "GUM", "Distributor", "LocalDistributor", "PlumageAdamW", "build_optimizer",
    "lowrank_param_groups", "merge_shards", "select_targets",
]
