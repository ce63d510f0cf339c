"""`gradex`: every stage of a run as a subcommand, and `run` for all of them in order."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from gradex import graph, pipeline
from gradex.config import EXAMPLES_DIR, Config, ConfigError, load, load_received
from gradex.config import dumps as config_dumps
from gradex.device import end_launch
from gradex.launch import launched

# The stages with a plain verb (`gradex meta-train [--force]`), from the stage graph; estimate and
# compare take options of their own (below), and evaluate names the finetune stage's metrics.
PLAIN = [s for s in graph.COMMANDS.values() if s.name not in ("estimate", "compare")]
EVALUATE = "validation and test metrics of the final model"
EXAMPLES = {path.stem: path for path in sorted(EXAMPLES_DIR.glob("*.yaml"))}


def _count(text: str) -> int:
    """A whole number of at least 1: anything else is a usage error (exit 2) before any stage runs."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _common(p: argparse.ArgumentParser, force: bool = True) -> None:
    p.add_argument("config", nargs="?", help="experiment YAML (default: the embedded SmolLM2 + BIG-bench default)")
    p.add_argument("--example", choices=sorted(EXAMPLES), help="run a packaged example instead of a YAML file: "
                   + "; ".join(f"{name}" for name in sorted(EXAMPLES)))
    p.add_argument("--run-dir", metavar="DIR", help="an existing run directory: its config.yaml is the config, "
                   "and DIR is where the run lives (even when moved or copied)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set meta.epochs=1 (repeatable)")
    if force:
        p.add_argument("--force", action="store_true", help="re-run the stage even if its inputs are unchanged")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gradex", description="Choose which data sources to fine-tune a language model on, from first-order estimates (GradEx).")
    p.add_argument("--version", action="version", version=f"gradex {version()}")
    p.add_argument("--debug", action="store_true", help="on an error, print the full traceback too")
    sub = p.add_subparsers(dest="command", required=True)
    _common(sub.add_parser("status", help="each stage of the run directory: done, stale (and why), running "
                                          "(interrupted), missing; runs nothing"))
    _common(sub.add_parser("config", help="print the resolved config (defaults, file and --set overrides) as YAML"))
    _common(sub.add_parser("run", help="all stages, then print scores, the selection and an equal-budget "
                                       "comparison with the baselines (compare.run_seeds seeds)"))
    for stage in PLAIN:
        _common(sub.add_parser(stage.name, help=stage.help))
    _common(sub.add_parser("evaluate", help=EVALUATE))
    rep = sub.add_parser("report", help="write report.html: scores, selection, validation, comparison, costs")
    _common(rep)
    rep.add_argument("--out", metavar="FILE", help="write the report here instead of the run's report.html "
                     "(an archived, read-only run); never over a file that is not a gradex report")
    est = sub.add_parser("estimate", help=graph.STAGES["estimate"].help)
    _common(est)
    est.add_argument("--subset", action="append", default=None, metavar="A,B,...",
                     help="a comma-separated list of sources ('' for the target alone); repeatable. "
                          "Default: none, all, each source alone, all but each source")
    cmp = sub.add_parser("compare", help=graph.STAGES["compare"].help,
                         description="Fine-tune gradex's selection and each baseline of compare.baselines (all "
                                     "sources, the target alone, a random mix of the same size drawn afresh per "
                                     "seed, gradient and representation similarity top-k, DSIR top-k when "
                                     "listed) with the finetune "
                                     "recipe. Under finetune.budget: equal (the default) every mix gets the same "
                                     "number of optimizer steps: finetune.max_steps, or the steps finetune.epochs "
                                     "passes over all sources take; under `epochs` each mix takes epochs over its "
                                     "own data and the table says the budget is unequal. Writes compare.json and "
                                     "compare.parquet; fine-tunes are cached, so more seeds later cost only the "
                                     "new ones.")
    _common(cmp)
    cmp.add_argument("--seeds", type=_count, default=None, help="fine-tuning seeds per mix (default: compare.seeds)")
    cmp.add_argument("--mix", action="append", default=[], metavar="NAME=A,B,...",
                     help="also compare a mix of your own (repeatable)")
    add = sub.add_parser(
        "add-sources", help="new candidate sources for a run whose store is complete: gradients at the existing "
                            "theta* (not retrained), appended to the store",
        description="Read new sources from SOURCES (a YAML file `sources: [...]`, each entry with the schema of "
                    "the config's data.sources), check them like prepare does (schema, names, data, lengths, "
                    "leakage) before any model runs, list them in <run dir>/added_sources.yaml, and append their "
                    "projected gradients, taken at the run's existing theta* with its projector, to the store. "
                    "theta* is not trained on them: the config and theta* stay as they are, and select, estimate, "
                    "compare and the fine-tunes treat the added sources as candidates after the config's. "
                    "Interrupted, it resumes on re-run. To train theta* with a source, move it from "
                    "added_sources.yaml into the config's data.sources.")
    add.add_argument("sources", metavar="SOURCES", help="YAML file with the new sources (`sources: [...]`)")
    _common(add, force=False)
    lin = sub.add_parser("check-linearity", help="first-order vs zeroth-order error of u_s around theta*")
    _common(lin)
    val = sub.add_parser("validate", help="fine-tune k random subsets for real and compare with the estimates")
    _common(val)
    val.add_argument("--subsets", type=_count, default=20, help="number of random subsets (default 20)")
    val.add_argument("--seeds", type=_count, default=2, help="fine-tuning seeds per subset (default 2)")
    val.add_argument("--recipe", choices=("finetune", "refit"), default="finetune",
                     help="the truth: `finetune`, the fine-tune gradex run deploys (default), or `refit`, "
                          "theta* fine-tuned with the refit recipe")
    exp = sub.add_parser("export", help="merge a run's final LoRA adapter (or theta*) into a standalone "
                                        "transformers model folder (model + tokenizer)",
                         description="Write a run's final model (final/selected) or theta* (meta/theta_star) as a "
                                     "standalone model folder that AutoModelForCausalLM.from_pretrained (for a T5: "
                                     "AutoModelForSeq2SeqLM) and AutoTokenizer.from_pretrained load: a LoRA adapter "
                                     "is merged into its base model (peft's merge_and_unload); a full fine-tune is "
                                     "saved with its tokenizer. "
                                     "The adapter itself needs no export: PeftModel.from_pretrained(base, "
                                     "'runs/<name>/final/selected') loads it.")
    exp.add_argument("run", metavar="RUN", help="the run directory, e.g. runs/default")
    exp.add_argument("--which", choices=("final", "meta"), default="final",
                     help="final: the fine-tuned selection (default); meta: theta*")
    exp.add_argument("--out", default=None, metavar="DIR", help="where to write it (default RUN/export/WHICH)")
    exp.add_argument("--trust-remote-code", action="store_true",
                     help="let the model's own code run (a run directory cannot ask for it in its config.yaml)")
    return p


def _clusters_summary(cfg: Config, body: dict | None) -> dict:
    """What `gradex clusters` prints: where the clusters are and their sizes (clusters.json also lists
    every member, too many to print)."""
    if body is None:
        raise ConfigError("gradex clusters: this config has no data.clusters (its sources are the configured ones)")
    return {"clusters": str(cfg.run_dir / "clusters" / "clusters.json"), "from": body["from"],
            "features": body["features"], "method": body["method"], "sizes": body["sizes"]}


def format_summary(summary: dict) -> str:
    from gradex.comparison import format_table
    from gradex.stability import stability_lines

    sel, final = summary["selection"], summary["final"]
    lines = [f"run directory: {summary['run_dir']}", "",
             "source scores (estimated change of the target validation loss when the source is included;"
             " negative helps):"]
    chosen = set(sel["selected"])
    found = sel.get("stability")
    if found:
        lines[-1] += (f" [{found['level']:.0%} interval over {found['resamples']} bootstrap resamples of the store]; "
                      "selected in: the share of resamples that selected it")
    if "proportions" in sel:
        lines[-1] = ("source scores (the best subset's, select.method best) and proportions (select.method weights)"
                     + (f"; [the share's {found['level']:.0%} interval over {found['resamples']} bootstrap resamples "
                        f"of the store]" if found else "") + ":")
    for name, score in sorted(sel["source_scores"].items(), key=lambda kv: (kv[1] is None, kv[1])):
        line = f"  {'*' if name in chosen else ' '} {name:<24} " + (f"{score:+.4f}" if score is not None else "-")
        if found and "proportions" in sel:  # select.method weights: each source's share and its interval
            low, high = found["proportion_interval"][name]
            line += (f"  share {sel['proportions'][name]:>5.1%} [{low:.3f}, {high:.3f}]" if low is not None else "  [-]") + \
                f"  given a share in {found['share'][name]:>4.0%}" + ("  uncertain" if name in found["uncertain"] else "")
        elif found:
            low, high = found["score_interval"][name]
            line += (f"  [{low:+.4f}, {high:+.4f}]" if low is not None else "  [-]") + \
                f"  selected in {found['share'][name]:>4.0%}" + ("  uncertain" if name in found["uncertain"] else "")
        lines.append(line)
    shares = (f"; in proportions {', '.join(f'{n} {p:.1%}' for n, p in sel['proportions'].items() if p > 0)} "
              f"(mixture.yaml)" if "proportions" in sel else "")
    lines += ["", f"selected ({sel['method']}, {sel['mode']} estimates): {', '.join(sel['selected']) or '(target only)'}"
              + shares,
              f"why: {sel['reason']}",
              f"estimated target validation loss of the selection: {sel['estimate']:.4f}"
              + (f" [{found['estimate_interval'][0]:.4f}, {found['estimate_interval'][1]:.4f}]"
                 if found and found["estimate_interval"][0] is not None else "")
              + f"   (target alone: {sel['baseline']:.4f}; estimates model fine-tuning theta*)",
              *(f"warning: {line}" for line in stability_lines(sel)),
              f"final model (final/): {final['recipe']['description']}",
              f"  validation loss {final['validation']['loss']:.4f}, validation {final['validation']['metric']} "
              f"{final['validation']['score']:.3f}; test loss {final['test']['loss']:.4f}, "
              f"test {final['test']['metric']} {final['test']['score']:.3f}"
              + (f" ({final['test']['no_match']} of {final['test']['examples']} generations without a match of "
                 f"the answer pattern {final['test']['answer_pattern']!r})" if "no_match" in final["test"] else ""), ""]
    at = next(i for i, line in enumerate(lines) if line.startswith("selected (")) + 1
    lines[at:at] = [f"  {name} ({found['size']} examples), e.g. " + "; ".join(repr(p) for p in found["examples"][:3])
                    for name, found in (sel.get("clusters") or {}).items()]  # what a selected cluster holds
    lines.append(format_table(summary["compare"]))
    ran = [f"{stage} {where}" for stage, where in (summary.get("ran_on") or {}).items() if where]
    if ran:
        lines.append(f"\nran on: {', '.join(ran)} (model.precision: {summary['precision_setting']})")
    if summary.get("report"):
        lines.append(f"\nreport: {summary['report']}")
    lines.append(f"\nfinished in {summary['seconds']:.0f} s")
    return "\n".join(lines)


def _config(args: argparse.Namespace) -> Config:
    """The config the command names: a file, a packaged example, or an existing run directory's own."""
    given = [name for name, v in (("a config file", args.config), ("--example", args.example),
                                  ("--run-dir", args.run_dir)) if v]
    if len(given) > 1:
        raise ConfigError(f"give one of a config file, --example or --run-dir, not {' and '.join(given)}")
    if args.run_dir:
        run_dir = Path(args.run_dir)
        if not (run_dir / "config.yaml").exists():
            raise ConfigError(f"--run-dir {run_dir}: no config.yaml there (not a gradex run directory)")
        cfg = load_received(run_dir, args.overrides)
        cfg.runs_dir, cfg.name = str(run_dir.resolve().parent), run_dir.resolve().name  # where it is now
        return cfg
    return load(EXAMPLES[args.example] if args.example else args.config, args.overrides)


def format_added(result: dict) -> str:
    lines = [f"run directory: {result['run_dir']}",
             f"store: {result['rows']} rows at theta* {result['theta*']}; added sources (not trained into theta*):"]
    for e in result["added"]:
        lines.append(f"  {e['source']:<24} {e['examples']:>5} examples  rows {e['rows'][0]}-{e['rows'][1] - 1}")
    lines.append("next: `gradex select` / `gradex estimate` on this run see them as candidates")
    return "\n".join(lines)


def _mixes(items: list[str]) -> dict[str, list[str]]:
    out = {}
    for item in items:
        name, sep, members = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--mix {item!r}: expected NAME=A,B,... (sources separated by commas)")
        out[name] = [m for m in members.split(",") if m]
    return out


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("gradex")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    try:
        code = _command(parser().parse_args(argv))
    finally:
        end_launch()
    if launched():
        # a launched process leaves without the interpreter's teardown: C++ threads of torch.distributed
        # that outlive it abort the process ("terminate called without an active exception", SIGABRT)
        # after its work is done, and the launcher then fails the whole launch (seen in CI, and here in 2 of
        # 12 runs of the two-process test with the process group already destroyed). Every file gradex writes is
        # closed by then; only the standard streams need flushing.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _command(args: argparse.Namespace) -> int:
    if pipeline.launch_rank() != 0:  # under a launch the result is printed once, by rank 0 (errors: by each)
        sys.stdout = open(os.devnull, "w")
    try:
        if args.command == "export":  # reads the run directory's own config.yaml, not an experiment file
            from pathlib import Path

            from gradex.export import export

            print(export(Path(args.run), args.which, Path(args.out) if args.out else None, args.trust_remote_code))
            return 0
        cfg = _config(args)
        if args.command == "status":
            print(f"run directory: {cfg.run_dir}")
            print(pipeline.format_status(pipeline.status(cfg)))
        elif args.command == "add-sources":
            print(format_added(pipeline.add_sources(cfg, args.sources)))
        elif args.command == "config":
            print(config_dumps(cfg), end="")
        elif args.command == "run":
            print(format_summary(pipeline.run_all(cfg, args.force)))
        elif args.command == "report":
            from pathlib import Path

            print(pipeline.report(cfg, args.force, Path(args.out) if args.out else None))
        elif args.command == "estimate":
            subsets = None if args.subset is None else [[s for s in x.split(",") if s] for x in args.subset]
            for row in pipeline.estimate(cfg, subsets):
                print(f"{row['estimate']:.4f}  output change {row['output_change']:.3f}  step {row['step']:.3f}  "
                      f"{', '.join(row['members']) or '(target only)'}")
        elif args.command == "compare":
            from gradex.comparison import format_table

            print(format_table(pipeline.compare(cfg, args.seeds, _mixes(args.mix), force=args.force)))
        elif args.command == "check-linearity":
            from gradex import diagnostics

            print(diagnostics.format_linearity(diagnostics.check_linearity(cfg)))
        elif args.command == "validate":
            from gradex import diagnostics

            print(json.dumps(diagnostics.summary(diagnostics.validate(cfg, args.subsets, args.seeds, args.recipe)), indent=2))
        else:
            result = pipeline.ensure(cfg, "finetune" if args.command == "evaluate" else args.command, args.force)
            if args.command == "clusters":
                result = _clusters_summary(cfg, result)
            if isinstance(result, pipeline.Run):  # prepare: where the examples went
                result = result.dir / "data" / "manifest.json"
            print(result if not isinstance(result, dict) else json.dumps(result, indent=2, default=str))
    except ConfigError as err:
        if args.debug:
            traceback.print_exc()
        print(f"gradex: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`gradex status | head`): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail
        return 141
    except KeyboardInterrupt:
        print("gradex: interrupted; finished work is kept and the stage resumes on re-run", file=sys.stderr)
        return 130
    except Exception as err:  # a bug or an environment problem: one line, the traceback on request
        if args.debug:
            traceback.print_exc()
        print(f"gradex: error: {type(err).__name__}: {err} (run with --debug for the traceback; finished work "
              "is kept)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
