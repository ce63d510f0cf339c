"""Which process this is under a multi-process launch (`accelerate launch`, torchrun), and how the
stages share the work. accelerate holds the distributed state (gradex.device.resolve_device starts it:
gloo for a run on the CPU, NCCL on CUDA).

- Training (meta-train, every fine-tune) runs on every process: DistributedDataParallel, each process
  computing its share of every batch (gradex.train).
- The gradient pass runs on every process, each computing its own chunks (gradex.gradients.store).
- Everything else (prepare, clusters, estimate, select, evaluation, compare's tables, the report) runs
  on rank 0 alone (`main_first`, `on_main`) while the others wait, then reads what rank 0 wrote.
Only rank 0 writes run-level files; a write by rank 0 is followed by a barrier before any other
process reads it. Inside a part that rank 0 runs alone, `distributed()` says (0, 1), so whatever that
part calls (a stage it depends on, a fine-tune) runs single-process instead of waiting for the others.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from typing import Any, Callable, Iterator, TypeVar

T = TypeVar("T")
_alone = False  # True while rank 0 runs a part by itself (main_first, on_main)


def launch_rank() -> int:
    """This process's rank (0 when run alone): the process group's, once one is initialized, else
    the launcher's RANK; never initializes one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def launched() -> bool:
    """Whether a launcher (torchrun, accelerate launch) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def distributed() -> tuple[int, int]:
    """(rank, world size) of the processes this part of the run is shared by: (0, 1) when launched alone
    or inside a part rank 0 runs by itself. Starts accelerate's process state under a launch."""
    if _alone:
        return 0, 1
    if not launched():
        return 0, 1
    from gradex.device import process_state

    state = process_state()
    return state.process_index, state.num_processes


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


@contextlib.contextmanager
def alone() -> Iterator[None]:
    global _alone
    was, _alone = _alone, True
    try:
        yield
    finally:
        _alone = was


def on_main(part: Callable[[], T], share: bool = True) -> T:
    """`part()` on rank 0 alone while the others wait; every process gets its result (picklable) when
    `share`, else only rank 0 does (the others get None). An error on rank 0 is raised on every process
    (the others would otherwise wait for rank 0 until the group's timeout)."""
    rank, world = distributed()
    if world == 1:
        return part()
    import torch.distributed as dist

    box: list[Any] = [None]
    result: Any = None
    if rank == 0:
        try:
            with alone():
                result = part()
        except BaseException as err:
            box[0] = ("error", f"{type(err).__name__}: {err}")
            dist.broadcast_object_list(box, src=0)
            raise
        box[0] = ("ok", result if share else None)
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        from gradex.config import ConfigError

        raise ConfigError(f"rank 0 failed, so this process stops too: {value}")
    return result if rank == 0 else value


def main_first(stage: Callable[..., T]) -> Callable[..., T]:
    """A stage that runs on rank 0 alone; the other processes wait, then call it themselves with the
    same arguments but `force` off, which finds it done and reads what rank 0 wrote."""
    signature = inspect.signature(stage)

    @functools.wraps(stage)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        rank, world = distributed()
        if world == 1:
            return stage(*args, **kwargs)
        result = on_main(lambda: stage(*args, **kwargs), share=False)
        if rank == 0:
            return result
        call = signature.bind(*args, **kwargs)
        if "force" in call.arguments:
            call.arguments["force"] = False
        with alone():
            return stage(*call.args, **call.kwargs)

    return wrapper
