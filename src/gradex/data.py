"""Sources -> examples -> tokens.

An `Example` is one (prompt, answer) pair of one source and one split. The target's examples are
split into train / validation / test; every auxiliary source's examples are training examples.
Errors name the source, the file and the row, and are raised before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from gradex.config import Config, ConfigError, DataConfig, SourceConfig, TargetConfig

SPLITS = ("train", "validation", "test")
END = "\n"  # every answer ends with a newline, so a generated answer has a place to stop


@dataclass(frozen=True)
class Example:
    source: str
    split: str
    prompt: str
    answer: str
    choices: tuple[str, ...] = ()
    row: int = 0  # row in the source's file, for error messages


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


# ---------------------------------------------------------------------------- reading sources

def _read_rows(src: SourceConfig, where: str) -> list[dict[str, Any]]:
    if src.bigbench is not None:
        return _bigbench_rows(src.bigbench, where)
    path = Path(src.path)
    if not path.exists():
        raise ConfigError(f"{where}: file not found: {path}")
    if path.is_dir():
        try:
            import datasets

            ds = datasets.load_from_disk(str(path))
        except Exception as err:  # noqa: BLE001 - report any reason the folder is unreadable
            raise ConfigError(f"{where}: {path} is not a `datasets` folder saved with save_to_disk: {err}") from err
        if isinstance(ds, datasets.DatasetDict):
            raise ConfigError(f"{where}: {path} holds several splits {list(ds)}; point `path` at one of them")
        rows = ds.to_list()
    elif path.suffix in (".jsonl", ".json"):
        rows = []
        for i, line in enumerate(path.read_text().splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ConfigError(f"{where}: {path} row {i}: not valid JSON: {err}") from err
    elif path.suffix in (".csv", ".parquet"):
        import pandas as pd

        frame = pd.read_csv(path, dtype=str, keep_default_na=False) if path.suffix == ".csv" else pd.read_parquet(path)
        rows = frame.to_dict("records")
    else:
        raise ConfigError(f"{where}: {path}: unknown file type {path.suffix!r} (use .jsonl, .csv, .parquet or a datasets folder)")
    if src.source_column is not None:
        if rows and src.source_column not in rows[0]:
            raise ConfigError(f"{where}: {path} has no column {src.source_column!r}; columns: {sorted(rows[0])}")
        rows = [r for r in rows if str(r.get(src.source_column)) == src.source_value]
    return rows


def _bigbench_rows(task: str, where: str) -> list[dict[str, Any]]:
    from gradex.assets import bigbench_task

    try:
        spec = bigbench_task(task)
    except FileNotFoundError as err:
        raise ConfigError(f"{where}: {err}") from err
    prefix, suffix = spec.get("example_input_prefix", ""), spec.get("example_output_prefix", "")
    rows = []
    for ex in spec["examples"]:
        scores = ex.get("target_scores") or {}
        target = ex.get("target")
        if isinstance(target, list):
            target = target[0]
        if target is None and scores:
            target = max(scores, key=scores.get)
        # a task without a free-form target is multiple choice
        choices = list(scores) if "target" not in ex else None
        rows.append({"input": f"{prefix.lstrip()}{ex['input']}{suffix}".rstrip(), "target": target, "choices": choices})
    return rows


def _to_example(src: SourceConfig, row: dict[str, Any], i: int, where: str, split: str) -> Example:
    for key in (src.prompt_field, src.answer_field):
        if key not in row:
            raise ConfigError(f"{where}: row {i} has no column {key!r}; columns: {sorted(row)}")
    answer = row[src.answer_field]
    if answer is None or str(answer).strip() == "":
        raise ConfigError(f"{where}: row {i}: empty answer in column {src.answer_field!r}")
    try:
        prompt = src.template.format(**{**row, "prompt": row[src.prompt_field]}).rstrip()
    except (KeyError, IndexError) as err:
        raise ConfigError(f"{where}: template {src.template!r} names a column the row lacks: {err}") from err
    choices: tuple[str, ...] = ()
    field_ = src.choices_field or ("choices" if src.bigbench else None)
    if field_ and row.get(field_) is not None:
        choices = tuple(str(c) for c in row[field_])
        if str(answer) not in choices:
            raise ConfigError(f"{where}: row {i}: answer {answer!r} is not one of its choices")
    return Example(src.name, split, prompt, src.answer_prefix + str(answer).strip(), choices, i)


def _source_examples(src: SourceConfig, where: str, limit: int | None, seed: int, split: str) -> list[Example]:
    rows = _read_rows(src, where)
    if not rows:
        raise ConfigError(f"{where}: the source is empty (0 rows)")
    order = list(range(len(rows)))
    random.Random(f"{seed}:{src.name}").shuffle(order)
    if limit is not None:
        order = order[:limit]
    examples = [_to_example(src, rows[i], i, where, split) for i in order]
    if src.corrupt == "shuffle":
        examples = shuffle_answers(examples, f"{seed}:{src.name}:corrupt")
    return examples


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
        base = SourceConfig(path=data.sources_file)
        rows = _read_rows(base, f"data.sources_file ({data.sources_file})")
        if rows and data.sources_column not in rows[0]:
            raise ConfigError(f"data.sources_file: {data.sources_file} has no column {data.sources_column!r}; "
                              f"columns: {sorted(rows[0])}")
        for value in sorted({str(r[data.sources_column]) for r in rows}):
            if value == data.target.name:
                continue  # the target's own rows may live in the same file
            sources.append(dataclasses.replace(base, name=value, source_column=data.sources_column, source_value=value))
    names = [s.name for s in sources]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"data: duplicate source name(s) {dupes}")
    return sources


def load_examples(cfg: Config) -> list[Example]:
    """All examples in dataset order: target train, validation, test, then each source's."""
    data = cfg.data
    target: TargetConfig = data.target
    sizes = {s: getattr(target, s) for s in SPLITS}
    where = f"target {target.name!r}"
    pool = _source_examples(target, where, None, data.seed, "train")
    if len(pool) < sum(sizes.values()):
        raise ConfigError(f"{where}: has {len(pool)} examples, but train+validation+test ask for {sum(sizes.values())}")
    out, start = [], 0
    for split in SPLITS:
        out += [dataclasses.replace(e, split=split) for e in pool[start:start + sizes[split]]]
        start += sizes[split]
    for src in expand_sources(data):
        out += _source_examples(src, f"source {src.name!r}", src.limit or data.per_source, data.seed, "train")
    return out


# ---------------------------------------------------------------------------- tokens

def tokenize(tokenizer: Any, examples: Sequence[Example]) -> list[Tokenized]:
    """Prompt and answer tokenized apart (no special tokens), so the answer boundary is exact."""
    prompts = tokenizer([e.prompt for e in examples], add_special_tokens=False)["input_ids"]
    answers = tokenizer([e.answer + END for e in examples], add_special_tokens=False)["input_ids"]
    return [Tokenized(p + a, len(p)) for p, a in zip(prompts, answers)]


def check_lengths(examples: Sequence[Example], tokens: Sequence[Tokenized], max_length: int) -> None:
    for ex, tok in zip(examples, tokens):
        if len(tok.ids) > max_length:
            raise ConfigError(f"source {ex.source!r} row {ex.row}: {len(tok.ids)} tokens is longer than "
                              f"model.max_length={max_length}; raise the limit or drop the row")
        if tok.n_prompt == 0:
            raise ConfigError(f"source {ex.source!r} row {ex.row}: empty prompt")


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
    """Write examples.jsonl and a manifest of counts, token lengths and a content hash."""
    out.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({**dataclasses.asdict(e), "n_tokens": len(t.ids)}) for e, t in zip(examples, tokens)]
    body = "\n".join(lines) + "\n"
    (out / "examples.jsonl").write_text(body)
    per_source: dict[str, dict] = {}
    for e, t in zip(examples, tokens):
        s = per_source.setdefault(e.source, {"count": 0, "splits": {}, "max_tokens": 0, "total_tokens": 0})
        s["count"] += 1
        s["splits"][e.split] = s["splits"].get(e.split, 0) + 1
        s["max_tokens"] = max(s["max_tokens"], len(t.ids))
        s["total_tokens"] += len(t.ids)
    manifest = {"examples": len(examples), "sha256": hashlib.sha256(body.encode()).hexdigest(), "sources": per_source}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def read_examples(out: Path) -> list[Example]:
    rows = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines() if line]
    return [Example(r["source"], r["split"], r["prompt"], r["answer"], tuple(r["choices"]), r["row"]) for r in rows]
