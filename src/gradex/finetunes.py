"""Fine-tunes of mixes under the finetune recipe and step budget, cached in finetunes/<key>/ and
shared by every stage that needs one (the final model, compare, the diagnostics), and the final
model's record for the stages downstream of it."""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

from gradex import config as config_mod
from gradex import ledger
from gradex.atomic import read_json
from gradex.launch import barrier, distributed, on_main
from gradex.saved import save_model
from gradex.run import Run

if TYPE_CHECKING:
    from gradex.evaluate import Scoring


def budget_steps(run: Run) -> int | None:
    """The optimizer steps of every fine-tune under the equal budget: `finetune.max_steps`, else the
    steps `finetune.epochs` passes over the all-sources mix take. None under `budget: epochs`
    without max_steps (each mix then takes `epochs` passes over its own data)."""
    from gradex.train import budget_steps as steps

    f = run.cfg.finetune
    idx = run.train_indices(run.sources)
    tokens = sum(len(run.tokens[i].ids) for i in idx) if f.max_tokens is not None else 0
    return steps(f, f.budget, len(idx), tokens, f.max_tokens)


def recipe_summary(run: Run) -> dict:
    """What every fine-tune of a mix gets, in numbers and in words."""
    f = run.cfg.finetune
    steps = budget_steps(run)
    start = "from theta* (the meta-initialization)" if f.init == "theta_star" else "from the base model"
    tokens = f" (finetune.max_tokens {f.max_tokens})" if f.max_tokens is not None else ""
    budget = (f"{steps} optimizer steps per fine-tune (equal budget{tokens})" if steps is not None else
              f"{f.epochs:g} epochs over each mix's own data (UNEQUAL budget: bigger mixes get more steps)")
    return {"init": f.init, "budget": f.budget, "steps": steps, "epochs": f.epochs, "lr": f.lr,
            "batch_size": f.batch_size, "description": f"{budget}, {start}, lr {f.lr:g}, batch {f.batch_size}"}


def finetune_recipe(run: Run) -> tuple[str, Any]:
    """(key, recipe): the finetune recipe with the budget's steps filled in, and a key for everything
    that shapes a fine-tune of a mix except its members and seed (data, model, precision, start; and
    gradients.output, which its recorded metrics are measured in)."""
    trained, recipe = training(run)
    return config_mod.fingerprint(*trained, run.cfg.gradients.output), recipe


def training(run: Run) -> tuple[list, Any]:
    """What shapes the weights a fine-tune of a mix trains, except its members and seed (data, model,
    precision, recipe, start), and the recipe with the budget's steps filled in."""
    c = run.cfg
    recipe = dataclasses.replace(c.finetune, max_steps=budget_steps(run))
    start = run.output("theta*") if c.finetune.init == "theta_star" else "base"
    return [run.data_key(), c.model, run.precision, recipe, start], recipe


def clusters_key(run: Run) -> list:
    """Which examples a cluster's name stands for, where the sources are clusters (none otherwise)."""
    return [("clusters", run.output("clusters"))] if run.cfg.data.clusters is not None else []


def plain(run: Run, proportions: dict[str, float] | None) -> dict[str, float] | None:
    """None where `proportions` are a subset's own, natural ones (the target's and its sources' shares
    in proportion to their training examples): that mix is the subset pooled as it is, fine-tuned and
    compared as the subset, never as a second mix that is the same. The proportions otherwise."""
    if proportions is None:
        return None
    from collections import Counter

    sizes = Counter(e.source for e in run.examples if e.split == "train")
    target = run.cfg.data.target.name
    kept = {n for n, v in proportions.items() if v > 0} | ({target} if sizes[target] else set())
    total = sum(sizes[n] for n in kept)
    same = total > 0 and all(abs(proportions.get(n, 0.0) - sizes[n] / total) <= 1e-4 for n in kept)
    return None if same else proportions


def finetune_key(run: Run, members: list[str], seed: int, proportions: dict[str, float] | None = None) -> str:
    from gradex.comparison import shares_key

    proportions = plain(run, proportions)
    extras = [("proportions", shares_key(proportions))] if proportions is not None else []
    return config_mod.fingerprint(finetune_recipe(run)[0], sorted(members), seed, *_key_extras(run), *extras)


def mix_indices(run: Run, members: list[str], seed: int, proportions: dict[str, float] | None) -> list[int]:
    """The training examples of a mix: target train plus the members' examples as they are, or with
    `proportions` the budget's examples (steps x batch_size) sampled in those shares by `seed`."""
    if proportions is None:
        return run.train_indices(members)
    from gradex.proportions import sample

    unknown = sorted(set(proportions) - {run.cfg.data.target.name, *run.sources})
    if unknown:
        raise config_mod.ConfigError(f"proportions: unknown name(s) {unknown}; the target and the sources are "
                                     f"{[run.cfg.data.target.name, *run.sources]}")
    rows: dict[str, list[int]] = {name: [] for name in proportions}
    for i, e in enumerate(run.examples):
        if e.split == "train" and e.source in rows:
            rows[e.source].append(i)
    f = run.cfg.finetune
    return sample(rows, proportions, budget_steps(run) * f.batch_size, f.seed + seed)


def _key_extras(run: Run) -> list:
    """What else shapes a fine-tune's result, listed only when in use (so the keys of other runs stay
    as they were): the clusters (which examples a cluster's name stands for), the answer pattern
    that exact match extracts with, and the task metric's rule when it is not plain exact match (an
    answer pattern applied to the reference too is a new rule, so results cached before it are not
    reused)."""
    extras = clusters_key(run)
    scoring = target_scoring(run)
    if scoring.pattern is not None:
        extras.append(("answer_pattern", scoring.pattern))
    if scoring.label != "exact_match":
        extras.append(("metric", scoring.label))
    return extras


def target_scoring(run: Run) -> Scoring:
    """How the task metric is computed (data.target.metric, gradex.evaluate.Scoring); an error naming
    the key where the target's data does not fit it, raised before any fine-tune trains."""
    from gradex.evaluate import scoring

    return scoring(run.cfg.data.target, run.examples)


def finetune_mix(run: Run, members: list[str], seed: int = 0, desc: str = "finetune",
                 proportions: dict[str, float] | None = None) -> dict:
    """Fine-tune on target train + `members` (or the budget's examples sampled in `proportions`,
    `mix_indices`) with the finetune recipe at seed offset `seed`, then evaluate on the target
    validation and test splits.

    Kept in finetunes/<key>/ (model/: a peft adapter or a model folder; log, result.json), so any stage that needs the same
    fine-tune (the final model, compare, validate) reuses it; an interrupted one resumes from its
    checkpoint. Under a launch every process trains (DDP); rank 0 saves and evaluates."""
    from gradex.evaluate import evaluate as evaluate_model
    from gradex.train import train, write_log

    if proportions is not None:
        members = [s for s in run.sources if proportions.get(s, 0.0) > 0]
    proportions = plain(run, proportions)
    key = finetune_key(run, members, seed, proportions)
    recipe = dataclasses.replace(finetune_recipe(run)[1], seed=run.cfg.finetune.seed + seed)
    where = run.dir / "finetunes" / key
    done = where / "result.json"
    _, world = distributed()
    barrier(world)  # every process sees the same files: none is still writing this fine-tune's
    found = ledger.kept(done, key)
    if found is not None:
        return found
    model = run.meta_model() if run.cfg.finetune.init == "theta_star" else run.fresh_model(seed=recipe.seed)
    idx = mix_indices(run, members, seed, proportions)
    t0 = time.perf_counter()
    # An empty mix (the target alone when data.clusters.from is target_train: every target train
    # example is in a cluster) trains nothing: it is its starting point, theta* or the base model.
    history = train(model, run.tokens, idx, recipe, run.pad_id, run.precision, where / "checkpoint.pt",
                    desc=desc) if idx else []
    seconds = time.perf_counter() - t0

    def finish() -> dict:
        save_model(model, where / "model")
        write_log(history, where / "log.jsonl")
        t0 = time.perf_counter()
        metrics = {split: evaluate_model(model, run.tokenizer, run.examples, run.tokens, run.indices(split),
                                         run.precision, desc=f"{desc} {split}", output=run.cfg.gradients.output,
                                         scoring=target_scoring(run))
                   for split in ("validation", "test")}
        result = {"members": [s for s in run.sources if s in set(members)], "seed": seed,
                  **({"proportions": proportions} if proportions is not None else {}),
                  "init": run.cfg.finetune.init, "steps": len(history), "examples": len(idx),
                  "seconds": round(seconds, 1), "eval_seconds": round(time.perf_counter() - t0, 1), **run.compute,
                  "adapter": str((where / "model").relative_to(run.dir)), **metrics}
        result = ledger.keep(done, key, result)
        (where / "checkpoint.pt").unlink(missing_ok=True)
        return result

    return on_main(finish)


def read_final(run: Run) -> dict:
    """The final model's record (final/metrics.json), for the stages downstream of finetune."""
    return read_json(run.dir / "final" / "metrics.json", "gradex finetune --force")
