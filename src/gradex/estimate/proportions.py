"""Proportions: the estimated target loss of a weighted mix, its gradient, and the proportions that
minimize it (docs/method.md, section 8).

A mix with proportions p (one share per group: the target's train split, group 0, and every source,
summing to 1) is fine-tuned by sampling its examples in those shares for the equal step budget. Its
modelled fit is the mean weighting's (problem.subset_l2), each group's examples weighted by the
group's share instead of its size:

    z_p = argmin_z  sum_g (p_g / N_g) sum_{s in g} softplus(-(u_s + x_s . z)) + (l2 / N) ||z||^2

(N: all training examples; l2: the all-sources fit's, as calibrated). Natural proportions p_g = N_g / N
give the all-sources fit, and a subset's natural proportions give that subset's estimate under the
mean weighting, so proportions extend the subset estimates rather than replace them. Times N, the
objective is the all-sources one with per-example weights a_g = N p_g / N_g and the same l2, which is
how it is computed here.

The estimate L(p) = mean_v softplus(-(u_v + x_v . z_p)) has an exact gradient in p by the implicit
function theorem at the fit: dz/da_g = -A^-1 c_g, A the objective's Hessian and c_g = sum_{s in g}
-sigma(-m_s) x_s, so dL/dp_g = -(N / N_g) (A^-1 grad L) . c_g: one solve per evaluation, whatever the
number of sources. `optimize` minimizes L over the simplex, under per-group caps and an optional
distance from a prior mix, with SLSQP (scipy) from several starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from gradex.estimate.linalg import cholesky, one_thread
from gradex.estimate.problem import Problem, check_l2, row_chunks


def sizes(problem: Problem) -> torch.Tensor:
    """N_g: the training examples of every group (0 = target train), float64."""
    return torch.bincount(problem.group, minlength=problem.n_sources + 1).double()


def natural(problem: Problem, members: torch.Tensor | None = None) -> torch.Tensor:
    """The proportions of a subset's examples pooled as they are (members: (n+1,) bool with the
    target's column; default all): each group's share is its size's."""
    n = sizes(problem)
    if members is not None:
        n = n * members.double()
    if not n.sum() > 0:
        raise ValueError("natural proportions of a mix with no training examples")
    return n / n.sum()


def _check(problem: Problem, p: torch.Tensor) -> torch.Tensor:
    p = torch.as_tensor(p, dtype=torch.float64).reshape(-1)
    if p.shape != (problem.n_sources + 1,):
        raise ValueError(f"proportions must be ({problem.n_sources + 1},), one per group, got {tuple(p.shape)}")
    if bool((p < -1e-12).any()) or abs(float(p.sum()) - 1) > 1e-6:
        raise ValueError(f"proportions must be non-negative and sum to 1, got sum {float(p.sum()):.6g}")
    if float(p[sizes(problem) == 0].abs().sum()) > 1e-12:
        raise ValueError("proportions give a share to a group with no training examples")
    return p.clamp_min(0)


def _pass(problem: Problem, a: torch.Tensor, z: torch.Tensor, l2: float,
          hessian: bool) -> tuple[float, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One streaming pass at z of the objective with per-group example weights a ((n+1,)): its value,
    gradient, Hessian without the 2 l2 I (if asked), and every group's c_g (unweighted), float64."""
    d = problem.dim
    f = l2 * float(z.dot(z))
    H = torch.zeros(d, d, dtype=torch.float64) if hessian else None
    c = torch.zeros(problem.n_sources + 1, d, dtype=torch.float64)
    for xc, uc, gc in row_chunks(problem):
        x = xc.double()
        m = uc.double() + x @ z
        w = a[gc]
        f += float((w * torch.nn.functional.softplus(-m)).sum())
        r = torch.sigmoid(-m)
        c.index_add_(0, gc, x * (-r)[:, None])
        if hessian:
            H.addmm_((x * (w * r * torch.sigmoid(m))[:, None]).T, x)
    return f, 2 * l2 * z + a @ c, H, c


def _solve(H: torch.Tensor, l2: float, g: torch.Tensor) -> torch.Tensor:
    A = H.clone()
    A.diagonal().add_(2 * l2)
    with one_thread():  # MKL's threads on one 256 x 256 factor collapse under load (linalg.one_thread)
        return torch.cholesky_solve(g[:, None], cholesky(A)).squeeze(1)


@dataclass
class Fit:
    """The fit of one weighted mix and what its gradient needs."""

    z: torch.Tensor  # (d,)
    loss: float  # the linear estimate of the target validation loss
    gradient: torch.Tensor  # (n+1,) dL/dp (0 for empty groups)
    iterations: int


def fit(problem: Problem, p: torch.Tensor, l2: float, z0: torch.Tensor | None = None,
        tol: float = 1e-12, max_iter: int = 50) -> Fit:
    """The fit z_p of proportions p by damped Newton in float64 (from z0 when given: a nearby mix's),
    its linear estimate and the estimate's gradient in p."""
    l2 = check_l2(l2)
    p = _check(problem, p)
    n_g = sizes(problem)
    a = torch.where(n_g > 0, n_g.sum() * p / n_g.clamp_min(1), torch.zeros_like(p))
    z = torch.zeros(problem.dim, dtype=torch.float64) if z0 is None else z0.double().clone()
    f, g, H, c = _pass(problem, a, z, l2, True)
    for it in range(1, max_iter + 1):
        step = _solve(H, l2, g)
        dec = float(g.dot(step))
        if dec <= 2 * tol * max(abs(f), 1e-300):
            break
        t = 1.0
        for _ in range(60):  # Armijo backtracking: monotone far from the optimum
            fn, gn, Hn, cn = _pass(problem, a, z - t * step, l2, True)
            if fn <= f - 1e-4 * t * dec:
                break
            t *= 0.5
        else:
            break  # no decrease representable in float64: at the optimum to working precision
        z, f, g, H, c = z - t * step, fn, gn, Hn, cn
    margins = problem.u_val.double() + problem.x_val.double() @ z
    loss = float(torch.nn.functional.softplus(-margins).mean())
    grad_loss = (problem.x_val.double() * (-torch.sigmoid(-margins))[:, None]).mean(0)
    v = _solve(H, l2, grad_loss)
    gradient = torch.where(n_g > 0, -(n_g.sum() / n_g.clamp_min(1)) * (c @ v), torch.zeros_like(p))
    return Fit(z=z, loss=loss, gradient=gradient, iterations=it)


@dataclass
class Optimum:
    """The proportions `optimize` found."""

    p: torch.Tensor  # (n+1,) float64, on the simplex
    loss: float
    start: str  # the start it was reached from
    starts: dict[str, float]  # every start's estimate at its own optimum
    evaluations: int  # fits, over all starts


def feasible(upper: torch.Tensor, prior: torch.Tensor | None = None, max_shift: float | None = None,
             lower: torch.Tensor | None = None) -> str | None:
    """Why no proportions meet the caps and floors (and the distance from the prior), or None when some do."""
    if float(upper.sum()) < 1 - 1e-9:
        return f"the caps sum to {float(upper.sum()):.4f} < 1"
    if lower is not None:
        if float(lower.sum()) > 1 + 1e-9:
            return f"the floors sum to {float(lower.sum()):.4f} > 1"
        if bool((lower > upper + 1e-12).any()):
            return "a floor lies above its cap"
    if prior is not None and max_shift is not None:
        # the least total variation that brings the prior into the box: the mass above the caps must
        # leave and the mass missing below the floors must arrive, one move each where they pair
        over = float((prior - upper).clamp_min(0).sum())
        under = 0.0 if lower is None else float((lower - prior).clamp_min(0).sum())
        if max(over, under) > max_shift + 1e-9:
            return (f"the caps and floors force a shift of at least {max(over, under):.4f} from the prior, "
                    f"above max_shift {max_shift:g}")
    return None


def optimize(problem: Problem, l2: float, upper: torch.Tensor | None = None,
             starts: dict[str, torch.Tensor] | None = None, prior: torch.Tensor | None = None,
             max_shift: float | None = None, tol: float = 1e-10, max_iter: int = 200,
             default_starts: bool = True, lower: torch.Tensor | None = None) -> Optimum:
    """Proportions on the simplex with the lowest estimate L(p).

    upper: (n+1,) caps on each share (a source's examples may repeat only so often in the budget);
    lower: (n+1,) floors (the target's share in the best subset: `gradex.selection.weights`);
    prior and max_shift: the total variation distance sum |p - prior| / 2 at most max_shift.
    L is not convex in p (each fit is, the loss of its fit need not be), so SLSQP runs from several
    starts: natural proportions, equal shares, and the given `starts` (a subset's natural
    proportions: the best subset's estimate is then a bound the result never exceeds), each clipped
    into the caps (default_starts False: the given starts alone, as a resample near a known optimum
    needs). The lowest optimum wins."""
    from scipy.optimize import minimize

    n_g = sizes(problem)
    live = (n_g > 0).nonzero().squeeze(1)  # groups with examples: the variables
    k = live.numel()
    if k == 0:
        raise ValueError("proportions of a pool with no training examples")
    ub = torch.ones_like(n_g) if upper is None else torch.as_tensor(upper, dtype=torch.float64).clamp(0, 1)
    lb = torch.zeros_like(n_g) if lower is None else torch.as_tensor(lower, dtype=torch.float64).clamp(0, 1)
    if prior is not None and bool((torch.as_tensor(prior, dtype=torch.float64)[n_g == 0] > 0).any()):
        raise ValueError("the prior gives a share to a group with no training examples")
    why = feasible(ub[live], None if prior is None else prior[live], max_shift, lb[live])
    if why is not None:
        raise ValueError(f"no proportions meet the constraints: {why}")
    evaluations = 0
    warm: dict[str, torch.Tensor] = {}

    def full(x: np.ndarray) -> torch.Tensor:
        p = torch.zeros_like(n_g)
        p[live] = torch.from_numpy(np.clip(x[:k], 0, None))
        return p / p.sum()

    def objective(x: np.ndarray) -> tuple[float, np.ndarray]:
        nonlocal evaluations
        evaluations += 1
        found = fit(problem, full(x), l2, warm.get("z"))
        warm["z"] = found.z
        grad = np.zeros_like(x)
        # the renormalization in `full` is the identity on the simplex; its gradient there is the
        # projection of dL/dp onto sum-zero directions, which SLSQP's equality constraint handles
        grad[:k] = found.gradient[live].numpy()
        return found.loss, grad

    bounds = [(float(lo), float(u)) for lo, u in zip(lb[live], ub[live])]
    constraints = [{"type": "eq", "fun": lambda x: np.array([x[:k].sum() - 1.0]),
                    "jac": lambda x: np.concatenate([np.ones(k), np.zeros(len(x) - k)])[None]}]
    if prior is not None and max_shift is not None:
        q = prior[live].numpy()
        bounds += [(0.0, None)] * k  # t_g >= |p_g - q_g|, sum t_g <= 2 max_shift
        eye = np.eye(k)
        constraints += [
            {"type": "ineq", "fun": lambda x: x[k:] - (x[:k] - q), "jac": lambda x: np.hstack([-eye, eye])},
            {"type": "ineq", "fun": lambda x: x[k:] + (x[:k] - q), "jac": lambda x: np.hstack([eye, eye])},
            {"type": "ineq", "fun": lambda x: np.array([2 * max_shift - x[k:].sum()]),
             "jac": lambda x: np.concatenate([np.zeros(k), -np.ones(k)])[None]}]
    candidates = {"natural": n_g / n_g.sum(), "equal": (n_g > 0).double() / k} if default_starts else {}
    candidates.update(starts or {})
    if not candidates:
        raise ValueError("optimize: no start (default_starts is False and no starts given)")
    if prior is not None and default_starts:
        candidates["prior"] = prior
    results: dict[str, tuple[float, torch.Tensor]] = {}
    for name, p0 in candidates.items():
        x0 = _into(p0[live].numpy(), ub[live].numpy(), lb[live].numpy())
        if prior is not None and max_shift is not None:
            x0 = _toward(x0, prior[live].numpy(), max_shift)
            x0 = np.concatenate([x0, np.abs(x0 - prior[live].numpy())])
        warm.pop("z", None)
        with np.errstate(all="ignore"):
            res = minimize(objective, x0, jac=True, method="SLSQP", bounds=bounds, constraints=constraints,
                           options={"ftol": tol, "maxiter": max_iter})
        p = _into(np.asarray(res.x[:k]), ub[live].numpy(), lb[live].numpy())
        if prior is not None and max_shift is not None:
            p = _toward(p, prior[live].numpy(), max_shift)
        results[name] = (fit(problem, full(p), l2).loss, full(p))
        evaluations += 1
    best = min(results, key=lambda name: results[name][0])
    return Optimum(p=results[best][1], loss=results[best][0], start=best,
                   starts={name: v for name, (v, _) in results.items()}, evaluations=evaluations)


def _into(x: np.ndarray, ub: np.ndarray, lb: np.ndarray | None = None) -> np.ndarray:
    """The point of {lb <= x <= ub, sum x = 1} closest to x (Euclidean), by bisection on the shift:
    SLSQP's answer is feasible only to its tolerance, and a start need not be feasible at all."""
    lb = np.zeros_like(ub) if lb is None else lb
    lo, hi = float((x - ub).min()) - 1, float((x - lb).max()) + 1
    for _ in range(200):
        mid = (lo + hi) / 2
        if np.clip(x - mid, lb, ub).sum() > 1:
            lo = mid
        else:
            hi = mid
    out = np.clip(x - (lo + hi) / 2, lb, ub)
    return out / out.sum()


def _toward(x: np.ndarray, q: np.ndarray, max_shift: float) -> np.ndarray:
    """x moved along the segment to the prior q until its total variation distance from q is at most
    max_shift (both on the simplex within the caps, so every point between them is too)."""
    tv = float(np.abs(x - q).sum()) / 2
    if tv <= max_shift or tv == 0:
        return x
    lam = max_shift / tv
    return q + lam * (x - q)


def rounded(p: torch.Tensor, floor: float, upper: torch.Tensor | None = None,
            lower: torch.Tensor | None = None, prior: torch.Tensor | None = None,
            max_shift: float | None = None) -> torch.Tensor:
    """Proportions with every share below `floor` set to 0 and the rest renormalized within the caps
    `upper`: a source given half a percent is noise of the optimizer, not a recommendation to read.
    A share with a floor of its own (`lower` > 0) is kept, and renormalizing only raises it.
    Where the kept shares cannot absorb the dropped ones within their caps, or the rounded shares
    would lie further than `max_shift` from `prior` (an optimum on that boundary moves off it), p is
    returned as it is: the constraints the user set outrank tidy numbers."""
    if not 0 <= floor < 1:
        raise ValueError(f"floor must be in [0, 1), got {floor}")
    keep = p >= floor
    if lower is not None:
        keep |= torch.as_tensor(lower, dtype=torch.float64) > 0
    if not bool(keep.any()):
        keep = p == p.max()
    ub = torch.ones_like(p) if upper is None else torch.as_tensor(upper, dtype=torch.float64)
    ub = torch.where(keep, ub, torch.zeros_like(ub))
    if float(ub.sum()) < 1 - 1e-9:
        return p
    kept = torch.where(keep, p, torch.zeros_like(p))
    kept = kept / kept.sum()
    if not bool((kept <= ub + 1e-12).all()):
        lb = None if lower is None else torch.as_tensor(lower, dtype=torch.float64).numpy()
        kept = torch.from_numpy(_into(kept.numpy(), ub.numpy(), lb))
    if prior is not None and max_shift is not None and float((kept - prior).abs().sum()) / 2 > max_shift + 1e-9:
        return p
    return kept


def counts(p: torch.Tensor | list[float], total: int) -> list[int]:
    """Example counts summing to `total` in proportions p, by largest remainder (Hamilton)."""
    p = np.asarray(p, dtype=np.float64)
    if total < 0 or not math.isclose(float(p.sum()), 1.0, abs_tol=1e-6):
        raise ValueError("counts: proportions must sum to 1 and the total be non-negative")
    raw = p / p.sum() * total  # exactly 1, or the floors alone can pass `total` (a sum of 1 + 1e-7 at 10^7)
    out = np.floor(raw).astype(np.int64)
    short = total - int(out.sum())
    order = np.argsort(-(raw - out), kind="stable")
    out[order[:short]] += 1
    return out.tolist()
