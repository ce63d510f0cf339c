"""The batched solver: z_S for many subsets at once, and their linear estimates.

Every subset starts from the exact all-sources fit z_all at this l2 (`_anchor`, one damped Newton
fit in float64 per problem and l2), with the per-group sums there (H_i, b_i). Its first step is the
Newton step from z_all built from the sums of its own groups, so a batch of subsets costs one
(m, n+1) @ (n+1, d*d) product for its Hessians H_S. Those systems (H_S + 2 l2_S I) v = g are solved
together by conjugate gradients preconditioned with the batch's mean system (`_Systems`), with a
Cholesky factor per subset only for those CG does not settle. Then up to `refinements` refinement
steps: the subset's full-data gradient, preconditioned by its Hessian at z_all and scaled per subset
by a free secant estimate of the curvature change, computed group by group for the subsets still
refining. The refinement only changes the convergence speed, never the fixed point (grad = 0), so
float32 is used where it is fast, with float64 for the per-group sums and the validation loss.

Exact Newton with per-subset Hessians costs N*d^2 per subset (~1 TFLOP for 1,000 subsets at
N=20,000, d=256); it is only used for the single all-sources fit (the anchor, and `calibrate_l2`).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import torch

from gradex.estimate.calibrate import exact_fit
from gradex.estimate.linalg import chol_solve, cholesky, one_thread
from gradex.estimate.problem import (Problem, check_l2, full_membership, group_sums, implied_output_change,
                                     implied_step, linear_loss, subset_l2)


@dataclass
class Estimates:
    """Estimates for m subsets; row k of every tensor belongs to subsets[k]."""

    subsets: torch.Tensor  # (m, n) bool membership of sources 1..n (column j = source j+1)
    loss: torch.Tensor  # (m,) linear-estimate target validation loss
    z: torch.Tensor  # (m, d)
    step: torch.Tensor  # (m,) implied ||P z|| / ||theta*||
    change: torch.Tensor  # (m,) implied RMS change of the training examples' outputs u_s
    l2: float
    # (m,) bool: the subset's refinement met `tol` within `refinements`. False rows stopped at the
    # step cap with their error unknown (always so for refinements = 0, which measures nothing).
    converged: torch.Tensor


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
        warm = problem._cache.get("warm") or {}  # calibrate_l2's fits, keyed by log l2
        z0 = warm[min(warm, key=lambda k: abs(k - math.log(l2)))] if warm else None
        z = exact_fit(problem, members, l2, z0, carry=problem._cache.setdefault("carry", {}))
        H, b = group_sums(problem, z)
        found = {"l2": l2, "z": z, "H": H, "H32": H.float(), "b": b}
        found["lower32"] = lower(found["H32"].view(-1, problem.dim, problem.dim))
        problem._cache["anchor"] = found
    return found


def lower(H: torch.Tensor) -> torch.Tensor:
    """The lower triangles of a batch of symmetric (..., d, d) matrices, row by row: (..., d(d+1)/2).

    Why: a subset's system is a sum of its groups' matrices, and forming it is the costliest part of
    a direct solve at many sources; summing only the triangle Cholesky reads halves that product."""
    d = H.shape[-1]
    rows, cols = torch.tril_indices(d, d)
    return H.reshape(*H.shape[:-2], d * d)[..., rows * d + cols].contiguous()


def unpack_lower(P: torch.Tensor, d: int) -> torch.Tensor:
    """(m, d(d+1)/2) lower triangles (as `lower` packs them) -> (m, d, d), zero above the diagonal,
    one slice copy per row of the triangle (no index tensor of every entry to hold)."""
    A = P.new_zeros(P.shape[0], d, d)
    at = 0
    for i in range(d):
        A[:, i, :i + 1] = P[:, at:at + i + 1]
        at += i + 1
    return A


def _group_blocks(problem: Problem, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each group's (x, u) as contiguous blocks in `dtype`, cached: the refinement works group by group."""
    key = f"blocks_{dtype}"
    if key not in problem._cache:
        blocks = []
        for i in range(problem.n_sources + 1):
            idx = (problem.group == i).nonzero().squeeze(1)
            if idx.numel() and int(idx[-1] - idx[0]) + 1 == idx.numel():
                rows: slice | torch.Tensor = slice(int(idx[0]), int(idx[-1]) + 1)  # a store written source by source:
            else:                                                                  # a view, no copy of a memory map
                rows = idx
            blocks.append((problem.x[rows].to(dtype).contiguous(), problem.u[rows].to(dtype).contiguous()))
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


# Form the factored systems from the groups' lower triangles (True), or whole (False: the earlier way,
# which benchmarks/scale.py times beside it in the same run).
LOWER_ONLY = True

# Factor a batch's systems directly once its subsets hold, on average, d / DIRECT_GROUPS_PER_DIM
# groups beyond the ones they all share (see _Systems).
DIRECT_GROUPS_PER_DIM = 4


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
    A batch whose subsets each hold many groups (big pools) is factored from the start, where one
    CG iteration would cost more than forming H_S.
    """

    def __init__(self, H: torch.Tensor, members: torch.Tensor, l2: torch.Tensor, dtype: torch.dtype,
                 packed: torch.Tensor | None = None):
        d = H.shape[-1]
        self.H, self.dtype = H.to(dtype), dtype
        # the groups' lower triangles (`lower`), for forming the systems that are factored; built on
        # first need where not given
        self.packed = None if packed is None else packed.to(dtype)
        self.l2 = l2.to(dtype)[:, None]  # (m, 1): each subset's own regularization
        self.m = members.shape[0]
        self.members = members
        # The groups every subset of the batch holds are one matrix (the target, and in a stepwise
        # round the current mix): a product with it per iteration instead of one per group.
        self.every = every = members.all(0)
        self.base = self.H[every].double().sum(0).to(dtype)
        self._l2_mean = float(l2.double().mean())
        self.direct = torch.zeros(self.m, dtype=torch.bool)  # rows solved by their own Cholesky factor
        self.L: torch.Tensor | None = None  # their factors, row self._slot[i] for subset i
        self._slot = torch.full((self.m,), -1, dtype=torch.long)
        # Each CG iteration costs (groups a subset holds beyond the shared ones) x d^2 per subset, and
        # a refined estimate takes ~8 of them; forming H_S once and factoring it costs (all groups) x
        # d^2 plus d^3/3 at LAPACK's slower rate. Measured at d = 256, N = 10^5, subsets of half the
        # sources: equal at 50 such groups, the factor 1.2x faster at 150 and 2.4x at 500; so batches
        # whose subsets hold d / DIRECT_GROUPS_PER_DIM = 64 or more are factored from the start.
        beyond = float((members & ~every).sum(1).double().mean())
        if beyond * DIRECT_GROUPS_PER_DIM >= d:
            self._factor(torch.arange(self.m))

    # What conjugate gradients needs, built on its first use: a batch factored from the start (many
    # sources) never iterates, and at n = 1,000 these cost ~10% of its one-step estimates (measured).
    @cached_property
    def groups(self) -> list[tuple[int, torch.Tensor]]:
        """(group, the subsets holding it) for every group some but not all of the batch's subsets hold."""
        return [(i, self.members[:, i].nonzero().squeeze(1)) for i in range(self.H.shape[0])
                if not bool(self.every[i]) and bool(self.members[:, i].any())]

    @cached_property
    def M_inv(self) -> torch.Tensor:
        """The inverse of the batch's mean system, CG's shared preconditioner."""
        n1, d = self.H.shape[0], self.H.shape[-1]
        share = self.members.to(self.dtype).mean(0)
        M = (share @ self.H.reshape(n1, -1)).view(d, d).double()
        M.diagonal().add_(2.0 * self._l2_mean)
        with one_thread():
            return torch.cholesky_inverse(cholesky(M)).to(self.dtype)

    def matvec(self, P: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(H_S + 2 l2_S I) p for every row of P (rows: which subsets P holds, default all)."""
        Q = P * (2.0 * (self.l2 if rows is None else self.l2[rows]))
        Q.addmm_(P, self.base)
        for i, c in self.groups:
            if rows is not None:
                hold = self.members[rows, i]
                if not bool(hold.any()):
                    continue
                c = hold.nonzero().squeeze(1)
            if c.numel() == Q.shape[0]:
                Q.addmm_(P, self.H[i])
            else:
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
                direct = self.direct[rows]  # the rows just factored are solved by it now, not CG's last iterate
        if bool(direct.any()):
            d = direct.nonzero().squeeze(1)
            slots = self._slot[rows[d]]
            # every factor, in order (a batch factored from the start): no copy of them all
            whole = slots.numel() == self.L.shape[0] and bool((slots == torch.arange(slots.numel())).all())
            V[d] = chol_solve(self.L if whole else self.L[slots], G[d])
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
        preconditions the refinement steps, so its precision (float32, or a shift `cholesky` had to
        add) bounds the speed of convergence, not the answer."""
        members = self.members[rows].to(self.dtype)
        members[:, self.every] = 0  # held by every subset: in self.base
        if LOWER_ONLY:  # Cholesky reads the lower triangle only: form that alone (half the product)
            if self.packed is None:
                self.packed = lower(self.H)
            A = unpack_lower(members @ self.packed, self.H.shape[-1])
            A += self.base.tril()
        else:
            A = (members @ self.H.reshape(self.H.shape[0], -1)).view(-1, *self.H.shape[1:])
            A += self.base
        A.diagonal(dim1=1, dim2=2).add_(2.0 * self.l2[rows])
        L = cholesky(A)
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
REFINEMENTS = 8


def solve(problem: Problem, subsets: torch.Tensor, l2: float, refinements: int = REFINEMENTS,
          *, dtype: torch.dtype = torch.float32, tol: float = TOL, scaled: bool = True,
          weighting: str = "sum") -> torch.Tensor:
    """Fit z_S for every row of `subsets` ((m, n) bool) at once; returns (m, d) in `dtype`.
    `solve_flagged` also says which subsets met `tol`."""
    return solve_flagged(problem, subsets, l2, refinements, dtype=dtype, tol=tol, scaled=scaled,
                         weighting=weighting)[0]


def solve_flagged(problem: Problem, subsets: torch.Tensor, l2: float, refinements: int = REFINEMENTS,
                  *, dtype: torch.dtype = torch.float32, tol: float = TOL, scaled: bool = True,
                  weighting: str = "sum") -> tuple[torch.Tensor, torch.Tensor]:
    """(z, converged): z_S (m, d) in `dtype` for every row of `subsets` ((m, n) bool) at once, and
    (m,) bool, whether each subset's refinement met `tol` within `refinements`.

    refinements = 0 is the single Newton step from the all-sources fit z_all (`_anchor`) built from
    per-group sums there. Each further step is z <- z - t_S H0(S)^-1 grad_S(z): the full-data
    gradient of subset S, preconditioned by the Hessian H0(S) at z_all (solved by `_Systems`),
    scaled per subset by a secant estimate t_S of how much the true curvature differs from H0 along
    the last step (`scaled=False` gives the plain fixed-Hessian iteration). The fixed point is exactly grad = 0, so the precision of the inner
    solves limits the speed, not the answer. A subset leaves the refinement once its error left,
    estimated from its last two updates, is below `tol` relative (float32 noise is ~1e-6); later
    full-data gradients are computed for the remaining subsets only. The estimate is optimistic
    (measured errors in z of subsets flagged converged: 3.9x `tol` at most on benchmarks/estimate.py's
    problem, under 10x on small stiff ones in the tests), which is why the documented accuracy is a
    measured one.
    All m subsets are in memory at once: (N_i, m) margins per group; `estimate` batches for you.
    `weighting` sets each subset's own l2 from the all-sources one (`subset_l2`).
    """
    l2 = check_l2(l2)
    if refinements < 0:
        raise ValueError(f"refinements must be >= 0, got {refinements}")
    members = full_membership(problem, subsets)
    m, d = members.shape[0], problem.dim
    if m == 0:
        return torch.zeros(0, d, dtype=dtype), torch.zeros(0, dtype=torch.bool)
    an = _anchor(problem, l2)
    f32 = dtype == torch.float32
    H = (an["H32"] if f32 else an["H"].to(dtype)).view(-1, d, d)
    l2s = subset_l2(problem, subsets, l2, weighting)
    systems = _Systems(H, members, l2s, dtype, packed=an["lower32"] if f32 else None)
    # -grad_S(z_all): sums of many small terms, so float64 until here
    B = (members.double() @ an["b"] - 2.0 * l2s[:, None] * an["z"]).to(dtype)
    l2s = l2s.to(dtype)[:, None]
    # The one-step answer is what every later step refines, so it is solved tightly; later solves
    # only set the direction of a correction: a 1% error there slows convergence by at most that
    # factor per step (an inexact Newton method) and never moves the fixed point.
    eps = 1e-7 if dtype == torch.float32 else 1e-12
    D0 = systems.solve(B, rtol=max(eps, min(tol, 1e-3) * 0.1))
    Z = an["z"].to(dtype) + D0
    if refinements == 0:
        return Z, torch.zeros(m, dtype=torch.bool)
    blocks = _group_blocks(problem, dtype)
    # The last step s = -t D (D = H0^-1 G) and the gradient change y it caused give the curvature
    # ratio (s.H0 s)/(s.y) along s; with H0 s = -t G that is t (D.G)/(D.(G - G_new)), free to compute.
    # Scaling the next step by it corrects the main error of a fixed Hessian: the true curvature
    # shrinks (or grows) as the margins move. Step 0 is the Newton step from z_all, where G = -B.
    D_prev, G_prev, t = -D0, -B, torch.ones(m, 1, dtype=dtype)
    last = D0.norm(dim=1)  # size of the previous update
    slow = torch.zeros(m, dtype=dtype)  # the contraction the previous refinement measured
    active = torch.arange(m)  # subsets still refined: each full-data gradient costs only theirs
    for _ in range(refinements):
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
        # is ~ rho / (1 - rho) |update|. A subset is done once that is below tol (relative). rho is
        # the slower of the last two contractions: one secant-scaled step that lands near the optimum
        # makes the next update small and a single ratio tiny, which stopped subsets at up to 150x tol.
        upd = (ta * D).norm(dim=1)
        measured = upd / last[active].clamp_min(1e-30)
        rho = torch.maximum(measured, slow[active])
        last[active], slow[active] = upd, measured
        left = torch.where(rho < 0.5, rho / (1 - rho) * upd, torch.full_like(upd, math.inf))
        active = active[left > tol * Za.norm(dim=1)]
        if active.numel() == 0:
            break
    converged = torch.ones(m, dtype=torch.bool)
    converged[active] = False  # still refining when the step cap was reached
    return Z, converged


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
        with one_thread():
            an["top"] = float(torch.linalg.eigvalsh(an["H"].sum(0).view(problem.dim, problem.dim))[-1])
    smallest = float(subset_l2(problem, members, l2, weighting).min())
    resolves = 2 * smallest >= problem.dim * torch.finfo(torch.float32).eps * an["top"]
    return torch.float32 if resolves else torch.float64


def estimate(problem: Problem, subsets: torch.Tensor, l2: float, refinements: int = REFINEMENTS,
             batch: int = 256, *, tol: float = TOL, workers: int | None = None, weighting: str = "sum",
             progress: bool = False) -> Estimates:
    """Linear-estimate target loss and implied step for every subset, `batch` subsets at a time.

    Batches run on `workers` Python threads (default: torch.get_num_threads()), each with torch
    single-threaded. Why: on this 2-core CPU, torch's own intra-op threading collapses when any
    other process is busy (measured: tiny elementwise ops 50x, the whole estimate ~2x slower than
    one thread), while independent batches on separate threads share the cores gracefully and still
    use both when the machine is idle. torch's global thread count is 1 during the call and restored
    after. Memory per worker is about batch * (N + 2 d^2) floats (margins, Hessians and factors).
    `weighting`: "sum" or "mean" (see `subset_l2`). `progress`: a bar over the batches (on stderr).
    """
    members = full_membership(problem, subsets)[:, 1:]
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    l2 = check_l2(l2)
    m = members.shape[0]
    workers = max(1, torch.get_num_threads() if workers is None else int(workers))
    size = max(1, min(batch, -(-m // workers)))  # small jobs still use every worker
    chunks = [members[i:i + size] for i in range(0, m, size)]
    dtype = _working_dtype(problem, members, l2, weighting)
    _anchor(problem, l2)  # fill the caches before any thread needs them
    _group_blocks(problem, dtype)

    def run(chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return solve_flagged(problem, chunk, l2, refinements, dtype=dtype, tol=tol, weighting=weighting)

    from tqdm.auto import tqdm

    bar = tqdm(total=m, desc="estimates", unit="subset", leave=False, dynamic_ncols=True,
               disable=not progress or len(chunks) < 2)

    def counted(chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = run(chunk)
        bar.update(chunk.shape[0])
        return out

    with one_thread():
        if workers == 1 or len(chunks) == 1:
            parts = [counted(c) for c in chunks]
        else:
            with ThreadPoolExecutor(max_workers=min(workers, len(chunks))) as pool:
                parts = list(pool.map(counted, chunks))
        bar.close()
        z = torch.cat([p[0] for p in parts]) if parts else torch.zeros(0, problem.dim)
        converged = torch.cat([p[1] for p in parts]) if parts else torch.zeros(0, dtype=torch.bool)
        loss = linear_loss(problem, z)
        converged &= torch.isfinite(loss) & torch.isfinite(z).all(1)  # NaN meets every tolerance test
        return Estimates(subsets=members, loss=loss, z=z.float(), step=implied_step(problem, z),
                         change=implied_output_change(problem, z), l2=l2, converged=converged)


def estimator(problem: Problem, l2: float, refinements: int = REFINEMENTS, batch: int = 256,
              tol: float = TOL, weighting: str = "sum") -> Callable[[torch.Tensor], torch.Tensor]:
    """The `estimate_fn` that gradex.search expects: (k, n) bool subsets -> (k,) estimated loss."""
    return lambda subsets: estimate(problem, subsets, l2, refinements, batch, tol=tol, weighting=weighting).loss
