"""Rows -> examples: templates, the seeded split of the target, per-source limits and corruptions,
the sources of a sources file, and the leakage check against the target's held-out prompts
(`load_examples`)."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import random
import string
import sys
from typing import Any, Sequence

import numpy as np

from gradex.config import Config, ConfigError, DataConfig, SourceConfig, TargetConfig
from gradex.data.examples import SPLITS, Example, Examples
from gradex.data.readers import Row, fetch_bigbench, read_rows, hf_label


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
    rows = read_rows(src, where)
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
        rows = read_rows(base, f"data.sources_file ({data.sources_file})")
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
    sources = expand_sources(data)
    fetch_bigbench([(where, target), *((f"source {s.name!r}", s) for s in sources)])
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
    for src in sources:
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


