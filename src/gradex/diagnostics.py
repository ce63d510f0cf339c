"""Checks a user runs to trust the estimates on their own model and data.

check-linearity: is u_s(theta* + Delta) ~ u_s + <g_s, Delta>? Along random directions in the
projected subspace, and along real fine-tuning trajectories from theta* (the directions that
matter, which move the outputs far more than random ones of the same length).

validate: fine-tune k random subsets for real (by default with the recipe `gradex run` deploys,
or from theta* with the `refit` recipe; two seeds each) and compare the target validation loss with
the estimate, next to the two yardsticks that say whether the agreement means anything: the seed
noise of real fine-tuning, and the error of a constant predictor (theta*'s own loss for every subset).
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from gradex import ledger
from gradex.atomic import replacing, write_json
from gradex.config import Config, TrainConfig, fingerprint
from gradex.data import batches
from gradex.evaluate import loss_from_outputs, outputs
from gradex.launch import on_main
from gradex.device import autocast, device_of
from gradex.model import ce_logodds, example_outputs, set_trainable_vector, trainable, trainable_vector
from gradex.pipeline import require
from gradex.run import Run, log
from gradex.saved import save_model
from gradex.finetunes import clusters_key, finetune_mix, recipe_summary, training
from gradex.surrogate import estimator, make_run_projector, member_mask, problem
from gradex.train import train
from gradex.writer import writes

RADII = (0.02, 0.05, 0.1, 0.2)
# Outputs are measured in fp32: bf16 rounding moves u_s by ~0.05, as much as a small real change.
MEASURE = "fp32"
TRAJECTORY_STEPS = (1, 3, 10, 30)


# ---------------------------------------------------------------------------- linearity

def full_gradients(model: torch.nn.Module, run: Run, indices: Sequence[int]) -> torch.Tensor:
    """Exact (unprojected) per-example gradients of u_s, one backward each: (len(indices), p)."""
    params = [p for _, p in trainable(model)]
    rows = []
    for batch in tqdm(list(batches(run.tokens, list(indices), 1, run.pad_id)), desc="exact gradients", leave=False):
        with autocast(MEASURE, device_of(model)):
            u = example_outputs(model, batch.to(device_of(model)), run.cfg.gradients.output)[0]
        grads = torch.autograd.grad(u, params)
        rows.append(torch.cat([g.reshape(-1).float() for g in grads]))
    return torch.stack(rows)


def _errors(u0: torch.Tensor, first: torch.Tensor, true: torch.Tensor) -> dict:
    """Mean squared errors of the zeroth- and first-order predictions, relative to mean(u_s^2) of the
    measured outputs; `explained` is 1 - first-order / zeroth-order error (relative to the change)."""
    change = ((true - u0) ** 2).mean().item()
    zeroth = change / max((true ** 2).mean().item(), 1e-12)
    err1 = ((true - first) ** 2).mean().item() / max((true ** 2).mean().item(), 1e-12)
    return {"mean_abs_change": (true - u0).abs().mean().item(), "zeroth_order_rel_mse": zeroth,
            "first_order_rel_mse": err1,
            "explained": 1 - ((true - first) ** 2).mean().item() / max(change, 1e-12)}


@writes
def check_linearity(cfg: Config, examples: int = 48, subsets: int = 2) -> dict:
    """Tables of first- vs zeroth-order error, written to linearity.json and linearity.png (under a
    launch, by rank 0 alone: gradex.launch). The stages it reads run first, on every process."""
    run = require(cfg, "gradients", "clusters")  # with data.clusters the random subsets are of clusters
    return on_main(lambda: _check_linearity(run, examples, subsets))


def _check_linearity(run: Run, examples: int, subsets: int) -> dict:
    from gradex.search import sample_subsets

    cfg = run.cfg
    model = run.meta_model()
    theta = trainable_vector(model)
    rng = random.Random(0)
    val, train_idx = run.indices("validation"), run.train_indices(run.sources)
    idx = rng.sample(val, min(len(val), examples // 2)) + rng.sample(train_idx, min(len(train_idx), examples // 2))
    grads = full_gradients(model, run, idx)
    output = cfg.gradients.output
    u0, _ = outputs(model, run.tokens, idx, run.pad_id, MEASURE, output)
    projector = make_run_projector(run, model)
    precision = run.precision

    def first_order(delta: torch.Tensor) -> torch.Tensor:
        """u0 + G delta, on the host beside the measured outputs (G and delta are on the model's device)."""
        return u0 + (grads @ delta).cpu()

    def measure(delta: torch.Tensor) -> torch.Tensor:
        set_trainable_vector(model, theta + delta)
        u, _ = outputs(model, run.tokens, idx, run.pad_id, MEASURE, output)
        set_trainable_vector(model, theta)
        return u

    rows = []
    gen = torch.Generator().manual_seed(cfg.gradients.seed + 1)
    for r in tqdm(RADII, desc="random directions", leave=False):
        delta = projector.lift(torch.randn(cfg.gradients.dim, generator=gen))
        delta = delta * (r * theta.norm() / delta.norm())
        true = measure(delta)
        rows.append({"kind": "random", "radius": r, "steps": None, **_errors(u0, first_order(delta), true)})
    picks = sample_subsets(len(run.sources), subsets, 0.5, cfg.select.seed + 7) if subsets else torch.zeros(0, 0)
    for s, member in enumerate(picks.tolist()):
        names = [n for n, m in zip(run.sources, member) if m]
        trained = run.meta_model()
        snapshots: dict[int, torch.Tensor] = {}

        def keep(step: int) -> None:
            if step in TRAJECTORY_STEPS:
                snapshots[step] = trainable_vector(trained) - theta

        recipe = TrainConfig(**{**cfg.refit.__dict__, "max_steps": max(TRAJECTORY_STEPS)})
        train(trained, run.tokens, run.train_indices(names), recipe, run.pad_id, precision,
              desc=f"trajectory {s}", progress=False, on_step=keep)
        for steps, delta in sorted(snapshots.items()):
            true = measure(delta)
            proj = projector.project_delta(delta)  # the part of Delta the projected model can express
            rows.append({"kind": "trajectory", "subset": names, "steps": steps,
                         "radius": (delta.norm() / theta.norm()).item(),
                         **_errors(u0, first_order(delta), true),
                         "projected_explained": _errors(u0, first_order(proj), true)["explained"]})
    result = {"examples": len(idx), "theta_norm": theta.norm().item(), "rows": rows}
    write_json(run.dir / "linearity.json", result)
    _plot_linearity(rows, run.dir / "linearity.png")
    return result


def format_linearity(result: dict) -> str:
    """The rows as a text table; `in range(P)`: `explained` with Delta replaced by the part of it the
    projected model can express (trajectories only)."""
    lines = [f"{'direction':<28} {'|Delta|/|theta*|':>16} {'mean |du|':>10} {'0th-order':>10} {'1st-order':>10} "
             f"{'explained':>10} {'in range(P)':>12}"]
    for r in result["rows"]:
        name = f"random r={r['radius']}" if r["kind"] == "random" else f"train {r['steps']} steps [{len(r['subset'])} src]"
        in_range = f"{r['projected_explained']:>12.2f}" if "projected_explained" in r else f"{'':>12}"
        lines.append(f"{name:<28} {r['radius']:>16.3f} {r['mean_abs_change']:>10.4f} {r['zeroth_order_rel_mse']:>10.2e}"
                     f" {r['first_order_rel_mse']:>10.2e} {r['explained']:>10.2f} {in_range}")
    return "\n".join(lines)


def _plot_linearity(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, marker in (("random", "o"), ("trajectory", "s")):
        sel = [r for r in rows if r["kind"] == kind]
        ax.scatter([r["radius"] for r in sel], [r["zeroth_order_rel_mse"] for r in sel], marker=marker,
                   facecolors="none", edgecolors="gray", label=f"{kind}: zeroth order")
        ax.scatter([r["radius"] for r in sel], [r["first_order_rel_mse"] for r in sel], marker=marker,
                   label=f"{kind}: first order")
    ax.set(xscale="log", yscale="log", xlabel="|Delta| / |theta*|", ylabel="mean squared relative error of u_s")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with replacing(path) as fh:  # a figure, like every artifact, is written whole or not at all
        fig.savefig(fh, format="png", dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------- validation

def random_subsets(n: int, k: int, seed: int) -> torch.Tensor:
    """k distinct random subsets with sizes spread over 1..n-1 (the extremes are trivial)."""
    rng = random.Random(seed)
    seen: set[tuple[bool, ...]] = set()
    while len(seen) < min(k, 2 ** n - 2):
        size = rng.randint(1, n - 1)
        chosen = set(rng.sample(range(n), size))
        seen.add(tuple(j in chosen for j in range(n)))
    return torch.tensor(sorted(seen), dtype=torch.bool)


ROWS_FORMAT = 3  # validate/rows/<key>.json record the loss under every output definition
CHANGE_SAMPLE = 128  # training examples per refit on which the real output change is measured
SWEEP = (0.1, 0.2, 0.3, 0.5, 1.0)  # output_change values validate re-estimates with (linear mode)
RECIPES = ("finetune", "refit")


def recipe_label(run: Run, recipe: str) -> str:
    if recipe == "refit":
        return (f"refit recipe: from theta*, {run.cfg.refit.epochs:g} epochs over each subset's data, "
                f"lr {run.cfg.refit.lr:g}")
    return f"the deployed finetune recipe: {recipe_summary(run)['description']}"


def recipe_key(run: Run, recipe: str) -> str:
    """What the real fine-tunes of a recipe depend on: the data (with clusters, which examples each
    name stands for), the start and the recipe; not the estimator, gradients.output included (a row
    records the losses under every output), so changing it keeps them."""
    if recipe == "refit":
        return fingerprint(run.data_key(), run.output("theta*"), run.cfg.refit, MEASURE, ROWS_FORMAT,
                           *clusters_key(run))
    return fingerprint(*training(run)[0], MEASURE, ROWS_FORMAT, *clusters_key(run))


def row_path(run: Run, recipe_hash: str, names: list[str], seed: int) -> tuple[Path, str]:
    """Where validate keeps the real fine-tune of target + `names` at `seed`, and its key: the
    recipe's key (`recipe_hash`, from `recipe_key`: what the fine-tune depends on), the members and
    the seed, never a position in a list."""
    key = fingerprint(recipe_hash, sorted(names), seed)
    return run.dir / "validate" / "rows" / f"{key}.json", key


def subsets(run: Run, k: int) -> list[list[str]]:
    """The k random subsets validate fine-tunes (the same k first ones for any larger k)."""
    members = random_subsets(len(run.sources), k, run.cfg.select.seed + 1000)
    return [[n for n, m in zip(run.sources, row.tolist()) if m] for row in members]


def missing_rows(run: Run, k: int, seeds: int, recipe: str = "finetune") -> int:
    """How many of validate's k subsets x seeds real fine-tunes have no current row yet."""
    key = recipe_key(run, recipe)
    return sum(ledger.kept(*row_path(run, key, names, s)) is None for names in subsets(run, k) for s in range(seeds))


def _real_finetune(run: Run, recipe: str, names: list[str], seed: int, out: Path, key: str) -> tuple[torch.nn.Module, dict]:
    """One real fine-tune of target + `names`: the model and what to record about it."""
    if recipe == "finetune":  # the deployed recipe, shared with final/ and compare through finetunes/
        res = finetune_mix(run, names, seed, desc=f"validate {'+'.join(names) or 'target'} seed {seed}")
        model = run.saved_model(run.dir / res["adapter"])
        return model, {"steps": res["steps"], "seconds": res["seconds"], "adapter": res["adapter"]}
    model = run.meta_model()
    cfg = TrainConfig(**{**run.cfg.refit.__dict__, "seed": run.cfg.refit.seed + seed})
    t0 = time.perf_counter()
    history = train(model, run.tokens, run.train_indices(names), cfg, run.pad_id, run.precision,
                    desc=f"subset {'+'.join(names)} seed {seed}", progress=False)
    adapter = out / "refits" / key / fingerprint(sorted(names), seed)  # a peft adapter / model folder
    save_model(model, adapter)
    return model, {"steps": len(history), "seconds": round(time.perf_counter() - t0, 1),
                   "adapter": str(adapter.relative_to(run.dir))}


@writes
def validate(cfg: Config, k: int = 20, seeds: int = 2, recipe: str = "finetune") -> dict:
    """Fine-tune k subsets x seeds for real; compare with estimates. Resumes from validate/rows/.

    recipe: `finetune` (default), the fine-tune `gradex run` deploys (finetune.init, the equal step
    budget), so the check is of what the user gets; or `refit`, a fine-tune from theta* with the
    refit recipe's epochs over each subset, which is what the linear estimate models most directly.
    Real fine-tunes are keyed by recipe, members and seed, never by their position in a list, so
    `--subsets 8` after `--subsets 20` (or the other way) reuses the fine-tunes of the subsets both
    share. Every one keeps its adapter and records the target validation loss and the change of its
    training examples' outputs (from theta*) under every output definition, so a changed estimator
    never needs a fine-tune re-run. The result also re-estimates at a sweep of
    `estimate.output_change` values: the one with the lowest error is the value to configure.
    Under a launch rank 0 runs it alone (its fine-tunes single-process), the others wait.
    """
    if recipe not in RECIPES:
        raise ValueError(f"validate: recipe must be one of {RECIPES}, got {recipe!r}")
    run = require(cfg, "gradients", "clusters")  # on every process; with data.clusters the subsets are of clusters
    return on_main(lambda: _validate(run, k, seeds, recipe))


def _validate(run: Run, k: int, seeds: int, recipe: str) -> dict:
    cfg = run.cfg
    out = run.dir / "validate"
    key = recipe_key(run, recipe)
    names_of = subsets(run, k)
    members = member_mask(run.sources, names_of)
    equal_steps = None if recipe == "finetune" else cfg.refit.max_steps is not None  # refit: epochs unless capped
    fn, _, l2 = estimator(run, equal_steps)
    est = dict(zip(map(tuple, names_of), fn(members).tolist()))
    base = run.meta_model()
    theta = trainable_vector(base)
    reference = _Reference(run, base)
    # one keyed record per real fine-tune, written whole once it is measured: a kill loses at most
    # the one in progress, and a changed estimator (which no key holds) never retrains one
    rows = {(tuple(names), s): row_path(run, key, names, s) for names in names_of for s in range(seeds)}
    done = {job: ledger.kept(path, row_key) for job, (path, row_key) in rows.items()}
    jobs = [job for job, row in done.items() if row is None]
    for names, s in tqdm(jobs, desc=f"validate ({recipe}: real fine-tunes)"):
        model, info = _real_finetune(run, recipe, list(names), s, out, key)
        path, row_key = rows[(names, s)]
        done[(names, s)] = ledger.keep(path, row_key, {
            "recipe": recipe, "seed": s, "members": list(names), **reference.measure(model, list(names), s),
            "step": ((trainable_vector(model) - theta).norm() / theta.norm()).item(), **info})
    done = list(done.values())
    output = cfg.gradients.output
    result = {"recipe": recipe, "recipe_description": recipe_label(run, recipe),
              **_compare(done, est, reference.theta_losses[output], l2, output)}
    if cfg.estimate.mode == "linear":
        result["sweep"] = _sweep(run, members, done, output, run.cfg.resolved_weighting(equal_steps))
    for path in (run.dir / "validation.json", run.dir / f"validation-{recipe}.json"):
        write_json(path, result)
    _plot_validation(result, run.dir / "validation.png")
    log(f"validation against {result['recipe_description']}: spearman {result['spearman']:.3f}, pearson "
        f"{result['pearson']:.3f}, error {result['mean_abs_rel_error']:.4f}, seed noise {result['seed_noise']:.4f}, "
        f"constant predictor {result['constant_error']:.4f}, ranking by subset size alone {result['size_spearman']:.3f}; "
        f"real fine-tunes change their own training outputs by {result['real_output_change']:.3f} RMS (median)")
    if "sweep" in result:
        best = min((r for r in result["sweep"] if r["in_use"]), key=lambda r: r["mean_abs_rel_error"])
        by_change = cfg.estimate.l2 is None and cfg.estimate.step_size is None
        log(f"estimate.output_change sweep (validation.json): lowest error {best['mean_abs_rel_error']:.4f} at "
            f"{best['output_change']} (spearman {best['spearman']:.3f}); this run's l2 "
            + (f"is set by output_change {cfg.estimate.output_change}" if by_change else "is set explicitly"))
    return result


class _Reference:
    """theta*'s target validation losses and training outputs, against which every refit is measured."""

    def __init__(self, run: Run, base: torch.nn.Module):
        self.run = run
        self.val = run.indices("validation")
        self.train = run.train_indices(run.sources)
        self.theta_losses, self.u0 = self._pass(base, self.train)

    def _pass(self, model: torch.nn.Module, train: Sequence[int]) -> tuple[dict[str, float], dict[str, dict[int, float]]]:
        """Validation losses and the training examples' u_s, under every output, from one forward pass.

        The "ce" output is a function of the token cross-entropy (gradex.model.ce_logodds), so a
        "mean-logodds" pass gives both.
        """
        u, nll = outputs(model, self.run.tokens, [*self.val, *train], self.run.pad_id, MEASURE, output="mean-logodds")
        v = len(self.val)
        losses = {"ce": nll[:v].mean().item(), "mean-logodds": loss_from_outputs(u[:v])}
        per_output = {"mean-logodds": u[v:], "ce": ce_logodds(nll[v:])}
        return losses, {name: dict(zip(train, values.tolist())) for name, values in per_output.items()}

    def measure(self, model: torch.nn.Module, members: list[str], seed: int) -> dict:
        """{"losses": target validation loss, "output_change": RMS change of u_s over (a sample of) the
        refit's own training examples}, each under every output definition."""
        own = self.run.train_indices(members)
        sample = sorted(random.Random(seed).sample(own, min(len(own), CHANGE_SAMPLE)))
        losses, u = self._pass(model, sample)
        change = {name: math.sqrt(float(np.mean([(u[name][i] - self.u0[name][i]) ** 2 for i in sample])))
                  for name in u}
        return {"losses": losses, "output_change": change}


def _sweep(run: Run, members: torch.Tensor, done: list[dict], output: str, weights: str) -> list[dict]:
    """Re-estimate the validated subsets at several `estimate.output_change` values (linear mode),
    under both weightings (`weights` is the one in use)."""
    from gradex.estimate import calibrate_l2, estimate

    prob = problem(run)
    names = [tuple(n for n, m in zip(run.sources, row.tolist()) if m) for row in members]
    rows = []
    for value in SWEEP:
        l2 = calibrate_l2(prob, output_change=value)
        for w in ("sum", "mean"):
            loss = estimate(prob, members, l2, weighting=w).loss.tolist()
            found = _compare(done, dict(zip(names, loss)), math.nan, l2, output)
            rows.append({"output_change": value, "weighting": w, "in_use": w == weights, "l2": l2,
                         "spearman": found["spearman"], "pearson": found["pearson"],
                         "mean_abs_rel_error": found["mean_abs_rel_error"]})
    return rows


def _compare(done: list[dict], est: dict[tuple[str, ...], float], theta_loss: float, l2: float, output: str) -> dict:
    """Estimates (by members) against the real fine-tunes of the same subsets, with the yardsticks."""
    from scipy.stats import spearmanr

    from gradex.comparison import agreement

    by_subset: dict[tuple[str, ...], list[dict]] = {}
    for d in done:
        by_subset.setdefault(tuple(d["members"]), []).append(d)
    rows = []
    for names, runs in sorted(by_subset.items()):
        runs = sorted(runs, key=lambda r: r["seed"])
        losses = [r["losses"][output] for r in runs]
        rows.append({"members": list(names), "estimate": est[names], "real": float(np.mean(losses)),
                     "seeds": losses, "real_step": float(np.mean([r["step"] for r in runs])),
                     "real_output_change": float(np.mean([r["output_change"][output] for r in runs]))})
    real = np.array([r["real"] for r in rows])
    guess = np.array([r["estimate"] for r in rows])
    noise = [abs(r["seeds"][0] - r["seeds"][1]) / np.mean(r["seeds"][:2]) for r in rows if len(r["seeds"]) > 1]
    return {
        "subsets": len(rows), "output": output,
        **agreement(guess, real),
        "seed_noise": float(np.mean(noise)) if noise else math.nan,
        "constant_error": float(np.mean(np.abs(theta_loss - real) / real)),
        # a yardstick for the ranking: "more sources (hence more steps) is better", no gradients at all
        "size_spearman": float(spearmanr([-len(r["members"]) for r in rows], real).statistic) if len(rows) > 2 else math.nan,
        "theta_star_loss": theta_loss, "l2": l2,
        "median_real_step": float(np.median([r["real_step"] for r in rows])),
        "real_output_change": float(np.median([r["real_output_change"] for r in rows])), "rows": rows,
    }


def summary(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "rows"}


def _plot_validation(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    real = [r["real"] for r in result["rows"]]
    est = [r["estimate"] for r in result["rows"]]
    ax.scatter(est, real)
    lo, hi = min(real + est), max(real + est)
    ax.plot([lo, hi], [lo, hi], color="gray", lw=0.8)
    ax.axhline(result["theta_star_loss"], color="red", lw=0.8, ls="--", label="theta* (constant predictor)")
    ax.set(xlabel="estimated target validation loss", ylabel="real (mean of seeds)",
           title=f"spearman {result['spearman']:.2f}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with replacing(path) as fh:  # a figure, like every artifact, is written whole or not at all
        fig.savefig(fh, format="png", dpi=120)
    plt.close(fig)
