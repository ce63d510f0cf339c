"""Per-example gradients of u_s at theta*, projected, written to a resumable store (docs/method.md,
section 2)."""

from gradex.gradients import preconditioner
from gradex.gradients.compute import GradientComputer, single_example
from gradex.gradients.projectors import (DenseProjector, IdentityProjector, Preconditioned, Projector,
                                         SparseProjector, make_projector)
from gradex.gradients.store import Store, compute_store

__all__ = ["GradientComputer", "single_example", "Projector", "SparseProjector", "DenseProjector",
           "IdentityProjector", "Preconditioned", "make_projector", "Store", "compute_store", "preconditioner"]
