"""What the benchmark scripts record of the host they ran on (hosts of one kind differ up to 2x)."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def describe(**extra: object) -> dict:
    """The host as every benchmark records it (platform, CPU, cores, torch and its threads, Python),
    plus what the caller adds (the precision a stage ran in, the load before and after)."""
    import torch  # here: a script that never loads torch can still use cpu_model

    return {"platform": platform.platform(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), **extra}


def command(script: str, argv: list[str] | None) -> str:
    """The command line a result was made by, as its reader would type it again: `python
    benchmarks/<script> ARGS` (argv as main() was given it, else the process's own)."""
    return " ".join(["python", f"benchmarks/{script}", *(sys.argv[1:] if argv is None else argv)])
