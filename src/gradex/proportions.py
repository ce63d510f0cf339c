"""Proportions of a mix in the run's words: shares keyed by name (the target's and the sources'),
the caps the config puts on them, the examples a fine-tune samples for them, and their export.

The estimate of a weighted mix and the search for the best one are gradex.estimate.proportions; this
module holds what a stage needs around them, so that no stage reads another's helpers.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch
import yaml

from gradex.config import Config, ConfigError
from gradex.data import Example, Tokenized
from gradex.estimate.proportions import counts, feasible

MIXTURE = "mixture.yaml"  # in the run directory, written by select under select.method weights


def caps(sizes: Sequence[int], budget: int, max_repeats: float | None) -> list[float]:
    """Each group's largest share when its examples may repeat at most `max_repeats` times within a
    budget of `budget` examples: min(1, max_repeats * N_g / budget) (1 everywhere without a cap)."""
    if max_repeats is None:
        return [1.0] * len(sizes)
    return [min(1.0, max_repeats * n / budget) for n in sizes]


def check(cfg: Config, sizes: dict[str, int], budget: int) -> None:
    """That some proportions meet select.max_repeats and select.prior / max_shift for these group sizes
    (the target's and every source's training examples) and this budget of examples; an error naming
    the key otherwise. Called at prepare, before anything is trained, and again at select (clusters
    are only known then)."""
    s = cfg.select
    names = list(sizes)
    unknown = sorted(set(s.prior) - set(names))
    if unknown:
        raise ConfigError(f"select.prior: unknown name(s) {unknown}; the target and the sources are {names}")
    upper = torch.tensor(caps([sizes[n] for n in names], budget, s.max_repeats), dtype=torch.float64)
    if float(upper.sum()) < 1 - 1e-9:
        raise ConfigError(f"select.max_repeats {s.max_repeats:g}: no proportions fit a budget of {budget} examples "
                          f"(the caps sum to {float(upper.sum()):.4f} < 1): raise max_repeats, or lower the budget "
                          f"(finetune.max_steps)")
    empty = sorted(n for n in names if sizes[n] == 0 and s.prior.get(n, 0.0) > 0)
    if empty:  # optimize leaves empty groups out, and max_shift would then measure nothing about them
        raise ConfigError(f"select.prior: {empty} have no training examples (under data.clusters from target_train "
                          f"the target's are all in the clusters), so no mix can hold their share; give it to others")
    prior = torch.tensor([s.prior.get(n, 0.0) for n in names], dtype=torch.float64) if s.prior else None
    why = feasible(upper, prior, s.max_shift)
    if why is not None:
        raise ConfigError(f"select.max_shift: {why}")


def sample(rows: dict[str, list[int]], shares: dict[str, float], total: int, seed: int) -> list[int]:
    """`total` example positions drawn in the proportions `shares` (name -> share) from each name's
    `rows`: each group's count by largest remainder, its examples taken in a seeded order and
    cycled when the count exceeds them (every example of a group seen floor or ceil of count / N_g
    times, never a lopsided draw). Reproducible from `seed`; the training loop shuffles the whole."""
    names = [n for n in rows if shares.get(n, 0.0) > 0]
    missing = sorted(n for n in shares if shares[n] > 0 and not rows.get(n))
    if missing:
        raise ValueError(f"proportions give a share to {missing}, which have no training examples")
    picked: list[int] = []
    for name, count in zip(names, counts([shares[n] for n in names], total)):
        pool = list(rows[name])
        rng = random.Random(f"{seed}:{name}")
        order: list[int] = []
        while len(order) < count:
            rng.shuffle(pool)
            order += pool
        picked += order[:count]
    return picked


def mixture(shares: dict[str, float], budget: int, seed: int) -> dict:
    """The proportions as training frameworks take them: the names in order, their probabilities (for
    `datasets.interleave_datasets(datasets, probabilities=..., seed=...)`), and the example counts of
    the budget."""
    names = [n for n, v in shares.items() if v > 0]
    probabilities = [shares[n] for n in names]
    return {"datasets": names, "probabilities": probabilities,
            "counts": dict(zip(names, counts(probabilities, budget))), "budget_examples": budget, "seed": seed,
            "stopping_strategy": "all_exhausted"}


def mixture_yaml(body: dict) -> str:
    """`mixture`'s dict as YAML with a header saying how to use it."""
    head = ("# gradex's proportions (select.method: weights). With datasets:\n"
            "#   interleave_datasets([ds[name] for name in datasets], probabilities=probabilities,\n"
            "#                       seed=seed, stopping_strategy=stopping_strategy)\n"
            "# or take `counts` examples of each for a budget of budget_examples.\n")
    return head + yaml.safe_dump(body, sort_keys=False)


def checked(cfg: Config) -> bool:
    """Whether prepare checks the proportions' constraints: select.method weights (or compare.methods
    has it) and sources known before clustering."""
    return cfg.data.clusters is None and (cfg.select.method == "weights" or "weights" in cfg.compare.methods)


def check_proportions(cfg: Config, examples: list[Example], tokens: list[Tokenized]) -> None:
    """At prepare, before anything is trained: that proportions exist within select.max_repeats and
    select.prior / max_shift for the sources' sizes (with data.clusters the sizes are known only
    after clustering: select checks again)."""
    if not checked(cfg):
        return
    from gradex.train import budget_steps

    sizes = {cfg.data.target.name: 0, **{src.name: 0 for src in cfg.data.sources}}
    length = 0
    for e, t in zip(examples, tokens):
        if e.split == "train":
            sizes[e.source] = sizes.get(e.source, 0) + 1
            length += len(t.ids)
    f = cfg.finetune
    check(cfg, sizes, budget_steps(f, f.budget, sum(sizes.values()), length, f.max_tokens) * f.batch_size)
