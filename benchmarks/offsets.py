"""Where the store's offsets come from under bf16 (`gradients.offsets`): a second, fp32 forward for
every row (`fp32`, the default before this measurement), for the target's validation rows only
(`validation`), or for none (`pass`, the bf16 pass's own outputs: the default since). The store's cost and `gradex validate`'s agreement (issue "Side
by side with the peer libraries", item 3: a cheaper gradient pass, measured, not assumed).

    python benchmarks/offsets.py       # the default example, from runs/meta-epochs/meta3: 8 subsets x 2 seeds
    python benchmarks/offsets.py --config src/gradex/examples/corrupted.yaml --seed-from runs/preconditioner-corrupted/meta

One run directory per setting under --runs-dir, each started from copies of one run's prepared data,
theta*, fine-tunes and validate's real fine-tunes (--seed-from): the ledger keeps those, only the
stores are built here. The stores are built --repeats times, the settings alternating (A B C, C B A,
...) so that drift of the host falls on every setting alike; each setting's seconds are the median of
its builds (the gradients stage's own record). Then `gradex validate` on every setting with the same
real fine-tunes (rows keyed by what shapes a fine-tune, which the offsets do not): nothing is trained,
and the script stops before validate if a real fine-tune it needs is missing.

The gate, for `validation` and `pass` against `fp32`, is preconditioner.py's: error at most fp32's
plus the seed noise, and the estimates rank the subsets alike at least as well as two seeds of the
real fine-tunes do. Then `gradex select` on every setting, for what a user would be told to train. Writes benchmarks/results/offsets.json (offsets-<name>.json for another
--config); prints its flat `summary` last: `{validation,pass}_vs_fp32_store_seconds` (ratio of medians,
< 1 = cheaper), `{setting}_store_seconds`, `{setting}_selected`, and per challenger `{setting}_spearman`, `{setting}_error`,
`{setting}_error_diff_ci`, `{setting}_estimates_spearman`, `{setting}_gate`, with `fp32_spearman`,
`fp32_error`, `seed_noise`, `seeds_spearman`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from gradex import config as config_mod
from gradex import ledger
from gradex import pipeline
from gradex.atomic import write_json
from gradex.diagnostics import missing_rows, validate

from machine import command, describe  # benchmarks/machine.py, beside this script
from preconditioner import agreement, validations
from weights import seeded

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SETTINGS = ("fp32", "validation", "pass")


def build_stores(cfgs: dict[str, config_mod.Config], repeats: int) -> dict[str, list[float]]:
    """Each setting's store, built `repeats` times in alternating order; the stage's recorded seconds of each."""
    seconds: dict[str, list[float]] = {s: [] for s in cfgs}
    for r in range(repeats):
        for setting in (SETTINGS if r % 2 == 0 else SETTINGS[::-1]):
            pipeline.gradients(cfgs[setting], force=True)
            seconds[setting].append(ledger.read(cfgs[setting].run_dir / "store")["seconds"])
            print(f"gradients ({setting}, build {r + 1}): {seconds[setting][-1]} s", file=sys.stderr, flush=True)
    return seconds


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=config_mod.EXAMPLES_DIR / "default.yaml")
    ap.add_argument("--subsets", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="builds of each setting's store (median reported)")
    ap.add_argument("--runs-dir", type=Path, default=None,
                    help="where the settings' run directories go (default runs/offsets, or runs/offsets-<name>)")
    ap.add_argument("--seed-from", type=Path, default=ROOT / "runs" / "meta-epochs" / "meta3",
                    help="a run directory of the same config whose data, theta*, fine-tunes and validate rows "
                         "to start from")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    if args.seeds < 2:
        ap.error("--seeds: at least 2, for the seed noise the gate is measured against")
    name = config_mod.load(args.config, args.overrides).name
    suffix = "" if name == "default" else f"-{name}"
    runs_dir = args.runs_dir or ROOT / "runs" / f"offsets{suffix}"
    cfgs = {s: config_mod.load(args.config, [*args.overrides, f"runs_dir={runs_dir}", f"name={s}",
                                             f"gradients.offsets={s}"]) for s in SETTINGS}
    for cfg in cfgs.values():
        seeded(cfg.run_dir, args.seed_from, items=("data", "meta", "finetunes", "validate"))
    precision = pipeline.Run(cfgs["fp32"]).gradient_precision
    if precision == "fp32":
        sys.exit("offsets.py: the gradient pass runs in fp32 here, where every setting is the same store; "
                 "run it on a host with native bf16, or with --set model.precision=bf16")
    for s, cfg in cfgs.items():  # validate must train nothing: the real fine-tunes come from --seed-from
        missing = missing_rows(pipeline.Run(cfg), args.subsets, args.seeds)
        if missing:
            sys.exit(f"offsets.py: {cfg.run_dir} lacks {missing} of validate's {args.subsets} x {args.seeds} real "
                     f"fine-tunes; give --seed-from a run whose `gradex validate` made them")
    seconds = build_stores(cfgs, args.repeats)
    results = {s: validate(cfg, k=args.subsets, seeds=args.seeds) for s, cfg in cfgs.items()}
    selected = {s: pipeline.select(cfg)["selected"] for s, cfg in cfgs.items()}  # what the user gets from each
    median = {s: statistics.median(v) for s, v in seconds.items()}
    summary: dict = {f"{s}_vs_fp32_store_seconds": round(median[s] / median["fp32"], 3) for s in SETTINGS[1:]}
    summary |= {f"{s}_store_seconds": round(median[s], 1) for s in SETTINGS}
    summary |= {f"{s}_selected": selected[s] for s in SETTINGS}
    for s in SETTINGS[1:]:
        found = agreement(results, "fp32", s)
        summary |= {k: found[k] for k in ("fp32_spearman", "fp32_error", "seed_noise", "seeds_spearman",
                                          f"{s}_spearman", f"{s}_error")}
        summary |= {f"{s}_{k}": found[k] for k in ("estimates_spearman", "error_diff_ci", "gate")}
    body = {"command": command("offsets.py", argv), "machine": describe(precision=precision),
            "subsets": args.subsets, "seeds": args.seeds, "repeats": args.repeats, "store_seconds": seconds,
            "seed_from": str(args.seed_from), "validation": validations(results), "summary": summary}
    write_json(RESULTS / f"offsets{suffix}.json", body)
    print(json.dumps(summary))
    return body


if __name__ == "__main__":
    main()
