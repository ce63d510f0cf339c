"""Which estimator tracks real fine-tuning? Estimator variants against one set of real refits.

    python benchmarks/variants.py                         # the embedded default (runs/default)
    python benchmarks/variants.py --set meta.epochs=6 --set name=meta6 --only default,ce-plain

Needs the real fine-tunes of `gradex validate --subsets K --seeds 2` in the run directory (same
overrides); it never trains. Each variant is a run that shares the base run's data, theta* and real
refits (symlinked) and has its own gradient store under runs/<name>-variants/<variant>/, and is
scored by gradex.diagnostics.validate: Spearman, Pearson and mean relative error of the estimated
against the real target validation loss (each under the variant's own output definition), next to
seed noise and the constant predictor, at the configured estimate.output_change and at every value
of diagnostics.SWEEP. Prints a table and writes benchmarks/results/variants[-<name>].json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


from gradex import config as config_mod
from gradex import diagnostics, pipeline

from machine import command, describe  # benchmarks/machine.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
SHARED = ("data", "meta", "validate")  # what every variant takes from the base run

# name -> config overrides (on top of the base run's). "default" is the shipped estimator.
VARIANTS: dict[str, list[str]] = {
    "paper": ["gradients.output=mean-logodds", "gradients.preconditioner=none"],
    "paper+adam": ["gradients.output=mean-logodds", "gradients.preconditioner=adam"],
    "ce-plain": ["gradients.preconditioner=none"],
    "ce-plain-seed1": ["gradients.preconditioner=none", "gradients.seed=1"],
    "ce-plain-seed2": ["gradients.preconditioner=none", "gradients.seed=2"],
    "default": [],
    "default-seed1": ["gradients.seed=1"],
    "default-seed2": ["gradients.seed=2"],
    "d1024": ["gradients.dim=1024"],
    "d1024-seed1": ["gradients.dim=1024", "gradients.seed=1"],
    "d1024-seed2": ["gradients.dim=1024", "gradients.seed=2"],
    "ce-exact": ["gradients.projection=none", "gradients.preconditioner=none"],
    "reconstruct": ["estimate.mode=reconstruct"],
}


def variant_config(base: config_mod.Config, args, name: str) -> config_mod.Config:
    runs_dir = Path(base.runs_dir) / f"{base.name}-variants"
    cfg = config_mod.load(args.config, [*args.overrides, *VARIANTS[name], f"runs_dir={runs_dir}", f"name={name}"])
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    for part in SHARED:
        link = cfg.run_dir / part
        if not link.exists():
            link.symlink_to((base.run_dir / part).resolve(), target_is_directory=True)
    return cfg


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", nargs="?", help="experiment YAML (default: the embedded default)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--subsets", type=int, default=20, help="as given to gradex validate")
    ap.add_argument("--seeds", type=int, default=2, help="as given to gradex validate")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {list(VARIANTS)}")
    args = ap.parse_args(argv)

    base = config_mod.load(args.config, args.overrides)
    names = args.only.split(",") if args.only else list(VARIANTS)
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    results = {}
    for name in names:
        cfg = variant_config(base, args, name)
        # validate's truth: the deployed recipe, which no variant changes (its rows are keyed by it)
        missing = diagnostics.missing_rows(pipeline.Run(cfg), args.subsets, args.seeds)
        if missing > 0:
            sys.exit(f"{cfg.run_dir / 'validate'}: {missing} of {args.subsets} x {args.seeds} real fine-tunes are missing; run "
                     f"`gradex validate --subsets {args.subsets} --seeds {args.seeds}` with the same config first")
        t0 = time.perf_counter()
        found = diagnostics.validate(cfg, args.subsets, args.seeds)
        results[name] = {"overrides": VARIANTS[name], "seconds": round(time.perf_counter() - t0, 1),
                         **{k: v for k, v in found.items() if k != "rows"}}
        line = (f"{name:<15} output {found['output']:<13} spearman {found['spearman']:.3f} pearson "
                f"{found['pearson']:.3f} error {found['mean_abs_rel_error']:.3f} (seed noise {found['seed_noise']:.3f}, "
                f"constant {found['constant_error']:.3f})")
        if "sweep" in found:  # linear mode only
            best = min((r for r in found["sweep"] if r["in_use"]), key=lambda r: r["mean_abs_rel_error"])
            line += (f"; lowest error in the sweep {best['mean_abs_rel_error']:.3f} at output_change "
                     f"{best['output_change']} (spearman {best['spearman']:.3f})")
        print(line, flush=True)
    out = ROOT / "benchmarks" / "results" / ("variants.json" if base.name == "default" else f"variants-{base.name}.json")
    body = {"command": command("variants.py", argv),
            "machine": describe(),
            "run": str(base.run_dir), "variants": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(body, indent=2) + "\n")
    print(json.dumps({name: {k: r[k] for k in ("spearman", "mean_abs_rel_error")} for name, r in results.items()}))
    return body


if __name__ == "__main__":
    main()
