"""Data that is read right: list columns in every format, errors that name the file's own line, and
the leakage check (a training prompt that repeats a target validation or test prompt)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import byte_tokenizer, write_jsonl
from gradex import cli, config, data, ledger
from gradex.config import ConfigError


def qa_rows(n: int, start: int = 0) -> list[dict]:
    """Rows whose prompts are all distinct (so no leakage unless a test puts it there)."""
    return [{"input": f"What is {i} plus {i + 1}?", "target": str(2 * i + 1)} for i in range(start, start + n)]


def make_raw(tmp_path: Path, model_dir: Path, sources: list[dict] | None = None, **data_over) -> dict:
    target = write_jsonl(tmp_path / "target.jsonl", qa_rows(30))
    if sources is None:
        sources = [{"name": "sub", "path": str(write_jsonl(tmp_path / "sub.jsonl", qa_rows(20, 100)))}]
    raw = {
        "name": "t", "runs_dir": str(tmp_path / "runs"),
        "model": {"name": str(model_dir), "precision": "fp32", "max_length": 64,
                  "lora": {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]}},
        "data": {"target": {"name": "add", "path": str(target), "train": 10, "validation": 10, "test": 10},
                 "sources": sources},
    }
    raw["data"].update(data_over)
    return raw


def prepare_fails(tmp_path: Path, raw: dict, capsys) -> str:
    """`gradex prepare` on this config: exit status 2 and the error on one line (the last on stderr,
    after any progress lines), which is returned."""
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    assert cli.main(["prepare", str(path)]) == 2
    lines = capsys.readouterr().err.splitlines()
    errors = [line for line in lines if line.startswith("gradex: error: ")]
    assert errors == lines[-1:], lines
    return errors[0]


def load(raw: dict) -> data.Examples:
    return data.load_examples(config.from_dict(raw))


def source_file_cfg(tmp_path: Path, model_dir: Path, path: Path, **source_over) -> dict:
    return make_raw(tmp_path, model_dir, sources=[{"name": "sub", "path": str(path), **source_over}])


# ---------------------------------------------------------------------------- bad inputs

def test_csv_list_cell_that_is_not_json_names_file_and_line(tmp_path, tiny_model_dir, capsys):
    path = tmp_path / "mc.csv"
    path.write_text('input,target,choices\nIs it?,yes,"[""yes"", ""no""]"\nAnd this?,no,"[""yes"", ""no""]"\n'
                    'Bad?,yes,"yes, no"\n')
    raw = source_file_cfg(tmp_path, tiny_model_dir, path, choices_field="choices")
    err = prepare_fails(tmp_path, raw, capsys)
    assert "source 'sub'" in err and "mc.csv line 4" in err and "column 'choices' is not a JSON-encoded list" in err


def test_csv_error_names_the_physical_line_after_a_multiline_cell(tmp_path, tiny_model_dir, capsys):
    # the quoted prompt of the first record spans lines 2-4, so the record with no answer is on line 6
    path = tmp_path / "multi.csv"
    path.write_text('input,target\n"one\ntwo\nthree",a\nfine,b\nno answer,\nlast,c\n')
    err = prepare_fails(tmp_path, source_file_cfg(tmp_path, tiny_model_dir, path), capsys)
    assert "multi.csv line 6: empty answer in column 'target'" in err


def test_jsonl_errors_name_the_physical_line(tmp_path, tiny_model_dir, capsys):
    rows = qa_rows(20, 100)
    rows[7]["target"] = "  "
    path = tmp_path / "bad.jsonl"
    # two blank lines at the top: row 7 sits on line 10
    path.write_text("\n\n" + "".join(json.dumps(r) + "\n" for r in rows))
    err = prepare_fails(tmp_path, source_file_cfg(tmp_path, tiny_model_dir, path), capsys)
    assert "source 'sub': " in err and "bad.jsonl line 10: empty answer in column 'target'" in err
    lines = path.read_text().splitlines()
    lines[4] = '{"input": "broken", '
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=r"bad\.jsonl line 5: not valid JSON"):
        load(source_file_cfg(tmp_path, tiny_model_dir, path))


def test_parquet_error_names_the_row(tmp_path, tiny_model_dir, capsys):
    rows = qa_rows(20, 100)
    rows[2]["target"] = ""
    path = tmp_path / "bad.parquet"
    pd.DataFrame(rows).to_parquet(path)
    err = prepare_fails(tmp_path, source_file_cfg(tmp_path, tiny_model_dir, path), capsys)
    assert "bad.parquet row 3: empty answer" in err


def test_error_in_a_filtered_source_names_the_file_line_not_the_filtered_position(tmp_path, tiny_model_dir):
    rows = [{**r, "task": "a" if i % 2 else "b"} for i, r in enumerate(qa_rows(20, 100))]
    rows[4]["target"] = ""  # the third row of source "b", on line 6 (header = line 1)
    pd.DataFrame(rows).to_csv(tmp_path / "all.csv", index=False)
    raw = make_raw(tmp_path, tiny_model_dir, sources=[], sources_file=str(tmp_path / "all.csv"), sources_column="task")
    with pytest.raises(ConfigError, match=r"source 'b': .*all\.csv line 6: empty answer"):
        load(raw)


def test_non_utf8_file_names_the_line(tmp_path, tiny_model_dir, capsys):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"input": "a", "target": "b"}\n{"input": "c", "target": "d"}\n'
                     + '{"input": "caf\u00e9", "target": "e"}\n'.encode("latin-1"))
    err = prepare_fails(tmp_path, source_file_cfg(tmp_path, tiny_model_dir, path), capsys)
    assert "source 'sub'" in err and "latin1.jsonl line 3: not UTF-8 text (byte 0xe9)" in err


def test_binary_file_is_named_and_a_parquet_file_recognized(tmp_path, tiny_model_dir, capsys):
    path = tmp_path / "data.csv"
    pd.DataFrame(qa_rows(5)).to_parquet(path)  # a Parquet file behind a .csv name
    err = prepare_fails(tmp_path, source_file_cfg(tmp_path, tiny_model_dir, path), capsys)
    assert "data.csv line" in err and "binary file" in err and "name it .parquet" in err
    path = tmp_path / "junk.parquet"
    path.write_text("input,target\n")
    with pytest.raises(ConfigError, match=r"junk\.parquet: not a readable Parquet file"):
        load(source_file_cfg(tmp_path, tiny_model_dir, path))


def test_ragged_csv_row_names_the_line(tmp_path, tiny_model_dir):
    path = tmp_path / "ragged.csv"
    path.write_text("input,target\na,b\nc,d,e\n")
    with pytest.raises(ConfigError, match=r"ragged\.csv line 3: 3 fields, but the header \(line 1\) has 2"):
        load(source_file_cfg(tmp_path, tiny_model_dir, path))
    path.write_text("\n\ninput,target\na,b\nc,d,e\n")  # blank lines before the header
    with pytest.raises(ConfigError, match=r"ragged\.csv line 5: 3 fields, but the header \(line 3\) has 2"):
        load(source_file_cfg(tmp_path, tiny_model_dir, path))


def test_source_with_both_path_and_bigbench(tmp_path, tiny_model_dir, capsys):
    raw = make_raw(tmp_path, tiny_model_dir)
    raw["data"]["sources"][0]["bigbench"] = "arithmetic/2_digit_addition"
    err = prepare_fails(tmp_path, raw, capsys)
    assert "data.sources[0] (sub): sets both `bigbench` and `path`; give exactly one" in err


@pytest.mark.parametrize("where, key, value, message", [
    ("source", "limit", 0, "data.sources[0] (sub): limit must be at least 1, got 0"),
    ("target", "limit", 5, "data.target: limit does not apply to the target"),
    ("data", "leakage", "maybe", "data.leakage: 'maybe' is not one of ['drop', 'refuse', 'warn']"),
])
def test_bad_settings_name_the_key(tmp_path, tiny_model_dir, capsys, where, key, value, message):
    raw = make_raw(tmp_path, tiny_model_dir)
    node = {"source": raw["data"]["sources"][0], "target": raw["data"]["target"], "data": raw["data"]}[where]
    node[key] = value
    assert message in prepare_fails(tmp_path, raw, capsys)


@pytest.fixture()
def fake_bigbench(tmp_path, monkeypatch) -> None:
    """A cache holding a small stand-in for the bigbench sdist (the real one is 358 MB)."""
    cache = tmp_path / "cache"
    tasks = {"arithmetic/3_digit_addition": {"examples": [{"input": f"{i} + 200 =", "target": str(i + 200)}
                                                          for i in range(100, 112)]},
             "arithmetic/2_digit_addition": {"examples": [{"input": f"{i} + 20 =", "target": str(i + 20)}
                                                          for i in range(10, 22)]},
             "arithmetic": {"name": "arithmetic"}}  # a parent task: its examples live in its subtasks
    (cache / "downloads" / "bigbench").mkdir(parents=True)
    with tarfile.open(cache / "downloads" / "bigbench" / "bigbench-1.0.0.tar.gz", "w:gz") as tar:
        for name, spec in tasks.items():
            body = json.dumps(spec).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}/task.json")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    monkeypatch.setenv("GRADEX_CACHE", str(cache))


def test_unknown_bigbench_task_names_the_closest(tmp_path, tiny_model_dir, capsys, fake_bigbench):
    raw = make_raw(tmp_path, tiny_model_dir)
    raw["data"]["sources"].append({"name": "typo", "bigbench": "arithmetic/3_digit_additon"})
    err = prepare_fails(tmp_path, raw, capsys)
    assert ("source 'typo': BIG-bench has no JSON task 'arithmetic/3_digit_additon': "
            "did you mean 'arithmetic/3_digit_addition'") in err
    raw["data"]["sources"][1]["bigbench"] = "arithmetic"
    with pytest.raises(ConfigError, match="source 'typo': BIG-bench task 'arithmetic' has no examples of its own"):
        load(raw)


def test_the_sources_bigbench_tasks_are_read_in_one_pass_over_the_package(tmp_path, tiny_model_dir, monkeypatch,
                                                                           fake_bigbench):
    """The 358 MB tarball is read once for all the sources' tasks, not once per source; each task's rows
    are its own."""
    from gradex import assets, pipeline

    opened = []
    real_open = assets.tarfile.open
    monkeypatch.setattr(assets.tarfile, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    raw = make_raw(tmp_path, tiny_model_dir)
    raw["data"]["sources"] += [{"name": "add3", "bigbench": "arithmetic/3_digit_addition"},
                               {"name": "add2", "bigbench": "arithmetic/2_digit_addition"}]
    cfg = config.from_dict(raw)
    pipeline.prepare(cfg)
    assert len(opened) == 1
    read = {s: sorted(e.answer.strip() for e in pipeline.Run(cfg).examples if e.source == s) for s in ("add2", "add3")}
    assert read == {"add2": sorted(str(i + 20) for i in range(10, 22)), "add3": sorted(str(i + 200) for i in range(100, 112))}


def bigbench_folder(root: Path, tasks: dict[str, dict]) -> Path:
    """A folder laid out as a BIG-bench checkout: bigbench/benchmark_tasks/<task>/task.json."""
    for name, spec in tasks.items():
        path = root / "bigbench" / "benchmark_tasks" / name / "task.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(spec))
    return root


def test_a_local_copy_of_bigbench_is_read_in_place_and_an_edit_reruns_prepare(tmp_path, tiny_model_dir, capsys,
                                                                               monkeypatch):
    """GRADEX_BIGBENCH names a BIG-bench checkout (or its benchmark_tasks folder): its task.json files
    are read there, nothing is downloaded or cached, and since a local copy can change (the pinned
    package cannot), its files are in prepare's ledger inputs."""
    from gradex import pipeline

    sums = [{"input": f"{i} + {i} =", "target": str(2 * i)} for i in range(12)]
    checkout = bigbench_folder(tmp_path / "BIG-bench", {"arithmetic/2_digit_addition": {"examples": sums}})
    monkeypatch.setenv("GRADEX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GRADEX_BIGBENCH", str(checkout))
    raw = make_raw(tmp_path, tiny_model_dir)
    raw["data"]["sources"].append({"name": "bb", "bigbench": "arithmetic/2_digit_addition"})
    cfg = config.from_dict(raw)
    pipeline.prepare(cfg)
    read = [e for e in pipeline.Run(cfg).examples if e.source == "bb"]
    assert sorted((e.prompt, e.answer.strip()) for e in read) == sorted((r["input"], r["target"]) for r in sums)
    assert not (tmp_path / "cache" / "bigbench").exists() and not (tmp_path / "cache" / "downloads").exists()
    assert {r["stage"]: r["state"] for r in pipeline.status(cfg)}["prepare"] == "done"
    sums[0]["target"] = "1"  # the copy is edited: prepare is stale
    bigbench_folder(checkout, {"arithmetic/2_digit_addition": {"examples": sums}})
    assert {r["stage"]: r["state"] for r in pipeline.status(cfg)}["prepare"] != "done"
    # its benchmark_tasks folder reads the same; a task it lacks names the closest it has
    monkeypatch.setenv("GRADEX_BIGBENCH", str(checkout / "bigbench" / "benchmark_tasks"))
    raw["data"]["sources"][1]["bigbench"] = "arithmetic/2_digit_additon"
    err = prepare_fails(tmp_path, raw, capsys)
    assert "source 'bb': BIG-bench has no JSON task 'arithmetic/2_digit_additon': did you mean " \
           "'arithmetic/2_digit_addition'?" in err and "GRADEX_BIGBENCH=" in err
    monkeypatch.setenv("GRADEX_BIGBENCH", str(tmp_path))  # not BIG-bench: said before anything is read
    assert f"GRADEX_BIGBENCH={tmp_path}: not a copy of BIG-bench" in prepare_fails(tmp_path, raw, capsys)


@pytest.fixture()
def no_bigbench_index(tmp_path, monkeypatch) -> Path:
    """A package index that cannot serve bigbench==1.0.0 (seen: one that lists 0.0.1 only), and an empty
    cache. An empty local index stands in for it, so no network is needed; returns the cache."""
    index = tmp_path / "index"
    index.mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")  # no machine-wide extra index or find-links
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", index.as_uri())
    monkeypatch.setenv("GRADEX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("GRADEX_BIGBENCH", raising=False)
    return tmp_path / "cache"


def test_an_index_without_bigbench_is_one_line_naming_the_source_and_what_to_do(tmp_path, tiny_model_dir, capsys,
                                                                              monkeypatch, no_bigbench_index):
    """Neither the index nor the web (here a closed local port) can serve the tasks: exit 2, one line
    naming the source that asked, what the index and the web each said, and how to supply the tasks."""
    monkeypatch.setenv("GRADEX_BIGBENCH_URL", "http://127.0.0.1:1/tasks/")
    raw = make_raw(tmp_path, tiny_model_dir)
    raw["data"]["sources"].append({"name": "bb", "bigbench": "arithmetic/2_digit_addition"})
    err = prepare_fails(tmp_path, raw, capsys)
    assert err.startswith("gradex: error: source 'bb': cannot download bigbench==1.0.0: pip: ")
    assert "; nor fetched from http://127.0.0.1:1/tasks/arithmetic/2_digit_addition/task.json: " in err
    assert "set GRADEX_BIGBENCH to a copy of BIG-bench" in err
    assert f"put the bigbench-1.0.0 sdist in {no_bigbench_index / 'downloads' / 'bigbench'}" in err
    assert not any((no_bigbench_index / "downloads" / "bigbench").iterdir())  # nothing half-downloaded kept
    assert not (no_bigbench_index / "bigbench-web").exists()


@pytest.fixture()
def served(tmp_path):
    """An HTTP server on a local port over tmp_path/www, standing in for BIG-bench's repository on the
    web; yields (its base URL, the paths it was asked for)."""
    import functools
    import http.server
    import threading

    asked: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            super().do_GET()

        def log_message(self, *args):  # quiet
            pass

    (tmp_path / "www").mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=tmp_path / "www"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", asked
    server.shutdown()
    server.server_close()


def test_an_index_without_bigbench_fetches_the_tasks_from_the_web_once(tmp_path, tiny_model_dir, capsys,
                                                                       monkeypatch, no_bigbench_index, served):
    """Where the index cannot serve the package, each needed task.json is fetched from BIG-bench's
    repository (GRADEX_BIGBENCH_URL: here a local server) into the cache, once; the fetched files are
    in prepare's ledger inputs (the web's copy is not the pinned package and can change); a task the
    repository lacks is a one-line error naming its address."""
    from gradex import pipeline

    base, asked = served
    sums = [{"input": f"{i} + {i} =", "target": str(2 * i)} for i in range(12)]
    bigbench_folder(tmp_path / "www", {"arithmetic/2_digit_addition": {"examples": sums}})
    monkeypatch.setenv("GRADEX_BIGBENCH_URL", base + "bigbench/benchmark_tasks")
    raw = make_raw(tmp_path, tiny_model_dir)
    raw["data"]["sources"].append({"name": "bb", "bigbench": "arithmetic/2_digit_addition"})
    cfg = config.from_dict(raw)
    pipeline.prepare(cfg)
    assert asked == ["/bigbench/benchmark_tasks/arithmetic/2_digit_addition/task.json"]
    read = [e for e in pipeline.Run(cfg).examples if e.source == "bb"]
    assert sorted((e.prompt, e.answer.strip()) for e in read) == sorted((r["input"], r["target"]) for r in sums)
    fetched = no_bigbench_index / "bigbench-web" / "arithmetic" / "2_digit_addition" / "task.json"
    assert json.loads(fetched.read_text()) == {"examples": sums}
    assert not (no_bigbench_index / "bigbench").exists()  # the package's cache holds only the package's
    record = ledger.read(pipeline.Run(cfg).dir / "data")
    assert record["inputs"][f"file {fetched}"] == ledger.sha256(fetched)
    # a second prepare (and a second read) asks the web for nothing
    assert {r["stage"]: r["state"] for r in pipeline.status(cfg)}["prepare"] == "done"
    pipeline.prepare(config.from_dict(raw))
    assert len(asked) == 1
    raw["data"]["sources"][1]["bigbench"] = "arithmetic/2_digit_additon"
    err = prepare_fails(tmp_path, raw, capsys)
    assert err == (f"gradex: error: source 'bb': BIG-bench has no JSON task 'arithmetic/2_digit_additon' "
                   f"({base}bigbench/benchmark_tasks/arithmetic/2_digit_additon/task.json: 404 Not Found)")


def test_misspelt_choices_field_is_an_error(tmp_path, tiny_model_dir):
    path = write_jsonl(tmp_path / "mc.jsonl", [{**r, "choices": [r["target"], "0"]} for r in qa_rows(5, 100)])
    with pytest.raises(ConfigError, match=r"source 'sub': .*mc\.jsonl: no row has the column 'options' "
                                          r"\(choices_field\)"):
        load(source_file_cfg(tmp_path, tiny_model_dir, path, choices_field="options"))


def test_too_long_example_names_file_and_line(tmp_path, tiny_model_dir):
    rows = qa_rows(20, 100)
    rows[5]["input"] = "x" * 200
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    examples = load(source_file_cfg(tmp_path, tiny_model_dir, path))
    tokens = data.tokenize(byte_tokenizer(), examples)
    with pytest.raises(ConfigError, match=r"source 'sub': .*long\.jsonl line 6: \d+ tokens is longer than "
                                          r"model\.max_length=64"):
        data.check_lengths(examples, tokens, 64)


# ---------------------------------------------------------------------------- list columns

MC_ROWS = [
    {"input": "Pick one: a, b", "target": "b, with a comma", "choices": ["a", "b, with a comma"]},
    {"input": 'Quote "this"', "target": 'say "hi"', "choices": ['say "hi"', "no"]},
    {"input": "Caf\u00e9?\nsecond line", "target": "\u00e9t\u00e9", "choices": ["hiver", "\u00e9t\u00e9", "[x]"]},
    {"input": "Free form", "target": "anything", "choices": None},  # a row that is not multiple choice
] + [{"input": f"Q{i}", "target": "yes", "choices": ["yes", "no"]} for i in range(8)]


def _as_csv(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([{**r, "choices": "" if r["choices"] is None else json.dumps(r["choices"])} for r in rows])


def test_list_columns_read_the_same_from_csv_parquet_datasets_as_from_jsonl(tmp_path, tiny_model_dir):
    import datasets

    write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    _as_csv(MC_ROWS).to_csv(tmp_path / "mc.csv", index=False)
    pd.DataFrame(MC_ROWS).to_parquet(tmp_path / "mc.parquet")
    datasets.Dataset.from_list(MC_ROWS).save_to_disk(str(tmp_path / "mc_ds"))
    read = {}
    for name in ("mc.jsonl", "mc.csv", "mc.parquet", "mc_ds"):
        examples = load(source_file_cfg(tmp_path, tiny_model_dir, tmp_path / name, choices_field="choices"))
        read[name] = [e for e in examples if e.source == "sub"]
    want = [(e.prompt, e.answer, e.choices) for e in read["mc.jsonl"]]
    assert sorted(c for _, _, c in want)[-1] == ("yes", "no")  # whole strings, not characters
    assert {e.choices for e in read["mc.jsonl"]} >= {("a", "b, with a comma"), ("hiver", "\u00e9t\u00e9", "[x]"), ()}
    for name in ("mc.csv", "mc.parquet", "mc_ds"):
        assert [(e.prompt, e.answer, e.choices) for e in read[name]] == want, name
    # the same record's number: JSONL line i+1 and Parquet row i+1; CSV line i+2 after the header, one
    # more after the record whose quoted prompt holds a newline (MC_ROWS[2], lines 4-5)
    lines = [e.row for e in read["mc.jsonl"]]
    assert lines == [e.row for e in read["mc.parquet"]] == [e.row for e in read["mc_ds"]]
    assert [e.row for e in read["mc.csv"]] == [n + 1 + (n > 3) for n in lines]


def test_csv_list_cell_that_is_json_but_not_a_list(tmp_path, tiny_model_dir):
    rows = [{**r, "choices": '{"a": 1}' if i == 2 else r["choices"]} for i, r in enumerate(_as_csv(MC_ROWS).to_dict("records"))]
    pd.DataFrame(rows).to_csv(tmp_path / "mc.csv", index=False)
    with pytest.raises(ConfigError, match=r"mc\.csv line 4: column 'choices' should be a list, got dict"):
        load(source_file_cfg(tmp_path, tiny_model_dir, tmp_path / "mc.csv", choices_field="choices"))


# ---------------------------------------------------------------------------- leakage

def leaky_raw(tmp_path: Path, model_dir: Path, mode: str) -> tuple[dict, list[str]]:
    """A source whose first three rows repeat target validation/test prompts, up to case and spaces,
    followed by 20 clean rows; the source takes 10 (limit)."""
    raw = make_raw(tmp_path, model_dir, leakage=mode)
    held = [e.prompt for e in load({**raw, "data": {**raw["data"], "leakage": "warn"}})
            if e.source == "add" and e.split != "train"]
    repeats = [{"input": f"  {held[i].upper()}  ", "target": "0"} for i in (0, 5, 15)]
    write_jsonl(tmp_path / "leaky.jsonl", repeats + qa_rows(20, 100))
    raw["data"]["sources"] = [{"name": "leaky", "path": str(tmp_path / "leaky.jsonl"), "limit": 10},
                              {"name": "sub", "path": raw["data"]["sources"][0]["path"]}]
    return raw, held


def _key_overlap(examples: list[data.Example], target: str) -> list[data.Example]:
    held = {data.prompt_key(e.prompt) for e in examples if e.source == target and e.split != "train"}
    return [e for e in examples if e.split == "train" and data.prompt_key(e.prompt) in held]


def test_leakage_drop_leaves_repeats_out_and_fills_the_limit(tmp_path, tiny_model_dir, capsys):
    raw, _ = leaky_raw(tmp_path, tiny_model_dir, "drop")
    raw["data"]["seed"] = 3
    examples = load(raw)
    assert "dropped them" in capsys.readouterr().err
    leaky = [e for e in examples if e.source == "leaky"]
    assert len(leaky) == 10 and not _key_overlap(examples, "add")
    assert {e.row for e in leaky} <= set(range(4, 24))  # lines 1-3 hold the repeats
    found = examples.leakage["sources"]["leaky"]
    assert 1 <= found <= 3 and examples.leakage == {"mode": "drop", "found": found, "dropped": found,
                                                      "sources": {"leaky": found}}
    manifest = data.save_examples(examples, data.tokenize(byte_tokenizer(), examples), tmp_path / "out")
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["leakage"] == manifest["leakage"]
    assert manifest["leakage"]["dropped"] == found and manifest["sources"]["leaky"]["count"] == 10


def test_leakage_refuse_lists_counts_and_one_example(tmp_path, tiny_model_dir, capsys):
    raw, _ = leaky_raw(tmp_path, tiny_model_dir, "refuse")
    raw["data"]["sources"][0]["limit"] = 23  # every row, so all three repeats are in use
    err = prepare_fails(tmp_path, raw, capsys)
    assert "data.leakage: refuse: 3 training example(s) repeat a target validation or test prompt: leaky 3;" in err
    assert "e.g. source 'leaky': " in err and "leaky.jsonl line " in err and "WHAT IS" in err


def test_leakage_warn_keeps_them_and_says_so(tmp_path, tiny_model_dir, capsys):
    raw, _ = leaky_raw(tmp_path, tiny_model_dir, "warn")
    raw["data"]["sources"][0]["limit"] = 23
    examples = load(raw)
    assert "kept them (data.leakage: warn)" in capsys.readouterr().err
    assert len([e for e in examples if e.source == "leaky"]) == 23
    assert len(_key_overlap(examples, "add")) == 3
    assert examples.leakage == {"mode": "warn", "found": 3, "dropped": 0, "sources": {"leaky": 3}}
    manifest = data.save_examples(examples, data.tokenize(byte_tokenizer(), examples), tmp_path / "out")
    assert manifest["leakage"]["found"] == 3


def test_leakage_within_the_target_train_split(tmp_path, tiny_model_dir, capsys):
    # every prompt twice (once in capitals): some copy lands in train while its twin is held out
    rows = qa_rows(15)
    write_jsonl(tmp_path / "twins.jsonl", rows + [{**r, "input": r["input"].upper()} for r in rows])
    raw = make_raw(tmp_path, tiny_model_dir, leakage="warn")
    raw["data"]["target"]["path"] = str(tmp_path / "twins.jsonl")
    kept = load(raw)
    overlap = _key_overlap(kept, "add")
    assert overlap and kept.leakage["sources"] == {"add": len(overlap)}
    assert f"prompt: add (train split) {len(overlap)}; kept them" in capsys.readouterr().err
    raw["data"]["leakage"] = "drop"
    dropped = load(raw)
    assert not _key_overlap(dropped, "add") and dropped.leakage["sources"]["add"] >= len(overlap)
    assert [e for e in dropped if e.split != "train"] == [e for e in kept if e.split != "train"]


def test_leakage_sees_through_a_template_but_not_other_columns(tmp_path, tiny_model_dir):
    raw = make_raw(tmp_path, tiny_model_dir, leakage="warn")
    raw["data"]["target"]["template"] = "Q: {prompt}\nA:"
    held = [r for r in qa_rows(30)]  # the target's raw prompts; some are held out
    write_jsonl(tmp_path / "plain.jsonl", held)  # the same questions, no template
    write_jsonl(tmp_path / "ctx.jsonl", [{**r, "context": "Unrelated passage."} for r in held])
    raw["data"]["sources"] = [{"name": "plain", "path": str(tmp_path / "plain.jsonl"), "limit": 30},
                              {"name": "ctx", "path": str(tmp_path / "ctx.jsonl"), "limit": 30,
                               "template": "{context}\n{prompt}"}]
    examples = load(raw)
    assert examples.leakage["sources"]["plain"] == 20  # the validation and test questions
    assert "ctx" not in examples.leakage["sources"]  # its prompt depends on another column too


def test_leakage_drop_that_empties_a_source_is_an_error(tmp_path, tiny_model_dir):
    raw, held = leaky_raw(tmp_path, tiny_model_dir, "drop")
    write_jsonl(tmp_path / "leaky.jsonl", [{"input": p, "target": "0"} for p in held[:4]])
    with pytest.raises(ConfigError, match=r"source 'leaky': all 4 of its training examples repeat a target validation"):
        load(raw)
