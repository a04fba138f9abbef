"""plumage_ds: unbiased low-rank gradient estimators inside distributed training engines."""

from .optim import GUM, PlumageAdamW, build_optimizer, lowrank_param_groups

__version__ = "0.1.0"

__all__ = ["GUM", "PlumageAdamW", "build_optimizer", "lowrank_param_groups", "__version__"]
