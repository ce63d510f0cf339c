"""The selection's stability (gradex.stability) against oracles: the bootstrap distribution of a
group's mean is known exactly, so the share of resamples that select a source is too."""

from __future__ import annotations

import math

import pytest
import torch

from gradex.estimate import Estimates, Problem, estimate
from gradex.stability import FLIPS, STABLE, bootstrap, resample, separation, stability, stability_lines


def _problem(groups: list[list[float]], v: int = 8, d: int = 4, seed: int = 0) -> Problem:
    """Rows of group g carry the offsets groups[g] (group 0: the target's train split)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.tensor([x for g in groups for x in g])
    group = torch.tensor([g for g, rows in enumerate(groups) for _ in rows])
    return Problem(x=torch.randn(len(u), d, generator=gen), u=u, group=group, x_val=torch.randn(v, d, generator=gen),
                   u_val=torch.randn(v, generator=gen), n_sources=len(groups) - 1)


def _mean_u(p: Problem, subsets: torch.Tensor) -> Estimates:
    """A stand-in estimator whose 'loss' of a subset is the sum of its members' mean offsets."""
    means = torch.stack([p.u[p.group == j + 1].double().mean() for j in range(p.n_sources)])
    loss = subsets.double() @ means
    k = len(subsets)
    return Estimates(subsets=subsets, loss=loss, z=torch.zeros(k, p.dim), step=torch.zeros(k), change=torch.zeros(k),
                     l2=1.0, converged=torch.ones(k, dtype=torch.bool))


def _keep_negative(fn) -> tuple[list[int], list[float]]:
    """Keep every source whose own estimate is below zero; its score is that estimate."""
    n = 3
    scores = fn(torch.eye(n, dtype=torch.bool)).tolist()
    return [j for j in range(n) if scores[j] < 0], scores


def test_a_resample_keeps_every_group_and_its_size_and_draws_from_it():
    p = _problem([[0.0] * 5, [1.0] * 3, [2.0] * 4, [3.0] * 2], v=6)
    gen = torch.Generator().manual_seed(1)
    r = resample(p, gen)
    assert torch.equal(r.group, p.group)  # sizes kept, each group one block in order
    assert all(float(r.u[i]) == float(r.group[i]) for i in range(len(r.u)))  # rows stay in their own group
    assert r.x_val.shape == p.x_val.shape and r.n_sources == 3
    rows = {tuple(x.tolist()) for x in p.x_val}
    assert all(tuple(x.tolist()) in rows for x in r.x_val)  # validation rows drawn from the validation rows
    again = resample(p, torch.Generator().manual_seed(1))
    assert torch.equal(again.x, r.x) and torch.equal(again.x_val, r.x_val)


def test_the_share_of_resamples_that_select_a_source_matches_the_bootstrap_probability():
    # source 0 always helps, source 1 helps when a resample draws at least 2 of its 3 rows from the two
    # -1s: probability 3 (2/3)^2 (1/3) + (2/3)^3 = 20/27, and source 2 never does
    p = _problem([[0.0] * 4, [-1.0, -1.0], [-1.0, -1.0, 1.0], [1.0, 1.0]])
    found = bootstrap(p, _mean_u, _keep_negative, chosen=[0, 1], resamples=600, seed=3)
    share = found["share"]
    assert share[0] == 1.0 and share[2] == 0.0
    assert share[1] == pytest.approx(20 / 27, abs=0.06)  # 3 standard errors at 600 resamples
    assert found["uncertain"] == ([1] if share[1] < STABLE else [])
    assert found["stability"] == share[1]  # the least-often selected of the chosen sources
    assert found["score_interval"][0] == [-1.0, -1.0] and found["score_interval"][2] == [1.0, 1.0]
    low, high = found["score_interval"][1]
    # the mean of 3 draws from (-1, -1, 1) is 1 with probability 1/27 (3.7%, above the 2.5% tail)
    assert low == pytest.approx(-1.0) and high == pytest.approx(1.0)
    assert found["estimate_interval"][0] == pytest.approx(-2.0)


def test_an_empty_selection_is_as_stable_as_the_resamples_that_kept_it_empty():
    p = _problem([[0.0] * 4, [1.0, 1.0], [1.0, -1.0, 1.0], [1.0]])
    found = bootstrap(p, _mean_u, _keep_negative, chosen=[], resamples=300, seed=0)
    # source 1's mean is below zero when 2 or 3 of its 3 draws are the -1: 3 (1/3)^2 (2/3) + (1/3)^3 = 7/27
    assert found["stability"] == pytest.approx(20 / 27, abs=0.075)  # 3 standard errors at 300 resamples
    assert found["share"][1] == pytest.approx(7 / 27, abs=0.075)
    assert found["share"][0] == found["share"][2] == 0.0
    assert found["uncertain"] == ([1] if found["share"][1] > FLIPS else [])  # left out, yet often selected


def test_a_source_that_flips_in_exactly_a_fifth_of_the_resamples_is_not_uncertain():
    """"More than 20%" on both sides, at the default 50 resamples: a selected source dropped in 10 of 50
    and a left-out one picked in 10 of 50 are stable; 11 of 50 is not."""
    p = _problem([[0.0] * 4, [-1.0], [1.0]])
    for flips, uncertain in ((10, []), (11, [0, 1])):
        calls = iter(range(50))

        def choose(fn, flips=flips):
            b = next(calls)  # resamples b < flips drop source 0 (selected) and pick source 1 (left out)
            return ([1] if b < flips else [0]), [0.0, 0.0]

        found = bootstrap(p, _mean_u, choose, chosen=[0], resamples=50, seed=0)
        assert found["share"] == [1 - flips / 50, flips / 50]
        assert found["uncertain"] == uncertain


def test_separation_compares_the_selection_with_its_best_one_source_change():
    p = _problem([[0.5] * 6, [0.2] * 5, [-0.3] * 5, [0.1] * 5], v=12, seed=2)

    def fit(prob, subsets):
        return estimate(prob, subsets, l2=1.0)

    sep = separation(p, fit, chosen=[0], resamples=200, seed=0)
    flips = torch.tensor([[False, False, False], [True, True, False], [True, False, True]])
    loss = estimate(p, torch.cat([torch.tensor([[True, False, False]]), flips]), l2=1.0).loss
    j = int(torch.argmin(loss[1:]))
    assert sep["changed"] == j and sep["runner_up"] == flips[j].nonzero().flatten().tolist()
    assert sep["added"] == (j != 0) and sep["validation_examples"] == 12
    assert sep["difference"] == pytest.approx(float(loss[j + 1] - loss[0]), rel=1e-5)
    low, high = sep["interval"]
    assert low <= sep["difference"] <= high or math.isclose(low, high)
    assert sep["separated"] == (low > 0)
    # one validation example repeated: every resample is the split itself, the interval is a point
    same = Problem(x=p.x, u=p.u, group=p.group, x_val=p.x_val[:1].repeat(12, 1), u_val=p.u_val[:1].repeat(12),
                   n_sources=3)
    point = separation(same, fit, chosen=[0], resamples=50, seed=0)
    assert point["interval"][0] == pytest.approx(point["interval"][1]) == pytest.approx(point["difference"], rel=1e-5)


def test_stability_names_sources_and_says_what_is_uncertain():
    p = _problem([[0.0] * 4, [-1.0, -1.0], [-1.0, -1.0, 1.0], [1.0, 1.0]])
    found = stability(p, _mean_u, _keep_negative, [0, 1], 200, 0, ["a", "b", "c"])
    assert set(found["share"]) == {"a", "b", "c"} and found["share"]["a"] == 1.0
    body = {"selected": ["a", "b"], "stability": {**found, "uncertain": ["b"]}}
    lines = stability_lines(body)
    assert lines[0] == (f"uncertain (200 bootstrap resamples of the store): b (selected, yet "
                        f"{found['share']['b']:.0%} of resamples selected it)")
    assert stability_lines({"selected": []}) == []
