"""The gradient store: projected per-example gradients x (N, d) and offsets u (N,), resumable and multi-process.

Layout of a store directory:

    plan.json          what is being computed (projector identity, precision, examples, caller's extra)
    pending/           an extension's merged files while they are moved in (`extend`)
    shards/chunk-*.npz one file per finished chunk of examples (deleted after the merge)
    x.npy u.npy index.npy
    col_sq_norms.npy   (d,) squared column norms of P, so ||P z|| needs no projector
    manifest.json      written last: its presence means the store is complete (it also counts the
                       examples whose "ce" output sat at the CE floor, `ce_clipped`)

The examples are split into fixed chunks of `chunk_size`. Each finished chunk is written atomically
(gradex.atomic: a temporary file, then a rename), so killing the pass at any moment loses at most
the chunks in flight, and a re-run skips every finished chunk. With WORLD_SIZE > 1 (torchrun / accelerate launch), rank r
computes the chunks c with c % world == r; rank 0 merges after a barrier. Chunks and batches are
the same whatever the world size, so the merged store does not depend on it.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Sequence

import numpy as np
import torch
from torch import nn

from gradex.atomic import leftovers, replacing, replacing_path, write_bytes
from gradex.config import fingerprint
from gradex.data import Tokenized, collate
from gradex.gradients.compute import GradientComputer
from gradex.gradients.projectors import Projector
from gradex.device import device_of, resolve_precision, step_done
from gradex.launch import barrier, distributed
from gradex.model import CE_FLOOR, at_ce_floor

FORMAT = 1
ARRAYS = ("x", "u", "index")
PENDING, READY = "pending", "READY"  # an extension's merged files, complete once READY is written
# what must agree between a store and the rows appended to it: the same gradients of the same model
SAME_GRADIENTS = ("dim", "projector", "precision", "output", "ce_floor", "parameters_sha256", "adapter_sha256")


@dataclass
class Store:
    path: Path
    x: np.ndarray  # (N, d) float32 projected gradients
    u: np.ndarray  # (N,) float32 outputs u_s at theta*
    index: np.ndarray  # (N,) int64 position of each example in the dataset
    manifest: dict
    col_sq_norms: np.ndarray | None = None  # (d,) squared column norms of P: ||P z||^2 ~ sum_k c_k z_k^2

    @classmethod
    def open(cls, path: str | Path, mmap: bool = True) -> "Store":
        path = Path(path)
        if not (path / "manifest.json").exists():
            raise FileNotFoundError(f"{path}: no complete gradient store here (manifest.json is missing); "
                                    f"run the gradients stage first")
        if (path / PENDING / READY).exists():
            raise FileNotFoundError(f"{path}: an extension of this store was interrupted while its files were moved "
                                    f"in; re-run `gradex gradients` (or `gradex add-sources`) to finish it")
        mode = "r" if mmap else None
        arrays = {name: np.load(path / f"{name}.npy", mmap_mode=mode) for name in ARRAYS}
        col = path / "col_sq_norms.npy"
        return cls(path, arrays["x"], arrays["u"], arrays["index"], json.loads((path / "manifest.json").read_text()),
                   np.load(col) if col.exists() else None)

    @staticmethod
    def complete(path: str | Path) -> bool:
        return (Path(path) / "manifest.json").exists() and not (Path(path) / PENDING / READY).exists()

    @property
    def dim(self) -> int:
        return int(self.x.shape[1])

    def __len__(self) -> int:
        return int(self.x.shape[0])


# ---------------------------------------------------------------------------- helpers

def _write_npy(path: Path, array: np.ndarray) -> None:
    with replacing(path) as fh:
        np.save(fh, array)


def shard_path(out_dir: Path, chunk: int) -> Path:
    """Where chunk `chunk` of a store's pass is kept until the pass joins its shards (a resumed pass
    skips the chunks whose shard exists)."""
    return out_dir / "shards" / f"chunk-{chunk:06d}.npz"


# ---------------------------------------------------------------------------- the pass

def dataset_position(i: int) -> str:
    return f"the example at dataset position {i}"


def compute_store(model: nn.Module, tokens: Sequence[Tokenized], indices: Sequence[int], pad_id: int,
                  out_dir: str | Path, projector: Projector, batch_size: int = 8, chunk_size: int = 64,
                  precision: str = "bf16", manifest_extra: dict | None = None, method: str = "auto",
                  progress: bool = True, output: str = "ce",
                  describe: Callable[[int], str] = dataset_position,
                  fp32_offsets: Collection[int] | None = None) -> Store:
    """Project the per-example gradients of u_s for tokens[i], i in `indices`, into a store at `out_dir`.

    `projector` is bound to the model's trainable parameters here if it is not bound yet.
    `manifest_extra` (model name, theta* fingerprint, ...) is part of the store's identity: a
    directory holding shards computed with other inputs is an error, never silently mixed.
    A NaN or inf gradient or output is an error naming the example, `describe(i)` (the caller knows
    its source and split). Resumes from finished chunks; under WORLD_SIZE > 1 every rank must call
    it with the same arguments.
    Under bf16 or fp16 the offsets u come from a second, fp32 forward (GradientComputer.fp32_outputs
    says why); `fp32_offsets`, when given, limits that forward to those dataset positions, and the
    other rows keep the pass's own outputs.
    """
    out_dir = Path(out_dir)
    started = time.perf_counter()
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError("compute_store: no examples to compute (indices is empty)")
    if batch_size <= 0 or chunk_size <= 0:
        raise ValueError(f"compute_store: batch_size and chunk_size must be positive, got {batch_size}, {chunk_size}")
    rank, world = distributed()
    computer = GradientComputer(model, method, output)
    projector.to(device_of(model))  # P is applied where the per-example gradients are formed
    if not projector.layout:
        projector.bind(computer.layout)
    elif projector.layout != computer.layout:
        raise ValueError("compute_store: the projector is bound to other parameters than the model's trainable ones")
    extra = dict(manifest_extra or {})
    clash = sorted(set(extra) & _MANIFEST_KEYS)
    if clash:
        raise ValueError(f"compute_store: manifest_extra keys {clash} are reserved")
    plan = {
        "format": FORMAT,
        "projector": projector.identity(),
        "precision": precision,
        "output": output,
        "ce_floor": CE_FLOOR if output == "ce" else None,
        "chunk_size": chunk_size,
        "n": len(indices),
        "indices_sha256": fingerprint(indices),
        "tokens_sha256": fingerprint([(tokens[i].ids, tokens[i].n_prompt) for i in indices]),
        "parameters_sha256": fingerprint(computer.layout),
        "extra": json.loads(json.dumps(extra, sort_keys=True, default=str)),
    }
    if fp32_offsets is not None:  # only then: a store planned before this option keeps its plan
        fp32_offsets = frozenset(int(i) for i in fp32_offsets)
        plan["fp32_offsets_sha256"] = fingerprint(sorted(fp32_offsets))

    if rank == 0:
        out_dir.joinpath("shards").mkdir(parents=True, exist_ok=True)
        if not (out_dir / "plan.json").exists():
            write_bytes(out_dir / "plan.json", json.dumps(plan, indent=2, sort_keys=True).encode())
        for stale in leftovers(out_dir.rglob("*")):  # a killed writer's (another one's may be in flight)
            stale.unlink(missing_ok=True)
    barrier(world)
    found = json.loads((out_dir / "plan.json").read_text())
    if found != plan:
        differ = sorted(k for k in set(found) | set(plan) if found.get(k) != plan.get(k))
        raise ValueError(f"{out_dir}: holds a gradient store computed with other inputs (differs in {differ}); "
                         f"delete the directory or choose another one")
    if Store.complete(out_dir):
        return Store.open(out_dir)

    chunks = [indices[lo:lo + chunk_size] for lo in range(0, len(indices), chunk_size)]
    mine = [c for c in range(len(chunks)) if c % world == rank and not shard_path(out_dir, c).exists()]
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(len(chunks[c]) for c in mine), desc="gradients", unit="ex",
               disable=not progress or rank != 0, dynamic_ncols=True)
    for c in mine:
        t0 = time.perf_counter()
        x, u = _compute_chunk(computer, projector, tokens, chunks[c], pad_id, batch_size, precision, bar, describe,
                              fp32_offsets)
        seconds = time.perf_counter() - t0
        path = shard_path(out_dir, c)
        clipped = int(at_ce_floor(torch.from_numpy(u)).sum()) if output == "ce" else 0
        with replacing(path) as fh:
            np.savez(fh, x=x, u=u, index=np.asarray(chunks[c], dtype=np.int64), seconds=np.float64(seconds),
                     method=np.str_(computer.method), clipped=np.int64(clipped))
    bar.close()
    barrier(world)
    if rank == 0:
        _merge(out_dir, chunks, plan, extra, world, started, projector.col_sq_norms().cpu().numpy().astype(np.float32))
    barrier(world)
    return Store.open(out_dir)


def _compute_chunk(computer: GradientComputer, projector: Projector, tokens: Sequence[Tokenized], chunk: list[int],
                   pad_id: int, batch_size: int, precision: str, bar: Any,
                   describe: Callable[[int], str] = dataset_position,
                   fp32_offsets: frozenset[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """x (k, d), u (k,) for one chunk, in chunk order; batches are formed by length to cut padding.
    Under bf16 or fp16 the rows' offsets (those in `fp32_offsets`, every row when it is None) come from
    an fp32 forward of those rows (compute_store)."""
    order = sorted(range(len(chunk)), key=lambda i: len(tokens[chunk[i]].ids))
    x = np.zeros((len(chunk), projector.dim), dtype=np.float32)
    u = np.zeros(len(chunk), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = collate([tokens[chunk[i]] for i in rows], [chunk[i] for i in rows], pad_id)
        xb, ub = computer.projected(batch, projector, precision, fp32_outputs=False)
        xb, ub = xb.cpu(), ub.cpu()
        exact = [j for j, i in enumerate(rows) if fp32_offsets is None or chunk[i] in fp32_offsets]
        if exact and resolve_precision(precision, device_of(computer.model)) != "fp32":
            picked = [chunk[rows[j]] for j in exact]
            ub[exact] = computer.fp32_outputs(collate([tokens[i] for i in picked], picked, pad_id)).cpu()
        step_done(device_of(computer.model))
        _check_finite(xb, ub, [chunk[i] for i in rows], describe)
        x[rows] = xb.numpy()
        u[rows] = ub.numpy()
        bar.update(len(rows))
    return x, u


def _check_finite(x: torch.Tensor, u: torch.Tensor, indices: list[int], describe: Callable[[int], str]) -> None:
    """Refuse a batch whose projected gradient or output holds NaN or inf, naming the example: one
    such row would make every estimate NaN. A non-finite coordinate of a per-example gradient
    reaches its projection (every projector weighs each coordinate by a nonzero factor)."""
    bad_u = ~torch.isfinite(u)
    bad = bad_u | ~torch.isfinite(x).all(1)
    if not bool(bad.any()):
        return
    rows = bad.nonzero().squeeze(1).tolist()
    what = "output u_s" if bool(bad_u[rows[0]]) else "gradient"
    more = f" (and {len(rows) - 1} more in its batch)" if len(rows) > 1 else ""
    raise FloatingPointError(f"gradient pass: {describe(indices[rows[0]])} has a NaN or inf {what}{more}; "
                             f"theta* may hold non-finite weights, or the precision overflowed "
                             f"(try model.precision: fp32)")


def preallocated(path: Path, shape: tuple[int, int]) -> np.memmap:
    """A float32 .npy memory map whose blocks are reserved on disk before anything is written: a memory
    map of a sparse file that meets a full disk dies of SIGBUS, with no message and no say in what
    was kept; this way a full disk is an error here, naming the size, and the shards stay."""
    x = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
    if hasattr(os, "posix_fallocate"):  # Linux and most Unixes; macOS has none (it then stays sparse)
        size = path.stat().st_size
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as err:
            del x
            raise OSError(err.errno, f"{path.parent}: no room on disk for the store's {size / 1e9:.2f} GB ({err.strerror}); "
                                     f"free some or move runs_dir, then re-run: the computed shards are kept") from None
        finally:
            os.close(fd)
    return x


def _merge(out_dir: Path, chunks: list[list[int]], plan: dict, extra: dict, world: int, started: float,
           col_sq_norms: np.ndarray) -> None:
    t0 = time.perf_counter()
    n, d = plan["n"], plan["projector"]["dim"]
    u = np.zeros(n, dtype=np.float32)
    index = np.zeros(n, dtype=np.int64)
    methods, compute_seconds, clipped, lo = set(), 0.0, 0, 0
    with replacing_path(out_dir / "x.npy") as tmp_x:  # a memory map is written through its file name
        x = preallocated(tmp_x, (n, d))
        for c, chunk in enumerate(chunks):
            path = shard_path(out_dir, c)
            if not path.exists():
                raise RuntimeError(f"{path}: chunk {c} is missing after every rank finished; re-run to compute it")
            with np.load(path) as shard:
                if shard["x"].shape != (len(chunk), d) or shard["index"].tolist() != chunk:
                    raise RuntimeError(f"{path}: shard does not match chunk {c} of the plan; delete {out_dir} and re-run")
                x[lo:lo + len(chunk)] = shard["x"]
                u[lo:lo + len(chunk)] = shard["u"]
                index[lo:lo + len(chunk)] = shard["index"]
                methods.add(str(shard["method"]))
                compute_seconds += float(shard["seconds"])
                clipped += int(shard["clipped"])
            lo += len(chunk)
        x.flush()
        del x
    _write_npy(out_dir / "u.npy", u)
    _write_npy(out_dir / "index.npy", index)
    _write_npy(out_dir / "col_sq_norms.npy", col_sq_norms)
    manifest = {
        **extra,
        "format": FORMAT,
        "n": n,
        "dim": d,
        "dtype": "float32",
        "projector": plan["projector"],
        "method": "+".join(sorted(methods)),
        "precision": plan["precision"],
        "output": plan["output"],
        # the "ce" output's floor on CE (gradex.model.CE_FLOOR) and how many examples sat at it
        "ce_floor": plan["ce_floor"],
        "ce_clipped": clipped if plan["ce_floor"] is not None else None,
        "chunk_size": plan["chunk_size"],
        "chunks": len(chunks),
        "world_size": world,
        "indices_sha256": plan["indices_sha256"],
        "tokens_sha256": plan["tokens_sha256"],
        "parameters_sha256": plan["parameters_sha256"],
        "timings": {
            "compute_seconds": round(compute_seconds, 3),  # summed over chunks and ranks, resumed runs included
            "examples_per_second_per_process": round(n / compute_seconds, 3) if compute_seconds else None,
            "merge_seconds": round(time.perf_counter() - t0, 3),
            "last_run_wall_seconds": round(time.perf_counter() - started, 3),
        },
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    write_bytes(out_dir / "manifest.json", json.dumps(manifest, indent=2).encode())
    shutil.rmtree(out_dir / "shards", ignore_errors=True)


_MANIFEST_KEYS = {"format", "n", "dim", "dtype", "projector", "method", "precision", "output", "ce_floor", "ce_clipped",
                  "chunk_size", "chunks", "world_size", "indices_sha256", "tokens_sha256", "parameters_sha256",
                  "timings", "machine"}


# ---------------------------------------------------------------------------- extending a store

def extend(path: str | Path, side: str | Path | None, keep: int, added: list[dict]) -> Store:
    """Rows [0, keep) of the complete store at `path`, then every row of the complete store `side`,
    written back to `path`: how rows computed later (gradex add-sources) join a store.

    `side` (None: no new rows, only the cut at `keep`) must hold the same gradients (SAME_GRADIENTS: projector, precision, output, trainable
    parameters, theta*), else the rows would not be comparable and this is an error. The kept rows'
    bytes are copied unchanged; rows of earlier extensions past `keep` are dropped (their source
    changed). `added` replaces the manifest's record of the appended sources. The pass over the
    plan's own examples (plan.json, base_n rows) is never cut. Crash-safe: the merged files are
    written whole into pending/, which counts only once READY is in it, and then moved in one by
    one, the manifest last; `finish_pending` completes a move that was interrupted.
    """
    path = Path(path)
    finish_pending(path)
    base = Store.open(path)
    more = Store.open(side) if side is not None else None
    differ = [k for k in SAME_GRADIENTS if more is not None and base.manifest.get(k) != more.manifest.get(k)]
    if differ:
        raise ValueError(f"{side}: its gradients differ from the store's at {path} in {differ}; rows computed "
                         f"with other settings or at another theta* cannot join the store")
    base_n = int(base.manifest.get("base_n", len(base)))
    if not base_n <= keep <= len(base):
        raise ValueError(f"extend: keep={keep} must lie between the store's own {base_n} rows and its {len(base)}")
    t0 = time.perf_counter()
    pending = path / PENDING
    shutil.rmtree(pending, ignore_errors=True)  # a partial one, from a writer killed before READY
    pending.mkdir()
    extra = len(more) if more is not None else 0
    n, d = keep + extra, base.dim
    x = preallocated(pending / "x.npy", (n, d))
    block = max(1, (1 << 26) // (4 * d))  # ~64 MB at a time: a big store is never read whole
    for lo in range(0, keep, block):
        x[lo:min(keep, lo + block)] = base.x[lo:min(keep, lo + block)]
    for lo in range(0, extra, block):
        x[keep + lo:keep + min(extra, lo + block)] = more.x[lo:lo + block]
    x.flush()
    del x
    tail = [more] if more is not None else []
    u = np.concatenate([base.u[:keep], *(m.u for m in tail)]).astype(np.float32)
    np.save(pending / "u.npy", u)
    np.save(pending / "index.npy", np.concatenate([base.index[:keep], *(m.index for m in tail)]).astype(np.int64))
    manifest = {**base.manifest, "n": n, "base_n": base_n, "added": added}
    if manifest.get("ce_floor") is not None:  # the rows kept and joined, not the base's own count
        manifest["ce_clipped"] = int(at_ce_floor(torch.from_numpy(u)).sum())
    manifest["timings"] = {**base.manifest.get("timings", {}), "added_merge_seconds": round(time.perf_counter() - t0, 3)}
    if more is not None:
        manifest["timings"]["added_compute_seconds"] = more.manifest["timings"]["compute_seconds"]
    (pending / "manifest.json").write_text(json.dumps(manifest, indent=2))
    del base, more  # close the memory maps before their files are replaced
    (pending / READY).write_text("")
    finish_pending(path)
    return Store.open(path)


def finish_pending(path: str | Path) -> None:
    """Move a complete extension (pending/READY) into the store, or delete an incomplete one; the
    manifest moves last, so a store read between two moves is refused (Store.open), never mixed."""
    pending = Path(path) / PENDING
    if not pending.exists():
        return
    if (pending / READY).exists():
        for name in ("x.npy", "u.npy", "index.npy", "manifest.json"):
            if (pending / name).exists():  # the ones an interrupted move did not get to
                os.replace(pending / name, Path(path) / name)
    shutil.rmtree(pending)
