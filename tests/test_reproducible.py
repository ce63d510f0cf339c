"""Seeds reproduce: the same config run in two processes gives a byte-identical theta* and gradient
store, and the same selection."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch

from conftest import tiny_run_config
from gradex import pipeline

TESTS = Path(__file__).parent

# One run up to `select` on the tiny Llama (conftest.tiny_run_config), data under argv[1], the model
# in argv[2], the run directory under argv[3]: everything else is the same config.
CHILD = f"""
import sys
from pathlib import Path
sys.path.insert(0, {str(TESTS)!r})
from conftest import tiny_run_config
from gradex import pipeline
cfg = tiny_run_config(Path(sys.argv[1]), Path(sys.argv[2]))
cfg.runs_dir = sys.argv[3]
pipeline.select(cfg)
"""
TIMED = {"timings", "seconds"}  # wall-clock measurements, the only fields allowed to differ


def run_in_new_process(data: Path, model: Path, runs: Path) -> Path:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-c", CHILD, str(data), str(model), str(runs)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return runs / "tiny"


def untimed(path: Path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if k not in TIMED}


def test_two_processes_give_a_byte_identical_store_and_the_same_selection(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "data"
    data.mkdir()
    a = run_in_new_process(data, tiny_model_dir, tmp_path / "a")
    b = run_in_new_process(data, tiny_model_dir, tmp_path / "b")
    records = {"manifest.json", "stage.json"}  # what the pass measured, with its timings
    stored = sorted(p.relative_to(a) for p in (a / "store").iterdir() if p.name not in records)
    assert {p.name for p in stored} >= {"x.npy", "u.npy", "index.npy", "col_sq_norms.npy", "preconditioner.pt",
                                        "plan.json"}
    theta = sorted(p.relative_to(a) for p in (a / "meta" / "theta_star").iterdir())  # the peft adapter folder
    assert {p.name for p in theta} >= {"adapter_config.json", "adapter_model.safetensors"}
    for rel in [*theta, *stored]:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    for name in records:
        assert untimed(a / "store" / name) == untimed(b / "store" / name), name
    assert untimed(a / "selection.json") == untimed(b / "selection.json")
    rows = pd.read_parquet(a / "estimates.parquet")
    assert rows["converged"].dtype == bool and len(rows) >= 8

    # the estimator's record flags unconverged subsets and says how many (one Newton step measures nothing)
    cfg = tiny_run_config(data, tiny_model_dir)
    cfg.runs_dir, cfg.estimate.refinements = str(tmp_path / "a"), 0
    fn, record, _ = pipeline.estimator(pipeline.Run(cfg))
    fn(torch.ones(3, 3, dtype=torch.bool))
    assert [r["converged"] for r in record] == [False] * 3
    assert "warning: 3 of 3 subsets did not meet estimate.tol" in capsys.readouterr().err
