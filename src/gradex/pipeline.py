"""The stages of a run, each a function of the config that reads and writes the run directory.

    prepare -> meta-train -> gradients -> estimate -> select -> finetune -> evaluate

Each stage records the fingerprint of everything it depends on in `<dir>/stage.json`; a stage whose
fingerprint is unchanged is skipped, and a stage that changes invalidates the ones after it (their
fingerprints include its own). Long stages (training, gradients) resume from partial work.
"""

from __future__ import annotations

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
from gradex.config import Config
from gradex.data import Example, Tokenized, check_lengths, load_examples, read_examples, save_examples, tokenize
from gradex.model import load_base, load_tokenizer, load_trainable, make_trainable, save_trainable, trainable_vector

FINAL_RUNS = ("selected", "all", "target")  # the selected mix and the two obvious baselines


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

    # ------------------------------------------------------------------ fingerprints
    def fp(self, stage: str) -> str:
        c = self.cfg
        if stage == "prepare":
            return config_mod.fingerprint(c.model.name, c.model.gguf_file, c.model.max_length, c.data)
        if stage == "meta":
            return config_mod.fingerprint(self.fp("prepare"), c.model, c.meta)
        if stage == "gradients":  # Adam's preconditioner is measured on the refit recipe's batches
            batches = (c.refit.batch_size, c.refit.seed) if c.gradients.preconditioner == "adam" else None
            return config_mod.fingerprint(self.fp("meta"), c.gradients, batches)
        if stage in ("estimate", "select"):
            return config_mod.fingerprint(self.fp("gradients"), c.estimate, c.select)
        if stage == "finetune":
            return config_mod.fingerprint(self.fp("prepare"), c.model, c.finetune, self.selected())
        if stage == "evaluate":  # its `loss` is the estimated quantity, which the output defines
            return config_mod.fingerprint(self.fp("finetune"), c.gradients.output)
        raise KeyError(stage)

    def selected(self) -> list[str]:
        return json.loads((self.dir / "selection.json").read_text())["selected"]

    def done(self, stage: str, where: Path) -> bool:
        info = _stage_info(where)
        return info.get("fingerprint") == self.fp(stage) and info.get("status") == "done"

    def mark(self, stage: str, where: Path, status: str = "done", **info: Any) -> None:
        if launch_rank() != 0:
            return
        where.mkdir(parents=True, exist_ok=True)
        body = {"stage": stage, "fingerprint": self.fp(stage), "status": status, **info}
        (where / "stage.json").write_text(json.dumps(body, indent=2))

    def begin(self, stage: str, where: Path, force: bool) -> None:
        """Start (or resume) a stage: partial work made from other inputs must not be resumed."""
        if launch_rank() != 0:
            return
        if force or _stage_info(where).get("fingerprint") not in (None, self.fp(stage)):
            shutil.rmtree(where, ignore_errors=True)
        self.mark(stage, where, status="running")


def _stage_info(where: Path) -> dict:
    path = where / "stage.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# ---------------------------------------------------------------------------- stages

def prepare(cfg: Config, force: bool = False) -> Run:
    """Read, check and tokenize every source; write the resolved config and the data manifest.

    Every data error (missing file or column, empty source, over-long example, unknown model)
    is raised here, before anything expensive runs.
    """
    run = Run(cfg)
    out = run.dir / "data"
    if launch_rank() != 0:
        if not run.done("prepare", out):
            raise config_mod.ConfigError("under a multi-process launch only `gradex gradients` runs in parallel: "
                                         "run `gradex meta-train` first, then launch the gradient pass")
        return run
    config_mod.dump(cfg, run.dir / "config.yaml")
    if not force and run.done("prepare", out):
        return run
    examples = load_examples(cfg)
    tokenizer = load_tokenizer(cfg.model)
    tokens = tokenize(tokenizer, examples)
    check_lengths(examples, tokens, cfg.model.max_length)
    manifest = save_examples(examples, tokens, out)
    run.__dict__.update(tokenizer=tokenizer)
    run.mark("prepare", out, examples=manifest["examples"])
    counts = ", ".join(f"{s}={v['count']}" for s, v in manifest["sources"].items())
    log(f"prepared {manifest['examples']} examples ({counts})")
    return run


def meta_train(cfg: Config, force: bool = False) -> Path:
    """Multitask-train on target + all sources: the meta-initialization theta* (meta/adapter.pt)."""
    from gradex.train import train, write_log

    run = prepare(cfg)
    out = run.dir / "meta"
    if not force and run.done("meta", out):
        return out / "adapter.pt"
    run.begin("meta", out, force)
    checkpoint = out / "checkpoint.pt"
    model = run.fresh_model(seed=cfg.meta.seed)
    idx = run.train_indices(run.sources)
    t0 = time.perf_counter()
    history = train(model, run.tokens, idx, cfg.meta, run.pad_id, cfg.model.precision, checkpoint, desc="meta-train")
    save_trainable(model, out / "adapter.pt")
    write_log(history, out / "log.jsonl")
    checkpoint.unlink(missing_ok=True)
    run.mark("meta", out, steps=len(history), seconds=round(time.perf_counter() - t0, 1),
             final_loss=history[-1]["loss"], adapter_sha256=_sha256(out / "adapter.pt"))
    log(f"meta-trained theta* in {len(history)} steps (train loss {history[0]['loss']:.3f} -> {history[-1]['loss']:.3f})")
    return out / "adapter.pt"


def gradients(cfg: Config, force: bool = False) -> Path:
    """Projected per-example gradients and offsets at theta*, for training and target validation examples."""
    from gradex.gradients import compute_store
    from gradex.gradients.store import barrier, distributed

    run = prepare(cfg)
    if launch_rank() != 0 and not run.done("meta", run.dir / "meta"):
        raise config_mod.ConfigError("under a multi-process launch run `gradex meta-train` first")
    meta_train(cfg)
    out = run.dir / "store"
    if not force and run.done("gradients", out):
        return out
    _, world = distributed()
    run.begin("gradients", out, force)
    barrier(world)  # no rank writes a shard before rank 0 has cleared a stale store
    model = run.meta_model()
    if cfg.gradients.preconditioner == "adam":
        # Only rank 0 decides whether to compute it; every rank then meets at the same barrier (a rank
        # that checked the file itself could see it already written and skip the barrier).
        if launch_rank() == 0 and not (out / PRECONDITIONER_FILE).exists():
            from gradex.gradients import preconditioner

            moments = preconditioner.second_moments(
                model, run.tokens, run.train_indices(run.sources), run.pad_id, cfg.refit.batch_size,
                cfg.gradients.preconditioner_batches, cfg.model.precision, seed=cfg.refit.seed)
            preconditioner.save(moments, out / PRECONDITIONER_FILE)
        barrier(world)  # every rank projects with rank 0's preconditioner
    projector = make_run_projector(run, model)
    idx = run.train_indices(run.sources) + run.indices("validation")
    meta = json.loads((run.dir / "meta" / "stage.json").read_text())
    extra = {"model": cfg.model.name, "finetune": cfg.model.finetune, "adapter_sha256": meta["adapter_sha256"],
             "theta_norm": trainable_vector(model).norm().item()}
    compute_store(model, run.tokens, idx, run.pad_id, out, projector, batch_size=cfg.gradients.batch_size,
                  chunk_size=cfg.gradients.chunk_size, precision=cfg.model.precision, manifest_extra=extra,
                  output=cfg.gradients.output)
    run.mark("gradients", out, examples=len(idx))
    return out


PRECONDITIONER_FILE = "preconditioner.pt"  # in store/: Adam's second moments at theta*


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


def estimator(run: Run) -> tuple[Callable[[torch.Tensor], torch.Tensor], list[dict], float]:
    """A function subsets (k, n) bool -> estimated target validation loss (k,), and its record.

    Every call appends one row per subset to the record (members, estimate, implied step, mode,
    seconds), which becomes estimates.parquet.
    """
    from gradex.estimate import estimate

    prob = problem(run)
    l2 = regularization(run, prob)
    rows: list[dict] = []
    names = run.sources
    mode = run.cfg.estimate.mode
    fingerprint = run.fp("select")
    reconstruct = Reconstructor(run) if mode == "reconstruct" else None

    def fn(subsets: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        est = estimate(prob, subsets, l2, newton_steps=run.cfg.estimate.newton_steps, tol=run.cfg.estimate.tol)
        loss = reconstruct(est.z) if reconstruct else est.loss
        seconds = (time.perf_counter() - t0) / max(1, len(subsets))
        for member, value, step, change in zip(subsets.tolist(), loss.tolist(), est.step.tolist(),
                                                est.change.tolist()):
            rows.append({"members": [n for n, m in zip(names, member) if m], "size": sum(member),
                         "estimate": value, "step": step, "output_change": change, "mode": mode, "l2": l2,
                         "seconds": seconds, "fingerprint": fingerprint})
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
            u, _ = outputs(self.model, self.run.tokens, self.val, self.run.pad_id, self.run.cfg.model.precision,
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
    frame.to_parquet(path)


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
        members = torch.tensor([[name in subset for name in names] for subset in subsets], dtype=torch.bool)
    fn, rows, l2 = estimator(run)
    fn(members)
    _save_estimates(run, rows)
    return rows


def select(cfg: Config, force: bool = False) -> dict:
    """Select sources by their estimates; writes selection.json and appends to estimates.parquet."""
    from gradex import select as select_mod

    run = prepare(cfg)
    gradients(cfg)
    if not force and run.done("select", run.dir / "select"):
        return json.loads((run.dir / "selection.json").read_text())
    fn, rows, l2 = estimator(run)
    n, sc = len(run.sources), cfg.select
    t0 = time.perf_counter()
    if sc.method == "ensemble":
        sel = select_mod.ensemble(fn, n, sc.subsets, sc.alpha, sc.seed, top_k=sc.top_k)
    else:
        sel = getattr(select_mod, sc.method)(fn, n)
    seconds = time.perf_counter() - t0
    body = sel.to_dict()
    body.update({"sources": run.sources, "selected": [run.sources[j] for j in sel.selected],
                 "source_scores": dict(zip(run.sources, sel.scores)), "l2": l2, "mode": cfg.estimate.mode,
                 "estimated_subsets": len(rows), "seconds": round(seconds, 3)})
    (run.dir / "selection.json").write_text(json.dumps(body, indent=2))
    _save_estimates(run, rows)
    run.mark("select", run.dir / "select", subsets=len(rows), seconds=round(seconds, 3))
    log(f"estimated {len(rows)} subsets in {seconds:.2f} s ({cfg.estimate.mode} mode, l2={l2:.3g}); "
        f"selected {body['selected']}")
    return body


def finetune(cfg: Config, force: bool = False, runs: tuple[str, ...] = FINAL_RUNS) -> Path:
    """Fine-tune the base model on target + selected sources (and the two baselines)."""
    from gradex.train import train, write_log

    run = prepare(cfg)
    select(cfg)
    out = run.dir / "final"
    if not force and run.done("finetune", out):
        return out
    members = {"selected": run.selected(), "all": run.sources, "target": []}
    for name in runs:
        where = out / name
        if not force and run.done("finetune", where):
            continue
        run.begin("finetune", where, force)
        model = run.fresh_model(seed=cfg.finetune.seed)
        idx = run.train_indices(members[name])
        history = train(model, run.tokens, idx, cfg.finetune, run.pad_id, cfg.model.precision,
                        where / "checkpoint.pt", desc=f"finetune[{name}]")
        save_trainable(model, where / "adapter.pt")
        write_log(history, where / "log.jsonl")
        (where / "checkpoint.pt").unlink(missing_ok=True)
        run.mark("finetune", where, members=members[name], steps=len(history), examples=len(idx))
        log(f"fine-tuned [{name}] on {len(idx)} examples in {len(history)} steps")
    run.mark("finetune", out, runs=list(runs))
    return out


def evaluate(cfg: Config, force: bool = False) -> dict:
    """Target validation and test metrics of theta* and of every final model (final/metrics.json)."""
    from gradex.evaluate import evaluate as evaluate_model

    run = prepare(cfg)
    finetune(cfg)
    out = run.dir / "final"
    path = out / "metrics.json"
    if not force and path.exists() and json.loads(path.read_text()).get("fingerprint") == run.fp("evaluate"):
        return json.loads(path.read_text())
    results: dict[str, Any] = {"fingerprint": run.fp("evaluate"), "models": {}}
    val, test = run.indices("validation"), run.indices("test")
    for name in FINAL_RUNS:
        model = run.fresh_model()
        load_trainable(model, out / name / "adapter.pt")
        results["models"][name] = {
            "members": json.loads((out / name / "stage.json").read_text())["members"],
            "validation": evaluate_model(model, run.tokenizer, run.examples, run.tokens, val, cfg.model.precision,
                                         desc=f"evaluate[{name}]", output=cfg.gradients.output),
            "test": evaluate_model(model, run.tokenizer, run.examples, run.tokens, test, cfg.model.precision,
                                   desc=f"test[{name}]", output=cfg.gradients.output),
        }
    path.write_text(json.dumps(results, indent=2))
    return results


def run_all(cfg: Config, force: bool = False) -> dict:
    """Every stage in order; returns the summary that `gradex run` prints."""
    t0 = time.perf_counter()
    prepare(cfg, force)
    meta_train(cfg, force)
    gradients(cfg, force)
    selection = select(cfg, force)
    finetune(cfg, force)
    metrics = evaluate(cfg, force)
    summary = {"run_dir": str(cfg.run_dir), "selection": selection, "metrics": metrics,
               "seconds": round(time.perf_counter() - t0, 1)}
    (cfg.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
