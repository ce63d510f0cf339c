"""A shorter meta-train: the selection's overhead and `gradex validate`'s agreement at meta.epochs 2
against the default's 3 (issue "Side by side with the peer libraries", goal "selection overhead at
most 2.0 all-sources fine-tunes").

    python benchmarks/meta_epochs.py                        # the default example, 8 subsets x 2 seeds
    python benchmarks/meta_epochs.py --epochs 3 2 --subsets 8
    python benchmarks/meta_epochs.py --epochs 3 2 --lrs 0.001 0.002 --runs-dir runs/meta-lr --seed-from runs/meta-epochs/meta3

The meta-train is 3 epochs of the training examples; the all-sources fine-tune is 56 steps (2 epochs),
so the meta-train alone costs 1.5 fine-tunes and the selection can not reach 2.0 (BENCHMARKS.md, "Why
2.0 is out of reach"). Fewer epochs change theta*, so they change every fine-tune from theta*, every
estimate and maybe the selection: each arm is a run of its own (`meta<E>` under --runs-dir), made
one after the other in this process (its prepared data copied from the first arm's), with:
- its selection's cost: the meta-train, gradients and select stages' recorded seconds, over the
  seconds of its own all-sources fine-tune (seed 0, what `compare` calls "all"), both from the ledger;
- `gradex validate` with the deployed recipe on the same subsets (drawn by select.seed, not by
  theta*) against its own real fine-tunes.
--lrs gives each arm its meta.lr (a shorter meta-train may make up with a larger step); an arm whose lr
is not the config's is named `meta<E>-lr<LR>`. --seed-from starts the first arm from copies of an
earlier run of it (data, theta*, fine-tunes, validate's rows): only its store, select and estimates
are made again, and its costs are that run's, recorded in its ledger.

The gate, for an arm against the first one (the default), "no worse beyond seed noise":
- error: its mean relative error at most the first arm's plus the first arm's seed noise;
- ranking: its Spearman with its own truth at least the first arm's minus what a second seed of the
  first arm's real fine-tunes loses against the first seed (1 - their Spearman).
Also the paired 95% Student-t intervals over subsets of the relative error's difference, and of the
real fine-tunes' validation loss (the user's result: a less trained theta* may fine-tune worse).

Writes benchmarks/results/meta-epochs.json (meta-epochs-<name>.json for another --config; meta-lr.json
and meta-lr-<name>.json with --lrs); prints its
flat `summary` last: per arm `meta<E>_overhead_vs_finetune`, `_meta_seconds`, `_store_seconds`,
`_finetune_seconds`, `_spearman`, `_error`, `_seed_noise`, `_seeds_spearman`, `_selected`; per other arm
`meta<E>_error_diff_ci`, `_real_loss_diff_ci` (its real loss minus the first arm's, > 0 = worse),
`_gate`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy import stats

from gradex import config as config_mod
from gradex import ledger
from gradex import pipeline
from gradex.atomic import write_json
from gradex.diagnostics import validate
from gradex.finetunes import finetune_mix

from machine import command, describe  # benchmarks/machine.py, beside this script
from preconditioner import paired_interval, relative_errors, validations
from weights import seeded

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def cost(cfg: config_mod.Config) -> dict:
    """The selection's stages' recorded seconds and its all-sources fine-tune's, from the ledger (a
    resumed benchmark keeps the seconds each took when this script made it)."""
    run = pipeline.prepare(cfg)
    seconds = {stage: ledger.read(cfg.run_dir / stage)["seconds"] for stage in ("meta", "store", "select")}
    everything = finetune_mix(run, list(run.sources), seed=0, desc="finetune all sources")
    selection = sum(seconds.values())
    return {**seconds, "selection": round(selection, 1), "finetune": everything["seconds"],
            "finetune_steps": everything["steps"], "overhead_vs_finetune": round(selection / everything["seconds"], 3),
            "precision": run.precision}


def seeds_spearman(result: dict) -> float:
    """How alike two seeds of the same real fine-tunes rank the subsets."""
    return float(stats.spearmanr(*[[row["seeds"][s] for row in result["rows"]] for s in (0, 1)]).statistic)


def against(base: dict, other: dict) -> dict:
    """other's validate against base's: the paired intervals and the gate (module docstring)."""
    keys = sorted(relative_errors(base))
    errors = [relative_errors(r) for r in (base, other)]
    real = [{tuple(row["members"]): row["real"] for row in r["rows"]} for r in (base, other)]
    error_ok = other["mean_abs_rel_error"] <= base["mean_abs_rel_error"] + base["seed_noise"]
    ranking_ok = other["spearman"] >= base["spearman"] - (1 - seeds_spearman(base))
    return {"error_diff_ci": paired_interval(np.array([errors[1][k] - errors[0][k] for k in keys])),
            "real_loss_diff_ci": paired_interval(np.array([real[1][k] - real[0][k] for k in keys])),
            "gate": bool(error_ok and ranking_ok)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=config_mod.EXAMPLES_DIR / "default.yaml")
    ap.add_argument("--epochs", type=int, nargs="+", default=[3, 2],
                    help="meta.epochs of each arm, the first the one the others are gated against")
    ap.add_argument("--lrs", type=float, nargs="+", default=None,
                    help="meta.lr of each arm, in --epochs' order (default: the config's for every arm)")
    ap.add_argument("--seed-from", type=Path, default=None,
                    help="an earlier run of the first arm to start it from (its costs are that run's)")
    ap.add_argument("--subsets", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--runs-dir", type=Path, default=None,
                    help="where the arms' run directories go (default runs/meta-epochs[-<name>])")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    if args.seeds < 2:
        ap.error("--seeds: at least 2, for the seed noise the gate is measured against")
    if len(args.epochs) < 2 or min(args.epochs) < 1:
        ap.error(f"--epochs {args.epochs}: two or more positive counts")
    base = config_mod.load(args.config, args.overrides)
    lrs = args.lrs or [base.meta.lr] * len(args.epochs)
    if len(lrs) != len(args.epochs):
        ap.error(f"--lrs {lrs}: one per arm of --epochs {args.epochs}")
    suffix = "" if base.name == "default" else f"-{base.name}"
    runs_dir = args.runs_dir or ROOT / "runs" / f"meta-epochs{suffix}"
    arms = {}
    for e, lr in zip(args.epochs, lrs):
        arm = f"meta{e}" if lr == base.meta.lr else f"meta{e}-lr{lr:g}"
        arms[arm] = config_mod.load(args.config, [*args.overrides, f"runs_dir={runs_dir}", f"name={arm}",
                                                  f"meta.epochs={e}", f"meta.lr={lr}"])
    if len(arms) != len(args.epochs):
        ap.error(f"--epochs {args.epochs} --lrs {lrs}: two arms are the same")
    first, *others = arms
    if args.seed_from is not None:
        seeded(arms[first].run_dir, args.seed_from, items=("data", "meta", "finetunes", "validate"))
    pipeline.prepare(arms[first])
    for arm in others:
        seeded(arms[arm].run_dir, arms[first].run_dir, items=("data",))

    costs, results, selected = {}, {}, {}
    for arm, cfg in arms.items():  # one after the other, nothing else running: the ratios are of one run
        selected[arm] = pipeline.select(cfg)["selected"]
        costs[arm] = cost(cfg)
        print(f"{arm}: {costs[arm]}", file=sys.stderr, flush=True)
        results[arm] = validate(cfg, k=args.subsets, seeds=args.seeds)

    summary: dict = {}
    for arm in arms:
        summary |= {f"{arm}_overhead_vs_finetune": costs[arm]["overhead_vs_finetune"],
                    f"{arm}_meta_seconds": costs[arm]["meta"], f"{arm}_store_seconds": costs[arm]["store"],
                    f"{arm}_finetune_seconds": costs[arm]["finetune"],
                    f"{arm}_spearman": round(results[arm]["spearman"], 4),
                    f"{arm}_error": round(results[arm]["mean_abs_rel_error"], 5),
                    f"{arm}_seed_noise": round(results[arm]["seed_noise"], 5),
                    f"{arm}_seeds_spearman": round(seeds_spearman(results[arm]), 4), f"{arm}_selected": selected[arm]}
    for arm in others:
        summary |= {f"{arm}_{k}": v for k, v in against(results[first], results[arm]).items()}
    body = {"command": command("meta_epochs.py", argv), "lrs": dict(zip(arms, lrs)),
            "seed_from": str(args.seed_from) if args.seed_from else None,
            "machine": describe(precision=costs[first]["precision"]),
            "subsets": args.subsets, "seeds": args.seeds, "cost": costs, "selected": selected,
            "validation": validations(results),
            "summary": summary}
    # arms with their own meta.lr are another measurement: they do not replace the epochs-only one
    write_json(RESULTS / (f"meta-lr{suffix}.json" if args.lrs else f"meta-epochs{suffix}.json"), body)
    print(json.dumps(summary))
    return body


if __name__ == "__main__":
    main()
