"""Does the selection beat the obvious answers? Equal-budget fine-tunes of every candidate mix, over seeds.

Every mix is fine-tuned with the `finetune` recipe (same init, same number of optimizer steps under
the default equal budget) with seeds 0..k-1, then evaluated on the target test split. For each
baseline, the difference to gradex's selection is taken seed by seed (seed s of the baseline against
seed s of the selection: same data order and adapter initialization where the mixes allow it),
and a 95% Student-t interval of the mean paired difference says whether the gap is beyond the
noise of fine-tuning. The random baseline draws a fresh mix for every seed, so its interval
covers the choice of mix as well as the seed.

Mixes that are the same sources at every seed (two baselines that pick the same sources, a
baseline that picks the selection) are one mix: fine-tuned once, shown once under all their names
("same mix"), never compared with themselves, so no identical pair reads as a tie.

This module holds the pure part (which mixes, the statistics, the table and the verdict);
`gradex.stages.compare` runs the fine-tunes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Sequence

import numpy as np

SELECTED = "selected"  # the mix gradex deploys: the selection of `select.method`


@dataclass
class Mix:
    """A candidate mix: its name, what made it, and its sources for each seed."""

    name: str
    kind: str  # selection | baseline | user
    members: list[list[str]]  # members[s] = the sources fine-tuned with seed s
    note: str = ""
    same: list[str] = field(default_factory=list)  # other mixes' names that are this mix at every seed
    # name (the target's and the sources') -> share, sampled in those shares (select.method weights);
    # None: the members' examples pooled as they are
    proportions: dict[str, float] | None = None

    @property
    def names(self) -> list[str]:
        return [self.name, *self.same]


def merge_same(mixes: Sequence[Mix]) -> list[Mix]:
    """The mixes with those that are the same sources at every seed merged into the first of them, which
    keeps its place and lists the others' names in `same` (their notes joined to its note)."""
    out: list[Mix] = []
    first: dict[tuple, int] = {}
    for m in mixes:
        key = (tuple(frozenset(members) for members in m.members), shares_key(m.proportions))
        if key not in first:
            first[key] = len(out)
            out.append(replace(m, same=list(m.same)))
            continue
        kept = out[first[key]]
        out[first[key]] = replace(kept, same=[*kept.same, *m.names], note=f"{kept.note}; {m.name}: {m.note}")
    return out


def shares_key(proportions: dict[str, float] | None) -> tuple | None:
    """Proportions as a hashable key, to 6 decimals (what tells two mixes apart)."""
    return None if proportions is None else tuple(sorted((n, round(v, 6)) for n, v in proportions.items() if v > 0))


def shown(mix: dict) -> str:
    """How a summarized mix is named in tables and verdicts: all its names when several share it."""
    return " = ".join(mix.get("same_mix") or [mix["name"]])


def paired_interval(diffs: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """Mean, standard deviation and the Student-t interval of the mean of paired differences.

    With one pair there is no spread to measure: the interval is None, and no verdict can be drawn.
    """
    from scipy.stats import t

    d = np.asarray(diffs, dtype=np.float64)
    n = len(d)
    mean = float(d.mean()) if n else math.nan
    if n < 2:
        return {"n": n, "mean": mean, "sd": None, "low": None, "high": None}
    sd = float(d.std(ddof=1))
    half = float(t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "low": mean - half, "high": mean + half}


def spread(values: Sequence[float]) -> dict[str, Any]:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else None, "values": v.tolist()}


def judge(interval: dict[str, Any]) -> str:
    """`better` / `worse` when the interval excludes 0 (positive = gradex's selection better), else `tie`;
    `untested` without an interval (one seed)."""
    if interval["low"] is None:
        return "untested"
    if interval["low"] > 0:
        return "better"
    if interval["high"] < 0:
        return "worse"
    return "tie"


def summarize(mixes: Sequence[Mix], rows: Sequence[dict]) -> list[dict]:
    """Per mix: test loss and metric over seeds, and the paired difference to the selection.

    rows: one per (mix, seed) with keys mix, seed, test_loss, test_score. Differences are oriented so
    that positive means gradex's selection did better: baseline loss - selection loss, and
    selection score - baseline score.
    """
    by = {(r["mix"], r["seed"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows if r["mix"] == SELECTED})
    out = []
    for mix in mixes:
        mine = [by[(mix.name, s)] for s in seeds if (mix.name, s) in by]
        entry: dict[str, Any] = {"name": mix.name, "kind": mix.kind, "note": mix.note, "members": mix.members,
                                 **({"proportions": mix.proportions} if mix.proportions is not None else {}),
                                 **({"same_mix": mix.names} if mix.same else {}),
                                 "sizes": [len(m) for m in mix.members], "seeds": [r["seed"] for r in mine],
                                 "test_loss": spread([r["test_loss"] for r in mine]),
                                 "test_score": spread([r["test_score"] for r in mine]),
                                 "validation_loss": spread([r["validation_loss"] for r in mine])}
        no_match = [r["test_no_match"] for r in mine if r.get("test_no_match") is not None]
        if no_match:  # generations the answer pattern found no answer in (scored wrong)
            entry["test_no_match"] = spread(no_match)
        estimates = [r["estimate"] for r in mine if r.get("estimate") is not None]
        entry["estimate"] = float(np.mean(estimates)) if estimates else None  # of the validation loss
        if mix.name != SELECTED:
            pairs = [(by[(SELECTED, s)], by[(mix.name, s)]) for s in seeds if (mix.name, s) in by]
            loss = paired_interval([b["test_loss"] - a["test_loss"] for a, b in pairs])
            score = paired_interval([a["test_score"] - b["test_score"] for a, b in pairs])
            entry.update(diff_loss=loss, diff_score=score, verdict_loss=judge(loss), verdict_score=judge(score))
        out.append(entry)
    return out


def agreement(estimates: Sequence[float], real: Sequence[float]) -> dict[str, float]:
    """Spearman and Pearson correlation (NaN below three points) and mean absolute relative error of
    estimated against real losses: the figures `gradex validate` and `gradex compare` report."""
    from scipy.stats import pearsonr, spearmanr

    est, real = np.asarray(estimates, dtype=np.float64), np.asarray(real, dtype=np.float64)
    enough = len(real) > 2
    return {"spearman": float(spearmanr(est, real).statistic) if enough else math.nan,
            "pearson": float(pearsonr(est, real).statistic) if enough else math.nan,
            "mean_abs_rel_error": float(np.mean(np.abs(est - real) / real))}


def estimate_check(rows: Sequence[dict]) -> dict[str, Any] | None:
    """How well the estimates predicted the compared fine-tunes: each distinct mix's estimated target
    validation loss against its real one (mean over seeds), as `gradex validate` does for random
    subsets. None when fewer than three distinct mixes carry an estimate."""
    by: dict[tuple[str, ...], list[dict]] = {}
    for r in rows:
        if r.get("estimate") is not None:
            by.setdefault((tuple(r["members"]), shares_key(r.get("proportions"))), []).append(r)
    if len(by) < 3:
        return None
    est = [g[0]["estimate"] for g in by.values()]
    real = [float(np.mean([r["validation_loss"] for r in g])) for g in by.values()]
    return {"mixes": len(by), **agreement(est, real)}


def verdict(summary: Sequence[dict], metric: str) -> str:
    """One sentence: which baselines the selection beat, tied and lost to, on the loss and the metric,
    and which chose the selection's own mix (not compared: that is no tie)."""
    others = [m for m in summary if m["name"] != SELECTED]
    own = next((m.get("same_mix", [])[1:] for m in summary if m["name"] == SELECTED), [])
    same = f"{', '.join(own)} chose the same mix as gradex's selection (not compared with it)" if own else ""
    if not others:
        return f"{same}; nothing else to compare the selection with" if same else "nothing to compare the selection with"
    if all(m["verdict_loss"] == "untested" for m in others):
        n = len(summary[0]["seeds"]) if summary else 0
        return (f"{n} seed per mix: differences have no interval, so no verdict; `gradex compare` "
                f"fine-tunes more seeds (compare.seeds)" + (f". {same}" if same else ""))
    parts = []
    for key, label in (("verdict_loss", "test loss"), ("verdict_score", f"test {metric}")):
        groups: dict[str, list[str]] = {}
        for m in others:
            groups.setdefault(m[key], []).append(shown(m))
        said = []
        if groups.get("better"):
            said.append(f"beat {', '.join(groups['better'])} beyond seed noise")
        if groups.get("tie"):
            said.append(f"tied {', '.join(groups['tie'])} within the 95% interval")
        if groups.get("worse"):
            said.append(f"lost to {', '.join(groups['worse'])} beyond seed noise")
        parts.append(f"on {label} gradex's selection " + "; ".join(said))
    return ". ".join(parts + ([same] if same else [])) + "."


def fmt_number(value: float | None, fmt: str = ".3f", signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, ("+" if signed else "") + fmt)


def fmt_interval(d: dict | None) -> str:
    if d is None:
        return ""
    if d["low"] is None:
        return fmt_number(d["mean"], signed=True)
    return f"{fmt_number(d['mean'], signed=True)} [{fmt_number(d['low'], signed=True)}, {fmt_number(d['high'], signed=True)}]"


def format_table(result: dict) -> str:
    """The comparison as text: one line per mix (accuracy beside loss), then the verdict."""
    r = result["recipe"]
    metric = result["metric"]
    # with an answer pattern: how many test generations it found no answer in (mean over seeds)
    unmatched = any("test_no_match" in m for m in result["mixes"])
    wide = max([22, *(len(shown(m)) for m in result["mixes"])])
    score_width = max(18, len(metric) + 5)
    lines = [f"compare: {result['seeds']} seed(s) per mix, {r['description']}; target test split "
             f"({result['test_examples']} examples)",
             f"{'mix':<{wide}} {'sources':>7} {'test loss (sd)':>16} {metric + ' (sd)':>{score_width}} "
             + (f"{'no match':>8} " if unmatched else "")
             + f"{'loss: gain [95% CI]':>28} {metric + ': gain [95% CI]':>{score_width + 12}}"]
    for m in result["mixes"]:
        size = m["sizes"][0] if len(set(m["sizes"])) == 1 else f"{min(m['sizes'])}-{max(m['sizes'])}"
        loss, score = m["test_loss"], m["test_score"]
        lines.append(f"{shown(m):<{wide}} {size!s:>7} {fmt_number(loss['mean']):>8} ({fmt_number(loss['sd']):>5})"
                     f" {fmt_number(score['mean']):>{score_width - 8}} ({fmt_number(score['sd']):>5})"
                     + (f" {fmt_number(m['test_no_match']['mean'], '.1f') if 'test_no_match' in m else '-':>8}"
                        if unmatched else "")
                     + f" {fmt_interval(m.get('diff_loss')):>28} {fmt_interval(m.get('diff_score')):>{score_width + 12}}")
    lines.append("gain: the baseline's loss minus the selection's (or the selection's score minus the "
                 "baseline's), paired by seed; positive = gradex's selection better")
    if any("same_mix" in m for m in result["mixes"]):
        lines.append("a = b: the same mix (the same sources at every seed), fine-tuned once and shown once; "
                     "a baseline that is the selection's mix is not compared with it")
    if unmatched:
        lines.append("no match: test generations in which the answer pattern found no answer (scored wrong), "
                     "mean over seeds")
    cost = result.get("cost") or {}
    if cost.get("selection_seconds") is not None:
        stages = " + ".join(cost.get("stages_seconds") or ["meta-train", "gradients", "select"])
        lines.append(f"cost of the selection ({stages}): {cost['selection_seconds']:.0f} s; "
                     f"one fine-tune: {fmt_number(cost.get('finetune_seconds'), '.0f')} s")
        if cost.get("speedup") is not None:
            lines.append(f"by real fine-tuning, a forward stepwise search would train {cost['forward_finetunes']} "
                         f"fine-tunes: ~{cost['by_finetuning_seconds'] / 60:.0f} min at that cost, "
                         f"{cost['speedup']:.1f}x the selection's time (an extrapolation from the measured fine-tune)")
    check = result.get("estimate_check")
    if check:
        lines.append(f"estimates vs these fine-tunes' validation loss over {check['mixes']} distinct mixes: Spearman "
                     f"{check['spearman']:.2f}, Pearson {check['pearson']:.2f}, mean error {check['mean_abs_rel_error']:.1%}")
    lines.append("verdict: " + result["verdict"])
    return "\n".join(lines)


def price(selection_seconds: float | None, finetune_seconds: float, forward_finetunes: int) -> dict:
    """What the same answer would cost by real fine-tuning: a forward stepwise search that trains one
    fine-tune per subset it evaluates, at the measured training time of one fine-tune (evaluation left
    out, so the real figure is higher), against the selection's own stages."""
    by_finetuning = forward_finetunes * finetune_seconds
    return {"forward_finetunes": forward_finetunes, "by_finetuning_seconds": round(by_finetuning, 3),
            "speedup": _significant(by_finetuning / selection_seconds) if selection_seconds else None,
            "overhead_vs_finetune": _significant(selection_seconds / finetune_seconds)
            if selection_seconds and finetune_seconds else None}


def _significant(ratio: float, digits: int = 3) -> float:
    """A ratio to `digits` significant figures: 0.3036 becomes 0.304 (two decimals would make it 0.3,
    1.2% off), 31.46 becomes 31.5."""
    return float(f"{ratio:.{digits}g}")


def to_dict(mixes: Sequence[Mix]) -> list[dict]:
    return [asdict(m) for m in mixes]
