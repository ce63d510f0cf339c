"""Test oracles for gradex.estimate: slow reference implementations, independent of the batched
code, and a synthetic problem with a known answer. Shared by the tests and the benchmarks (a module
of the package, so a benchmark needs no path into tests/); not part of gradex's API."""

from __future__ import annotations

import math

import torch

from gradex.estimate import Problem
from gradex.estimate.problem import check_l2, full_membership


def exact_solve(problem: Problem, members: torch.Tensor, l2: float, *, gtol: float = 1e-10) -> torch.Tensor:
    """Reference fit for ONE subset by scipy L-BFGS in float64 on the exact objective.

    Slow (one scipy run per subset) and independent of the batched code: tests and benchmarks use
    it as the oracle. members: (n,) bool sources (target train is always included). Returns (d,) float64.
    """
    import numpy as np
    from scipy.optimize import minimize

    l2 = check_l2(l2)
    full = full_membership(problem, torch.as_tensor(members).reshape(1, -1))[0]
    keep = full[problem.group].numpy()
    X = problem.x.double().numpy()[keep]
    U = problem.u.double().numpy()[keep]

    def fun(z: np.ndarray) -> tuple[float, np.ndarray]:
        mg = U + X @ z
        loss = np.logaddexp(0.0, -mg).sum() + l2 * z @ z
        grad = -(X.T @ (0.5 * (1.0 - np.tanh(0.5 * mg)))) + 2 * l2 * z  # sigma(-mg), overflow-safe
        return float(loss), grad

    res = minimize(fun, np.zeros(problem.dim), jac=True, method="L-BFGS-B",
                   options=dict(maxiter=20000, maxfun=40000, gtol=gtol, ftol=1e-16, maxcor=30))
    return torch.from_numpy(res.x)


def synthetic_problem(n_sources: int = 30, n_train: int = 20_000, d: int = 256, n_val: int = 500,
                      seed: int = 0, n_helpful: int | None = None, n_harmful: int | None = None,
                      scale: float = 1.0, target_frac: float = 0.1,
                      p: int | None = None, theta_norm: float = 1.0) -> tuple[Problem, dict]:
    """A random problem shaped like real ones, with a known answer, for tests and benchmarks.

    Offsets u ~ N(1.5, 1.5) (mean log-odds of a partly trained model). The target's gradients share
    a direction `t`; helpful sources' means point along t (fitting them lowers the target loss),
    harmful ones against it, the rest are orthogonal noise. Returns (problem, info) with info
    listing the 0-based helpful / harmful source columns. `p` sets col_sq_norms = p/d (a p-dim
    gradient projected to d dims by a +-1/sqrt(d) projection).
    """
    g = torch.Generator().manual_seed(seed)
    n_helpful = n_sources // 3 if n_helpful is None else n_helpful
    n_harmful = n_sources // 3 if n_harmful is None else n_harmful
    t = torch.randn(d, generator=g)
    t /= t.norm()
    n_target = max(1, int(round(target_frac * n_train))) if n_sources else n_train
    sizes = torch.full((n_sources,), (n_train - n_target) // max(n_sources, 1), dtype=torch.long)
    group = torch.cat([torch.zeros(n_target, dtype=torch.long)]
                      + [torch.full((int(sz),), i + 1, dtype=torch.long) for i, sz in enumerate(sizes)])
    N = group.numel()
    means = torch.zeros(n_sources + 1, d)
    means[0] = 1.0 * t
    perm = torch.randperm(n_sources, generator=g)
    helpful = sorted(perm[:n_helpful].tolist())
    harmful = sorted(perm[n_helpful:n_helpful + n_harmful].tolist())
    for j in range(n_sources):
        noise = torch.randn(d, generator=g)
        noise -= noise.dot(t) * t
        noise = noise / noise.norm() * 0.8
        align = 0.0
        if j in helpful:
            align = float(torch.empty(1).uniform_(0.4, 1.0, generator=g))
        elif j in harmful:
            align = -float(torch.empty(1).uniform_(0.4, 1.0, generator=g))
        means[j + 1] = align * t + noise
    x = (means[group] + torch.randn(N, d, generator=g) / math.sqrt(d) * 2.0) * scale
    u = 1.5 + 1.5 * torch.randn(N, generator=g)
    x_val = (means[0] + torch.randn(n_val, d, generator=g) / math.sqrt(d) * 2.0) * scale
    u_val = 1.5 + 1.5 * torch.randn(n_val, generator=g)
    c = None if p is None else torch.full((d,), p / d)
    prob = Problem(x=x.float(), u=u.float(), group=group, x_val=x_val.float(), u_val=u_val.float(),
                   n_sources=n_sources, col_sq_norms=c, theta_norm=theta_norm)
    return prob, {"helpful": helpful, "harmful": harmful}
