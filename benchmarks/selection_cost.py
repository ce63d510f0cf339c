"""What gradex's selection costs against selecting by real fine-tuning, on the embedded default or a
config of your own.

    python benchmarks/selection_cost.py                     # fresh run directory runs/selection-cost
    python benchmarks/selection_cost.py --sizes 0 1 3 6 10  # the subset sizes whose fine-tunes are timed
    python benchmarks/selection_cost.py --reuse             # keep runs/selection-cost, stage times from its ledger
    python benchmarks/selection_cost.py --config src/gradex/examples/strategyqa.yaml --tag strategyqa-k100 \
        --set data.clusters.k=100 --set select.method=forward --sizes 1 5 20 50 100 1 1 1 1 1 1 1 1 1 1 1 1 0
                                                            # a real pool of 100 sources (clusters of StrategyQA):
                                                            # runs/selection-cost-strategyqa-k100, results/selection-cost-strategyqa-k100.json

1. gradex's selection, timed in this process from a fresh run directory: prepare, meta-train
   (theta*), the gradient pass, the clusters (with data.clusters), and select (estimates + selection).
2. Real fine-tunes with the deployed `finetune` recipe (the same steps for every mix) of subsets of
   the given sizes (0 = the target alone; members drawn at random, seeded), each timed (training,
   and training + evaluation).
3. Forward stepwise selection by real fine-tuning trains one fine-tune per subset it evaluates: the
   target alone, then every candidate of every round until no addition helps. How many rounds it
   would run is taken from forward stepwise on gradex's estimates over the same sources (the
   estimates stand in for the real losses), so its time is an EXTRAPOLATION: that count times the
   mean measured fine-tune. `speedup` = that time / the selection's measured time;
   `overhead_vs_finetune` = the selection's time / the all-sources fine-tune's training time;
   `by_size_speedup`: the same search, each subset costed at its size (`by_size`: the measured mean at
   each size timed, interpolated), since a mix's fine-tune costs more as it grows, and
   `by_size_speedup_after_round` the same had a real search stopped after round r;
   `one_round_speedup` = n x the mean measured single-source fine-tune (of every fine-tune, when no
   size is 1) / the selection's time: the first round alone (n single-source fine-tunes), which every
   forward search trains, so a lower bound that assumes nothing of how many rounds a real search runs.
   Whether a real search goes past that round: with the target alone timed (size 0),
   `singles_below_target_alone` counts the single sources timed whose fine-tune ends below the target
   alone in validation loss (a real search adds one of those, then trains a second round).
   Where the target alone trains nothing (data.clusters from target_train: it is theta*, evaluated),
   it is costed at 0 s and left out of the mean fine-tune. A mix the seeded draws repeat counts once.
4. The same formula for n = 100 and n = 1,000 sources (those above the pool's own n; not for clusters,
   whose examples do not grow with n), from the scale benchmark's figures
   (benchmarks/results/scale.json: the estimate-and-select cost and forward's rounds at that n)
   with the model stages scaled by the number of examples (per_source examples per source, the
   recipe's epochs): every input of the extrapolation is written next to it.

Writes benchmarks/results/selection-cost.json (selection-cost-TAG.json with --tag) and prints one JSON line last.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from gradex import config as config_mod
from gradex import ledger, pipeline
from gradex.stages.compare import forward_subsets_by_size

from machine import command, describe  # benchmarks/machine.py, beside this script

ROOT = Path(__file__).resolve().parents[1]


def forward_count(n: int, rounds: int) -> int:
    """Fine-tunes a forward search over n sources trains when it adds `rounds - 1` sources and then
    stops: the target alone, then n, n - 1, ... candidates, one round more than it adds."""
    return 1 + sum(n - k for k in range(min(rounds, n)))


def by_size(sizes: dict[int, int], rows: list[dict]) -> dict[int, float]:
    """The search's fine-tuning seconds, had it stopped after each round r (its subsets of at most r
    sources), with each subset costed at its size: the mean measured training time at each size timed,
    linearly interpolated between them (held at the ends). A step's cost follows the mix, and a mix of
    fewer examples than a batch trains smaller batches."""
    timed: dict[int, list[float]] = collections.defaultdict(list)
    for r in rows:
        timed[r["size"]].append(r["train_seconds"])
    xs = sorted(timed)
    ys = [statistics.mean(timed[x]) for x in xs]
    return {r: float(sum(count * np.interp(size, xs, ys) for size, count in sizes.items() if size <= r))
            for r in sizes if r > 0}


def timed_selection(cfg: config_mod.Config) -> dict:
    stages = {}
    clusters = [("clusters", pipeline.clusters)] if cfg.data.clusters is not None else []
    for name, stage in (("prepare", pipeline.prepare), ("meta-train", pipeline.meta_train),
                        ("gradients", pipeline.gradients), *clusters, ("select", pipeline.select)):
        t0 = time.perf_counter()
        stage(cfg)
        stages[name] = round(time.perf_counter() - t0, 2)
        print(f"{name}: {stages[name]:.1f} s", file=sys.stderr, flush=True)
    return stages


def timed_finetunes(run: pipeline.Run, sizes: list[int], seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for size in sizes:
        members = sorted(run.sources) if size >= len(run.sources) else sorted(rng.sample(run.sources, size))
        t0 = time.perf_counter()
        res = pipeline.finetune_mix(run, members, 0, desc=f"finetune[{size} sources]")
        wall = time.perf_counter() - t0
        kept = wall < res["seconds"]  # an earlier call's fine-tune, read back: its training time is its record's
        rows.append({"size": len(members), "members": members, "train_seconds": res["seconds"],
                     "wall_seconds": None if kept else round(wall, 2), "kept": kept, "steps": res["steps"],
                     "examples": res["examples"], "validation_loss": res["validation"]["loss"]})
        print(f"fine-tune of {len(members)} source(s): {res['seconds']:.1f} s training"
              + (" (kept from an earlier call)" if kept else f", {wall:.1f} s with evaluation"), file=sys.stderr, flush=True)
    return rows


def at_scale(n: int, base: dict, scale_cells: list[dict]) -> dict | None:
    """The speedup formula at n sources: the model stages grow with the examples (n x per_source),
    the estimate-and-select cost and forward's rounds come from the scale benchmark's cell at this n
    (its largest N), the fine-tune stays the same (a fixed number of steps)."""
    cells = [c for c in scale_cells if c["n"] == n]
    if not cells:
        return None
    cell = max(cells, key=lambda c: c["N"])
    grow = (n + 1) / (base["n"] + 1)  # examples, the target's included, at per_source each
    model_seconds = (base["stages"]["meta-train"] + base["stages"]["gradients"]) * grow
    select_seconds = cell["build_s"] + cell["forward_s"]
    selection = model_seconds + select_seconds
    count = forward_count(n, cell["forward_rounds"])
    by_finetuning = count * base["finetune_seconds"]
    return {"n": n, "examples_vs_default": round(grow, 1), "model_stages_seconds": round(model_seconds, 1),
            "estimate_select_seconds": round(select_seconds, 1), "scale_cell": {"n": cell["n"], "N": cell["N"]},
            "forward_rounds": cell["forward_rounds"], "forward_finetunes": count,
            "by_finetuning_seconds": round(by_finetuning, 1), "selection_seconds": round(selection, 1),
            "speedup": round(by_finetuning / selection, 2)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[0, 1, 3, 6, 10],
                    help="subset sizes whose fine-tunes are timed (at least 5; 0 = the target alone)")
    ap.add_argument("--config", default=None, help="a gradex config (default: the embedded default)")
    ap.add_argument("--tag", default=None, help="names the run directory (selection-cost-TAG) and the results "
                                               "(results/selection-cost-TAG.json)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--runs-dir", default=str(ROOT / "runs"))
    ap.add_argument("--seed", type=int, default=0, help="which members the timed subsets get")
    ap.add_argument("--reuse", action="store_true",
                    help="keep a complete runs/selection-cost and take its stage times from its ledger "
                         "(stage.json, recorded when those stages ran) instead of running them again")
    args = ap.parse_args(argv)
    if len(args.sizes) < 5:
        ap.error("--sizes: time at least 5 fine-tunes")
    run_name = "selection-cost" + (f"-{args.tag}" if args.tag else "")
    cfg = config_mod.load(args.config, [*args.overrides, f"runs_dir={args.runs_dir}", f"name={run_name}"])
    if args.reuse:
        clusters = [("clusters", "clusters")] if cfg.data.clusters is not None else []
        stages = {name: ledger.read(cfg.run_dir / d).get("seconds") for name, d in
                  (("meta-train", "meta"), ("gradients", "store"), *clusters, ("select", "select"))}
        if None in stages.values():
            ap.error(f"--reuse: {cfg.run_dir} has no complete meta-train, gradients and select to reuse")
        pipeline.select(cfg)  # done: returns at once
        selection_seconds = sum(stages.values())
    else:
        shutil.rmtree(cfg.run_dir, ignore_errors=True)  # a resumed run would time nothing
        t0 = time.perf_counter()
        stages = timed_selection(cfg)
        selection_seconds = time.perf_counter() - t0
    run = pipeline.Run(cfg)
    n = len(run.sources)
    fn, _, _ = pipeline.estimator(run)
    shape = forward_subsets_by_size(fn, n)  # the subsets a forward search on the estimates evaluates
    count = sum(shape.values())
    rows = timed_finetunes(run, args.sizes, args.seed)
    unique = list({tuple(r["members"]): r for r in rows}.values())  # a seeded draw may repeat a mix: once each
    trained = [r for r in unique if r["steps"] > 0] or unique  # theta* evaluated is no fine-tune
    finetune_seconds = statistics.mean(r["train_seconds"] for r in trained)
    everything = [r for r in rows if r["size"] == n]
    all_seconds = everything[0]["train_seconds"] if everything else None
    by_finetuning = count * finetune_seconds
    rounds = by_size(shape, unique)
    sized = rounds[max(rounds)] if rounds else by_finetuning
    distinct = [r for r in unique if r["size"] == 1]
    singles = [r["train_seconds"] for r in distinct]
    single = statistics.mean(singles) if singles else finetune_seconds
    recorded = {stage: ledger.read(cfg.run_dir / d).get("seconds") for stage, d in
                (("meta", "meta"), ("store", "store"), ("clusters", "clusters"), ("select", "select"))
                if (cfg.run_dir / d).exists()}
    base = {"n": n, "stages": stages, "finetune_seconds": finetune_seconds}
    scale_path = ROOT / "benchmarks" / "results" / "scale.json"
    scale_cells = json.loads(scale_path.read_text())["cells"] if scale_path.exists() else []
    line = {"selection_seconds": round(selection_seconds, 1), "finetune_seconds_mean": round(finetune_seconds, 1),
            "finetunes_timed": len(rows), "forward_finetunes": count,
            "by_finetuning_seconds": round(by_finetuning, 1), "speedup": round(by_finetuning / selection_seconds, 2),
            "overhead_vs_finetune": round(selection_seconds / all_seconds, 2) if all_seconds else None,
            "forward_subsets_by_size": shape, "by_size_finetuning_seconds": round(sized, 1),
            "by_size_speedup": round(sized / selection_seconds, 2),
            "by_size_speedup_after_round": {r: round(v / selection_seconds, 2) for r, v in rounds.items()},
            # no extrapolation of the search's shape: any forward search by real fine-tuning trains at
            # least its first round, one fine-tune per source, at what single sources cost (a step's cost
            # follows the mix's example lengths), else at the mean of every fine-tune timed
            "one_round_finetunes": n, "one_round_finetune_seconds": round(single, 1),
            "one_round_speedup": round(n * single / selection_seconds, 2)}
    alone = next((r["validation_loss"] for r in rows if r["size"] == 0), None)
    if alone is not None and distinct:
        line |= {"target_alone_validation_loss": round(alone, 4), "singles_timed": len(distinct),
                 "singles_below_target_alone": sum(r["validation_loss"] < alone for r in distinct)}
    # at_scale grows the model stages with the sources (per_source examples each): not a clustered pool's
    for big in (b for b in (100, 1000) if b > n and cfg.data.clusters is None):
        got = at_scale(big, base, scale_cells)
        if got:
            line[f"n{big}_speedup"] = got["speedup"]
            base[f"n{big}"] = got
    body = {"command": command("selection_cost.py", argv),
            "stages_timed": "from the run's ledger (--reuse)" if args.reuse else "in this process",
            "machine": describe(precision=run.precision),
            "note": ("by_finetuning_seconds is an extrapolation: forward_finetunes (the subsets a forward search "
                     "on gradex's estimates evaluates) times the mean measured fine-tune (training only; a real "
                     "search would also evaluate each one). The n100/n1000 figures extrapolate further (see "
                     "at_scale in the script)."),
            "stages_seconds": stages, "ledger_seconds": recorded, "finetunes": rows,
            "extrapolations": {k: v for k, v in base.items() if k.startswith("n") and k != "n"}, **line}
    out = ROOT / "benchmarks" / "results" / f"{run_name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(body, indent=2) + "\n")
    print(json.dumps(line))
    return body


if __name__ == "__main__":
    main()
