"""kill -9 at a random point of each stage, then a re-run: the same artifacts as a run never interrupted.

Each case copies a finished reference run on the tiny model, deletes one stage's artifacts, starts that
stage's command in a child process, waits until the stage has begun (a file it writes appears, or a line
it logs), waits a random moment more and sends SIGKILL, trying again with a shorter wait when the command
had already ended (a kill that interrupts nothing fails the test); then it re-runs the stage and compares what it wrote with the
reference: byte for byte where the stage is deterministic on CPU (data, store, selection, validate's
measurements), within float rounding for resumed training (the adapter).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import tiny_run_config, write_config
from gradex import config, diagnostics, pipeline

VALIDATE = {"k": 2, "seeds": 1}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    """A run never interrupted: every stage through validate."""
    cfg = tiny_run_config(tmp_path_factory.mktemp("reference"), tiny_model_dir)
    cfg.meta.epochs = 3  # long enough to be killed in the middle of
    cfg.gradients.preconditioner = "adam"  # the pass of its own, so the "preconditioner" case has one to kill
    pipeline.select(cfg)
    pipeline.estimate(cfg, [["mul"], ["add_more", "sub"]])
    pipeline.finetune(cfg)
    diagnostics.validate(cfg, **VALIDATE)
    return cfg


# stage -> (command, artifacts it writes (deleted before the kill), what says the stage began: "file:<glob>"
# appearing in the run directory or "log:<text>" on stderr, the longest wait after that in seconds)
CASES = {
    "prepare": (["prepare"], ["data"], "file:config.yaml", 1.0),
    "meta-train": (["meta-train"], ["meta"], "file:meta/stage.json", 4.0),
    "preconditioner": (["gradients"], ["store"], "file:store/stage.json", 0.5),
    "gradients": (["gradients"], ["store"], "file:store/plan.json", 4.0),
    "estimate": (["estimate", "--subset", "mul", "--subset", "add_more,sub"], ["estimates.parquet"],
                 "log:estimate: 2 subset(s)", 0.5),
    "select": (["select"], ["select", "selection.json"], "log:select: running", 1.0),
    "finetune": (["finetune"], ["finetunes", "final"], "file:finetunes/*", 4.0),
    "evaluate": (["evaluate"], ["finetunes", "final"], "file:finetunes/*/model", 1.0),
    "validate": (["validate", "--subsets", "2", "--seeds", "1"], ["validate", "finetunes"], "file:finetunes/*", 6.0),
}
TRIES = 8  # a kill that lands after the command ended is tried again, with half the wait


def _copy(reference, tmp_path, drop: list[str]):
    cfg = config.from_dict({**config.to_dict(reference), "runs_dir": str(tmp_path / "runs")})
    shutil.copytree(reference.run_dir, cfg.run_dir)
    for name in drop:
        path = cfg.run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    if "estimates.parquet" not in drop and "select" in drop:  # select's rows go with it, estimate's stay
        frame = pd.read_parquet(cfg.run_dir / "estimates.parquet")
        frame[frame["stage"] != "select"].to_parquet(cfg.run_dir / "estimates.parquet")
    return cfg, write_config(cfg, tmp_path / "cfg.yaml")


def _kill_midway(args: list[str], run_dir: Path, trigger: str, wait: float, rng: random.Random) -> bool:
    """Start `gradex <args>`, wait until `trigger` says the stage began, SIGKILL it a random moment
    (up to `wait` s) later; whether it was still running then (False: it had ended, nothing was tested)."""
    child = subprocess.Popen([sys.executable, "-m", "gradex.cli", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, cwd=run_dir.parent.parent)
    seen: list[str] = []
    began = threading.Event()
    kind, what = trigger.split(":", 1)

    def read_stderr() -> None:  # drained all along, so the child never blocks on a full pipe
        for line in child.stderr:
            seen.append(line)
            if kind == "log" and what in line:
                began.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while not began.is_set() and child.poll() is None and time.monotonic() < deadline:
        if kind == "file" and list(run_dir.glob(what)):
            began.set()
        time.sleep(0.01)
    if not began.is_set():
        child.kill()
        child.wait()
        reader.join()
        raise AssertionError(f"{args[0]}: {trigger!r} never showed; exit {child.returncode}\n{''.join(seen)}")
    time.sleep(rng.uniform(0.0, wait))
    running = child.poll() is None
    child.send_signal(signal.SIGKILL)
    child.wait()
    reader.join()
    assert running or child.returncode == 0, f"{args[0]} failed before the kill:\n{''.join(seen)}"
    return running


def _vector(run: pipeline.Run, path: Path) -> torch.Tensor:
    from gradex.model import trainable_vector

    return trainable_vector(run.saved_model(path))


def _without(body: dict, *keys: str) -> dict:
    return {k: v for k, v in body.items() if k not in keys}


def _rerun(stage: str, cfg) -> None:
    if stage == "estimate":
        pipeline.estimate(cfg, [["mul"], ["add_more", "sub"]])
    elif stage == "validate":
        diagnostics.validate(cfg, **VALIDATE)
    else:
        {"prepare": pipeline.prepare, "meta-train": pipeline.meta_train, "preconditioner": pipeline.gradients,
         "gradients": pipeline.gradients, "select": pipeline.select, "finetune": pipeline.finetune,
         "evaluate": pipeline.evaluate}[stage](cfg)


def _same_artifacts(stage: str, cfg, reference) -> None:
    a, b = reference.run_dir, cfg.run_dir
    if stage == "prepare":
        for name in ("examples.jsonl", "manifest.json"):
            assert (a / "data" / name).read_bytes() == (b / "data" / name).read_bytes(), name
    elif stage == "meta-train":
        run = pipeline.Run(cfg)
        torch.testing.assert_close(_vector(run, a / "meta" / "theta_star"), _vector(run, b / "meta" / "theta_star"),
                                   rtol=1e-5, atol=1e-6)
    elif stage in ("preconditioner", "gradients"):
        for name in ("x.npy", "u.npy", "index.npy", pipeline.PRECONDITIONER_FILE):
            assert (a / "store" / name).read_bytes() == (b / "store" / name).read_bytes(), name
    elif stage in ("estimate", "select"):
        key = ["stage", "size", "estimate"]
        frames = [pd.read_parquet(d / "estimates.parquet") for d in (a, b)]
        rows = [f[f["stage"] == stage].assign(members=f["members"].map(tuple)) for f in frames]
        assert [list(map(tuple, r[["members", *key]].to_numpy())) for r in rows][0] == \
            list(map(tuple, rows[1][["members", *key]].to_numpy()))
        if stage == "select":
            sel = [json.loads((d / "selection.json").read_text()) for d in (a, b)]
            assert _without(sel[0], "seconds") == _without(sel[1], "seconds")
    elif stage in ("finetune", "evaluate"):
        run = pipeline.Run(cfg)
        torch.testing.assert_close(_vector(run, a / "final" / "selected"), _vector(run, b / "final" / "selected"),
                                   rtol=1e-5, atol=1e-6)
        found = [json.loads((d / "final" / "metrics.json").read_text()) for d in (a, b)]
        for split in ("validation", "test"):
            assert found[0][split]["score"] == found[1][split]["score"]
            assert found[0][split]["loss"] == pytest.approx(found[1][split]["loss"], rel=1e-5)
    elif stage == "validate":
        rows = [sorted((json.loads(p.read_text()) for p in (d / "validate" / "rows").iterdir()), key=lambda r: r["key"])
                for d in (a, b)]
        assert len(rows[0]) == len(rows[1]) == VALIDATE["k"] * VALIDATE["seeds"]
        assert [x["key"] for x in rows[0]] == [y["key"] for y in rows[1]]
        for x, y in zip(rows[0], rows[1]):
            assert (x["members"], x["seed"], x["steps"]) == (y["members"], y["seed"], y["steps"])
            assert x["losses"] == pytest.approx(y["losses"], rel=1e-5)
    else:
        raise KeyError(stage)


@pytest.mark.parametrize("stage", list(CASES))
def test_kill_9_then_rerun_gives_the_uninterrupted_artifacts(stage, reference, tmp_path):
    args, drop, trigger, wait = CASES[stage]
    rng = random.Random(f"{stage}:{os.environ.get('GRADEX_KILL_SEED', 0)}")
    for attempt in range(TRIES):
        cfg, path = _copy(reference, tmp_path / str(attempt), drop)
        if _kill_midway([*args, str(path)], cfg.run_dir, trigger, wait / 2 ** attempt, rng):
            break
    else:
        pytest.fail(f"{stage}: {TRIES} kills all landed after the command ended; nothing was interrupted")
    print(f"{stage}: killed while running, at attempt {attempt + 1}")
    _rerun(stage, cfg)
    _same_artifacts(stage, cfg, reference)
