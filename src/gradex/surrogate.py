"""The run's surrogate, which the select, estimate and compare stages and the diagnostics share: the
run's projector bound to a model, the estimation problem read from the store, its l2 and weighting
from the config, and estimators of subsets and of proportions that record what they estimate
(estimates.parquet). The numerics are gradex.estimate's; this module reads the run directory."""

from __future__ import annotations

import time
import warnings
from typing import Callable

import numpy as np
import torch

from gradex import config as config_mod
from gradex.atomic import write_parquet
from gradex.model import trainable_vector
from gradex.run import Run, log


def problem(run: Run):
    """The estimation problem read from the store: training rows, validation rows, groups."""
    from gradex.estimate import Problem, exact_coordinates
    from gradex.gradients import Store

    store = Store.open(run.dir / "store")
    if store.manifest["projector"]["kind"] == "none":
        x = exact_coordinates(store.x)  # exact inner products in rank(G) <= N dimensions
        col = torch.ones(x.shape[1])
    else:
        with warnings.catch_warnings():  # the store's memory map is read-only, and stays unwritten
            warnings.simplefilter("ignore", UserWarning)
            x = torch.from_numpy(store.x)  # a view: only the rows taken below are read into memory
        col = torch.as_tensor(store.col_sq_norms, dtype=torch.float32) if store.col_sq_norms is not None else None
    u = torch.tensor(np.asarray(store.u), dtype=torch.float32)
    index = store.index.tolist()
    examples = run.examples
    group_of = {name: j + 1 for j, name in enumerate(run.sources)}
    train_rows = [r for r, i in enumerate(index) if examples[i].split == "train"]
    val_rows = [r for r, i in enumerate(index) if examples[i].split == "validation"]
    # Rows ordered by group, so that each group's rows are one contiguous block (a view for the solver)
    group_ids = [group_of.get(examples[index[r]].source, 0) for r in train_rows]
    order = sorted(range(len(train_rows)), key=group_ids.__getitem__)
    train_rows = torch.tensor([train_rows[k] for k in order], dtype=torch.long)
    group = torch.tensor([group_ids[k] for k in order], dtype=torch.long)
    val_rows = torch.tensor(val_rows, dtype=torch.long)
    prob = Problem(x=x[train_rows], u=u[train_rows], group=group, x_val=x[val_rows], u_val=u[val_rows],
                   n_sources=len(run.sources), col_sq_norms=col, theta_norm=float(store.manifest["theta_norm"]))
    for rows, xs, us in ((train_rows, prob.x, prob.u), (val_rows, prob.x_val, prob.u_val)):
        bad = (~torch.isfinite(xs).all(1) | ~torch.isfinite(us)).nonzero().flatten()
        if len(bad):  # the gradient pass refuses these; a store edited or damaged since has them
            example = examples[index[int(rows[bad[0]])]]
            raise FloatingPointError(f"{run.dir / 'store'}: {len(bad)} row(s) are not finite, e.g. the row of an example "
                                     f"of {example.source!r} ({example.split}); rebuild it with `gradex gradients --force`")
    return prob


def regularization(run: Run, prob) -> float:
    """l2 from the config: `l2` itself, else calibrated to `step_size`, else to `output_change`."""
    from gradex.estimate import calibrate_l2

    est = run.cfg.estimate
    if est.l2 is not None:
        return est.l2
    big = prob.x.shape[0] >= 100_000  # each exact fit then takes seconds: show them
    if est.step_size is not None:
        return calibrate_l2(prob, est.step_size, progress=big)
    return calibrate_l2(prob, output_change=est.output_change, progress=big)


def weighting(run: Run, equal_steps: bool | None = None) -> str:
    """The run's resolved estimate.weighting (`Config.resolved_weighting`, where the rule and its reasons
    are), kept for library callers that hold a Run: gradex.pipeline exports it."""
    return run.cfg.resolved_weighting(equal_steps)


def estimator(run: Run, equal_steps: bool | None = None,
              stage: str = "select") -> tuple[Callable[[torch.Tensor], torch.Tensor], list[dict], float]:
    """A function subsets (k, n) bool -> estimated target validation loss (k,), and its record.

    equal_steps: whether the modelled fine-tune gives every mix the same steps (`Config.resolved_weighting`). Every
    call appends one row per subset to the record (members, estimate, implied step, mode, seconds,
    and the `stage` that asked), which becomes estimates.parquet.
    """
    from gradex.estimate import estimate

    prob = problem(run)
    l2 = regularization(run, prob)
    rows: list[dict] = []
    names = run.sources
    mode = run.cfg.estimate.mode
    weights = run.cfg.resolved_weighting(equal_steps)
    fingerprint = run.fp("select")
    reconstruct = Reconstructor(run) if mode == "reconstruct" else None

    def fn(subsets: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        est = estimate(prob, subsets, l2, refinements=run.cfg.estimate.refinements, tol=run.cfg.estimate.tol,
                       weighting=weights, progress=len(subsets) >= 1024)
        loss = reconstruct(est.z) if reconstruct else est.loss
        seconds = (time.perf_counter() - t0) / max(1, len(subsets))
        for member, value, step, change, converged in zip(subsets.tolist(), loss.tolist(), est.step.tolist(),
                                                           est.change.tolist(), est.converged.tolist()):
            rows.append({"members": [n for n, m in zip(names, member) if m], "size": sum(member),
                         "estimate": value, "step": step, "output_change": change, "mode": mode, "l2": l2,
                         "weighting": weights, "stage": stage, "converged": converged,
                         "seconds": seconds, "fingerprint": fingerprint})
        unconverged = int((~est.converged).sum())
        if unconverged:
            log(f"warning: {unconverged} of {len(subsets)} subsets did not meet estimate.tol "
                f"({run.cfg.estimate.tol:g}) within estimate.refinements ({run.cfg.estimate.refinements}) "
                f"refinements: their estimates are less accurate (converged false in estimates.parquet)")
        return loss

    return fn, rows, l2


def proportion_estimator(run: Run) -> Callable[[dict[str, float]], float]:
    """A function proportions (name -> share; the target's name and the sources') -> the estimated
    target validation loss of the mix sampled in those shares (gradex.estimate.proportions)."""
    from gradex.estimate.proportions import fit

    prob = problem(run)
    l2 = regularization(run, prob)
    names = [run.cfg.data.target.name, *run.sources]

    def fn(shares: dict[str, float]) -> float:
        p = torch.tensor([shares.get(n, 0.0) for n in names], dtype=torch.float64)
        return fit(prob, p / p.sum(), l2).loss

    return fn


class Reconstructor:
    """Reconstruct mode: load theta* + P z into the model and measure the validation loss for real."""

    def __init__(self, run: Run):
        self.run = run
        self.model = run.meta_model()
        self.theta = trainable_vector(self.model)
        if run.cfg.gradients.projection == "none":
            raise config_mod.ConfigError("estimate.mode=reconstruct needs a projection (gradients.projection "
                                         "sparse, hashed or dense); with `none` use the linear mode")
        self.projector = make_run_projector(run, self.model)
        self.val = run.indices("validation")

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        from gradex.evaluate import loss_from_outputs, outputs
        from gradex.model import set_trainable_vector
        from tqdm.auto import tqdm

        losses = []
        for row in tqdm(z, desc="reconstruct", leave=False):
            set_trainable_vector(self.model, self.theta + self.projector.lift(row))
            u, _ = outputs(self.model, self.run.tokens, self.val, self.run.pad_id, self.run.precision,
                           self.run.cfg.gradients.output)
            losses.append(loss_from_outputs(u))
        set_trainable_vector(self.model, self.theta)
        return torch.tensor(losses)


def save_estimates(run: Run, rows: list[dict]) -> None:
    """Add estimate rows to estimates.parquet (one row per evaluated subset), keyed by (stage,
    fingerprint, members): a call's rows replace the rows an earlier call wrote under the same keys,
    so an interrupted, resumed or repeated estimate or select leaves exactly the rows of one call."""
    import pandas as pd

    if not rows:
        return
    path = run.dir / "estimates.parquet"
    frame = pd.DataFrame(rows)
    if path.exists():
        old = pd.read_parquet(path)
        written = set(_keys(frame))
        frame = pd.concat([old[[k not in written for k in _keys(old)]], frame], ignore_index=True)
    write_parquet(path, frame)


def _keys(frame) -> list[tuple]:
    """Each row's (stage, fingerprint, members): what says two rows estimate the same thing."""
    n = len(frame)
    stage = frame["stage"] if "stage" in frame else [None] * n  # rows of gradex before stages were named
    fingerprint = frame["fingerprint"] if "fingerprint" in frame else [None] * n
    return list(zip(stage, fingerprint, (tuple(m) for m in frame["members"])))


def member_mask(names: list[str], subsets: list[list[str]]) -> torch.Tensor:
    """Subsets named by their sources as the (k, n) bool matrix the estimator takes; column j is names[j]."""
    return torch.tensor([[name in subset for name in names] for subset in subsets], dtype=torch.bool)


PRECONDITIONER_FILE = "preconditioner.pt"  # in store/: Adam's second moments at theta*


def make_run_projector(run: Run, model: torch.nn.Module):
    """The run's projector bound to `model`: P, wrapped with Adam's preconditioner when configured
    (its second moments are read from the store, so the gradients stage must have run)."""
    from gradex.gradients import Preconditioned, make_projector, preconditioner

    from gradex.device import device_of

    g = run.cfg.gradients
    projector = make_projector(g.projection, model, g.dim, g.seed)
    if g.preconditioner != "none":
        moments = preconditioner.load(run.dir / "store" / PRECONDITIONER_FILE)
        projector = Preconditioned(projector, preconditioner.adam_scales(moments)).bind(projector.layout)
    return projector.to(device_of(model))
