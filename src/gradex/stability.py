"""How sure a selection is: the same selection re-made on bootstrap resamples of the store's rows.

A resample draws with replacement each group's training rows within the group (the target's train
rows and every source's, so each keeps its size) and the target's validation rows. The regularization
stays the run's l2, so the spread is the data's. Per source it gives how often the source is
selected and its score's percentile interval; the selection gets an interval on its estimate.
A source whose inclusion flips in more than `FLIPS` (20%) of the resamples is marked uncertain.

Separately, the target's validation split alone: the fit z of a subset never reads the validation
rows, so resampling only those rows needs no new fit, and says whether the split is large enough to
tell the selection from its runner-up (the one-source change of it with the lowest estimate).

What it does not resample: the projection (another seed needs another gradient pass) and theta*.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from gradex.estimate import Estimates, Problem, linear_loss

FLIPS = 0.2  # a source whose inclusion flips in more than this share of the resamples is uncertain
# a selected source chosen in fewer resamples than this is uncertain; 1 - 0.2 is 0.8 exactly, while
# 1 - 0.8 is 0.19999999999999996, which would flag a left-out source chosen in exactly 20%
STABLE = 1 - FLIPS

Fit = Callable[[Problem, torch.Tensor], Estimates]  # (problem, (k, n) bool subsets) -> their estimates
Choose = Callable[[Callable[[torch.Tensor], torch.Tensor]], tuple[list[int], list[float]]]  # estimate fn -> (selected, scores)


def _draw(size: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(size, (size,), generator=gen) if size else torch.zeros(0, dtype=torch.long)


def resample(problem: Problem, gen: torch.Generator) -> Problem:
    """The problem with every group's training rows and the validation rows drawn with replacement."""
    groups = problem.group
    rows = torch.cat([idx[_draw(len(idx), gen)] for idx in
                      ((groups == g).nonzero().flatten() for g in range(problem.n_sources + 1))])
    rows = rows[torch.argsort(groups[rows], stable=True)]  # each group one block, as the solver reads it
    val = _draw(problem.x_val.shape[0], gen)
    return Problem(x=problem.x[rows], u=problem.u[rows], group=groups[rows], x_val=problem.x_val[val],
                   u_val=problem.u_val[val], n_sources=problem.n_sources, col_sq_norms=problem.col_sq_norms,
                   theta_norm=problem.theta_norm)


def _interval(values: np.ndarray, level: float) -> list[float | None]:
    """The percentile interval of the finite values (None where fewer than two are finite)."""
    v = values[np.isfinite(values)]
    if len(v) < 2:
        return [None, None]
    tail = 100 * (1 - level) / 2
    return [float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))]


def bootstrap(problem: Problem, fit: Fit, choose: Choose, chosen: list[int], resamples: int, seed: int,
              level: float = 0.95) -> dict:
    """The selection `choose` makes, re-made on `resamples` bootstrap resamples of `problem`.

    chosen: the selection on the problem itself (column indices). Returns per source (by column) the
    share of resamples that selected it and its score's percentile interval, the interval of the
    chosen subset's estimate, the columns marked uncertain, and `stability`: the lowest share among
    the chosen sources (1.0 for an empty selection that no resample left)."""
    n = problem.n_sources
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(1, n, dtype=torch.bool)
    mask[0, chosen] = True
    picked = np.zeros((resamples, n), dtype=bool)
    scores = np.full((resamples, n), math.nan)
    estimates = np.full(resamples, math.nan)
    empty = 0
    # a bar: with many subsets each resample is a whole search (the strategyqa example: 50 x 4.5 s)
    for b in tqdm(range(resamples), desc="bootstrap", unit="resample", leave=False):
        p = resample(problem, gen)
        selected, score = choose(lambda subsets, p=p: fit(p, subsets).loss)
        picked[b, selected] = True
        scores[b] = np.asarray(score, dtype=np.float64)
        estimates[b] = float(fit(p, mask).loss[0])
        empty += not selected
    share = picked.mean(0)
    uncertain = [j for j in range(n) if (share[j] < STABLE if j in chosen else share[j] > FLIPS)]
    # an empty selection is as stable as the resamples that also left every source out
    stability = float(min(share[j] for j in chosen)) if chosen else empty / resamples
    return {"resamples": resamples, "seed": seed, "level": level, "share": share.tolist(),
            "score_interval": [_interval(scores[:, j], level) for j in range(n)],
            "estimate_interval": _interval(estimates, level), "uncertain": uncertain, "stability": stability}


def separation(problem: Problem, fit: Fit, chosen: list[int], resamples: int, seed: int,
               level: float = 0.95) -> dict | None:
    """Whether the target's validation split tells the chosen subset from its runner-up.

    The runner-up is the one-source change of the chosen subset (one source added or dropped) with
    the lowest estimate. Both fits are made once; the validation rows are resampled with replacement
    and the paired difference runner-up - chosen of their mean validation loss is taken each time.
    `separated`: the difference's percentile interval lies above zero. None with no sources."""
    n = problem.n_sources
    if n == 0:
        return None
    base = torch.zeros(n, dtype=torch.bool)
    base[chosen] = True
    flips = base.repeat(n, 1)
    flips[torch.arange(n), torch.arange(n)] = ~base
    est = fit(problem, torch.cat([base[None], flips]))
    j = int(torch.argmin(est.loss[1:]))
    z = est.z[[0, j + 1]]
    gen = torch.Generator().manual_seed(seed)
    diffs = np.empty(resamples)
    for b in range(resamples):
        val = _draw(problem.x_val.shape[0], gen)
        loss = linear_loss(replace(problem, x_val=problem.x_val[val], u_val=problem.u_val[val]), z)
        diffs[b] = float(loss[1] - loss[0])
    low, high = _interval(diffs, level)
    return {"runner_up": flips[j].nonzero().flatten().tolist(), "changed": j, "added": bool(flips[j, j]),
            "validation_examples": int(problem.x_val.shape[0]), "difference": float(est.loss[j + 1] - est.loss[0]),
            "interval": [low, high], "separated": low is not None and low > 0}


def stability(problem: Problem, fit: Fit, choose: Choose, chosen: list[int], resamples: int, seed: int,
              names: list[str], level: float = 0.95) -> dict:
    """`bootstrap` and `separation` named by source, for selection.json."""
    found = bootstrap(problem, fit, choose, chosen, resamples, seed, level)
    sep = separation(problem, fit, chosen, resamples, seed, level)
    if sep is not None:
        sep["runner_up"] = [names[j] for j in sep["runner_up"]]
        sep["changed"] = names[sep["changed"]]
    return {"resamples": resamples, "seed": seed, "level": level,
            "share": dict(zip(names, found["share"])),
            "score_interval": dict(zip(names, found["score_interval"])),
            "estimate_interval": found["estimate_interval"],
            "uncertain": [names[j] for j in found["uncertain"]], "stability": found["stability"],
            "separation": sep}


def proportions(problem: Problem, optimize: Callable[[Problem], torch.Tensor], chosen: torch.Tensor,
                loss: Callable[[Problem, torch.Tensor], float], resamples: int, seed: int, names: list[str],
                level: float = 0.95) -> dict:
    """The proportions `optimize` finds ((n+1,) shares, group 0 the target's), re-found on `resamples`
    bootstrap resamples of `problem`, by name (names[0] the target's): each share's percentile
    interval, how often each source gets a share at all (`share`, as for a selection), the sources
    whose inclusion flips in more than FLIPS of the resamples, and the interval of the chosen
    proportions' estimate `loss(resample, chosen)`."""
    gen = torch.Generator().manual_seed(seed)
    found = np.zeros((resamples, problem.n_sources + 1))
    estimates = np.full(resamples, math.nan)
    for b in tqdm(range(resamples), desc="bootstrap", unit="resample", leave=False):
        p = resample(problem, gen)
        found[b] = optimize(p).numpy()
        estimates[b] = loss(p, chosen)
    given = (found > 0).mean(0)
    kept = chosen.numpy() > 0
    sources = range(1, problem.n_sources + 1)
    uncertain = [names[g] for g in sources if (given[g] < STABLE if kept[g] else given[g] > FLIPS)]
    held = [given[g] for g in sources if kept[g]]
    return {"resamples": resamples, "seed": seed, "level": level,
            "share": {names[g]: float(given[g]) for g in sources},
            "proportion_interval": {names[g]: _interval(found[:, g], level) for g in range(len(names))},
            "estimate_interval": _interval(estimates, level), "uncertain": uncertain,
            "stability": float(min(held)) if held else float((found[:, 1:] == 0).all(1).mean())}


def stability_lines(body: dict) -> list[str]:
    """What a person should know of the selection's stability: uncertain sources, an unseparated runner-up."""
    found = body.get("stability")
    if not found:
        return []
    lines = []
    share = found["share"]
    if found["uncertain"]:
        lines.append(f"uncertain ({found['resamples']} bootstrap resamples of the store): " + ", ".join(
            f"{name} ({'selected' if name in body['selected'] else 'left out'}, yet {share[name]:.0%} of resamples "
            f"selected it)" for name in found["uncertain"]))
    sep = found.get("separation")
    if sep and not sep["separated"] and sep["interval"][0] is not None:
        low, high = sep["interval"]
        change = f"{'adding' if sep['added'] else 'dropping'} {sep['changed']}"
        lines.append(f"the target's validation split ({sep['validation_examples']} examples) does not separate the "
                     f"selection from its runner-up ({change}): estimated difference {sep['difference']:+.4f}, "
                     f"{found['level']:.0%} interval over resampled validation examples "
                     f"[{low:+.4f}, {high:+.4f}]; the choice between them may be noise (data.target.validation)")
    return lines
