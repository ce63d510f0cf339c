"""gradients: projected per-example gradients and offsets at theta* into the store (with Adam's
preconditioner first, when configured), and the run's projector bound to a model."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch

from gradex import config as config_mod
from gradex import ledger
from gradex.config import Config
from gradex.model import trainable_vector
from gradex.launch import barrier, distributed, launch_rank
from gradex.run import Run
from gradex.stages.meta import meta_train
from gradex.stages.prepare import prepare


def gradients(cfg: Config, force: bool = False) -> Path:
    """Projected per-example gradients and offsets at theta*, for training and target validation examples."""
    from gradex.gradients import compute_store

    run = prepare(cfg)
    if launch_rank() != 0 and run.state("meta")[0] != "done":
        raise config_mod.ConfigError("under a multi-process launch run `gradex meta-train` first")
    meta_train(cfg)
    out = run.dir / "store"
    if run.done("gradients", force):
        return out
    _, world = distributed()
    t0 = time.perf_counter()
    run.begin("gradients", force)
    barrier(world)  # no rank writes a shard before rank 0 has cleared a stale store
    model = run.meta_model()
    if cfg.gradients.preconditioner == "adam":
        # Only rank 0 decides whether to compute it; every rank then meets at the same barrier (a rank
        # that checked the file itself could see it already written and skip the barrier).
        if launch_rank() == 0 and not (out / PRECONDITIONER_FILE).exists():
            from gradex.gradients import preconditioner

            moments = preconditioner.second_moments(
                model, run.tokens, run.train_indices(run.sources), run.pad_id, cfg.refit.batch_size,
                cfg.gradients.preconditioner_batches, run.precision, seed=cfg.refit.seed)
            preconditioner.save(moments, out / PRECONDITIONER_FILE)
        barrier(world)  # every rank projects with rank 0's preconditioner
    projector = make_run_projector(run, model)
    idx = run.train_indices(run.sources) + run.indices("validation")
    extra = {"model": cfg.model.name, "finetune": cfg.model.finetune, "adapter_sha256": run.output("theta*"),
             "theta_norm": trainable_vector(model).norm().item()}
    compute_store(model, run.tokens, idx, run.pad_id, out, projector, batch_size=cfg.gradients.batch_size,
                  chunk_size=cfg.gradients.chunk_size, precision=run.precision, manifest_extra=extra,
                  output=cfg.gradients.output, describe=lambda i: f"{run.examples[i].origin or 'source ' + run.examples[i].source} "
                                                                 f"({run.examples[i].split} split, example {i})")
    run.mark("gradients", examples=len(idx), seconds=round(time.perf_counter() - t0, 1),
             outputs={"store": store_sha256(out)})
    return out


PRECONDITIONER_FILE = "preconditioner.pt"  # in store/: Adam's second moments at theta*
STORE_FILES = ("x.npy", "u.npy", "index.npy", "col_sq_norms.npy", PRECONDITIONER_FILE)


def store_sha256(out: Path) -> str:
    """The store's content hash: its arrays and preconditioner, not its timings or machine."""
    return hashlib.sha256("".join(ledger.sha256(out / f) for f in STORE_FILES if (out / f).exists()).encode()).hexdigest()[:16]


def make_run_projector(run: Run, model: torch.nn.Module):
    """The run's projector bound to `model`: P, wrapped with Adam's preconditioner when configured
    (its second moments are read from the store, so the gradients stage must have run)."""
    from gradex.gradients import Preconditioned, make_projector, preconditioner

    g = run.cfg.gradients
    projector = make_projector(g.projection, model, g.dim, g.seed)
    if g.preconditioner == "none":
        return projector
    moments = preconditioner.load(run.dir / "store" / PRECONDITIONER_FILE)
    return Preconditioned(projector, preconditioner.adam_scales(moments)).bind(projector.layout)
