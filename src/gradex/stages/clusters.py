"""clusters: with `data.clusters`, the unlabelled examples (every configured source's, or the target's
train split) clustered at theta* into k sources named cluster-000, ...; clusters/clusters.json.

The clusters replace the examples' source labels everywhere after this stage (`Run.examples`
relabels them once the stage is done), so estimate, select, finetune and compare see the clusters as
ordinary sources. meta-train and the gradient pass run before it: both use every training example
whatever its source, so they are the same with or without the clusters.

With `from: target_train` every target train example belongs to a cluster, so the target has no
training data of its own: the empty mix ("the target alone") is theta* itself, estimated at z = 0
and fine-tuned for zero steps, and the whole target train split is the all-sources mix.
"""

from __future__ import annotations

import json
import time
from typing import Sequence

import numpy as np

from gradex import config as config_mod
from gradex import ledger
from gradex.atomic import write_json
from gradex.clustering import candidates
from gradex.config import ConfigError
from gradex.data import read_examples
from gradex.launch import main_first
from gradex.run import CLUSTERS, Run, log
from gradex.writer import writes


def inputs(run: Run) -> dict[str, str | None]:
    """The clusters' ledger inputs: their config, the data, theta*, and the store for gradient features."""
    c = run.cfg
    found = {"config": config_mod.fingerprint(c.data.clusters, c.data.seed, c.data.target.name),
             "data": run.output("data"), "theta*": run.output("theta*")}
    if c.data.clusters.features == "gradients":
        found["store"] = run.output("store")
    else:  # hidden states of theta* under this model and precision
        found["config"] = config_mod.fingerprint(found["config"], c.model, run.precision)
    return found


def gradient_features(run: Run, positions: Sequence[int]) -> np.ndarray:
    """The store's rows of the given examples (exact-inner-product coordinates under projection none)."""
    from gradex.gradients import Store

    store = Store.open(run.dir / "store")
    row_of = {int(i): r for r, i in enumerate(np.asarray(store.index).tolist())}
    missing = [p for p in positions if p not in row_of]
    if missing:
        raise ConfigError(f"data.clusters: {len(missing)} examples to cluster have no row in the store "
                          f"(e.g. example {missing[0]}); run `gradex gradients --force`")
    rows = np.array([row_of[p] for p in positions])
    if store.manifest["projector"]["kind"] == "none":
        from gradex.estimate import exact_coordinates

        return exact_coordinates(store.x).numpy()[rows]  # same inner products, rank(G) <= N columns
    return np.asarray(store.x[rows])


def embedding_features(run: Run, positions: Sequence[int]) -> np.ndarray:
    """theta*'s last hidden state, mean-pooled over each example's tokens (progress bar per batch)."""
    from gradex.baselines import mean_hidden_states

    model = run.meta_model()
    return mean_hidden_states(model, run.tokens, list(positions), run.pad_id, desc="clusters: embeddings")


@writes
@main_first
def clusters(run: Run, force: bool = False) -> dict | None:
    """Cluster the unlabelled examples into data.clusters.k sources (clusters/clusters.json); None
    without data.clusters. Reads the store (or theta*, for embeddings): the stage graph runs them first."""
    from gradex.clustering import cluster, describe, normalize

    cfg = run.cfg
    c = cfg.data.clusters
    if c is None:
        return None
    path = run.dir / CLUSTERS
    if run.done("clusters", force) and path.exists():
        run.forget_sources()  # examples read before another process (rank 0) clustered them carry prepare's labels
        return json.loads(path.read_text())
    run.begin("clusters", force)
    t0 = time.perf_counter()
    examples = read_examples(run.dir / "data")  # prepare's labels: which examples are unlabelled
    positions = candidates(cfg, examples)
    raw = gradient_features(run, positions) if c.features == "gradients" else embedding_features(run, positions)
    labels = cluster(normalize(raw, center=c.features == "embeddings"), c.k, c.method, seed=cfg.data.seed)
    found = describe(labels, positions, [examples[i].prompt for i in positions],
                     [examples[i].origin for i in positions])
    body = {"from": c.from_, "features": c.features, "method": c.method, "k": c.k, "clusters_found": len(found),
            "examples": len(positions), "sizes": {f["name"]: f["size"] for f in found}, "clusters": found}
    write_json(path, body)
    seconds = round(time.perf_counter() - t0, 1)
    run.mark("clusters", clusters=len(found), examples=len(positions), seconds=seconds,
             outputs={"clusters": ledger.sha256(path)})
    run.forget_sources()  # examples read before now carry prepare's labels; from here on, the clusters
    sizes = [f["size"] for f in found]
    log(f"clustered {len(positions)} examples ({c.from_}, {c.features}, {c.method}) into {len(found)} sources "
        f"of {min(sizes)}-{max(sizes)} examples in {seconds:.1f} s ({path})")
    if len(found) < c.k:
        log(f"warning: {c.k} clusters asked for, {len(found)} found (fewer distinct examples than k)")
    return body


