"""Which process this is under a multi-process launch (accelerate launch / torchrun), and the
collective calls the gradient pass needs. Only rank 0 writes run-level files; the ranks share the
work of the gradient pass (gradex.gradients.store)."""

from __future__ import annotations

import datetime
import os


def launch_rank() -> int:
    """This process's rank (0 when run alone): the process group's, once one is initialized, else
    the launcher's RANK (which the group's env:// initialization reads too); never initializes one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def distributed() -> tuple[int, int]:
    """(rank, world size); initializes a gloo process group when launched with WORLD_SIZE > 1."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=2))
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
