"""Tensor artifacts that reading cannot turn into running code: adapters, training checkpoints, the
preconditioner.

Each is a torch.save file of one flat dict {name: tensor}; whatever else a file needs (optimizer
settings, the step, the training log) travels as JSON inside a uint8 tensor (`json_tensor`).
`load_tensors` reads with torch.load(weights_only=True), whose unpickler builds tensors and plain
containers only and refuses any other object, so a run directory received from someone else cannot
execute code when gradex reads it (a full pickle load would run whatever the file names).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch

from gradex.atomic import replacing


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Atomically. Written through a file handle, so the archive's inner folder is torch's fixed
    "archive" rather than the temporary file's name: equal tensors give equal bytes in any process."""
    with replacing(path) as fh:
        torch.save({name: t.detach().cpu() for name, t in tensors.items()}, fh)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The {name: tensor} dict of a file `save_tensors` wrote; anything else is a ValueError."""
    try:
        found = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path}: refused to load: it holds Python objects other than tensors, and loading "
                         f"those could run code ({str(err).splitlines()[0]})") from err
    except (RuntimeError, EOFError) as err:
        raise ValueError(f"{path}: not a readable tensor file ({err}); delete it to recompute it") from err
    if not isinstance(found, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in found.items()):
        raise ValueError(f"{path}: not a gradex tensor file (a dict of named tensors); delete it to recompute it")
    return found


def json_tensor(body: Any) -> torch.Tensor:
    """`body` as JSON in a uint8 tensor, for the non-tensor part of a tensor file."""
    return torch.frombuffer(bytearray(json.dumps(body).encode()), dtype=torch.uint8).clone()


def tensor_json(t: torch.Tensor) -> Any:
    return json.loads(bytes(t.tolist()).decode())
