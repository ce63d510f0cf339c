"""Writes that a killed process cannot leave half-done: a temporary file, then a rename.

Every artifact a later stage or a resumed run reads goes through here (tensor files through
`gradex.tensorfile`, which writes with `replacing`), so a file is either the old one, the new one,
or absent.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator


@contextmanager
def replacing_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` that replaces it when the block ends without an error, for
    writers that need a file name rather than a handle (a memory-mapped array)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")  # per process: ranks may write side by side
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left when the block failed


@contextmanager
def replacing(path: Path) -> Iterator[BinaryIO]:
    """A binary file handle whose contents replace `path` when the block ends without an error
    (streamed: a checkpoint is never held in memory twice)."""
    with replacing_path(path) as tmp, open(tmp, "wb") as fh:
        yield fh


def write_bytes(path: Path, data: bytes) -> None:
    with replacing(path) as fh:
        fh.write(data)


def write_json(path: Path, body: Any) -> None:
    write_bytes(path, json.dumps(body, indent=2).encode())


def write_parquet(path: Path, frame: Any) -> None:
    """A pandas DataFrame as Parquet, replaced whole like every other artifact."""
    with replacing(path) as fh:
        frame.to_parquet(fh)
