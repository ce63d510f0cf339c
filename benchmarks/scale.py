"""How estimation and selection grow with the pool: synthetic stores of n sources and N examples.

    python benchmarks/scale.py                              # n in {10, 100, 1000} x N in {1e4, 1e5, 1e6}, d = 256
    python benchmarks/scale.py --sources 10 100 --examples 10000 --dim 256 --tag small

Each (n, N) runs in its own child process, so its peak RSS is its own: a synthetic store (x.npy,
u.npy, group.npy on disk, N rows spread evenly over n sources plus a target group of N/(n+1)
examples, and 512 target validation rows) is written, then memory-mapped and timed through
    build     the estimation problem (gradex.estimate.Problem and the all-sources l2 calibration),
    estimate  1,000 random subsets of half the sources in one batch (subsets per second),
    one-step  the same subsets by the first Newton step alone (estimate.refinements = 0), with its
              relative difference from the refined estimates, and again with the factored systems
              formed whole rather than from their lower triangles (the earlier way; ratio and the
              largest relative difference of the two),
    ensemble  the paper's ensemble selection with the default number of subsets (max(400, 4 n)),
    forward   forward stepwise over all n sources (each round's candidates in one batch).
The timings of the 1,000 subsets are medians of 3 repeats; build, ensemble and forward run once. The
gradients are low-rank plus noise with a few planted helpful sources, so the fit is not trivial
and forward stepwise stops after some rounds rather than at once. Writes benchmarks/results/scale[-tag].json
and prints one JSON line last with `n<n>_N<N>_<figure>` for every cell, and the growth exponents
(least-squares slope of log time against log N at the largest n, and against log n at the largest N).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from machine import command, describe  # benchmarks/machine.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
N_VAL = 512
SUBSETS = 1000
REPEATS = 3  # the 1,000-subset timings are the median of this many; build, ensemble and forward run once


def synthetic_store(out: Path, n: int, big_n: int, d: int, seed: int = 0) -> None:
    """x = low-rank signal + noise, each source shifted along its own direction; sources 0..4 share
    the target's direction (helpful), written in 64k-row blocks so N = 1e6 never sits in memory twice."""
    rng = np.random.default_rng(seed)
    rank = 16
    basis = rng.standard_normal((rank, d)).astype(np.float32) / math.sqrt(d)
    target_dir = rng.standard_normal(d).astype(np.float32) / math.sqrt(d)
    dirs = rng.standard_normal((n + 1, d)).astype(np.float32) / math.sqrt(d)
    dirs[0] = target_dir
    dirs[1:6] = 0.8 * target_dir + 0.2 * dirs[1:6]
    per = big_n // (n + 1)
    group = np.repeat(np.arange(n + 1, dtype=np.int64), per)
    rows = len(group)
    x = np.lib.format.open_memmap(out / "x.npy", mode="w+", dtype=np.float32, shape=(rows, d))
    u = np.lib.format.open_memmap(out / "u.npy", mode="w+", dtype=np.float32, shape=(rows,))
    for lo in range(0, rows, 1 << 16):
        hi = min(rows, lo + (1 << 16))
        g = group[lo:hi]
        block = rng.standard_normal((hi - lo, rank)).astype(np.float32) @ basis
        block += 0.5 * rng.standard_normal((hi - lo, d)).astype(np.float32) / math.sqrt(d)
        block += dirs[g]
        x[lo:hi] = block
        u[lo:hi] = rng.normal(-1.0, 0.5, hi - lo).astype(np.float32)
    x.flush()
    u.flush()
    np.save(out / "group.npy", group)
    val = rng.standard_normal((N_VAL, rank)).astype(np.float32) @ basis + target_dir
    val += 0.5 * rng.standard_normal((N_VAL, d)).astype(np.float32) / math.sqrt(d)
    np.save(out / "x_val.npy", val)
    np.save(out / "u_val.npy", rng.normal(-1.0, 0.5, N_VAL).astype(np.float32))


def cell(n: int, big_n: int, d: int) -> dict:
    """One (n, N) measurement, in this process (the parent runs it in a child for its peak RSS)."""
    import resource

    import torch

    from gradex import search
    from gradex.estimate import Problem, calibrate_l2, estimate, solver

    with tempfile.TemporaryDirectory(prefix="gradex-scale-") as tmp:
        out = Path(tmp)
        t0 = time.perf_counter()
        synthetic_store(out, n, big_n, d)
        write_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        with warnings.catch_warnings():  # a read-only memory map: gradex never writes to it
            warnings.simplefilter("ignore", UserWarning)
            x = torch.from_numpy(np.load(out / "x.npy", mmap_mode="r"))  # the store as gradex opens it
        prob = Problem(x=x, u=torch.from_numpy(np.load(out / "u.npy")), group=torch.from_numpy(np.load(out / "group.npy")),
                       x_val=torch.from_numpy(np.load(out / "x_val.npy")), u_val=torch.from_numpy(np.load(out / "u_val.npy")),
                       n_sources=n)
        l2 = calibrate_l2(prob, output_change=0.3)
        calibrate_s = time.perf_counter() - t0
        fn = lambda subsets: estimate(prob, subsets, l2, weighting="mean").loss  # noqa: E731
        fn(torch.zeros(1, n, dtype=torch.bool))  # the anchor and the per-group sums are built on first use
        build_s = time.perf_counter() - t0

        subsets = search.sample_subsets(n, SUBSETS, 0.5, seed=1)
        times = []
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            refined = fn(subsets)
            times.append(time.perf_counter() - t0)
        estimate_s = statistics.median(times)
        # The same subsets by the one Newton step from the all-sources fit (estimate.refinements = 0):
        # what the refinement's full-data gradients cost, and what they buy.
        times = []
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            one_step = estimate(prob, subsets, l2, refinements=0, weighting="mean").loss
            times.append(time.perf_counter() - t0)
        one_step_s = statistics.median(times)
        one_step_err = ((one_step - refined).abs() / refined.abs()).double()
        # The same one step with the factored systems formed whole (the earlier way), in this run:
        # the ratio of the two is what summing only their lower triangles buys.
        solver.LOWER_ONLY = False
        try:
            times = []
            for _ in range(REPEATS):
                t0 = time.perf_counter()
                whole = estimate(prob, subsets, l2, refinements=0, weighting="mean").loss
                times.append(time.perf_counter() - t0)
        finally:
            solver.LOWER_ONLY = True
        whole_s = statistics.median(times)
        whole_diff = float(((whole - one_step).abs() / one_step.abs()).max())

        m = search.default_subsets(n)
        t0 = time.perf_counter()
        ens = search.ensemble(fn, n, m, 0.5, seed=0)
        ensemble_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        fwd = search.forward(fn, n)
        forward_s = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB
    return {"n": n, "N": big_n, "d": d, "rows": (big_n // (n + 1)) * (n + 1), "write_s": round(write_s, 2),
            "calibrate_s": round(calibrate_s, 3), "build_s": round(build_s, 3), "estimate_s": round(estimate_s, 3),
            "subsets_per_s": round(SUBSETS / estimate_s, 1),
            "one_step_subsets_per_s": round(SUBSETS / one_step_s, 1),
            "one_step_whole_systems_subsets_per_s": round(SUBSETS / whole_s, 1),
            "one_step_lower_vs_whole": round(whole_s / one_step_s, 2), "one_step_lower_vs_whole_max_rel_diff": whole_diff,
            "one_step_rel_error_mean": float(one_step_err.mean()), "one_step_rel_error_max": float(one_step_err.max()),
            "ensemble_subsets": m, "ensemble_s": round(ensemble_s, 3),
            "forward_s": round(forward_s, 3), "forward_rounds": len(fwd.history),
            "forward_selected": len(fwd.selected), "ensemble_selected": len(ens.selected),
            "peak_rss_gb": round(peak, 3)}


def slope(xs: list[float], ys: list[float]) -> float | None:
    pts = [(math.log(a), math.log(b)) for a, b in zip(xs, ys) if a > 0 and b > 0]
    if len(pts) < 2:
        return None
    lx, ly = np.array(pts).T
    return round(float(np.polyfit(lx, ly, 1)[0]), 2)


def label(value: int) -> str:
    exp = round(math.log10(value))
    return f"1e{exp}" if 10 ** exp == value else str(value)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sources", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--examples", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--tag", default="")
    ap.add_argument("--cell", nargs=3, type=int, metavar=("N_SOURCES", "N_EXAMPLES", "DIM"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.cell:  # child: one measurement, printed as JSON
        print(json.dumps(cell(*args.cell)))
        return {}
    cells = []
    for n in args.sources:
        for big_n in args.examples:
            proc = subprocess.run([sys.executable, __file__, "--cell", str(n), str(big_n), str(args.dim)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"n={n} N={big_n}: failed\n{proc.stderr[-3000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            cells.append(row)
            print(f"n={n:>5} N={big_n:>8}: build {row['build_s']:8.2f} s  {row['subsets_per_s']:9.1f} subsets/s "
                  f"(one step {row['one_step_subsets_per_s']:.1f}/s, error {row['one_step_rel_error_mean']:.1e}, "
                  f"{row['one_step_lower_vs_whole']:.2f}x the whole systems)  "
                  f"ensemble {row['ensemble_s']:7.2f} s  forward {row['forward_s']:8.2f} s ({row['forward_rounds']} "
                  f"rounds)  peak {row['peak_rss_gb']:.2f} GB", flush=True)
    line: dict = {}
    for r in cells:
        key = f"n{r['n']}_N{label(r['N'])}"
        for fig in ("build_s", "subsets_per_s", "one_step_subsets_per_s", "one_step_lower_vs_whole", "ensemble_s",
                    "forward_s", "peak_rss_gb"):
            if fig in r:
                line[f"{key}_{fig}"] = r[fig]
    growth = {}
    for fig in ("build_s", "estimate_s", "ensemble_s", "forward_s", "peak_rss_gb"):
        top_n = [r for r in cells if r["n"] == max(args.sources)]
        top_big = [r for r in cells if r["N"] == max(args.examples)]
        growth[f"{fig}_vs_N"] = slope([r["N"] for r in top_n], [r[fig] for r in top_n])
        growth[f"{fig}_vs_n"] = slope([r["n"] for r in top_big], [r[fig] for r in top_big])
    line.update({f"exponent_{k}": v for k, v in growth.items()})
    body = {"command": command("scale.py", argv),
            "machine": describe(),
            "cells": cells, "growth_exponents": growth}
    out = ROOT / "benchmarks" / "results" / (f"scale-{args.tag}.json" if args.tag else "scale.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(body, indent=2) + "\n")
    print(json.dumps(line))
    return body


if __name__ == "__main__":
    main()
