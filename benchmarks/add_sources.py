"""A source added at theta* (gradex add-sources) against the same source trained into theta*.

    python benchmarks/add_sources.py                      # drop add4, the source the default selects
    python benchmarks/add_sources.py --drop add4 --drop past_tense

For each dropped source: a run of the reference's config without it (runs/drop-<name>: meta-train
and gradients, reused when already done), then `gradex add-sources` of the source back into it, so
its gradients are taken at a theta* that never saw it. The reference (runs/default, trained with
every source) is copied to runs/add-sources-reference (data, theta*, store; the original is only
read) and both runs' estimators are scored on every one of the 2^n subsets of the sources:

- the dropped source's score (its average effect over every subset without it, as
  select.method exhaustive scores it) and its rank among the sources, in both runs;
- Spearman, Pearson and mean relative difference between the two runs' estimates over the subsets
  that contain it, and, as the yardstick of how far two theta* differ anyway, over those that do
  not; the same for its marginal effect f(S + source) - f(S), the number a screen is read for;
- named subsets: the source alone, all sources, all sources but one other; and each run's best subset.

One theta* seed per run and one dropped source at a time: this measures how much an added source's
estimates move, on this default, not a distribution. Writes benchmarks/results/add-sources.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from scipy import stats

from gradex import config as config_mod
from gradex import ledger, pipeline
from gradex.added import ADDED_FILE

from machine import describe  # benchmarks/machine.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("data", "meta", "store")  # what the reference's estimator reads


def reference_copy(source: Path, runs_dir: Path) -> config_mod.Config:
    """The reference run's estimation inputs copied to runs_dir/add-sources-reference, so nothing
    here can write into the original (a stage that ran would rewrite its config.yaml)."""
    cfg = config_mod.load(source / "config.yaml")
    cfg.runs_dir, cfg.name = str(runs_dir), "add-sources-reference"
    for part in COPIED:
        if not (cfg.run_dir / part).exists():
            shutil.copytree(source / part, cfg.run_dir / part)
    config_mod.dump(cfg, cfg.run_dir / "config.yaml")
    for stage in ("prepare", "meta", "gradients"):
        state, why = pipeline.Run(cfg).state(stage)
        if state != "done":
            raise SystemExit(f"{source}: {stage} is {state} ({why}); the reference must be a complete run")
    return cfg


def drop_config(ref: config_mod.Config, drop: str) -> tuple[config_mod.Config, config_mod.SourceConfig]:
    raw = config_mod.to_dict(ref)
    [spec] = [s for s in raw["data"]["sources"] if s["name"] == drop] or [None]
    if spec is None:
        raise SystemExit(f"--drop {drop}: not a source of the reference ({[s['name'] for s in raw['data']['sources']]})")
    raw["data"]["sources"] = [s for s in raw["data"]["sources"] if s["name"] != drop]
    raw["name"] = f"drop-{drop}"
    return config_mod.from_dict(raw), config_mod.SourceConfig(**spec)


def store_timings(cfg: config_mod.Config) -> dict:
    """The store manifest's timings: its own pass over the examples theta* was trained on (excluding
    the preconditioner's pass) and, once extended, the added rows' compute and merge."""
    return json.loads((cfg.run_dir / "store" / "manifest.json").read_text())["timings"]


def all_estimates(cfg: config_mod.Config, names: list[str]) -> tuple[dict[frozenset, float], float]:
    """Every subset of `names` (as frozensets) -> the run's estimate, and the run's l2."""
    run = pipeline.Run(cfg)
    assert sorted(run.sources) == sorted(names), (run.sources, names)
    fn, _, l2 = pipeline.estimator(run)
    subsets = [frozenset(c) for k in range(len(names) + 1) for c in itertools.combinations(names, k)]
    values = fn(pipeline.member_mask(run.sources, [list(s) for s in subsets])).tolist()
    return dict(zip(subsets, values)), l2


def agreement(a: list[float], b: list[float]) -> dict:
    a, b = np.asarray(a), np.asarray(b)
    return {"n": int(len(a)), "spearman": float(stats.spearmanr(a, b).statistic),
            "pearson": float(stats.pearsonr(a, b).statistic),
            "mean_relative_difference": float(np.mean(np.abs(a - b) / np.abs(a)))}


def scores(est: dict[frozenset, float], names: list[str]) -> dict[str, float]:
    """Each source's average effect, mean f(S + i) - f(S) over every S without i (exhaustive's score)."""
    return {i: float(np.mean([est[s | {i}] - est[s] for s in est if i not in s])) for i in names}


def compare(drop: str, ref_est: dict, add_est: dict, names: list[str]) -> dict:
    ref_scores, add_scores = scores(ref_est, names), scores(add_est, names)
    rank = {k: sorted(v, key=v.get).index(drop) + 1 for k, v in (("reference", ref_scores), ("added", add_scores))}
    with_it = [s for s in ref_est if drop in s]
    without = [s for s in ref_est if drop not in s]
    effect = {k: [e[s | {drop}] - e[s] for s in without] for k, e in (("reference", ref_est), ("added", add_est))}
    others = [n for n in names if n != drop]
    everything = frozenset(names)
    named = {"alone": frozenset([drop]), "all": everything,
             **{f"all but {o}": everything - {o} for o in others}}
    best = {k: sorted(min(e, key=e.get)) for k, e in (("reference", ref_est), ("added", add_est))}
    # how far each source's score moved between the two theta*: the dropped one's against the others'
    shift = {n: abs(add_scores[n] - ref_scores[n]) for n in names}
    none = frozenset()
    return {
        "dropped": drop,
        "score": {"reference": ref_scores[drop], "added": add_scores[drop]},
        "rank_among_sources": {**rank, "of": len(names)},
        "scores_all_sources": {"reference": ref_scores, "added": add_scores,
                               **agreement([ref_scores[n] for n in names], [add_scores[n] for n in names])},
        "subsets_with_it": agreement([ref_est[s] for s in with_it], [add_est[s] for s in with_it]),
        "subsets_without_it": agreement([ref_est[s] for s in without], [add_est[s] for s in without]),
        "marginal_effect": {**{k: v for k, v in agreement(effect["reference"], effect["added"]).items()
                               if k != "mean_relative_difference"},
                            "same_sign": float(np.mean(np.sign(effect["reference"]) == np.sign(effect["added"]))),
                            "mean_reference": float(np.mean(effect["reference"])),
                            "mean_added": float(np.mean(effect["added"]))},
        "score_shift": {"dropped": shift[drop], "others_median": float(np.median([shift[n] for n in others])),
                        "others_max": max(shift[n] for n in others),
                        "rank_of_dropped": sorted(shift.values(), reverse=True).index(shift[drop]) + 1},
        # estimate(S) - estimate(target alone) in each run: the level of each theta*'s own loss left out
        "named_subsets": {k: {"reference": ref_est[s], "added": add_est[s],
                              "reference_vs_target_alone": ref_est[s] - ref_est[none],
                              "added_vs_target_alone": add_est[s] - add_est[none]} for k, s in named.items()},
        "target_alone": {"reference": ref_est[frozenset()], "added": add_est[frozenset()]},
        "best_subset": best,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", default=str(ROOT / "runs" / "default"), help="a complete run (default runs/default)")
    p.add_argument("--drop", action="append", default=None, help="a source to drop and add back (repeatable; "
                   "default add4)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "add-sources.json"))
    args = p.parse_args(argv)
    ref = reference_copy(Path(args.reference), Path(args.reference).resolve().parent)
    names = pipeline.Run(ref).sources
    ref_est, ref_l2 = all_estimates(ref, names)
    results = []
    for drop in args.drop or ["add4"]:
        cfg, spec = drop_config(ref, drop)
        t0 = time.perf_counter()
        pipeline.gradients(cfg)  # meta-train + gradients without the source (skipped when done)
        meta_seconds = ledger.read(cfg.run_dir / "meta").get("seconds")
        more = cfg.run_dir.parent / f"add-{drop}.yaml"
        more.write_text(yaml.safe_dump({"sources": [config_mod.to_dict(spec)]}, sort_keys=False))
        t1 = time.perf_counter()
        added = pipeline.add_sources(cfg, more)  # a no-op when an earlier run of this script added it already
        add_seconds = time.perf_counter() - t1
        extension, timings = ledger.read(cfg.run_dir / "store"), store_timings(cfg)  # both survive such re-runs
        add_est, add_l2 = all_estimates(cfg, names)
        row = compare(drop, ref_est, add_est, names)
        row.update({"l2": {"reference": ref_l2, "added": add_l2},
                    "seconds": {"add_sources_call": round(add_seconds, 1),
                                "store_extension_stage": extension.get("seconds"),  # model load included
                                "added_rows_compute": timings.get("added_compute_seconds"),
                                "meta_train_without_it": meta_seconds,
                                "store_pass_without_it": timings.get("last_run_wall_seconds"),
                                "this_script_for_the_drop_run": round(t1 - t0, 1)},
                    "added_rows": added["added"], "run_dir": str(cfg.run_dir),
                    "added_file": str(cfg.run_dir / ADDED_FILE)})
        results.append(row)
        print(format_row(row), flush=True)
    body = {"benchmark": "add-sources", "reference": str(Path(args.reference)), "sources": names,
            "subsets_per_run": len(ref_est), "command": " ".join(["python", "benchmarks/add_sources.py", *(argv or sys.argv[1:])]),
            "machine": describe(),
            "caveat": "one dropped source per row and one theta* seed per run: how far the estimates of a source "
                      "added at a theta* that never saw it move from those of a theta* trained with it, on this "
                      "default; not a distribution over sources or seeds",
            "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(body, indent=2) + "\n")
    print(json.dumps({r["dropped"]: {"score_reference": round(r["score"]["reference"], 5),
                                     "score_added": round(r["score"]["added"], 5),
                                     "spearman_with": round(r["subsets_with_it"]["spearman"], 3),
                                     "spearman_without": round(r["subsets_without_it"]["spearman"], 3)}
                      for r in results}))
    return body


def format_row(r: dict) -> str:
    w, wo, m = r["subsets_with_it"], r["subsets_without_it"], r["marginal_effect"]
    sec = r["seconds"]
    lines = [f"dropped {r['dropped']}: added back in {sec['store_extension_stage']} s (its rows' gradients "
             f"{sec['added_rows_compute']} s; this call {sec['add_sources_call']:.0f} s), against meta-train "
             f"{sec['meta_train_without_it']} s and the store pass {sec['store_pass_without_it']} s without it",
             f"  score (average effect): reference {r['score']['reference']:+.5f}, added {r['score']['added']:+.5f}; "
             f"rank {r['rank_among_sources']['reference']} vs {r['rank_among_sources']['added']} of "
             f"{r['rank_among_sources']['of']}",
             f"  all sources' scores: Spearman {r['scores_all_sources']['spearman']:.3f}, "
             f"Pearson {r['scores_all_sources']['pearson']:.3f}; its score moved {r['score_shift']['dropped']:.4f} "
             f"(others: median {r['score_shift']['others_median']:.4f}, max {r['score_shift']['others_max']:.4f})"]
    for name, a in (("subsets with it", w), ("subsets without it", wo)):
        lines.append(f"  {name:<19} ({a['n']}): Spearman {a['spearman']:.3f}, Pearson {a['pearson']:.3f}, "
                     f"mean relative difference {a['mean_relative_difference']:.2%}")
    lines.append(f"  marginal effect f(S+{r['dropped']}) - f(S) ({m['n']}): Spearman {m['spearman']:.3f}, Pearson "
                 f"{m['pearson']:.3f}, same sign {m['same_sign']:.0%}, mean {m['mean_reference']:+.4f} vs "
                 f"{m['mean_added']:+.4f}")
    for k in ("alone", "all"):
        v = r["named_subsets"][k]
        lines.append(f"  {k:<6} reference {v['reference']:.4f} ({v['reference_vs_target_alone']:+.4f} vs the target "
                     f"alone), added {v['added']:.4f} ({v['added_vs_target_alone']:+.4f})")
    lines.append(f"  best subset: reference {r['best_subset']['reference']}, added {r['best_subset']['added']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
