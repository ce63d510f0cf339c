"""`hf:` sources read with `datasets.load_dataset`, offline: the same examples as the same rows read
from a file (the oracle: the `path:` reader), the same field mapping, template, limit and errors;
a hub id is never fetched unless hf.download says so. And `sources_file` with its own columns and
template (data.sources_format)."""

from __future__ import annotations

import datasets
import pandas as pd
import pytest

from conftest import write_jsonl
from gradex import config
from gradex.config import ConfigError
from test_data import load, make_raw, prepare_fails, qa_rows


def renamed(rows: list[dict]) -> list[dict]:
    """The same rows under other column names, with a column the template uses."""
    return [{"question": r["input"], "answer": r["target"], "topic": "sums"} for r in rows]


FORMAT = {"prompt_field": "question", "answer_field": "answer", "template": "[{topic}] {prompt} =", "limit": 12}


def examples_of(raw: dict, name: str = "sub") -> list[tuple]:
    return [(e.prompt, e.answer, e.row) for e in load(raw) if e.source == name]


def test_hf_sources_read_like_the_same_rows_from_a_file(tmp_path, tiny_model_dir):
    rows = renamed(qa_rows(20, 100))
    write_jsonl(tmp_path / "sub.jsonl", rows)
    want = examples_of(make_raw(tmp_path, tiny_model_dir, [{"name": "sub", "path": str(tmp_path / "sub.jsonl"),
                                                            **FORMAT}]))
    assert len(want) == 12 and all(p.startswith("[sums] What is") and p.endswith("=") for p, _, _ in want)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows[:3])}).save_to_disk(str(tmp_path / "dict_ds"))
    (tmp_path / "folder").mkdir()
    pd.DataFrame(rows).to_parquet(tmp_path / "folder" / "part.parquet")
    specs = {
        "json data_files": {"path": "json", "data_files": [str(tmp_path / "sub.jsonl")], "split": "train"},
        "json data_files, one split": {"path": "json", "data_files": str(tmp_path / "sub.jsonl")},
        "save_to_disk folder, a split": {"path": str(tmp_path / "dict_ds"), "split": "train"},
        "folder of files": {"path": str(tmp_path / "folder"), "split": "train"},
    }
    for what, hf in specs.items():
        got = examples_of(make_raw(tmp_path, tiny_model_dir, [{"name": "sub", "hf": hf, **FORMAT}]))
        assert got == want, what  # same prompts, answers, and row numbers (JSONL line = 1-based row here)


def test_hf_source_errors_name_the_source_and_row(tmp_path, tiny_model_dir, capsys):
    rows = renamed(qa_rows(20, 100))
    rows[6]["answer"] = " "
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows[:3])}).save_to_disk(str(tmp_path / "dict_ds"))
    src = {"name": "sub", "hf": {"path": str(tmp_path / "dict_ds")}, **FORMAT, "limit": None}
    err = prepare_fails(tmp_path, make_raw(tmp_path, tiny_model_dir, [src]), capsys)
    assert "source 'sub': hf " in err and "has the splits ['train', 'test']; set hf.split to one of them" in err
    src["hf"]["split"] = "train"
    err = prepare_fails(tmp_path, make_raw(tmp_path, tiny_model_dir, [src]), capsys)
    assert f"hf {tmp_path / 'dict_ds'} split train row 7: empty answer in column 'answer'" in err
    src["prompt_field"] = "prompt"
    err = prepare_fails(tmp_path, make_raw(tmp_path, tiny_model_dir, [src]), capsys)
    assert "no row has the column 'prompt' (prompt_field)" in err
    write_jsonl(tmp_path / "sub.jsonl", rows)
    both = {"name": "sub", "path": str(tmp_path / "sub.jsonl"), "hf": {"path": "json"}}
    err = prepare_fails(tmp_path, make_raw(tmp_path, tiny_model_dir, [both]), capsys)
    assert "data.sources[0] (sub): sets both `path` and `hf`; give exactly one" in err
    bad = {"name": "sub", "hf": {"path": "json", "data_files": [3]}}
    with pytest.raises(ConfigError, match=r"hf\.data_files: expected a file"):
        config.from_dict(make_raw(tmp_path, tiny_model_dir, [bad]))


def test_a_hub_id_is_not_downloaded_unless_asked(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """Offline by default: datasets is told so, and says the id is not in the local cache."""
    seen = []
    real = datasets.load_dataset

    def spy(*args, **kwargs):
        seen.append(datasets.config.HF_HUB_OFFLINE)
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")  # an empty cache
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    src = {"name": "sub", "hf": {"path": "gradex-tests/no-such-dataset", "split": "train"}}
    err = prepare_fails(tmp_path, make_raw(tmp_path, tiny_model_dir, [src]), capsys)
    assert seen == [True] and datasets.config.HF_HUB_OFFLINE is False  # offline for the call only
    assert "hf gradex-tests/no-such-dataset split train: datasets cannot load it" in err
    assert "set hf.download: true to download it" in err


def test_sources_file_with_its_own_columns_and_template(tmp_path, tiny_model_dir):
    rows = [{**r, "task": task} for task, start in (("sub", 100), ("more", 200)) for r in renamed(qa_rows(10, start))]
    pd.DataFrame(rows).to_csv(tmp_path / "all.csv", index=False)
    raw = make_raw(tmp_path, tiny_model_dir, sources=[], sources_file=str(tmp_path / "all.csv"), sources_column="task",
                   sources_format={k: v for k, v in FORMAT.items() if k != "limit"})
    examples = load(raw)
    by_source = {s: [e for e in examples if e.source == s] for s in ("sub", "more")}
    assert all(len(v) == 10 for v in by_source.values())
    assert all(e.prompt.startswith("[sums] What is") and e.prompt.endswith("=") for v in by_source.values() for e in v)
    assert {e.answer for e in by_source["sub"]} == {f" {2 * i + 1}" for i in range(100, 110)}


def test_the_ledger_hashes_the_local_files_of_an_hf_source(tmp_path, tiny_model_dir):
    from gradex.run import Run

    path = write_jsonl(tmp_path / "sub.jsonl", renamed(qa_rows(20, 100)))
    src = {"name": "sub", "hf": {"path": "json", "data_files": [str(tmp_path / "*.jsonl")]}, **FORMAT}
    cfg = config.from_dict(make_raw(tmp_path, tiny_model_dir, [src]))
    before = Run(cfg).data_files
    assert f"file {path}" in before  # the glob expanded to the files it reads
    write_jsonl(path, renamed(qa_rows(20, 300)))
    assert Run(cfg).data_files[f"file {path}"] != before[f"file {path}"]  # an edit makes prepare stale
