"""Reading a source's rows: JSONL, CSV, Parquet, a saved `datasets` folder, the hub (`hf:`) and
BIG-bench tasks (streamed from the bigbench package), each row named by its file and line; a
BIG-bench task's answer pattern and target scores."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from gradex.config import ConfigError, HFSourceConfig, SourceConfig
from gradex.errors import AssetError


@dataclass(frozen=True)
class Row:
    """One record of a source, with where it sits in its file, so errors point at the file itself."""

    values: dict[str, Any]
    number: int  # JSONL, CSV: the physical line the record starts on (the CSV header's line counts);
    # Parquet, datasets folder: the 1-based row; BIG-bench: the 1-based example of task.json
    origin: str  # e.g. "data/qa.csv line 5", for messages


def _one_line(err: BaseException) -> str:
    """A foreign library's message on one line (the CLI prints every error as one line)."""
    return " ".join(str(err).split())


def _read_text(path: Path, where: str) -> str:
    """The file as UTF-8 text; a binary or otherwise-encoded file is an error naming the line."""
    raw = path.read_bytes()
    nul = raw.find(b"\0")
    if nul >= 0:
        hint = " (it is a Parquet file: name it .parquet)" if raw.startswith(b"PAR1") else ""
        line = raw.count(b"\n", 0, nul) + 1
        raise ConfigError(f"{where}: {path} line {line}: a NUL byte: this is a binary file, not {path.suffix} "
                          f"text{hint}")
    try:
        return raw.decode("utf-8-sig")  # a leading byte-order mark, as some editors write, is not data
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ConfigError(f"{where}: {path} line {line}: not UTF-8 text (byte 0x{raw[err.start]:02x}); "
                          f"save the file as UTF-8") from err


def _jsonl_rows(path: Path, where: str) -> list[Row]:
    rows = []
    # split on "\n" only: str.splitlines would also split inside a JSON string holding U+2028
    for number, line in enumerate(_read_text(path, where).split("\n"), start=1):
        if not line.strip():
            continue
        origin = f"{path} line {number}"
        try:
            values = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{where}: {origin}: not valid JSON: {err}") from err
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: {origin}: expected a JSON object, got {type(values).__name__}")
        rows.append(Row(values, number, origin))
    return rows


def _csv_rows(path: Path, where: str) -> list[Row]:
    # the csv module rather than pandas: it tells which physical line a record starts on, and a quoted
    # cell may span lines
    reader = csv.reader(io.StringIO(_read_text(path, where), newline=""))
    rows: list[Row] = []
    header: list[str] | None = None
    header_line = 0
    end = 0  # the last physical line read so far
    try:
        for record in reader:
            number, end = end + 1, reader.line_num
            if not record:  # a blank line
                continue
            if header is None:
                header, header_line = record, number
                dupes = sorted({c for c in header if header.count(c) > 1})
                if dupes:
                    raise ConfigError(f"{where}: {path} line {number}: the header repeats column(s) {dupes}")
                continue
            origin = f"{path} line {number}"
            if len(record) != len(header):
                raise ConfigError(f"{where}: {origin}: {len(record)} fields, but the header (line {header_line}) has "
                                  f"{len(header)}")
            rows.append(Row(dict(zip(header, record)), number, origin))
    except csv.Error as err:
        raise ConfigError(f"{where}: {path} line {reader.line_num}: not valid CSV: {_one_line(err)}") from err
    return rows


def _parquet_rows(path: Path, where: str) -> list[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(path).to_pylist()  # list columns come back as Python lists
    except (pa.ArrowException, OSError) as err:
        raise ConfigError(f"{where}: {path}: not a readable Parquet file: {_one_line(err)}") from err
    return [Row(values, number, f"{path} row {number}") for number, values in enumerate(records, start=1)]


def _dataset_rows(path: Path, where: str) -> list[Row]:
    try:
        import datasets

        ds = datasets.load_from_disk(str(path))
    except Exception as err:  # noqa: BLE001 - report any reason the folder is unreadable
        raise ConfigError(f"{where}: {path} is not a `datasets` folder saved with save_to_disk: "
                          f"{_one_line(err)}") from err
    if isinstance(ds, datasets.DatasetDict):
        raise ConfigError(f"{where}: {path} holds several splits {list(ds)}; point `path` at one of them")
    return [Row(values, number, f"{path} row {number}") for number, values in enumerate(ds.to_list(), start=1)]


READERS = {".jsonl": _jsonl_rows, ".json": _jsonl_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}


def hf_label(hf: HFSourceConfig) -> str:
    """How messages name a `datasets` source, e.g. "hf json ['a.jsonl'] split train"."""
    parts = [f"hf {hf.path}", f"({hf.name})" if hf.name else "", f"{hf.data_files}" if hf.data_files else "",
             f"split {hf.split}" if hf.split else "", f"revision {hf.revision}" if hf.revision else ""]
    return " ".join(p for p in parts if p)


def hf_local_files(hf: HFSourceConfig) -> list[str]:
    """The local files and folders a `datasets` source reads (for the ledger's hashes): its path when
    it is on disk, and its data_files (globs expanded)."""
    import glob

    files = hf.data_files
    items = files if isinstance(files, list) else list(files.values()) if isinstance(files, dict) else [files]
    named = [f for item in items if item is not None for f in (item if isinstance(item, list) else [item])]
    found = [hf.path] if Path(hf.path).exists() else []
    for name in named:
        found += sorted(glob.glob(name)) or [name]  # a missing file is hashed as "missing"
    return found


@contextlib.contextmanager
def _hub_access(allowed: bool) -> Iterator[None]:
    """datasets without the network unless `allowed`: a hub id then comes from the local cache only.
    datasets has no per-call switch; its module-level offline flag is read at call time."""
    import datasets

    if allowed:
        yield
        return
    saved = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = saved


def _hf_rows(hf: HFSourceConfig, where: str) -> list[Row]:
    """The rows of a `datasets` source, numbered 1-based within its split."""
    import datasets

    label = hf_label(hf)
    local = Path(hf.path)
    try:
        if local.is_dir() and any((local / f).exists() for f in ("state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(str(local))  # a save_to_disk folder, which load_dataset does not read
            if hf.split is not None and isinstance(ds, datasets.DatasetDict):
                ds = ds[hf.split]
        else:
            with _hub_access(hf.download):
                ds = datasets.load_dataset(hf.path, hf.name, split=hf.split, revision=hf.revision,
                                           data_files=hf.data_files)
    except Exception as err:  # noqa: BLE001 - datasets raises many kinds; each becomes one line naming the source
        hub = not local.exists() and hf.path not in ("json", "csv", "parquet", "text", "arrow")
        hint = ("; gradex reads a hub dataset from the local Hugging Face cache only: set hf.download: true to "
                "download it" if hub and not hf.download else "")
        raise ConfigError(f"{where}: {label}: datasets cannot load it: {_one_line(err)}{hint}") from err
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise ConfigError(f"{where}: {label} has the splits {list(ds)}; set hf.split to one of them")
        ds = next(iter(ds.values()))
    return [Row(values, number, f"{label} row {number}") for number, values in enumerate(ds.to_list(), start=1)]


def read_rows(src: SourceConfig, where: str) -> list[Row]:
    if src.bigbench is not None:
        return _bigbench_rows(src.bigbench, where)
    if src.hf is not None:
        rows, path = _hf_rows(src.hf, where), hf_label(src.hf)
    else:
        rows, path = _file_rows(Path(src.path), where), src.path
    if src.source_column is not None:
        if rows and src.source_column not in rows[0].values:
            raise ConfigError(f"{where}: {path} has no column {src.source_column!r}; columns: {sorted(rows[0].values)}")
        rows = [r for r in rows if str(r.values.get(src.source_column)) == src.source_value]
    return rows


def _file_rows(path: Path, where: str) -> list[Row]:
    if not path.exists():
        raise ConfigError(f"{where}: file not found: {path}")
    if path.is_dir():
        return _dataset_rows(path, where)
    if path.suffix in READERS:
        return READERS[path.suffix](path, where)
    raise ConfigError(f"{where}: {path}: unknown file type {path.suffix!r} (use .jsonl, .csv, .parquet or a datasets folder)")


def fetch_bigbench(named: list[tuple[str, SourceConfig]]) -> None:
    """Every BIG-bench task these sources name (each with where it is named), in one go: one pass over
    the package's tarball, or one round of fetches from the web, instead of one per source. Where the
    tasks cannot be had at all it is said here, naming the first source that asked; an unknown task is
    left to its source's own read, which names it and the closest known."""
    from gradex.assets import bigbench_tasks

    tasks = [(where, src.bigbench) for where, src in named if src.bigbench is not None]
    if len(tasks) < 2:
        return
    try:
        bigbench_tasks([task for _, task in tasks])
    except AssetError as err:
        raise AssetError(f"{tasks[0][0]}: {err}") from err
    except FileNotFoundError:
        pass


def _bigbench_rows(task: str, where: str) -> list[Row]:
    from gradex.assets import bigbench_task

    try:
        spec = bigbench_task(task)
    except AssetError as err:  # the tasks cannot be had here: said with the source that asked for them
        raise AssetError(f"{where}: {err}") from err
    except FileNotFoundError as err:
        raise ConfigError(f"{where}: {err}") from err
    if not spec.get("examples"):  # e.g. `arithmetic`, whose examples live in its subtasks
        raise ConfigError(f"{where}: BIG-bench task {task!r} has no examples of its own; if it has subtasks, name "
                          f"one, e.g. {task.strip('/')}/<subtask>")
    prefix, suffix = spec.get("example_input_prefix", ""), spec.get("example_output_prefix", "")
    rows = []
    for number, ex in enumerate(spec["examples"], start=1):
        scores = ex.get("target_scores") or {}
        target = ex.get("target")
        if isinstance(target, list):
            target = target[0]
        if target is None and scores:
            target = max(scores, key=scores.get)
        # a task without a free-form target is multiple choice
        choices = list(scores) if "target" not in ex else None
        values = {"input": f"{prefix.lstrip()}{ex['input']}{suffix}".rstrip(), "target": target, "choices": choices}
        rows.append(Row(values, number, f"BIG-bench task {task} example {number}"))
    return rows


def answer_pattern(src: SourceConfig) -> str | None:
    """The regular expression exact match extracts this source's answers with, from the generation and
    the reference alike (gradex.evaluate): its `answer_pattern`, else a BIG-bench task's own
    `output_regex`, else None (the whole answer).
    A BIG-bench pattern that is not a valid Python regular expression is an error naming the task."""
    from gradex.config import check_pattern

    if src.answer_pattern is not None or src.bigbench is None:
        return src.answer_pattern
    from gradex.assets import bigbench_task

    pattern = bigbench_task(src.bigbench).get("output_regex")
    if pattern is not None:
        check_pattern(pattern, f"source {src.name!r}: BIG-bench task {src.bigbench} output_regex")
    return pattern


def target_scores(src: SourceConfig) -> dict[int, dict[str, float]]:
    """A BIG-bench task's `target_scores` by example (its 1-based number in task.json, an Example's
    `row`): the options a chain-of-thought target's answer opens with (strategyqa: {"Yes": 1, "No": 0}
    beside the target "Yes. <reasons>"). An example without them is an error naming it."""
    from gradex.assets import bigbench_task

    where = "data.target.metric: options"
    if src.bigbench is None:
        raise ConfigError(f"{where}: source {src.name!r} is not a BIG-bench task, so it has no target_scores")
    found = {}
    for number, ex in enumerate(bigbench_task(src.bigbench)["examples"], start=1):
        scores = ex.get("target_scores")
        if not scores:
            raise ConfigError(f"{where}: BIG-bench task {src.bigbench} example {number} has no target_scores; "
                              f"use first_word or exact_match")
        found[number] = {str(option): float(score) for option, score in scores.items()}
    return found


