"""The comparison's statistics and baselines, against oracles (scipy) and constructed inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradex.baselines import mean_cosines, random_mix, top_k
from gradex.compare import SELECTED, Mix, estimate_check, judge, paired_interval, summarize, verdict


def test_paired_interval_matches_scipys_one_sample_t_interval():
    from scipy import stats

    diffs = [0.12, 0.05, 0.21, -0.02, 0.09]
    got = paired_interval(diffs)
    oracle = stats.ttest_1samp(diffs, 0.0).confidence_interval(0.95)
    assert got["low"] == pytest.approx(oracle.low) and got["high"] == pytest.approx(oracle.high)
    assert got["mean"] == pytest.approx(np.mean(diffs)) and got["sd"] == pytest.approx(np.std(diffs, ddof=1))
    one = paired_interval([0.3])
    assert one["low"] is None and judge(one) == "untested"
    assert judge({"low": 0.01, "high": 0.2}) == "better" and judge({"low": -0.3, "high": -0.1}) == "worse"
    assert judge({"low": -0.1, "high": 0.2}) == "tie"


def test_summarize_pairs_by_seed_and_orients_gains_towards_the_selection():
    mixes = [Mix(SELECTED, "selection", [["a"]] * 3), Mix("all", "baseline", [["a", "b"]] * 3),
             Mix("random", "baseline", [["b"], ["a"], ["b"]])]
    rows = []
    for seed, (sel, base, rnd) in enumerate([(0.20, 0.40, 0.30), (0.25, 0.42, 0.26), (0.22, 0.41, 0.35)]):
        for name, loss, score in ((SELECTED, sel, 0.6), ("all", base, 0.4), ("random", rnd, 0.5 + seed / 10)):
            rows.append({"mix": name, "seed": seed, "test_loss": loss, "test_score": score, "validation_loss": loss})
    out = {m["name"]: m for m in summarize(mixes, rows)}
    assert "diff_loss" not in out[SELECTED]
    assert out["all"]["diff_loss"]["mean"] == pytest.approx(np.mean([0.20, 0.17, 0.19]))
    assert out["all"]["verdict_loss"] == "better" and out["all"]["verdict_score"] == "better"
    assert out["random"]["diff_score"]["mean"] == pytest.approx(np.mean([0.1, 0.0, -0.1]))
    assert out["random"]["verdict_score"] == "tie"
    assert out["random"]["sizes"] == [1, 1, 1] and out["all"]["test_loss"]["mean"] == pytest.approx(0.41)
    text = verdict(list(out.values()), "exact match")
    assert "on test loss gradex's selection beat all" in text and "tied random within the 95% interval" in text
    single = summarize(mixes, [r for r in rows if r["seed"] == 0])
    assert "no verdict" in verdict(single, "exact match")


def test_estimate_check_scores_each_distinct_mix_once_against_its_seed_mean():
    def row(members, seed, est, real):
        return {"members": members, "seed": seed, "estimate": est, "validation_loss": real}

    rows = [row(["a"], 0, 0.30, 0.32), row(["a"], 1, 0.30, 0.28),  # real mean 0.30: error 0
            row(["b"], 0, 0.20, 0.25), row([], 0, 0.50, 0.40), row(["a", "b"], 0, 0.10, 0.20)]
    got = estimate_check(rows)
    est, real = [0.30, 0.20, 0.50, 0.10], [0.30, 0.25, 0.40, 0.20]
    assert got["mixes"] == 4
    assert got["spearman"] == pytest.approx(1.0)
    assert got["pearson"] == pytest.approx(np.corrcoef(est, real)[0, 1])
    assert got["mean_abs_rel_error"] == pytest.approx(np.mean([0, 0.05 / 0.25, 0.1 / 0.4, 0.1 / 0.2]))
    assert estimate_check(rows[:3]) is None  # two distinct mixes: no correlation to speak of


def test_random_mixes_are_seeded_and_of_the_requested_size():
    sources = [f"s{i}" for i in range(10)]
    draws = [random_mix(sources, 4, f"0:random:{s}") for s in range(20)]
    assert all(len(d) == 4 and len(set(d)) == 4 and set(d) <= set(sources) for d in draws)
    assert all(d == sorted(d, key=sources.index) for d in draws)  # in source order
    assert draws == [random_mix(sources, 4, f"0:random:{s}") for s in range(20)]
    assert len({tuple(d) for d in draws}) > 10  # fresh draws per seed
    assert random_mix(sources, 0, "x") == [] and random_mix(sources, 10, "x") == sources


def test_similarity_ranks_a_planted_source_first():
    """A constructed store: the target's gradients share a direction t; source `twin` points along t,
    `anti` against it, the rest are noise. Cosine of means must rank twin first and anti last."""
    g = torch.Generator().manual_seed(0)
    d = 64
    t = torch.randn(d, generator=g)
    def rows(mean, n=30):
        return mean + 0.5 * torch.randn(n, d, generator=g)
    names = ["n1", "twin", "n2", "anti", "n3"]
    parts = {"target:validation": rows(t), "twin": rows(t * 0.8), "anti": rows(-t)}
    for n in ("n1", "n2", "n3"):
        parts[n] = rows(torch.randn(d, generator=g))
    features = torch.cat(list(parts.values())).numpy()
    groups = [name for name, block in parts.items() for _ in range(len(block))]
    scores = mean_cosines(features, groups, names, "target:validation")
    assert max(scores, key=scores.get) == "twin" and min(scores, key=scores.get) == "anti"
    assert scores["twin"] > 0.9 and scores["anti"] < -0.9
    assert "twin" in top_k(scores, 2) and "anti" not in top_k(scores, 4)
    assert top_k(scores, 1) == ["twin"] and top_k(scores, 0) == []
    with pytest.raises(ValueError, match="no rows"):
        mean_cosines(features, groups, names + ["missing"], "target:validation")


def test_forward_finetunes_counts_every_subset_a_forward_search_evaluates():
    from gradex.compare import price
    from gradex.stages.compare import forward_finetunes

    n, helpful = 6, {1: -0.3, 4: -0.2}  # an additive loss: two sources help, the rest hurt

    def fn(subsets: torch.Tensor) -> torch.Tensor:
        effect = torch.tensor([helpful.get(j, 0.1) for j in range(n)])
        return 1.0 + subsets.double() @ effect.double()

    # the target alone, then round 1 (6 candidates, adds 1), round 2 (5, adds 4), round 3 (4, none helps)
    assert forward_finetunes(fn, n) == 1 + 6 + 5 + 4
    cost = price(selection_seconds=100.0, finetune_seconds=50.0, forward_finetunes=16)
    assert cost == {"forward_finetunes": 16, "by_finetuning_seconds": 800.0, "speedup": 8.0,
                    "overhead_vs_finetune": 2.0}
    assert price(None, 50.0, 16)["speedup"] is None  # a stage time unknown: no ratio
