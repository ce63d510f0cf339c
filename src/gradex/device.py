"""Where a run computes and in what precision: `model.device` and `model.precision` resolved for this
process, with accelerate's view of the machine and of the launch (under `accelerate launch` or
torchrun, process k of a node takes cuda:k), and the accelerate objects training uses.

The rule every stage follows: a stage places its model with `run.device` once; everything else goes
where the model is (`device_of(model)`): batches (`Batch.to`), projectors, accumulators. So a
stage cannot compute on two devices, and a forgotten `.to()` fails loudly on any accelerator (the
suite checks it on torch's lazy device, which exists in CPU builds: tests/test_devices.py).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from gradex.config import ConfigError

DEVICES = "auto, cpu, cuda, cuda:N or mps"
# model.precision -> the autocast dtype (None: no autocast, fp32 throughout)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
ACCELERATE_PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}  # accelerate's names for them


def resolve_device(spec: str) -> torch.device:
    """The torch device `model.device` names on this machine, or a ConfigError saying why it cannot be
    used here. `auto` is accelerate's choice: this process's GPU under a launch, else the GPU, else MPS,
    else the CPU. Initializes accelerate's process state, hence the process group under a launch (gloo
    when the run is on the CPU, NCCL on CUDA)."""
    if spec == "auto":
        return _plain(process_state().device)
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"model.device: {spec!r} is not a device ({DEVICES}): {err}") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ConfigError(f"model.device: {spec!r}, but torch {torch.__version__} ({built}) sees no CUDA GPU "
                              f"here; install a CUDA build of torch (README: GPUs), or set model.device: auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"model.device: {spec!r}, but this machine has {torch.cuda.device_count()} CUDA "
                              f"GPU(s) (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"model.device: {spec!r}, but torch sees no MPS device (Apple GPU) here; set model.device: auto")
    # the process group's backend follows the device: gloo for the CPU (or a device without a GPU
    # behind it, like the tests' lazy one), NCCL for CUDA
    state = process_state(cpu=device.type == "cpu" or not has_accelerator())
    if device.type == "cuda" and device.index is None:
        return _plain(state.device) if state.device.type == "cuda" else torch.device("cuda", 0)
    return _plain(device)


def has_accelerator() -> bool:
    """A GPU torch can use here (CUDA, MPS or XPU)."""
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or torch.backends.mps.is_available() or bool(xpu and xpu.is_available())


def process_state(cpu: bool | None = None) -> Any:
    """accelerate's PartialState: this process's rank, the launch's size, the device accelerate picks.
    The first call fixes it for the process; `cpu` (default: when there is no GPU) makes a launch use
    gloo on the CPU (accelerate otherwise sees no launch on a machine without a GPU)."""
    from accelerate import PartialState

    if PartialState._shared_state:
        return PartialState()
    return PartialState(cpu=not has_accelerator() if cpu is None else cpu)


def end_launch() -> None:
    """Destroy this process's process group, if a launch made one. Without it, gloo's worker threads can
    outlive the interpreter's teardown and abort the process (SIGABRT, "terminate called without an
    active exception") after the command has finished, failing the launch at random."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _plain(device: torch.device) -> torch.device:
    """cpu:0 (accelerate's name under a launch) is the device CPU tensors report as cpu."""
    return torch.device("cpu") if device.type == "cpu" else device


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> str:
    """`auto` becomes bf16 where the device computes bf16 natively (a CUDA GPU that supports it, a CPU
    with AVX-512 BF16 or AMX), else fp32; `bf16`, `fp16` and `fp32` stay as they are.

    Why not bf16 everywhere: on a CPU without native bf16, autocast falls back to a generic matrix
    product; a SmolLM2 training step ran 40x slower in bf16 than in fp32 (AMD EPYC, AVX2, torch 2.13).
    fp16 is never chosen for you: it needs loss scaling and overflows where bf16 does not.
    """
    if precision != "auto":
        return precision
    kind = torch.device(device).type
    if kind == "cuda":
        # not an emulated bf16 (a T4 or V100 can hold bf16 tensors, and computes them slowly)
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    if kind == "cpu":
        return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    return "fp32"


def check_precision(precision: str, device: torch.device) -> None:
    """A precision this device can run, or a ConfigError before anything is computed."""
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("model.precision: fp16 needs a GPU (CUDA or MPS); on the CPU use bf16 or fp32")
    if DTYPES.get(precision) is not None and device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ConfigError(f"model.precision: {precision} autocast is not available on device {device}; use fp32")


@contextlib.contextmanager
def autocast(precision: str, device: torch.device | str = "cpu") -> Iterator[None]:
    """Mixed precision for a forward pass on `device` (a resolved precision: bf16 | fp16 | fp32)."""
    dtype = DTYPES[resolve_precision(precision, device)]
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=torch.device(device).type, dtype=dtype):
        yield


def device_of(model: nn.Module) -> torch.device:
    """Where the model's parameters are: the device everything computed with it goes to."""
    return next(model.parameters()).device


def step_done(device: torch.device) -> None:
    """Cut the pending graph where the device evaluates lazily (torch's lazy device; XLA would be
    the same), so every optimizer step or batch is one graph rather than one ever longer graph."""
    if device.type == "lazy":
        import torch._lazy

        torch._lazy.mark_step()


def accelerator(precision: str, device: torch.device) -> Any:
    """An accelerate Accelerator for training on `device`: mixed precision (fp16 loss scaling
    included), DistributedDataParallel under a launch, no_sync for gradient accumulation. Placement
    stays gradex's (device_placement=False): the model is already on `device`, which may be a device
    accelerate does not pick itself (an explicit cuda:N, the tests' lazy device)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    mixed = ACCELERATE_PRECISION[resolve_precision(precision, device)]
    held = AcceleratorState._shared_state.get("_mixed_precision")
    if held is not None and held != mixed:
        # accelerate keeps one precision per process; one process may train runs of several (tests,
        # notebooks). Resetting it keeps the process state (the process group) as it is.
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=mixed, cpu=device.type not in ("cuda", "mps", "xpu"), device_placement=False,
                       step_scheduler_with_optimizer=False)


def peak_memory_gb(device: torch.device) -> float | None:
    """The most accelerator memory torch held on `device` since the last reset (None on the CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**30
    return None
