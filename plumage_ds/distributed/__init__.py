"""Distribution: the accounted collective layer, agreement across ranks, the ownership plan, the
sharding cases (:mod:`.layouts`, one module each) and the DDP comm hook (:mod:`.comm_hook`).

Nothing here imports an optimizer: the optimizers (:mod:`plumage_ds.optim`) sit on top of a layout.
Heavy submodules are imported lazily by their users; this package's import is cheap.
"""

from .agreement import Agreement
from .comm import Collectives, CommStats
from .ownership import greedy_ownership, lowrank_load

__all__ = ["Agreement", "Collectives", "CommStats", "greedy_ownership", "lowrank_load"]
