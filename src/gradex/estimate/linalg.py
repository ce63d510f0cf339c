"""Linear algebra the solver and the calibration share: single-threaded LAPACK, robust Cholesky."""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def one_thread():
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


def cholesky(A: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factors of a batch (..., d, d) of systems H + 2 l2 I, in A's dtype, robustly.

    They are positive definite in exact arithmetic (l2 > 0), not always in floating point: float32
    rounding, or an l2 far below the curvature of a rank-deficient H (fewer examples than
    dimensions, collinear gradients), leaves a pivot at zero or below. A matrix that fails is redone
    in float64, then with a growing shift (JITTER) of its diagonal. Every caller can use a shifted
    factor: the refinement only preconditions with it (its fixed point is grad = 0 whatever the
    factor), `exact_fit` line-searches the (damped, still descent) step it gives, and the
    one-shot step moves by at most the shift's relative size. LU-based solves are no alternative:
    they hit an MKL pivot error on 2-thread CPUs.
    """
    batch = A.reshape(-1, *A.shape[-2:])
    with one_thread():
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


def chol_solve(L: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(L L^T)^-1 g for a batch, g (m, d). Two triangular solves: ~10x faster than
    torch.cholesky_solve for a single right-hand side on this CPU (measured)."""
    with one_thread():
        y = torch.linalg.solve_triangular(L, g.unsqueeze(-1), upper=False)
        return torch.linalg.solve_triangular(L.mT, y, upper=True).squeeze(-1)
