"""The run's selection, which the select and compare stages share: one selection method (or the
proportions of select.method weights) on the run's estimator, its bootstrap stability, and the
selection's record (selection.json) for the stages downstream of it."""

from __future__ import annotations

import json
import time
from typing import Callable, Sequence

import torch

from gradex import config as config_mod
from gradex.atomic import read_json
from gradex.run import CLUSTERS, Run
from gradex.surrogate import estimator, problem


def selection(run: Run, method: str, fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
    """Select sources by `method` from the run's estimates: the body of selection.json.

    fn: the estimator (`estimator(run)[0]`), built here when not given."""
    from gradex import search

    if fn is None:
        fn, _, _ = estimator(run)
    n, sc = len(run.sources), run.cfg.select
    m = sc.subsets if sc.subsets is not None else search.default_subsets(n)
    t0 = time.perf_counter()
    if method == "weights":
        return weights(run, fn)
    if method == "ensemble":
        sel = search.ensemble(fn, n, m, sc.alpha, sc.seed, top_k=sc.top_k)
    elif method == "best":
        sel = search.best(fn, n, names=run.sources)
    elif method == "effects":
        sel = search.effects(fn, n, m, sc.seed)
    elif method == "exhaustive":
        if n > search.EXHAUSTIVE_LIMIT:
            raise config_mod.ConfigError(f"select.method: exhaustive search needs at most "
                                         f"{search.EXHAUSTIVE_LIMIT} sources, this run has {n}; use forward")
        sel = search.exhaustive(fn, n)
    else:  # forward, backward
        sel = getattr(search, method)(fn, n, names=run.sources)
    body = sel.to_dict()
    body.update({"sources": run.sources, "selected": [run.sources[j] for j in sel.selected],
                 "source_scores": dict(zip(run.sources, sel.scores)), "mode": run.cfg.estimate.mode,
                 "worse_than_target": sel.worse_than_target, "seconds": round(time.perf_counter() - t0, 3)})
    for step in body["history"]:  # name the sources that the method saw as column numbers
        for key in ("source", "members"):
            if key in step:
                step[key] = run.sources[step[key]] if key == "source" else [run.sources[j] for j in step[key]]
        if "candidates" in step:
            step["candidates"] = {run.sources[int(j)]: v for j, v in step["candidates"].items()}
    return body


def group_names(run: Run) -> list[str]:
    """The names of the problem's groups, in its order: the target's (group 0), then the sources'."""
    return [run.cfg.data.target.name, *run.sources]


def budget_examples(run: Run) -> int:
    """The examples a fine-tune of any mix sees under the equal budget: steps x batch_size."""
    from gradex.finetunes import budget_steps

    return budget_steps(run) * run.cfg.finetune.batch_size


def bounds(run: Run, sizes: torch.Tensor, budget: int,
           target_floor: float | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The proportions' caps (select.max_repeats) for these group sizes and budget, the prior
    (select.prior) by group or None, and the floors (the target's share, within its cap) or None:
    what `optimize` takes, for the selection and its resamples alike."""
    from gradex.proportions import caps

    c = run.cfg.select
    upper = torch.tensor(caps(sizes.tolist(), budget, c.max_repeats), dtype=torch.float64)
    prior = torch.tensor([c.prior.get(n, 0.0) for n in group_names(run)], dtype=torch.float64) if c.prior else None
    lower = None
    if target_floor:
        lower = torch.zeros_like(upper)
        lower[0] = min(target_floor, float(upper[0]))
    return upper, prior, lower


def weights(run: Run, fn: Callable[[torch.Tensor], torch.Tensor]) -> dict:
    """select.method weights: the proportions with the lowest estimate (gradex.estimate.proportions),
    from natural proportions, equal shares and the best subset's natural proportions, within
    select.max_repeats and select.prior / max_shift; the body of selection.json."""
    from gradex import search
    from gradex.estimate.proportions import feasible, fit, natural, optimize, rounded, sizes
    from gradex.proportions import check, mixture
    from gradex.surrogate import regularization

    t0 = time.perf_counter()
    c, names = run.cfg.select, group_names(run)
    best = search.best(fn, len(run.sources), names=run.sources)
    prob = problem(run)
    l2 = regularization(run, prob)
    n_g = sizes(prob)
    budget = budget_examples(run)
    check(run.cfg, dict(zip(names, (int(v) for v in n_g))), budget)
    members = torch.zeros(len(names), dtype=torch.bool)
    members[0] = True
    members[[j + 1 for j in best.selected]] = True
    best_p = natural(prob, members) if float(n_g[members].sum()) > 0 else None
    # select.target_floor: the target's train split keeps at least its share in the best subset. Why:
    # the estimates are a model around theta*, and a mix that drops the target's own examples lies
    # farthest from what they were checked on. On the corrupted example the unfloored optimum put
    # 100% on add4 and lost to the best subset {add4} by 0.042 test loss (3 seeds, equal steps).
    floor = float(best_p[0]) if c.target_floor and best_p is not None and n_g[0] > 0 else None
    upper, prior, lower = bounds(run, n_g, budget, floor)
    # check() passed without the target's floor, which is known only now
    why = feasible(upper, prior, c.max_shift, lower) if lower is not None else None
    if why is not None:
        raise config_mod.ConfigError(f"select.target_floor: the target keeps at least its share in the best subset "
                                     f"({floor:.4f}), and then {why}; raise select.max_shift, or set "
                                     f"select.target_floor false")
    starts = {"best subset": best_p} if best_p is not None else {}
    if n_g[0] > 0:
        starts["target alone"] = natural(prob, torch.arange(len(names)) == 0)
    found = optimize(prob, l2, upper=upper, starts=starts, prior=prior, max_shift=c.max_shift, lower=lower)
    p = rounded(found.p, c.min_share, upper, lower, prior, c.max_shift)
    loss = fit(prob, p, l2).loss
    shares = {n: float(v) for n, v in zip(names, p.tolist())}
    every = fit(prob, natural(prob), l2).loss
    subset = [run.sources[j] for j in best.selected]
    reason = (f"proportions with the lowest estimate under the equal budget of {budget} examples: {loss:.4f}, "
              f"against {best.estimate:.4f} for the best subset {subset or '(the target alone)'} and {every:.4f} "
              f"for all sources in natural proportions (reached from the {found.start} start, {found.evaluations} fits)")
    return {"method": "weights", "scores": best.scores, "selected": [n for n in run.sources if shares[n] > 0],
            "estimate": loss, "baseline": best.baseline, "history": [], "reason": reason, "surrogate": None,
            "sources": run.sources, "source_scores": dict(zip(run.sources, best.scores)),
            "mode": run.cfg.estimate.mode, "worse_than_target": loss > best.baseline,
            "proportions": shares, "mixture": mixture(shares, budget, run.cfg.finetune.seed),
            "caps": dict(zip(names, upper.tolist())) if c.max_repeats is not None else None,
            "target_floor": None if lower is None else float(lower[0]),
            "best_subset": {"selected": subset, "estimate": best.estimate}, "natural_estimate": every,
            "optimizer": {"start": found.start, "starts": found.starts, "fits": found.evaluations, "l2": l2},
            "seconds": round(time.perf_counter() - t0, 3)}


def stability(run: Run, body: dict, l2: float) -> dict:
    """The selection re-made on select.bootstrap resamples of the store's rows (gradex.stability)."""
    from gradex.estimate import estimate
    from gradex.stability import stability as resampled

    if body["method"] == "weights":
        return weight_stability(run, body, l2)
    c, names = run.cfg, run.sources
    weights = run.cfg.resolved_weighting()
    # one refinement, not estimate.refinements: measured on the strategyqa example (8 clusters, 30
    # resamples), the shares moved by one selection in 240 and the whole took 0.57x the time
    refinements = min(1, c.estimate.refinements)

    def fit(prob, subsets: torch.Tensor):
        return estimate(prob, subsets, l2, refinements=refinements, tol=c.estimate.tol, weighting=weights)

    def choose(fn) -> tuple[list[int], list[float]]:
        found = selection(run, c.select.method, fn)
        return [names.index(s) for s in found["selected"]], [found["source_scores"][s] for s in names]

    chosen = [names.index(s) for s in body["selected"]]
    return resampled(problem(run), fit, choose, chosen, c.select.bootstrap, c.select.seed, names)


def weight_stability(run: Run, body: dict, l2: float) -> dict:
    """The proportions re-found on select.bootstrap resamples of the store's rows, each from the
    proportions found on the store itself (gradex.stability.proportions)."""
    from gradex.estimate.proportions import fit, optimize, rounded, sizes
    from gradex.stability import proportions

    c, names = run.cfg.select, group_names(run)
    prob = problem(run)
    chosen = torch.tensor([body["proportions"][n] for n in names], dtype=torch.float64)
    upper, prior, lower = bounds(run, sizes(prob), body["mixture"]["budget_examples"], body.get("target_floor"))

    def again(resampled) -> torch.Tensor:
        found = optimize(resampled, l2, upper=upper, starts={"found": chosen}, prior=prior, max_shift=c.max_shift,
                         default_starts=False, lower=lower)
        return rounded(found.p, c.min_share, upper, lower, prior, c.max_shift)

    return proportions(prob, again, chosen, lambda p, q: fit(p, q, l2).loss, c.bootstrap, c.seed, names)


def read_selection(run: Run) -> dict:
    """What the select stage chose (selection.json), for the stages downstream of it."""
    return read_json(run.dir / "selection.json", "gradex select --force")


def selected_clusters(run: Run, selected: Sequence[str]) -> dict[str, dict] | None:
    """For selection.json and the report: each selected cluster's size and example prompts."""
    path = run.dir / CLUSTERS
    if run.cfg.data.clusters is None or not path.exists():
        return None
    by_name = {f["name"]: f for f in json.loads(path.read_text())["clusters"]}
    return {name: {"size": by_name[name]["size"], "examples": by_name[name]["examples"]}
            for name in selected if name in by_name}
