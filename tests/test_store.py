"""The gradient store: contents, resume after kill -9, multi-process equals single-process."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gradex.gradients import GradientComputer, Store, compute_store, make_projector
from gradex.gradients.store import extend
from gradex.data import collate

sys.path.insert(0, str(Path(__file__).parent))
from gradients_helper import tiny_model, tiny_tokens  # noqa: E402

HELPER = Path(__file__).parent / "gradients_helper.py"
ROOT = Path(__file__).parent.parent
BIN = Path(sys.executable).parent
ARRAYS = ("x.npy", "u.npy", "index.npy")


def run_helper(out: Path, *args: str, launcher: list[str] | None = None) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [*(launcher or [sys.executable]), str(HELPER), str(out), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def same_arrays(a: Path, b: Path) -> bool:
    return all((a / f).read_bytes() == (b / f).read_bytes() for f in ARRAYS)


def test_store_matches_direct_computation(tmp_path: Path) -> None:
    model, toks = tiny_model(), tiny_tokens(23)
    indices = [20, 3, 7, 0, 15, 11, 2, 9, 21, 5, 13, 1, 18]
    projector = make_projector("sparse", dim=16, seed=3)
    store = compute_store(model, toks, indices, pad_id=0, out_dir=tmp_path / "s", projector=projector, batch_size=3,
                          chunk_size=5, precision="fp32", manifest_extra={"model": "tiny"}, progress=False)
    assert store.x.shape == (13, 16) and store.x.dtype == np.float32 and store.u.dtype == np.float32
    assert store.index.tolist() == indices
    # the plain loop, one example at a time, projected with the same projector
    grads, u = GradientComputer(model, method="loop").per_example(collate([toks[i] for i in indices], indices, 0), "fp32")
    assert np.allclose(store.x, projector.project(grads).numpy(), atol=1e-5 * np.abs(store.x).max())
    assert np.allclose(store.u, u.numpy(), atol=1e-6)
    m = store.manifest
    assert m["model"] == "tiny" and m["n"] == 13 and m["dim"] == 16 and m["dtype"] == "float32"
    assert m["method"] == "hooks" and m["world_size"] == 1 and m["chunks"] == 3
    assert m["projector"] == {"kind": "sparse", "seed": 3, "dim": 16, "scale": 1.0, "input_dim": projector.input_dim}
    assert m["timings"]["compute_seconds"] > 0
    assert not (tmp_path / "s" / "shards").exists()
    # batching by length is only an optimisation: one example per batch gives the same store
    one = compute_store(model, toks, indices, 0, tmp_path / "one", make_projector("sparse", dim=16, seed=3), batch_size=1,
                        chunk_size=5, precision="fp32", manifest_extra={"model": "tiny"}, progress=False)
    assert np.allclose(one.x, store.x, atol=1e-5 * np.abs(store.x).max()) and np.allclose(one.u, store.u, atol=1e-6)
    assert np.array_equal(store.col_sq_norms, projector.col_sq_norms().numpy())
    reopened = Store.open(tmp_path / "s")
    assert np.array_equal(reopened.x, store.x) and len(reopened) == 13 and reopened.dim == 16


def test_complete_store_is_reused_and_other_inputs_are_refused(tmp_path: Path) -> None:
    model, toks = tiny_model(), tiny_tokens(10)
    kwargs = dict(pad_id=0, out_dir=tmp_path, batch_size=4, chunk_size=4, precision="fp32", progress=False)
    first = compute_store(model, toks, range(10), projector=make_projector("sparse", dim=8, seed=1), **kwargs)
    stamp = (tmp_path / "x.npy").stat().st_mtime_ns
    again = compute_store(model, toks, range(10), projector=make_projector("sparse", dim=8, seed=1), **kwargs)
    assert (tmp_path / "x.npy").stat().st_mtime_ns == stamp and np.array_equal(first.x, again.x)
    with pytest.raises(ValueError, match="differs in \\['projector'\\]"):
        compute_store(model, toks, range(10), projector=make_projector("sparse", dim=8, seed=2), **kwargs)
    with pytest.raises(ValueError, match="extra"):
        compute_store(model, toks, range(10), projector=make_projector("sparse", dim=8, seed=1),
                      manifest_extra={"theta": "other"}, **kwargs)
    with pytest.raises(ValueError, match="reserved"):
        compute_store(model, toks, range(10), projector=make_projector("sparse", dim=8, seed=1),
                      manifest_extra={"dim": 3}, **{**kwargs, "out_dir": tmp_path / "new"})
    with pytest.raises(FileNotFoundError, match="no complete gradient store"):
        Store.open(tmp_path / "nothing")


def test_resume_after_kill_equals_uninterrupted_run(tmp_path: Path) -> None:
    full = run_helper(tmp_path / "full")
    assert full["computed_chunks"] == 15
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, str(HELPER), str(out), "--slow", "0.05"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while len(list((out / "shards").glob("*.npz"))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list((out / "shards").glob("*.npz")))
    assert 3 <= finished < 15 and not (out / "manifest.json").exists()
    resumed = run_helper(out)
    assert resumed["computed_chunks"] == 15 - finished  # finished chunks were skipped
    assert same_arrays(out, tmp_path / "full")
    assert not list(out.rglob("*.tmp*"))


@pytest.mark.skipif(shutil.which("accelerate", path=str(BIN)) is None, reason="accelerate is not installed")
def test_two_processes_write_the_single_process_store(tmp_path: Path) -> None:
    single = run_helper(tmp_path / "single")
    # on a CPU-only machine `--multi_gpu` makes accelerate start the processes with torchrun;
    # compute_store then joins them in a gloo process group
    launcher = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517"]
    multi = run_helper(tmp_path / "multi", launcher=launcher)
    assert single["world_size"] == 1 and multi["world_size"] == 2
    assert multi["computed_chunks"] == 8  # rank 0 did chunks 0, 2, ..., 14
    assert same_arrays(tmp_path / "single", tmp_path / "multi")


# ---------------------------------------------------------------------------- numerics


def _greedy_tokens(model, n: int, answer: int = 2, seed: int = 0) -> list:
    """Prompts followed by the model's own greedy answer: near-solved examples (tiny CE)."""
    import torch

    from gradex.data import Tokenized

    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 64, (6,), generator=gen).tolist()
        for _ in range(answer):
            with torch.no_grad():
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        out.append(Tokenized(ids, 6))
    return out


def test_store_counts_examples_at_the_ce_floor(tmp_path: Path) -> None:
    """Near-solved examples sit at the floor: u_s there, a zero gradient, and the manifest counts
    them, against the oracle of the examples' own fp32 cross-entropies."""
    import torch

    from gradex.model import CE_FLOOR, EPS, ce_logodds, example_outputs_and_nll

    model = tiny_model()
    with torch.no_grad():
        model.get_base_model().lm_head.weight.mul_(300)  # confident: most greedy answers get CE < 1e-3
    toks = _greedy_tokens(model, 8) + tiny_tokens(8, seed=1)
    indices = list(range(len(toks)))
    with torch.no_grad():
        _, nll = example_outputs_and_nll(model, collate(toks, indices, 0))
    floored = nll < CE_FLOOR
    assert 0 < int(floored.sum()) < len(toks)
    store = compute_store(model, toks, indices, pad_id=0, out_dir=tmp_path / "s",
                          projector=make_projector("sparse", dim=16, seed=3), batch_size=4, chunk_size=6,
                          precision="fp32", progress=False)
    assert store.manifest["ce_floor"] == CE_FLOOR and store.manifest["ce_clipped"] == int(floored.sum())
    mask = floored.numpy()
    assert np.all(store.u[mask] == float(ce_logodds(torch.tensor(CE_FLOOR))))
    assert np.all(store.x[mask] == 0)
    inside = ((nll > CE_FLOOR) & (nll < -math.log(EPS))).numpy()  # neither floored nor clipped at p = eps
    assert inside.any() and np.all(np.abs(store.x[inside]).sum(1) > 0)
    other = compute_store(model, toks, indices, pad_id=0, out_dir=tmp_path / "m", output="mean-logodds",
                          projector=make_projector("sparse", dim=16, seed=3), precision="fp32", progress=False)
    assert other.manifest["ce_floor"] is None and other.manifest["ce_clipped"] is None
    # rows joined later (add-sources) are counted too: the unsolved half first, the greedy half added
    kw = dict(pad_id=0, projector=make_projector("sparse", dim=16, seed=3), precision="fp32", progress=False)
    half = compute_store(model, toks, indices[8:], out_dir=tmp_path / "half", **kw)
    compute_store(model, toks, indices[:8], out_dir=tmp_path / "side", **kw)
    merged = extend(tmp_path / "half", tmp_path / "side", len(half), [])
    assert merged.manifest["ce_clipped"] == int(floored.sum())


def test_bf16_offsets_come_from_an_fp32_forward_for_the_rows_asked(tmp_path: Path) -> None:
    """Under bf16 the offsets of the rows in fp32_offsets are an fp32 store's (default: every row's); the
    other rows keep the bf16 pass's own outputs; the gradients do not depend on the choice."""
    model, toks = tiny_model(), tiny_tokens(17)
    indices = list(range(17))
    asked = [1, 4, 5, 12, 16]

    def store(name: str, precision: str = "bf16", rows=None) -> Store:
        return compute_store(model, toks, indices, pad_id=0, out_dir=tmp_path / name, precision=precision,
                             projector=make_projector("sparse", dim=16, seed=3), batch_size=4, chunk_size=6,
                             progress=False, fp32_offsets=rows)

    exact, every, own, mixed = store("fp32", "fp32"), store("every"), store("own", rows=[]), store("mixed", rows=asked)
    assert np.array_equal(every.x, own.x) and np.array_equal(every.x, mixed.x)
    assert np.allclose(every.u, exact.u, atol=1e-5)
    moved = np.abs(own.u - exact.u)
    assert moved.max() > 1e-4 and moved.max() < 0.1  # bf16 hidden states move the outputs, a little
    others = [i for i in indices if i not in asked]
    assert np.allclose(mixed.u[asked], exact.u[asked], atol=1e-5) and np.array_equal(mixed.u[others], own.u[others])
    # only a store that limits the fp32 forward records it: one planned before the option keeps its plan
    assert json.loads((tmp_path / "every" / "plan.json").read_text()).keys() < \
        json.loads((tmp_path / "mixed" / "plan.json").read_text()).keys()


def _poison(model, marker: int, gradient_only: bool) -> None:
    """Hooks that turn the gradient (or the forward value) of every example holding token `marker`
    into NaN, at layer 0's q_proj: 0 * sqrt(y - y) is 0 forward and 0 * inf = NaN backward."""
    import torch

    lm = model.get_base_model()
    poisoned: list[torch.Tensor] = []
    lm.model.embed_tokens.register_forward_pre_hook(lambda _m, inputs: poisoned.append((inputs[0] == marker).any(1)))

    def nan_rows(_module, _inputs, y):
        rows = poisoned[-1]
        parts = []
        for b in range(y.shape[0]):
            row = y[b:b + 1]
            if rows[b]:
                row = row + 0 * torch.sqrt(row - row.detach()) if gradient_only else row * float("nan")
            parts.append(row)
        return torch.cat(parts)

    lm.model.layers[0].self_attn.q_proj.register_forward_hook(nan_rows)


@pytest.mark.parametrize("gradient_only", [True, False])
def test_a_nan_in_the_gradient_pass_names_the_example(tmp_path: Path, gradient_only: bool) -> None:
    model, toks = tiny_model(), tiny_tokens(12)
    toks[7].ids[0] = 0  # the marker: no other example holds token 0, and padding is token 1 here
    _poison(model, marker=0, gradient_only=gradient_only)
    what = "gradient" if gradient_only else "output u_s"
    kwargs = dict(projector=make_projector("sparse", dim=16, seed=3), batch_size=4, chunk_size=6,
                  precision="fp32", progress=False)
    with pytest.raises(FloatingPointError, match=f"source mul, split train, index 7 has a NaN or inf {what}"):
        compute_store(model, toks, range(12), pad_id=1, out_dir=tmp_path / "named",
                      describe=lambda i: f"source mul, split train, index {i}", **kwargs)
    with pytest.raises(FloatingPointError, match=f"dataset position 7 has a NaN or inf {what}"):
        compute_store(model, toks, range(12), pad_id=1, out_dir=tmp_path / "plain", **kwargs)
    assert not (tmp_path / "plain" / "manifest.json").exists()


def test_a_full_disk_is_a_clear_error_and_the_shards_stay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The merged store's blocks are reserved before it is written: a disk without room is an OSError
    naming the file and the size (not a SIGBUS from a sparse memory map), and the computed shards are
    kept, so a re-run with room merges them without computing again."""
    import errno

    from gradex.gradients import store as store_mod

    if not hasattr(os, "posix_fallocate"):
        pytest.skip("this platform reserves no blocks (no posix_fallocate)")
    model, toks = tiny_model(), tiny_tokens(10)
    args = dict(pad_id=0, projector=make_projector("sparse", dim=16, seed=3), batch_size=3, chunk_size=4,
                precision="fp32", manifest_extra={"model": "tiny"}, progress=False)

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store_mod.os, "posix_fallocate", full)
    with pytest.raises(OSError, match=r"/s: no room on disk for the store's 0.00 GB \(No space left on device\); free some"):
        compute_store(model, toks, list(range(10)), out_dir=tmp_path / "s", **args)
    shards = sorted(p.name for p in (tmp_path / "s" / "shards").iterdir())
    assert len(shards) == 3 and not (tmp_path / "s" / "x.npy").exists()
    monkeypatch.undo()
    reserved, real = [], os.posix_fallocate
    monkeypatch.setattr(store_mod.os, "posix_fallocate", lambda fd, o, n: reserved.append(n) or real(fd, o, n))
    store = compute_store(model, toks, list(range(10)), out_dir=tmp_path / "s", **args)
    assert reserved and store.x.shape == (10, 16)
    assert store.manifest["timings"]["compute_seconds"] > 0
