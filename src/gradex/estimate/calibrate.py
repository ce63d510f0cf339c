"""l2 calibration: the l2 at which the exact all-sources fit moves by a requested amount, and that
exact fit itself (damped Newton in float64, robust at any l2)."""

from __future__ import annotations

import math
import warnings

import torch

from gradex.estimate.linalg import cholesky, one_thread
from gradex.estimate.problem import (Problem, implied_output_change, implied_step, row_chunks, second_moment,
                                     stats_at_zero)


def _top_curvature(problem: Problem) -> float:
    """An upper bound on the largest eigenvalue of any subset's Hessian: H(z) <= X^T X / 4 (each
    weight sigma(m) sigma(-m) is at most 1/4). Cached."""
    if "top" not in problem._cache:
        with one_thread():
            problem._cache["top"] = float(torch.linalg.eigvalsh(second_moment(problem))[-1]) * problem.x.shape[0] / 4
    return problem._cache["top"]


def _hessian_dtype(problem: Problem, l2: float) -> torch.dtype:
    """float32 for Newton's Hessian when its rounding is far below 2 l2 (then it only perturbs the
    direction by ~1e-6 relative: the line search and the float64 gradient decide where the iteration
    stops, and float32 products run twice as fast from the store's float32 rows, with no copy);
    float64 for an l2 so small that float32 could not resolve H + 2 l2 I."""
    resolves = 2 * l2 >= 100 * problem.dim * torch.finfo(torch.float32).eps * _top_curvature(problem)
    return torch.float32 if resolves else torch.float64


def _pass(problem: Problem, rows: torch.Tensor | None, z: torch.Tensor, l2: float, gradient: bool,
          hessian: bool = False, dtype: torch.dtype = torch.float64
          ) -> tuple[float, torch.Tensor | None, torch.Tensor | None]:
    """One streaming pass over the kept rows at z: the objective, its gradient (float64) if asked,
    and its Hessian (in `dtype`, without the 2 l2 I) if asked. Without the Hessian a pass costs
    ~4 N d operations instead of ~2 N d^2: d / 2 times less."""
    f = l2 * float(z.dot(z))
    d = problem.dim
    g = 2 * l2 * z if gradient else None
    H = torch.zeros(d, d, dtype=dtype) if hessian else None
    for xc, uc, _ in row_chunks(problem, rows):
        x64 = xc.double()
        m = uc.double() + x64 @ z
        f += float(torch.nn.functional.softplus(-m).sum())
        if gradient:
            g -= torch.sigmoid(-m) @ x64
        if hessian:
            w = (torch.sigmoid(m) * torch.sigmoid(-m)).to(dtype)
            xd = xc.to(dtype)
            H.addmm_((xd * w[:, None]).T, xd)
    return f, g, H


# A step that shrinks the Newton decrement by less than this factor says the Hessian in use has gone
# stale: it is recomputed at the current point (a contraction of ~0.3 or worse per step).
STALE = 0.1


class UnconvergedFit(RuntimeWarning):
    """An exact fit stopped at its iteration cap short of Newton's stopping rule: what is built on it
    (an l2, the solver's anchor) is less accurate than it says."""


def exact_fit(problem: Problem, members: torch.Tensor, l2: float, z0: torch.Tensor | None = None,
              tol: float = 1e-12, max_iter: int = 100, carry: dict | None = None) -> torch.Tensor:
    """Exact damped Newton for one subset in float64 (robust at any l2; used by calibrate_l2 and the
    solver's anchor).

    members: (n+1,) bool including the target column. Stops when the Newton decrement g.H^-1.g/2
    falls below tol * |objective| (beyond that, float64 objective values cannot rank steps). Reads
    the rows in chunks (`row_chunks`), one pass per step.

    The Hessian is the expensive part of a pass (d / 2 times the rest), and a nearby one steers
    almost as well: steps reuse it while each shrinks the decrement at least `STALE`-fold, and it is
    recomputed at the current point otherwise (a chord method whose stopping rule is Newton's, so
    the answer is the same). `carry` (a dict) hands the last Hessian of one fit to the next fit of the
    same subset: calibrate_l2's fits at nearby l2 and the anchor then mostly take cheap passes.

    A fit that meets no stopping rule within `max_iter` steps warns (UnconvergedFit); one whose
    objective or point is not finite raises FloatingPointError (a non-finite store or l2).
    """
    keep = members[problem.group]
    rows = None if bool(keep.all()) else keep.nonzero().squeeze(1)
    key = tuple(bool(v) for v in members.tolist())
    z = torch.zeros(problem.dim, dtype=torch.float64) if z0 is None else z0.double().clone()
    hd = _hessian_dtype(problem, l2)
    H = carry.get("H") if carry is not None and carry.get("members") == key else None
    fresh = H is None
    f, g, Hn = _pass(problem, rows, z, l2, True, fresh, hd)
    H = Hn if fresh else H.to(hd)
    last_dec, dec = math.inf, math.nan
    for _ in range(max_iter):
        if not math.isfinite(f):
            raise FloatingPointError(f"exact fit at l2={l2:.3g}: the objective is {f} (non-finite gradients in "
                                     f"the store, or an l2 out of range)")
        A = H.double()
        A.diagonal().add_(2 * l2)
        with one_thread():
            step = torch.cholesky_solve(g[:, None], cholesky(A)).squeeze(1)
        dec = float(g.dot(step))
        if dec <= 2 * tol * max(abs(f), 1e-300):
            z = z - step  # already in the quadratic regime: the full step is the best one
            break
        if not fresh and dec > STALE * last_dec:  # the carried or reused Hessian steers poorly: renew it
            f, g, H = _pass(problem, rows, z, l2, True, True, hd)
            fresh, last_dec = True, math.inf
            continue
        t, accepted = 1.0, None
        for _ls in range(60):  # Armijo backtracking keeps the iteration monotone far from the optimum
            zn = z - t * step
            fn, gn, _ = _pass(problem, rows, zn, l2, True)  # the gradient costs little beside the pass
            if fn <= f - 1e-4 * t * dec:
                accepted = (zn, fn, gn)
                break
            t *= 0.5
        if accepted is None:
            if not fresh:  # a stale Hessian's step: renew it before concluding anything
                f, g, H = _pass(problem, rows, z, l2, True, True, hd)
                fresh, last_dec = True, math.inf
                continue
            break  # no decrease representable in float64: at the optimum to working precision
        z, f, g = accepted
        fresh, last_dec = False, dec
    else:
        warnings.warn(UnconvergedFit(f"exact fit of a {int(members.sum()) - 1}-source subset at l2={l2:.3g} "
                                     f"stopped after {max_iter} steps, Newton decrement {dec:.3g} above "
                                     f"tol {tol:g} x |objective|"), stacklevel=2)
    if carry is not None:
        carry.update(members=key, H=H)
    return z


def _smallest_l2(problem: Problem) -> float:
    """The smallest l2 at which the all-sources fit's Hessian H(z) + 2 l2 I is nonsingular in float64
    at every z: H(z) <= X^T X / 4 (each weight sigma(m) sigma(-m) is at most 1/4), and a float64
    Cholesky resolves condition numbers up to about 1 / (d eps)."""
    top = _top_curvature(problem)
    return max(top * problem.dim * torch.finfo(torch.float64).eps / 2, torch.finfo(torch.float64).tiny)


def calibrate_l2(problem: Problem, step_size: float | None = None, *, output_change: float | None = None,
                 rtol: float = 1e-4, progress: bool = False) -> float:
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
    `progress`: a bar counting the exact fits (each a few passes over the rows), on stderr.
    """
    from tqdm.auto import tqdm

    with tqdm(desc="calibrating l2 (exact fits)", unit="fit", leave=False, disable=not progress) as bar:
        return _calibrate(problem, step_size, output_change, rtol, bar)


def _calibrate(problem: Problem, step_size: float | None, output_change: float | None, rtol: float, bar) -> float:
    """calibrate_l2's search; `bar` counts its exact fits."""
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
        evals, vecs = torch.linalg.eigh(st["H"])
    coef = vecs.T @ st["b"]
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
    carry = problem._cache.setdefault("carry", {})  # the last exact fit's Hessian, for the next fit

    def log_ratio(log_l2: float) -> float:
        z0 = warm[min(warm, key=lambda k: abs(k - log_l2))] if warm else None
        z = exact_fit(problem, members, math.exp(log_l2), z0, carry=carry)
        bar.update(1)
        warm[log_l2] = z
        problem._cache["warm"] = warm  # the solver's anchor (this fit at the chosen l2) starts from here
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
