"""compare's dsir baseline: the data-selection package's importance weights, scored per source."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter

import numpy as np
import pytest

from conftest import tiny_run_config
from gradex import pipeline
from gradex.baselines import DSIR_SETTINGS, dsir_scores, top_k


def words(rng: random.Random, stem: str, n: int) -> str:
    return " ".join(f"{stem}{rng.randint(0, 30)}" for _ in range(n))


def oracle_log_weights(pool: list[str], target: list[str]) -> np.ndarray:
    """DSIR's log importance weights written out plainly: unigram and bigram counts of the lowercased
    wordpunct tokens, hashed by sha256 into the buckets; weight = counts . (log p_target - log p_pool)."""
    buckets = DSIR_SETTINGS["num_buckets"]

    def features(text: str) -> Counter:
        tokens = re.findall(r"\w+|[^\w\s]+", text.lower())
        grams = tokens + [f"{a} {b}" for a, b in zip(tokens, tokens[1:])]
        return Counter(int(hashlib.sha256(g.encode()).hexdigest(), 16) % buckets for g in grams)

    def probs(texts: list[str]) -> np.ndarray:
        counts = np.zeros(buckets)
        for t in texts:
            for b, c in features(t).items():
                counts[b] += c
        return counts / counts.sum()

    log_diff = np.log(probs(target) + 1e-8) - np.log(probs(pool) + 1e-8)
    return np.array([sum(c * log_diff[b] for b, c in features(t).items()) for t in pool])


def test_dsir_ranks_the_source_that_shares_the_targets_ngrams_first(tmp_path):
    """By construction: `twin` is written in the target's vocabulary, `far` in another one, `half`
    in both. DSIR must rank twin > half > far, and each score is the mean of the per-example log
    importance weights (the plain oracle above), example by example in the pool's order."""
    rng = random.Random(0)
    parts = {"far": [words(rng, "zebra", 8) for _ in range(25)],
             "twin": [words(rng, "apple", 8) for _ in range(20)],
             "half": [words(rng, "apple", 4) + " " + words(rng, "zebra", 4) for _ in range(30)]}
    pool = [t for texts in parts.values() for t in texts]
    groups = [s for s, texts in parts.items() for _ in texts]
    target = [words(rng, "apple", 8) for _ in range(15)]
    scores = dsir_scores(pool, groups, list(parts), target, tmp_path / "dsir")
    assert scores["twin"] > scores["half"] > scores["far"]
    assert top_k(scores, 1) == ["twin"] and top_k(scores, 2) == ["twin", "half"]
    oracle = oracle_log_weights(pool, target)
    for s in parts:
        assert scores[s] == pytest.approx(oracle[np.asarray(groups) == s].mean(), rel=1e-9)
    # the package's own files stay for inspection: the texts it read and its weights
    assert (tmp_path / "dsir" / "pool.jsonl").read_text().count("\n") == len(pool)
    assert np.load(tmp_path / "dsir" / "log_importance_weights" / "0.npy").shape == (len(pool),)
    # the same data gives the same scores: nothing in them is drawn at random
    assert dsir_scores(pool, groups, list(parts), target, tmp_path / "dsir") == scores
    with pytest.raises(ValueError, match=r"source\(s\) \['none'\] have no examples"):
        dsir_scores(pool, groups, [*parts, "none"], target, tmp_path / "dsir")


def test_compare_runs_dsir_as_a_baseline_and_caches_its_scores(tmp_path, tiny_model_dir):
    """Through compare on the tiny run: the target is addition ("3+4= 7"); add_more is addition too,
    mul and sub share the digits but not the operator, so DSIR ranks add_more first."""
    cfg = tiny_run_config(tmp_path, tiny_model_dir)
    cfg.compare.baselines = ["dsir"]
    result = pipeline.compare(cfg, seeds=1)
    scores = result["similarity"]["dsir"]
    assert set(scores) == {"add_more", "mul", "sub"}
    assert max(scores, key=scores.get) == "add_more"
    k = len(result["selection"]["selected"]) or 1  # an empty selection: the baselines take one source
    (dsir,) = [m for m in result["mixes"] if "dsir" in (m.get("same_mix") or [m["name"]])]
    assert dsir["members"] == [top_k(scores, k)]
    # the scores are those of the run's texts: prompt then answer, the pool every source's train examples
    run = pipeline.Run(cfg)
    pool = [e for e in run.examples if e.source != "add" and e.split == "train"]
    held = [e.prompt + e.answer for e in run.examples if e.source == "add" and e.split == "validation"]
    oracle = oracle_log_weights([e.prompt + e.answer for e in pool], held)
    for s in scores:
        assert scores[s] == pytest.approx(oracle[[e.source == s for e in pool]].mean(), rel=1e-9)
    # cached by the data it read: a second compare neither recomputes nor rewrites it
    weights = cfg.run_dir / "compare" / "dsir" / "log_importance_weights" / "0.npy"
    stamp = weights.stat().st_mtime_ns
    assert pipeline.compare(cfg, seeds=1)["similarity"]["dsir"] == scores
    assert weights.stat().st_mtime_ns == stamp
    assert json.loads((cfg.run_dir / "compare" / "dsir.json").read_text())["scores"] == scores


def test_scores_follow_the_clusters_they_were_computed_on(tmp_path, tiny_model_dir):
    """The same data clustered again into other sources: the cached scores must be recomputed for the
    new clusters, never read back under the old clusters' names."""
    from test_clusters import pool_config

    from gradex.stages.compare import _similarity

    cfg = pool_config(tmp_path, tiny_model_dir, k=2)
    pipeline.clusters(cfg)
    assert sorted(_similarity(pipeline.Run(cfg), "dsir")) == ["cluster-000", "cluster-001"]
    cfg.data.clusters.k = 3
    pipeline.clusters(cfg)
    run = pipeline.Run(cfg)
    assert run.sources == ["cluster-000", "cluster-001", "cluster-002"]
    assert sorted(_similarity(run, "dsir")) == run.sources
