"""Runs the stage graph (gradex.graph): a stage after every stage it needs (`ensure`), all of
them in order (`run_all`), and says where a run stands (`status`).

    prepare -> meta-train -> gradients -> [clusters] -> select -> finetune -> compare -> report

Each stage is a function of one `Run` in its own module under gradex.stages, reading and writing the
run directory. Each ledgered one records (`<dir>/stage.json`, gradex.ledger) the hashes of the
config parts it used and of the artifacts it read, and the hashes of what it wrote; a stage whose
inputs are unchanged is skipped, and one whose inputs changed (a data file edited, an upstream stage
that wrote something else) runs again, saying why. Long stages (training, gradients) resume from
partial work.

A command holds the run's lock (gradex.writer: one writer at a time, and only into a gradex run)
while its stages run; `status` and `report` only read it.

The functions below, one per stage, take the config: `from gradex import pipeline;
pipeline.select(cfg)` runs what select needs, then select, and is the one entry point for the CLI,
diagnostics, tests and benchmarks.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Any

from gradex import graph, ledger
from gradex.atomic import read_json, write_json
from gradex.config import Config, ConfigError
from gradex.data import data_sha256
from gradex.launch import launch_rank, on_main
from gradex.run import PRODUCER, STAGE_DIRS, STAGE_NAMES, Run, log, model_stages_ran_on, ran_on
from gradex.finetunes import budget_steps, finetune_key, finetune_mix, finetune_recipe, recipe_summary
from gradex.selection import selection
from gradex.stages.add_sources import add_sources as _add_sources
from gradex.stages.compare import COMPARE_FORMAT, candidate_mixes
from gradex.stages.compare import settings as compare_settings
from gradex.stages.estimate import estimates
from gradex.stages.gradients import STORE_FILES, store_sha256
from gradex.surrogate import (PRECONDITIONER_FILE, Reconstructor, estimator, make_run_projector, member_mask, problem,
                              regularization, save_estimates, weighting)
from gradex.writer import check_run, is_run, writer_now, writes, writing

__all__ = [
    "Run", "STAGE_DIRS", "STAGE_NAMES", "PRODUCER", "launch_rank", "log", "ensure", "require",
    "prepare", "data_sha256", "meta_train", "gradients", "PRECONDITIONER_FILE", "STORE_FILES", "store_sha256",
    "make_run_projector", "problem", "regularization", "weighting", "estimator", "Reconstructor", "member_mask",
    "save_estimates", "estimate", "selection", "select", "budget_steps", "recipe_summary", "finetune_recipe",
    "finetune_key", "finetune_mix", "finetune", "evaluate", "candidate_mixes", "COMPARE_FORMAT", "compare",
    "clusters", "add_sources", "run_all", "status", "format_status", "report",
]


def require(cfg: Config, *names: str, force: bool = False, run: Run | None = None, forcing: str | None = None) -> Run:
    """Run the stages `names` and every stage they need, each once, upstream first, on one Run (`run`,
    or the one prepare makes); each stage itself skips what is current. `force` re-runs `names`
    themselves, never their upstream, but for the stages a forced stage `forcing` forces with it
    (`Stage.forced_by`). Returns the Run."""
    with writing(cfg.run_dir):
        for name in graph.order(cfg, ["prepare", *names]):
            again = (force and name in names) or (forcing is not None and forcing in graph.stage(name).forced_by)
            if name == "prepare":
                if run is None or again:
                    run = graph.function("prepare")(cfg, again)
            else:
                graph.function(name)(run, again)
        assert run is not None
        return run


def ensure(cfg: Config, name: str, force: bool = False, run: Run | None = None, **options: Any) -> Any:
    """Stage `name`'s result, after every stage it needs (`require`); `force` re-runs the stage itself."""
    if name == "prepare":
        return require(cfg, "prepare", force=force, run=run)
    with writing(cfg.run_dir):
        run = require(cfg, *graph.stage(name).upstream(cfg), run=run, forcing=name if force else None)
        return graph.function(name)(run, force, **options)


def prepare(cfg: Config, force: bool = False) -> Run:
    return ensure(cfg, "prepare", force)


def meta_train(cfg: Config, force: bool = False) -> Path:
    return ensure(cfg, "meta-train", force)


def gradients(cfg: Config, force: bool = False) -> Path:
    return ensure(cfg, "gradients", force)


def clusters(cfg: Config, force: bool = False) -> dict | None:
    return ensure(cfg, "clusters", force)


def select(cfg: Config, force: bool = False) -> dict:
    return ensure(cfg, "select", force)


def finetune(cfg: Config, force: bool = False) -> dict:
    return ensure(cfg, "finetune", force)


evaluate = finetune  # validation and test metrics of the final model: its record, final/metrics.json


def compare(cfg: Config, seeds: int | None = None, mixes: dict[str, list[str]] | None = None,
            force: bool = False) -> dict:
    return ensure(cfg, "compare", force, seeds=seeds, mixes=mixes)


def estimate(cfg: Config, subsets: list[list[str]] | None = None) -> list[dict]:
    """The estimates of named subsets (the estimate stage, gradex.stages.estimate), saved to estimates.parquet. A
    read-only (archived) run whose stages up to the store are done is estimated without writing
    anything, not even the lock: the estimates are returned, not saved."""
    if is_run(cfg.run_dir) and not os.access(cfg.run_dir, os.W_OK):
        run = Run(cfg)
        for name in graph.order(cfg, graph.stage("estimate").upstream(cfg)):
            if name == "add-sources" and not run.added:
                continue  # nothing added: the step keeps no record
            key = graph.stage(name).key
            state, why = run.state(key)
            if state != "done":
                raise ConfigError(f"estimate: {run.dir} is read-only and its {name} stage is {state} ({why}); "
                                  f"copy the run somewhere writable and give the copy (--run-dir)")
        log(f"estimate: {run.dir} is read-only; the estimates are printed, not saved to estimates.parquet")
        return estimates(run, subsets)
    return ensure(cfg, "estimate", subsets=subsets)


@writes
def add_sources(cfg: Config, path: str | Path) -> dict:
    """Add the sources of the YAML file `path` to the run (gradex.stages.add_sources), then extend the
    store with their gradients at the existing theta*. Returns what the store now holds of added sources."""
    from gradex.gradients import Store

    _add_sources(Run(cfg), path)  # checks the run as it is, before prepare reads the new list
    run = require(cfg, "gradients")
    manifest = Store.open(run.dir / "store").manifest
    return {"run_dir": str(run.dir), "store": str(run.dir / "store"), "rows": manifest["n"],
            "added": manifest.get("added", []), "theta*": run.output("theta*")}


@writes
def run_all(cfg: Config, force: bool = False) -> dict:
    """Every stage of `gradex run` in order (graph.RUN), on one Run, the comparison at
    compare.run_seeds seeds included; returns the summary that `gradex run` prints."""
    t0 = time.perf_counter()
    run = prepare(cfg, force)
    found: dict[str, Any] = {}
    for name in graph.order(cfg, graph.RUN):
        if name == "prepare":
            continue
        options = {"seeds": cfg.compare.run_seeds} if name == "compare" else {}
        found[name] = graph.function(name)(run, force and name != "compare", **options)
    final = found["finetune"]
    summary = {"run_dir": str(cfg.run_dir), "selection": found["select"], "final": final, "compare": found["compare"],
               "ran_on": model_stages_ran_on(cfg.run_dir, final), "precision_setting": cfg.model.precision,
               "report": str(report(cfg)), "seconds": round(time.perf_counter() - t0, 1)}
    on_main(lambda: write_json(cfg.run_dir / "summary.json", summary))
    return summary


def status(cfg: Config) -> list[dict]:
    """Each stage's state without running anything: done, stale (and why), running (interrupted), missing."""
    from gradex.saved import legacy_message, legacy_models

    run = Run(cfg)
    rows: list[dict] = []
    legacy = legacy_models(run.dir)
    if legacy:  # every stage refuses such a directory (stages.prepare); say so first
        rows.append({"stage": "run", "state": "old", "why": legacy_message(legacy[0])})
    now = writer_now(run.dir)
    if now is not None:  # then a stage "running" below is running now, not interrupted
        rows.append({"stage": "run", "state": "writing", "why": f"pid {now.get('pid', '?')}: "
                                                                f"{now.get('command', 'a gradex command')}"})
    upstream_ok = True
    not_done: set[str] = set()  # ledger keys
    for stage in STAGE_DIRS:  # the ledgered stages, in the graph's order
        if stage == "clusters" and cfg.data.clusters is None:
            continue  # a run with configured sources has no such stage
        if stage == "added" and not run.added and not (run.dir / "added").exists():
            continue  # a run without added sources has no such stage
        state, why = run.state(stage)
        # stale when a stage it needs is not done, by the graph (clusters on embeddings need no gradients)
        needs = graph.order(cfg, graph.stage(STAGE_NAMES[stage]).upstream(cfg))
        blocked = [name for name in needs if graph.stage(name).key in not_done]
        if state == "done" and blocked:
            state, why = "stale", f"an upstream stage ({blocked[-1]}) is not done"
        elif stage == "added" and state == "done":
            why = (f"{', '.join(s.name for s in run.added)}: candidates whose gradients are taken at theta*, "
                   f"which was not trained on them ({STAGE_DIRS['added']}/, added_sources.yaml)")
        elif stage == "gradients" and why == "changed: added":
            why += " (a re-run computes only the added sources' rows; theta*'s own rows are kept)"
        elif stage in ("meta", "gradients") and state == "done":
            why = ran_on(ledger.read(run.dir / STAGE_DIRS[stage])) or ""
        rows.append({"stage": STAGE_NAMES[stage], "state": state, "why": why})
        upstream_ok = upstream_ok and state == "done"
        if state != "done":
            not_done.add(stage)
    selection = read_json(run.dir / "selection.json", "gradex select --force") if (run.dir / "selection.json").exists() else None
    final = run.dir / "final" / "metrics.json"
    if not final.exists():
        rows.append({"stage": "finetune", "state": "missing", "why": "not run yet"})
    elif not upstream_ok or selection is None:
        rows.append({"stage": "finetune", "state": "stale", "why": "an upstream stage is not done"})
    elif (record := ledger.kept(final, finetune_key(run, selection["selected"], 0, selection.get("proportions")))) is None:
        rows.append({"stage": "finetune", "state": "stale", "why": "changed: the selection, the data, theta* or the "
                                                                   "finetune recipe"})
    else:
        rows.append({"stage": "finetune", "state": "done", "why": ran_on(record) or ""})
    path = run.dir / "compare.json"
    if not path.exists():
        rows.append({"stage": "compare", "state": "missing", "why": "not run yet"})
    else:
        body = read_json(path, "gradex compare")
        current = upstream_ok and selection is not None and body["selection"]["selected"] == selection["selected"]
        current = current and body.get("settings") == compare_settings(run)  # the baselines asked for, the estimator
        current = current and all(r["key"] == finetune_key(run, r["members"], r["seed"], r.get("proportions"))
                                  for r in body["rows"])
        rows.append({"stage": "compare", "state": "done" if current else "stale",
                     "why": f"{body['seeds']} seed(s), {len(body['mixes'])} mixes" if current else
                     "changed: the selection, the mixes asked for, the estimates, the data, theta* or the finetune "
                     "recipe; `gradex compare` re-runs only the fine-tunes that changed"})
    tunes = sorted(p for p in (run.dir / "finetunes").glob("*") if p.is_dir())
    if tunes:  # every fine-tune of a mix, cached by key (final/, compare, validate share them)
        finished = {p for p in tunes if ledger.kept(p / "result.json", p.name) is not None}  # its folder is its key
        done = len(finished)
        partial = sum(p not in finished and (p / "checkpoint.pt").exists() for p in tunes)
        rows.append({"stage": "fine-tunes", "state": "cached", "why": f"{done} done in finetunes/"
                     + (f", {partial} interrupted (resumed from their checkpoints when asked for again)" if partial else "")})
    have = (run.dir / "report.html").exists()
    rows.append({"stage": "report", "state": "done" if have else "missing", "why": "rebuilt on every run" if have else ""})
    return rows


def format_status(rows: list[dict]) -> str:
    return "\n".join(f"{r['stage']:<11} {r['state']:<8} {r['why']}".rstrip() for r in rows)


def report(cfg: Config, force: bool = False, out: Path | None = None) -> Path:
    """report.html from whatever the run directory holds (cheap: always rebuilt), into the run or to
    `out` (a file elsewhere: how an archived, read-only run gets its report)."""
    from gradex import report as report_mod

    if out is None:
        check_run(cfg.run_dir)  # report.html is the only file it writes, and only into a gradex run
    if not is_run(cfg.run_dir):  # absent or empty: a report would make a folder that is not a run
        raise ConfigError(f"report: no run at {cfg.run_dir} yet; run `gradex run` (or a stage) on this config first")
    if out is not None:
        report_mod.check_out(out)

    def write() -> Path:
        try:
            return report_mod.write(cfg.run_dir, out)
        except OSError as err:  # an archived run: what it holds stays readable (`gradex status`)
            if err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            where = out or cfg.run_dir / "report.html"
            raise ConfigError(f"report: cannot write {where} ({err.strerror})"
                              + ("" if out else ": the run directory is read-only; give the report another place "
                                 "(gradex report --out FILE)")) from err

    return on_main(write)
