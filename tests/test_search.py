"""gradex.search recovers known answers: an exactly additive estimator, and a real Problem."""

from __future__ import annotations

import json

import pytest
import numpy as np
import torch

from gradex.estimate import calibrate_l2, estimator
from gradex.search import (Selection, backward, best, effects, ensemble, exhaustive, forward, random_size_subsets,
                           sample_subsets)
from gradex.testing import synthetic_problem

N = 10
HELPFUL = [0, 3, 7]
HARMFUL = [1, 4, 8]
BETA = torch.zeros(N, dtype=torch.float64)
BETA[HELPFUL] = torch.tensor([-0.30, -0.20, -0.10], dtype=torch.float64)
BETA[HARMFUL] = torch.tensor([0.25, 0.15, 0.10], dtype=torch.float64)
BETA[[2, 5, 6, 9]] = torch.tensor([0.04, 0.03, 0.05, 0.035], dtype=torch.float64)  # mildly harmful


class Additive:
    """f_hat(S) = 1 + sum_{i in S} beta_i + noise; records every call's batch size."""

    def __init__(self, noise: float = 0.0, seed: int = 0):
        self.noise, self.calls = noise, []
        self.g = torch.Generator().manual_seed(seed)

    def __call__(self, subsets: torch.Tensor) -> torch.Tensor:
        assert subsets.dtype == torch.bool and subsets.shape[1] == N
        self.calls.append(subsets.shape[0])
        return 1.0 + subsets.double() @ BETA + self.noise * torch.randn(subsets.shape[0], generator=self.g, dtype=torch.float64)


def test_sample_subsets_sizes_determinism_uniformity():
    s = sample_subsets(12, 3000, 0.5, seed=7)
    assert s.shape == (3000, 12) and s.dtype == torch.bool
    assert (s.sum(1) == 6).all()
    assert torch.equal(s, sample_subsets(12, 3000, 0.5, seed=7))
    assert not torch.equal(s, sample_subsets(12, 3000, 0.5, seed=8))
    freq = s.double().mean(0)
    assert (freq - 0.5).abs().max() < 0.04
    pair = (s[:, 0] & s[:, 1]).double().mean()  # pairs are uniform too: C(10,4)/C(12,6) = 5/22
    assert abs(float(pair) - 5 / 22) < 0.03
    assert (sample_subsets(7, 50, 0.3, 0).sum(1) == 2).all()  # round(2.1) = 2
    assert (sample_subsets(9, 50, 0.3, 0).sum(1) == 3).all()  # round(2.7) = 3, not 2
    assert (sample_subsets(5, 20, 0.01, 0).sum(1) == 1).all()  # at least one
    with pytest.raises(ValueError):
        sample_subsets(5, 20, 0.0, 0)


def test_ensemble_recovers_additive_answer():
    fn = Additive(noise=0.01)
    sel = ensemble(fn, N, m=2000, alpha=0.5, seed=0)
    assert sel.selected == HELPFUL
    assert fn.calls == [2000, 2]  # all sampled subsets in one call, then chosen + empty together
    assert sel.surrogate["r2"] > 0.95
    beta = torch.tensor(sel.surrogate["beta"], dtype=torch.float64)
    assert (beta - (BETA - BETA.mean())).abs().max() < 0.005  # only differences are identifiable
    expected = N / (N - 1) * (BETA - BETA.mean())  # in-minus-out mean for fixed-size subsets
    assert (torch.tensor(sel.scores, dtype=torch.float64) - expected).abs().max() < 0.03
    assert sel.baseline == pytest.approx(1.0, abs=0.05)
    assert sel.estimate == pytest.approx(1.0 + float(BETA[HELPFUL].sum()), abs=0.05)
    assert all(sel.scores[i] < 0 for i in HELPFUL) and all(sel.scores[i] > 0 for i in HARMFUL)
    top = ensemble(Additive(noise=0.01), N, m=2000, alpha=0.5, seed=0, top_k=2)
    assert top.selected == [0, 3]
    json.dumps(sel.to_dict(), allow_nan=False)


def test_ensemble_surrogate_is_the_least_squares_fit_with_an_intercept():
    """Oracle: numpy's least squares on [1, indicators], its beta centered (only differences are
    identifiable with fixed-size subsets), on a noisy additive f_hat with a random subset sample."""
    fn = Additive(noise=0.3)
    sel = ensemble(fn, N, m=60, alpha=0.5, seed=3)
    subsets = sample_subsets(N, 60, 0.5, 3)
    loss = Additive(noise=0.3)(subsets).numpy()
    design = np.hstack([np.ones((60, 1)), subsets.numpy().astype(float)])
    coef, *_ = np.linalg.lstsq(design, loss, rcond=None)
    r2 = 1 - ((loss - design @ coef) ** 2).sum() / ((loss - loss.mean()) ** 2).sum()
    beta = coef[1:] - coef[1:].mean()
    assert sel.surrogate["r2"] == pytest.approx(r2, abs=1e-12)
    np.testing.assert_allclose(sel.surrogate["beta"], beta, atol=1e-12)
    assert sel.surrogate["intercept"] == pytest.approx(coef[0] + coef[1:].mean() * 5, abs=1e-12)  # 5 sources each


def test_ensemble_scores_are_in_minus_out_means():
    fn = Additive()
    sel = ensemble(fn, N, m=64, alpha=0.5, seed=3)
    s = sample_subsets(N, 64, 0.5, 3)
    loss = fn(s)
    for i in range(N):
        assert sel.scores[i] == pytest.approx(float(loss[s[:, i]].mean() - loss[~s[:, i]].mean()))


def test_forward_and_backward_recover_additive_answer():
    fn = Additive()
    sel = forward(fn, N)
    assert sel.selected == HELPFUL
    assert [h["source"] for h in sel.history if h["action"] == "add"] == [0, 3, 7]  # best first
    assert sel.history[-1]["action"] == "stop"
    assert fn.calls == [1, 10, 9, 8, 7]  # one batched call per round
    assert sel.estimate == pytest.approx(1.0 + float(BETA[HELPFUL].sum()))
    assert sel.baseline == pytest.approx(1.0)
    assert all(sel.scores[i] < 0 for i in HELPFUL) and all(sel.scores[i] > 0 for i in HARMFUL)

    fb = Additive()
    sel_b = backward(fb, N)
    assert sel_b.selected == HELPFUL
    assert [h["source"] for h in sel_b.history if h["action"] == "drop"] == [1, 4, 8, 6, 2, 9, 5]  # worst first
    assert fb.calls[0] == 2 and fb.calls[1] == N
    assert sel_b.baseline == pytest.approx(1.0)
    assert all(sel_b.scores[i] < 0 for i in HELPFUL) and all(sel_b.scores[i] > 0 for i in HARMFUL)
    for s in (sel, sel_b):
        d = json.loads(json.dumps(s.to_dict(), allow_nan=False))
        assert set(d) >= {"method", "scores", "selected", "estimate", "baseline", "history", "reason"}


def test_forward_stops_at_its_limit_with_the_best_additions_so_far():
    fn = Additive()
    sel = forward(fn, N, limit=2)
    assert sel.selected == [0, 3]  # the two best of HELPFUL, in the order they were added
    assert fn.calls == [1, 10, 9]  # no third round
    assert sel.estimate == pytest.approx(1.0 + float(BETA[[0, 3]].sum()))
    assert "stopped at the limit of 2 source(s)" in sel.reason
    unlimited = forward(Additive(), N, limit=N)
    assert unlimited.selected == HELPFUL and "no addition lowers" in unlimited.reason
    assert "stopped at the limit of 0 source(s)" in forward(Additive(), N, limit=0).reason  # nothing was tried


def test_forward_stops_at_once_when_nothing_helps():
    def worse(subsets):
        return 1.0 + subsets.double().sum(1)
    sel = forward(worse, 4)
    assert sel.selected == [] and sel.estimate == sel.baseline == 1.0
    assert "stopped" in sel.reason
    assert backward(worse, 4).selected == []


@pytest.fixture(scope="module")
def real():
    p, info = synthetic_problem(n_sources=9, n_train=3000, d=32, n_val=200, seed=1,
                                n_helpful=3, n_harmful=3, p=200_000, theta_norm=8.0, scale=4.0)
    return p, info, estimator(p, calibrate_l2(p, 0.3))


@pytest.mark.parametrize("method", ["ensemble", "effects", "exhaustive", "forward", "backward"])
def test_real_problem_selects_aligned_sources(real, method):
    p, info, fn = real
    if method == "ensemble":
        sel = ensemble(fn, p.n_sources, m=200, alpha=0.5, seed=0)
    elif method == "effects":
        sel = effects(fn, p.n_sources, m=300, seed=0)
    else:
        sel = {"forward": forward, "backward": backward, "exhaustive": exhaustive}[method](fn, p.n_sources)
    assert isinstance(sel, Selection)
    assert not set(sel.selected) & set(info["harmful"]), (sel.selected, info)
    assert set(info["helpful"]) <= set(sel.selected), (sel.selected, info)
    assert sel.estimate < sel.baseline
    json.dumps(sel.to_dict(), allow_nan=False)


def _linear(beta: list[float]):
    """f_hat(S) = 1 + sum_{i in S} beta_i exactly: the answer is {i : beta_i < 0}."""
    b = torch.tensor(beta, dtype=torch.float64)
    return lambda subsets: 1.0 + subsets.double() @ b


CASES = {  # constructed problems with a known answer
    "all help": ([-0.3, -0.2, -0.1, -0.05, -0.02], [0, 1, 2, 3, 4]),
    "all hurt": ([0.3, 0.2, 0.1, 0.05, 0.02], []),
    "mixed": ([-0.3, 0.2, -0.1, 0.05, -0.02], [0, 2, 4]),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("rule", ["exhaustive", "effects", "forward", "backward"])
def test_absolute_rules_recover_the_known_answer(rule, case):
    beta, answer = CASES[case]
    fn = _linear(beta)
    sel = {"exhaustive": lambda: exhaustive(fn, 5), "effects": lambda: effects(fn, 5, m=300, seed=0),
           "forward": lambda: forward(fn, 5), "backward": lambda: backward(fn, 5)}[rule]()
    assert sel.selected == answer
    assert not sel.worse_than_target and sel.estimate <= sel.baseline
    assert sel.estimate == pytest.approx(1.0 + sum(beta[i] for i in answer))


def test_the_papers_rule_is_relative_and_says_so():
    """The paper's fixed-size ensemble keeps sources better than the average one: it drops helpful
    sources when all help and keeps some harmful ones when all hurt; the reason flags the latter."""
    help_all = ensemble(_linear(CASES["all help"][0]), 5, m=400, alpha=0.6, seed=0)
    assert help_all.selected == [0, 1]
    hurt_all = ensemble(_linear(CASES["all hurt"][0]), 5, m=400, alpha=0.6, seed=0)
    assert hurt_all.selected == [2, 3, 4] and hurt_all.worse_than_target and "WARNING" in hurt_all.reason


def test_exhaustive_scores_are_average_marginal_effects_and_it_refuses_large_n():
    beta = [-0.3, 0.2, -0.1, 0.05]
    fn = _linear([b for b in beta])
    sel = exhaustive(fn, 4)
    assert sel.scores == pytest.approx(beta)  # for an additive f_hat the average effect is beta_i itself
    assert sel.history[0]["members"] == [0, 2] and sel.history[0]["loss"] == pytest.approx(0.6)
    # a non-additive estimator: the score is the mean of f(S + i) - f(S) over every S without i
    def pairwise(subsets):
        s = subsets.double()
        return 1.0 + s @ torch.tensor(beta, dtype=torch.float64) + 0.4 * s[:, 0] * s[:, 1]
    inter = exhaustive(pairwise, 4)
    assert inter.scores[0] == pytest.approx(-0.3 + 0.2) and inter.scores[2] == pytest.approx(-0.1)
    with pytest.raises(ValueError, match="too many"):
        exhaustive(fn, 17)


def test_random_size_subsets_cover_every_size():
    s = random_size_subsets(6, 4000, seed=1)
    sizes = torch.bincount(s.sum(1), minlength=7).double() / 4000
    assert (sizes - 1 / 7).abs().max() < 0.03
    assert (s.double().mean(0) - 0.5).abs().max() < 0.03
    assert torch.equal(s, random_size_subsets(6, 4000, seed=1))


def test_best_is_exhaustive_up_to_the_limit_and_forward_beyond_it():
    rng = np.random.default_rng(3)
    effect = torch.tensor(rng.normal(0, 1, 6))

    def fn(subsets: torch.Tensor) -> torch.Tensor:  # additive: both searches find the negative effects
        return 1.0 + subsets.double() @ effect

    small = best(fn, 6)
    assert small.method == "exhaustive" and small.selected == exhaustive(fn, 6).selected
    assert small.selected == [i for i in range(6) if effect[i] < 0]
    large = best(fn, 6, limit=4)
    assert large.method == "forward" and large.selected == forward(fn, 6).selected == small.selected
    assert "too many to estimate all 2^6 subsets" in large.reason


def test_stepwise_reasons_name_the_sources_in_the_order_they_moved():
    """Issue 17 saw a selection's reason say '#43' for a source; given names, every stepwise reason names
    them, in the order of the history (forward: added best first; backward: dropped worst first)."""
    names = [f"task-{c}" for c in "abcdefghij"]
    added = [names[i] for i in (0, 3, 7)]
    dropped = [names[i] for i in (1, 4, 8, 6, 2, 9, 5)]
    assert f"in order {added};" in forward(Additive(), N, names=names).reason
    assert f"in order {dropped};" in backward(Additive(), N, names=names).reason
    large = best(Additive(), N, limit=4, names=names)
    assert large.method == "forward" and f"in order {added};" in large.reason
    assert "#" not in large.reason and "in order ['#0', '#3', '#7'];" in forward(Additive(), N).reason
