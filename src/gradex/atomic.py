"""Writes that a killed process cannot leave half-done: a temporary file, then a rename.

Every artifact a later stage or a resumed run reads goes through here (tensor files through
`gradex.tensorfile`, which writes with `replacing`), so a file is either the old one, the new one,
or absent. The new contents reach the disk (fsync) before the rename, and the rename before the
call returns (fsync of the folder), so a power loss cannot leave a renamed but empty file either.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

from gradex.errors import ConfigError

TEMPORARY = re.compile(r"(?P<of>.+)\.(?:tmp|partial|old)(?P<pid>\d+)")  # the temporary names below: <name>.<kind><pid>


@contextmanager
def replacing_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` that replaces it when the block ends without an error, for
    writers that need a file name rather than a handle (a memory-mapped array)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")  # per process: ranks may write side by side
    try:
        yield tmp
        sync(tmp)
        os.replace(tmp, path)
        sync(path.parent)
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
    the old folder, the new one, or none (between the two renames), never a half-written one. The
    temporary names carry the writer's pid, so two processes never clear each other's folder; the
    leftovers of a killed writer (a pid no longer running) are cleared by the next."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for leftover in leftovers(path.parent.iterdir(), of=path.name):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = path.with_name(f"{path.name}.partial{os.getpid()}")
    old = path.with_name(f"{path.name}.old{os.getpid()}")
    tmp.mkdir()
    try:
        yield tmp
        for p in [*tmp.rglob("*"), tmp]:
            sync(p)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        sync(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only left when the block failed


def sync(path: Path) -> None:
    """Flush a file's or a folder's contents (a folder's: its entries, so a rename in it) to the disk."""
    if path.is_dir() and os.name == "nt":  # Windows cannot open a folder; its renames are journaled
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def running(pid: int) -> bool:
    """Whether a process with this pid runs on this machine (a temporary name's writer may still write)."""
    if pid == os.getpid():
        return False  # this process: what it left under its own name was left by a failed block
    if os.name == "nt":  # os.kill would signal it; keep what may be in flight
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def leftovers(paths: Iterable[Path], of: str | None = None) -> list[Path]:
    """Among `paths`, the temporary files and folders this module names (`<name>.tmp<pid>`,
    `<name>.partial<pid>`, `<name>.old<pid>`; of `<name>` == `of` when given) whose writer no longer
    runs: a killed writer's, safe to delete."""
    found = []
    for p in paths:
        m = TEMPORARY.fullmatch(p.name)
        if m and (of is None or m["of"] == of) and not running(int(m["pid"])):
            found.append(p)
    return found


def write_bytes(path: Path, data: bytes) -> None:
    with replacing(path) as fh:
        fh.write(data)


def read_json(path: Path, writer: str) -> Any:
    """A JSON artifact written by the command `writer`; one that cannot be parsed (cut short, or
    edited) is an error naming the file and what to do, never a bare decoding error."""
    text = path.read_bytes()
    try:
        if not text.strip():
            raise ValueError("empty")
        return json.loads(text)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ConfigError(f"{path} is unreadable ({err}): cut short by a crash or a power loss, or edited; "
                          f"delete it and re-run `{writer}`") from err


def write_json(path: Path, body: Any) -> None:
    write_bytes(path, json.dumps(body, indent=2).encode())


def write_parquet(path: Path, frame: Any) -> None:
    """A pandas DataFrame as Parquet, replaced whole like every other artifact."""
    with replacing(path) as fh:
        frame.to_parquet(fh)
