"""Estimate the fine-tuned target loss f(S) for many subsets S of auxiliary sources at once.

GradEx (docs/method.md, section 3 "Estimates") replaces fine-tuning on the data D_S of a subset S
by a d-dimensional logistic regression on projected per-example gradients x_s with per-example
offsets u_s:

    z_S = argmin_z  sum_{s in D_S} softplus(-(u_s + x_s . z)) + l2 * ||z||^2

(every label positive, no intercept; D_S = target train (group 0) plus the sources in S). The
*linear estimate* of the target loss is the mean of softplus(-(u_v + x_v . z_S)) over the target
validation examples v.

    problem    the Problem (training rows by group, validation rows), its statistics, and what a fit
               z implies: linear_loss, implied_step, implied_output_change, subset_l2
    solver     the batched solver: solve, solve_flagged, estimate, estimator (Estimates)
    calibrate  calibrate_l2, and the exact damped-Newton fit of one subset it (and the solver's
               anchor) uses
    linalg     single-threaded LAPACK and the robust Cholesky they share
"""

from gradex.estimate.calibrate import calibrate_l2
from gradex.estimate.linalg import JITTER
from gradex.estimate.problem import (WEIGHTINGS, Problem, exact_coordinates, implied_output_change, implied_step,
                                     linear_loss, subset_l2)
from gradex.estimate.solver import REFINEMENTS, TOL, Estimates, estimate, estimator, solve, solve_flagged

__all__ = [
    "Problem",
    "Estimates",
    "solve",
    "solve_flagged",
    "estimate",
    "estimator",
    "subset_l2",
    "linear_loss",
    "implied_step",
    "implied_output_change",
    "calibrate_l2",
    "exact_coordinates",
    "TOL",
    "REFINEMENTS",
    "WEIGHTINGS",
    "JITTER",
]
