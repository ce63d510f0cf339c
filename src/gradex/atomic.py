"""Writes that a killed process cannot leave half-done: a temporary file, then a rename.

Every artifact a later stage or a resumed run reads goes through here (tensor files through
`gradex.tensorfile`, which writes with `replacing`), so a file is either the old one, the new one,
or absent.
"""

from __future__ import annotations

import json
import os
import shutil
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


@contextmanager
def replacing_dir(path: Path) -> Iterator[Path]:
    """A temporary folder beside `path` that replaces the folder `path` when the block ends without an
    error, for writers that fill a folder (peft's and transformers' save_pretrained). A kill leaves
    the old folder, the new one, or none (between the two renames), never a half-written one; the
    leftover `.partial` of a killed write is cleared by the next."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = path.with_name(f"{path.name}.partial"), path.with_name(f"{path.name}.old")
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only left when the block failed


def write_bytes(path: Path, data: bytes) -> None:
    with replacing(path) as fh:
        fh.write(data)


def write_json(path: Path, body: Any) -> None:
    write_bytes(path, json.dumps(body, indent=2).encode())


def write_parquet(path: Path, frame: Any) -> None:
    """A pandas DataFrame as Parquet, replaced whole like every other artifact."""
    with replacing(path) as fh:
        frame.to_parquet(fh)
