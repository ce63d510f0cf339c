"""Estimate the fine-tuned target loss f(S) for many subsets S of auxiliary sources at once.

GradEx (METHOD.md, Step 3) replaces fine-tuning on the data D_S of a subset S by a d-dimensional
logistic regression on projected per-example gradients x_s with per-example offsets u_s:

    z_S = argmin_z  sum_{s in D_S} softplus(-(u_s + x_s . z)) + l2 * ||z||^2

(every label positive, no intercept; D_S = target train (group 0) plus the sources in S). The
*linear estimate* of the target loss is the mean of softplus(-(u_v + x_v . z_S)) over the target
validation examples v.

Why this is fast: one Newton step from z = 0 needs only per-group sums (H_i, b_i), so a batch of
subsets costs one (m, n+1) @ (n+1, d*d) product plus m Cholesky factorizations, independent of
the number of examples. The one-step answer is then refined with a few preconditioned gradient
steps that reuse that factorization (a "chord" Newton method); their gradient is computed for the
whole batch with dense products, group by group for the subsets containing each group, and each
step is scaled per subset by a free secant estimate of the curvature change. The refinement only
changes the convergence speed, never the fixed point, so float32 is used where it is fast, with
float64 for the per-group sums and the validation loss.

Exact Newton with per-subset Hessians costs N*d^2 per subset (~1 TFLOP for 1,000 subsets at
N=20,000, d=256) and is only used for the single all-sources fit in `calibrate_l2`.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

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
    "exact_solve",
    "synthetic_problem",
]


@dataclass
class Problem:
    """One subset-selection problem: training examples tagged by group, plus target validation.

    `col_sq_norms` (c_k = squared norm of column k of the projection P) turns z into the size of the
    real weight change ||P z|| ~ sqrt(sum_k c_k z_k^2); `theta_norm` is ||theta*|| of the trainable
    weights, so steps are reported relative to the model they would change.
    """

    x: torch.Tensor  # (N, d) float32 training examples' projected gradients
    u: torch.Tensor  # (N,) offsets (mean log-odds of the model's answer)
    group: torch.Tensor  # (N,) long, 0 = target train, 1..n = sources
    x_val: torch.Tensor  # (V, d) target validation examples
    u_val: torch.Tensor  # (V,)
    n_sources: int
    col_sq_norms: torch.Tensor | None = None  # (d,), None means all ones
    theta_norm: float = 1.0
    # Cached per-group sufficient statistics (see `_stats`); not part of the problem's identity.
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.x.ndim != 2:
            raise ValueError(f"Problem.x must be (N, d), got shape {tuple(self.x.shape)}")
        n_ex, d = self.x.shape
        if self.u.shape != (n_ex,):
            raise ValueError(f"Problem.u must be ({n_ex},), got {tuple(self.u.shape)}")
        if self.group.shape != (n_ex,):
            raise ValueError(f"Problem.group must be ({n_ex},), got {tuple(self.group.shape)}")
        if self.x_val.ndim != 2 or self.x_val.shape[1] != d:
            raise ValueError(f"Problem.x_val must be (V, {d}), got {tuple(self.x_val.shape)}")
        if self.x_val.shape[0] == 0:
            raise ValueError("Problem.x_val is empty: the estimate needs target validation examples")
        if self.u_val.shape != (self.x_val.shape[0],):
            raise ValueError(f"Problem.u_val must be ({self.x_val.shape[0]},), got {tuple(self.u_val.shape)}")
        if n_ex and (int(self.group.min()) < 0 or int(self.group.max()) > self.n_sources):
            raise ValueError(f"Problem.group ids must lie in 0..{self.n_sources}, "
                             f"got {int(self.group.min())}..{int(self.group.max())}")
        if self.col_sq_norms is not None and self.col_sq_norms.shape != (d,):
            raise ValueError(f"Problem.col_sq_norms must be ({d},), got {tuple(self.col_sq_norms.shape)}")
        if not self.theta_norm > 0:
            raise ValueError(f"Problem.theta_norm must be positive, got {self.theta_norm}")
        self.group = self.group.long()

    @property
    def dim(self) -> int:
        return self.x.shape[1]


@dataclass
class Estimates:
    """Estimates for m subsets; row k of every tensor belongs to subsets[k]."""

    subsets: torch.Tensor  # (m, n) bool membership of sources 1..n (column j = source j+1)
    loss: torch.Tensor  # (m,) linear-estimate target validation loss
    z: torch.Tensor  # (m, d)
    step: torch.Tensor  # (m,) implied ||P z|| / ||theta*||
    change: torch.Tensor  # (m,) implied RMS change of the training examples' outputs u_s
    l2: float
    # (m,) bool: the subset's refinement met `tol` within `newton_steps`. False rows stopped at the
    # step cap with their error unknown (always so for newton_steps = 0, which measures nothing).
    converged: torch.Tensor


# ---------------------------------------------------------------------------- statistics


def _group_sums(problem: Problem, z: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group sufficient statistics of the objective's quadratic model at z (default 0), float64.

    H_i = sum_{s in group i} w_s x_s x_s^T with w_s = sigma(m_s) sigma(-m_s), m_s = u_s + x_s . z -> (n+1, d*d)
    b_i = sum_{s in group i} sigma(-m_s) x_s                                                  -> (n+1, d)
    """
    d, n1 = problem.dim, problem.n_sources + 1
    x64 = problem.x.double()
    m = problem.u.double() if z is None else problem.u.double() + x64 @ z.double()
    w = torch.sigmoid(m) * torch.sigmoid(-m)
    r = torch.sigmoid(-m)
    H = torch.zeros(n1, d, d, dtype=torch.float64)
    b = torch.zeros(n1, d, dtype=torch.float64)
    for i in range(n1):
        idx = (problem.group == i).nonzero().squeeze(1)
        if idx.numel():
            xi = x64[idx]
            H[i] = (xi * w[idx, None]).T @ xi
            b[i] = r[idx] @ xi
    return H.reshape(n1, d * d), b


def _stats(problem: Problem) -> dict[str, torch.Tensor]:
    """The group sums at z = 0, computed once per problem (calibration's closed-form first guess)."""
    if "H" not in problem._cache:
        H, b = _group_sums(problem)
        problem._cache.update(H=H, b=b)
    return problem._cache


def _anchor(problem: Problem, l2: float) -> dict:
    """Where every subset's Newton step starts: the exact all-sources fit z_all at this l2, with the
    group sums there (cached for the last l2 used).

    Why not z = 0: the subsets' optima lie between 0 and z_all, much closer to z_all than to 0 when
    they hold half the sources or more; a quadratic model taken there has a fraction of the error.
    On the benchmark problem the first step's loss error fell 4x (2.7e-2 -> 7.3e-3) and after one
    refinement 6x (1.8e-3 -> 3.2e-4), for the price of one exact fit per l2.
    """
    found = problem._cache.get("anchor")
    if found is None or found["l2"] != l2:
        members = torch.ones(problem.n_sources + 1, dtype=torch.bool)
        z = _newton_single(problem, members, l2)
        H, b = _group_sums(problem, z)
        found = {"l2": l2, "z": z, "H": H, "H32": H.float(), "b": b}
        problem._cache["anchor"] = found
    return found


def _group_blocks(problem: Problem, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each group's (x, u) as contiguous blocks in `dtype`, cached: the refinement works group by group."""
    key = f"blocks_{dtype}"
    if key not in problem._cache:
        blocks = []
        for i in range(problem.n_sources + 1):
            idx = (problem.group == i).nonzero().squeeze(1)
            blocks.append((problem.x[idx].to(dtype).contiguous(), problem.u[idx].to(dtype).contiguous()))
        problem._cache[key] = blocks
    return problem._cache[key]


def _gradient(blocks: list[tuple[torch.Tensor, torch.Tensor]], members: torch.Tensor,
              Z: torch.Tensor, l2: float | torch.Tensor) -> torch.Tensor:
    """Full-data gradient of every subset's objective at its own z (rows of Z), all at once.

    grad_S = -sum_{s in D_S} sigma(-(u_s + x_s . z_S)) x_s + 2 l2 z_S. Group by group, only for the
    subsets that contain the group: the same result as a dense (N, m) product masked by
    membership, with about half the work when subsets hold half the sources.
    """
    G = Z * (2.0 * l2)  # l2: a number, or one per row of Z ((m, 1))
    for i, (Xi, Ui) in enumerate(blocks):
        if Xi.shape[0] == 0:
            continue
        cols = members[:, i]
        if bool(cols.all()):
            R = torch.sigmoid(torch.addmm(Ui[:, None], Xi, Z.T).neg_())  # (N_i, m)
            G.addmm_(R.T, Xi, alpha=-1.0)
        else:
            c = cols.nonzero().squeeze(1)
            if c.numel() == 0:
                continue
            R = torch.sigmoid(torch.addmm(Ui[:, None], Xi, Z[c].T).neg_())  # (N_i, |c|)
            G.index_add_(0, c, R.T @ Xi, alpha=-1.0)
    return G


def _full_membership(problem: Problem, subsets: torch.Tensor) -> torch.Tensor:
    """(m, n) source membership -> (m, n+1) bool with the target-train column 0 always on."""
    subsets = torch.as_tensor(subsets)
    if subsets.ndim == 1:
        subsets = subsets.unsqueeze(0)
    if subsets.ndim != 2 or subsets.shape[1] != problem.n_sources:
        raise ValueError(f"subsets must be (m, {problem.n_sources}) bool, got shape {tuple(subsets.shape)}")
    ones = torch.ones(subsets.shape[0], 1, dtype=torch.bool)
    return torch.cat([ones, subsets.bool()], dim=1)


def _check_l2(l2: float) -> float:
    l2 = float(l2)
    if not l2 > 0 or not math.isfinite(l2):
        raise ValueError(f"l2 must be a positive finite number, got {l2}")
    return l2


WEIGHTINGS = ("sum", "mean")


def subset_l2(problem: Problem, subsets: torch.Tensor, l2: float, weighting: str = "sum") -> torch.Tensor:
    """The regularization of each subset's fit, (m,) float64: `l2` is that of the all-sources fit.

    - "sum": every subset's objective sums its examples' losses, with the same l2. A subset with
      more data moves further: the model of fine-tuning for a number of epochs over each mix.
    - "mean": the data term is the mean over the subset's examples, i.e. the sum with l2 scaled by
      |D_S| / |D_all|. Every subset moves about as far, pulled by its examples in proportion to
      their share: the model of fine-tuning every mix for the same number of optimizer steps
      (early-stopped gradient descent on the mean loss behaves like a fixed ridge penalty on it).
    Both agree on the all-sources fit, where l2 is calibrated.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    members = _full_membership(problem, subsets)
    l2 = _check_l2(l2)
    if weighting == "sum":
        return torch.full((members.shape[0],), l2, dtype=torch.float64)
    counts = torch.bincount(problem.group, minlength=problem.n_sources + 1).double()
    return l2 * (members.double() @ counts) / counts.sum()


# ---------------------------------------------------------------------------- batched solve


@contextmanager
def _one_thread():
    """Run batched LAPACK calls single-threaded.

    MKL parallelizes inside each small (256 x 256) factorization, which gains little on 2 cores and
    collapses when another process is using the CPU (measured under load: batched Cholesky 10x,
    eigh 500x slower with 2 threads than with 1).
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# Diagonal shifts tried, relative to a matrix's mean diagonal, when its Cholesky factorization fails
# even in float64. The smallest that works is used: the factor then solves a slightly damped system.
JITTER = (1e-12, 1e-9, 1e-6, 1e-3)


def _cholesky(A: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factors of a batch (..., d, d) of systems H + 2 l2 I, in A's dtype, robustly.

    They are positive definite in exact arithmetic (l2 > 0), not always in floating point: float32
    rounding, or an l2 far below the curvature of a rank-deficient H (fewer examples than
    dimensions, collinear gradients), leaves a pivot at zero or below. A matrix that fails is redone
    in float64, then with a growing shift (JITTER) of its diagonal. Every caller can use a shifted
    factor: the refinement only preconditions with it (its fixed point is grad = 0 whatever the
    factor), `_newton_single` line-searches the (damped, still descent) step it gives, and the
    one-shot step moves by at most the shift's relative size. LU-based solves are no alternative:
    they hit an MKL pivot error on 2-thread CPUs.
    """
    batch = A.reshape(-1, *A.shape[-2:])
    with _one_thread():
        L, info = torch.linalg.cholesky_ex(batch)
        bad = (info != 0).nonzero().squeeze(1)
        if bad.numel() == 0:
            return L.reshape(A.shape)
        L = L.clone()
        A64 = batch[bad].double()
        if not bool(torch.isfinite(A64).all()):
            raise FloatingPointError("a Hessian of the estimate holds NaN or inf: are the store's gradients finite?")
        scale = A64.diagonal(dim1=1, dim2=2).mean(1).abs().clamp_min(torch.finfo(torch.float64).tiny)
        eye = torch.eye(A.shape[-1], dtype=torch.float64)
        for shift in (0.0, *JITTER):
            L64, info64 = torch.linalg.cholesky_ex(A64 + (shift * scale)[:, None, None] * eye)
            ok = info64 == 0
            L[bad[ok]] = L64[ok].to(L.dtype)
            bad, A64, scale = bad[~ok], A64[~ok], scale[~ok]
            if bad.numel() == 0:
                return L.reshape(A.shape)
    raise FloatingPointError(f"{bad.numel()} Hessian(s) of the estimate are not positive definite even with "
                             f"{JITTER[-1]:g} of their diagonal added; is l2 > 0?")


def _chol_solve(L: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(L L^T)^-1 g for a batch, g (m, d). Two triangular solves: ~10x faster than
    torch.cholesky_solve for a single right-hand side on this CPU (measured)."""
    with _one_thread():
        y = torch.linalg.solve_triangular(L, g.unsqueeze(-1), upper=False)
        return torch.linalg.solve_triangular(L.mT, y, upper=True).squeeze(-1)


class _Systems:
    """The Newton systems (H_S + 2 l2_S I) v = g of a batch of subsets, H_S = sum of its groups' H_i.

    Solved together by conjugate gradients preconditioned with ONE shared matrix, the batch's mean
    system M = sum_i a_i H_i + 2 mean(l2_S) I (a_i = share of the batch's subsets holding group i). Why: a
    subset's system differs from M only by the groups it holds or lacks, so a few iterations
    suffice (2-3 on the benchmark problem), and each costs one product with every group's H_i for
    the subsets holding it: dense matrix products at full speed. A batched Cholesky per subset costs
    as much as ~30 such iterations on this CPU (LAPACK potrf on 256 x 256 runs at ~14 GFLOP/s,
    matrix products at ~150). Subsets that do not converge within `max_iter` are factored by
    Cholesky once and solved directly from then on, so the answer never depends on the spectrum.
    """

    def __init__(self, H: torch.Tensor, members: torch.Tensor, l2: torch.Tensor, dtype: torch.dtype):
        self.H, self.dtype = H.to(dtype), dtype
        self.l2 = l2.to(dtype)[:, None]  # (m, 1): each subset's own regularization
        self.m = members.shape[0]
        self.members = members
        self.groups = [None if bool(members[:, i].all()) else members[:, i].nonzero().squeeze(1)
                       for i in range(members.shape[1])]
        share = members.double().mean(0)
        M = (share[:, None, None] * H.double()).sum(0)
        M.diagonal().add_(2.0 * float(l2.double().mean()))
        with _one_thread():
            self.M_inv = torch.cholesky_inverse(_cholesky(M)).to(dtype)
        self.direct = torch.zeros(self.m, dtype=torch.bool)  # rows solved by their own Cholesky factor
        self.L: torch.Tensor | None = None  # their factors, row self._slot[i] for subset i
        self._slot = torch.full((self.m,), -1, dtype=torch.long)

    def matvec(self, P: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(H_S + 2 l2_S I) p for every row of P (rows: which subsets P holds, default all)."""
        Q = P * (2.0 * (self.l2 if rows is None else self.l2[rows]))
        for i, c in enumerate(self.groups):
            if rows is not None:
                hold = self.members[rows, i]
                if not bool(hold.any()):
                    continue
                c = None if bool(hold.all()) else hold.nonzero().squeeze(1)
            if c is None:
                Q.addmm_(P, self.H[i])
            elif c.numel():
                Q.index_add_(0, c, P[c] @ self.H[i])
        return Q

    def solve(self, G: torch.Tensor, rtol: float, max_iter: int = 30,
              rows: torch.Tensor | None = None) -> torch.Tensor:
        """V with (H_S + 2 l2 I) v_S = g_S for every row of G, to relative residual `rtol` (M^-1 norm).

        rows: which subsets of the batch G's rows belong to (default: all of them, in order).
        """
        rows = torch.arange(self.m) if rows is None else rows
        V = torch.zeros_like(G)
        direct = self.direct[rows]
        live = (~direct).nonzero().squeeze(1)
        if live.numel():
            which = None if live.numel() == self.m else rows[live]
            V[live], ok = self._cg(G[live], which, rtol, max_iter)
            if not bool(ok.all()):
                self._factor(rows[live[~ok]])
        if bool(direct.any()):
            d = direct.nonzero().squeeze(1)
            V[d] = _chol_solve(self.L[self._slot[rows[d]]], G[d])
        return V

    def _cg(self, G: torch.Tensor, rows: torch.Tensor | None, rtol: float,
            max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
        X = G @ self.M_inv  # the first iterate: the shared system's answer
        R = G - self.matvec(X, rows)
        Y = R @ self.M_inv
        P = Y.clone()
        ry = (R * Y).sum(1, keepdim=True)
        target = (rtol ** 2) * (G * (G @ self.M_inv)).sum(1, keepdim=True)
        ok = (ry <= target).squeeze(1)
        for _ in range(max_iter):
            if bool(ok.all()):
                break
            Q = self.matvec(P, rows)
            pq = (P * Q).sum(1, keepdim=True)
            a = torch.where(pq > 0, ry / pq.clamp_min(1e-300 if self.dtype == torch.float64 else 1e-30),
                            torch.zeros_like(pq))
            X.addcmul_(a, P)
            R.addcmul_(a, Q, value=-1.0)
            Y = R @ self.M_inv
            ry_new = (R * Y).sum(1, keepdim=True)
            P = Y + torch.where(ry > 0, ry_new / ry.clamp_min(1e-30), torch.zeros_like(ry)) * P
            ry = ry_new
            ok = (ry <= target).squeeze(1)
        return X, ok

    def _factor(self, rows: torch.Tensor) -> None:
        """Cholesky-factor the systems of `rows` and solve them directly from now on. The factor only
        preconditions the refinement steps, so its precision (float32, or a shift `_cholesky` had to
        add) bounds the speed of convergence, not the answer."""
        members = self.members[rows].to(self.dtype)
        A = (members @ self.H.reshape(self.H.shape[0], -1)).view(-1, *self.H.shape[1:])
        A.diagonal(dim1=1, dim2=2).add_(2.0 * self.l2[rows])
        L = _cholesky(A)
        self.L = L if self.L is None else torch.cat([self.L, L])
        self._slot[rows] = torch.arange(self.L.shape[0] - rows.numel(), self.L.shape[0])
        self.direct[rows] = True


# Default accuracy of `solve`: a subset stops refining once its estimated error left in z is below
# 1e-4 relative. On the benchmark problem the estimated loss is then within 3e-4 (relative) of the
# exact fit, as close as scikit-learn gets at its default tolerance and ~100x below the seed noise of
# real fine-tuning on the embedded default (2.5%); most subsets need one refinement, a few two.
TOL = 1e-4
# At most this many refinements per subset; a subset stops as soon as it meets `tol`, so the cap
# only costs time for subsets that need it: under "mean" weighting small subsets are regularized
# less and land far from the all-sources anchor (6 refinements on the test problem, 1-2 usually).
NEWTON_STEPS = 8


def solve(problem: Problem, subsets: torch.Tensor, l2: float, newton_steps: int = NEWTON_STEPS,
          *, dtype: torch.dtype = torch.float32, tol: float = TOL, scaled: bool = True,
          weighting: str = "sum") -> torch.Tensor:
    """Fit z_S for every row of `subsets` ((m, n) bool) at once; returns (m, d) in `dtype`.
    `solve_flagged` also says which subsets met `tol`."""
    return solve_flagged(problem, subsets, l2, newton_steps, dtype=dtype, tol=tol, scaled=scaled,
                         weighting=weighting)[0]


def solve_flagged(problem: Problem, subsets: torch.Tensor, l2: float, newton_steps: int = NEWTON_STEPS,
                  *, dtype: torch.dtype = torch.float32, tol: float = TOL, scaled: bool = True,
                  weighting: str = "sum") -> tuple[torch.Tensor, torch.Tensor]:
    """(z, converged): z_S (m, d) in `dtype` for every row of `subsets` ((m, n) bool) at once, and
    (m,) bool, whether each subset's refinement met `tol` within `newton_steps`.

    newton_steps = 0 is the single Newton step from the all-sources fit z_all (`_anchor`) built from
    per-group sums there. Each further step is z <- z - t_S H0(S)^-1 grad_S(z): the full-data
    gradient of subset S, preconditioned by the Hessian H0(S) at z_all (solved by `_Systems`),
    scaled per subset by a secant estimate t_S of how much the true curvature differs from H0 along
    the last step (`scaled=False` gives the plain fixed-Hessian iteration). The fixed point is exactly grad = 0, so the precision of the inner
    solves limits the speed, not the answer. A subset leaves the refinement once its error left,
    estimated from its last two updates, is below `tol` relative (float32 noise is ~1e-6); later
    full-data gradients are computed for the remaining subsets only. The estimate is optimistic
    (measured errors in z were 2-5x `tol`), which is why the documented accuracy is a measured one.
    All m subsets are in memory at once: (N_i, m) margins per group; `estimate` batches for you.
    `weighting` sets each subset's own l2 from the all-sources one (`subset_l2`).
    """
    l2 = _check_l2(l2)
    if newton_steps < 0:
        raise ValueError(f"newton_steps must be >= 0, got {newton_steps}")
    members = _full_membership(problem, subsets)
    m, d = members.shape[0], problem.dim
    if m == 0:
        return torch.zeros(0, d, dtype=dtype), torch.zeros(0, dtype=torch.bool)
    an = _anchor(problem, l2)
    H = (an["H32"] if dtype == torch.float32 else an["H"].to(dtype)).view(-1, d, d)
    l2s = subset_l2(problem, subsets, l2, weighting)
    systems = _Systems(H, members, l2s, dtype)
    # -grad_S(z_all): sums of many small terms, so float64 until here
    B = (members.double() @ an["b"] - 2.0 * l2s[:, None] * an["z"]).to(dtype)
    l2s = l2s.to(dtype)[:, None]
    # The one-step answer is what every later step refines, so it is solved tightly; later solves
    # only set the direction of a correction: a 1% error there slows convergence by at most that
    # factor per step (an inexact Newton method) and never moves the fixed point.
    eps = 1e-7 if dtype == torch.float32 else 1e-12
    D0 = systems.solve(B, rtol=max(eps, min(tol, 1e-3) * 0.1))
    Z = an["z"].to(dtype) + D0
    if newton_steps == 0:
        return Z, torch.zeros(m, dtype=torch.bool)
    blocks = _group_blocks(problem, dtype)
    # The last step s = -t D (D = H0^-1 G) and the gradient change y it caused give the curvature
    # ratio (s.H0 s)/(s.y) along s; with H0 s = -t G that is t (D.G)/(D.(G - G_new)), free to compute.
    # Scaling the next step by it corrects the main error of a fixed Hessian: the true curvature
    # shrinks (or grows) as the margins move. Step 0 is the Newton step from z_all, where G = -B.
    D_prev, G_prev, t = -D0, -B, torch.ones(m, 1, dtype=dtype)
    last = D0.norm(dim=1)  # size of the previous update
    active = torch.arange(m)  # subsets still refined: each full-data gradient costs only theirs
    for _ in range(newton_steps):
        Za = Z[active]
        G = _gradient(blocks, members[active], Za, l2s[active])
        ta = t[active]
        if scaled:
            Dp, Gp = D_prev[active], G_prev[active]
            num = (Dp * Gp).sum(1, keepdim=True)
            den = (Dp * (Gp - G)).sum(1, keepdim=True)
            ratio = ta * num / den
            ta = torch.where((num > 0) & (den > 0), ratio, torch.ones_like(ratio)).clamp_(0.25, 4.0)
        D = systems.solve(G, rtol=1e-2, rows=active)
        Za = Za - ta * D
        Z[active], D_prev[active], G_prev[active], t[active] = Za, D, G, ta
        # Linear convergence: with contraction rho ~ |update| / |previous update| the error left
        # is ~ rho / (1 - rho) |update|. A subset is done once that is below tol (relative).
        upd = (ta * D).norm(dim=1)
        rho = upd / last[active].clamp_min(1e-30)
        last[active] = upd
        left = torch.where(rho < 0.5, rho / (1 - rho) * upd, torch.full_like(upd, math.inf))
        active = active[left > tol * Za.norm(dim=1)]
        if active.numel() == 0:
            break
    converged = torch.ones(m, dtype=torch.bool)
    converged[active] = False  # still refining when the step cap was reached
    return Z, converged


def linear_loss(problem: Problem, z: torch.Tensor) -> torch.Tensor:
    """Mean target-validation loss softplus(-(u_v + x_v . z)) for each row of z ((m, d)) -> (m,) float64."""
    z = torch.as_tensor(z)
    if z.ndim == 1:
        z = z.unsqueeze(0)
    margins = problem.u_val.double()[:, None] + problem.x_val.double() @ z.double().T
    return torch.nn.functional.softplus(-margins).mean(dim=0)


def implied_step(problem: Problem, z: torch.Tensor) -> torch.Tensor:
    """||P z|| / ||theta*|| for each row of z, with ||P z||^2 ~ sum_k c_k z_k^2 (c = col_sq_norms)."""
    z = torch.as_tensor(z).double()
    if z.ndim == 1:
        z = z.unsqueeze(0)
    c = torch.ones(z.shape[1], dtype=torch.float64) if problem.col_sq_norms is None else problem.col_sq_norms.double()
    return (z.square() @ c).sqrt() / float(problem.theta_norm)


def _working_dtype(problem: Problem, members: torch.Tensor, l2: float, weighting: str) -> torch.dtype:
    """float32, unless its rounding would swamp the subsets' systems H_S + 2 l2_S I: float32 resolves
    condition numbers up to about 1 / (d eps32), and past that (an l2 far below the curvature of a
    rank-deficient H) the refinement blows rounding noise in H's null space up into a huge z, whose
    updates then look converged. float64 costs about 2x and resolves them. Real runs are far from
    the limit (2 l2 / lambda_max ~ 0.3 on both shipped examples, against d eps32 = 3e-5)."""
    if members.shape[0] == 0:
        return torch.float32
    an = _anchor(problem, l2)
    if "top" not in an:
        with _one_thread():
            an["top"] = float(torch.linalg.eigvalsh(an["H"].sum(0).view(problem.dim, problem.dim))[-1])
    smallest = float(subset_l2(problem, members, l2, weighting).min())
    resolves = 2 * smallest >= problem.dim * torch.finfo(torch.float32).eps * an["top"]
    return torch.float32 if resolves else torch.float64


def estimate(problem: Problem, subsets: torch.Tensor, l2: float, newton_steps: int = NEWTON_STEPS,
             batch: int = 256, *, tol: float = TOL, workers: int | None = None, weighting: str = "sum") -> Estimates:
    """Linear-estimate target loss and implied step for every subset, `batch` subsets at a time.

    Batches run on `workers` Python threads (default: torch.get_num_threads()), each with torch
    single-threaded. Why: on this 2-core CPU, torch's own intra-op threading collapses when any
    other process is busy (measured: tiny elementwise ops 50x, the whole estimate ~2x slower than
    one thread), while independent batches on separate threads share the cores gracefully and still
    use both when the machine is idle. torch's global thread count is 1 during the call and restored
    after. Memory per worker is about batch * (N + 2 d^2) floats (margins, Hessians and factors).
    `weighting`: "sum" or "mean" (see `subset_l2`).
    """
    members = _full_membership(problem, subsets)[:, 1:]
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    l2 = _check_l2(l2)
    m = members.shape[0]
    workers = max(1, torch.get_num_threads() if workers is None else int(workers))
    size = max(1, min(batch, -(-m // workers)))  # small jobs still use every worker
    chunks = [members[i:i + size] for i in range(0, m, size)]
    dtype = _working_dtype(problem, members, l2, weighting)
    _anchor(problem, l2)  # fill the caches before any thread needs them
    _group_blocks(problem, dtype)

    def run(chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return solve_flagged(problem, chunk, l2, newton_steps, dtype=dtype, tol=tol, weighting=weighting)

    with _one_thread():
        if workers == 1 or len(chunks) == 1:
            parts = [run(c) for c in chunks]
        else:
            with ThreadPoolExecutor(max_workers=min(workers, len(chunks))) as pool:
                parts = list(pool.map(run, chunks))
        z = torch.cat([p[0] for p in parts]) if parts else torch.zeros(0, problem.dim)
        converged = torch.cat([p[1] for p in parts]) if parts else torch.zeros(0, dtype=torch.bool)
        return Estimates(subsets=members, loss=linear_loss(problem, z), z=z.float(), step=implied_step(problem, z),
                         change=implied_output_change(problem, z), l2=l2, converged=converged)


def estimator(problem: Problem, l2: float, newton_steps: int = NEWTON_STEPS, batch: int = 256,
              tol: float = TOL, weighting: str = "sum") -> Callable[[torch.Tensor], torch.Tensor]:
    """The `estimate_fn` that gradex.select expects: (k, n) bool subsets -> (k,) estimated loss."""
    return lambda subsets: estimate(problem, subsets, l2, newton_steps, batch, tol=tol, weighting=weighting).loss


# ---------------------------------------------------------------------------- regularization


def _newton_single(problem: Problem, members: torch.Tensor, l2: float, z0: torch.Tensor | None = None,
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
        with _one_thread():
            step = torch.cholesky_solve(g[:, None], _cholesky(Hm)).squeeze(1)
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


def implied_output_change(problem: Problem, z: torch.Tensor) -> torch.Tensor:
    """Root-mean-square over the training examples of x_s . z, the predicted change of u_s, per row of z."""
    z = torch.as_tensor(z).double()
    if z.ndim == 1:
        z = z.unsqueeze(0)
    C = _second_moment(problem)
    return ((z @ C) * z).sum(1).clamp_min(0).sqrt()


def _second_moment(problem: Problem) -> torch.Tensor:
    """C = X^T X / N over the training examples (float64, cached): RMS(X z) = sqrt(z^T C z)."""
    if "C" not in problem._cache:
        x64 = problem.x.double()
        problem._cache["C"] = (x64.T @ x64) / max(1, x64.shape[0])
    return problem._cache["C"]


def _smallest_l2(problem: Problem) -> float:
    """The smallest l2 at which the all-sources fit's Hessian H(z) + 2 l2 I is nonsingular in float64
    at every z: H(z) <= X^T X / 4 (each weight sigma(m) sigma(-m) is at most 1/4), and a float64
    Cholesky resolves condition numbers up to about 1 / (d eps)."""
    with _one_thread():
        top = float(torch.linalg.eigvalsh(_second_moment(problem))[-1]) * problem.x.shape[0] / 4
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
    st = _stats(problem)
    d = problem.dim
    members = torch.ones(problem.n_sources + 1, dtype=torch.bool)
    with _one_thread():
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
        z = _newton_single(problem, members, math.exp(log_l2), z0)
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


# ---------------------------------------------------------------------------- oracle & data


def exact_solve(problem: Problem, members: torch.Tensor, l2: float, *, gtol: float = 1e-10) -> torch.Tensor:
    """Reference fit for ONE subset by scipy L-BFGS in float64 on the exact objective.

    Slow (one scipy run per subset) and independent of the batched code: tests and benchmarks use
    it as the oracle. members: (n,) bool sources (target train is always included). Returns (d,) float64.
    """
    import numpy as np
    from scipy.optimize import minimize

    l2 = _check_l2(l2)
    full = _full_membership(problem, torch.as_tensor(members).reshape(1, -1))[0]
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


def exact_coordinates(x: np.ndarray, chunk: int = 65_536, rtol: float = 1e-9) -> torch.Tensor:
    """Coordinates with exact inner products for unprojected gradients (projection `none`).

    The estimate depends on the gradients only through their inner products, and a store of N
    examples spans at most N dimensions: with the Gram matrix K = G G^T = U S U^T, the rows of
    U sqrt(S) have exactly the gradients' inner products, and a weight change V z (V = G^T U S^-1/2,
    orthonormal columns) has norm ||z||. So N x p gradients become an N x rank problem with no
    projection error. K is accumulated over column chunks in float64, so G is read once from disk.
    """
    n, p = x.shape
    gram = torch.zeros(n, n, dtype=torch.float64)
    for start in range(0, p, chunk):
        block = torch.from_numpy(np.array(x[:, start:start + chunk], dtype=np.float64))
        gram += block @ block.T
    values, vectors = torch.linalg.eigh(gram)
    keep = values > rtol * values.max()
    return (vectors[:, keep] * values[keep].sqrt()).float()
