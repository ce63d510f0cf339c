"""Sources from clusters (data.clusters) and answer patterns for exact match (answer_pattern)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from conftest import arithmetic_rows, tiny_run_config, write_config, write_jsonl
from gradex import config, pipeline
from gradex.clustering import cluster, first_seen_order, names, normalize
from gradex.comparison import format_table


def planted(k: int = 6, per: int = 40, d: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gradient-like rows with planted clusters: each cluster a direction, each row that direction
    plus noise, scaled by a per-row factor spanning two orders of magnitude (as gradient norms do,
    with the example's loss)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, d))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    truth = np.repeat(np.arange(k), per)
    rng.shuffle(truth)
    rows = centers[truth] + 1.6 * rng.standard_normal((len(truth), d)) / np.sqrt(d)  # noise 1.6x the signal
    scale = np.exp(rng.uniform(np.log(0.01), np.log(1.0), size=(len(truth), 1)))
    return rows * scale, truth


@pytest.mark.parametrize("method", ["kmeans", "agglomerative"])
def test_planted_clusters_are_recovered(method):
    from sklearn.metrics import adjusted_rand_score

    x, truth = planted()
    labels = cluster(normalize(x), 6, method)
    ari = adjusted_rand_score(truth, labels)
    chance = adjusted_rand_score(truth, np.random.default_rng(1).integers(0, 6, len(truth)))
    assert ari > 0.8 and abs(chance) < 0.05
    # why the rows are scaled to unit length: on the raw rows the norm, not the direction, decides
    raw = adjusted_rand_score(truth, cluster(x, 6, method))
    print(f"{method}: ARI {ari:.3f} (raw rows {raw:.3f}), random labelling {chance:.3f}")
    assert raw < ari - 0.3, (raw, ari)


def test_cluster_numbering_and_names():
    assert first_seen_order([5, 5, 2, 7, 2]).tolist() == [0, 0, 1, 2, 1]
    assert names(3) == ["cluster-000", "cluster-001", "cluster-002"]
    assert names(1001)[-1] == "cluster-1000"
    x, _ = planted(k=3, per=10)
    labels = cluster(normalize(x), 3)
    assert labels[0] == 0 and sorted(set(labels.tolist())) == [0, 1, 2]
    with pytest.raises(config.ConfigError, match="data.clusters.k"):
        cluster(normalize(x), 31)


def test_normalize_keeps_zero_rows_and_centers():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [0.0, 2.0]])
    assert np.allclose(normalize(x), [[0.6, 0.8], [0, 0], [0, 1]])
    centered = normalize(np.array([[10.0, 1.0], [10.0, -1.0]]), center=True)
    assert np.allclose(centered, [[0, 1], [0, -1]])


def test_config_keys_and_errors(tmp_path):
    base = {"data": {"target": {"name": "t", "path": "t.jsonl"}, "sources": [{"name": "pool", "path": "p.jsonl"}]}}
    cfg = config.from_dict({**base, "data": {**base["data"], "clusters": {"from": "pool", "k": 4}}})
    assert (cfg.data.clusters.from_, cfg.data.clusters.k, cfg.data.clusters.features, cfg.data.clusters.method) == \
        ("pool", 4, "gradients", "kmeans")
    (tmp_path / "c.yaml").write_text(config.dumps(cfg))
    again = config.load(tmp_path / "c.yaml")
    assert again.data.clusters == cfg.data.clusters  # the resolved config says `from` and loads back
    for clusters, message in [({"k": 1}, "data.clusters.k"), ({"from": "all"}, "data.clusters.from"),
                              ({"features": "tfidf"}, "data.clusters.features"),
                              ({"method": "dbscan"}, "data.clusters.method"), ({"form": "pool"}, "unknown key")]:
        with pytest.raises(config.ConfigError, match=message):
            config.from_dict({**base, "data": {**base["data"], "clusters": clusters}})
    # the paper's chain-of-thought setting: the target's own train split, no other source needed
    own = config.from_dict({"data": {"target": {"name": "t", "path": "t.jsonl"}, "clusters": {"from": "target_train"}}})
    assert own.data.sources == []
    with pytest.raises(config.ConfigError, match="give at least one source"):
        config.from_dict({"data": {"target": {"name": "t", "path": "t.jsonl"}, "clusters": {"from": "pool"}}})
    bad = {"data": {"target": {"name": "t", "path": "t.jsonl"},
                    "sources": [{"name": "cot", "path": "p.jsonl", "answer_pattern": "answer is (\\d+"}]}}
    with pytest.raises(config.ConfigError, match=r"data.sources\[0\] \(cot\).answer_pattern: .* not a valid regular"):
        config.from_dict(bad)


def test_auto_weighting_is_sum_for_clusters_of_the_target_and_follows_the_budget_otherwise():
    """estimate.weighting auto: sum where every source is a cluster of the target's train split (more
    of the target's own examples fine-tunes better, BENCHMARKS.md), else mean under equal steps and
    sum under epochs; a weighting that is set is kept; proportions refuse auto on such clusters."""
    def resolved(extra: dict) -> str:
        spec = {"data": {"target": {"name": "t", "path": "t.jsonl"}, "sources": [{"name": "s", "path": "s.jsonl"}]}}
        for key, value in extra.items():
            section, name = key.split(".", 1)
            if section == "data":
                spec["data"][name] = value
            else:
                spec.setdefault(section, {})[name] = value
        return config.from_dict(spec).resolved_weighting()

    own = {"from": "target_train", "k": 2}
    assert resolved({"data.clusters": own}) == "sum"
    assert resolved({"data.clusters": own, "finetune.budget": "equal"}) == "sum"
    assert resolved({"data.clusters": own, "estimate.weighting": "mean"}) == "mean"
    assert resolved({"data.clusters": {"from": "pool", "k": 2}}) == "mean"  # other sources' examples: equal steps
    assert resolved({}) == "mean"
    assert resolved({"finetune.budget": "epochs"}) == "sum"
    with pytest.raises(config.ConfigError, match="estimate.weighting mean"):
        config.from_dict({"data": {"target": {"name": "t", "path": "t.jsonl"}, "clusters": own},
                          "select": {"method": "weights"}})


def test_empty_target_group_estimates_theta_star_for_the_empty_subset():
    """With every target train example in a cluster, group 0 is empty: the empty subset's estimate
    is theta*'s own loss (z = 0) under both weightings, and the others match the exact oracle."""
    from gradex.testing import exact_solve, synthetic_problem

    from gradex.estimate import Problem, calibrate_l2, estimate, linear_loss, subset_l2

    full, _ = synthetic_problem(n_sources=4, n_train=600, d=12, n_val=40, seed=3)
    keep = full.group > 0
    prob = Problem(x=full.x[keep], u=full.u[keep], group=full.group[keep], x_val=full.x_val, u_val=full.u_val,
                   n_sources=4)
    l2 = calibrate_l2(prob, output_change=0.3)
    subsets = torch.tensor([[0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    theta_star = float(linear_loss(prob, torch.zeros(prob.dim)))
    for weighting in ("sum", "mean"):
        est = estimate(prob, subsets, l2, weighting=weighting)
        assert est.converged.all()
        assert est.loss[0].item() == pytest.approx(theta_star, rel=1e-9) and est.z[0].abs().max() < 1e-12
        own_l2 = subset_l2(prob, subsets, l2, weighting)
        for k in range(1, len(subsets)):
            oracle = float(linear_loss(prob, exact_solve(prob, subsets[k], float(own_l2[k]))))
            assert est.loss[k].item() == pytest.approx(oracle, rel=2e-3), (weighting, k)


def test_answer_pattern_extraction():
    from gradex.evaluate import extract_answer

    assert extract_answer(" 42 ", None) == "42"
    assert extract_answer("so the answer is 17. Then 3", re.compile(r"answer is (\d+)")) == "17"
    assert extract_answer("= 42. 7*7 = 49.", re.compile(r"[-+]?\d+")) == "42"  # BIG-bench's own example
    assert extract_answer("no digits here", re.compile(r"\d+")) is None
    assert extract_answer("answer:", re.compile(r"answer:(\d+)?")) == ""  # a group that took no part


def test_bigbench_output_regex_is_the_default_pattern(real_bigbench):
    from gradex.data import answer_pattern

    task = config.SourceConfig(name="add3", bigbench="arithmetic/3_digit_addition")
    assert answer_pattern(task) == r"[-+]?\d+"  # the task.json's output_regex
    assert answer_pattern(config.SourceConfig(name="add3", bigbench="arithmetic/3_digit_addition",
                                              answer_pattern=".*")) == ".*"
    assert answer_pattern(config.SourceConfig(name="q", path="q.jsonl")) is None


# ----------------------------------------------------------------------------- on the tiny model

def pool_config(tmp_path, model_dir, **clusters):
    """The tiny run with its three sources poured into one unlabelled pool file."""
    cfg = tiny_run_config(tmp_path, model_dir)
    rows = arithmetic_rows(24, "+", 1) + arithmetic_rows(24, "*", 2) + arithmetic_rows(24, "-", 3)
    write_jsonl(tmp_path / "pool.jsonl", rows)
    cfg.data.sources = [config.SourceConfig(name="pool", path=str(tmp_path / "pool.jsonl"))]
    cfg.data.per_source = None  # the whole pool
    cfg.data.clusters = config.ClustersConfig(**clusters)
    cfg.compare.baselines = ["all", "target"]
    config.validate(cfg)
    return cfg


def test_pool_clustered_on_gradients_then_selected(tmp_path, tiny_model_dir, capsys):
    cfg = pool_config(tmp_path, tiny_model_dir, k=3)
    body = pipeline.select(cfg)
    run = pipeline.Run(cfg)
    found = json.loads((cfg.run_dir / "clusters" / "clusters.json").read_text())
    cluster_names = [c["name"] for c in found["clusters"]]
    assert cluster_names == ["cluster-000", "cluster-001", "cluster-002"] and run.sources == cluster_names
    assert body["sources"] == cluster_names and set(body["selected"]) <= set(cluster_names)
    assert set(body.get("clusters", {})) == set(body["selected"])
    # the clusters partition the pool's training examples, and the examples carry their cluster's name
    from gradex.data import read_examples

    prepared = read_examples(cfg.run_dir / "data")
    pool = [i for i, e in enumerate(prepared) if e.source == "pool"]
    members = sorted(i for c in found["clusters"] for i in c["members"])
    assert members == pool and sum(found["sizes"].values()) == len(pool)
    for c in found["clusters"]:
        assert c["size"] == len(c["members"]) and 1 <= len(c["examples"]) <= 5
        assert all(run.examples[i].source == c["name"] for i in c["members"])
        assert c["examples"] == [prepared[i].prompt for i in c["members"][:5]]
    # the estimation problem groups by cluster: target train in group 0, each cluster its own group
    prob = pipeline.problem(run)
    assert prob.n_sources == 3 and (prob.group == 0).sum() == len(run.indices("train"))
    assert sorted(torch.bincount(prob.group)[1:].tolist()) == sorted(found["sizes"].values())
    rows = {r["stage"]: r for r in pipeline.status(cfg)}
    assert rows["clusters"]["state"] == "done" and rows["select"]["state"] == "done"
    # a clustering setting makes the clusters and select stale, not theta* or the store
    cfg.data.clusters.k = 2
    rows = {r["stage"]: r for r in pipeline.status(cfg)}
    assert rows["clusters"]["state"] == "stale" and rows["gradients"]["state"] == "done"
    assert rows["select"]["state"] == "stale"
    assert len(pipeline.select(cfg)["sources"]) == 2
    # the CLI: `gradex clusters` says where they are and their sizes, `gradex status` lists the stage
    from gradex.cli import main

    capsys.readouterr()
    assert main(["clusters", str(write_config(cfg, tmp_path / "pool.yaml"))]) == 0
    said = json.loads(capsys.readouterr().out)
    assert said["sizes"] == json.loads((cfg.run_dir / "clusters" / "clusters.json").read_text())["sizes"]
    assert len(said["sizes"]) == 2
    assert main(["status", str(tmp_path / "pool.yaml")]) == 0
    assert any(line.split()[:2] == ["clusters", "done"] for line in capsys.readouterr().out.splitlines())


def test_validate_fine_tunes_again_when_the_clusters_change(tmp_path, tiny_model_dir):
    """A cluster's name stands for the examples clusters.json gives it: after clustering otherwise (same
    k, another method) a subset of the same names is other data, so validate's real fine-tunes of it
    are not reused, under either recipe."""
    from gradex import diagnostics, pipeline

    cfg = pool_config(tmp_path, tiny_model_dir, k=3)
    cfg.refit.max_steps = 1
    pipeline.clusters(cfg)
    before = {r: diagnostics.recipe_key(pipeline.Run(cfg), r) for r in diagnostics.RECIPES}
    cfg.data.clusters.method = "agglomerative"
    pipeline.clusters(cfg)
    run = pipeline.Run(cfg)
    assert all(diagnostics.recipe_key(run, r) != before[r] for r in diagnostics.RECIPES)
    assert diagnostics.missing_rows(run, 2, 1, "refit") == 2


def test_status_follows_the_graph_clusters_on_embeddings_need_no_gradients(tmp_path, tiny_model_dir):
    """Clusters of theta*'s embeddings need the meta-train alone: a stale store leaves them done in
    `gradex status`, as the next select finds them, while select (which reads the store) is stale."""
    from gradex import pipeline

    cfg = pool_config(tmp_path, tiny_model_dir, k=3, features="embeddings")
    cfg.select.bootstrap = 0
    pipeline.select(cfg)
    cfg.gradients.dim = 16  # the store is stale, theta* is not
    state = {r["stage"]: r for r in pipeline.status(cfg)}
    assert state["clusters"]["state"] == "done" and state["gradients"]["state"] != "done"
    assert state["select"]["state"] == "stale" and "(gradients)" in state["select"]["why"]
    made = (cfg.run_dir / "clusters" / "clusters.json").stat().st_mtime_ns
    pipeline.select(cfg)
    assert (cfg.run_dir / "clusters" / "clusters.json").stat().st_mtime_ns == made


def test_target_train_clusters_empty_target_mix_is_theta_star(tmp_path, tiny_model_dir):
    cfg = tiny_run_config(tmp_path, tiny_model_dir)
    cfg.data.sources = []
    cfg.data.clusters = config.ClustersConfig(from_="target_train", k=3, features="embeddings",
                                              method="agglomerative")
    cfg.data.target.answer_pattern = r"(-?\d+)"
    cfg.compare.baselines = ["all", "target"]
    config.validate(cfg)
    result = pipeline.compare(cfg, seeds=1)
    run = pipeline.Run(cfg)
    assert run.sources == ["cluster-000", "cluster-001", "cluster-002"]
    assert run.train_indices([]) == []  # the target has no train examples of its own
    rows = {r["mix"]: r for r in result["rows"]}
    assert rows["target"]["steps"] == 0 and rows["target"]["examples"] == 0
    everything = next(r for r in result["rows"] if r["size"] == 3)  # "all", or the selection when it is the same mix
    assert everything["examples"] == len(run.indices("train", "cluster-000")) + \
        len(run.indices("train", "cluster-001")) + len(run.indices("train", "cluster-002"))
    # the empty mix is theta* itself: its measured validation loss is theta*'s, and its estimate z = 0
    from gradex.evaluate import Scoring, evaluate, generate_answers, loss_from_outputs, outputs

    model = run.meta_model()
    u, _ = outputs(model, run.tokens, run.indices("validation"), run.pad_id, run.precision)
    assert rows["target"]["validation_loss"] == pytest.approx(loss_from_outputs(u), rel=1e-5)
    assert rows["target"]["estimate"] == pytest.approx(loss_from_outputs(u), rel=1e-4)
    # exact match through the answer pattern, against an oracle built from the raw generations
    test = run.indices("test")
    metrics = evaluate(model, run.tokenizer, run.examples, run.tokens, test, run.precision,
                       scoring=Scoring(pattern=r"(-?\d+)"))
    exs = [run.examples[i] for i in test]
    longest = max(len(run.tokens[i].ids) - run.tokens[i].n_prompt for i in test)
    raw = generate_answers(model, run.tokenizer, exs, longest + 1, run.precision)
    found = [re.search(r"(-?\d+)", g) for g in raw]
    assert metrics["no_match"] == sum(f is None for f in found)
    assert metrics["score"] == pytest.approx(
        sum(f is not None and f.group(1) == e.answer.strip() for f, e in zip(found, exs)) / len(exs))
    assert rows["target"]["test_no_match"] == metrics["no_match"] and metrics["answer_pattern"] == r"(-?\d+)"
    final = json.loads((cfg.run_dir / "final" / "metrics.json").read_text())
    assert "no_match" in final["test"] and "no match" in format_table(result)
