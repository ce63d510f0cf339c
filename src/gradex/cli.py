"""`gradex`: every stage of a run as a subcommand, and `run` for all of them in order."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from gradex import pipeline
from gradex.config import Config, ConfigError, load

STAGES: dict[str, tuple[str, Callable[..., object]]] = {
    "prepare": ("read, check and tokenize every source (all data errors surface here)", pipeline.prepare),
    "meta-train": ("multitask-train on target + all sources: theta*", pipeline.meta_train),
    "gradients": ("projected per-example gradients at theta* into the store", pipeline.gradients),
    "select": ("estimate subsets and select sources (selection.json)", pipeline.select),
    "finetune": ("fine-tune on target + selected sources, and the all / target-only baselines", pipeline.finetune),
    "evaluate": ("validation and test metrics of the final models", pipeline.evaluate),
}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="experiment YAML (default: the embedded SmolLM2 + BIG-bench default)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set meta.epochs=1 (repeatable)")
    p.add_argument("--force", action="store_true", help="re-run the stage even if its inputs are unchanged")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gradex", description="Choose which data sources to fine-tune a language model on, from first-order estimates (GradEx).")
    sub = p.add_subparsers(dest="command", required=True)
    _common(sub.add_parser("run", help="all stages, then print scores, selection and test metrics"))
    for name, (help_, _) in STAGES.items():
        _common(sub.add_parser(name, help=help_))
    est = sub.add_parser("estimate", help="estimate the target validation loss of given subsets")
    _common(est)
    est.add_argument("--subset", action="append", default=None, metavar="A,B,...",
                     help="a comma-separated list of sources ('' for the target alone); repeatable. "
                          "Default: none, all, each source alone, all but each source")
    lin = sub.add_parser("check-linearity", help="first-order vs zeroth-order error of u_s around theta*")
    _common(lin)
    val = sub.add_parser("validate", help="fine-tune k random subsets for real and compare with the estimates")
    _common(val)
    val.add_argument("--subsets", type=int, default=20, help="number of random subsets (default 20)")
    val.add_argument("--seeds", type=int, default=2, help="fine-tuning seeds per subset (default 2)")
    return p


def format_summary(summary: dict) -> str:
    sel, models = summary["selection"], summary["metrics"]["models"]
    lines = [f"run directory: {summary['run_dir']}", "",
             "source scores (estimated change of the target validation loss when the source is included;"
             " negative helps):"]
    chosen = set(sel["selected"])
    for name, score in sorted(sel["source_scores"].items(), key=lambda kv: kv[1]):
        lines.append(f"  {'*' if name in chosen else ' '} {name:<24} {score:+.4f}")
    lines += ["", f"selected ({sel['method']}, {sel['mode']} estimates): {', '.join(sel['selected']) or '(target only)'}",
              f"estimated target validation loss of the selection: {sel['estimate']:.4f}"
              f"   (target alone: {sel['baseline']:.4f}; estimates model fine-tuning theta*)",
              f"real target validation loss of the final model:   {models['selected']['validation']['loss']:.4f}"
              f"   (fine-tuned from the base model)",
              "", f"{'final model':<12} {'sources':>8} {'val loss':>9} {'test loss':>10} {'test ' + models['selected']['test']['metric']:>18}"]
    for name, m in models.items():
        lines.append(f"{name:<12} {len(m['members']):>8} {m['validation']['loss']:>9.4f} {m['test']['loss']:>10.4f}"
                     f" {m['test']['score']:>18.3f}")
    lines.append(f"\nfinished in {summary['seconds']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        cfg: Config = load(args.config, args.overrides)
        if args.command == "run":
            print(format_summary(pipeline.run_all(cfg, args.force)))
        elif args.command == "estimate":
            subsets = None if args.subset is None else [[s for s in x.split(",") if s] for x in args.subset]
            for row in pipeline.estimate(cfg, subsets):
                print(f"{row['estimate']:.4f}  output change {row['output_change']:.3f}  step {row['step']:.3f}  "
                      f"{', '.join(row['members']) or '(target only)'}")
        elif args.command == "check-linearity":
            from gradex import diagnostics

            print(diagnostics.format_linearity(diagnostics.check_linearity(cfg)))
        elif args.command == "validate":
            from gradex import diagnostics

            print(json.dumps(diagnostics.summary(diagnostics.validate(cfg, args.subsets, args.seeds)), indent=2))
        else:
            result = STAGES[args.command][1](cfg, force=args.force)
            print(result if not isinstance(result, dict) else json.dumps(result, indent=2, default=str))
    except ConfigError as err:
        print(f"gradex: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gradex: interrupted; finished work is kept and the stage resumes on re-run", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
