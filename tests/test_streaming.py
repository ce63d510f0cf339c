"""Big stores: the statistics are streamed in chunks, a memory-mapped store gives the same estimates as
one in memory, row order does not matter, and the solver's two ways of solving a batch agree."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradex import search
from gradex.estimate import Problem, calibrate_l2, estimate
from gradex.estimate import solver as solver_mod
from gradex.estimate.calibrate import exact_fit
from gradex.estimate.problem import group_sums, second_moment
from gradex.testing import exact_solve, synthetic_problem


@pytest.fixture(scope="module")
def prob() -> Problem:
    return synthetic_problem(n_sources=12, n_train=3_000, d=24, n_val=200, seed=3)[0]


def naive_sums(problem: Problem, z: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
    """The oracle: every group's sums from its own rows, all of them at once, in numpy float64."""
    x = problem.x.numpy().astype(np.float64)
    m = problem.u.numpy().astype(np.float64) + (0 if z is None else x @ z.numpy())
    s = 1 / (1 + np.exp(-m))
    w, r = s * (1 - s), 1 - s
    n1, d = problem.n_sources + 1, problem.dim
    H, b = np.zeros((n1, d, d)), np.zeros((n1, d))
    for i in range(n1):
        rows = problem.group.numpy() == i
        H[i] = (x[rows] * w[rows, None]).T @ x[rows]
        b[i] = r[rows] @ x[rows]
    return H.reshape(n1, d * d), b


def shuffled(problem: Problem, seed: int = 0) -> Problem:
    perm = torch.randperm(problem.x.shape[0], generator=torch.Generator().manual_seed(seed))
    return Problem(x=problem.x[perm], u=problem.u[perm], group=problem.group[perm], x_val=problem.x_val,
                   u_val=problem.u_val, n_sources=problem.n_sources)


@pytest.mark.parametrize("chunk", [1, 7, 1000, 10**6])
@pytest.mark.parametrize("at_zero", [True, False])
def test_chunked_group_sums_equal_one_shot_sums(prob, chunk, at_zero):
    z = None if at_zero else torch.randn(prob.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.3
    H_ref, b_ref = naive_sums(prob, z)
    for p in (prob, shuffled(prob)):  # grouped rows are sliced, scattered ones sorted within each chunk
        H, b = group_sums(p, z, chunk=chunk)
        np.testing.assert_allclose(H.numpy(), H_ref, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(b.numpy(), b_ref, rtol=1e-12, atol=1e-12)


def test_streamed_second_moment_equals_the_dense_one(prob):
    x = prob.x.double()
    fresh = Problem(x=prob.x, u=prob.u, group=prob.group, x_val=prob.x_val, u_val=prob.u_val, n_sources=prob.n_sources)
    torch.testing.assert_close(second_moment(fresh), x.T @ x / x.shape[0], rtol=1e-12, atol=1e-12)


def test_memory_mapped_store_gives_identical_estimates(prob, tmp_path):
    np.save(tmp_path / "x.npy", prob.x.numpy())
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    assert isinstance(mapped, np.memmap)
    on_disk = Problem(x=torch.from_numpy(mapped), u=prob.u, group=prob.group, x_val=prob.x_val, u_val=prob.u_val,
                      n_sources=prob.n_sources)
    in_memory = Problem(x=prob.x.clone(), u=prob.u, group=prob.group, x_val=prob.x_val, u_val=prob.u_val,
                        n_sources=prob.n_sources)
    subsets = search.sample_subsets(prob.n_sources, 40, 0.5, seed=2)
    results = []
    for p in (on_disk, in_memory):
        l2 = calibrate_l2(p, output_change=0.3)
        results.append((l2, estimate(p, subsets, l2, weighting="mean")))
    (l2_a, a), (l2_b, b) = results
    assert l2_a == l2_b
    assert torch.equal(a.loss, b.loss) and torch.equal(a.z, b.z)


def test_row_order_does_not_change_the_estimates(prob):
    subsets = search.sample_subsets(prob.n_sources, 30, 0.5, seed=4)
    l2 = calibrate_l2(prob, output_change=0.3)
    a = estimate(prob, subsets, l2, weighting="mean")
    b = estimate(shuffled(prob, seed=5), subsets, l2, weighting="mean")
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=0)


def test_exact_fit_with_a_float32_hessian_reaches_the_oracle(prob):
    members = torch.zeros(prob.n_sources + 1, dtype=torch.bool)
    members[[0, 2, 3, 7]] = True
    l2 = calibrate_l2(prob, output_change=0.3)
    z = exact_fit(prob, members, l2)
    ref = exact_solve(prob, members[1:], l2)
    torch.testing.assert_close(z, ref.double(), rtol=1e-6, atol=1e-8)


def test_factored_and_conjugate_gradient_batches_agree(prob, monkeypatch):
    """A batch is solved by CG or, when its subsets hold many groups, by one Cholesky factor each:
    both converge to the same fixed point (the refinement's), so their estimates agree to `tol`."""
    subsets = search.sample_subsets(prob.n_sources, 50, 0.5, seed=6)
    l2 = calibrate_l2(prob, output_change=0.3)
    out = {}
    for mode, per_dim in (("cg", 0), ("direct", 10**9)):
        monkeypatch.setattr(solver_mod, "DIRECT_GROUPS_PER_DIM", per_dim)
        out[mode] = estimate(prob, subsets, l2, weighting="mean", tol=1e-7)
    torch.testing.assert_close(out["direct"].loss, out["cg"].loss, rtol=1e-5, atol=0)
    assert bool(out["direct"].converged.all()) and bool(out["cg"].converged.all())



def test_exact_fit_carrying_a_hessian_reaches_the_same_fit_with_fewer_hessians(prob, monkeypatch):
    """calibrate_l2's fits hand their Hessian to the next (a chord method): the fit is the oracle's,
    and a warm fit at a nearby l2 computes no Hessian of its own."""
    from gradex.estimate import calibrate as calibrate_mod

    hessians: list[bool] = []
    real = calibrate_mod._pass

    def counting(problem, rows, z, l2, gradient, hessian=False, dtype=torch.float64):
        hessians.append(hessian)
        return real(problem, rows, z, l2, gradient, hessian, dtype)

    monkeypatch.setattr(calibrate_mod, "_pass", counting)
    members = torch.ones(prob.n_sources + 1, dtype=torch.bool)
    l2 = calibrate_l2(prob, output_change=0.3)
    carry: dict = {}
    z1 = exact_fit(prob, members, l2, carry=carry)
    hessians.clear()
    z2 = exact_fit(prob, members, 1.5 * l2, z0=z1, carry=carry)
    carried = sum(hessians)
    torch.testing.assert_close(z2, exact_solve(prob, members[1:], 1.5 * l2).double(), rtol=1e-6, atol=1e-8)
    hessians.clear()
    z3 = exact_fit(prob, members, 1.5 * l2, z0=z1)  # no carry: its own first Hessian, the same answer
    assert carried == 0 < sum(hessians)
    torch.testing.assert_close(z2, z3, rtol=1e-6, atol=1e-9)  # both stop at the same decrement tolerance
