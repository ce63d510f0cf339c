"""Adam's preconditioner from the meta-train's own optimizer state (`gradients.preconditioner meta`,
the default since it passed on the default and on corrupted) against the separate pass (`adam`): the
store's cost and `gradex validate`'s agreement (issue "Side by side with the peer libraries", item 2).

    python benchmarks/preconditioner.py                     # the default example, 12 subsets x 2 seeds
    python benchmarks/preconditioner.py --subsets 8 --seed-from runs/default
    python benchmarks/preconditioner.py --config src/gradex/examples/corrupted.yaml --seed-from runs/corrupted

Two run directories of one config, `adam` and `meta` under --runs-dir, differ only in
gradients.preconditioner. Both start from copies of one prepared data, theta* (with the meta-train's
saved moments) and fine-tunes (--seed-from, by default runs/default when it exists), so the ledger
keeps those and only the stores are built, here, one after the other (the ratio is of one run on one
host; each store's seconds are its gradients stage's record, which a resumed run keeps). Then
`gradex validate` on `adam`; its real fine-tunes (validate/rows/, keyed by what shapes a fine-tune,
which the preconditioner does not) are copied to `meta`, whose validate re-estimates the same
subsets and trains nothing.

The gate, as the issue words it ("no worse than the separate pass, beyond seed noise"):
- error: meta's mean relative error at most adam's plus the seed noise (the mean relative difference
  of one subset's real loss over two seeds);
- ranking: the two estimators rank the subsets alike at least as well as two seeds of the real
  fine-tunes rank them alike (Spearman of meta's estimates with adam's >= Spearman of seed 0's real
  losses with seed 1's), so a difference in Spearman with the truth is within what seeds move.
Also the paired 95% Student-t interval over subsets of meta's relative error minus adam's.

Writes benchmarks/results/preconditioner.json (preconditioner-<name>.json for another --config, e.g.
preconditioner-corrupted.json); prints its flat `summary` last: `meta_vs_adam_store_seconds`
(ratio, < 1 = meta cheaper), `{adam,meta}_spearman`, `{adam,meta}_error`, `seed_noise`,
`estimates_spearman`, `seeds_spearman`, `error_diff_ci`, `gate` (true when both conditions hold).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from scipy import stats

from gradex import config as config_mod
from gradex import ledger
from gradex import pipeline
from gradex.atomic import write_json
from gradex.diagnostics import summary as validation_summary
from gradex.diagnostics import validate

from machine import command, describe  # benchmarks/machine.py, beside this script
from weights import seeded

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
KINDS = ("adam", "meta")


def relative_errors(result: dict) -> dict[tuple[str, ...], float]:
    return {tuple(r["members"]): abs(r["estimate"] - r["real"]) / r["real"] for r in result["rows"]}


def paired_interval(diff: np.ndarray) -> list[float]:
    """The 95% Student-t interval of a paired difference's mean."""
    half = stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff))
    return [round(float(diff.mean() - half), 5), round(float(diff.mean() + half), 5)]


def validations(results: dict) -> dict:
    """Each estimator's validate result as the benchmark saves it: the summary and every row."""
    return {k: validation_summary(r) | {"rows": r["rows"]} for k, r in results.items()}


def agreement(results: dict, base: str, other: str) -> dict:
    """validate's verdict on two estimators of the same subsets and real fine-tunes: each one's Spearman
    and error, the seed noise, the paired 95% interval of other's relative error minus base's, and the
    gate "no worse beyond seed noise": other's error at most base's plus the seed noise, and the two
    estimators rank the subsets alike at least as well as two seeds of the real fine-tunes do."""
    errors = {k: relative_errors(results[k]) for k in (base, other)}
    keys = sorted(errors[base])
    diff = np.array([errors[other][k] - errors[base][k] for k in keys])
    estimates = {kind: {tuple(r["members"]): r["estimate"] for r in results[kind]["rows"]} for kind in (base, other)}
    by_seed = [[r["seeds"][s] for r in results[base]["rows"]] for s in (0, 1)]
    estimates_spearman = float(stats.spearmanr([estimates[base][k] for k in keys],
                                               [estimates[other][k] for k in keys]).statistic)
    seeds_spearman = float(stats.spearmanr(*by_seed).statistic)
    noise = results[base]["seed_noise"]
    error_ok = results[other]["mean_abs_rel_error"] <= results[base]["mean_abs_rel_error"] + noise
    return {
        **{f"{k}_spearman": round(results[k]["spearman"], 4) for k in (base, other)},
        **{f"{k}_error": round(results[k]["mean_abs_rel_error"], 5) for k in (base, other)},
        "seed_noise": round(noise, 5),
        "estimates_spearman": round(estimates_spearman, 4), "seeds_spearman": round(seeds_spearman, 4),
        "error_diff_mean": round(float(diff.mean()), 5),
        "error_diff_ci": paired_interval(diff),
        "gate": bool(error_ok and estimates_spearman >= seeds_spearman),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=config_mod.EXAMPLES_DIR / "default.yaml")
    ap.add_argument("--subsets", type=int, default=12)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--runs-dir", type=Path, default=None,
                    help="where the adam and meta run directories go (default runs/preconditioner, or "
                         "runs/preconditioner-<name> for another scenario)")
    ap.add_argument("--seed-from", type=Path, default=ROOT / "runs" / "default",
                    help="a run directory of the same config whose data, theta* and fine-tunes to start from")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    if args.seeds < 2:
        ap.error("--seeds: at least 2, for the seed noise the gate is measured against")
    name = config_mod.load(args.config, args.overrides).name  # the scenario (its two runs are named adam and meta)
    suffix = "" if name == "default" else f"-{name}"
    runs_dir = args.runs_dir or ROOT / "runs" / f"preconditioner{suffix}"
    cfgs = {kind: config_mod.load(args.config, [*args.overrides, f"runs_dir={runs_dir}", f"name={kind}",
                                                f"gradients.preconditioner={kind}"]) for kind in KINDS}
    for cfg in cfgs.values():
        seeded(cfg.run_dir, args.seed_from, items=("data", "meta", "finetunes"))  # not the store: built and timed here
    store_seconds = {}
    for kind, cfg in cfgs.items():  # one after the other, nothing else running: a ratio of one run
        pipeline.gradients(cfg)
        # the stage's own timing, from its record: a store already built (a resumed benchmark) keeps
        # the seconds it took when it was built, by this script, one after the other
        store_seconds[kind] = ledger.read(cfg.run_dir / "store")["seconds"]
        print(f"gradients ({kind}): {store_seconds[kind]} s", file=sys.stderr, flush=True)
    results = {"adam": validate(cfgs["adam"], k=args.subsets, seeds=args.seeds)}
    # the same real fine-tunes: validate's rows are keyed by what shapes a fine-tune, not by the store
    shutil.copytree(cfgs["adam"].run_dir / "validate" / "rows", cfgs["meta"].run_dir / "validate" / "rows",
                    dirs_exist_ok=True)
    results["meta"] = validate(cfgs["meta"], k=args.subsets, seeds=args.seeds)

    summary = {
        "meta_vs_adam_store_seconds": round(store_seconds["meta"] / store_seconds["adam"], 3),
        **{f"{k}_store_seconds": store_seconds[k] for k in KINDS},
        **agreement(results, "adam", "meta"),
    }
    body = {"command": command("preconditioner.py", argv),
            "machine": describe(precision=ledger.read(cfgs["adam"].run_dir / "store").get("precision")),
            "subsets": args.subsets, "seeds": args.seeds, "store_seconds": store_seconds,
            "validation": validations(results),
            "summary": summary}
    write_json(RESULTS / f"preconditioner{suffix}.json", body)
    print(json.dumps(summary))
    return body


if __name__ == "__main__":
    main()
