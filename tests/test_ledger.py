"""The ledger on a tiny model: a stage is reused only while what it read is unchanged, and says why not."""

from __future__ import annotations

import json

import pytest

from conftest import arithmetic_rows, tiny_run_config, write_config, write_jsonl
from gradex import config, ledger, pipeline
from gradex.cli import main


@pytest.fixture()
def cfg(tmp_path, tiny_model_dir):
    return tiny_run_config(tmp_path, tiny_model_dir)


def states(cfg) -> dict[str, tuple[str, str]]:
    return {r["stage"]: (r["state"], r["why"]) for r in pipeline.status(cfg)}


def mtimes(cfg) -> dict[str, int]:
    files = {"data": "data/examples.jsonl", "meta": "meta/theta_star/adapter_model.safetensors", "store": "store/x.npy", "select": "selection.json"}
    return {k: (cfg.run_dir / f).stat().st_mtime_ns for k, f in files.items()}


def test_ledger_sha256_streams_files_and_folders(tmp_path):
    import hashlib

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a").write_bytes(b"x" * (3 << 20))  # several read blocks
    assert ledger.sha256(tmp_path / "d" / "a") == hashlib.sha256(b"x" * (3 << 20)).hexdigest()[:16]
    before = ledger.sha256(tmp_path / "d")
    (tmp_path / "d" / "b").write_bytes(b"")
    assert ledger.sha256(tmp_path / "d") != before  # a new (even empty) file changes a folder's hash


def test_a_keyed_record_is_current_only_for_its_key(tmp_path):
    """The one check behind fine-tunes, similarity caches and the final model's record."""
    path = tmp_path / "result.json"
    assert ledger.kept(path, "k1") is None  # missing
    written = ledger.keep(path, "k1", {"loss": 0.5, "key": "ignored"})
    assert written == {"key": "k1", "loss": 0.5} and list(json.loads(path.read_text())) == ["key", "loss"]
    assert ledger.kept(path, "k1") == written
    assert ledger.kept(path, "k2") is None  # written for other inputs
    path.write_text('{"key": "k1", "loss"')  # cut short by a crash
    assert ledger.kept(path, "k1") is None
    path.write_text('["k1"]')
    assert ledger.kept(path, "k1") is None


def test_status_of_a_fresh_and_of_a_selected_run(cfg):
    assert {s for s, _ in states(cfg).values()} == {"missing"}
    pipeline.select(cfg)
    found = states(cfg)
    assert [found[s][0] for s in ("prepare", "meta-train", "gradients", "select")] == ["done"] * 4
    assert found["finetune"][0] == "missing" and found["compare"][0] == "missing"


def test_editing_a_data_file_reruns_every_stage_that_read_it(cfg, tmp_path, capsys):
    pipeline.select(cfg)
    before = mtimes(cfg)
    write_jsonl(tmp_path / "sub.jsonl", arithmetic_rows(24, "-", 99))  # same file, other examples
    found = states(cfg)
    assert found["prepare"] == ("stale", f"changed: file {tmp_path / 'sub.jsonl'}")
    assert found["meta-train"][0] == "stale" and "upstream" in found["meta-train"][1]
    capsys.readouterr()
    pipeline.select(cfg)
    after = mtimes(cfg)
    assert all(after[k] != before[k] for k in before), (before, after)
    err = capsys.readouterr().err
    assert "prepare: running again (changed: file" in err and "meta-train: running again (changed: data)" in err
    assert "gradients: running again (changed: data, theta*)" in err
    assert {s for s, _ in list(states(cfg).values())[:4]} == {"done"}


def test_a_data_file_edit_that_changes_no_example_reruns_only_prepare(cfg, tmp_path):
    pipeline.select(cfg)
    before = mtimes(cfg)
    path = tmp_path / "mul.jsonl"
    path.write_text(path.read_text() + "\n")  # a blank line at the end: a new file hash, the same examples
    pipeline.select(cfg)
    after = mtimes(cfg)
    assert after["data"] != before["data"]
    assert {k: after[k] for k in ("meta", "store", "select")} == {k: before[k] for k in ("meta", "store", "select")}


def test_forcing_meta_train_that_reproduces_theta_star_keeps_the_store(cfg):
    pipeline.select(cfg)
    before = mtimes(cfg)
    pipeline.meta_train(cfg, force=True)  # deterministic on CPU: the same theta*, byte for byte
    pipeline.select(cfg)
    after = mtimes(cfg)
    assert after["meta"] != before["meta"] and after["store"] == before["store"] and after["select"] == before["select"]


def test_a_changed_theta_star_makes_the_store_and_selection_stale(cfg):
    pipeline.select(cfg)
    cfg.meta.lr = 0.02
    found = states(cfg)
    assert found["meta-train"] == ("stale", "changed: config")
    pipeline.meta_train(cfg)
    found = states(cfg)
    assert found["gradients"] == ("stale", "changed: theta*")
    assert found["select"][0] == "stale"


def test_changed_selection_retrains_the_final_model_but_no_baseline(cfg):
    pipeline.compare(cfg, seeds=1)
    first = json.loads((cfg.run_dir / "compare.json").read_text())
    keys = {frozenset(r["members"]): r["key"] for r in first["rows"]}
    stamp = {k: (cfg.run_dir / "finetunes" / k / "result.json").stat().st_mtime_ns for k in keys.values()}
    chosen = first["selection"]["selected"]
    other = [s for s in ("add_more", "mul", "sub") if s not in chosen][:1] or ["mul"]
    cfg.compare.mixes = {"mine": other}  # a compare setting only: the selection stays, so does the final model
    pipeline.compare(cfg, seeds=1)
    cfg.select.method = "ensemble" if first["selection"]["method"] != "ensemble" else "forward"
    assert states(cfg)["select"] == ("stale", "changed: config")
    pipeline.compare(cfg, seeds=1)
    second = json.loads((cfg.run_dir / "compare.json").read_text())
    # the baselines all and target do not depend on the selection (their rows are the selection's when it
    # selected the same sources: the same mix, shown once)
    baselines = {frozenset(), frozenset(["add_more", "mul", "sub"])}
    for row in second["rows"]:
        if frozenset(row["members"]) in baselines:
            assert row["key"] == keys[frozenset(row["members"])]
            assert (cfg.run_dir / "finetunes" / row["key"] / "result.json").stat().st_mtime_ns == stamp[row["key"]]
    assert states(cfg)["compare"][0] == "done" and states(cfg)["finetune"][0] == "done"


def test_upstream_stages_run_with_a_message(cfg, capsys):
    pipeline.gradients(cfg)
    err = capsys.readouterr().err
    assert "prepare: running (not run yet)" in err and "meta-train: running (not run yet)" in err
    pipeline.gradients(cfg)
    assert "running" not in capsys.readouterr().err  # all current: nothing runs, nothing is said


def test_a_record_from_an_older_gradex_is_stale_and_says_so(cfg):
    pipeline.prepare(cfg)
    record = cfg.run_dir / "data" / "stage.json"
    record.write_text(json.dumps({"stage": "prepare", "fingerprint": "0123", "status": "done"}))
    assert states(cfg)["prepare"] == ("stale", "recorded by an older gradex (no input hashes)")


def test_cli_status_config_version_and_debug(cfg, tmp_path, capsys):
    path = write_config(cfg, tmp_path / "cfg.yaml")
    assert main(["status", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"run directory: {cfg.run_dir}" in out and "prepare     missing  not run yet" in out
    assert main(["config", str(path), "--set", "meta.lr=3e-3"]) == 0
    printed = capsys.readouterr().out
    (tmp_path / "printed.yaml").write_text(printed)
    again = config.load(tmp_path / "printed.yaml")  # the printed config is a config
    assert again.meta.lr == 3e-3 and config.to_dict(again) == config.to_dict(config.load(path, ["meta.lr=3e-3"]))
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("gradex ")


def test_an_unexpected_error_is_one_line_and_a_traceback_only_with_debug(cfg, tmp_path, capsys, monkeypatch):
    path = write_config(cfg, tmp_path / "cfg.yaml")

    def broken(cfg, force=False):
        raise RuntimeError("disk on fire")

    from gradex.stages import prepare as prepare_stage

    monkeypatch.setattr(prepare_stage, "prepare", broken)  # the function the stage graph runs for prepare
    assert main(["prepare", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["gradex: error: RuntimeError: disk on fire (run with --debug for the "
                                        "traceback; finished work is kept)"]
    assert main(["--debug", "prepare", str(path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "disk on fire" in err
