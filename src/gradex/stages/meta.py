"""meta-train: multitask training on target + every source, the meta-initialization theta*."""

from __future__ import annotations

import time
from pathlib import Path

from gradex import config as config_mod
from gradex import ledger
from gradex.launch import barrier, distributed
from gradex.model import hub_commit
from gradex.saved import save_model
from gradex.run import META_MOMENTS, THETA_STAR, Run, log
from gradex.writer import writes


def inputs(run: Run) -> dict[str, str | None]:
    """meta-train's ledger inputs: the model, the precision it trains in, the meta recipe, the data."""
    c = run.cfg
    return {"config": config_mod.fingerprint(c.model, run.precision, c.meta), "data": run.output("data")}


@writes
def meta_train(run: Run, force: bool = False) -> Path:
    """Multitask-train on target + all sources: the meta-initialization theta* (meta/theta_star/: a peft adapter,
    or a transformers model folder under full fine-tuning). Under a launch every process trains (DDP)
    and rank 0 writes theta*."""
    from gradex.train import train, write_log

    cfg = run.cfg
    out = run.dir / "meta"
    if run.done("meta", force):
        return run.dir / THETA_STAR
    run.begin("meta", force)
    checkpoint = out / "checkpoint.pt"
    model = run.fresh_model(seed=cfg.meta.seed)
    idx = run.train_indices(run.trained_sources)  # never the added sources: theta* is screened, not retrained
    t0 = time.perf_counter()
    history = train(model, run.tokens, idx, cfg.meta, run.pad_id, run.precision, checkpoint, desc="meta-train")
    rank, world = distributed()
    if rank == 0:
        save_model(model, run.dir / THETA_STAR)
        write_log(history, out / "log.jsonl")
        if cfg.model.finetune == "lora" or cfg.gradients.preconditioner == "meta":  # full: as big as the model
            from gradex.gradients import preconditioner
            from gradex.model import trainable

            names = [name for name, _ in trainable(model)]
            preconditioner.save(preconditioner.from_checkpoint(checkpoint, names), run.dir / META_MOMENTS)
        checkpoint.unlink(missing_ok=True)
        run.mark("meta", steps=len(history), seconds=round(time.perf_counter() - t0, 1),
                 final_loss=history[-1]["loss"], **run.compute, model_commit=hub_commit(cfg.model), outputs={"theta*": ledger.sha256(run.dir / THETA_STAR)})
    barrier(world)  # theta* and the ledger are written before any process reads them
    log(f"meta-trained theta* in {len(history)} steps (train loss {history[0]['loss']:.3f} -> {history[-1]['loss']:.3f})")
    return run.dir / THETA_STAR
