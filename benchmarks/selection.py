"""Does gradex's selection beat the obvious answers at equal cost? `gradex compare` on two scenarios.

    python benchmarks/selection.py                          # default + corrupted, 3 seeds
    python benchmarks/selection.py --seeds 5 --methods exhaustive forward effects ensemble
    python benchmarks/selection.py --set finetune.init=theta_star --set finetune.lr=0.0002 --tag theta_star
    python benchmarks/selection.py --candidates --tag candidates   # every method x estimate weighting

For each scenario (the packaged examples `default` and `corrupted`) it runs every stage, then
`gradex.pipeline.compare` (gradex.stages.compare): every candidate mix fine-tuned with the finetune recipe, the same number
of optimizer steps, `--seeds` seeds, evaluated on the target test split. Fine-tunes are cached in
each run directory, so a re-run (or a run with more seeds or methods) trains only what is new.
Writes benchmarks/results/selection[-<tag>].json and prints one JSON line last with, per scenario
and per baseline, the paired gain of the selection on test loss (`<scenario>_<baseline>_diff_mean`,
`..._diff_ci_low`; positive = gradex better) and on the task metric (`..._score_diff_mean`,
`..._score_diff_ci_low`), and `corrupted_corrupted_selected`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


from gradex import config as config_mod
from gradex import pipeline
from gradex.comparison import SELECTED, format_table

from machine import describe  # benchmarks/machine.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ("default", "corrupted")
# The corrupted sources of examples/corrupted.yaml, fixed when the example was built.
CORRUPTED = ("add2_shuffled", "add4_shuffled", "add3_plus_one")


def key_name(mix: str) -> str:
    return mix.replace("gradex[", "gradex_").replace("]", "")


def candidates(cfg: config_mod.Config) -> dict[str, list[str]]:
    """The distinct selections of every selection method under both estimate weightings, as named
    mixes ("exhaustive+forward/mean"), leaving out the one the config deploys (compared as `selected`)."""
    import dataclasses

    deployed = tuple(pipeline.select(cfg)["selected"])
    found: dict[tuple[str, ...], list[str]] = {}
    for weighting in ("sum", "mean"):
        other = pipeline.Run(dataclasses.replace(cfg, estimate=dataclasses.replace(cfg.estimate, weighting=weighting)))
        fn, _, _ = pipeline.estimator(other)
        for method in config_mod.SELECT_METHODS:
            chosen = tuple(pipeline.selection(other, method, fn)["selected"])
            found.setdefault(chosen, []).append(f"{method}/{weighting}")
    return {"+".join(names): list(members) for members, names in found.items() if members != deployed}


def scenario(name: str, args: argparse.Namespace) -> tuple[dict, dict]:
    overrides = [*args.overrides, f"runs_dir={args.runs_dir}"]
    if args.methods:
        overrides.append(f"compare.methods=[{','.join(args.methods)}]")
    cfg = config_mod.load(config_mod.EXAMPLES_DIR / f"{name}.yaml", overrides)
    t0 = time.perf_counter()
    for stage in (pipeline.prepare, pipeline.meta_train, pipeline.gradients, pipeline.select, pipeline.finetune):
        stage(cfg)
    extra = candidates(cfg) if args.candidates else None
    t1 = time.perf_counter()
    result = pipeline.compare(cfg, seeds=args.seeds, mixes=extra)
    t2 = time.perf_counter()
    print(format_table(result), file=sys.stderr, flush=True)
    line: dict = {}
    for mix in result["mixes"]:
        if mix["name"] == SELECTED:
            continue
        k = f"{name}_{key_name(mix['name'])}"
        for part, label in (("diff_loss", "diff"), ("diff_score", "score_diff")):
            line[f"{k}_{label}_mean"] = mix[part]["mean"]
            line[f"{k}_{label}_ci_low"] = mix[part]["low"]
    if name == "corrupted":
        line["corrupted_corrupted_selected"] = len(set(result["selection"]["selected"]) & set(CORRUPTED))
        line["corrupted_corrupted_selected_by_method"] = {
            m["name"]: len(set(m["members"][0]) & set(CORRUPTED)) for m in result["mixes"] if m["kind"] == "selection"}
    detail = {"config": str(cfg.run_dir / "config.yaml"), "stages_wall_s_this_call": round(t1 - t0, 1),
              "compare_wall_s_this_call": round(t2 - t1, 1), "compare": {k: v for k, v in result.items() if k != "rows"},
              "rows": result["rows"]}
    return line, detail


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    p.add_argument("--methods", nargs="*", default=[], help="more selection methods to compare (compare.methods)")
    p.add_argument("--candidates", action="store_true",
                   help="also compare the distinct selections of every method under both estimate weightings")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--runs-dir", default=str(ROOT / "runs"))
    p.add_argument("--tag", default="", help="results file suffix, for runs with other settings")
    args = p.parse_args()
    line: dict = {}
    details = {}
    for name in args.scenarios:
        got, details[name] = scenario(name, args)
        line.update(got)
    out = ROOT / "benchmarks" / "results" / f"selection{'-' + args.tag if args.tag else ''}.json"
    body = {"command": "python benchmarks/selection.py " + " ".join(sys.argv[1:]),
            "machine": describe(),
            "seeds": args.seeds, "overrides": args.overrides, "methods": args.methods, "candidates": args.candidates,
            "summary": line, "scenarios": details}
    out.write_text(json.dumps(body, indent=2))
    print(json.dumps(line))


if __name__ == "__main__":
    main()
