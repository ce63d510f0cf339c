"""The estimation problem: training examples' projected gradients and offsets tagged by group, the
target validation rows, and the statistics every solver and calibration reads from them.

Also the quantities derived from a fit z of one subset: its linear-estimate target loss, the implied
weight change ||P z|| / ||theta*|| and the implied change of the training outputs, and each subset's
own regularization under a weighting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch


@dataclass
class Problem:
    """One subset-selection problem: training examples tagged by group, plus target validation.

    `col_sq_norms` (c_k = squared norm of column k of the projection P) turns z into the size of the
    real weight change ||P z|| ~ sqrt(sum_k c_k z_k^2); `theta_norm` is ||theta*|| of the trainable
    weights, so steps are reported relative to the model they would change.
    """

    # (N, d) float32 training examples' projected gradients; may wrap a memory map (torch.from_numpy
    # of np.load(..., mmap_mode="r")): every statistic reads it in chunks (`row_chunks`)
    x: torch.Tensor
    u: torch.Tensor  # (N,) offsets (mean log-odds of the model's answer)
    group: torch.Tensor  # (N,) long, 0 = target train, 1..n = sources
    x_val: torch.Tensor  # (V, d) target validation examples
    u_val: torch.Tensor  # (V,)
    n_sources: int
    col_sq_norms: torch.Tensor | None = None  # (d,), None means all ones
    theta_norm: float = 1.0
    # Cached per-group sufficient statistics (see `stats_at_zero`); not part of the problem's identity.
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


# Rows per pass of the streaming statistics: 65,536 x 256 float64 is 128 MB, so a store of any size
# costs a few such blocks of memory beyond the store itself (which may be a memory map).
CHUNK = 65_536


def row_chunks(problem: Problem, rows: torch.Tensor | None = None,
               chunk: int = CHUNK) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The training rows (all, or the sorted positions `rows`) as blocks (x, u, group) of at most
    `chunk` rows, in order and in the store's dtype (callers convert a block at a time). One pass
    reads the store once: it may be a memory map, so nothing of size N x d is ever copied, let alone
    held in float64 (2 GB at N = 10^6, d = 256)."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    total = problem.x.shape[0] if rows is None else rows.numel()
    for lo in range(0, total, chunk):
        hi = min(total, lo + chunk)
        if rows is None:
            sl = slice(lo, hi)
            yield problem.x[sl], problem.u[sl], problem.group[sl]
        else:
            idx = rows[lo:hi]
            yield problem.x[idx], problem.u[idx], problem.group[idx]


def group_sums(problem: Problem, z: torch.Tensor | None = None,
               chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group sufficient statistics of the objective's quadratic model at z (default 0), float64.

    H_i = sum_{s in group i} w_s x_s x_s^T with w_s = sigma(m_s) sigma(-m_s), m_s = u_s + x_s . z -> (n+1, d*d)
    b_i = sum_{s in group i} sigma(-m_s) x_s                                                  -> (n+1, d)

    One streaming pass over the rows, `chunk` at a time (the result does not depend on `chunk`
    beyond float64 summation order); within a chunk the rows of each group are gathered by one
    stable sort, so a store written source by source costs one product per group and chunk.
    """
    d, n1 = problem.dim, problem.n_sources + 1
    H = torch.zeros(n1, d, d, dtype=torch.float64)
    b = torch.zeros(n1, d, dtype=torch.float64)
    z64 = None if z is None else z.double()
    for xc, uc, gc in row_chunks(problem, chunk=chunk):
        xc, uc = xc.double(), uc.double()
        m = uc if z64 is None else uc + xc @ z64
        w = torch.sigmoid(m) * torch.sigmoid(-m)
        r = torch.sigmoid(-m)
        if bool((gc[1:] >= gc[:-1]).all()):
            order = None  # already grouped: slices, no copy
            ids, counts = torch.unique_consecutive(gc, return_counts=True)
        else:
            order = torch.argsort(gc, stable=True)
            ids, counts = torch.unique_consecutive(gc[order], return_counts=True)
        lo = 0
        for i, c in zip(ids.tolist(), counts.tolist()):
            sel = slice(lo, lo + c) if order is None else order[lo:lo + c]
            xi = xc[sel]
            H[i].addmm_((xi * w[sel, None]).T, xi)
            b[i].add_(r[sel] @ xi)
            lo += c
    return H.reshape(n1, d * d), b


def stats_at_zero(problem: Problem) -> dict[str, torch.Tensor]:
    """The all-sources sums at z = 0, H = sum_s w_s x_s x_s^T (d, d) and b = sum_s sigma(-u_s) x_s (d,),
    float64, one streaming pass, cached: calibration's closed-form first guess. Totals, not per-group
    sums: the per-group ones would cost (n+1) d^2 floats (8.4 GB at n = 1,000, d = 1,024) for a sum."""
    if "H0" not in problem._cache:
        d = problem.dim
        H = torch.zeros(d, d, dtype=torch.float64)
        b = torch.zeros(d, dtype=torch.float64)
        for xc, uc, _ in row_chunks(problem):
            xc, uc = xc.double(), uc.double()
            w = torch.sigmoid(uc) * torch.sigmoid(-uc)
            H.addmm_((xc * w[:, None]).T, xc)
            b.add_(torch.sigmoid(-uc) @ xc)
        problem._cache.update(H0=H, b0=b)
    return {"H": problem._cache["H0"], "b": problem._cache["b0"]}


def full_membership(problem: Problem, subsets: torch.Tensor) -> torch.Tensor:
    """(m, n) source membership -> (m, n+1) bool with the target-train column 0 always on."""
    subsets = torch.as_tensor(subsets)
    if subsets.ndim == 1:
        subsets = subsets.unsqueeze(0)
    if subsets.ndim != 2 or subsets.shape[1] != problem.n_sources:
        raise ValueError(f"subsets must be (m, {problem.n_sources}) bool, got shape {tuple(subsets.shape)}")
    ones = torch.ones(subsets.shape[0], 1, dtype=torch.bool)
    return torch.cat([ones, subsets.bool()], dim=1)


def check_l2(l2: float) -> float:
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
    members = full_membership(problem, subsets)
    l2 = check_l2(l2)
    if weighting == "sum":
        return torch.full((members.shape[0],), l2, dtype=torch.float64)
    counts = torch.bincount(problem.group, minlength=problem.n_sources + 1).double()
    sizes = members.double() @ counts
    # A subset with no training examples (the empty one when the target train group 0 is empty, as
    # under data.clusters.from target_train) has no data term: any positive l2 keeps its fit at z = 0,
    # theta* itself, as the sum weighting does; l2 * 0 would leave its system singular.
    return torch.where(sizes > 0, l2 * sizes / counts.sum(), torch.full_like(sizes, l2))


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


def implied_output_change(problem: Problem, z: torch.Tensor) -> torch.Tensor:
    """Root-mean-square over the training examples of x_s . z, the predicted change of u_s, per row of z."""
    z = torch.as_tensor(z).double()
    if z.ndim == 1:
        z = z.unsqueeze(0)
    C = second_moment(problem)
    return ((z @ C) * z).sum(1).clamp_min(0).sqrt()


def second_moment(problem: Problem) -> torch.Tensor:
    """C = X^T X / N over the training examples (float64, cached, one streaming pass): RMS(X z) = sqrt(z^T C z)."""
    if "C" not in problem._cache:
        d = problem.dim
        C = torch.zeros(d, d, dtype=torch.float64)
        for xc, _, _ in row_chunks(problem):
            xc = xc.double()
            C.addmm_(xc.T, xc)
        problem._cache["C"] = C / max(1, problem.x.shape[0])
    return problem._cache["C"]


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
