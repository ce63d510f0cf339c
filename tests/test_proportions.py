"""Proportions (gradex.estimate.proportions) against oracles: natural proportions are the subset
estimates under the mean weighting, the gradient is the finite difference of the estimate, and the
optimum is no worse than any start, inside its caps and its distance from a prior."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradex.estimate import estimate
from gradex.estimate.proportions import counts, feasible, fit, natural, optimize, rounded, sizes
from gradex.testing import synthetic_problem

L2 = 20.0


@pytest.fixture(scope="module")
def problem():
    prob, info = synthetic_problem(n_sources=5, n_train=1_500, d=16, n_val=120, seed=3, n_helpful=2, n_harmful=2)
    return prob


def test_natural_proportions_of_a_subset_are_its_estimate_under_the_mean_weighting(problem):
    subsets = torch.tensor([[True] * 5, [True, False, True, False, False], [False] * 5])
    est = estimate(problem, subsets, L2, refinements=50, tol=1e-12, weighting="mean")
    for row, want in zip(subsets, est.loss.tolist()):
        members = torch.cat([torch.tensor([True]), row])
        assert fit(problem, natural(problem, members), L2).loss == pytest.approx(want, rel=1e-7)


def test_the_gradient_is_the_finite_difference_of_the_estimate(problem):
    gen = torch.Generator().manual_seed(0)
    p = torch.rand(problem.n_sources + 1, generator=gen, dtype=torch.float64) + 0.2
    p /= p.sum()
    found = fit(problem, p, L2)
    for g in range(problem.n_sources + 1):
        h = 1e-5
        e = torch.zeros_like(p)
        e[g] = h
        up, down = fit(problem, (p + e) / (1 + h), L2), fit(problem, (p - e) / (1 - h), L2)
        # (p + e) / (1 + h) moves along e - h p: the directional derivative is grad . (e - h p) / h
        want = (up.loss - down.loss) / (2 * h)
        got = float(found.gradient[g] - found.gradient.dot(p))
        assert got == pytest.approx(want, rel=1e-4, abs=1e-9)


def test_the_optimum_beats_every_start_and_stays_in_its_caps(problem):
    best_subset = torch.tensor([True, True, True, False, False, False], dtype=torch.bool)  # target + 2 sources
    start = natural(problem, best_subset)
    upper = torch.full((problem.n_sources + 1,), 0.5, dtype=torch.float64)
    found = optimize(problem, L2, upper=upper, starts={"subset": start})
    assert float(found.p.sum()) == pytest.approx(1.0)
    assert bool((found.p >= 0).all()) and bool((found.p <= 0.5 + 1e-9).all())
    assert found.loss <= min(found.starts.values()) + 1e-12
    assert found.loss <= fit(problem, natural(problem), L2).loss  # below all sources in natural proportions
    # every start's own optimum is a local one: a random feasible point near it is no better
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        q = (found.p + 0.01 * torch.rand(found.p.shape, generator=gen, dtype=torch.float64)).clamp(0, 0.5)
        q /= q.sum()
        if bool((q <= 0.5).all()):
            assert fit(problem, q, L2).loss >= found.loss - 1e-6


def test_a_prior_and_max_shift_bound_the_distance(problem):
    prior = natural(problem)
    found = optimize(problem, L2, prior=prior, max_shift=0.1)
    assert float((found.p - prior).abs().sum()) / 2 <= 0.1 + 1e-6
    free = optimize(problem, L2)
    assert free.loss <= found.loss + 1e-9  # a constraint cannot help
    assert float((free.p - prior).abs().sum()) / 2 > 0.1  # and here it binds


def test_rounding_never_leaves_max_shift_of_the_prior(problem):
    """An optimum on the max_shift boundary that gives a small share to a source: dropping that share
    (select.min_share) would move the mix off the boundary, past max_shift, so the proportions stay
    as the optimizer found them. Oracle: the total variation distance to the prior."""
    prior = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.195, 0.005], dtype=torch.float64)
    found = optimize(problem, L2, prior=prior, max_shift=0.05)
    assert float((found.p - prior).abs().sum()) / 2 == pytest.approx(0.05, abs=1e-6)  # it binds
    assert bool(((found.p > 0) & (found.p < 0.01)).any())  # a share min_share would drop
    assert float((rounded(found.p, 0.01) - prior).abs().sum()) / 2 > 0.05 + 1e-6  # what dropping it does
    assert torch.equal(rounded(found.p, 0.01, prior=prior, max_shift=0.05), found.p)
    inside = rounded(found.p, 0.01, prior=prior, max_shift=0.2)  # room to spare: rounded as ever
    assert torch.equal(inside, rounded(found.p, 0.01)) and not torch.equal(inside, found.p)


def test_a_prior_share_on_a_group_without_examples_is_refused(problem):
    """The target's group is empty under data.clusters from target_train: a prior share there could
    never be drawn, and max_shift, measured over the groups with examples, would not see it."""
    from dataclasses import replace

    from gradex.config import Config, ConfigError
    from gradex.proportions import check

    keep = problem.group != 0
    empty = replace(problem, x=problem.x[keep], u=problem.u[keep], group=problem.group[keep])
    prior = torch.tensor([0.4, 0.15, 0.15, 0.15, 0.15, 0.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="a group with no training examples"):
        optimize(empty, L2, prior=prior, max_shift=0.1)
    cfg = Config()
    cfg.select.prior, cfg.select.max_shift = {"t": 0.4, "a": 0.6}, 0.1
    with pytest.raises(ConfigError, match=r"select.prior: \['t'\] have no training examples"):
        check(cfg, {"t": 0, "a": 30}, 32)


def test_a_floor_on_the_target_binds_and_holds(problem):
    """select.target_floor's mechanism: the target's share never falls below its floor; where the free
    optimum lies below it, the floored one sits on it, and is no better than the free one."""
    free = optimize(problem, L2)
    floor = min(0.9, float(free.p[0]) + 0.3)
    lower = torch.zeros(problem.n_sources + 1, dtype=torch.float64)
    lower[0] = floor
    found = optimize(problem, L2, lower=lower)
    assert float(found.p[0]) >= floor - 1e-9 and float(found.p.sum()) == pytest.approx(1.0)
    assert float(found.p[0]) == pytest.approx(floor, abs=1e-6)  # it binds
    assert free.loss <= found.loss + 1e-9
    # rounding keeps a floored share even below min_share, and only raises it
    p = torch.tensor([0.004, 0.992, 0.004], dtype=torch.float64)
    out = rounded(p, 0.01, lower=torch.tensor([0.004, 0.0, 0.0], dtype=torch.float64))
    assert out[0] >= 0.004 and out[2] == 0
    assert "floor lies above its cap" in feasible(torch.ones(3, dtype=torch.float64) * 0.5,
                                                   lower=torch.tensor([0.6, 0.0, 0.0], dtype=torch.float64))


def test_infeasible_caps_are_refused_with_the_reason(problem):
    upper = torch.full((problem.n_sources + 1,), 0.1, dtype=torch.float64)
    assert "sum to 0.6" in feasible(upper)
    with pytest.raises(ValueError, match="caps sum to 0.6"):
        optimize(problem, L2, upper=upper)


def test_counts_sum_to_the_budget_by_largest_remainder():
    assert counts([0.5, 0.25, 0.25], 10) == [5, 3, 2]  # 2.5 and 2.5: the first remainder wins the tie
    assert sum(counts([1 / 3] * 3, 100)) == 100
    assert counts([1.0, 0.0], 7) == [7, 0]
    assert sum(counts([0.25, 0.25, 0.25, 0.2500009], 2_000_000)) == 2_000_000  # a sum 1e-6 off 1, at a large total


def test_rounding_drops_shares_below_the_floor():
    p = torch.tensor([0.6, 0.395, 0.005], dtype=torch.float64)
    assert rounded(p, 0.01).tolist() == pytest.approx([0.6 / 0.995, 0.395 / 0.995, 0.0])


def test_an_empty_group_gets_no_share_and_bad_proportions_are_refused(problem):
    p = natural(problem)
    with pytest.raises(ValueError, match="sum to 1"):
        fit(problem, p * 2, L2)
    assert math.isclose(float(sizes(problem).sum()), problem.x.shape[0])
    assert np.isfinite(fit(problem, p, L2).loss)


def test_rounding_stays_within_the_caps():
    p = torch.tensor([0.5, 0.45, 0.05], dtype=torch.float64)
    out = rounded(p, 0.1, upper=torch.tensor([0.5, 1.0, 1.0], dtype=torch.float64))
    assert out.tolist() == pytest.approx([0.5, 0.5, 0.0])


def test_weights_end_to_end_select_finetune_compare_and_the_mixture(tmp_path, tiny_model_dir):
    """select.method weights on the tiny run: proportions on the simplex within max_repeats, written
    to selection.json and mixture.yaml; the final fine-tune samples the budget's examples in those
    shares (counted against the oracle `counts`); compare measures them against the best subset,
    equal shares and all sources."""
    import json

    import yaml

    from conftest import tiny_run_config
    from gradex import pipeline
    from gradex.comparison import SELECTED
    from gradex.finetunes import mix_indices

    cfg = tiny_run_config(tmp_path, tiny_model_dir)
    cfg.select.method, cfg.select.max_repeats, cfg.select.bootstrap = "weights", 2.0, 4
    cfg.compare.baselines = ["all"]
    body = pipeline.select(cfg)
    shares = body["proportions"]
    assert list(shares) == ["add", "add_more", "mul", "sub"] and sum(shares.values()) == pytest.approx(1.0)
    run = pipeline.Run(cfg)
    budget = body["mixture"]["budget_examples"]
    assert budget == pipeline.budget_steps(run) * cfg.finetune.batch_size
    sizes = {"add": 20, "add_more": 24, "mul": 24, "sub": 24}
    assert all(shares[n] * budget <= 2.0 * sizes[n] + 1e-6 for n in sizes)  # max_repeats
    assert all(v == 0 or v >= cfg.select.min_share for v in shares.values())
    assert body["estimate"] <= body["best_subset"]["estimate"] + 1e-9 or body["caps"]  # the best subset is a start
    # select.target_floor (on by default): the target keeps at least its share in the best subset
    floor = sizes["add"] / sum(sizes[n] for n in ["add", *body["best_subset"]["selected"]])
    assert body["target_floor"] == pytest.approx(min(floor, body["caps"]["add"]))
    assert shares["add"] >= body["target_floor"] - 1e-9
    assert set(body["stability"]["proportion_interval"]) == set(sizes)
    on_disk = yaml.safe_load((cfg.run_dir / "mixture.yaml").read_text())
    assert on_disk["probabilities"] == pytest.approx([shares[n] for n in on_disk["datasets"]])
    # the fine-tune's examples: `counts` of each, drawn from that group only
    idx = mix_indices(run, body["selected"], 0, shares)
    by = {n: sum(run.examples[i].source == n for i in idx) for n in sizes}
    want = dict(zip(on_disk["datasets"], counts([shares[n] for n in on_disk["datasets"]], budget)))
    assert {n: c for n, c in by.items() if c} == want and len(idx) == budget
    assert mix_indices(run, body["selected"], 0, shares) == idx != mix_indices(run, body["selected"], 1, shares)
    result = pipeline.compare(cfg, seeds=2)
    names = {n for m in result["mixes"] for n in m.get("same_mix", [m["name"]])}
    assert {SELECTED, "gradex[best]", "uniform", "all[uniform]", "all"} <= names
    final = json.loads((cfg.run_dir / "final" / "metrics.json").read_text())
    assert final["proportions"] == shares and final["examples"] == budget
    rows = [r for r in result["rows"] if r["mix"] == SELECTED]
    assert all(r["proportions"] == shares and r["estimate"] == pytest.approx(body["estimate"]) for r in rows)
    # what a person reads: `gradex run`'s summary and report.html name the shares
    from gradex.cli import format_summary
    from gradex.report import write

    text = format_summary(pipeline.run_all(cfg))
    given = [n for n in sizes if shares[n] > 0]
    assert "in proportions " + ", ".join(f"{n} {shares[n]:.1%}" for n in given) in text
    html = write(cfg.run_dir).read_text()
    assert "In proportions, for a budget of" in html and "given a share in" in html
    status = {r["stage"]: r for r in pipeline.status(cfg)}  # the proportions are part of the fine-tunes' keys
    assert status["finetune"]["state"] == status["compare"]["state"] == "done"
    assert status["fine-tunes"]["why"] == f"{len({r['key'] for r in result['rows']})} done in finetunes/"


def test_a_target_floor_a_prior_cannot_reach_within_max_shift_names_both(tmp_path, tiny_model_dir):
    """The floor (the target's share in the best subset) is known only at select: a prior that gives
    the target nothing, within a max_shift below that floor, is a ConfigError naming
    select.target_floor, not a bare ValueError from the optimizer."""
    from conftest import tiny_run_config
    from gradex import pipeline
    from gradex.config import ConfigError

    cfg = tiny_run_config(tmp_path, tiny_model_dir)
    cfg.select.method, cfg.select.bootstrap = "weights", 0
    cfg.select.prior, cfg.select.max_shift = {"add": 0.0, "add_more": 0.4, "mul": 0.3, "sub": 0.3}, 0.1
    with pytest.raises(ConfigError, match=r"select.target_floor: the target keeps at least its share in the best "
                                          r"subset \(0\.\d+\), and then the caps and floors force a shift of at least"):
        pipeline.select(cfg)
    cfg.select.target_floor = False  # what the error says to do
    assert pipeline.select(cfg)["proportions"]["add"] <= 0.1 + 1e-6


def test_a_budget_in_tokens_sets_the_steps_of_every_fine_tune(tmp_path, tiny_model_dir):
    """finetune.max_tokens: steps = tokens / (batch_size x the all-sources mix's mean example length),
    rounded up, counted here from the prepared tokens."""
    from conftest import tiny_run_config
    from gradex import pipeline

    cfg = tiny_run_config(tmp_path, tiny_model_dir)
    cfg.finetune.max_tokens = 3_000
    run = pipeline.prepare(cfg)
    idx = run.train_indices(run.sources)
    mean = sum(len(run.tokens[i].ids) for i in idx) / len(idx)
    assert pipeline.budget_steps(run) == math.ceil(3_000 / (cfg.finetune.batch_size * mean))
    assert "finetune.max_tokens 3000" in pipeline.recipe_summary(run)["description"]


def test_natural_proportions_are_the_subset_itself(tmp_path, tiny_model_dir):
    """A mix whose shares are its members' natural ones is that subset pooled as it is: the same
    fine-tune key, so compare shows it once ("same mix"), never as a comparison with itself."""
    from conftest import tiny_run_config
    from gradex import pipeline
    from gradex.finetunes import plain

    cfg = tiny_run_config(tmp_path, tiny_model_dir)
    run = pipeline.prepare(cfg)
    n_add = len(run.train_indices([]))  # the target's train split
    n_mul = len(run.train_indices(["mul"])) - n_add
    natural_shares = {"add": n_add / (n_add + n_mul), "mul": n_mul / (n_add + n_mul)}
    assert plain(run, natural_shares) is None
    assert pipeline.finetune_key(run, ["mul"], 0, natural_shares) == pipeline.finetune_key(run, ["mul"], 0)
    other = {"add": 0.5, "mul": 0.5}
    assert plain(run, other) == other and pipeline.finetune_key(run, ["mul"], 0, other) != pipeline.finetune_key(run, ["mul"], 0)
    assert plain(run, {"mul": 1.0}) == {"mul": 1.0}  # the target left out: not a subset's own proportions
