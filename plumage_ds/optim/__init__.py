"""Optimizers: the readable reference (test oracle), the matrix optimizers on a layout, the DeepSpeed
composite and the one factory."""

from ..targets import ALL_LINEAR, DEFAULT_TARGET_MODULES, lowrank_param_groups, select_targets
from .base import CollectiveStepError, DensePartition, MatrixOptimizer, NonFiniteGradientError
from .factory import build_optimizer, matrix_optimizer
from .gum import GUM
from .plumage_adamw import PlumageAdamW, ShardedPlumageAdamW
from .plumage_state import merge_shards

__all__ = [
    "ALL_LINEAR", "DEFAULT_TARGET_MODULES", "GUM", "CollectiveStepError", "DensePartition", "MatrixOptimizer",
    "NonFiniteGradientError", "PlumageAdamW", "ShardedPlumageAdamW", "build_optimizer", "lowrank_param_groups",
    "matrix_optimizer", "merge_shards", "select_targets",
]
