"""One writer per run directory, and only into directories gradex made.

Every command that writes a run directory (each stage, `gradex run`, add-sources, the diagnostics, an
export into the run) holds the run's lock, `<run dir>/.gradex.lock`, while it runs. A second writer is
refused at once, told the holder's pid and command (the holder writes them into the lock file and clears
them when it lets go).
Readers (`gradex status`, `gradex report`) take no lock. The lock is re-entrant within a process (a
stage runs its upstream stages under the lock it already holds), and under a launch rank 0 alone
takes it (only rank 0 writes run-level files, gradex.launch); the operating system releases it when
the process ends, however it ends.

Before the lock is taken, the directory must be a gradex run: absent or empty (gradex then makes it
and writes its marker, `.gradex-run`), marked, or a run of an older gradex (a stage record,
`stage.json`, in one of its stage folders). Any other folder is refused, never written or cleared.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shlex
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from gradex.atomic import running
from gradex.config import ConfigError
from gradex.graph import LEDGERED
from gradex.ledger import RECORD

MARKER = ".gradex-run"  # written by gradex into every run directory it creates
LOCK = ".gradex.lock"  # flock'ed by the writer; holds its pid and command

T = TypeVar("T")
_held: dict[Path, tuple[int, int]] = {}  # resolved run directory -> (lock file descriptor, depth)
_guard = threading.Lock()


def is_run(path: Path) -> bool:
    """Whether `path` is a run directory gradex wrote: its marker, or an older gradex's stage record."""
    return (path / MARKER).is_file() or any((path / s.folder / RECORD).is_file() for s in LEDGERED)


def check_run(path: Path) -> None:
    """Refuse a folder that holds files and is not a gradex run: gradex deletes and rewrites files in a
    run directory, so it must never take someone's folder for one."""
    if not path.exists():
        return
    if not path.is_dir():
        raise ConfigError(f"{path} is a file, not a run directory; choose another `name` or `runs_dir`")
    if is_run(path) or not any(path.iterdir()):
        return
    raise ConfigError(f"{path} is not a gradex run directory (no {MARKER}, no stage records) and is not empty; "
                      f"gradex writes and deletes files in a run directory, so it leaves this one alone: choose "
                      f"another `name` or `runs_dir`")


def holder(path: Path) -> dict:
    """Who holds the lock of the run at `path`, as its holder wrote it ({} when unknown)."""
    try:
        found = json.loads((path / LOCK).read_text() or "{}")
    except (OSError, ValueError):  # just created, or being rewritten by its holder this instant
        return {}
    return found if isinstance(found, dict) else {}


def holder_said(path: Path, wait: float = 2.0) -> dict:
    """The lock holder's record, waiting up to `wait` seconds for it: a holder writes it just after it
    takes the lock, so a process refused in between would otherwise name no one, or (where the last
    holder was killed before it could clear its record) a process that is gone."""
    deadline = time.monotonic() + wait
    while not _said(who := holder(path)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return who if _said(who) else {}


def _said(who: dict) -> bool:
    """Whether a lock record names a holder that may be alive: a pid, not one known gone on this host."""
    pid = who.get("pid")
    if not isinstance(pid, int):
        return False
    return who.get("host") != socket.gethostname() or pid == os.getpid() or running(pid)


def writer_now(path: Path) -> dict | None:
    """The process writing the run at `path` now ({} if it has not said who it is yet), or None when
    none is; asked without writing anything (a shared lock on a read-only descriptor, given back at
    once), so a reader of a read-only run can ask too."""
    try:
        import fcntl
    except ImportError:  # Windows: not asked
        return None
    try:
        fd = os.open(path / LOCK, os.O_RDONLY)
    except OSError:  # never written, or not readable: no writer that gradex could name
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return holder(path)
    finally:
        os.close(fd)  # closing gives back the shared lock, if it was taken
    return None


def _command() -> str:
    argv = list(sys.argv) or ["python"]
    prog = Path(argv[0]).name
    if prog in ("cli.py", "__main__.py"):  # python -m gradex.cli: the same command as `gradex`
        prog = "gradex"
    elif prog == "-c":
        prog = "python -c"
    return " ".join([prog, shlex.join(argv[1:])]).strip()


def _try_lock(fd: int) -> bool:
    """An exclusive lock on the open file `fd` without waiting: True if taken, False if another holds it."""
    try:
        import fcntl
    except ImportError:  # Windows: a byte-range lock on the file's first byte
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _acquire(path: Path) -> int:
    check_run(path)
    fresh = not path.exists() or not any(path.iterdir())
    try:
        path.mkdir(parents=True, exist_ok=True)
        if fresh:
            (path / MARKER).write_text("a gradex run directory: gradex may delete and rewrite what it holds\n")
        fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise ConfigError(f"{path}: cannot write here ({err.strerror}); a read-only or archived run can be read "
                          f"(`gradex status`, `gradex report --out FILE`, `gradex estimate`), but this command writes: copy the run somewhere "
                          f"writable and give the copy (--run-dir)") from err
    if not _try_lock(fd):
        os.close(fd)
        who = holder_said(path)
        since = (f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(who['since']))}"
                 if isinstance(who.get("since"), (int, float)) else "")
        by = (f"pid {who.get('pid')} on {who.get('host')}: {who.get('command')}{since}" if who.get("pid")
              else "a process that is starting")
        raise ConfigError(f"{path} is being written by another gradex process ({by}); one process writes a run "
                          f"directory at a time: wait for it to finish (or stop it), or write another run "
                          f"(--set name=...)")
    body = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": _command(),
                       "since": time.time()}) + "\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, body.encode(), 0)
    return fd


@contextlib.contextmanager
def writing(run_dir: Path) -> Iterator[None]:
    """Hold the lock of the run at `run_dir` (made if absent) for the block; re-entrant in a process.
    Under a launch only rank 0 takes it: the other ranks write only their own shards, inside the run
    rank 0 holds."""
    from gradex.launch import launch_rank

    if launch_rank() != 0:
        yield
        return
    key = Path(run_dir).resolve()
    with _guard:
        fd, depth = _held.get(key, (-1, 0))
        if depth == 0:
            fd = _acquire(key)
        _held[key] = (fd, depth + 1)
    try:
        yield
    finally:
        with _guard:
            fd, depth = _held.pop(key)
            if depth > 1:
                _held[key] = (fd, depth - 1)
            else:  # clear the record while still holding the lock, so it never names a finished writer
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
                os.close(fd)  # closing the last descriptor releases the lock


def writes(stage: Callable[..., T]) -> Callable[..., T]:
    """A stage `stage(cfg, ...)` or `stage(run, ...)` that writes the run directory (`cfg.run_dir`,
    `run.dir`): it runs holding the run's lock."""

    @functools.wraps(stage)
    def wrapper(first: Any, *args: Any, **kwargs: Any) -> T:
        with writing(first.run_dir if hasattr(first, "run_dir") else first.dir):
            return stage(first, *args, **kwargs)

    return wrapper
