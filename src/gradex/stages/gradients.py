"""gradients: projected per-example gradients and offsets at theta* into the store (with Adam's
preconditioner first, when configured), and the run's projector bound to a model."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import torch

from gradex import config as config_mod
from gradex import ledger
from gradex.model import trainable_vector
from gradex.launch import barrier, distributed, launch_rank
from gradex.run import META_MOMENTS, Run, log
from gradex.surrogate import PRECONDITIONER_FILE, make_run_projector
from gradex.writer import writes


def inputs(run: Run) -> dict[str, str | None]:
    """The gradient pass's ledger inputs: the model, precision and gradients settings (and the refit
    recipe's batches, on which Adam's preconditioner is measured), the data, theta*, and the added
    sources' examples where the run has some."""
    c = run.cfg
    batches = (c.refit.batch_size, c.refit.seed) if c.gradients.preconditioner == "adam" else None
    found = {"config": config_mod.fingerprint(c.model, run.precision, c.gradients, batches),
             "data": run.output("data"), "theta*": run.output("theta*")}
    return {**found, "added": run.output("added")} if run.added else found


@writes
def gradients(run: Run, force: bool = False) -> Path:
    """Projected per-example gradients and offsets at theta*, for training and target validation
    examples; then the rows of the sources added to the run (gradex add-sources), at the same theta*."""
    from gradex.gradients import compute_store
    from gradex.gradients.store import finish_pending

    cfg = run.cfg
    out = run.dir / "store"
    if run.done("gradients", force):
        return out
    _, world = distributed()
    t0 = time.perf_counter()
    model = None
    if not force and run.base_current():
        # Only the added sources changed: the store's own rows stay, the new ones are computed.
        run.mark("gradients", status="running", base_inputs=run.base_inputs())
    else:
        run.begin("gradients", force)
        if launch_rank() == 0:
            finish_pending(out)  # a store is never computed into while an extension's move is half done
        barrier(world)  # no rank writes a shard before rank 0 has cleared a stale store
        model = run.meta_model()
        if cfg.gradients.preconditioner == "adam":
            # Only rank 0 decides whether to compute it; every rank then meets at the same barrier (a rank
            # that checked the file itself could see it already written and skip the barrier).
            if launch_rank() == 0 and not (out / PRECONDITIONER_FILE).exists():
                from gradex.gradients import preconditioner

                moments = preconditioner.second_moments(
                    model, run.tokens, run.train_indices(run.trained_sources), run.pad_id, cfg.refit.batch_size,
                    cfg.gradients.preconditioner_batches, run.gradient_precision, seed=cfg.refit.seed)
                preconditioner.save(moments, out / PRECONDITIONER_FILE)
            barrier(world)  # every rank projects with rank 0's preconditioner
        elif cfg.gradients.preconditioner == "meta":
            if launch_rank() == 0 and not (out / PRECONDITIONER_FILE).exists():
                from gradex.gradients import preconditioner

                preconditioner.save(preconditioner.load(meta_moments(run)), out / PRECONDITIONER_FILE)
            barrier(world)
        projector = make_run_projector(run, model)
        # the examples theta* was trained on; the added sources' rows come after them (extend_store)
        validation = run.indices("validation")
        idx = run.train_indices(run.trained_sources) + validation
        compute_store(model, run.tokens, idx, run.pad_id, out, projector, batch_size=cfg.gradients.batch_size,
                      chunk_size=cfg.gradients.chunk_size, precision=run.gradient_precision, manifest_extra=store_identity(run, model),
                      output=cfg.gradients.output, describe=_describer(run),
                      fp32_offsets=fp32_offsets(cfg.gradients.offsets, validation))
        run.mark("gradients", status="running", base_inputs=run.base_inputs())
    added = extend_store(run, model)
    manifest = json.loads((out / "manifest.json").read_text())
    n, seconds = manifest["n"], time.perf_counter() - t0
    clipped = manifest.get("ce_clipped") or 0  # examples at the CE floor: a zero gradient each (gradex.model)
    log(f"projected gradients of {n} examples (d={manifest['dim']}, {run.gradient_precision}) in {seconds:.0f} s"
        + (f"; {clipped} at the CE floor (zero gradient)" if clipped else "") + f": {out}")
    run.mark("gradients", examples=n, seconds=round(seconds, 1), base_inputs=run.base_inputs(),
             device=str(run.device), precision=run.gradient_precision,
             added=[{k: e[k] for k in ("source", "examples", "rows")} for e in added],
             outputs={"store": store_sha256(out)})
    return out


def fp32_offsets(setting: str, validation: list[int]) -> list[int] | None:
    """The rows whose offsets come from an fp32 forward (gradients.offsets), as compute_store takes
    them: None for every row, else these (the validation rows, or none)."""
    return None if setting == "fp32" else (validation if setting == "validation" else [])


def meta_moments(run: Run) -> Path:
    """The meta-train's optimizer moments (gradients.preconditioner meta), or an error saying how to get them."""
    path = run.dir / META_MOMENTS
    if not path.exists():
        raise config_mod.ConfigError(f"gradients.preconditioner meta: {path} is missing (a meta-train of an earlier "
                                     f"gradex, or a full fine-tune's with another preconditioner); run "
                                     f"`gradex meta-train --force`, or use gradients.preconditioner adam")
    return path


def store_identity(run: Run, model: torch.nn.Module) -> dict:
    """The caller's part of a store's identity (compute_store's manifest_extra): the model and theta*."""
    return {"model": run.cfg.model.name, "finetune": run.cfg.model.finetune, "adapter_sha256": run.output("theta*"),
            "theta_norm": trainable_vector(model).norm().item()}


def _describer(run: Run):
    return lambda i: (f"{run.examples[i].origin or 'source ' + run.examples[i].source} "
                      f"({run.examples[i].split} split, example {i})")


def _added_entries(run: Run) -> list[dict]:
    """One record per added source, in order: its examples and their content hash."""
    from gradex.data import data_sha256

    entries = []
    for src in run.added:
        idx = [i for i, e in enumerate(run.examples) if e.source == src.name]
        entries.append({"source": src.name, "examples": len(idx), "indices": idx,
                        "data_sha256": data_sha256([run.examples[i] for i in idx], [run.tokens[i] for i in idx])})
    return entries


def extend_store(run: Run, model: torch.nn.Module | None = None) -> list[dict]:
    """Bring the store's added rows in line with the run's added sources: rows of the added sources
    that are still added unchanged, at this theta*, are kept; the rest are computed at theta* with
    the run's projector (the same seed, dim and preconditioner as the store's own rows) into a side
    store (store/added-<hash>/, resumable like any store) and appended (gradex.gradients.store.extend:
    the old rows byte for byte). Returns the manifest's record of the added sources."""
    from gradex.gradients import compute_store
    from gradex.gradients.store import Store, extend, finish_pending

    out = run.dir / "store"
    rank, world = distributed()
    if rank == 0:
        finish_pending(out)
    barrier(world)
    manifest = Store.open(out).manifest
    have, wanted, theta = manifest.get("added", []), _added_entries(run), run.output("theta*")
    same = 0
    while (same < min(len(have), len(wanted)) and have[same]["source"] == wanted[same]["source"]
           and have[same]["data_sha256"] == wanted[same]["data_sha256"] and have[same]["adapter_sha256"] == theta):
        same += 1
    if same == len(have) == len(wanted):
        if rank == 0:
            for old in out.glob("added-*"):  # a finished side pass a killed run had not yet removed
                shutil.rmtree(old)
        return have
    keep = int(manifest.get("base_n", manifest["n"])) + sum(e["examples"] for e in have[:same])
    todo = wanted[same:]
    side = out / f"added-{config_mod.fingerprint(theta, [e['data_sha256'] for e in todo])}"
    if rank == 0:
        for old in out.glob("added-*"):  # a side pass for another set of sources, left by a killed run
            if old != side:
                shutil.rmtree(old)
    new_entries, lo = [], keep
    for e in todo:
        new_entries.append({"source": e["source"], "examples": e["examples"], "rows": [lo, lo + e["examples"]],
                            "data_sha256": e["data_sha256"], "adapter_sha256": theta,
                            "trained_into_theta_star": False})
        lo += e["examples"]
    idx = [i for e in todo for i in e["indices"]]
    if idx:
        t0 = time.perf_counter()
        model = model if model is not None else run.meta_model()
        projector = make_run_projector(run, model)
        g = run.cfg.gradients
        log(f"gradients: {len(idx)} examples of the added source(s) {[e['source'] for e in todo]}, at the existing "
            f"theta* (not trained on them)")
        compute_store(model, run.tokens, idx, run.pad_id, side, projector, batch_size=g.batch_size,
                      chunk_size=g.chunk_size, precision=run.gradient_precision, manifest_extra=store_identity(run, model),
                      output=g.output, describe=_describer(run), fp32_offsets=fp32_offsets(g.offsets, []))
        for e in new_entries:
            e["seconds"] = round((time.perf_counter() - t0) * e["examples"] / len(idx), 1)
    if rank == 0:
        extend(out, side if idx else None, keep, have[:same] + new_entries)
        shutil.rmtree(side, ignore_errors=True)
    barrier(world)
    dropped = [e["source"] for e in have[same:]]
    log(f"gradients: the store holds {keep - int(manifest.get('base_n', manifest['n'])) + len(idx)} rows of added "
        f"sources" + (f" (recomputed or dropped: {dropped})" if dropped else ""))
    return have[:same] + new_entries


STORE_FILES = ("x.npy", "u.npy", "index.npy", "col_sq_norms.npy", PRECONDITIONER_FILE)


def store_sha256(out: Path) -> str:
    """The store's content hash: its arrays and preconditioner, not its timings or machine."""
    return hashlib.sha256("".join(ledger.sha256(out / f) for f in STORE_FILES if (out / f).exists()).encode()).hexdigest()[:16]


