"""gradex.estimate against independent oracles: scipy L-BFGS (with offsets) and scikit-learn (without)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from gradex.estimate import (Problem, calibrate_l2, estimate, estimator, implied_step, linear_loss, solve,
                             solve_flagged)
from gradex.testing import exact_solve, synthetic_problem

ROOT = Path(__file__).resolve().parents[1]


def random_problem(seed: int = 0, n_sources: int = 6, per_source: int = 150, n_target: int = 200,
                   d: int = 24, n_val: int = 120, x_scale: float = 1.0, zero_offsets: bool = False) -> Problem:
    """Small unstructured problem: source-specific means, offsets like real mean log-odds."""
    g = torch.Generator().manual_seed(seed)
    sizes = [n_target] + [per_source] * n_sources
    group = torch.cat([torch.full((s,), i, dtype=torch.long) for i, s in enumerate(sizes)])
    means = torch.randn(n_sources + 1, d, generator=g) * 0.6
    x = (means[group] + torch.randn(len(group), d, generator=g)) * x_scale
    u = torch.zeros(len(group)) if zero_offsets else 1.5 + 1.5 * torch.randn(len(group), generator=g)
    x_val = (means[0] + torch.randn(n_val, d, generator=g)) * x_scale
    u_val = 1.5 + 1.5 * torch.randn(n_val, generator=g)
    return Problem(x=x, u=u, group=group, x_val=x_val, u_val=u_val, n_sources=n_sources)


def random_subsets(n: int, m: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(m, n, generator=g) < 0.5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


L2 = 100.0  # margins move by ~0.7 on average: one Newton step is visibly off, refinement needed


@pytest.fixture(scope="module")
def prob() -> Problem:
    return random_problem()


@pytest.fixture(scope="module")
def oracle(prob):
    subsets = random_subsets(prob.n_sources, 24)
    subsets[0] = False  # target alone
    subsets[1] = True  # everything
    # distinct subsets: the losses of duplicates tie exactly, and their order is rounding noise
    subsets = torch.cat([subsets[:2], torch.unique(subsets[2:], dim=0)])
    subsets = subsets[[0, 1, *[i for i in range(2, len(subsets)) if subsets[i].any() and not subsets[i].all()]]]
    z = torch.stack([exact_solve(prob, s, L2) for s in subsets])
    return subsets, z


@pytest.mark.parametrize("tol, z_err, loss_err", [(1e-5, 1e-4, 2e-5), (None, 2e-2, 2e-3)])
def test_solve_matches_scipy_with_offsets(prob, oracle, tol, z_err, loss_err):
    # tight tolerance: float32 agreement; the default (TOL): the accuracy docs/method.md promises
    subsets, z_ref = oracle
    z = solve(prob, subsets, L2) if tol is None else solve(prob, subsets, L2, tol=tol)
    for k in range(len(subsets)):
        assert rel(z[k], z_ref[k]) < z_err, (k, rel(z[k], z_ref[k]))
    loss, loss_ref = linear_loss(prob, z), linear_loss(prob, z_ref)
    assert float(((loss - loss_ref) / loss_ref).abs().max()) < loss_err
    assert spearmanr(loss.numpy(), loss_ref.numpy())[0] >= 0.999


def test_exact_solve_is_a_stationary_point(prob, oracle):
    # the oracle itself: gradient of the exact objective vanishes at its answer
    subsets, z_ref = oracle
    for s, z in zip(subsets[:4], z_ref[:4]):
        keep = torch.cat([torch.ones(1, dtype=torch.bool), s])[prob.group]
        x, u = prob.x[keep].double(), prob.u[keep].double()
        grad = -(torch.sigmoid(-(u + x @ z)) @ x) + 2 * L2 * z
        assert float(grad.norm()) < 1e-6 * float((torch.sigmoid(-u) @ x).norm())


def test_newton_step_starts_at_the_all_sources_fit(prob, oracle):
    # every subset's quadratic model is taken at the exact all-sources fit, so for the all-sources
    # subset itself the one-shot step is already exact
    subsets, z_ref = oracle
    z0 = solve(prob, subsets[1:2], L2, refinements=0)
    assert bool(subsets[1].all()) and rel(z0[0], z_ref[1]) < 1e-5


def test_one_newton_step_is_close_and_refinement_improves(prob, oracle):
    subsets, z_ref = oracle
    errors = []
    for steps in range(5):
        z = solve(prob, subsets, L2, refinements=steps, tol=0.0)
        errors.append(max(rel(z[k], z_ref[k]) for k in range(1, len(subsets))))
    assert errors[0] < 0.25  # one Newton step from z = 0 is already close ...
    assert errors[0] > 1e-2  # ... but visibly not exact at this l2 (else the test proves nothing)
    for a, b in zip(errors, errors[1:]):  # ... and every refinement step helps until float32 noise
        assert b < a or b < 1e-5, errors
    assert errors[3] < errors[0] / 100
    plain = max(rel(solve(prob, subsets, L2, refinements=3, tol=0.0, scaled=False)[k], z_ref[k])
                for k in range(1, len(subsets)))
    assert errors[0] / 10 > plain > errors[3]  # the fixed-Hessian iteration converges, the scaled one faster


def test_zero_offsets_match_sklearn():
    sklearn = pytest.importorskip("sklearn.linear_model")
    p = random_problem(seed=3, zero_offsets=True)
    l2 = 100.0
    for s in random_subsets(p.n_sources, 4, seed=5):
        keep = torch.cat([torch.ones(1, dtype=torch.bool), s])[p.group]
        x = p.x[keep].double().numpy()
        # every label positive = flip the sign of half the rows and call them negatives (no intercept)
        flip = np.arange(len(x)) % 2 == 1
        xs = np.where(flip[:, None], -x, x)
        y = (~flip).astype(int)
        clf = sklearn.LogisticRegression(C=1 / (2 * l2), fit_intercept=False, tol=1e-12, max_iter=10_000)
        clf.fit(xs, y)
        z_sk = torch.from_numpy(clf.coef_[0])
        assert rel(solve(p, s[None], l2)[0], z_sk) < 1e-3
        assert rel(exact_solve(p, s, l2), z_sk) < 1e-5


def test_float64_path_and_batching_agree(prob, oracle):
    subsets, z_ref = oracle
    z64 = solve(prob, subsets, L2, refinements=8, dtype=torch.float64, tol=1e-12)
    assert max(rel(z64[k], z_ref[k]) for k in range(1, len(subsets))) < 1e-6
    threads = torch.get_num_threads()
    a = estimate(prob, subsets, L2, batch=5, workers=2, tol=1e-5)
    b = estimate(prob, subsets, L2, batch=256, workers=1, tol=1e-5)
    assert torch.get_num_threads() == threads  # estimate runs single-threaded inside, then restores
    # the inner solves share one preconditioner per batch and stop at a tolerance: batches agree to
    # within it (here 1e-5 relative in z), not bit for bit
    assert torch.allclose(a.loss, b.loss, rtol=1e-5)
    assert a.subsets.shape == subsets.shape and a.z.shape == (len(subsets), prob.dim)


def test_estimates_fields(prob):
    c = torch.linspace(0.5, 2.0, prob.dim)
    p = Problem(x=prob.x, u=prob.u, group=prob.group, x_val=prob.x_val, u_val=prob.u_val,
                n_sources=prob.n_sources, col_sq_norms=c, theta_norm=3.0)
    subsets = random_subsets(p.n_sources, 7)
    e = estimate(p, subsets, L2)
    assert e.l2 == L2 and e.loss.shape == (7,) and e.step.shape == (7,)
    manual_loss = torch.nn.functional.softplus(-(p.u_val.double()[:, None] + p.x_val.double() @ e.z.double().T)).mean(0)
    assert torch.allclose(e.loss, manual_loss)
    assert torch.allclose(e.step, (e.z.double().square() @ c.double()).sqrt() / 3.0)
    assert torch.allclose(implied_step(p, e.z), e.step)
    assert torch.allclose(estimator(p, L2)(subsets), e.loss)
    # target alone: z depends on target-train examples only
    z0 = solve(p, torch.zeros(1, p.n_sources, dtype=torch.bool), L2)[0]
    only_target = Problem(x=p.x[p.group == 0], u=p.u[p.group == 0], group=p.group[p.group == 0],
                          x_val=p.x_val, u_val=p.u_val, n_sources=0)
    assert rel(z0, exact_solve(only_target, torch.zeros(0, dtype=torch.bool), L2)) < 1e-3


@pytest.mark.parametrize("step_size", [0.02, 0.3])
def test_calibrate_l2_hits_requested_step(step_size):
    p, _ = synthetic_problem(n_sources=5, n_train=1500, d=24, n_val=100, seed=2, p=50_000, theta_norm=5.0, scale=3.0)
    l2 = calibrate_l2(p, step_size)
    everything = torch.ones(p.n_sources, dtype=torch.bool)
    exact_step = float(implied_step(p, exact_solve(p, everything, l2))[0])
    assert abs(exact_step / step_size - 1) < 0.01
    est_step = float(estimate(p, everything[None], l2, refinements=10).step[0])
    assert abs(est_step / step_size - 1) < 0.01


@pytest.mark.parametrize("change", [0.05, 0.5])
def test_calibrate_l2_hits_requested_output_change(change):
    from gradex.estimate import implied_output_change

    p, _ = synthetic_problem(n_sources=5, n_train=1500, d=24, n_val=100, seed=2, p=50_000, theta_norm=5.0, scale=3.0)
    l2 = calibrate_l2(p, output_change=change)
    everything = torch.ones(p.n_sources, dtype=torch.bool)
    z = exact_solve(p, everything, l2)
    rms = float((p.x.double() @ z).square().mean().sqrt())  # the definition, from the raw rows
    assert abs(rms / change - 1) < 0.01
    assert float(implied_output_change(p, z)[0]) == pytest.approx(rms, rel=1e-9)
    assert float(estimate(p, everything[None], l2, refinements=10).change[0]) == pytest.approx(change, rel=0.01)


@pytest.mark.parametrize("seed", range(5))
def test_calibrate_l2_with_fewer_examples_than_dimensions(seed):
    # As in a small real run (40 examples, d=256): H_all is singular, and the bracket's tiny-l2 end
    # must not blow rounding noise in its null space up into a zero or NaN size.
    from gradex.estimate import implied_output_change

    p = random_problem(seed=seed, n_sources=3, per_source=8, n_target=16, d=256, n_val=10)
    l2 = calibrate_l2(p, output_change=0.3)
    z = exact_solve(p, torch.ones(p.n_sources, dtype=torch.bool), l2)
    assert float(implied_output_change(p, z)[0]) == pytest.approx(0.3, rel=0.01)


def test_calibrate_l2_is_monotone_and_rejects_bad_input(prob):
    l_small, l_big = calibrate_l2(prob, 0.05), calibrate_l2(prob, 0.5)
    assert l_small > l_big > 0
    assert calibrate_l2(prob, output_change=0.05) > calibrate_l2(prob, output_change=0.5)
    with pytest.raises(ValueError):
        calibrate_l2(prob, 0.0)
    with pytest.raises(ValueError, match="exactly one"):
        calibrate_l2(prob, 0.1, output_change=0.1)
    with pytest.raises(ValueError):
        solve(prob, torch.zeros(2, prob.n_sources + 1, dtype=torch.bool), L2)
    with pytest.raises(ValueError):
        solve(prob, torch.zeros(2, prob.n_sources, dtype=torch.bool), 0.0)
    with pytest.raises(ValueError):
        Problem(x=prob.x, u=prob.u, group=prob.group + 10, x_val=prob.x_val, u_val=prob.u_val,
                n_sources=prob.n_sources)


def test_spearman_on_synthetic_problem_with_calibrated_l2():
    p, _ = synthetic_problem(n_sources=8, n_train=2500, d=32, n_val=150, seed=4, p=100_000, theta_norm=4.0, scale=4.0)
    l2 = calibrate_l2(p, 0.3)
    subsets = random_subsets(p.n_sources, 24, seed=9)
    loss = estimate(p, subsets, l2).loss
    loss_ref = linear_loss(p, torch.stack([exact_solve(p, s, l2) for s in subsets]))
    assert spearmanr(loss.numpy(), loss_ref.numpy())[0] >= 0.999


def test_benchmark_quick_smoke(tmp_path):
    out = tmp_path / "estimate.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "estimate.py"), "--quick", "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    last = json.loads(res.stdout.strip().splitlines()[-1])
    for key in ("subsets_per_s", "sklearn_subsets_per_s", "speedup", "spearman_vs_sklearn",
                "max_rel_diff_vs_sklearn", "l2", "machine", "command", "notes"):
        assert key in last
    assert last["spearman_vs_sklearn"] > 0.99
    assert json.loads(out.read_text())["l2"] == last["l2"]


def test_exact_coordinates_keep_every_inner_product():
    from gradex.estimate import exact_coordinates

    gen = torch.Generator().manual_seed(3)
    g = torch.randn(12, 5000, generator=gen, dtype=torch.float64)
    g[11] = g[0] + g[1]  # rank 11: the redundant direction must be dropped, not kept as noise
    x = exact_coordinates(g.float().numpy(), chunk=1024)
    assert x.shape == (12, 11)
    gram = (g.float() @ g.float().T).double()
    torch.testing.assert_close(x.double() @ x.double().T, gram, rtol=1e-4, atol=1e-2)


def test_mean_weighting_matches_scipy_at_each_subsets_own_l2(prob, oracle):
    """`mean` weighting is the sum objective with l2 scaled by the subset's share of the examples:
    the oracle solves each subset exactly at that l2."""
    from gradex.estimate import subset_l2

    subsets, _ = oracle
    l2s = subset_l2(prob, subsets, L2, "mean")
    counts = torch.bincount(prob.group).double()
    assert l2s[1] == pytest.approx(L2) and l2s[0] == pytest.approx(L2 * counts[0] / counts.sum())
    z_ref = torch.stack([exact_solve(prob, s, float(l2)) for s, l2 in zip(subsets, l2s)])
    z = solve(prob, subsets, L2, tol=1e-5, weighting="mean")
    for k in range(len(subsets)):
        assert rel(z[k], z_ref[k]) < 1e-4, (k, rel(z[k], z_ref[k]))
    est = estimate(prob, subsets, L2, tol=1e-5, weighting="mean")
    torch.testing.assert_close(est.loss, linear_loss(prob, z_ref), rtol=2e-5, atol=0)
    # the all-sources fit is the same under both weightings; a smaller subset is regularized less
    # under "mean", so it moves further than under "sum"
    z_sum = solve(prob, subsets, L2, tol=1e-5)
    assert rel(z[1], z_sum[1]) < 1e-4
    assert float(z[0].norm()) > float(z_sum[0].norm())
    with pytest.raises(ValueError, match="weighting"):
        subset_l2(prob, subsets, L2, "median")


# ---------------------------------------------------------------------------- ill-conditioned problems


def duplicated_problem(seed: int = 0, n_sources: int = 4, per_source: int = 100, n_target: int = 120,
                       k: int = 12, n_val: int = 60) -> Problem:
    """Every gradient repeated in two halves (x = [a, a]): H is exactly singular, so at a tiny l2 its
    systems H + 2 l2 I are not positive definite in floating point, while the margins, hence the
    losses, are well defined (the fit does not depend on the null direction [v, -v])."""
    g = torch.Generator().manual_seed(seed)
    sizes = [n_target] + [per_source] * n_sources
    group = torch.cat([torch.full((s,), i, dtype=torch.long) for i, s in enumerate(sizes)])
    means = torch.randn(n_sources + 1, k, generator=g) * 0.6
    a = means[group] + torch.randn(len(group), k, generator=g)
    a_val = means[0] + torch.randn(n_val, k, generator=g)
    return Problem(x=torch.cat([a, a], 1), u=1.5 + 1.5 * torch.randn(len(group), generator=g), group=group,
                   x_val=torch.cat([a_val, a_val], 1), u_val=1.5 + 1.5 * torch.randn(n_val, generator=g),
                   n_sources=n_sources)


def test_cholesky_falls_back_on_matrices_rounding_made_indefinite():
    from gradex.estimate.linalg import cholesky

    g = torch.Generator().manual_seed(0)
    b = torch.randn(6, 3, generator=g, dtype=torch.float64)
    singular = b @ b.T + 1e-18 * torch.eye(6, dtype=torch.float64)  # rank 3: float64 cannot factor it
    assert int(torch.linalg.cholesky_ex(singular)[1]) != 0
    fine = torch.eye(6, dtype=torch.float64) * 2
    L = cholesky(torch.stack([fine, singular]))
    assert torch.equal(L[0], torch.linalg.cholesky(fine))  # a matrix that factors is left as it is
    rebuilt = L[1] @ L[1].T
    shift = float((rebuilt - singular).diagonal().mean())
    assert 0 < shift <= 1e-6 * float(singular.diagonal().mean())  # the smallest shift that works
    torch.testing.assert_close(rebuilt - shift * torch.eye(6, dtype=torch.float64), singular, atol=1e-12, rtol=0)
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        cholesky(torch.full((2, 2), float("nan")))


def test_estimate_at_a_tiny_l2_on_a_singular_hessian_matches_the_oracle():
    """Was: LinAlgError from the exact all-sources fit (`exact_fit`, then `_newton_single`, had no fallback), then from the
    shared preconditioner and the per-subset factors; and float32 refinement blew rounding noise in
    the null space up into z ~ 1e12 that looked converged."""
    p = duplicated_problem()
    l2 = 1e-17
    subsets = torch.cat([torch.ones(1, p.n_sources, dtype=torch.bool), random_subsets(p.n_sources, 7, seed=1)])
    est = estimate(p, subsets, l2, tol=1e-5, workers=1)
    ref = linear_loss(p, torch.stack([exact_solve(p, s, l2) for s in subsets]))
    err = ((est.loss - ref) / ref).abs()
    assert float(err[0]) < 1e-6  # all sources: the exact fit itself, through the jittered Cholesky
    assert bool(est.converged.any()) and float(err[est.converged].max()) < 1e-4
    assert torch.isfinite(est.z).all() and float(est.z.norm(dim=1).max()) < 10


def test_converged_flags_the_subsets_that_met_tol():
    """Under mean weighting small subsets land far from the all-sources anchor and need more steps
    than 2: those are flagged, and every subset flagged converged is as accurate as `tol` promises."""
    p = random_problem(seed=2)
    subsets = torch.cat([torch.eye(p.n_sources, dtype=torch.bool), random_subsets(p.n_sources, 12, seed=3)])
    from gradex.estimate import subset_l2

    l2s = subset_l2(p, subsets, L2, "mean")
    ref = linear_loss(p, torch.stack([exact_solve(p, s, float(l2)) for s, l2 in zip(subsets, l2s)]))
    capped = estimate(p, subsets, L2, refinements=2, tol=1e-5, weighting="mean")
    err = ((capped.loss - ref) / ref).abs()
    assert capped.converged.dtype == torch.bool and capped.converged.shape == (len(subsets),)
    assert 0 < int(capped.converged.sum()) < len(subsets)
    assert float(err[capped.converged].max()) < 1e-4
    assert float(err[~capped.converged].max()) > float(err[capped.converged].max())
    assert not estimate(p, subsets, L2, refinements=0).converged.any()  # one step measures nothing
    full = estimate(p, subsets, L2, tol=1e-5, weighting="mean")
    assert bool(full.converged.all()) and float(((full.loss - ref) / ref).abs().max()) < 1e-4


def test_calibrate_l2_refuses_a_size_beyond_reach_instead_of_a_singular_fit():
    """Two pairs of opposite gradients with unequal offsets: as l2 -> 0 the fit's output change tends
    to a finite limit (sqrt(6.5) = 2.55), but one Newton step overshoots it, so the search used to
    widen toward l2 = 0 until the Hessian (rank 2 of 8) was singular: an uncaught LinAlgError."""
    from gradex.estimate import implied_output_change

    x = torch.zeros(4, 8)
    x[0, 0], x[1, 0], x[2, 1], x[3, 1] = 1.0, -1.0, 1.0, -1.0
    u = torch.tensor([-3.0, 3.0, -2.0, 2.0])
    p = Problem(x=x, u=u, group=torch.tensor([0, 0, 1, 1]), x_val=x[:2], u_val=u[:2], n_sources=1)
    with pytest.raises(ValueError, match=r"more than the all-sources fit reaches: 2\.55"):
        calibrate_l2(p, output_change=3.0)
    l2 = calibrate_l2(p, output_change=2.0)  # within reach: found as before
    z = exact_solve(p, torch.ones(1, dtype=torch.bool), l2)
    assert float(implied_output_change(p, z)[0]) == pytest.approx(2.0, rel=1e-3)


def test_a_non_finite_store_is_an_error_not_a_converged_estimate():
    bad = random_problem(n_sources=3, per_source=40, n_target=40, n_val=20)
    bad.u[5] = float("nan")  # one training example's output (gradex.surrogate.problem checks the store's rows)
    with pytest.raises(FloatingPointError, match="objective is nan"):
        estimate(bad, torch.ones(2, 3, dtype=torch.bool), L2)


def test_an_exact_fit_stopped_by_its_cap_warns():
    from gradex.estimate.calibrate import UnconvergedFit, exact_fit

    small = random_problem(n_sources=3, per_source=40, n_target=40, n_val=20)
    members = torch.ones(4, dtype=torch.bool)
    with pytest.warns(UnconvergedFit, match="stopped after 1 steps"):
        exact_fit(small, members, 1.0, max_iter=1)
    with pytest.warns(UnconvergedFit, match="stopped after 0 steps, Newton decrement nan"):  # none computed
        exact_fit(small, members, 1.0, max_iter=0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UnconvergedFit)  # the default cap converges: no warning
        exact_fit(small, members, 1.0)


def test_lower_triangles_unpack_to_the_lower_half():
    from gradex.estimate.solver import lower, unpack_lower

    A = torch.randn(3, 7, 7)
    assert torch.equal(unpack_lower(lower(A), 7), A.tril())


@pytest.mark.parametrize("lower_only", [True, False])
def test_factored_one_step_at_many_sources_matches_a_dense_solve(monkeypatch, lower_only):
    """With many sources per dimension `_Systems` factors every subset's system, formed from the
    packed lower triangles or whole; the one Newton step must equal z_all + (H_S + 2 l2 I)^-1
    (b_S - 2 l2 z_all), solved here in float64 by numpy from the same group sums."""
    from gradex.estimate import solver as solver_mod
    from gradex.estimate.problem import full_membership
    from gradex.estimate.solver import _anchor

    monkeypatch.setattr(solver_mod, "LOWER_ONLY", lower_only)

    prob = random_problem(seed=3, n_sources=40, per_source=30, n_target=60, d=12)
    subsets = random_subsets(40, 16, seed=5)
    z = solve(prob, subsets, L2, refinements=0).double()
    an = _anchor(prob, L2)
    members = full_membership(prob, subsets).double()
    H = an["H"].view(-1, 12, 12)
    for k in range(len(subsets)):
        A = torch.einsum("g,gij->ij", members[k], H) + 2 * L2 * torch.eye(12, dtype=torch.float64)
        rhs = members[k] @ an["b"] - 2 * L2 * an["z"]
        want = an["z"] + torch.from_numpy(np.linalg.solve(A.numpy(), rhs.numpy()))
        assert rel(z[k], want) < 1e-5


def test_a_system_conjugate_gradients_cannot_finish_is_solved_by_its_factor_in_the_same_call():
    """Systems whose groups span 7 decades of curvature at a tiny l2: CG stops at its iteration cap,
    and those subsets get a Cholesky factor. The answer of that very call must already be the
    factor's, equal to a dense solve (numpy, float64), never CG's unfinished iterate."""
    from gradex.estimate.solver import _Systems

    gen = torch.Generator().manual_seed(0)
    d, groups = 48, 5
    H = []
    for _ in range(groups):
        Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
        curvature = torch.logspace(-4, 3, d, dtype=torch.float64)[torch.randperm(d, generator=gen)]
        H.append((Q * curvature) @ Q.T)
    H = torch.stack(H)
    members = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 0, 0, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    l2 = torch.full((4,), 1e-4, dtype=torch.float64)
    G = torch.randn(4, d, generator=gen, dtype=torch.float64)
    systems = _Systems(H, members, l2, torch.float64)
    V = systems.solve(G, rtol=1e-5)
    assert bool(systems.direct.any())  # CG did give up on some: what this test is about
    for k in range(4):
        A = H[members[k]].sum(0) + 2 * l2[k] * torch.eye(d, dtype=torch.float64)
        want = torch.from_numpy(np.linalg.solve(A.numpy(), G[k].numpy()))
        assert rel(V[k], want) < 1e-6


def test_a_subset_flagged_converged_is_within_a_few_tol_of_the_exact_fit():
    """The refinement stops when its error left, estimated from its contraction, is below tol. One
    secant-scaled step that lands near the optimum makes the next update small and a single ratio
    tiny: judged on it alone, subsets stopped at up to 66x tol on these small, stiff problems (l2 far
    below their curvature). Oracle: scipy's exact fit of each subset."""
    subsets = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    tol, worst, flagged = 1e-6, 0.0, 0
    for seed in range(6):
        for l2, n_target in ((0.5, 1), (0.5, 60), (5.0, 1)):
            p = random_problem(seed=seed, n_sources=3, per_source=50, n_target=n_target, d=6, n_val=30)
            z, converged = solve_flagged(p, subsets, l2, 8, dtype=torch.float64, tol=tol)
            for k in converged.nonzero().squeeze(1).tolist():
                worst = max(worst, rel(z[k], exact_solve(p, subsets[k], l2)) / tol)
                flagged += 1
    assert flagged >= 60 and worst < 10
