"""l2 calibration: the l2 at which the exact all-sources fit moves by a requested amount, and that
exact fit itself (damped Newton in float64, robust at any l2)."""

from __future__ import annotations

import math

import torch

from gradex.estimate.linalg import cholesky, one_thread
from gradex.estimate.problem import Problem, implied_output_change, implied_step, second_moment, stats_at_zero


def exact_fit(problem: Problem, members: torch.Tensor, l2: float, z0: torch.Tensor | None = None,
                   tol: float = 1e-12, max_iter: int = 100) -> torch.Tensor:
    """Exact damped Newton for one subset in float64 (robust at any l2; used by calibrate_l2).

    members: (n+1,) bool including the target column. Stops when the Newton decrement g.H^-1.g/2
    falls below tol * |objective| (beyond that, float64 objective values cannot rank steps).
    """
    keep = members[problem.group]
    X = problem.x[keep].double()
    U = problem.u[keep].double()
    z = torch.zeros(problem.dim, dtype=torch.float64) if z0 is None else z0.double().clone()

    def objective(zz: torch.Tensor) -> float:
        return float(torch.nn.functional.softplus(-(U + X @ zz)).sum() + l2 * zz.dot(zz))

    f = objective(z)
    for _ in range(max_iter):
        mg = U + X @ z
        g = -(torch.sigmoid(-mg) @ X) + 2 * l2 * z
        w = torch.sigmoid(mg) * torch.sigmoid(-mg)
        Hm = (X.T * w) @ X
        Hm.diagonal().add_(2 * l2)
        with one_thread():
            step = torch.cholesky_solve(g[:, None], cholesky(Hm)).squeeze(1)
        dec = float(g.dot(step))
        if dec <= 2 * tol * max(abs(f), 1e-300):
            z = z - step  # already in the quadratic regime: the full step is the best one
            break
        t = 1.0
        for _ls in range(60):  # Armijo backtracking keeps the iteration monotone far from the optimum
            zn = z - t * step
            fn = objective(zn)
            if fn <= f - 1e-4 * t * dec:
                break
            t *= 0.5
        else:
            break  # no decrease representable in float64: at the optimum to working precision
        z, f = zn, fn
    return z


def _smallest_l2(problem: Problem) -> float:
    """The smallest l2 at which the all-sources fit's Hessian H(z) + 2 l2 I is nonsingular in float64
    at every z: H(z) <= X^T X / 4 (each weight sigma(m) sigma(-m) is at most 1/4), and a float64
    Cholesky resolves condition numbers up to about 1 / (d eps)."""
    with one_thread():
        top = float(torch.linalg.eigvalsh(second_moment(problem))[-1]) * problem.x.shape[0] / 4
    return max(top * problem.dim * torch.finfo(torch.float64).eps / 2, torch.finfo(torch.float64).tiny)


def calibrate_l2(problem: Problem, step_size: float | None = None, *, output_change: float | None = None,
                 rtol: float = 1e-4) -> float:
    """The l2 at which the all-sources fit moves by the requested amount, given as exactly one of:

    - `output_change`: the root-mean-square change x_s . z of the training examples' outputs u_s
      (log-odds). It does not depend on the projection (its dimension, kind or preconditioner),
      because x_s . z is the predicted change of u_s whatever direction z stands for, and a user can
      measure it on a real fine-tune (`gradex validate` does).
    - `step_size`: ||P z|| / ||theta*||, the weight change as a fraction of the trainable weights.
      A random d-dimensional subspace needs a much longer step than a real fine-tune for the same
      change of the outputs, so the right value depends on d and on the preconditioner.

    Why a size at all: l2 has no natural unit (it depends on the gradient scale and the projection).
    Both sizes decrease monotonically in l2. The one-Newton-step answer has a closed form in the
    eigenbasis of H_all, which gives a starting guess for free; the exact all-sources optimum (damped
    Newton, float64) is then matched by Brent's method on log l2 to relative accuracy `rtol`, so
    well-converged estimates of the all-sources subset move by exactly the requested amount.
    """
    from scipy.optimize import brentq

    if (step_size is None) == (output_change is None):
        raise ValueError("calibrate_l2: give exactly one of step_size or output_change")
    target = step_size if step_size is not None else output_change
    label = "step_size" if step_size is not None else "output_change"
    if not target > 0 or not math.isfinite(target):
        raise ValueError(f"{label} must be a positive number, got {target}")
    st = stats_at_zero(problem)
    d = problem.dim
    members = torch.ones(problem.n_sources + 1, dtype=torch.bool)
    with one_thread():
        evals, vecs = torch.linalg.eigh(st["H"].sum(0).view(d, d))
    coef = vecs.T @ st["b"].sum(0)
    # b lies in the span of the training gradients, i.e. in the range of H_all; its components along
    # (numerically) null eigenvectors are rounding noise, which a tiny l2 would amplify into a huge z
    # whose size is then lost to cancellation. Dropping them is exact in exact arithmetic.
    coef = torch.where(evals > evals.abs().max() * d * torch.finfo(evals.dtype).eps, coef, 0.0)
    if float(coef.norm()) == 0.0:
        raise ValueError("calibrate_l2: the all-sources fit does not move (the gradient sum is zero); give l2 explicitly")

    def size(z: torch.Tensor) -> float:
        return float((implied_step if step_size is not None else implied_output_change)(problem, z)[0])

    def one_step_log_ratio(log_l2: float) -> float:
        z = vecs @ (coef / (evals.clamp_min(0) + 2 * math.exp(log_l2)))
        return math.log(max(size(z), 1e-300) / target)

    scale = max(float(evals.clamp_min(0).mean()), 1e-30)  # natural unit of l2: mean curvature
    lo, hi = math.log(scale) - 80.0, math.log(scale) + 80.0
    if one_step_log_ratio(hi) > 0 or one_step_log_ratio(lo) < 0:
        raise ValueError(f"calibrate_l2: {label}={target} is out of reach for l2 in "
                         f"[{math.exp(lo):.3g}, {math.exp(hi):.3g}]; give l2 explicitly")
    guess = brentq(one_step_log_ratio, lo, hi, xtol=1e-3)

    warm: dict[float, torch.Tensor] = {}

    def log_ratio(log_l2: float) -> float:
        z0 = warm[min(warm, key=lambda k: abs(k - log_l2))] if warm else None
        z = exact_fit(problem, members, math.exp(log_l2), z0)
        warm[log_l2] = z
        return math.log(max(size(z), 1e-300) / target)

    # Below `floor` the exact fit's Hessian is singular in float64: widening there would solve a
    # singular system instead of finding the answer, so the bracket stops at it.
    floor, ceiling = math.log(_smallest_l2(problem)), hi
    guess = min(max(guess, floor), ceiling)
    width = 0.25
    lo, hi = max(guess - width, floor), min(guess + width, ceiling)
    f_lo, f_hi = log_ratio(lo), log_ratio(hi)
    while not f_lo >= 0 >= f_hi:  # widen until the bracket holds the exact answer (the size falls as l2 grows)
        if f_lo < 0 and lo == floor:
            raise ValueError(f"calibrate_l2: {label}={target} is more than the all-sources fit reaches: "
                             f"{target * math.exp(f_lo):.4g} at l2={math.exp(floor):.3g}, the smallest l2 at "
                             f"which its Hessian is not singular in float64; ask for less or give l2 explicitly")
        if f_hi > 0 and hi == ceiling:
            raise ValueError(f"calibrate_l2: {label}={target} is less than the all-sources fit moves even at "
                             f"l2={math.exp(ceiling):.3g}; give l2 explicitly")
        width *= 2
        if f_lo < 0:
            lo = max(guess - width, floor)
            f_lo = log_ratio(lo)
        if f_hi > 0:
            hi = min(guess + width, ceiling)
            f_hi = log_ratio(hi)
    if f_lo == 0:
        return math.exp(lo)
    if f_hi == 0:
        return math.exp(hi)
    return math.exp(brentq(log_ratio, lo, hi, xtol=rtol * 0.1, rtol=1e-12))
