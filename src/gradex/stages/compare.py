"""compare: every candidate mix (the selection, other selection methods, baselines, named mixes)
fine-tuned over seeds with the finetune recipe and compared with the selection (compare.json)."""

from __future__ import annotations

import json
import shutil

from gradex import config as config_mod
from gradex import ledger
from gradex.atomic import write_parquet
from gradex.config import Config
from gradex.launch import on_main
from gradex.run import Run, log, model_stages_ran_on
from gradex.finetunes import finetune_key, finetune_mix, plain, read_final, recipe_summary
from gradex.selection import read_selection, selection
from gradex.surrogate import estimator, member_mask, proportion_estimator
from gradex.writer import writes


def _similarity(run: Run, kind: str) -> dict[str, float]:
    """Per-source similarity for a baseline, cached in compare/<kind>.json by what it was computed from."""
    from gradex.baselines import DSIR_SETTINGS, similarity_scores

    if kind == "gradient":
        inputs = run.output("store")
    elif kind == "dsir":  # the example texts alone
        inputs = (run.data_key(), DSIR_SETTINGS)
    else:  # representation: the base model, in the precision this host runs it
        inputs = (run.data_key(), run.cfg.model, run.precision)
    # the clusters relabel the examples: the same data under other clusters is other sources
    key = config_mod.fingerprint(kind, inputs, *([run.output("clusters")] if run.cfg.data.clusters else []))
    path = run.dir / "compare" / f"{kind}.json"
    found = ledger.kept(path, key)
    if found is not None:
        return found["scores"]

    def compute() -> dict[str, float]:
        return ledger.keep(path, key, {"scores": similarity_scores(kind, run)})["scores"]

    return on_main(compute)


def candidate_mixes(run: Run, body: dict, seeds: int, extra: dict[str, list[str]] | None = None) -> tuple[list, dict]:
    """The mixes compare fine-tunes: the selection, other selection methods, baselines, named mixes,
    those that are the same sources at every seed merged into one (gradex.comparison.merge_same).

    The size-matched baselines (random, the similarity top-k) take the selection's size; an empty
    selection (the target alone) would make them the target alone too, so they take one source
    instead, and the single source with the lowest estimate joins them: the target alone is then
    tested against the best single source by estimate, by similarity and at random.

    Returns (mixes, similarity scores per similarity baseline)."""
    from gradex.baselines import random_mix, top_k
    from gradex.comparison import SELECTED, Mix, merge_same

    c = run.cfg
    chosen = body["selected"]
    k = len(chosen) or 1
    empty = "" if chosen else " (1, not 0: the selection is empty)"
    mixes = [Mix(SELECTED, "selection", [chosen] * seeds, f"select.method {c.select.method}",
                 proportions=plain(run, body.get("proportions")))]
    fn = None
    for method in c.compare.methods:
        if method == c.select.method:
            continue
        if fn is None:
            fn, _, _ = estimator(run)
        other = selection(run, method, fn)
        mixes.append(Mix(f"gradex[{method}]", "selection", [other["selected"]] * seeds, f"select.method {method}",
                         proportions=plain(run, other.get("proportions"))))
    if "proportions" in body:
        mixes += proportion_mixes(run, body, seeds)
    if not chosen:
        if fn is None:
            fn, _, _ = estimator(run)
        single = fn(member_mask(run.sources, [[s] for s in run.sources])).tolist()
        best = run.sources[min(range(len(single)), key=single.__getitem__)]
        mixes.append(Mix("gradex[best single]", "selection", [[best]] * seeds,
                         "the single source with the lowest estimate (the selection is empty)"))
    similarity = {}
    for b in c.compare.baselines:
        if b == "all":
            mixes.append(Mix("all", "baseline", [list(run.sources)] * seeds, "every source"))
        elif b == "target":
            own = c.data.clusters is not None and c.data.clusters.from_ == "target_train"
            start = "theta*" if c.finetune.init == "theta_star" else "the base model"  # what finetune_mix starts from
            mixes.append(Mix("target", "baseline", [[]] * seeds, f"{start} itself, no fine-tune: every target train "
                             "example is in a cluster (data.clusters.from target_train)" if own else "the target alone"))
        elif b == "random":
            draws = [random_mix(run.sources, k, f"{c.select.seed}:random:{s}") for s in range(seeds)]
            mixes.append(Mix("random", "baseline", draws, f"{k} random source(s), drawn afresh per seed{empty}"))
        elif b == "dsir":
            similarity[b] = _similarity(run, b)
            mixes.append(Mix(b, "baseline", [top_k(similarity[b], k)] * seeds, f"top-{k} by mean DSIR log importance "
                             f"weight towards the target's validation texts (hashed n-grams, data-selection){empty}"))
        else:
            similarity[b] = _similarity(run, b)
            note = (f"top-{k} by cosine of mean projected gradients with the target's (LESS-style)" if b == "gradient"
                    else f"top-{k} by cosine of mean hidden states with the target's")
            mixes.append(Mix(b, "baseline", [top_k(similarity[b], k)] * seeds, note + empty))
    for name, members in {**c.compare.mixes, **(extra or {})}.items():
        unknown = sorted(set(members) - set(run.sources))
        if unknown:
            raise config_mod.ConfigError(f"compare mix {name!r}: unknown source(s) {unknown}; sources: {run.sources}")
        if any(m.name == name for m in mixes):
            raise config_mod.ConfigError(f"compare mix {name!r}: the name is taken; choose another")
        mixes.append(Mix(name, "user", [[s for s in run.sources if s in members]] * seeds, "named by the user"))
    return merge_same(mixes), similarity


def proportion_mixes(run: Run, body: dict, seeds: int) -> list:
    """What proportions are measured against (select.method weights): the best subset, the selection
    in equal shares, and all sources in equal shares (all sources pooled as they are, their natural
    proportions, is the `all` baseline)."""
    from gradex.comparison import Mix

    target = run.cfg.data.target.name
    own = [target] if run.train_indices([]) else []  # no target train of its own under clusters from target_train

    def equal(names: list[str]) -> dict[str, float]:
        return {n: 1 / len(names) for n in names}

    best = body["best_subset"]["selected"]
    out = [Mix("uniform", "baseline", [body["selected"]] * seeds, "the selection's sources in equal shares",
               proportions=plain(run, equal(own + body["selected"]))),
           Mix("all[uniform]", "baseline", [list(run.sources)] * seeds, "every source in equal shares",
               proportions=plain(run, equal(own + list(run.sources))))]
    if "best" not in run.cfg.compare.methods:
        out.insert(0, Mix("gradex[best]", "selection", [best] * seeds, "the best subset (select.method best)"))
    return out


COMPARE_FORMAT = 6  # bump when compare.json changes shape, so cached results are recomputed


def settings(run: Run) -> str:
    """What shapes the comparison besides its fine-tunes' keys, as `gradex status` can tell without
    choosing the mixes again: the candidates asked for, the table's format, and select's inputs (the
    estimator each row's estimate comes from)."""
    c = run.cfg.compare
    return config_mod.fingerprint(c.baselines, c.methods, c.mixes, COMPARE_FORMAT, run.fp("select"))


def forward_finetunes(fn, n: int) -> int:
    """How many fine-tunes forward stepwise selection by real fine-tuning would train here: the subsets
    a forward search on these estimates evaluates (the target alone, then every candidate of every
    round until no addition helps). The estimates stand in for the real losses, so the count is
    what a search of this shape needs, not a replay of one."""
    return sum(forward_subsets_by_size(fn, n).values())


def forward_subsets_by_size(fn, n: int) -> dict[int, int]:
    """The subsets of `forward_finetunes`, counted by their number of sources (round r's have r)."""
    from collections import Counter

    from gradex import search

    sizes: Counter = Counter()

    def counting(subsets):
        sizes.update(int(k) for k in subsets.sum(1).tolist())
        return fn(subsets)

    search.forward(counting, n)
    return dict(sorted(sizes.items()))


@writes
def compare(run: Run, force: bool = False, seeds: int | None = None,
            mixes: dict[str, list[str]] | None = None) -> dict:
    """Fine-tune every candidate mix with the finetune recipe and budget over `seeds` seeds
    (default compare.seeds), evaluate on the target test split, and compare each with the selection.

    Writes compare.json (the table, the verdict, every fine-tune) and compare.parquet (one row per
    mix and seed). Fine-tunes are cached by what shapes them, so more seeds or another mix later
    costs only the new fine-tunes; `force` re-runs them all. Under a launch every fine-tune is
    spread over the processes (DDP) and rank 0 writes the tables."""
    cfg = run.cfg
    body = read_selection(run)
    final = read_final(run)
    k = seeds or cfg.compare.seeds
    candidates, similarity = candidate_mixes(run, body, k, mixes)
    jobs = [(m, s) for m in candidates for s in range(k)]
    keys = {(m.name, s): finetune_key(run, m.members[s], s, m.proportions) for m, s in jobs}
    if force:
        on_main(lambda: [shutil.rmtree(run.dir / "finetunes" / key, ignore_errors=True)
                         for key in set(keys.values()) - {final["key"]}])
    # select's inputs too: each row's estimate comes from the run's estimator, which they cover
    fingerprint = config_mod.fingerprint(sorted(keys.items()), [m.__dict__ for m in candidates], COMPARE_FORMAT,
                                         run.fp("select"))
    if not force and (cached := _current(run, fingerprint)) is not None:
        return cached
    todo = len({key for key in keys.values() if ledger.kept(run.dir / "finetunes" / key / "result.json", key) is None})
    log(f"compare: {len(candidates)} mixes x {k} seed(s) = {len(jobs)} fine-tunes, {todo} to train "
        f"({recipe_summary(run)['description']})")
    rows = []
    for m, s in jobs:
        res = finetune_mix(run, m.members[s], s, desc=f"compare[{m.name} seed {s}]", proportions=m.proportions)
        rows.append({"mix": m.name, "kind": m.kind, "seed": s, "members": res["members"], "size": len(res["members"]),
                     "proportions": m.proportions,
                     "steps": res["steps"], "examples": res["examples"], "seconds": res["seconds"],
                     "validation_loss": res["validation"]["loss"], "test_loss": res["test"]["loss"],
                     "test_score": res["test"]["score"], "test_no_match": res["test"].get("no_match"),
                     "key": res["key"]})
    return on_main(lambda: _tables(run, cfg, body, final, candidates, similarity, rows, k, fingerprint))


def _tables(run: Run, cfg: Config, body: dict, final: dict, candidates: list, similarity: dict, rows: list[dict],
            k: int, fingerprint: str) -> dict:
    """compare.json and compare.parquet from the fine-tunes' results (rank 0, under a launch)."""
    import pandas as pd

    from gradex import comparison

    path = run.dir / "compare.json"
    fn, _, _ = estimator(run, stage="compare")
    for r, value in zip(rows, fn(member_mask(run.sources, [r["members"] for r in rows])).tolist()):
        r["estimate"] = value
    weighted = [r for r in rows if r["proportions"] is not None]
    if weighted:
        of = proportion_estimator(run)
        for r in weighted:
            r["estimate"] = of(r["proportions"])
    summary = comparison.summarize(candidates, rows)
    metric = final["test"]["metric"]
    meta = ledger.read(run.dir / "meta")
    grads = ledger.read(run.dir / "store")
    stage_seconds = {"meta-train": meta.get("seconds"), "gradients": grads.get("seconds"),
                     "select": ledger.read(run.dir / "select").get("seconds")}
    if cfg.data.clusters is not None:  # making the sources is part of the selection's cost
        stage_seconds["clusters"] = ledger.read(run.dir / "clusters").get("seconds")
    known = [v for v in stage_seconds.values() if v is not None]
    selection_seconds = sum(known) if len(known) == len(stage_seconds) else None
    # every mix that trains has the same steps; an empty mix (theta* itself, under data.clusters.from
    # target_train) trains none and says nothing of a fine-tune's cost
    trained = [r["seconds"] for r in rows if r["steps"]] or [0.0]
    finetune_seconds = round(sum(trained) / len(trained), 3)
    result = {"seeds": k, "recipe": recipe_summary(run), "metric": metric, "test_examples": final["test"]["examples"],
              "selection": {"method": cfg.select.method, "selected": body["selected"], "reason": body["reason"]},
              "similarity": similarity, "mixes": summary, "estimate_check": comparison.estimate_check(rows),
              "verdict": comparison.verdict(summary, metric.replace("_", " ")),
              "cost": {"stages_seconds": stage_seconds, "selection_seconds": selection_seconds,
                       "ran_on": model_stages_ran_on(run.dir, final),
                       "finetune_seconds": finetune_seconds,
                       **comparison.price(selection_seconds, finetune_seconds, forward_finetunes(fn, len(run.sources)))},
              "settings": settings(run), "rows": rows}
    # one unit: the parquet first, then the JSON with the parquet's hash (_current checks both)
    table = [{**r, "proportions": json.dumps(r["proportions"]) if r["proportions"] is not None else None} for r in rows]
    write_parquet(run.dir / "compare.parquet", pd.DataFrame(table))  # proportions as JSON: one column type
    result["parquet_sha256"] = ledger.sha256(run.dir / "compare.parquet")
    return ledger.keep(path, fingerprint, result)


def _current(run: Run, fingerprint: str) -> dict | None:
    """compare.json's body when it and compare.parquet hold the comparison of `fingerprint`, both of
    them (a write cut between the two leaves a parquet the JSON does not name: the tables are made
    again, from the cached fine-tunes); None otherwise."""
    table = run.dir / "compare.parquet"
    body = ledger.kept(run.dir / "compare.json", fingerprint)  # None when missing, cut short or of another key
    return body if body is not None and table.exists() and body.get("parquet_sha256") == ledger.sha256(table) else None
