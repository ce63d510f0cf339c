"""The stages of a run, each a function of the config that reads and writes the run directory.

    prepare -> meta-train -> gradients -> estimate -> select -> finetune -> compare -> report

Each stage records in the ledger (`<dir>/stage.json`, gradex.ledger) the hashes of the config parts
it used and of the artifacts it read, and the hashes of what it wrote; a stage whose inputs are
unchanged is skipped, and one whose inputs changed (a data file edited, an upstream stage that wrote
something else) runs again, saying why. Long stages (training, gradients) resume from partial work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from gradex import config as config_mod
from gradex import ledger
from gradex.atomic import write_json, write_parquet
from gradex.config import Config
from gradex.data import Example, Tokenized, check_lengths, load_examples, read_examples, save_examples, tokenize
from gradex.model import (load_base, load_tokenizer, load_trainable, make_trainable, resolve_precision, save_trainable,
                          trainable_vector)

def log(msg: str) -> None:
    if launch_rank() == 0:
        print(f"gradex: {msg}", file=sys.stderr, flush=True)


def launch_rank() -> int:
    """This process's rank under accelerate launch / torchrun (0 when run alone).

    Only rank 0 writes run-level files; the ranks share the work of the gradient pass."""
    return int(os.environ.get("RANK", "0"))


class Run:
    """A config bound to its run directory, with lazily loaded data and models."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.dir = cfg.run_dir

    # ------------------------------------------------------------------ data
    @cached_property
    def tokenizer(self) -> Any:
        return load_tokenizer(self.cfg.model)

    @cached_property
    def examples(self) -> list[Example]:
        return read_examples(self.dir / "data")

    @cached_property
    def tokens(self) -> list[Tokenized]:
        return tokenize(self.tokenizer, self.examples)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @cached_property
    def precision(self) -> str:
        """The precision this machine runs (`model.precision` with `auto` resolved)."""
        return resolve_precision(self.cfg.model.precision)

    @cached_property
    def sources(self) -> list[str]:
        """Auxiliary source names in config order (column j of a subset = source j)."""
        target = self.cfg.data.target.name
        return list(dict.fromkeys(e.source for e in self.examples if e.source != target))

    def indices(self, split: str, source: str | None = None) -> list[int]:
        source = source or self.cfg.data.target.name
        return [i for i, e in enumerate(self.examples) if e.source == source and e.split == split]

    def train_indices(self, members: list[str]) -> list[int]:
        """Target train plus every example of the named sources."""
        keep = {self.cfg.data.target.name, *members}
        return [i for i, e in enumerate(self.examples) if e.split == "train" and e.source in keep]

    # ------------------------------------------------------------------ models
    def fresh_model(self, seed: int = 0) -> torch.nn.Module:
        return make_trainable(load_base(self.cfg.model), self.cfg.model, seed=seed)

    def meta_model(self) -> torch.nn.Module:
        model = self.fresh_model()
        load_trainable(model, self.dir / "meta" / "adapter.pt")
        model.eval()
        return model

    # ------------------------------------------------------------------ the ledger
    @cached_property
    def data_files(self) -> dict[str, str]:
        """The hash of every data file the config names (bigbench tasks come from the pinned package)."""
        d = self.cfg.data
        paths = [s.path for s in (d.target, *d.sources) if s.path] + ([d.sources_file] if d.sources_file else [])
        return {f"file {p}": ledger.sha256(Path(p)) if Path(p).exists() else "missing" for p in dict.fromkeys(paths)}

    def inputs(self, stage: str) -> dict[str, str | None]:
        """What a stage's output depends on, hashed: the config parts it uses and the artifacts it reads."""
        c = self.cfg
        if stage == "prepare":
            return {"config": config_mod.fingerprint(c.model.name, c.model.gguf_file, c.model.max_length, c.data),
                    **self.data_files}
        if stage == "meta":
            return {"config": config_mod.fingerprint(c.model, self.precision, c.meta), "data": self.output("data")}
        if stage == "gradients":  # Adam's preconditioner is measured on the refit recipe's batches
            batches = (c.refit.batch_size, c.refit.seed) if c.gradients.preconditioner == "adam" else None
            return {"config": config_mod.fingerprint(c.model, self.precision, c.gradients, batches),
                    "data": self.output("data"), "theta*": self.output("theta*")}
        if stage == "select":
            return {"config": config_mod.fingerprint(c.estimate, c.select, weighting(self)),
                    "data": self.output("data"), "store": self.output("store")}
        raise KeyError(stage)

    def fp(self, stage: str) -> str:
        return config_mod.fingerprint(self.inputs(stage))

    def output(self, name: str) -> str | None:
        """The recorded hash of an upstream artifact (None until its stage is done)."""
        stage = PRODUCER[name]
        record = ledger.read(self.dir / STAGE_DIRS[stage])
        return record.get("outputs", {}).get(name) if record.get("status") == "done" else None

    def state(self, stage: str) -> tuple[str, str]:
        return ledger.state(self.dir / STAGE_DIRS[stage], self.inputs(stage))

    def done(self, stage: str, force: bool = False) -> bool:
        """Whether a stage's output is current; if not, say why before it runs (never silently)."""
        state, why = self.state(stage)
        if state == "done" and not force:
            return True
        if force:
            state, why = "forced", "--force"
        verb = {"missing": "running", "running": "resuming", "stale": "running again", "forced": "running again"}
        log(f"{STAGE_NAMES[stage]}: {verb[state]} ({why})")
        return False

    def mark(self, stage: str, status: str = "done", outputs: dict[str, str] | None = None, **info: Any) -> None:
        if launch_rank() != 0:
            return
        where = self.dir / STAGE_DIRS[stage]
        where.mkdir(parents=True, exist_ok=True)
        ledger.write(where, stage, self.inputs(stage), outputs, status, **info)

    def begin(self, stage: str, force: bool) -> None:
        """Start (or resume) a stage: partial work made from other inputs must not be resumed."""
        if launch_rank() != 0:
            return
        where = self.dir / STAGE_DIRS[stage]
        if force or ledger.state(where, self.inputs(stage))[0] not in ("missing", "running"):
            shutil.rmtree(where, ignore_errors=True)
        self.mark(stage, status="running")


STAGE_DIRS = {"prepare": "data", "meta": "meta", "gradients": "store", "select": "select"}
STAGE_NAMES = {"prepare": "prepare", "meta": "meta-train", "gradients": "gradients", "select": "select"}
PRODUCER = {"data": "prepare", "theta*": "meta", "store": "gradients"}  # artifact -> the stage that writes it


def _stage_info(where: Path) -> dict:
    return ledger.read(where)


# ---------------------------------------------------------------------------- stages

def data_sha256(examples: list[Example], tokens: list[Tokenized]) -> str:
    """The hash of what training and evaluation see (sources, splits, texts, token ids), in order;
    provenance (file lines) is left out, so renumbering a file's rows makes nothing stale."""
    h = hashlib.sha256()
    for e, t in zip(examples, tokens):
        h.update(json.dumps([e.source, e.split, e.prompt, e.answer, list(e.choices), t.ids, t.n_prompt]).encode())
    return h.hexdigest()[:16]


def prepare(cfg: Config, force: bool = False) -> Run:
    """Read, check and tokenize every source; write the resolved config and the data manifest.

    Every data error (missing file or column, empty source, over-long example, unknown model)
    is raised here, before anything expensive runs.
    """
    run = Run(cfg)
    out = run.dir / "data"
    if launch_rank() != 0:
        if run.state("prepare")[0] != "done":
            raise config_mod.ConfigError("under a multi-process launch only `gradex gradients` runs in parallel: "
                                         "run `gradex meta-train` first, then launch the gradient pass")
        return run
    config_mod.dump(cfg, run.dir / "config.yaml")
    if run.done("prepare", force):
        return run
    examples = load_examples(cfg)
    tokenizer = load_tokenizer(cfg.model)
    tokens = tokenize(tokenizer, examples)
    check_lengths(examples, tokens, cfg.model.max_length)
    manifest = save_examples(examples, tokens, out)
    run.__dict__.update(tokenizer=tokenizer)
    run.mark("prepare", examples=manifest["examples"], outputs={"data": data_sha256(examples, tokens)})
    counts = ", ".join(f"{s}={v['count']}" for s, v in manifest["sources"].items())
    log(f"prepared {manifest['examples']} examples ({counts})")
    return run


def meta_train(cfg: Config, force: bool = False) -> Path:
    """Multitask-train on target + all sources: the meta-initialization theta* (meta/adapter.pt)."""
    from gradex.train import train, write_log

    run = prepare(cfg)
    out = run.dir / "meta"
    if run.done("meta", force):
        return out / "adapter.pt"
    run.begin("meta", force)
    checkpoint = out / "checkpoint.pt"
    model = run.fresh_model(seed=cfg.meta.seed)
    idx = run.train_indices(run.sources)
    t0 = time.perf_counter()
    history = train(model, run.tokens, idx, cfg.meta, run.pad_id, run.precision, checkpoint, desc="meta-train")
    save_trainable(model, out / "adapter.pt")
    write_log(history, out / "log.jsonl")
    checkpoint.unlink(missing_ok=True)
    run.mark("meta", steps=len(history), seconds=round(time.perf_counter() - t0, 1),
             final_loss=history[-1]["loss"], outputs={"theta*": ledger.sha256(out / "adapter.pt")})
    log(f"meta-trained theta* in {len(history)} steps (train loss {history[0]['loss']:.3f} -> {history[-1]['loss']:.3f})")
    return out / "adapter.pt"


def gradients(cfg: Config, force: bool = False) -> Path:
    """Projected per-example gradients and offsets at theta*, for training and target validation examples."""
    from gradex.gradients import compute_store
    from gradex.gradients.store import barrier, distributed

    run = prepare(cfg)
    if launch_rank() != 0 and run.state("meta")[0] != "done":
        raise config_mod.ConfigError("under a multi-process launch run `gradex meta-train` first")
    meta_train(cfg)
    out = run.dir / "store"
    if run.done("gradients", force):
        return out
    _, world = distributed()
    t0 = time.perf_counter()
    run.begin("gradients", force)
    barrier(world)  # no rank writes a shard before rank 0 has cleared a stale store
    model = run.meta_model()
    if cfg.gradients.preconditioner == "adam":
        # Only rank 0 decides whether to compute it; every rank then meets at the same barrier (a rank
        # that checked the file itself could see it already written and skip the barrier).
        if launch_rank() == 0 and not (out / PRECONDITIONER_FILE).exists():
            from gradex.gradients import preconditioner

            moments = preconditioner.second_moments(
                model, run.tokens, run.train_indices(run.sources), run.pad_id, cfg.refit.batch_size,
                cfg.gradients.preconditioner_batches, run.precision, seed=cfg.refit.seed)
            preconditioner.save(moments, out / PRECONDITIONER_FILE)
        barrier(world)  # every rank projects with rank 0's preconditioner
    projector = make_run_projector(run, model)
    idx = run.train_indices(run.sources) + run.indices("validation")
    extra = {"model": cfg.model.name, "finetune": cfg.model.finetune, "adapter_sha256": run.output("theta*"),
             "theta_norm": trainable_vector(model).norm().item()}
    compute_store(model, run.tokens, idx, run.pad_id, out, projector, batch_size=cfg.gradients.batch_size,
                  chunk_size=cfg.gradients.chunk_size, precision=run.precision, manifest_extra=extra,
                  output=cfg.gradients.output, describe=lambda i: f"{run.examples[i].origin or 'source ' + run.examples[i].source} "
                                                                 f"({run.examples[i].split} split, example {i})")
    run.mark("gradients", examples=len(idx), seconds=round(time.perf_counter() - t0, 1),
             outputs={"store": store_sha256(out)})
    return out


PRECONDITIONER_FILE = "preconditioner.pt"  # in store/: Adam's second moments at theta*
STORE_FILES = ("x.npy", "u.npy", "index.npy", "col_sq_norms.npy", PRECONDITIONER_FILE)


def store_sha256(out: Path) -> str:
    """The store's content hash: its arrays and preconditioner, not its timings or machine."""
    return hashlib.sha256("".join(ledger.sha256(out / f) for f in STORE_FILES if (out / f).exists()).encode()).hexdigest()[:16]


def make_run_projector(run: Run, model: torch.nn.Module):
    """The run's projector bound to `model`: P, wrapped with Adam's preconditioner when configured
    (its second moments are read from the store, so the gradients stage must have run)."""
    from gradex.gradients import Preconditioned, make_projector, preconditioner

    g = run.cfg.gradients
    projector = make_projector(g.projection, model, g.dim, g.seed)
    if g.preconditioner == "none":
        return projector
    moments = preconditioner.load(run.dir / "store" / PRECONDITIONER_FILE)
    return Preconditioned(projector, preconditioner.adam_scales(moments)).bind(projector.layout)


def problem(run: Run):
    """The estimation problem read from the store: training rows, validation rows, groups."""
    from gradex.estimate import Problem, exact_coordinates
    from gradex.gradients import Store

    store = Store.open(run.dir / "store")
    if store.manifest["projector"]["kind"] == "none":
        x = exact_coordinates(store.x)  # exact inner products in rank(G) <= N dimensions
        col = torch.ones(x.shape[1])
    else:
        x = torch.tensor(np.asarray(store.x), dtype=torch.float32)
        col = torch.as_tensor(store.col_sq_norms, dtype=torch.float32) if store.col_sq_norms is not None else None
    u = torch.tensor(np.asarray(store.u), dtype=torch.float32)
    index = store.index.tolist()
    examples = run.examples
    group_of = {name: j + 1 for j, name in enumerate(run.sources)}
    train_rows = [r for r, i in enumerate(index) if examples[i].split == "train"]
    val_rows = [r for r, i in enumerate(index) if examples[i].split == "validation"]
    group = torch.tensor([group_of.get(examples[index[r]].source, 0) for r in train_rows])
    return Problem(x=x[train_rows], u=u[train_rows], group=group, x_val=x[val_rows], u_val=u[val_rows],
                   n_sources=len(run.sources), col_sq_norms=col, theta_norm=float(store.manifest["theta_norm"]))


def regularization(run: Run, prob) -> float:
    """l2 from the config: `l2` itself, else calibrated to `step_size`, else to `output_change`."""
    from gradex.estimate import calibrate_l2

    est = run.cfg.estimate
    if est.l2 is not None:
        return est.l2
    if est.step_size is not None:
        return calibrate_l2(prob, est.step_size)
    return calibrate_l2(prob, output_change=est.output_change)


def weighting(run: Run, equal_steps: bool | None = None) -> str:
    """`estimate.weighting` with `auto` resolved to the weighting that models the deployed fine-tune:
    mean when every mix gets the same number of steps (default: as the finetune budget says), else sum."""
    if run.cfg.estimate.weighting != "auto":
        return run.cfg.estimate.weighting
    if equal_steps is None:
        equal_steps = run.cfg.finetune.budget == "equal" or run.cfg.finetune.max_steps is not None
    return "mean" if equal_steps else "sum"


def estimator(run: Run, equal_steps: bool | None = None,
              stage: str = "select") -> tuple[Callable[[torch.Tensor], torch.Tensor], list[dict], float]:
    """A function subsets (k, n) bool -> estimated target validation loss (k,), and its record.

    equal_steps: whether the modelled fine-tune gives every mix the same steps (`weighting`). Every
    call appends one row per subset to the record (members, estimate, implied step, mode, seconds,
    and the `stage` that asked), which becomes estimates.parquet.
    """
    from gradex.estimate import estimate

    prob = problem(run)
    l2 = regularization(run, prob)
    rows: list[dict] = []
    names = run.sources
    mode = run.cfg.estimate.mode
    weights = weighting(run, equal_steps)
    fingerprint = run.fp("select")
    reconstruct = Reconstructor(run) if mode == "reconstruct" else None

    def fn(subsets: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        est = estimate(prob, subsets, l2, newton_steps=run.cfg.estimate.newton_steps, tol=run.cfg.estimate.tol,
                       weighting=weights)
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
                f"({run.cfg.estimate.tol:g}) within estimate.newton_steps ({run.cfg.estimate.newton_steps}) "
                f"refinements: their estimates are less accurate (converged false in estimates.parquet)")
        return loss

    return fn, rows, l2


class Reconstructor:
    """Reconstruct mode: load theta* + P z into the model and measure the validation loss for real."""

    def __init__(self, run: Run):
        self.run = run
        self.model = run.meta_model()
        self.theta = trainable_vector(self.model)
        if run.cfg.gradients.projection == "none":
            raise config_mod.ConfigError("estimate.mode=reconstruct needs a projection (gradients.projection "
                                         "sparse or dense); with `none` use the linear mode")
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


def _save_estimates(run: Run, rows: list[dict]) -> None:
    """Append estimate rows to estimates.parquet (one row per evaluated subset)."""
    import pandas as pd

    path = run.dir / "estimates.parquet"
    frame = pd.DataFrame(rows)
    if path.exists():
        frame = pd.concat([pd.read_parquet(path), frame], ignore_index=True)
    write_parquet(path, frame)


def member_mask(names: list[str], subsets: list[list[str]]) -> torch.Tensor:
    """Subsets named by their sources as the (k, n) bool matrix the estimator takes; column j is names[j]."""
    return torch.tensor([[name in subset for name in names] for subset in subsets], dtype=torch.bool)


def estimate(cfg: Config, subsets: list[list[str]] | None = None) -> list[dict]:
    """Estimate the target validation loss of named subsets (default: none, all, each source alone,
    and all but each source) and append them to estimates.parquet."""
    run = prepare(cfg)
    gradients(cfg)
    names = run.sources
    if subsets is None:
        n = len(names)
        eye = torch.eye(n, dtype=torch.bool)
        members = torch.cat([torch.zeros(1, n, dtype=torch.bool), torch.ones(1, n, dtype=torch.bool), eye, ~eye])
    else:
        unknown = sorted({s for subset in subsets for s in subset} - set(names))
        if unknown:
            raise config_mod.ConfigError(f"estimate: unknown source(s) {unknown}; sources: {names}")
        members = member_mask(names, subsets)
    fn, rows, l2 = estimator(run, stage="estimate")
    fn(members)
    _save_estimates(run, rows)
    return rows


def selection(run: Run, method: str, fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
    """Select sources by `method` from the run's estimates: the body of selection.json.

    fn: the estimator (`estimator(run)[0]`), built here when not given."""
    from gradex import select as select_mod

    if fn is None:
        fn, _, _ = estimator(run)
    n, sc = len(run.sources), run.cfg.select
    t0 = time.perf_counter()
    if method == "ensemble":
        sel = select_mod.ensemble(fn, n, sc.subsets, sc.alpha, sc.seed, top_k=sc.top_k)
    elif method == "best":
        sel = select_mod.best(fn, n)
    elif method == "effects":
        sel = select_mod.effects(fn, n, sc.subsets, sc.seed)
    elif method == "exhaustive":
        if n > select_mod.EXHAUSTIVE_LIMIT:
            raise config_mod.ConfigError(f"select.method: exhaustive search needs at most "
                                         f"{select_mod.EXHAUSTIVE_LIMIT} sources, this run has {n}; use forward")
        sel = select_mod.exhaustive(fn, n)
    else:
        sel = getattr(select_mod, method)(fn, n)
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


def select(cfg: Config, force: bool = False) -> dict:
    """Select sources by their estimates; writes selection.json and appends to estimates.parquet."""
    run = prepare(cfg)
    gradients(cfg)
    if run.done("select", force) and (run.dir / "selection.json").exists():
        return json.loads((run.dir / "selection.json").read_text())
    fn, rows, l2 = estimator(run)
    body = selection(run, cfg.select.method, fn)
    body.update({"l2": l2, "estimated_subsets": len(rows)})
    write_json(run.dir / "selection.json", body)
    _save_estimates(run, rows)
    run.mark("select", subsets=len(rows), seconds=body["seconds"],
             outputs={"selection": ledger.sha256(run.dir / "selection.json")})
    log(f"estimated {len(rows)} subsets in {body['seconds']:.2f} s ({cfg.estimate.mode} mode, l2={l2:.3g}); "
        f"selected {body['selected']}")
    if body["worse_than_target"]:
        log("warning: the selected sources are estimated to make the target worse than fine-tuning on the "
            "target alone (selection.json, reason); consider select.method exhaustive, forward or effects")
    return body


# ---------------------------------------------------------------------------- fine-tunes of mixes

def budget_steps(run: Run) -> int | None:
    """The optimizer steps of every fine-tune under the equal budget: `finetune.max_steps`, else the
    steps `finetune.epochs` passes over the all-sources mix take. None under `budget: epochs`
    without max_steps (each mix then takes `epochs` passes over its own data)."""
    from gradex.train import total_steps

    f = run.cfg.finetune
    if f.max_steps is not None:
        return f.max_steps
    if f.budget == "epochs":
        return None
    return total_steps(f, len(run.train_indices(run.sources)))


def recipe_summary(run: Run) -> dict:
    """What every fine-tune of a mix gets, in numbers and in words."""
    f = run.cfg.finetune
    steps = budget_steps(run)
    start = "from theta* (the meta-initialization)" if f.init == "theta_star" else "from the base model"
    budget = (f"{steps} optimizer steps per fine-tune (equal budget)" if steps is not None else
              f"{f.epochs:g} epochs over each mix's own data (UNEQUAL budget: bigger mixes get more steps)")
    return {"init": f.init, "budget": f.budget, "steps": steps, "epochs": f.epochs, "lr": f.lr,
            "batch_size": f.batch_size, "description": f"{budget}, {start}, lr {f.lr:g}, batch {f.batch_size}"}


def finetune_recipe(run: Run) -> tuple[str, Any]:
    """(key, recipe): the finetune recipe with the budget's steps filled in, and a key for everything
    that shapes a fine-tune of a mix except its members and seed (data, model, precision, start)."""
    c = run.cfg
    recipe = dataclasses.replace(c.finetune, max_steps=budget_steps(run))
    start = run.output("theta*") if c.finetune.init == "theta_star" else "base"
    return config_mod.fingerprint(run.output("data"), c.model, run.precision, recipe, start, c.gradients.output), recipe


def finetune_key(run: Run, members: list[str], seed: int) -> str:
    return config_mod.fingerprint(finetune_recipe(run)[0], sorted(members), seed)


def finetune_mix(run: Run, members: list[str], seed: int = 0, desc: str = "finetune") -> dict:
    """Fine-tune on target train + `members` with the finetune recipe at seed offset `seed`, then
    evaluate on the target validation and test splits.

    Kept in finetunes/<key>/ (adapter, log, result.json), so any stage that needs the same
    fine-tune (the final model, compare, validate) reuses it; an interrupted one resumes from its
    checkpoint."""
    from gradex.evaluate import evaluate as evaluate_model
    from gradex.train import train, write_log

    key = finetune_key(run, members, seed)
    recipe = dataclasses.replace(finetune_recipe(run)[1], seed=run.cfg.finetune.seed + seed)
    where = run.dir / "finetunes" / key
    done = where / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    model = run.meta_model() if run.cfg.finetune.init == "theta_star" else run.fresh_model(seed=recipe.seed)
    idx = run.train_indices(members)
    t0 = time.perf_counter()
    history = train(model, run.tokens, idx, recipe, run.pad_id, run.precision, where / "checkpoint.pt", desc=desc)
    seconds = time.perf_counter() - t0
    save_trainable(model, where / "adapter.pt")
    write_log(history, where / "log.jsonl")
    t0 = time.perf_counter()
    metrics = {split: evaluate_model(model, run.tokenizer, run.examples, run.tokens, run.indices(split),
                                     run.precision, desc=f"{desc} {split}", output=run.cfg.gradients.output)
               for split in ("validation", "test")}
    result = {"key": key, "members": [s for s in run.sources if s in set(members)], "seed": seed,
              "init": run.cfg.finetune.init, "steps": len(history), "examples": len(idx),
              "seconds": round(seconds, 1), "eval_seconds": round(time.perf_counter() - t0, 1),
              "adapter": str((where / "adapter.pt").relative_to(run.dir)), **metrics}
    write_json(done, result)
    (where / "checkpoint.pt").unlink(missing_ok=True)
    return result


def finetune(cfg: Config, force: bool = False) -> dict:
    """The deliverable: the finetune recipe on target + selected sources, copied to final/ with its
    validation and test metrics (final/metrics.json)."""
    run = prepare(cfg)
    members = select(cfg)["selected"]
    key = finetune_key(run, members, 0)
    if force:
        shutil.rmtree(run.dir / "finetunes" / key, ignore_errors=True)
    result = finetune_mix(run, members, 0, desc="finetune[selected]")
    out = run.dir / "final"
    previous = out / "metrics.json"
    if force or not previous.exists() or json.loads(previous.read_text()).get("key") != key:
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run.dir / result["adapter"], out / "adapter.tmp")
        (out / "adapter.tmp").replace(out / "adapter.pt")
        write_json(previous, {**result, "recipe": recipe_summary(run)})
        log(f"fine-tuned the selection ({len(members)} sources, {result['examples']} examples) in "
            f"{result['steps']} steps: test {result['test']['metric']} {result['test']['score']:.3f}, "
            f"test loss {result['test']['loss']:.4f}")
    return json.loads(previous.read_text())


def evaluate(cfg: Config, force: bool = False) -> dict:
    """Validation and test metrics of the final model (final/metrics.json)."""
    return finetune(cfg, force)


# ---------------------------------------------------------------------------- compare

def _similarity(run: Run, kind: str) -> dict[str, float]:
    """Per-source similarity for a baseline, cached in compare/<kind>.json by what it was computed from."""
    from gradex.baselines import similarity_scores

    inputs = run.output("store") if kind == "gradient" else (run.output("data"), run.cfg.model)
    key = config_mod.fingerprint(kind, inputs)
    path = run.dir / "compare" / f"{kind}.json"
    if path.exists() and json.loads(path.read_text())["key"] == key:
        return json.loads(path.read_text())["scores"]
    scores = similarity_scores(kind, run)
    write_json(path, {"key": key, "scores": scores})
    return scores


def candidate_mixes(run: Run, body: dict, seeds: int, extra: dict[str, list[str]] | None = None) -> tuple[list, dict]:
    """The mixes compare fine-tunes: the selection, other selection methods, baselines, named mixes.

    Returns (mixes, similarity scores per similarity baseline)."""
    from gradex.baselines import random_mix, top_k
    from gradex.compare import SELECTED, Mix

    c = run.cfg
    chosen = body["selected"]
    k = len(chosen)
    mixes = [Mix(SELECTED, "selection", [chosen] * seeds, f"select.method {c.select.method}")]
    fn = None
    for method in c.compare.methods:
        if method == c.select.method:
            continue
        if fn is None:
            fn, _, _ = estimator(run)
        other = selection(run, method, fn)["selected"]
        mixes.append(Mix(f"gradex[{method}]", "selection", [other] * seeds, f"select.method {method}"))
    similarity = {}
    for b in c.compare.baselines:
        if b == "all":
            mixes.append(Mix("all", "baseline", [list(run.sources)] * seeds, "every source"))
        elif b == "target":
            mixes.append(Mix("target", "baseline", [[]] * seeds, "the target alone"))
        elif b == "random":
            draws = [random_mix(run.sources, k, f"{c.select.seed}:random:{s}") for s in range(seeds)]
            mixes.append(Mix("random", "baseline", draws, f"{k} random sources, drawn afresh per seed"))
        else:
            similarity[b] = _similarity(run, b)
            note = ("top-k by cosine of mean projected gradients with the target's (LESS-style)" if b == "gradient"
                    else "top-k by cosine of mean hidden states with the target's")
            mixes.append(Mix(b, "baseline", [top_k(similarity[b], k)] * seeds, note))
    for name, members in {**c.compare.mixes, **(extra or {})}.items():
        unknown = sorted(set(members) - set(run.sources))
        if unknown:
            raise config_mod.ConfigError(f"compare mix {name!r}: unknown source(s) {unknown}; sources: {run.sources}")
        if any(m.name == name for m in mixes):
            raise config_mod.ConfigError(f"compare mix {name!r}: the name is taken; choose another")
        mixes.append(Mix(name, "user", [[s for s in run.sources if s in members]] * seeds, "named by the user"))
    return mixes, similarity


COMPARE_FORMAT = 2  # bump when compare.json changes shape, so cached results are recomputed


def compare(cfg: Config, seeds: int | None = None, mixes: dict[str, list[str]] | None = None,
            force: bool = False) -> dict:
    """Fine-tune every candidate mix with the finetune recipe and budget over `seeds` seeds
    (default compare.seeds), evaluate on the target test split, and compare each with the selection.

    Writes compare.json (the table, the verdict, every fine-tune) and compare.parquet (one row per
    mix and seed). Fine-tunes are cached by what shapes them, so more seeds or another mix later
    costs only the new fine-tunes; `force` re-runs them all."""
    import pandas as pd

    from gradex import compare as cmp

    run = prepare(cfg)
    body = select(cfg)
    final = finetune(cfg)
    k = seeds or cfg.compare.seeds
    candidates, similarity = candidate_mixes(run, body, k, mixes)
    jobs = [(m, s) for m in candidates for s in range(k)]
    keys = {(m.name, s): finetune_key(run, m.members[s], s) for m, s in jobs}
    if force:
        for key in set(keys.values()) - {final["key"]}:
            shutil.rmtree(run.dir / "finetunes" / key, ignore_errors=True)
    fingerprint = config_mod.fingerprint(sorted(keys.items()), [m.__dict__ for m in candidates], COMPARE_FORMAT)
    path = run.dir / "compare.json"
    if not force and path.exists() and json.loads(path.read_text()).get("fingerprint") == fingerprint:
        return json.loads(path.read_text())
    todo = len({key for key in keys.values() if not (run.dir / "finetunes" / key / "result.json").exists()})
    log(f"compare: {len(candidates)} mixes x {k} seed(s) = {len(jobs)} fine-tunes, {todo} to train "
        f"({recipe_summary(run)['description']})")
    rows = []
    for m, s in jobs:
        res = finetune_mix(run, m.members[s], s, desc=f"compare[{m.name} seed {s}]")
        rows.append({"mix": m.name, "kind": m.kind, "seed": s, "members": res["members"], "size": len(res["members"]),
                     "steps": res["steps"], "examples": res["examples"], "seconds": res["seconds"],
                     "validation_loss": res["validation"]["loss"], "test_loss": res["test"]["loss"],
                     "test_score": res["test"]["score"], "key": res["key"]})
    fn, _, _ = estimator(run, stage="compare")
    for r, value in zip(rows, fn(member_mask(run.sources, [r["members"] for r in rows])).tolist()):
        r["estimate"] = value
    summary = cmp.summarize(candidates, rows)
    metric = final["test"]["metric"]
    meta = _stage_info(run.dir / "meta")
    grads = _stage_info(run.dir / "store")
    stage_seconds = {"meta-train": meta.get("seconds"), "gradients": grads.get("seconds"),
                     "select": _stage_info(run.dir / "select").get("seconds")}
    known = [v for v in stage_seconds.values() if v is not None]
    result = {"fingerprint": fingerprint, "seeds": k, "recipe": recipe_summary(run), "metric": metric, "test_examples": final["test"]["examples"],
              "selection": {"method": cfg.select.method, "selected": body["selected"], "reason": body["reason"]},
              "similarity": similarity, "mixes": summary, "estimate_check": cmp.estimate_check(rows),
              "verdict": cmp.verdict(summary, metric.replace("_", " ")),
              "cost": {"stages_seconds": stage_seconds,
                       "selection_seconds": sum(known) if len(known) == len(stage_seconds) else None,
                       "finetune_seconds": final["seconds"]},
              "rows": rows}
    write_json(path, result)
    write_parquet(run.dir / "compare.parquet", pd.DataFrame(rows))
    return result


def run_all(cfg: Config, force: bool = False) -> dict:
    """Every stage in order, the comparison at compare.run_seeds seeds included; returns the summary
    that `gradex run` prints."""
    t0 = time.perf_counter()
    prepare(cfg, force)
    meta_train(cfg, force)
    gradients(cfg, force)
    body = select(cfg, force)
    final = finetune(cfg, force)
    result = compare(cfg, seeds=cfg.compare.run_seeds)
    summary = {"run_dir": str(cfg.run_dir), "selection": body, "final": final, "compare": result,
               "report": str(report(cfg)), "seconds": round(time.perf_counter() - t0, 1)}
    write_json(cfg.run_dir / "summary.json", summary)
    return summary


def status(cfg: Config) -> list[dict]:
    """Each stage's state without running anything: done, stale (and why), running (interrupted), missing."""
    run = Run(cfg)
    rows: list[dict] = []
    upstream_ok = True
    for stage in STAGE_DIRS:
        state, why = run.state(stage)
        if state == "done" and not upstream_ok:
            state, why = "stale", f"an upstream stage ({rows[-1]['stage']}) is not done"
        rows.append({"stage": STAGE_NAMES[stage], "state": state, "why": why})
        upstream_ok = upstream_ok and state == "done"
    selection = json.loads((run.dir / "selection.json").read_text()) if (run.dir / "selection.json").exists() else None
    final = run.dir / "final" / "metrics.json"
    if not final.exists():
        rows.append({"stage": "finetune", "state": "missing", "why": "not run yet"})
    elif not upstream_ok or selection is None:
        rows.append({"stage": "finetune", "state": "stale", "why": "an upstream stage is not done"})
    elif json.loads(final.read_text()).get("key") != finetune_key(run, selection["selected"], 0):
        rows.append({"stage": "finetune", "state": "stale", "why": "changed: the selection, the data, theta* or the "
                                                                   "finetune recipe"})
    else:
        rows.append({"stage": "finetune", "state": "done", "why": ""})
    path = run.dir / "compare.json"
    if not path.exists():
        rows.append({"stage": "compare", "state": "missing", "why": "not run yet"})
    else:
        body = json.loads(path.read_text())
        current = upstream_ok and selection is not None and body["selection"]["selected"] == selection["selected"]
        current = current and all(r["key"] == finetune_key(run, r["members"], r["seed"]) for r in body["rows"])
        rows.append({"stage": "compare", "state": "done" if current else "stale",
                     "why": f"{body['seeds']} seed(s), {len(body['mixes'])} mixes" if current else
                     "changed: the selection, the data, theta* or the finetune recipe; `gradex compare` re-runs "
                     "only the fine-tunes that changed"})
    have = (run.dir / "report.html").exists()
    rows.append({"stage": "report", "state": "done" if have else "missing", "why": "rebuilt on every run" if have else ""})
    return rows


def format_status(rows: list[dict]) -> str:
    return "\n".join(f"{r['stage']:<11} {r['state']:<8} {r['why']}".rstrip() for r in rows)


def report(cfg: Config, force: bool = False) -> Path:
    """report.html from whatever the run directory holds (cheap: always rebuilt)."""
    from gradex import report as report_mod

    return report_mod.write(cfg.run_dir)
