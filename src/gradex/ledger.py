"""The ledger: what each stage of a run read and what it wrote, so a re-run can tell done from stale.

Every stage directory holds one record, `stage.json`:

    {"stage": "meta", "status": "done",
     "inputs": {"config": "<hash of the config parts it used>", "data": "<hash of the examples>"},
     "outputs": {"theta*": "<hash of the adapter>"}, ...timings and counts}

Work finer than a stage (a fine-tune of a mix, a similarity cache, the final model's record) is a
keyed record: one JSON object whose "key" is the hash of everything its result depends on
(`kept`, `keep`). Its body is current exactly when its key equals the current one.

A stage's inputs are the hashes of its config parts and of every artifact it read, taken from the
upstream records' outputs (or, for prepare, from the data files themselves). A stage is done when
its recorded inputs equal the current ones; so editing a data file, forcing an upstream stage that
then writes something different, or changing a setting makes exactly the dependent stages stale,
and an upstream re-run that reproduces its output byte for byte makes nothing stale.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from gradex.atomic import write_json

RECORD = "stage.json"


def sha256(path: Path) -> str:
    """The first 16 hex digits of a file's SHA-256 (streamed: stores can be large), or of every file
    under a folder, names included."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            h.update(str(file.relative_to(path)).encode() + b"\0")
        with file.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


UNREADABLE = "unreadable"  # the status read() gives a record it cannot parse


def read(where: Path) -> dict:
    """The record in `where` ({} when there is none). One that cannot be parsed (cut short by a crash
    or a power loss on a file system that lost the rename's data, or edited) reads as the status
    UNREADABLE, with why: its stage counts as stale and runs again, and `gradex status` says so."""
    import json

    path = where / RECORD
    if not path.exists():
        return {}
    try:
        text = path.read_text()
        record = json.loads(text) if text.strip() else "empty"
    except (ValueError, UnicodeDecodeError) as err:
        record = f"not JSON ({err})"
    if not isinstance(record, dict):
        what = record if isinstance(record, str) else f"a JSON {type(record).__name__}, not an object"
        return {"status": UNREADABLE, "why": f"its record {path} is unreadable: {what}; the stage runs again "
                                              f"on re-run (or delete {where} to clear it)"}
    return record


def write(where: Path, stage: str, inputs: dict[str, Any], outputs: dict[str, str] | None = None,
          status: str = "done", **info: Any) -> None:
    write_json(where / RECORD, {"stage": stage, "status": status, "inputs": inputs, "outputs": outputs or {},
                                **info})


def changed(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The names of the inputs whose hash differs (a name on one side only counts as changed)."""
    return sorted(k for k in recorded.keys() | current.keys() if recorded.get(k) != current.get(k))


def state(where: Path, current: dict[str, Any]) -> tuple[str, str]:
    """(done | stale | running | missing, why) for the record in `where` against the current inputs."""
    record = read(where)
    if not record:
        return "missing", "not run yet"
    if record.get("status") == UNREADABLE:
        return "stale", record["why"]
    if "inputs" not in record:
        return "stale", "recorded by an older gradex (no input hashes)"
    diff = changed(record["inputs"], current)
    if diff:
        return "stale", "changed: " + ", ".join(diff)
    if record.get("status") != "done":
        return "running", "started and not finished (interrupted, or running now); a re-run resumes it"
    return "done", ""


def kept(path: Path, key: str) -> dict | None:
    """The keyed record at `path` when it was written for `key`; None when it is missing, unreadable
    (it is then recomputed and replaced: gradex wrote it) or was written for another key."""
    import json

    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) and body.get("key") == key else None


def keep(path: Path, key: str, body: dict[str, Any]) -> dict[str, Any]:
    """Write `body` as the keyed record for `key` at `path` (the key first, as `kept` reads it)."""
    record = {"key": key, **{k: v for k, v in body.items() if k != "key"}}
    write_json(path, record)
    return record
