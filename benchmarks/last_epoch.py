"""The training examples' gradients collected in the meta-train's last epoch (gradex.gradients.collect)
against the gradient pass at theta*: what the store costs, and `gradex validate`'s agreement (issue
"Side by side with the peer libraries", item 3, "collect the per-example projected gradients in the
meta-train's last epoch").

    python benchmarks/last_epoch.py --config src/gradex/examples/corrupted.yaml --seed-from runs/preconditioner-corrupted/meta
    python benchmarks/last_epoch.py --seed-from runs/fresh/default --subsets 8

Two run directories of one config under --runs-dir, both starting from copies of --seed-from's
prepared data, theta*, fine-tunes and validate's real fine-tunes (so validate trains nothing that run
has trained; what `pass`'s validate trains is copied to `last_epoch`'s, which then trains nothing):
- `pass`: the gradients stage as it ships (the pass at theta*, the meta-train's moments as its
  preconditioner), run here and timed;
- `last_epoch`: the meta-train is run again here, with a Collector in its last epoch. It must reach
  theta* bit for bit (checked against the seeded theta*: collecting changes no step). The store's
  training rows are the collected ones; their offsets u_s come from one fp32 forward at theta*; the
  target's validation rows (never trained on) come from the gradient pass at theta*. The projector's
  preconditioner is Adam's second moments when the last epoch starts (fixed for every row, the
  validation rows too).

Cost, in this one process: the last epoch's seconds minus the epoch before it (the same examples,
the same number of steps), plus the offsets' forward and the validation rows, against the pass's. A
second run keeps `pass`'s store and the seconds its ledger recorded, and trains `last_epoch` again:
remove --runs-dir for a ratio of one process.
Agreement: preconditioner.py's gate (error within seed noise of the pass's, ranking within what seeds
move), and whether `gradex select` picks the same.

Writes benchmarks/results/last-epoch[-<name>].json; prints its flat `summary` last.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from gradex import config as config_mod
from gradex import ledger, pipeline
from gradex.atomic import write_json, replacing
from gradex.data import collate
from gradex.diagnostics import validate
from gradex.gradients import GradientComputer, Preconditioned, compute_store, make_projector, preconditioner
from gradex.gradients.collect import Collector
from gradex.gradients.store import shard_path
from gradex.model import at_ce_floor, example_outputs, trainable, trainable_vector
from gradex.run import Run
from gradex.stages.gradients import store_identity, store_sha256
from gradex.surrogate import PRECONDITIONER_FILE
from gradex.train import total_steps, train
from gradex.writer import writing

from machine import command, describe  # benchmarks/machine.py, beside this script
from preconditioner import agreement, validations
from weights import seeded

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
KINDS = ("pass", "last_epoch")


def by_length(run: Run, indices: list[int], batch_size: int) -> list[list[int]]:
    order = sorted(indices, key=lambda i: len(run.tokens[i].ids))
    return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]


def collected_meta_train(run: Run) -> tuple[torch.nn.Module, Collector, dict, list[float]]:
    """The meta-train again, collecting in its last epoch: (theta*'s model, the collector, the moments
    the projector was preconditioned with, each epoch's seconds)."""
    cfg = run.cfg
    model = run.fresh_model(seed=cfg.meta.seed)
    idx = run.train_indices(run.trained_sources)
    steps, per_epoch = total_steps(cfg.meta, len(idx)), math.ceil(len(idx) / cfg.meta.batch_size)
    moments: dict = {}

    def projector(opt: torch.optim.Optimizer) -> Preconditioned:
        moments.update(preconditioner.from_optimizer(opt, trainable(model)))
        g = cfg.gradients
        return Preconditioned(make_projector(g.projection, model, g.dim, g.seed), preconditioner.adam_scales(moments))

    collector = Collector(model, projector, range(steps - per_epoch, steps))
    log = train(model, run.tokens, idx, cfg.meta, run.pad_id, run.precision, None, desc="meta-train (collecting)",
                collector=collector)
    model.eval()
    return model, collector, moments, epoch_seconds(log, per_epoch)


def epoch_seconds(log: list[dict], per_epoch: int) -> list[float]:
    ends = [log[k - 1]["seconds"] for k in range(per_epoch, len(log) + 1, per_epoch)]
    return [round(b - a, 2) for a, b in zip([0.0, *ends[:-1]], ends)]


def build_store(run: Run, model: torch.nn.Module, collector: Collector, moments: dict) -> dict:
    """The last_epoch run's store: collected training rows, fp32 offsets at theta*, validation rows
    from the pass; written as the gradient pass's shards, merged by compute_store, recorded in the
    ledger as the gradients stage's output."""
    g = run.cfg.gradients
    idx = run.train_indices(run.trained_sources)
    val = run.indices("validation")
    computer = GradientComputer(model)
    projector = collector.projector
    x, u = {}, {}
    t0 = time.perf_counter()
    with torch.no_grad():
        for rows in by_length(run, idx, g.batch_size):
            # fp32, as the pass's offsets are in every precision (GradientComputer.fp32_outputs says why)
            batch = collate([run.tokens[i] for i in rows], rows, run.pad_id).to(run.device)
            out = example_outputs(model, batch, g.output).float()
            u.update(zip(rows, out.tolist()))
    offsets_seconds = time.perf_counter() - t0
    x.update(zip(idx, collector.rows(idx)))
    t0 = time.perf_counter()
    for rows in by_length(run, val, g.batch_size):
        xb, ub = computer.projected(collate([run.tokens[i] for i in rows], rows, run.pad_id), projector,
                                    run.gradient_precision)
        x.update(zip(rows, xb))
        u.update(zip(rows, ub.tolist()))
    validation_seconds = time.perf_counter() - t0

    out_dir = run.dir / "store"
    shutil.rmtree(out_dir, ignore_errors=True)  # this benchmark's own run directory
    (out_dir / "shards").mkdir(parents=True)
    everything = idx + val
    chunks = [everything[lo:lo + g.chunk_size] for lo in range(0, len(everything), g.chunk_size)]
    for c, chunk in enumerate(chunks):
        uc = np.asarray([u[i] for i in chunk], dtype=np.float32)
        with replacing(shard_path(out_dir, c)) as fh:
            np.savez(fh, x=torch.stack([x[i] for i in chunk]).numpy().astype(np.float32), u=uc,
                     index=np.asarray(chunk, dtype=np.int64), seconds=np.float64(0.0),
                     method=np.str_("collected" if chunk[0] in collector.x else "hooks"),
                     clipped=np.int64(int(at_ce_floor(torch.from_numpy(uc)).sum())))
    preconditioner.save(moments, out_dir / PRECONDITIONER_FILE)
    compute_store(model, run.tokens, everything, run.pad_id, out_dir, projector, batch_size=g.batch_size,
                  chunk_size=g.chunk_size, precision=run.gradient_precision, manifest_extra=store_identity(run, model),
                  output=g.output, progress=False)  # every chunk is there: it only merges them
    seconds = offsets_seconds + validation_seconds
    run.mark("gradients", examples=len(everything), seconds=round(seconds, 1), base_inputs=run.base_inputs(),
             device=str(run.device), precision=run.gradient_precision, added=[],
             collected="meta-train's last epoch", outputs={"store": store_sha256(out_dir)})
    return {"offsets_seconds": round(offsets_seconds, 2), "validation_rows_seconds": round(validation_seconds, 2),
            "training_rows": len(idx), "validation_rows": len(val)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=config_mod.EXAMPLES_DIR / "default.yaml")
    ap.add_argument("--subsets", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--runs-dir", type=Path, default=None,
                    help="where the two run directories go (default runs/last-epoch[-<name>])")
    ap.add_argument("--seed-from", type=Path, required=True,
                    help="a run directory of the same config whose data, theta*, fine-tunes and validate rows to start from")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    if args.seeds < 2:
        ap.error("--seeds: at least 2, for the seed noise the gate is measured against")
    given = config_mod.load(args.config, args.overrides)
    if given.gradients.output != "ce":
        ap.error(f"gradients.output {given.gradients.output}: the Collector rescales to the \"ce\" output only")
    name = given.name
    suffix = "" if name == "default" else f"-{name}"
    runs_dir = args.runs_dir or ROOT / "runs" / f"last-epoch{suffix}"
    cfgs = {kind: config_mod.load(args.config, [*args.overrides, f"runs_dir={runs_dir}", f"name={kind}"])
            for kind in KINDS}
    for cfg in cfgs.values():
        seeded(cfg.run_dir, args.seed_from, items=("data", "meta", "finetunes", "validate"))

    # one after the other, nothing else running: every time below is of this process
    pipeline.gradients(cfgs["pass"])
    pass_seconds = ledger.read(cfgs["pass"].run_dir / "store")["seconds"]
    print(f"gradients (pass): {pass_seconds} s", file=sys.stderr, flush=True)

    run = pipeline.prepare(cfgs["last_epoch"])
    model, collector, moments, epochs = collected_meta_train(run)
    same_theta = torch.equal(trainable_vector(model), trainable_vector(run.meta_model()))
    if not same_theta:
        raise SystemExit("the collecting meta-train did not reach the seeded theta*: collecting changed a step "
                         "(or the seed run was trained on another host kind)")
    with writing(run.dir):
        built = build_store(run, model, collector, moments)
    collect_seconds = epochs[-1] - epochs[-2]
    epoch_cost = collect_seconds + built["offsets_seconds"] + built["validation_rows_seconds"]
    print(f"last epoch {epochs[-1]} s against {epochs[-2]} s before it; offsets {built['offsets_seconds']} s, "
          f"validation rows {built['validation_rows_seconds']} s", file=sys.stderr, flush=True)

    results = {"pass": validate(cfgs["pass"], k=args.subsets, seeds=args.seeds)}
    # the same real fine-tunes: validate's rows are keyed by what shapes a fine-tune, not by the store
    shutil.copytree(cfgs["pass"].run_dir / "validate" / "rows", cfgs["last_epoch"].run_dir / "validate" / "rows",
                    dirs_exist_ok=True)
    results["last_epoch"] = validate(cfgs["last_epoch"], k=args.subsets, seeds=args.seeds)
    selected = {kind: pipeline.select(cfgs[kind])["selected"] for kind in KINDS}
    summary = {
        "last_epoch_vs_pass_store_seconds": round(epoch_cost / pass_seconds, 3),
        "pass_store_seconds": pass_seconds, "last_epoch_store_seconds": round(epoch_cost, 1),
        "collecting_epoch_vs_epoch_before": round(epochs[-1] / epochs[-2], 3),
        **agreement(results, "pass", "last_epoch"),
        "same_selection": selected["pass"] == selected["last_epoch"],
    }
    body = {"command": command("last_epoch.py", argv),
            "machine": describe(precision={"meta-train": run.precision, "gradients": run.gradient_precision}),
            "subsets": args.subsets, "seeds": args.seeds, "theta_star_identical": same_theta,
            "epoch_seconds": epochs, "store": built, "selected": selected,
            "validation": validations(results),
            "summary": summary}
    write_json(RESULTS / f"last-epoch{suffix}.json", body)
    print(json.dumps(summary))
    return body


if __name__ == "__main__":
    main()
