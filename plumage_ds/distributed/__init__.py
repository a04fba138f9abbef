"""Distribution strategies, the accounted collective layer and the comm hook.

Heavy submodules are imported lazily by their users; this package's import is cheap.
"""

from .comm import Collectives, CommStats
from .data_parallel import DataParallelDistributor, ShardedPlumageAdamW
from .ownership import greedy_ownership

__all__ = ["Collectives", "CommStats", "DataParallelDistributor", "ShardedPlumageAdamW", "greedy_ownership"]
