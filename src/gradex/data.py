"""Sources -> examples -> tokens.

An `Example` is one (prompt, answer) pair of one source and one split. The target's examples are
split into train / validation / test; every auxiliary source's examples are training examples.
Errors name the source, the file and the file's own line (or row), and are raised before any model
is loaded. A training example whose prompt repeats a target validation or test prompt would inflate
every score; `data.leakage` says whether such examples are dropped, refused or only reported.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import dataclasses
import io
import json
import math
import numbers
import random
import string
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from gradex import ledger
from gradex.atomic import write_bytes, write_json
from gradex.config import Config, ConfigError, DataConfig, HFSourceConfig, SourceConfig, TargetConfig

SPLITS = ("train", "validation", "test")
END = "\n"  # every answer ends with a newline, so a generated answer has a place to stop


@dataclass(frozen=True)
class Example:
    source: str
    split: str
    prompt: str
    answer: str
    choices: tuple[str, ...] = ()
    row: int = 0  # the line (JSONL, CSV) or 1-based row (Parquet, datasets) in the source's file
    origin: str = ""  # file and line, e.g. "data/qa.csv line 5", for error messages


class Examples(list[Example]):
    """load_examples' result: the examples, plus what the leakage check found (for the manifest)."""

    def __init__(self, items: Iterable[Example] = (), leakage: dict[str, Any] | None = None):
        super().__init__(items)
        self.leakage: dict[str, Any] = leakage or {}


@dataclass(frozen=True)
class Tokenized:
    ids: list[int]
    n_prompt: int  # ids[n_prompt:] are the answer tokens


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) right-padded
    attention_mask: torch.Tensor  # (B, T)
    answer_mask: torch.Tensor  # (B, T) bool: True where the token is an answer token
    index: torch.Tensor  # (B,) position of each example in the dataset

    def to(self, device: torch.device) -> "Batch":
        """The batch on `device` (the model's: gradex.device.device_of); `index` stays on the CPU, since it
        only names rows of the dataset."""
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.answer_mask.to(device), self.index)


# ---------------------------------------------------------------------------- reading sources

@dataclass(frozen=True)
class Row:
    """One record of a source, with where it sits in its file, so errors point at the file itself."""

    values: dict[str, Any]
    number: int  # JSONL, CSV: the physical line the record starts on (CSV header = line 1);
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
    end = 0  # the last physical line read so far
    try:
        for record in reader:
            number, end = end + 1, reader.line_num
            if not record:  # a blank line
                continue
            if header is None:
                header = record
                dupes = sorted({c for c in header if header.count(c) > 1})
                if dupes:
                    raise ConfigError(f"{where}: {path} line {number}: the header repeats column(s) {dupes}")
                continue
            origin = f"{path} line {number}"
            if len(record) != len(header):
                raise ConfigError(f"{where}: {origin}: {len(record)} fields, but the header (line 1) has "
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


def _read_rows(src: SourceConfig, where: str) -> list[Row]:
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


def _bigbench_rows(task: str, where: str) -> list[Row]:
    from gradex.assets import bigbench_task

    try:
        spec = bigbench_task(task)
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


def _check_text(value: Any, at: str, column: str) -> None:
    """A cell that becomes text in a prompt or an answer: text, or a finite number (an arithmetic answer
    is often one); never a boolean, NaN, a mapping or a list, which str() would turn into text unseen."""
    if isinstance(value, str):
        return
    number = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if not number or not math.isfinite(value):
        raise ConfigError(f"{at}: column {column!r} should be text (or a number), got {type(value).__name__} {value!r}")


def _list_cell(value: Any, origin: str, column: str) -> tuple[str, ...]:
    """A list-valued column: a list in JSONL, Parquet and datasets folders, JSON-encoded text in CSV."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{origin}: column {column!r} is not a JSON-encoded list (write it as "
                              f'["a", "b"]): {err}') from err
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{origin}: column {column!r} should be a list, got {type(value).__name__} {value!r}")
    for item in value:
        if isinstance(item, (list, tuple, dict)) or item is None:
            raise ConfigError(f"{origin}: column {column!r}: each choice should be text, got {item!r}")
        _check_text(item, origin, column)
    return tuple(str(item) for item in value)


def _to_example(src: SourceConfig, row: Row, where: str, split: str) -> Example:
    at = f"{where}: {row.origin}"
    values = row.values
    for key in (src.prompt_field, src.answer_field):
        if key not in values:
            raise ConfigError(f"{at}: no column {key!r}; columns: {sorted(values)}")
    answer = values[src.answer_field]
    if isinstance(answer, (list, tuple, dict)):
        raise ConfigError(f"{at}: the answer in column {src.answer_field!r} should be text, got {answer!r}")
    if answer is None or str(answer).strip() == "":
        raise ConfigError(f"{at}: empty answer in column {src.answer_field!r}")
    if values[src.prompt_field] is None:
        raise ConfigError(f"{at}: empty prompt in column {src.prompt_field!r}")
    for column in dict.fromkeys([src.answer_field, src.prompt_field, *_template_columns(src.template) - {"prompt"}]):
        if column in values:
            _check_text(values[column], at, column)
    try:
        prompt = src.template.format(**{**values, "prompt": values[src.prompt_field]}).rstrip()
    except (KeyError, IndexError) as err:
        raise ConfigError(f"{at}: template {src.template!r} names a column the row lacks: {err}") from err
    if not prompt.strip():
        raise ConfigError(f"{at}: empty prompt (column {src.prompt_field!r} through template {src.template!r})")
    choices: tuple[str, ...] = ()
    field_ = src.choices_field or ("choices" if src.bigbench else None)
    if field_ and values.get(field_) not in (None, ""):  # an empty CSV cell: this row is not multiple choice
        choices = _list_cell(values[field_], at, field_)
        if str(answer) not in choices:
            raise ConfigError(f"{at}: answer {answer!r} is not one of its choices {list(choices)}")
    return Example(src.name, split, prompt, src.answer_prefix + str(answer).strip(), choices, row.number, row.origin)


def _shuffled_rows(src: SourceConfig, where: str, seed: int) -> list[Row]:
    """The source's rows in its seeded order (the first `limit` of them are its examples)."""
    rows = _read_rows(src, where)
    if not rows:
        raise ConfigError(f"{where}: the source is empty (0 rows)")
    for role in ("prompt_field", "answer_field", "choices_field"):  # a misspelt column, said once
        column = getattr(src, role)
        if column is not None and not any(column in r.values for r in rows):
            raise ConfigError(f"{where}: {src.path or src.bigbench or hf_label(src.hf)}: no row has the column {column!r} ({role}); "
                              f"columns: {sorted(rows[0].values)}")
    order = list(range(len(rows)))
    random.Random(f"{seed}:{src.name}").shuffle(order)
    return [rows[i] for i in order]


def prompt_key(text: str) -> str:
    """Casefolded, whitespace collapsed and stripped: prompts that differ only so ask the same thing."""
    return " ".join(text.casefold().split())


def _template_columns(template: str) -> set[str]:
    return {name.split(".")[0].split("[")[0] for _, name, _, _ in string.Formatter().parse(template) if name}


def _with_keys(src: SourceConfig, row: Row, where: str, split: str) -> tuple[Example, frozenset[str]]:
    """The row's example and the keys the leakage check compares: its prompt, and the prompt column
    itself when the template only adds fixed text around it ("Q: {prompt}\nA:" asks what {prompt}
    asks), so a source formatted with another template is still caught."""
    example = _to_example(src, row, where, split)
    keys = {prompt_key(example.prompt)}
    column = prompt_key(str(row.values[src.prompt_field]))
    if column and _template_columns(src.template) <= {"prompt", src.prompt_field}:
        keys.add(column)
    return example, frozenset(keys)


def _take(src: SourceConfig, where: str, rows: Sequence[Row], limit: int | None, held_out: set[str],
          drop: bool) -> tuple[list[Example], list[Example]]:
    """Training examples from `rows` in order, up to `limit`, and those of them whose prompt repeats
    a held-out one. With `drop` those are skipped and the next rows fill their places, so a source
    without leaks gets exactly the examples it got before the check existed."""
    kept: list[Example] = []
    leaked: list[Example] = []
    for row in rows:
        if limit is not None and len(kept) >= limit:
            break
        example, keys = _with_keys(src, row, where, "train")
        if keys & held_out:
            leaked.append(example)
            if drop:
                continue
        kept.append(example)
    if not kept:
        raise ConfigError(f"{where}: all {len(leaked)} of its training examples repeat a target validation or "
                          f"test prompt (data.leakage: drop leaves none)")
    return kept, leaked


def shuffle_answers(examples: list[Example], seed: str) -> list[Example]:
    """The same prompts with their answers permuted across rows: a derangement, so no example keeps
    its own answer (a permutation that fixes rows would leave some of the control's answers right)."""
    if len(examples) < 2:
        raise ConfigError(f"source {examples[0].source!r}: corrupt: shuffle needs at least 2 examples")
    rng = random.Random(seed)
    while True:
        perm = list(range(len(examples)))
        rng.shuffle(perm)
        if all(i != j for i, j in enumerate(perm)):
            break
    return [dataclasses.replace(e, answer=examples[j].answer, choices=examples[j].choices)
            for e, j in zip(examples, perm)]


def expand_sources(data: DataConfig) -> list[SourceConfig]:
    """The configured sources, plus one per distinct value of `sources_column` in `sources_file`."""
    sources = list(data.sources)
    if data.sources_file is not None:
        base = SourceConfig(path=data.sources_file, **dataclasses.asdict(data.sources_format))
        rows = _read_rows(base, f"data.sources_file ({data.sources_file})")
        if rows and data.sources_column not in rows[0].values:
            raise ConfigError(f"data.sources_file: {data.sources_file} has no column {data.sources_column!r}; "
                              f"columns: {sorted(rows[0].values)}")
        for r in rows:  # a row without a source would become a source named "None" or ""
            cell = r.values.get(data.sources_column)
            if cell is None or str(cell).strip() == "" or isinstance(cell, float) and not math.isfinite(cell):
                raise ConfigError(f"data.sources_file: {r.origin}: empty cell in column {data.sources_column!r}; "
                                  f"every row names its source")
        for value in sorted({str(r.values.get(data.sources_column)) for r in rows}):
            if value == data.target.name:
                continue  # the target's own rows may live in the same file
            sources.append(dataclasses.replace(base, name=value, source_column=data.sources_column, source_value=value))
    names = [s.name for s in sources]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"data: duplicate source name(s) {dupes}")
    return sources


def load_examples(cfg: Config) -> Examples:
    """All examples in dataset order: target train, validation, test, then each source's."""
    data = cfg.data
    target: TargetConfig = data.target
    sizes = {s: getattr(target, s) for s in SPLITS}
    total = sum(sizes.values())
    where = f"target {target.name!r}"
    pool = _shuffled_rows(target, where, data.seed)
    if len(pool) < total:
        raise ConfigError(f"{where}: has {len(pool)} examples, but train+validation+test ask for {total}")
    held: list[Example] = []
    held_keys: set[str] = set()
    validation_rows: dict[str, str] = {}  # prompt key -> the validation row that has it
    overlap: list[str] = []  # test rows that repeat a validation prompt (duplicated rows in the target's data)
    for i, row in enumerate(pool[sizes["train"]:total]):
        split = "validation" if i < sizes["validation"] else "test"
        example, keys = _with_keys(target, row, where, split)
        if split == "validation":
            validation_rows.update(dict.fromkeys(keys, row.origin))
        elif keys & validation_rows.keys():
            overlap.append(f"{row.origin} (test) repeats {validation_rows[min(keys & validation_rows.keys())]} "
                           f"(validation)")
        held.append(example)
        held_keys |= keys
    if overlap:  # the selection is chosen on validation and judged on test: shared prompts blur the two
        said = f"{where}: {len(overlap)} test example(s) repeat a validation prompt, e.g. {overlap[0]}"
        if data.leakage == "refuse":
            raise ConfigError(f"data.leakage: refuse: {said}; remove the duplicated rows so the splits are disjoint")
        print(f"gradex: warning: {said}; the splits overlap (data.leakage: refuse stops on it)", file=sys.stderr,
              flush=True)
    drop = data.leakage == "drop"
    # the target's unused rows (after its test split) can stand in for dropped train rows
    train, leaked = _take(target, where, pool[:sizes["train"]] + pool[total:], sizes["train"], held_keys, drop)
    out, leaks = [*train, *held], {target.name: leaked}
    for src in expand_sources(data):
        at = f"source {src.name!r}"
        examples, leaks[src.name] = _take(src, at, _shuffled_rows(src, at, data.seed), src.limit or data.per_source,
                                          held_keys, drop)
        if src.corrupt == "shuffle":
            examples = shuffle_answers(examples, f"{data.seed}:{src.name}:corrupt")
        out += examples
    return Examples(out, _report_leakage(data.leakage, leaks, target.name))


def _report_leakage(mode: str, leaks: dict[str, list[Example]], target: str) -> dict[str, Any]:
    """Refuse, or say what was dropped or kept; the returned counts go in the data manifest."""
    counts = {name: len(found) for name, found in leaks.items() if found}
    total = sum(counts.values())
    report = {"mode": mode, "found": total, "dropped": total if mode == "drop" else 0, "sources": counts}
    if not total:
        return report
    listed = ", ".join(f"{name}{' (train split)' if name == target else ''} {n}" for name, n in counts.items())
    first = next(e for found in leaks.values() for e in found)
    what = f"{total} training example(s) repeat a target validation or test prompt: {listed}"
    if mode == "refuse":
        prompt = first.prompt if len(first.prompt) <= 80 else first.prompt[:77] + "..."
        raise ConfigError(f"data.leakage: refuse: {what}; e.g. source {first.source!r}: {first.origin}: "
                          f"{prompt!r}; set data.leakage to drop to leave them out")
    verb = "dropped them" if mode == "drop" else "kept them (data.leakage: warn); they inflate every score"
    # prepare runs on one process only, so this prints once
    print(f"gradex: data.leakage: {what}; {verb}", file=sys.stderr, flush=True)
    return report


# ---------------------------------------------------------------------------- tokens

# gradex.model.load_tokenizer marks a tokenizer whose chat template the examples go through
# (model.chat_template: auto, and the tokenizer has one), so every caller that tokenizes with it (the
# data, multiple-choice scoring, generation) formats examples alike.
CHAT = "gradex_chat_template"
# ... and a tokenizer of an encoder-decoder model (T5), whose examples are formatted for it (`tokenize`)
ENCODER_DECODER = "gradex_encoder_decoder"


def uses_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, CHAT, False))


def for_encoder_decoder(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, ENCODER_DECODER, False))


def _ending_with_eos(tokenizer: Any, rows: list[list[int]]) -> list[list[int]]:
    """Each row as the tokenizer encoded it, with its EOS appended where the tokenizer did not end it so."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("model.name: the tokenizer of this encoder-decoder has no EOS token to end prompts and "
                          "answers with")
    return [list(r) if r and r[-1] == eos else [*r, eos] for r in rows]


def leading_special_ids(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer itself puts before a text (a Llama tokenizer's BOS; none for
    SmolLM2's GGUF tokenizer, whose bos_token <|im_start|> it never adds): its own add_special_tokens
    behaviour, without what it may append (an EOS)."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    start = next((k for k in range(len(full) - len(bare) + 1) if full[k:k + len(bare)] == bare), 0)
    return list(full[:start])


def chat_parts(tokenizer: Any, prompt: str, answer: str) -> tuple[str, str]:
    """(prompt as a user turn up to the assistant's opening, the answer and the end of its turn), as
    the tokenizer's chat template renders them: the first is what generation starts from, the
    second what the loss is on."""
    user = [{"role": "user", "content": prompt}]
    head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    whole = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": answer}], tokenize=False)
    if not whole.startswith(head) or answer not in whole[len(head):]:
        raise ConfigError("model.chat_template: auto: the tokenizer's chat template does not render the prompt "
                          "as a prefix of the conversation and the answer after it; set model.chat_template: none")
    return head, whole[len(head):]


def prompt_ids(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """The token ids generation starts from (an encoder-decoder's encoder input), formatted as `tokenize`
    formats the prompts."""
    if for_encoder_decoder(tokenizer):  # as the tokenizer encodes a text (T5: the text, then </s>)
        return _ending_with_eos(tokenizer, tokenizer(list(prompts), add_special_tokens=True)["input_ids"])
    if uses_chat_template(tokenizer):  # the template writes its own BOS, so no special tokens are added
        heads = [chat_parts(tokenizer, p, "")[0] for p in prompts]
        return tokenizer(heads, add_special_tokens=False)["input_ids"]
    bos = leading_special_ids(tokenizer)
    return [bos + ids for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]


def generated_answer(tokenizer: Any, ids: Sequence[int]) -> str:
    """The answer in generated token ids: the text up to END, or up to the end of the assistant turn (an
    encoder-decoder's decoder tokens: up to its EOS)."""
    if for_encoder_decoder(tokenizer):
        ids = list(ids)
        eos = tokenizer.eos_token_id
        ids = ids[:ids.index(eos)] if eos in ids else ids
        return tokenizer.decode(ids, skip_special_tokens=True).split(END)[0].strip()
    if not uses_chat_template(tokenizer):
        return tokenizer.decode(list(ids), skip_special_tokens=True).split(END)[0].strip()
    end = chat_parts(tokenizer, "", "\x00")[1].split("\x00", 1)[1].strip()  # e.g. <|im_end|>
    end_ids = tokenizer(end, add_special_tokens=False)["input_ids"] if end else []
    ids = list(ids)
    cut = next((k for k in range(len(ids)) if end_ids and ids[k:k + len(end_ids)] == end_ids), len(ids))
    return tokenizer.decode(ids[:cut], skip_special_tokens=True).split(END)[0].strip()


def tokenize(tokenizer: Any, examples: Sequence[Example]) -> list[Tokenized]:
    """Prompt and answer tokenized apart, so the answer boundary is exact; the answer tokens are what
    the loss is on. Plain: the tokenizer's own leading special tokens (BOS where it adds one), the
    prompt, then the answer and END. Chat template: the prompt as a user turn through the opening of
    the assistant turn, then the answer (without its answer_prefix: the turn separates them) and the
    end of the turn, which is then the end marker. Encoder-decoder (T5): the prompt, then the answer,
    each as the tokenizer encodes a text with its special tokens and ending with EOS (T5's tokenizer
    appends </s>; EOS is appended where a tokenizer does not); the prompt is the encoder's input and
    the answer the decoder's labels (gradex.model.encoder_decoder_batch), and the EOS is the end marker
    (T5's tokenizer cannot write END, a newline, which it reads as a space)."""
    if for_encoder_decoder(tokenizer):
        prompts = prompt_ids(tokenizer, [e.prompt for e in examples])
        answers = tokenizer([e.answer for e in examples], add_special_tokens=True)["input_ids"]
        answers = _ending_with_eos(tokenizer, answers)
    elif uses_chat_template(tokenizer):
        parts = [chat_parts(tokenizer, e.prompt, e.answer.strip()) for e in examples]
        prompts = tokenizer([head for head, _ in parts], add_special_tokens=False)["input_ids"]
        answers = tokenizer([tail for _, tail in parts], add_special_tokens=False)["input_ids"]
    else:
        prompts = prompt_ids(tokenizer, [e.prompt for e in examples])
        answers = tokenizer([e.answer + END for e in examples], add_special_tokens=False)["input_ids"]
    return [Tokenized(p + a, len(p)) for p, a in zip(prompts, answers)]


def tokenize_openings(tokenizer: Any, examples: Sequence[Example]) -> list[Tokenized]:
    """Each example's prompt as `tokenize` formats it, then its answer without what ends an answer (END,
    the end of the assistant turn, EOS): the tokens that score a text that only opens an answer, such as
    the "Yes" of "Yes. <reasons>". Chat template: the assistant turn up to the end of the answer text."""
    prompts = prompt_ids(tokenizer, [e.prompt for e in examples])
    if uses_chat_template(tokenizer) and not for_encoder_decoder(tokenizer):
        texts = []
        for e in examples:
            _, tail = chat_parts(tokenizer, e.prompt, e.answer.strip())
            texts.append(tail[:tail.index(e.answer.strip()) + len(e.answer.strip())])
    else:
        texts = [e.answer for e in examples]
    answers = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [Tokenized(p + a, len(p)) for p, a in zip(prompts, answers)]


def check_lengths(examples: Sequence[Example], tokens: Sequence[Tokenized], max_length: int) -> None:
    for ex, tok in zip(examples, tokens):
        if len(tok.ids) > max_length:
            raise ConfigError(f"source {ex.source!r}: {ex.origin or f'row {ex.row}'}: {len(tok.ids)} tokens is "
                              f"longer than model.max_length={max_length}; raise the limit or drop the row")
        if tok.n_prompt == 0:
            raise ConfigError(f"source {ex.source!r}: {ex.origin or f'row {ex.row}'}: empty prompt")


def collate(tokens: Sequence[Tokenized], index: Iterable[int], pad_id: int) -> Batch:
    width = max(len(t.ids) for t in tokens)
    ids = torch.full((len(tokens), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(tokens), width), dtype=torch.long)
    answer = torch.zeros((len(tokens), width), dtype=torch.bool)
    for row, t in enumerate(tokens):
        ids[row, :len(t.ids)] = torch.tensor(t.ids)
        attn[row, :len(t.ids)] = 1
        answer[row, t.n_prompt:len(t.ids)] = True
    return Batch(ids, attn, answer, torch.tensor(list(index), dtype=torch.long))


def batches(tokens: Sequence[Tokenized], indices: Sequence[int], batch_size: int, pad_id: int) -> Iterable[Batch]:
    """Batches of the given examples in the given order."""
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        yield collate([tokens[i] for i in chunk], chunk, pad_id)


# ---------------------------------------------------------------------------- manifest

def save_examples(examples: Sequence[Example], tokens: Sequence[Tokenized], out: Path) -> dict:
    """Write examples.jsonl and a manifest of counts, token lengths, a content hash and (for
    load_examples' result) what the leakage check found."""
    out.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({**dataclasses.asdict(e), "n_tokens": len(t.ids)}) for e, t in zip(examples, tokens)]
    body = "\n".join(lines) + "\n"
    write_bytes(out / "examples.jsonl", body.encode())
    per_source: dict[str, dict] = {}
    for e, t in zip(examples, tokens):
        s = per_source.setdefault(e.source, {"count": 0, "splits": {}, "max_tokens": 0, "total_tokens": 0})
        s["count"] += 1
        s["splits"][e.split] = s["splits"].get(e.split, 0) + 1
        s["max_tokens"] = max(s["max_tokens"], len(t.ids))
        s["total_tokens"] += len(t.ids)
    manifest = {"examples": len(examples), "sha256": ledger.sha256(out / "examples.jsonl"), "sources": per_source}
    if isinstance(examples, Examples):
        manifest["leakage"] = examples.leakage
    write_json(out / "manifest.json", manifest)
    return manifest


def read_examples(out: Path) -> list[Example]:
    rows = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines() if line]
    return [Example(r["source"], r["split"], r["prompt"], r["answer"], tuple(r["choices"]), r["row"], r.get("origin", ""))
            for r in rows]


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


def data_sha256(examples: list[Example], tokens: list[Tokenized]) -> str:
    """The hash of what training and evaluation see (sources, splits, texts, token ids), in order;
    provenance (file lines) is left out, so renumbering a file's rows makes nothing stale."""
    h = hashlib.sha256()
    for e, t in zip(examples, tokens):
        h.update(json.dumps([e.source, e.split, e.prompt, e.answer, list(e.choices), t.ids, t.n_prompt]).encode())
    return h.hexdigest()[:16]
