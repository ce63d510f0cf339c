"""Writes that a killed process cannot leave half-done: a temporary file, then a rename.

Every artifact a later stage or a resumed run reads goes through here (or `gradex.model.save_atomic`
for torch objects), so a file is either the old one, the new one, or absent.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")  # per process: ranks may write side by side
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json(path: Path, body: Any) -> None:
    write_bytes(path, json.dumps(body, indent=2).encode())
