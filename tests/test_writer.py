"""One writer per run directory, and nothing destroyed that gradex did not write (gradex.writer):
two real processes on one run, a lock held by another process, folders that are not runs or exports,
run names that leave runs_dir, temporary names per process, and read-only runs."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_run_config, write_config
from gradex import config, ledger, pipeline
from gradex.atomic import leftovers, replacing_dir
from gradex.cli import main
from gradex.config import ConfigError
from gradex.run import STAGE_DIRS
from gradex.writer import LOCK, MARKER, writing

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


def _files(path: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}


def _records(run_dir: Path) -> dict[str, dict]:
    """What each stage recorded it read and wrote (content hashes): equal records, equal artifacts;
    select's output is selection.json, which also holds its timing, so its body stands in for it."""
    found = {stage: {k: ledger.read(run_dir / d).get(k) for k in ("status", "inputs", "outputs")}
             for stage, d in STAGE_DIRS.items() if (run_dir / d).exists()}
    found["select"]["outputs"] = {k: v for k, v in json.loads((run_dir / "selection.json").read_text()).items()
                                  if k != "seconds"}
    return found


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture(scope="module")
def selected(tmp_path_factory, tiny_model_dir):
    """A run of the tiny config through select, in-process (one writer, the reference)."""
    cfg = tiny_run_config(tmp_path_factory.mktemp("selected"), tiny_model_dir)
    pipeline.select(cfg)
    return cfg


def test_two_processes_on_one_run_one_writes_the_other_is_refused(selected, tmp_path):
    """Two `gradex select` started together on one fresh run directory: one runs, the other stops at
    once with exit 2 naming the first's pid and command, and the run equals a single process's."""
    one = config.from_dict({**config.to_dict(selected), "runs_dir": str(tmp_path / "one")})
    args = [sys.executable, "-m", "gradex.cli", "select", str(write_config(one, tmp_path / "one.yaml"))]
    alone = subprocess.run(args, capture_output=True, text=True, env=_env(), timeout=600)  # the reference
    assert alone.returncode == 0, alone.stderr[-2000:]
    for attempt in range(3):  # both exit 0 only if one started after the other had finished: again
        cfg = config.from_dict({**config.to_dict(selected), "runs_dir": str(tmp_path / f"runs{attempt}")})
        path = write_config(cfg, tmp_path / "cfg.yaml")
        args[-1] = str(path)
        children = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
                    for _ in range(2)]
        done = [(child.pid, *child.communicate(timeout=600), child.returncode) for child in children]
        codes = sorted(rc for *_, rc in done)
        if codes != [0, 0]:
            break
    assert codes == [0, 2], [(rc, err[-2000:]) for _, _, err, rc in done]
    (winner, *_), (_, _, refusal, _) = sorted(done, key=lambda d: d[3])
    [line] = [x for x in refusal.splitlines() if x.startswith("gradex: error:")]
    assert f"is being written by another gradex process (pid {winner} " in line
    assert f"gradex select {path}" in line and str(cfg.run_dir) in line
    assert _records(cfg.run_dir) == _records(one.run_dir)
    assert not leftovers(cfg.run_dir.rglob("*"))  # no temporary left by either process


def test_a_lock_held_elsewhere_refuses_every_writer_and_no_reader(selected, tmp_path, capsys):
    holder = ("import sys, time; from pathlib import Path; from gradex.writer import writing\n"
              "with writing(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(120)\n")
    child = subprocess.Popen([sys.executable, "-c", holder, str(selected.run_dir)], stdout=subprocess.PIPE,
                             text=True, env=_env())
    try:
        assert child.stdout.readline().strip() == "held"
        before = _files(selected.run_dir)
        with pytest.raises(ConfigError, match=f"another gradex process \\(pid {child.pid} .*: python -c"):
            pipeline.select(selected, force=True)
        with pytest.raises(ConfigError, match=f"pid {child.pid}"):
            pipeline.prepare(selected)
        path = write_config(selected, tmp_path / "cfg.yaml")
        assert main(["gradients", str(path), "--force"]) == 2
        assert f"pid {child.pid}" in capsys.readouterr().err
        assert main(["status", str(path)]) == 0  # a reader needs no lock, and says who writes
        out = capsys.readouterr().out
        assert "select      done" in out and f"run         writing  pid {child.pid}: python -c " in out
        assert _files(selected.run_dir) == before  # nothing written, nothing deleted
    finally:
        child.kill()
        child.wait()
    pipeline.select(selected)  # the holder is gone, and so is its lock (the system released it)
    assert pipeline.status(selected)[0]["stage"] == "prepare"  # no writer now


def test_a_writer_refused_while_the_holder_is_starting_waits_for_its_name(tmp_path):
    """The holder takes the lock, then writes who it is: a process refused in between names it anyway
    (it waits for the record), instead of "a process that is starting"."""
    run = tmp_path / "runs" / "x"
    with writing(run):
        pass
    starting = ("import fcntl, json, os, sys, time\n"
                "fd = os.open(sys.argv[1], os.O_RDWR)\nos.ftruncate(fd, 0)\nfcntl.flock(fd, fcntl.LOCK_EX)\n"
                "print('locked', flush=True); time.sleep(0.5)\n"
                "os.pwrite(fd, json.dumps({'pid': os.getpid(), 'command': 'starting'}).encode(), 0)\n"
                "time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", starting, str(run / LOCK)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=f"another gradex process \\(pid {child.pid} .*: starting"):
            with writing(run):
                pass
    finally:
        child.kill()
        child.wait()


def test_a_released_lock_names_no_one_and_a_gone_holder_is_never_named(tmp_path):
    """A new holder takes the lock before it writes who it is. Between the two, a refused process must
    not name the last holder: a writer that finished cleared its record, and one that was killed (it
    could not) is known gone by its pid."""
    run = tmp_path / "runs" / "x"
    with writing(run):
        assert json.loads((run / LOCK).read_text())["pid"] == os.getpid()
    assert (run / LOCK).read_text() == ""  # released: the record is cleared
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = {"pid": int(gone.stdout), "host": socket.gethostname(), "command": "gradex run (killed)"}
    (run / LOCK).write_text(json.dumps(dead))
    silent = ("import fcntl, os, sys, time\nfd = os.open(sys.argv[1], os.O_RDWR)\nfcntl.flock(fd, fcntl.LOCK_EX)\n"
              "print('locked', flush=True); time.sleep(60)\n")  # holds the lock and never says who it is
    child = subprocess.Popen([sys.executable, "-c", silent, str(run / LOCK)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match="another gradex process \\(a process that is starting\\)"):
            with writing(run):
                pass
    finally:
        child.kill()
        child.wait()


def test_the_lock_is_reentrant_within_a_process(tmp_path):
    run = tmp_path / "runs" / "x"
    with writing(run):
        with writing(run):  # a stage running its upstream stage under the lock it holds
            assert json.loads((run / LOCK).read_text())["pid"] == os.getpid()
        probe = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from gradex.writer "
                                "import writing\nwith writing(Path(sys.argv[1])): pass", str(run)],
                               capture_output=True, text=True, env=_env())
        assert probe.returncode == 1 and f"pid {os.getpid()}" in probe.stderr  # still held after the inner block
    assert (run / MARKER).is_file()  # gradex made the folder, so it is marked as a run
    with writing(run):  # released: taken again
        pass


def test_a_folder_that_is_not_a_run_is_refused_and_left_as_it_was(tmp_path, tiny_model_dir, capsys):
    cfg = tiny_run_config(tmp_path, tiny_model_dir)
    mine = tmp_path / "mine"
    (mine / "data").mkdir(parents=True)
    (mine / "notes.txt").write_text("my notes")
    (mine / "data" / "table.csv").write_text("a,b\n1,2\n")
    write_config(cfg, mine / "config.yaml")  # even a gradex config: the folder is still not a run
    before = _files(mine)
    cfg.runs_dir, cfg.name = str(tmp_path), "mine"
    with pytest.raises(ConfigError, match="mine is not a gradex run directory .* and is not empty"):
        pipeline.prepare(cfg)
    assert main(["select", "--run-dir", str(mine)]) == 2
    assert "not a gradex run directory" in capsys.readouterr().err
    assert main(["report", "--run-dir", str(mine)]) == 2
    assert _files(mine) == before and sorted(p.name for p in mine.iterdir()) == ["config.yaml", "data", "notes.txt"]


def test_a_run_of_an_older_gradex_is_a_run(selected, tmp_path):
    """Runs written before the marker existed are recognized by their stage records."""
    cfg = config.from_dict({**config.to_dict(selected), "runs_dir": str(tmp_path / "runs")})
    shutil.copytree(selected.run_dir, cfg.run_dir)
    (cfg.run_dir / MARKER).unlink()
    (cfg.run_dir / LOCK).unlink()
    pipeline.select(cfg)
    assert _records(cfg.run_dir) == _records(selected.run_dir)


@pytest.mark.parametrize("name", ["", ".", "..", "../elsewhere", "a/b", "/tmp/x", "a\\b"])
def test_a_run_name_is_one_folder_name(name):
    with pytest.raises(ConfigError, match="^name: .* must be one folder name"):
        config.from_dict({"name": name})


def test_export_never_replaces_a_folder_of_the_users(selected, tmp_path, capsys):
    pipeline.meta_train(selected)
    mine = tmp_path / "models"
    mine.mkdir()
    (mine / "weights.bin").write_bytes(b"someone's model")
    assert main(["export", str(selected.run_dir), "--which", "meta", "--out", str(mine)]) == 2
    assert "holds files and is not an earlier gradex export" in capsys.readouterr().err
    assert _files(mine) == {mine / "weights.bin": b"someone's model"}
    file = tmp_path / "a-file"
    file.write_text("x")
    assert main(["export", str(selected.run_dir), "--which", "meta", "--out", str(file)]) == 2
    assert file.read_text() == "x"

    out = tmp_path / "export"
    assert main(["export", str(selected.run_dir), "--which", "meta", "--out", str(out)]) == 0
    assert (out / "config.json").is_file() and (out / ".gradex-export").is_file()
    first = _files(out)
    assert main(["export", str(selected.run_dir), "--which", "meta", "--out", str(out)]) == 0  # its own: replaced
    assert _files(out) == first
    assert main(["export", str(selected.run_dir), "--which", "meta"]) == 0  # the run's own export/meta
    assert (selected.run_dir / "export" / "meta" / "config.json").is_file()


def test_gradients_keeps_added_examples_whose_list_is_gone_unless_forced(selected, tmp_path):
    from gradex.run import Run
    from gradex.stages.add_sources import prepare_added

    cfg = config.from_dict({**config.to_dict(selected), "runs_dir": str(tmp_path / "runs")})
    shutil.copytree(selected.run_dir, cfg.run_dir)
    added = cfg.run_dir / "added"
    added.mkdir()
    (added / "examples.jsonl").write_text("{}\n")
    ledger.write(added, "added", {}, {"added": "0"}, sources=["extra"])
    with pytest.raises(ConfigError, match="holds the examples of extra .*added_sources.yaml is gone"):
        pipeline.gradients(cfg)
    assert (added / "examples.jsonl").is_file()
    (cfg.run_dir / "added_sources.yaml").write_text("sources: []\n")  # every added source dropped, on purpose
    prepare_added(Run(cfg))
    assert not added.exists()
    added.mkdir()
    (cfg.run_dir / "added_sources.yaml").unlink()
    prepare_added(Run(cfg), force=True)
    assert not added.exists()


def test_a_read_only_run_can_be_read(selected, tmp_path, capsys):
    """`gradex status` writes nothing, and no command rewrites an unchanged config.yaml; where
    permissions bind (not as root), report and the writers say the run is read-only, exit 2."""
    cfg = config.from_dict({**config.to_dict(selected), "runs_dir": str(tmp_path / "runs")})
    shutil.copytree(selected.run_dir, cfg.run_dir)
    resolved = cfg.run_dir / "config.yaml"
    config.dump(cfg, resolved)  # the copy's own place (a moved run's first writer records it)
    stamp = resolved.stat().st_mtime_ns
    for p in [*cfg.run_dir.rglob("*"), cfg.run_dir]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    root = os.geteuid() == 0  # permissions do not stop root: then the check is that nothing was written
    try:
        before = _files(cfg.run_dir)
        assert main(["status", "--run-dir", str(cfg.run_dir)]) == 0
        assert "select      done" in capsys.readouterr().out
        assert _files(cfg.run_dir) == before
        code = main(["report", "--run-dir", str(cfg.run_dir)])
        assert code == (0 if root else 2)
        if not root:
            err = capsys.readouterr().err
            assert "is read-only" in err and "--out FILE" in err
        held = _files(cfg.run_dir)
        elsewhere = tmp_path / "report.html"
        assert main(["report", "--run-dir", str(cfg.run_dir), "--out", str(elsewhere)]) == 0
        assert "<title>gradex report: " in elsewhere.read_text() and _files(cfg.run_dir) == held
        code = main(["select", "--run-dir", str(cfg.run_dir)])
        assert code == (0 if root else 2)
        if not root:
            assert "cannot write here" in capsys.readouterr().err
        assert resolved.stat().st_mtime_ns == stamp and resolved.read_bytes() == before[resolved]
    finally:
        for p in [*cfg.run_dir.rglob("*"), cfg.run_dir]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)


def test_a_read_only_run_is_estimated_without_writing(selected, tmp_path, capsys, monkeypatch):
    """`gradex estimate` on an archived run prints what the writable run would have saved, writes nothing
    and takes no lock; a stage it would need, missing there, is a one-line error."""
    import pandas as pd

    cfg = config.from_dict({**config.to_dict(selected), "runs_dir": str(tmp_path / "runs")})
    shutil.copytree(selected.run_dir, cfg.run_dir)
    config.dump(cfg, cfg.run_dir / "config.yaml")  # the copy's own place, as its first writer would record it
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if Path(path) == cfg.run_dir and mode & os.W_OK
                        else real(path, mode, **kw))  # as on a read-only mount, whoever runs the test
    before = _files(cfg.run_dir)
    capsys.readouterr()
    assert main(["estimate", "--run-dir", str(cfg.run_dir), "--subset", "add_more,sub"]) == 0
    captured = capsys.readouterr()
    assert "read-only; the estimates are printed, not saved" in captured.err
    saved = pd.read_parquet(selected.run_dir / "estimates.parquet")
    oracle = saved[[list(m) == ["add_more", "sub"] for m in saved["members"]]]["estimate"].iloc[0]  # select estimated it
    assert captured.out.startswith(f"{oracle:.4f}  ") and _files(cfg.run_dir) == before
    shutil.rmtree(cfg.run_dir / "store")
    assert main(["estimate", "--run-dir", str(cfg.run_dir)]) == 2
    assert "is read-only and its gradients stage is" in capsys.readouterr().err


def test_a_report_elsewhere_replaces_only_a_gradex_report(selected, tmp_path, capsys):
    mine = tmp_path / "notes.html"
    mine.write_text("<html>the user's own page</html>")
    assert main(["report", "--run-dir", str(selected.run_dir), "--out", str(mine)]) == 2
    assert "is not a gradex report" in capsys.readouterr().err
    assert mine.read_text() == "<html>the user's own page</html>"
    assert main(["report", "--run-dir", str(selected.run_dir), "--out", str(tmp_path)]) == 2
    assert "a directory" in capsys.readouterr().err
    ours = tmp_path / "report.html"
    assert main(["report", "--run-dir", str(selected.run_dir), "--out", str(ours)]) == 0
    first = ours.read_text()
    assert main(["report", "--run-dir", str(selected.run_dir), "--out", str(ours)]) == 0  # its own: rebuilt
    assert ours.read_text() == first


def test_temporary_names_are_per_process_and_only_dead_writers_are_cleared(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = _dead_pid()
        (tmp_path / f"model.partial{live.pid}").mkdir()  # another process writing the same folder now
        (tmp_path / f"model.partial{live.pid}" / "w.bin").write_bytes(b"in flight")
        (tmp_path / f"model.partial{dead}").mkdir()  # a killed writer's
        (tmp_path / f"other.partial{dead}").mkdir()  # another folder's: not this writer's business
        with replacing_dir(tmp_path / "model") as tmp:
            assert tmp.name == f"model.partial{os.getpid()}"
            (tmp / "w.bin").write_bytes(b"mine")
        assert (tmp_path / "model" / "w.bin").read_bytes() == b"mine"
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            ["model", f"model.partial{live.pid}", f"other.partial{dead}"])
        assert (tmp_path / f"model.partial{live.pid}" / "w.bin").read_bytes() == b"in flight"
        files = [tmp_path / f"x.npy.tmp{live.pid}", tmp_path / f"x.npy.tmp{dead}", tmp_path / "x.npy"]
        assert leftovers(files) == [tmp_path / f"x.npy.tmp{dead}"]
    finally:
        live.kill()
        live.wait()


# ---------------------------------------------------------------------------- durable writes

@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names an fsynced descriptor through /proc")
def test_an_atomic_write_reaches_the_disk_before_and_after_its_rename(tmp_path, monkeypatch):
    from gradex.atomic import write_json

    synced, real = [], os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_json(tmp_path / "a.json", {"x": 1})
    assert synced == [str(tmp_path / f"a.json.tmp{os.getpid()}"), str(tmp_path)]  # the data, then the rename
    synced.clear()
    with replacing_dir(tmp_path / "model") as tmp:
        (tmp / "w.bin").write_bytes(b"w")
    assert synced[-1] == str(tmp_path) and str(tmp_path / f"model.partial{os.getpid()}" / "w.bin") in synced


@pytest.mark.parametrize("record", ["", '{"stage": "select", "status": "do', "[1, 2]"])
def test_a_cut_short_stage_record_is_named_and_its_stage_runs_again(selected, tmp_path, capsys, record):
    cfg = config.from_dict({**config.to_dict(selected), "runs_dir": str(tmp_path / "runs")})
    shutil.copytree(selected.run_dir, cfg.run_dir)
    path = cfg.run_dir / "select" / "stage.json"
    path.write_text(record)
    assert main(["status", "--run-dir", str(cfg.run_dir)]) == 0
    [line] = [x for x in capsys.readouterr().out.splitlines() if x.startswith("select")]
    assert line.startswith("select      stale    its record ") and f"{path} is unreadable" in line
    pipeline.select(cfg)
    assert _records(cfg.run_dir) == _records(selected.run_dir)


def test_a_cut_short_artifact_is_named_with_what_to_do(selected, tmp_path, capsys):
    cfg = config.from_dict({**config.to_dict(selected), "runs_dir": str(tmp_path / "runs")})
    shutil.copytree(selected.run_dir, cfg.run_dir)
    (cfg.run_dir / "selection.json").write_text('{"selected": [')
    assert main(["status", "--run-dir", str(cfg.run_dir)]) == 2
    err = capsys.readouterr().err
    assert f"{cfg.run_dir / 'selection.json'} is unreadable" in err and "re-run `gradex select --force`" in err


def test_compare_json_and_parquet_are_one_unit(tmp_path):
    import types

    import pandas as pd

    from gradex.atomic import write_json, write_parquet
    from gradex.stages.compare import _current

    run = types.SimpleNamespace(dir=tmp_path)
    write_parquet(tmp_path / "compare.parquet", pd.DataFrame({"mix": ["all"], "test_loss": [1.0]}))
    write_json(tmp_path / "compare.json", {"key": "f", "parquet_sha256": ledger.sha256(tmp_path / "compare.parquet")})
    assert _current(run, "f") and not _current(run, "g")
    write_parquet(tmp_path / "compare.parquet", pd.DataFrame({"mix": ["all"], "test_loss": [2.0]}))  # cut before the JSON
    assert not _current(run, "f")
    (tmp_path / "compare.json").write_text("")
    assert not _current(run, "f")


def test_a_cut_short_cached_bigbench_task_is_extracted_again(tmp_path, monkeypatch):
    import io
    import tarfile

    from gradex.assets import bigbench_task

    cache = tmp_path / "cache"
    (cache / "downloads" / "bigbench").mkdir(parents=True)
    body = json.dumps({"examples": [{"input": "1 + 2 =", "target": "3"}]}).encode()
    with tarfile.open(cache / "downloads" / "bigbench" / "bigbench-1.0.0.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("bigbench-1.0.0/bigbench/benchmark_tasks/arithmetic/x/task.json")
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    monkeypatch.setenv("GRADEX_CACHE", str(cache))
    assert bigbench_task("arithmetic/x")["examples"][0]["target"] == "3"
    cached = cache / "bigbench" / "arithmetic" / "x" / "task.json"
    cached.write_bytes(body[:10])  # what an older gradex's killed write left
    assert bigbench_task("arithmetic/x")["examples"][0]["target"] == "3"
    assert cached.read_bytes() == body and not leftovers(cached.parent.iterdir())
