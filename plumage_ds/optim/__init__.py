"""Optimizers: the readable reference (test oracle) and the production ones."""

from .distributor import Distributor, LocalDistributor
from .factory import build_optimizer
from .param_groups import lowrank_param_groups
from .gum import GUM
from .plumage_adamw import PlumageAdamW, merge_shards

__all__ = ["GUM", "Distributor", "LocalDistributor", "PlumageAdamW", "build_optimizer", "lowrank_param_groups", "merge_shards"]
