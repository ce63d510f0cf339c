"""Choose auxiliary sources from estimated target losses f_hat(S) (docs/method.md, section 4).

Every method here sees the estimator only as `estimate_fn`: a (k, n) bool tensor of subsets in,
a (k,) tensor of estimated target losses out (lower is better). That keeps selection independent
of how the estimates are made (linear estimates from gradex.estimate, a reconstructed model, or a
test double with a known answer), and lets each method hand the estimator whole batches.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

EstimateFn = Callable[[torch.Tensor], torch.Tensor]

__all__ = ["EstimateFn", "Selection", "default_subsets", "sample_subsets", "ensemble", "effects", "forward", "backward", "exhaustive",
           "EXHAUSTIVE_LIMIT"]

EXHAUSTIVE_LIMIT = 16  # sources: 2^16 = 65,536 subsets, ~20 s of estimates at the measured rate


@dataclass
class Selection:
    """The outcome of one selection method, JSON-serializable through `to_dict`."""

    method: str
    scores: list[float]  # per source; lower = better (lower estimated loss when included)
    selected: list[int]  # 0-based source columns
    estimate: float  # f_hat of the selected subset
    baseline: float  # f_hat of the target alone (the empty subset)
    history: list[dict] = field(default_factory=list)  # steps taken (forward / backward)
    reason: str = ""
    # ensemble only: least-squares fit f_hat(S) ~ intercept + sum_i beta_i 1[i in S]
    surrogate: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))

    @property
    def worse_than_target(self) -> bool:
        """The chosen sources are estimated to hurt: their mix is estimated worse than the target alone."""
        return bool(self.selected) and self.estimate > self.baseline


WORSE = "; WARNING: the chosen subset is estimated worse than the target alone"


def _jsonable(obj: Any) -> Any:
    """Plain Python types only; non-finite floats become None (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def _call(estimate_fn: EstimateFn, subsets: torch.Tensor) -> torch.Tensor:
    """Run the estimator and check that it returned one finite loss per subset."""
    out = torch.as_tensor(estimate_fn(subsets)).double().reshape(-1)
    if out.numel() != subsets.shape[0]:
        raise ValueError(f"estimate_fn returned {out.numel()} losses for {subsets.shape[0]} subsets")
    if not torch.isfinite(out).all():
        raise FloatingPointError("estimate_fn returned a non-finite loss")
    return out


def sample_subsets(n: int, m: int, alpha: float, seed: int) -> torch.Tensor:
    """m uniformly random subsets of the n sources, each of size round(alpha * n) (at least 1).

    Fixed size rather than independent coin flips, as in the paper: every subset trains on about
    the same amount of extra data, so the loss differences come from which sources, not how many.
    Deterministic from `seed` (its own generator, so global RNG state is untouched).
    """
    if n < 1 or m < 1:
        raise ValueError(f"need n >= 1 sources and m >= 1 subsets, got n={n}, m={m}")
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    k = min(n, max(1, int(round(alpha * n))))
    g = torch.Generator().manual_seed(int(seed))
    picks = torch.rand(m, n, generator=g).argsort(dim=1)[:, :k]
    return torch.zeros(m, n, dtype=torch.bool).scatter_(1, picks, True)


def default_subsets(n: int) -> int:
    """How many subsets the ensemble and effects sample by default for n sources: max(400, 4 n).

    Why it grows with n: both fit one coefficient per source by least squares (the surrogate), so
    the subsets must outnumber the sources several times over for every coefficient to be
    determined; 400 was the default at the paper's scale of tens of sources, where 4 n is less.
    Each source's score averages about m * alpha subsets holding it, so its noise falls as 1/sqrt(m).
    """
    if n < 1:
        raise ValueError(f"need n >= 1 sources, got {n}")
    return max(400, 4 * n)


def _fmt(i: int, names: Sequence[str] | None) -> str:
    """A source as a reason names it: by its name when the caller gave them, else by its column."""
    return names[i] if names is not None else f"#{i}"


def ensemble(estimate_fn: EstimateFn, n: int, m: int, alpha: float, seed: int,
             top_k: int | None = None) -> Selection:
    """The paper's random ensemble: score each source by what including it does on average.

    score_i = mean f_hat over sampled subsets containing i - mean over those without i, so a
    negative score means "helps". With fixed-size subsets this is relative: for an additive f_hat
    it equals n/(n-1) (beta_i - mean beta), i.e. "better than the average source". The linear
    surrogate f_hat(S) ~ a + sum_i beta_i 1[i in S] (least squares, beta centered) controls for
    the other members of each subset; its R^2 says how additive the estimates are, i.e. how far a
    per-source ranking can be trusted. Keeps sources with score < 0, or the top_k lowest scores.
    The chosen subset and the empty subset are then estimated directly, which is the absolute
    check: `estimate` < `baseline` means the chosen sources are estimated to help.
    """
    subsets = sample_subsets(n, m, alpha, seed)
    loss = _call(estimate_fn, subsets).numpy()
    mem = subsets.numpy()
    scores = []
    for i in range(n):
        inside, outside = loss[mem[:, i]], loss[~mem[:, i]]
        scores.append(float(inside.mean() - outside.mean()) if len(inside) and len(outside) else float("nan"))
    # Least squares with an intercept: the indicators centered by column (each source's share of the
    # subsets), so the intercept drops out. Every sampled subset has the same size, so
    # sum_i 1[i in S] is constant and only differences of the beta_i are identifiable: the
    # minimum-norm solution is the sum-zero beta. beta_i < 0: i is better than the average source.
    share = mem.mean(0)
    beta, *_ = np.linalg.lstsq(mem.astype(np.float64) - share, loss - loss.mean(), rcond=None)
    beta -= beta.mean()  # the null direction when sizes are fixed; a no-op otherwise up to rounding
    intercept = float(loss.mean() - share @ beta)
    resid = loss - intercept - mem @ beta
    ss_tot = float(((loss - loss.mean()) ** 2).sum())
    r2 = 1.0 - float((resid ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan")
    surrogate = {"intercept": intercept, "beta": [float(b) for b in beta], "r2": r2,
                 "subsets": m, "subset_size": int(mem[0].sum()),
                 "note": "beta centered to sum 0: with fixed-size subsets only differences are identifiable"}

    finite = [i for i in range(n) if math.isfinite(scores[i])]
    if top_k is not None:
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        selected = sorted(sorted(finite, key=lambda i: scores[i])[:top_k])
        rule = f"the {top_k} lowest scores"
    else:
        selected = [i for i in finite if scores[i] < 0]
        rule = ("every source whose sampled subsets average a lower estimate than those without it "
                "(score < 0: better than the average source)")
    final = torch.zeros(2, n, dtype=torch.bool)
    final[0, selected] = True
    est, base = _call(estimate_fn, final).tolist()
    reason = (f"ensemble of {m} random subsets of {int(mem[0].sum())}/{n} sources (seed {seed}); kept {rule}: "
              f"{len(selected)} source(s); linear surrogate R^2 = {r2:.3f}; "
              f"estimated loss {est:.6g} vs target alone {base:.6g}")
    if len(finite) < n:
        reason += f"; {n - len(finite)} source(s) never or always sampled got no score"
    if selected and est > base:
        reason += WORSE
    return Selection(method="ensemble", scores=scores, selected=selected, estimate=est, baseline=base,
                     history=[], reason=reason, surrogate=surrogate)


def _stepwise(estimate_fn: EstimateFn, n: int, current: list[int], adding: bool,
              cur: float, limit: int | None = None) -> tuple[list[int], float, list[float], list[dict]]:
    """Greedy rounds shared by forward (adding) and backward (dropping) selection.

    Each round estimates every one-source change of `current` in one batched call and takes the
    change that lowers f_hat most; it stops when none does. score_i = f_hat(with i) - f_hat(without i)
    in the round i was last a candidate, so negative = helpful in both directions. Forward stops
    at `limit` sources, if given.
    """
    scores = [float("nan")] * n
    history: list[dict] = []
    while len(current) < min(n, limit if limit is not None else n) if adding else current:
        cands = [i for i in range(n) if i not in current] if adding else list(current)
        batch = torch.zeros(len(cands), n, dtype=torch.bool)
        batch[:, current] = True
        batch[torch.arange(len(cands)), cands] = adding
        loss = _call(estimate_fn, batch).tolist()
        best = min(range(len(cands)), key=lambda j: loss[j])
        for j, i in enumerate(cands):
            scores[i] = loss[j] - cur if adding else cur - loss[j]
        tried = {str(i): loss[j] for j, i in enumerate(cands)}
        if not loss[best] < cur:
            history.append({"round": len(history) + 1, "action": "stop", "loss": cur, "candidates": tried})
            break
        if adding:
            current.append(cands[best])
        else:
            current.remove(cands[best])
        history.append({"round": len(history) + 1, "action": "add" if adding else "drop", "source": cands[best],
                        "loss": loss[best], "previous": cur, "candidates": tried})
        cur = loss[best]
    return current, cur, scores, history


def forward(estimate_fn: EstimateFn, n: int, limit: int | None = None, names: Sequence[str] | None = None) -> Selection:
    """Greedy forward stepwise: from the target alone, add the source that lowers f_hat most
    (see `_stepwise`); stops when no addition lowers f_hat, or at `limit` sources. `names`: the
    sources' names, for the reason."""
    base = float(_call(estimate_fn, torch.zeros(1, n, dtype=torch.bool))[0])
    current, cur, scores, history = _stepwise(estimate_fn, n, [], True, base, limit)
    stop = ("every source added" if len(current) == n else f"stopped at the limit of {limit} source(s)"
            if limit is not None and len(current) >= limit else "stopped: no addition lowers the estimate")
    reason = (f"forward stepwise from the target alone: added {len(current)} source(s) in order "
              f"{[_fmt(i, names) for i in current]}; estimated loss {base:.6g} -> {cur:.6g}; " + stop)
    return Selection(method="forward", scores=scores, selected=sorted(current), estimate=cur, baseline=base,
                     history=history, reason=reason)


def backward(estimate_fn: EstimateFn, n: int, names: Sequence[str] | None = None) -> Selection:
    """Greedy backward stepwise: from all sources, drop the one whose removal lowers f_hat most
    (mirror image of `forward`); score_i > 0 means source i is harmful. `names`: as `forward`'s."""
    first = torch.zeros(2, n, dtype=torch.bool)
    first[0] = True
    start, base = _call(estimate_fn, first).tolist()
    current, cur, scores, history = _stepwise(estimate_fn, n, list(range(n)), False, start)
    reason = (f"backward stepwise from all {n} sources: dropped {n - len(current)} source(s) in order "
              f"{[_fmt(h['source'], names) for h in history if h['action'] == 'drop']}; estimated loss "
              f"{start:.6g} -> {cur:.6g} (target alone {base:.6g}); "
              + ("every source dropped" if not current else "stopped: no removal lowers the estimate"))
    return Selection(method="backward", scores=scores, selected=sorted(current), estimate=cur, baseline=base,
                     history=history, reason=reason)


def _main_effects(subsets: np.ndarray, loss: np.ndarray) -> list[float]:
    """Per source: mean estimate of the subsets holding it minus the mean of those without it."""
    return [float(loss[subsets[:, i]].mean() - loss[~subsets[:, i]].mean())
            if subsets[:, i].any() and (~subsets[:, i]).any() else float("nan") for i in range(subsets.shape[1])]


def exhaustive(estimate_fn: EstimateFn, n: int, limit: int = EXHAUSTIVE_LIMIT) -> Selection:
    """Estimate every one of the 2^n subsets (the target alone included) and keep the best.

    The decision is absolute: the chosen mix is never estimated worse than the target alone, which
    is one of the candidates. A source's score is its average effect over all subsets,
    mean f_hat(S + i) - f_hat(S) over every S without i (negative helps), which needs no sampling.
    """
    if n > limit:
        raise ValueError(f"exhaustive search over 2^{n} subsets is too many (limit: {limit} sources); "
                         f"use select.method forward or effects")
    codes = torch.arange(2 ** n)
    subsets = ((codes[:, None] >> torch.arange(n)) & 1).bool()
    loss = _call(estimate_fn, subsets).numpy()
    best = int(np.argmin(loss))
    selected = [i for i in range(n) if bool(subsets[best, i])]
    scores = _main_effects(subsets.numpy(), loss)
    order = np.argsort(loss)[:10]
    history = [{"rank": r + 1, "members": [i for i in range(n) if bool(subsets[j, i])], "loss": float(loss[j])}
               for r, j in enumerate(order)]
    reason = (f"exhaustive search over all {2 ** n} subsets of the {n} sources: kept the subset with the lowest "
              f"estimated target loss ({len(selected)} source(s), {loss[best]:.6g} vs target alone {loss[0]:.6g}); "
              f"a source's score is its average effect when added to any subset")
    return Selection(method="exhaustive", scores=scores, selected=selected, estimate=float(loss[best]),
                     baseline=float(loss[0]), history=history, reason=reason)


def best(estimate_fn: EstimateFn, n: int, limit: int = EXHAUSTIVE_LIMIT, names: Sequence[str] | None = None) -> Selection:
    """The subset with the lowest estimate: every subset when n <= limit (`exhaustive`), else forward
    stepwise, which found the same subset as the exhaustive search on both shipped examples. The
    Selection is named by the rule that ran."""
    if n <= limit:
        return exhaustive(estimate_fn, n, limit)
    sel = forward(estimate_fn, n, names=names)
    return dataclasses.replace(sel, reason=f"{n} sources are too many to estimate all 2^{n} subsets (limit "
                                           f"{limit}), so: " + sel.reason)


def random_size_subsets(n: int, m: int, seed: int) -> torch.Tensor:
    """m random subsets whose sizes are uniform on 0..n (members uniform given the size).

    Varying the size is what makes a source's own effect identifiable: with a fixed size, only
    differences between sources are (see `ensemble`).
    """
    if n < 1 or m < 1:
        raise ValueError(f"need n >= 1 sources and m >= 1 subsets, got n={n}, m={m}")
    g = torch.Generator().manual_seed(int(seed))
    sizes = torch.randint(0, n + 1, (m,), generator=g)
    ranks = torch.rand(m, n, generator=g).argsort(dim=1).argsort(dim=1)  # a random rank per source
    return ranks < sizes[:, None]


def effects(estimate_fn: EstimateFn, n: int, m: int, seed: int) -> Selection:
    """Random subsets of every size; least squares f_hat(S) ~ a + sum_i beta_i 1[i in S] with an
    intercept; keep every source with beta_i < 0 (including it lowers the estimate, on average).

    Unlike `ensemble`, the decision is absolute: when every source helps, every source is kept; when
    all hurt, none is. The chosen mix and the target alone are then estimated directly, and a chosen
    mix estimated worse than the target alone is flagged (`worse_than_target`) in the reason.
    """
    subsets = random_size_subsets(n, m, seed)
    loss = _call(estimate_fn, subsets).numpy()
    mem = subsets.numpy().astype(np.float64)
    design = np.hstack([np.ones((m, 1)), mem])
    coef, *_ = np.linalg.lstsq(design, loss, rcond=None)
    beta = coef[1:]
    resid = loss - design @ coef
    ss_tot = float(((loss - loss.mean()) ** 2).sum())
    r2 = 1.0 - float((resid ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan")
    selected = [i for i in range(n) if beta[i] < 0]
    final = torch.zeros(2, n, dtype=torch.bool)
    final[0, selected] = True
    est, base = _call(estimate_fn, final).tolist()
    surrogate = {"intercept": float(coef[0]), "beta": [float(b) for b in beta], "r2": r2, "subsets": m,
                 "note": "subset sizes uniform on 0..n, so beta_i is the absolute effect of including source i"}
    reason = (f"{m} random subsets of every size (seed {seed}); linear effects fitted with an intercept "
              f"(R^2 = {r2:.3f}); kept every source whose effect lowers the estimated loss: {len(selected)} "
              f"source(s), estimated loss {est:.6g} vs target alone {base:.6g}")
    if selected and est > base:
        reason += WORSE
    return Selection(method="effects", scores=[float(b) for b in beta], selected=selected, estimate=est,
                     baseline=base, reason=reason, surrogate=surrogate)
