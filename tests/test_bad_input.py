"""Harder bad input, through the CLI as a user meets it: each case exits 2 with one line that names the
key, file or row, before any stage runs, and leaves the user's files as they were."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import arithmetic_rows, tiny_run_config, write_config, write_jsonl
from gradex import config
from gradex.cli import main


def _refused(capsys, args: list[str], message: str) -> None:
    """`gradex <args>` exits 2 with one error line holding `message` (after any progress lines), and no
    traceback."""
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith("gradex: error:")]
    assert len(errors) == 1 and errors[0] == err.splitlines()[-1] and "Traceback" not in err, err
    assert message in errors[0], err


def _file(tmp_path: Path, name: str, data: bytes | str) -> str:
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


# (what, the config file's text or bytes, or --set overrides, and what the one line must say)
CONFIG_CASES = [
    ("not UTF-8", b"name: caf\xe9\n", "latin.yaml, line 1: not UTF-8 text (byte 0xe9)"),
    ("a repeated key", "meta: {epochs: 1}\nmeta: {epochs: 2}\n", "line 2: the key 'meta' is given twice"),
    ("a repeated nested key", "meta:\n  lr: 0.1\n  lr: 0.2\n", "line 3: the key 'lr' is given twice"),
    ("binary bytes", b"\x00\x01", "not valid YAML: unacceptable character #x0000"),
    ("unbalanced YAML", "meta: {epochs: 1\n", "line 2, column 1: not valid YAML"),
    ("a list, not a mapping", "- a\n- b\n", "c.yaml: expected a mapping of sections (meta:, data:, ...), got list"),
    ("an override that is not YAML", ["meta.epochs=[1"], "override 'meta.epochs=[1', line 1, column 3: not valid YAML"),
    ("an override with an empty key part", ["meta..epochs=1"], "'meta..epochs' is not a key path"),
    ("an override with no value", ["meta.epochs"], "override 'meta.epochs': expected key=value"),
    ("NaN", ["meta.lr=.nan"], "meta.lr: expected a finite number, got nan"),
    ("infinity", ["meta.lr=.inf"], "meta.lr: expected a finite number, got inf"),
    ("infinite epochs", ["finetune.epochs=.inf"], "finetune.epochs: expected a finite number, got inf"),
    ("infinite output change", ["estimate.output_change=.inf"], "estimate.output_change: expected a finite number"),
    ("infinite weight decay", ["refit.weight_decay=.inf"], "refit.weight_decay: expected a finite number"),
    ("NaN as text", ["select.alpha=nan"], "select.alpha: expected a finite number, got nan"),
    ("top_k 0", ["select.top_k=0"], "select.top_k: must be at least 1 (or null), got 0"),
    ("bootstrap 1", ["select.bootstrap=1"], "select.bootstrap: resamples, 0 (none) or at least 2, got 1"),
    ("a negative seed", ["data.seed=-1"], "data.seed: must be >= 0, got -1"),
    ("a negative projection seed", ["gradients.seed=-7"], "gradients.seed: must be >= 0, got -7"),
    ("a template that does not parse", "data:\n  target: {name: t, path: t.jsonl, template: 'Q: {prompt'}\n",
     "data.target.template: 'Q: {prompt' is not a format string"),
    ("a positional template field", "data:\n  target: {name: t, path: t.jsonl, template: 'Q: {}'}\n",
     "data.target.template: 'Q: {}': the field {} is not a column name"),
    ("an attribute in a template", "data:\n  target: {name: t, path: t.jsonl, template: '{prompt.__class__}'}\n",
     "the field {prompt.__class__} is not a column name"),
    ("a comma in a source name", ["data.sources=[{name: 'a,b', bigbench: arithmetic/2_digit_addition}]"],
     "data.sources[0] (a,b): name 'a,b': no commas"),
    ("a mix naming an unknown source", ["compare.mixes={mine: [add2, nosuch]}"],
     "compare.mixes.mine: unknown source(s) ['nosuch']"),
    ("a directory as the config", None, "not a file"),
    ("an unknown corruption", ["data.sources=[{name: a, bigbench: arithmetic/2_digit_addition, corrupt: reverse}]"],
     "data.sources[0] (a).corrupt: 'reverse' is not one of ['shuffle']"),
    ("an unknown baseline", ["compare.baselines=[all, oracle]"], "compare.baselines: 'oracle' is not one of"),
    ("a prior without max_shift", ["select.prior={add2: 1.0}"], "select: `prior` and `max_shift` go together"),
    ("a prior that does not sum to 1", ["select.prior={add2: 0.5}", "select.max_shift=0.2"],
     "select.prior: the shares must sum to 1, got 0.5"),
    ("a prior naming an unknown source", ["select.prior={nosuch: 1.0}", "select.max_shift=0.2"],
     "select.prior: unknown name(s) ['nosuch']"),
    ("max_repeats 0", ["select.max_repeats=0"], "select.max_repeats: must be positive (or null), got 0.0"),
    ("a token budget beside max_steps", ["finetune.max_tokens=1000", "finetune.max_steps=10"],
     "finetune.max_tokens: a positive equal budget in tokens, instead of max_steps"),
    ("weights under an epochs budget", ["select.method=weights", "finetune.budget=epochs"],
     "select.method weights: proportions share a fixed budget of steps"),
    ("weights under an epochs budget, mean weighting",  # was accepted, then a TypeError in prepare
     ["select.method=weights", "finetune.budget=epochs", "estimate.weighting=mean"],
     "select.method weights: proportions share a fixed budget of steps, and finetune.budget epochs gives each"),
]


@pytest.mark.parametrize("what, given, message", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_is_one_line_and_exit_2(tmp_path, capsys, what, given, message):
    if given is None:
        args = ["config", str(tmp_path)]
    elif isinstance(given, list):
        args = ["config", *[a for item in given for a in ("--set", item)]]
    else:
        args = ["config", _file(tmp_path, "latin.yaml" if what == "not UTF-8" else "c.yaml", given)]
    _refused(capsys, args, message)


@pytest.mark.parametrize("args", [["compare", "--seeds", "0"], ["compare", "--seeds", "-1"],
                                  ["validate", "--subsets", "0"], ["validate", "--seeds", "-2"],
                                  ["validate", "--subsets", "two"]])
def test_counts_on_the_command_line_are_whole_numbers_of_at_least_one(capsys, args):
    """Said by the parser, exit 2, before any stage runs (they were a ValueError after every upstream
    stage, or --seeds 0 quietly meant compare.seeds)."""
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "must be at least 1" in err or "expected a whole number" in err


def test_an_override_on_a_config_that_is_not_a_mapping_is_one_line(tmp_path, capsys):
    _refused(capsys, ["config", _file(tmp_path, "c.yaml", "- a\n- b\n"), "--set", "meta.epochs=1"],
             "c.yaml: expected a mapping of sections (meta:, data:, ...), got list")


def _rows_case(tmp_path: Path, model_dir: Path, what: str) -> tuple[str, str]:
    """A tiny run whose data has one adversarial row; returns (config path, what the error must say)."""
    cfg = tiny_run_config(tmp_path, model_dir)
    rows = arithmetic_rows(24, "-", 3)
    if what == "a boolean answer":
        rows[4]["target"] = True
        said = "sub.jsonl line 5: column 'target' should be text (or a number), got bool True"
    elif what == "a NaN prompt":
        rows[2]["input"] = math.nan
        said = "sub.jsonl line 3: column 'input' should be text (or a number), got float nan"
    elif what == "an object as the prompt":
        rows[6]["input"] = {"a": 1}
        said = "sub.jsonl line 7: column 'input' should be text (or a number), got dict"
    elif what == "a boolean choice":
        for r in rows:
            r["choices"] = [r["target"], "x"]
        rows[1]["choices"] = [rows[1]["target"], False]
        cfg.data.sources[2].choices_field = "choices"
        said = "sub.jsonl line 2: column 'choices' should be text (or a number), got bool False"
    elif what == "a duplicated target row across validation and test":
        # 30 prompts, each twice: seed 0's shuffle puts some prompt in both validation (16) and test (16)
        write_jsonl(tmp_path / "add.jsonl", [{"input": f"{i}#{i}=", "target": str(2 * i)} for i in range(30)] * 2)
        cfg.data.leakage = "refuse"  # drop and warn say so and go on
        said = "test example(s) repeat a validation prompt, e.g. "
    elif what == "an empty source cell":
        pool = [dict(r, src="mul") for r in arithmetic_rows(10, "*", 5)]
        pool[3]["src"] = ""
        write_jsonl(tmp_path / "pool.jsonl", pool)
        cfg.data.sources_file, cfg.data.sources_column = str(tmp_path / "pool.jsonl"), "src"
        said = "pool.jsonl line 4: empty cell in column 'src'; every row names its source"
    else:
        raise KeyError(what)
    if what not in ("a duplicated target row across validation and test", "an empty source cell"):
        write_jsonl(tmp_path / "sub.jsonl", rows)
    return str(write_config(cfg, tmp_path / "cfg.yaml")), said


ROW_CASES = ["a boolean answer", "a NaN prompt", "an object as the prompt", "a boolean choice",
             "a duplicated target row across validation and test", "an empty source cell"]


@pytest.mark.parametrize("what", ROW_CASES)
def test_bad_rows_are_named_before_any_stage_runs(tmp_path, tiny_model_dir, capsys, what):
    path, message = _rows_case(tmp_path, tiny_model_dir, what)
    before = {p: p.read_bytes() for p in tmp_path.glob("*.jsonl")}
    _refused(capsys, ["run", path], message)
    assert {p: p.read_bytes() for p in tmp_path.glob("*.jsonl")} == before  # the user's data untouched
    run_dir = Path(config.load(path).run_dir)
    assert not (run_dir / "meta").exists() and not (run_dir / "store").exists()  # nothing expensive began


def test_caps_no_proportions_can_meet_are_refused_at_prepare(tmp_path, tiny_model_dir, capsys):
    """select.max_repeats so low that the sources' examples cannot fill the fine-tune's budget: said at
    prepare, with the numbers, before meta-train."""
    cfg = tiny_run_config(tmp_path, tiny_model_dir)
    cfg.select.method, cfg.select.max_repeats = "weights", 0.05
    path = str(write_config(cfg, tmp_path / "cfg.yaml"))
    _refused(capsys, ["run", path], "select.max_repeats 0.05: no proportions fit a budget of")
    assert not (Path(cfg.run_dir) / "meta").exists()


def test_a_json_number_is_still_an_answer(tmp_path, tiny_model_dir):
    """What the checks let through: an arithmetic answer written as a JSON number."""
    from gradex import data

    cfg = tiny_run_config(tmp_path, tiny_model_dir)
    write_jsonl(tmp_path / "sub.jsonl", [dict(r, target=int(r["target"])) for r in arithmetic_rows(24, "-", 3)])
    examples = data.load_examples(cfg)
    assert all(e.answer.strip().lstrip("-").isdigit() for e in examples if e.source == "sub")
    assert json.loads((tmp_path / "sub.jsonl").read_text().splitlines()[0])["target"] == int(
        arithmetic_rows(24, "-", 3)[0]["target"])
