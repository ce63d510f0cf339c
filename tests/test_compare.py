"""The comparison's statistics and baselines, against oracles (scipy) and constructed inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradex.baselines import mean_cosines, random_mix, top_k
from gradex.comparison import SELECTED, Mix, estimate_check, judge, paired_interval, summarize, verdict


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
    from gradex.comparison import price
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


def test_identical_mixes_are_one_mix_shown_once_and_never_called_a_tie():
    from gradex.comparison import format_table, merge_same

    mixes = merge_same([Mix(SELECTED, "selection", [["a"]] * 3), Mix("all", "baseline", [["a", "b", "c"]] * 3),
                        Mix("gradient", "baseline", [["b", "c"]] * 3, "g"),
                        Mix("representation", "baseline", [["c", "b"]] * 3, "r"),  # the same sources, in another order
                        Mix("random", "baseline", [["b", "c"], ["a", "b"], ["b", "c"]]),  # the same at 2 seeds of 3
                        Mix("mine", "user", [["a"]] * 3)])
    assert [m.name for m in mixes] == [SELECTED, "all", "gradient", "random"]
    by = {m.name: m for m in mixes}
    assert by[SELECTED].same == ["mine"] and by["gradient"].same == ["representation"] and by["random"].same == []
    assert by["gradient"].note == "g; representation: r"
    rows = [{"mix": m.name, "seed": s, "test_loss": 0.5 - 0.1 * (m.name == SELECTED) + 0.01 * s,
             "test_score": 0.5 + 0.01 * s * (m.name == "random"), "validation_loss": 0.5}
            for m in mixes for s in range(3)]
    summary = summarize(mixes, rows)
    assert [m.get("same_mix") for m in summary] == [[SELECTED, "mine"], None, ["gradient", "representation"], None]
    text = verdict(summary, "accuracy")
    assert "mine chose the same mix as gradex's selection (not compared with it)" in text
    assert "beat all, gradient = representation, random beyond seed noise" in text
    assert text.count("mine") == 1  # named once, as the same mix, in no group of beaten or tied mixes
    table = format_table({"recipe": {"description": "10 steps"}, "metric": "accuracy[options by likelihood]",
                          "seeds": 3, "test_examples": 10, "mixes": summary, "verdict": text})
    lines = table.splitlines()
    assert sum(line.startswith("gradient = representation ") for line in lines) == 1
    assert sum(line.startswith(f"{SELECTED} = mine ") for line in lines) == 1
    assert not any(line.startswith(("representation", "mine")) for line in lines)
    assert "a = b: the same mix" in table and "accuracy[options by likelihood] (sd)" in lines[1]
    # the header's columns line up with the rows': the accuracy mean ends where its header ends
    assert lines[1].index("(sd)", lines[1].index("accuracy")) + 4 == lines[2].index(")", lines[2].index(")") + 1) + 1


@pytest.mark.parametrize("init, start", [("theta_star", "theta* itself"), ("base", "the base model itself")])
def test_the_target_alone_of_clusters_of_the_target_says_what_model_it_is(init, start):
    """With every target train example in a cluster the target alone trains nothing: its note names the
    model finetune_mix starts from (theta* or the base model, by finetune.init)."""
    from types import SimpleNamespace

    from gradex.stages.compare import candidate_mixes

    cfg = SimpleNamespace(select=SimpleNamespace(method="forward", seed=0),
                          compare=SimpleNamespace(methods=["forward"], baselines=["target"], mixes={}),
                          data=SimpleNamespace(clusters=SimpleNamespace(from_="target_train")),
                          finetune=SimpleNamespace(init=init))
    mixes, _ = candidate_mixes(SimpleNamespace(cfg=cfg, sources=["c0", "c1"]), {"selected": ["c0"]}, 2)
    target = next(m for m in mixes if m.name == "target")
    assert target.members == [[], []] and target.note.startswith(f"{start}, no fine-tune: every target train")


def test_an_empty_selection_is_compared_with_single_sources_and_no_mix_is_trained_twice(tmp_path, tiny_model_dir):
    """The target alone (an empty selection) against the best single source by estimate, the top
    source by gradient similarity and a random single source; identical mixes fine-tuned once."""
    from conftest import tiny_run_config
    from gradex import pipeline
    from gradex.stages.compare import candidate_mixes

    cfg = tiny_run_config(tmp_path, tiny_model_dir)
    cfg.compare.baselines = ["all", "target", "random", "gradient"]
    body = pipeline.select(cfg)
    run = pipeline.Run(cfg)
    mixes, similarity = candidate_mixes(run, {**body, "selected": []}, 3)
    names = [n for m in mixes for n in m.names]
    assert sorted(names) == sorted([SELECTED, "gradex[best single]", "all", "target", "random", "gradient"])
    assert len({tuple(frozenset(s) for s in m.members) for m in mixes}) == len(mixes)  # all distinct
    of = {n: m for m in mixes for n in m.names}
    assert of["target"] is of[SELECTED] and of[SELECTED].members == [[]] * 3
    # the oracle for the best single source: the estimate stage's own estimates of each source alone
    alone = {r["members"][0]: r["estimate"] for r in pipeline.estimate(cfg) if len(r["members"]) == 1}
    assert of["gradex[best single]"].members == [[min(alone, key=alone.get)]] * 3
    assert of["gradient"].members == [[max(similarity["gradient"], key=similarity["gradient"].get)]] * 3
    assert all(len(m) == 1 for m in of["random"].members) and "1, not 0" in of["random"].note
    # compare: a named mix that is the selection, and two named mixes that are one, each fine-tuned once
    result = pipeline.compare(cfg, seeds=1, mixes={"again": body["selected"], "one": ["mul"], "two": ["mul"]})
    shown_names = [n for m in result["mixes"] for n in m.get("same_mix", [m["name"]])]
    assert len(shown_names) == len(set(shown_names)) and {"again", "one", "two"} <= set(shown_names)
    assert next(m for m in result["mixes"] if m["name"] == SELECTED)["same_mix"][1:].count("again") == 1
    assert "again chose the same mix" in result["verdict"]
    keys = {r["key"] for r in result["rows"]}
    assert len(keys) == len({(frozenset(r["members"]), r["seed"]) for r in result["rows"]}) == len(result["rows"])
    assert {p.name for p in (cfg.run_dir / "finetunes").iterdir()} == keys


def test_representations_run_in_the_precision_asked_and_average_in_fp32():
    """The oracle: the decoder's last hidden layer under torch.autocast, averaged over each example's
    tokens by hand. bf16 gives other numbers than fp32 (so the precision was used), close to them."""
    from conftest import byte_tokenizer, tiny_llama

    from gradex.baselines import mean_hidden_states
    from gradex.data import Example, tokenize

    tok = byte_tokenizer()
    model = tiny_llama(len(tok)).eval()
    examples = [Example("s", "train", f"Q: What is {a} plus {b}?\nA:", f" {a + b}") for a, b in
                [(12, 7), (305, 91), (4, 4000), (66, 6)]]
    tokens = tokenize(tok, examples)
    got = {p: mean_hidden_states(model, tokens, [2, 0, 3, 1], tok.pad_token_id, batch_size=3, precision=p)
           for p in ("fp32", "bf16")}
    for precision, dtype, tol in (("fp32", None, 1e-5), ("bf16", torch.bfloat16, 5e-4)):
        want = []
        for i in (2, 0, 3, 1):
            with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                hidden = model.model(input_ids=torch.tensor([tokens[i].ids])).last_hidden_state[0]
            want.append(hidden.float().mean(0))
        assert got[precision].dtype == np.float32
        np.testing.assert_allclose(got[precision], torch.stack(want).numpy(), rtol=tol, atol=tol)
    assert np.abs(got["fp32"] - got["bf16"]).max() > 3 * 5e-4  # bf16 rounds: beyond the tolerance above
    np.testing.assert_allclose(got["bf16"], got["fp32"], rtol=0.05, atol=0.05)
