"""Proportions (select.method weights) at equal steps against the best subset, the selection in equal
shares and all sources, and a check of their error bars' coverage.

    python benchmarks/weights.py                                  # every scenario; coverage on default
    python benchmarks/weights.py --scenarios corrupted tasks --coverage corrupted

Scenarios: the packaged examples `default` and `corrupted`, and issue "The paper's own experiment"'s
real ones at benchmarks/paper_table.py's CPU sizes: `tasks` (benchmarks/scenarios/tasks.yaml, 54 whole
BIG-bench tasks as sources) and `strategyqa` (8 clusters of its train split); their runs in
runs/weights/. A run directory of the same scenario made by another benchmark (`--seed-from NAME=DIR`,
by default runs/paper-table/<name>-cpu for the real ones when it exists) seeds the new one with copies
of its prepared data, theta*, store, clusters and fine-tunes: the ledger finds their inputs unchanged,
so only what proportions change is computed again.

Per scenario: every stage with `select.method=weights`, then `gradex.pipeline.compare` at `--seeds`
seeds: the proportions
(`selected`), the best subset (`gradex[best]`, what select.method best deploys), the selection's
sources in equal shares (`uniform`), every source in equal shares (`all[uniform]`) and every source
pooled as it is (`all`, natural proportions). Every mix gets the same optimizer steps (the finetune
budget); the interval is the paired 95% Student-t interval over seeds of the mix's test loss minus
the proportions' (positive = proportions better).

Stability, per scenario as it ships (select.method best): the selected sources' lowest selection
frequency over select.bootstrap resamples of the store (`<scenario>_selection_stability`), from the
weights run's own store (the same data, theta* and projection as the scenario's own run).

Coverage, on `--coverage` (default: the default example): each mix's estimate (every source alone, all sources, the best subset and
the proportions) gets the 95% percentile interval of its estimate over `--resamples` bootstrap
resamples of the store's rows (gradex.stability.resample, the run's l2). A second store, built at the
same theta* with another projection seed (gradients.seed=1, in a sibling run directory that starts
from copies of the first one's prepared data and theta*), estimates every mix again at its own
calibrated l2: the coverage is how many of the intervals hold that estimate. The bootstrap resamples
the data, not the projection, so this asks whether the data's spread is the larger one.

Writes benchmarks/results/weights.json and prints its flat `summary` last:
`<scenario>_weights_vs_best_diff_ci_low` and `<scenario>_weights_vs_all_diff_ci_low` (test loss,
positive = proportions better), with their `_mean`, `<scenario>_selection_stability` and
`<coverage scenario>_coverage` ("k of m").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from gradex import config as config_mod
from gradex import pipeline
from gradex.atomic import write_json
from gradex.comparison import SELECTED, format_table

from machine import cpu_model  # benchmarks/machine.py, beside this script
from paper_table import SCENARIOS as PAPER_SCENARIOS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "weights.json"
# (config, overrides): the packaged examples as they ship, and issue "The paper's own experiment"'s
# real scenarios at benchmarks/paper_table.py's CPU sizes
SCENARIOS = {"default": (config_mod.EXAMPLES_DIR / "default.yaml", []),
             "corrupted": (config_mod.EXAMPLES_DIR / "corrupted.yaml", []),
             **{name: (spec["config"], spec["cpu"]) for name, spec in PAPER_SCENARIOS.items()}}
# benchmarks/paper_table.py's runs, CPU size
SEEDED = {name: ROOT / "runs" / "paper-table" / f"{name}-cpu" for name in PAPER_SCENARIOS}
AGAINST = {"best": "gradex[best]", "all": "all", "uniform": "uniform", "all_uniform": "all[uniform]"}


def scenario_config(name: str, runs_dir: Path, extra: list[str]) -> config_mod.Config:
    # the proportions' own comparison: no baselines but all sources (natural proportions)
    path, sized = SCENARIOS[name]
    return config_mod.load(path, [*sized, "select.method=weights", "compare.baselines=[all]", *extra,
                                  f"runs_dir={runs_dir}", f"name={name}"])


def seeded(run_dir: Path, source: Path,
           items: tuple[str, ...] = ("data", "meta", "store", "clusters", "finetunes")) -> None:
    """Start an absent run directory from copies of another run's `items` (by default its prepared
    data, theta*, store, clusters and fine-tunes), its config and its marker (the same scenario: the
    ledger keeps what its inputs say is current)."""
    if run_dir.exists() or not source.is_dir():
        return
    run_dir.mkdir(parents=True)
    for item in source.iterdir():
        if item.name in (*items, "config.yaml", ".gradex-run"):
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, run_dir / item.name)


def compare(name: str, cfg: config_mod.Config, seeds: int) -> tuple[dict, dict]:
    t0 = time.perf_counter()
    body = pipeline.select(cfg)
    result = pipeline.compare(cfg, seeds=seeds)
    print(format_table(result), file=sys.stderr, flush=True)
    by = {n: m for m in result["mixes"] for n in m.get("same_mix", [m["name"]])}
    flat: dict = {}
    for key, mix in AGAINST.items():
        m = by[mix]
        same = m["name"] == SELECTED or SELECTED in m.get("same_mix", [])
        flat[f"{name}_weights_vs_{key}_same_mix"] = same
        flat[f"{name}_weights_vs_{key}_diff_mean"] = None if same else m["diff_loss"]["mean"]
        flat[f"{name}_weights_vs_{key}_diff_ci_low"] = None if same else m["diff_loss"]["low"]
    detail = {"proportions": body["proportions"], "best_subset": body["best_subset"], "reason": body["reason"],
              "stability": body.get("stability"), "wall_seconds": round(time.perf_counter() - t0, 1),
              "select_seconds": body["seconds"],
              "mixes": {m["name"]: {"same_mix": m.get("same_mix"), "proportions": m.get("proportions"),
                                    "members": m["members"][0], "test_loss": m["test_loss"],
                                    "test_score": m["test_score"], "estimate": m["estimate"],
                                    "diff_loss": m.get("diff_loss"), "diff_score": m.get("diff_score")}
                        for m in result["mixes"]},
              "metric": result["metric"], "recipe": result["recipe"], "seeds": result["seeds"],
              "estimate_check": result["estimate_check"]}
    return flat, detail


def selection_stability(cfg: config_mod.Config) -> dict:
    """The scenario's own selection (select.method best) and its bootstrap stability, on this store."""
    import dataclasses

    from gradex.selection import selection, stability

    best = dataclasses.replace(cfg, select=dataclasses.replace(cfg.select, method="best"))
    run = pipeline.Run(best)
    fn, _, l2 = pipeline.estimator(run)
    body = selection(run, "best", fn)
    found = stability(run, body, l2)
    return {"selected": body["selected"], "stability": found["stability"], "share": found["share"],
            "resamples": found["resamples"], "uncertain": found["uncertain"]}


def mixes_of(run: pipeline.Run, body: dict) -> dict[str, torch.Tensor]:
    """The mixes whose estimates the coverage check intervals: each source alone, all sources, the
    best subset (natural proportions) and the proportions."""
    from gradex.estimate.proportions import natural

    prob = pipeline.problem(run)
    names = [run.cfg.data.target.name, *run.sources]

    def subset(members: list[str]) -> torch.Tensor:
        return natural(prob, torch.tensor([n == names[0] or n in members for n in names]))

    out = {f"{s} alone": subset([s]) for s in run.sources}
    out["all sources"] = subset(run.sources)
    out["best subset"] = subset(body["best_subset"]["selected"])
    out["proportions"] = torch.tensor([body["proportions"][n] for n in names], dtype=torch.float64)
    return out


def sibling(cfg: config_mod.Config, seed: int) -> config_mod.Config:
    """The same run with another projection seed, in a sibling run directory seeded with copies of the
    first one's prepared data and theta* (the ledger sees their inputs unchanged and keeps them)."""
    other = config_mod.load(cfg.run_dir / "config.yaml", [f"gradients.seed={seed}", f"name={cfg.name}-proj{seed}"])
    if not (other.run_dir / "meta").exists():
        other.run_dir.mkdir(parents=True, exist_ok=True)
        keep = {"data", "meta", "config.yaml"}
        for item in cfg.run_dir.iterdir():
            if item.name in keep or item.name.startswith("."):
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, other.run_dir / item.name)
    return other


def coverage(cfg: config_mod.Config, resamples: int, seed: int) -> dict:
    from gradex.estimate.proportions import fit
    from gradex.stability import resample

    run = pipeline.Run(cfg)
    body = pipeline.select(cfg)
    prob = pipeline.problem(run)
    l2 = pipeline.regularization(run, prob)
    mixes = mixes_of(run, body)
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    draws = np.zeros((resamples, len(mixes)))
    for b in range(resamples):
        p = resample(prob, gen)
        draws[b] = [fit(p, q, l2).loss for q in mixes.values()]
    boot_seconds = time.perf_counter() - t0
    other = sibling(cfg, 1)
    t1 = time.perf_counter()
    pipeline.gradients(other)
    grad_seconds = time.perf_counter() - t1
    orun = pipeline.Run(other)
    oprob = pipeline.problem(orun)
    ol2 = pipeline.regularization(orun, oprob)
    rows = {}
    for j, (name, q) in enumerate(mixes.items()):
        low, high = np.percentile(draws[:, j], [2.5, 97.5]).tolist()
        again = fit(oprob, q, ol2).loss
        rows[name] = {"estimate": fit(prob, q, l2).loss, "interval": [low, high], "other_projection": again,
                      "covered": low <= again <= high}
    covered = sum(r["covered"] for r in rows.values())
    return {"mixes": rows, "covered": covered, "of": len(rows), "rate": covered / len(rows), "nominal": 0.95,
            "resamples": resamples, "l2": l2, "other_l2": ol2, "bootstrap_seconds": round(boot_seconds, 1),
            "other_store_seconds": round(grad_seconds, 1), "other_run_dir": str(other.run_dir)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenarios", nargs="+", choices=sorted(SCENARIOS), default=list(SCENARIOS))
    ap.add_argument("--coverage", choices=[*sorted(SCENARIOS), "none"], default="default",
                    help="the scenario of the coverage check (it builds a second store there); none: no check")
    ap.add_argument("--seed-from", action="append", default=[], metavar="NAME=DIR",
                    help="seed scenario NAME's run directory from run directory DIR (see above)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--resamples", type=int, default=100, help="bootstrap resamples of the coverage check")
    ap.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "weights")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    if args.seeds < 3:
        ap.error("--seeds: at least 3, for a paired interval worth reading")
    body = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"scenarios": {}}
    body.update(machine={"platform": platform.platform(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
                         "torch": torch.__version__, "python": platform.python_version()})
    body.setdefault("commands", []).append(" ".join(["python", "benchmarks/weights.py",
                                                      *(sys.argv[1:] if argv is None else argv)]))
    summary = body.setdefault("summary", {})
    sources = {**SEEDED, **{k: Path(v) for k, v in (item.split("=", 1) for item in args.seed_from)}}
    for name in args.scenarios:
        cfg = scenario_config(name, args.runs_dir, args.overrides)
        if name in sources:
            seeded(cfg.run_dir, sources[name])
        flat, detail = compare(name, cfg, args.seeds)
        summary.update(flat)
        detail["own_selection"] = selection_stability(cfg)
        summary[f"{name}_selection_stability"] = detail["own_selection"]["stability"]
        if name == args.coverage:
            detail["coverage"] = coverage(cfg, args.resamples, cfg.select.seed)
            summary[f"{name}_coverage"] = f"{detail['coverage']['covered']} of {detail['coverage']['of']}"
        body["scenarios"][name] = detail
        write_json(RESULTS, body)  # after every scenario: a later one's interruption keeps this one
    print(json.dumps(summary))
    return body


if __name__ == "__main__":
    main()
