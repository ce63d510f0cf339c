"""gradex add-sources on the tiny model: new sources' gradients at the existing theta*, appended to
the store; the old rows byte for byte, the new ones what an independent gradient pass gives, every
bad sources file refused before a gradient is computed, and a killed pass resumed."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import tiny_run_config, write_config, write_jsonl
from gradex import config, ledger, pipeline
from gradex.cli import main

STORE = ("x.npy", "u.npy", "index.npy", "col_sq_norms.npy", "preconditioner.pt")


def _sources_file(path: Path, sources: list[dict]) -> Path:
    path.write_text(yaml.safe_dump({"sources": sources}))
    return path


def _copy(cfg, tmp_path: Path):
    """The run at cfg.run_dir copied under tmp_path, and its config file there."""
    out = config.from_dict({**config.to_dict(cfg), "runs_dir": str(tmp_path / "runs")})
    shutil.copytree(cfg.run_dir, out.run_dir)
    return out, write_config(out, tmp_path / "cfg.yaml")


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_model_dir):
    """A selected run on two of the tiny config's sources; `sub` stays out, to be added."""
    cfg = tiny_run_config(tmp_path_factory.mktemp("base"), tiny_model_dir)
    sub = next(s for s in cfg.data.sources if s.name == "sub")
    cfg.data.sources = [s for s in cfg.data.sources if s.name != "sub"]
    pipeline.select(cfg)
    return cfg, sub


@pytest.fixture(scope="module")
def extended(base, tmp_path_factory):
    """The base run copied, then `gradex add-sources` of `sub` through the CLI."""
    cfg, sub = base
    tmp = tmp_path_factory.mktemp("extended")
    cfg2, path = _copy(cfg, tmp)
    more = _sources_file(tmp / "more.yaml", [{"name": "sub", "path": sub.path}])
    assert main(["add-sources", str(more), str(path)]) == 0
    return cfg2, path, more


def _records(run_dir: Path) -> dict[str, bytes]:
    return {s: (run_dir / s / "stage.json").read_bytes() for s in ("data", "meta")}


def test_old_rows_are_byte_identical_and_new_rows_are_an_independent_pass(base, extended):
    from gradex.gradients import Store, compute_store

    cfg, _ = base
    cfg2, _, _ = extended
    old, new = Store.open(cfg.run_dir / "store"), Store.open(cfg2.run_dir / "store")
    n0 = len(old)
    assert len(new) > n0 and new.manifest["base_n"] == n0
    for name in ("x", "u", "index"):  # the old rows' bytes, unchanged
        assert getattr(new, name)[:n0].tobytes() == getattr(old, name).tobytes(), name
    assert (cfg2.run_dir / "store" / "preconditioner.pt").read_bytes() == \
        (cfg.run_dir / "store" / "preconditioner.pt").read_bytes()

    run = pipeline.Run(cfg2)
    rows = new.index[n0:].tolist()
    assert rows == [i for i, e in enumerate(run.examples) if e.source == "sub"] and len(rows) == 24
    assert {run.examples[i].split for i in rows} == {"train"}
    [entry] = new.manifest["added"]
    assert entry["source"] == "sub" and entry["rows"] == [n0, n0 + 24] and entry["trained_into_theta_star"] is False
    assert entry["adapter_sha256"] == run.output("theta*") == pipeline.Run(cfg).output("theta*")

    # the same examples through per-example autograd (no hooks, no batching) at theta*
    model = run.meta_model()
    fresh = compute_store(model, run.tokens, rows, run.pad_id, cfg2.run_dir.parent / "oracle",
                          pipeline.make_run_projector(run, model), batch_size=1, precision="fp32", method="loop",
                          progress=False)
    np.testing.assert_allclose(new.x[n0:], fresh.x, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(new.u[n0:], fresh.u, rtol=1e-5, atol=1e-6)
    assert np.abs(fresh.x).max() > 0


def test_the_ledger_stays_honest(base, extended, capsys):
    cfg, _ = base
    cfg2, path, more = extended
    assert _records(cfg2.run_dir) == _records(cfg.run_dir)  # prepare's and theta*'s records untouched
    found = {r["stage"]: (r["state"], r["why"]) for r in pipeline.status(cfg2)}
    assert [found[s][0] for s in ("prepare", "meta-train", "add-sources", "gradients")] == ["done"] * 4
    assert "sub" in found["add-sources"][1] and "not trained" in found["add-sources"][1]
    assert found["select"] == ("stale", "changed: store")
    record = ledger.read(cfg2.run_dir / "store")
    assert record["added"] == [{"source": "sub", "examples": 24, "rows": [record["examples"] - 24, record["examples"]]}]
    assert record["inputs"]["theta*"] == ledger.read(cfg.run_dir / "store")["inputs"]["theta*"]
    assert record["outputs"]["store"] != ledger.read(cfg.run_dir / "store")["outputs"]["store"]
    assert yaml.safe_load((cfg2.run_dir / "added_sources.yaml").read_text())["sources"][0]["name"] == "sub"

    before = {f: (cfg2.run_dir / "store" / f).read_bytes() for f in STORE}
    capsys.readouterr()
    assert main(["add-sources", str(more), str(path)]) == 0  # the same file again: nothing to do
    assert {f: (cfg2.run_dir / "store" / f).read_bytes() for f in STORE} == before
    assert "running" not in capsys.readouterr().err

    body = pipeline.select(cfg2)  # the added source is a candidate like any other
    assert body["sources"] == ["add_more", "mul", "sub"] and "sub" in body["source_scores"]
    assert {f: (cfg2.run_dir / "store" / f).read_bytes() for f in STORE} == before  # select computed nothing
    assert _records(cfg2.run_dir) == _records(cfg.run_dir)
    [row] = pipeline.estimate(cfg2, [["sub"]])
    assert row["members"] == ["sub"] and 0 < row["estimate"] < 10

    assert main(["status", str(path)]) == 0
    assert "add-sources done     sub" in capsys.readouterr().out


def test_dropping_an_added_source_gives_back_the_original_store(base, extended, tmp_path):
    cfg, _ = base
    cfg2, _, _ = extended
    cfg3, _ = _copy(cfg2, tmp_path)
    (cfg3.run_dir / "added_sources.yaml").write_text("sources: []\n")  # every added source dropped
    found = {r["stage"]: r for r in pipeline.status(cfg3)}
    assert found["gradients"]["state"] == "stale" and "only the added" in found["gradients"]["why"]
    pipeline.gradients(cfg3)
    for name in STORE:
        assert (cfg3.run_dir / "store" / name).read_bytes() == (cfg.run_dir / "store" / name).read_bytes(), name
    assert not (cfg3.run_dir / "added").exists() and "add-sources" not in {r["stage"] for r in pipeline.status(cfg3)}


def test_a_new_theta_star_recomputes_the_added_rows_too(extended, tmp_path):
    cfg2, _, _ = extended
    cfg3, _ = _copy(cfg2, tmp_path)
    cfg3.meta.lr = 0.02  # theta* trains again: no row of the old theta* may stay
    pipeline.gradients(cfg3)
    from gradex.gradients import Store

    old, new = Store.open(cfg2.run_dir / "store"), Store.open(cfg3.run_dir / "store")
    theta = pipeline.Run(cfg3).output("theta*")
    assert theta != pipeline.Run(cfg2).output("theta*")
    assert new.manifest["adapter_sha256"] == theta and [e["adapter_sha256"] for e in new.manifest["added"]] == [theta]
    assert len(new) == len(old) and not np.allclose(new.x[-24:], old.x[-24:])
    assert pipeline.Run(cfg3).trained_sources == ["add_more", "mul"]  # theta* still not trained on `sub`


BAD = {
    "not YAML": ("sources: [{{name: x, path: a.jsonl\n", "not valid YAML"),
    "not a list": ("sources: {{name: x}}\n", "expected a non-empty list"),
    "unknown top-level key": ("sources: []\nextra: 1\n", "unknown key(s) ['extra']"),
    "unknown source key": ("sources:\n  - name: x\n    path: {sub}\n  - name: y\n    path: {sub}\n    promt_field: q\n",
                           "line 4: sources[1] (y): unknown key(s) ['promt_field']"),
    "path and bigbench": ("sources:\n  - {{name: x, path: {sub}, bigbench: arithmetic/2_digit_addition}}\n",
                          "sets both `bigbench` and `path`"),
    "duplicate names": ("sources:\n  - {{name: x, path: {sub}}}\n  - {{name: x, path: {sub}}}\n",
                        "lines [2, 3]: duplicate source name(s) ['x']"),
    "sources given twice": ("sources:\n  - {{name: x, path: {sub}}}\nsources:\n  - {{name: y, path: {sub}}}\n",
                            "more.yaml, line 3: the key 'sources' is given twice"),  # was: x dropped silently
    "a trained source's name": ("sources:\n  - {{name: mul, path: {sub}}}\n", "'mul' is already a source of this run"),
    "the target's name": ("sources:\n  - {{name: add, path: {sub}}}\n", "'add' is the target's name"),
    "missing file": ("sources:\n  - {{name: x, path: {sub}.missing}}\n", "source 'x': file not found"),
    "all leaked": ("sources:\n  - {{name: x, path: {leaky}}}\n", "repeat a target validation or test prompt"),
    "too long": ("sources:\n  - {{name: x, path: {long}}}\n", "longer than model.max_length=24"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_sources_files_are_refused_before_any_gradient(case, base, tmp_path, capsys):
    cfg, sub = base
    cfg2, path = _copy(cfg, tmp_path)
    held = [e for e in pipeline.Run(cfg2).examples if e.split in ("validation", "test")]
    write_jsonl(tmp_path / "leaky.jsonl", [{"input": e.prompt.strip(), "target": "1"} for e in held[:5]])
    write_jsonl(tmp_path / "long.jsonl", [{"input": "9+9=" * 10, "target": "18"}])
    text, message = BAD[case]
    more = tmp_path / "more.yaml"
    more.write_text(text.format(sub=sub.path, leaky=tmp_path / "leaky.jsonl", long=tmp_path / "long.jsonl"))
    before = {f: (cfg2.run_dir / "store" / f).read_bytes() for f in STORE}
    capsys.readouterr()
    assert main(["add-sources", str(more), str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gradex: error: ") and message in err, err
    assert err.count("\n") == 1 and "gradients:" not in err
    assert {f: (cfg2.run_dir / "store" / f).read_bytes() for f in STORE} == before
    assert not (cfg2.run_dir / "added_sources.yaml").exists() and not (cfg2.run_dir / "added").exists()


def test_a_run_without_a_complete_store_is_refused(tiny_model_dir, tmp_path, capsys):
    cfg = tiny_run_config(tmp_path, tiny_model_dir)
    pipeline.prepare(cfg)
    more = _sources_file(tmp_path / "more.yaml", [{"name": "x", "path": str(tmp_path / "sub.jsonl")}])
    assert main(["add-sources", str(more), str(write_config(cfg, tmp_path / "cfg.yaml"))]) == 2
    assert "meta-train is missing" in capsys.readouterr().err


def test_a_source_in_the_config_and_in_added_sources_is_refused(extended, tmp_path):
    cfg2, _, _ = extended
    cfg3, _ = _copy(cfg2, tmp_path)
    cfg3.data.sources.append(config.SourceConfig(name="sub", path=cfg3.data.sources[0].path))
    with pytest.raises(config.ConfigError, match=r"\['sub'\] are in the config .* and in"):
        pipeline.prepare(cfg3)


def test_killed_add_sources_resumes_to_the_same_store(base, extended, tmp_path):
    """kill -9 at a random moment of the added pass (or of its merge), then a re-run of the same
    command: the store of the uninterrupted add-sources, byte for byte."""
    cfg, sub = base
    cfg2, _, _ = extended
    rng = random.Random(11)
    for attempt in range(2):
        cfg3, path = _copy(cfg, tmp_path / f"try{attempt}")
        more = _sources_file(tmp_path / f"try{attempt}" / "more.yaml", [{"name": "sub", "path": sub.path}])
        args = [sys.executable, "-m", "gradex.cli", "add-sources", str(more), str(path)]
        child = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not list((cfg3.run_dir / "store").glob("added-*/plan.json")) and child.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.5))
        landed = "after it finished" if child.poll() is not None else "midway"
        child.send_signal(signal.SIGKILL)
        child.wait()
        print(f"attempt {attempt}: killed {landed}")
        assert main(["add-sources", str(more), str(path)]) == 0
        for name in STORE:
            assert (cfg3.run_dir / "store" / name).read_bytes() == (cfg2.run_dir / "store" / name).read_bytes(), name
        assert not list((cfg3.run_dir / "store").glob("added-*")) and not (cfg3.run_dir / "store" / "pending").exists()


def test_an_interrupted_move_is_finished_and_refused_until_then(extended, tmp_path):
    """The merge's last step moves pending/ files in one by one: a store caught between two moves
    is refused when read, and the next extension (or gradients) completes the move."""
    from gradex.gradients import Store
    from gradex.gradients.store import PENDING, READY, finish_pending

    cfg2, _, _ = extended
    store = tmp_path / "store"
    shutil.copytree(cfg2.run_dir / "store", store)
    pending = store / PENDING
    pending.mkdir()
    old = Store.open(store)
    x = np.asarray(old.x)[:-3]
    np.save(pending / "x.npy", x)
    np.save(pending / "u.npy", np.asarray(old.u)[:-3])
    np.save(pending / "index.npy", np.asarray(old.index)[:-3])
    (pending / "manifest.json").write_text(json.dumps({**old.manifest, "n": len(x)}))
    del old
    (pending / READY).write_text("")
    shutil.move(pending / "x.npy", store / "x.npy")  # the move was killed after its first file
    with pytest.raises(FileNotFoundError, match="interrupted"):
        Store.open(store)
    assert not Store.complete(store)
    finish_pending(store)
    done = Store.open(store)
    assert len(done) == len(x) == len(done.u) == len(done.index) and done.manifest["n"] == len(x)
    assert not pending.exists()


def test_run_dir_names_a_moved_run_and_its_own_config(extended, tmp_path, capsys):
    cfg2, path, more = extended
    moved = tmp_path / "elsewhere" / "screen"
    shutil.copytree(cfg2.run_dir, moved)  # its config.yaml still names the original place
    capsys.readouterr()
    assert main(["status", "--run-dir", str(moved)]) == 0
    out = capsys.readouterr().out
    assert f"run directory: {moved.resolve()}" in out and "add-sources done" in out and "stale" not in \
        out.split("select")[0]
    assert main(["add-sources", str(more), "--run-dir", str(moved)]) == 0  # nothing to add: same store
    assert (moved / "store" / "x.npy").read_bytes() == (cfg2.run_dir / "store" / "x.npy").read_bytes()
    assert main(["status", str(path), "--run-dir", str(moved)]) == 2
    assert "not a config file and --run-dir" in capsys.readouterr().err.replace("give one of a config file, "
                                                                                "--example or --run-dir, ", "")


def test_editing_an_added_hf_sources_file_makes_add_sources_stale(base, tmp_path):
    """An added `hf:` source's local files are part of add-sources' inputs, like a `path:` file."""
    cfg, sub = base
    cfg2, path = _copy(cfg, tmp_path)
    rows = tmp_path / "sub-hf.jsonl"
    shutil.copy(sub.path, rows)
    more = _sources_file(tmp_path / "more.yaml",
                         [{"name": "sub", "hf": {"path": "json", "data_files": [str(rows)], "split": "train"}}])
    assert main(["add-sources", str(more), str(path)]) == 0
    found = {r["stage"]: r for r in pipeline.status(cfg2)}
    assert found["add-sources"]["state"] == "done"
    with rows.open("a") as fh:  # one more row: the source's data changed
        fh.write(json.dumps({"input": "1-1=", "target": "0"}) + "\n")
    found = {r["stage"]: r for r in pipeline.status(cfg2)}
    assert found["add-sources"]["state"] == "stale" and str(rows) in found["add-sources"]["why"]
