"""Speed and accuracy of gradex.estimate against per-subset solvers, in one process.

Problem (synthetic, shaped like a real run; see gradex/testing.py, synthetic_problem): n=30 sources,
N=20,000 training examples (10% target train), d=256 projected gradients, 500 target validation
examples, offsets u ~ N(1.5, 1.5), source-specific gradient means (a third aligned with the target,
a third opposed, a third orthogonal), gradient scale 4 (|x| ~ 4-5). The projection is a p=921,600
parameter LoRA gradient (SmolLM2-135M, r=8 on q,k,v,o) projected to d=256, so col_sq_norms = p/d;
theta_norm = 17.9 is the norm of freshly initialized LoRA A matrices (kaiming-uniform, 552,960
entries of variance 1/(3*576)). l2 comes from calibrate_l2 at the default `estimate.output_change`
of gradex's config (the all-sources fit changes the training outputs by 0.3 RMS), as in a real run.
1,000 random subsets of 15 of the 30 sources.

scikit-learn's LogisticRegression has no per-example offsets, so the comparison with it runs on the
same features with the offsets set to zero (every label positive: half the rows are negated and
labelled 0, no intercept, C = 1/(2 l2): exactly gradex's objective without offsets). On the problem
WITH offsets the reference is scipy L-BFGS-B in float64 on the exact objective
(exact_solve in gradex/testing.py).

Measured, in this order:
- gradex `estimate` at its defaults, with offsets: median of --repeats runs over all subsets
  (per-problem statistics and calibration are cached first; their one-off cost is reported);
- gradex `estimate` at its defaults, offsets zeroed, over the same subsets (median of repeats);
- scikit-learn per subset, offsets zeroed, on the first --sklearn-subsets subsets (rate extrapolated);
- the exact oracle with offsets on --oracle-subsets subsets;
- gradex `estimate` at tol=1e-5 instead of the default 1e-4 (TOL; key `tight`), with offsets.
Accuracy: Spearman of the estimated target losses across subsets, and the max relative difference
of the estimated loss (and of z), gradex vs sklearn (no offsets) and gradex vs the oracle (offsets).

Prints human-readable lines, then ONE JSON line last (also written to --out).
    .venv/bin/python benchmarks/estimate.py            # full (~1-2 min)
    .venv/bin/python benchmarks/estimate.py --quick    # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from gradex.config import EstimateConfig
from gradex.estimate import TOL, Problem, calibrate_l2, estimate, linear_loss
from gradex.search import sample_subsets

from gradex.testing import exact_solve, synthetic_problem

from machine import command, describe  # benchmarks/machine.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
TIGHT = 1e-5  # also measured: the solver run to float32 precision


def sklearn_fit(problem: Problem, subsets: torch.Tensor, l2: float) -> tuple[torch.Tensor, float, int]:
    """z per subset from sklearn LogisticRegression (lbfgs, its default tolerance) on offset-free
    features; returns (z (k, d) float64, subsets per second, fits that hit max_iter)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    x_all = problem.x.double().numpy()
    group = problem.group.numpy()
    zs, unconverged = [], 0
    t0 = time.perf_counter()
    for s in subsets:
        keep = np.concatenate([[True], s.numpy()])[group]
        x = x_all[keep]
        flip = np.arange(len(x)) % 2 == 1
        clf = LogisticRegression(C=1.0 / (2.0 * l2), fit_intercept=False, max_iter=1000)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            clf.fit(np.where(flip[:, None], -x, x), (~flip).astype(int))
        unconverged += any(issubclass(w.category, ConvergenceWarning) for w in caught)
        zs.append(torch.from_numpy(clf.coef_[0].copy()))
    rate = len(subsets) / (time.perf_counter() - t0)
    return torch.stack(zs), rate, unconverged


def timed_estimate(problem: Problem, subsets: torch.Tensor, l2: float, repeats: int, **kwargs):
    estimate(problem, subsets[:64], l2, **kwargs)  # warm-up (allocator, MKL)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        est = estimate(problem, subsets, l2, **kwargs)
        times.append(time.perf_counter() - t0)
    return est, times


def agreement(loss: torch.Tensor, loss_ref: torch.Tensor, z: torch.Tensor, z_ref: torch.Tensor) -> dict:
    return {"spearman": float(spearmanr(loss.numpy(), loss_ref.numpy())[0]),
            "max_rel_loss_diff": float(((loss - loss_ref) / loss_ref).abs().max()),
            "max_rel_z_diff": float(((z.double() - z_ref).norm(dim=1) / z_ref.norm(dim=1)).max())}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small smoke run (seconds)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sklearn-subsets", type=int, default=None, help="default 100 (quick: 10)")
    ap.add_argument("--oracle-subsets", type=int, default=None, help="default 50 (quick: 8)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "estimate.json"))
    args = ap.parse_args(argv)

    if args.quick:
        shape = dict(n_sources=8, n_train=2000, d=32, n_val=100)
        m, p_dim, theta_norm = 100, 30_720, 3.0
    else:
        shape = dict(n_sources=30, n_train=20_000, d=256, n_val=500)
        m, p_dim = 1000, 921_600
        theta_norm = float(np.sqrt(8 * 576 * 4 * 30 / (3 * 576)))
    n_sklearn = args.sklearn_subsets or (10 if args.quick else 100)
    n_oracle = args.oracle_subsets or (8 if args.quick else 50)
    change, alpha = EstimateConfig().output_change, 0.5
    load_before = os.getloadavg()

    problem, _ = synthetic_problem(**shape, seed=0, p=p_dim, theta_norm=theta_norm, scale=4.0)
    n = problem.n_sources
    subsets = sample_subsets(n, m, alpha, seed=0)
    print(f"problem: N={problem.x.shape[0]} d={problem.dim} n={n} V={problem.x_val.shape[0]} "
          f"m={m} subsets of {int(subsets[0].sum())} sources; p={p_dim} theta_norm={theta_norm:.3g}")

    t0 = time.perf_counter()
    l2 = calibrate_l2(problem, output_change=change)  # also computes the cached per-group statistics
    estimate(problem, subsets[:1], l2)  # caches the all-sources fit at l2 and the group sums there
    t_setup = time.perf_counter() - t0
    print(f"l2 = {l2:.6g} from calibrate_l2(output_change={change}, the default); setup (per-group sums, "
          f"calibration, all-sources fit) {t_setup:.2f} s, once per problem")

    est, times = timed_estimate(problem, subsets, l2, args.repeats)
    rate = m / statistics.median(times)
    print(f"gradex estimate, offsets: {m} subsets, median {statistics.median(times):.3f} s of "
          f"{[round(t, 3) for t in times]} -> {rate:.0f} subsets/s; implied steps median {float(est.step.median()):.3f}")

    plain = dataclasses.replace(problem, u=torch.zeros_like(problem.u))  # what sklearn can express
    est_plain, times_plain = timed_estimate(plain, subsets, l2, args.repeats)
    rate_plain = m / statistics.median(times_plain)
    print(f"gradex estimate, offsets zeroed: {rate_plain:.0f} subsets/s")

    z_sk, sk_rate, sk_unconv = sklearn_fit(plain, subsets[:n_sklearn], l2)
    vs_sklearn = agreement(est_plain.loss[:n_sklearn], linear_loss(plain, z_sk), est_plain.z[:n_sklearn], z_sk)
    print(f"sklearn LogisticRegression per subset, offsets zeroed: {sk_rate:.2f} subsets/s on {n_sklearn} "
          f"subsets ({sk_unconv} hit max_iter); gradex vs sklearn: spearman {vs_sklearn['spearman']:.6f}, "
          f"max rel loss diff {vs_sklearn['max_rel_loss_diff']:.2e}, max rel z diff {vs_sklearn['max_rel_z_diff']:.2e}")

    idx = torch.linspace(0, m - 1, n_oracle).round().long()
    t0 = time.perf_counter()
    z_ref = torch.stack([exact_solve(problem, subsets[i], l2) for i in idx])
    oracle_rate = n_oracle / (time.perf_counter() - t0)
    vs_oracle = agreement(est.loss[idx], linear_loss(problem, z_ref), est.z[idx], z_ref)
    print(f"exact oracle with offsets (scipy L-BFGS-B float64): {oracle_rate:.2f} subsets/s on {n_oracle} subsets; "
          f"gradex vs oracle: spearman {vs_oracle['spearman']:.6f}, max rel loss diff "
          f"{vs_oracle['max_rel_loss_diff']:.2e}, max rel z diff {vs_oracle['max_rel_z_diff']:.2e}")

    est_tight, times_tight = timed_estimate(problem, subsets, l2, args.repeats, tol=TIGHT)
    rate_tight = m / statistics.median(times_tight)
    vs_oracle_tight = agreement(est_tight.loss[idx], linear_loss(problem, z_ref), est_tight.z[idx], z_ref)
    print(f"gradex estimate at tol={TIGHT} (default {TOL}): {rate_tight:.0f} subsets/s; vs oracle: max rel loss "
          f"diff {vs_oracle_tight['max_rel_loss_diff']:.2e}")

    load_after = os.getloadavg()
    result = {
        "subsets_per_s": round(rate, 1),
        "sklearn_subsets_per_s": round(sk_rate, 3),
        "speedup": round(rate / sk_rate, 1),
        "speedup_same_problem": round(rate_plain / sk_rate, 1),
        "spearman_vs_sklearn": round(vs_sklearn["spearman"], 6),
        "max_rel_diff_vs_sklearn": float(f"{vs_sklearn['max_rel_loss_diff']:.3e}"),
        "max_rel_z_diff_vs_sklearn": float(f"{vs_sklearn['max_rel_z_diff']:.3e}"),
        "spearman_vs_oracle": round(vs_oracle["spearman"], 6),
        "max_rel_diff_vs_oracle": float(f"{vs_oracle['max_rel_loss_diff']:.3e}"),
        "max_rel_z_diff_vs_oracle": float(f"{vs_oracle['max_rel_z_diff']:.3e}"),
        "l2": l2,
        "output_change": change,
        "tol": TOL,
        "tight": {"tol": TIGHT, "subsets_per_s": round(rate_tight, 1), "speedup": round(rate_tight / sk_rate, 1),
                  "max_rel_diff_vs_oracle": float(f"{vs_oracle_tight['max_rel_loss_diff']:.3e}")},
        "machine": describe(loadavg_1min_before_after=[round(load_before[0], 2), round(load_after[0], 2)]),
        "command": command("estimate.py", argv),
        "quick": args.quick,
        "problem": {"N": int(problem.x.shape[0]), "d": problem.dim, "n_sources": n, "V": int(problem.x_val.shape[0]),
                    "m": m, "subset_size": int(subsets[0].sum()), "p": p_dim, "theta_norm": theta_norm,
                    "gradient_scale": 4.0, "offsets": "N(1.5, 1.5)"},
        "timings_s": {"estimate_repeats": [round(t, 4) for t in times],
                      "estimate_zero_offsets_repeats": [round(t, 4) for t in times_plain],
                      "estimate_tight_repeats": [round(t, 4) for t in times_tight],
                      "setup_stats_calibration_anchor": round(t_setup, 3)},
        "sklearn_unconverged": sk_unconv,
        "oracle_subsets_per_s": round(oracle_rate, 3),
        "median_step": round(float(est.step.median()), 5),
        "notes": (
            f"subsets_per_s: gradex.estimate at its defaults on the problem with offsets, median of {len(times)} "
            f"runs over {m} subsets; per-problem statistics, calibration and the all-sources fit ({t_setup:.2f} s) are one-off and "
            f"excluded. l2 from calibrate_l2(output_change={change}), the default. sklearn_subsets_per_s: sklearn "
            f"LogisticRegression (lbfgs, fit_intercept=False, C=1/(2*l2), default tol, max_iter=1000) per subset, "
            f"timed on {n_sklearn} subsets, on the same features with offsets set to zero (sklearn cannot take "
            f"offsets); speedup = subsets_per_s / sklearn_subsets_per_s, speedup_same_problem uses gradex's rate "
            f"on the zero-offset problem. *_vs_sklearn: gradex on the zero-offset problem vs sklearn, on those "
            f"{n_sklearn} subsets (Spearman and max relative difference of the estimated target loss; z too). "
            f"*_vs_oracle: gradex with offsets vs scipy L-BFGS-B float64 (gtol 1e-10) on the exact objective, on "
            f"{n_oracle} subsets. Timings share the CPU with whatever else ran (see machine.loadavg)."),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
