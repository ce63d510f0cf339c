"""Sources from clusters: examples without source labels grouped into k clusters, each a source.

The paper's chain-of-thought setting has no source labels: it clusters the target's own training
examples and selects among the clusters. This module holds the pure part (features -> labels, the
naming, what a person reads about each cluster); `gradex.stages.clusters` reads the features from
the run (the store's projected gradients, or theta*'s hidden states) and records the result.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from gradex.config import Config, ConfigError
from gradex.data import Example

# Ward linkage keeps an N x N distance matrix: 20,000 examples is 1.6 GB of float32 already.
AGGLOMERATIVE_LIMIT = 20_000
SHOWN = 5  # example prompts kept per cluster in clusters.json, for a person to read


def normalize(features: np.ndarray, center: bool = False) -> np.ndarray:
    """Rows scaled to unit length (float64), after subtracting the mean row when `center`.

    Why unit length for gradients: a projected gradient's norm mostly says how badly the model fits
    the example (with the ce output it scales with the example's loss; a well-fit example's gradient
    is near zero), while its direction says which way fitting it would move the model, which is what
    makes examples interchangeable as training data (the estimates see the gradients through their
    inner products). Euclidean k-means on raw rows would group examples by loss level; on unit rows
    it is k-means on cosine similarity. Why centering for hidden states: mean-pooled hidden states
    share a large common component (the same for every input), which would make every cosine near 1.
    A zero row (an example whose gradient is zero) stays zero.
    """
    x = np.asarray(features, dtype=np.float64)
    if center:
        x = x - x.mean(axis=0, keepdims=True)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def cluster(features: np.ndarray, k: int, method: str = "kmeans", seed: int = 0) -> np.ndarray:
    """Cluster labels (N,) in 0..k'-1 of already normalized feature rows (k' <= k when there are
    fewer distinct rows than k), numbered by each cluster's first row, so the names do not depend
    on the algorithm's arbitrary label order."""
    n = len(features)
    if k > n:
        raise ConfigError(f"data.clusters.k: {k} clusters of {n} examples; lower k to at most {n}")
    if method == "kmeans":
        from sklearn.cluster import KMeans

        # several restarts: one k-means++ start can merge two planted clusters and split a third
        labels = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(features)
    elif method == "agglomerative":
        if n > AGGLOMERATIVE_LIMIT:
            raise ConfigError(f"data.clusters.method: agglomerative clustering keeps an N x N matrix; "
                              f"{n} examples is more than {AGGLOMERATIVE_LIMIT}: use kmeans")
        from sklearn.cluster import AgglomerativeClustering

        labels = AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(features)
    else:
        raise ValueError(f"unknown clustering method {method!r}")
    return first_seen_order(labels)


def first_seen_order(labels: Sequence[int]) -> np.ndarray:
    """The same partition, numbered 0, 1, ... in the order the clusters first appear; empty ones
    (k-means with duplicate rows) vanish."""
    order: dict[int, int] = {}
    for label in labels:
        order.setdefault(int(label), len(order))
    return np.array([order[int(label)] for label in labels], dtype=np.int64)


def names(count: int) -> list[str]:
    """cluster-000, cluster-001, ...: zero-padded, so they sort in number order."""
    width = max(3, len(str(count - 1)))
    return [f"cluster-{i:0{width}d}" for i in range(count)]


def describe(labels: np.ndarray, positions: Sequence[int], prompts: Sequence[str],
             origins: Sequence[str]) -> list[dict]:
    """Per cluster: its name, size, members (example positions in data/examples.jsonl and where each
    came from) and its first few prompts, for clusters.json."""
    out = []
    for c, name in enumerate(names(int(labels.max()) + 1 if len(labels) else 0)):
        rows = np.flatnonzero(labels == c)
        out.append({"name": name, "size": int(len(rows)), "members": [int(positions[r]) for r in rows],
                    "origins": [origins[r] for r in rows], "examples": [prompts[r] for r in rows[:SHOWN]]})
    return out


def candidates(cfg: Config, examples: Sequence[Example]) -> list[int]:
    """The positions (in data/examples.jsonl) of the examples to cluster: the target's train split
    (`from: target_train`) or every training example of the configured sources (`from: pool`)."""
    target = cfg.data.target.name
    own = cfg.data.clusters.from_ == "target_train"
    return [i for i, e in enumerate(examples) if e.split == "train" and (e.source == target) == own]


def check_clusterable(cfg: Config, examples: Sequence[Example]) -> None:
    """At prepare, before anything is trained: k clusters need at least k examples to cluster."""
    c = cfg.data.clusters
    if c is None:
        return
    n = len(candidates(cfg, examples))
    what = "target train examples" if c.from_ == "target_train" else "source examples"
    if c.k > n:
        raise ConfigError(f"data.clusters.k: {c.k} clusters, but there are only {n} {what} to cluster "
                          f"(data.clusters.from: {c.from_}); lower k or add examples")
