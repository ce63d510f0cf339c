"""The stages of a run in order, and what a run directory holds.

    prepare -> meta-train -> gradients -> [clusters] -> estimate -> select -> finetune -> compare -> report

Each stage is a function of the config in its own module under gradex.stages, reading and writing
the run directory through gradex.run.Run. Each records in the ledger (`<dir>/stage.json`,
gradex.ledger) the hashes of the config parts it used and of the artifacts it read, and the hashes
of what it wrote; a stage whose inputs are unchanged is skipped, and one whose inputs changed (a
data file edited, an upstream stage that wrote something else) runs again, saying why. Long stages
(training, gradients) resume from partial work.

Each stage that writes the run directory holds its lock (gradex.writer: one writer at a time, and
only into a gradex run); `status` and `report` only read it.

This module runs them all (`run_all`), says where a run stands (`status`), and re-exports every
stage function and the names the CLI, diagnostics, tests and benchmarks use, so
`from gradex import pipeline; pipeline.select(cfg)` is the one entry point.
"""

from __future__ import annotations

import errno
import time
from pathlib import Path

from gradex import ledger
from gradex.atomic import read_json, write_json
from gradex.config import Config, ConfigError
from gradex.launch import launch_rank, on_main
from gradex.run import PRODUCER, STAGE_DIRS, STAGE_NAMES, Run, log, model_stages_ran_on, ran_on
from gradex.stages.compare import COMPARE_FORMAT, candidate_mixes, compare
from gradex.stages.estimate import (Reconstructor, estimate, estimator, member_mask, problem, regularization,
                                    save_estimates, weighting)
from gradex.stages.finetune import (budget_steps, evaluate, finetune, finetune_key, finetune_mix, finetune_recipe,
                                    recipe_summary)
from gradex.stages.gradients import PRECONDITIONER_FILE, STORE_FILES, gradients, make_run_projector, store_sha256
from gradex.stages.meta import meta_train
from gradex.stages.prepare import data_sha256, prepare
from gradex.stages.clusters import clusters
from gradex.stages.select import select, selection
from gradex.writer import check_run, is_run, writer_now, writes

__all__ = [
    "Run", "STAGE_DIRS", "STAGE_NAMES", "PRODUCER", "launch_rank", "log",
    "prepare", "data_sha256", "meta_train", "gradients", "PRECONDITIONER_FILE", "STORE_FILES", "store_sha256",
    "make_run_projector", "problem", "regularization", "weighting", "estimator", "Reconstructor", "member_mask",
    "save_estimates", "estimate", "selection", "select", "budget_steps", "recipe_summary", "finetune_recipe",
    "finetune_key", "finetune_mix", "finetune", "evaluate", "candidate_mixes", "COMPARE_FORMAT", "compare",
    "clusters", "run_all", "status", "format_status", "report",
]

@writes
def run_all(cfg: Config, force: bool = False) -> dict:
    """Every stage in order, the comparison at compare.run_seeds seeds included; returns the summary
    that `gradex run` prints."""
    t0 = time.perf_counter()
    prepare(cfg, force)
    meta_train(cfg, force)
    gradients(cfg, force)
    clusters(cfg, force)  # with data.clusters: the sources the rest of the run selects among
    body = select(cfg, force)
    final = finetune(cfg, force)
    result = compare(cfg, seeds=cfg.compare.run_seeds)
    summary = {"run_dir": str(cfg.run_dir), "selection": body, "final": final, "compare": result,
               "ran_on": model_stages_ran_on(cfg.run_dir, final), "precision_setting": cfg.model.precision,
               "report": str(report(cfg)), "seconds": round(time.perf_counter() - t0, 1)}
    on_main(lambda: write_json(cfg.run_dir / "summary.json", summary))
    return summary


def status(cfg: Config) -> list[dict]:
    """Each stage's state without running anything: done, stale (and why), running (interrupted), missing."""
    from gradex.model import legacy_message, legacy_models

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
    for stage in STAGE_DIRS:
        if stage == "clusters" and cfg.data.clusters is None:
            continue  # a run with configured sources has no such stage
        if stage == "added" and not run.added and not (run.dir / "added").exists():
            continue  # a run without added sources has no such stage
        state, why = run.state(stage)
        if state == "done" and not upstream_ok:
            state, why = "stale", f"an upstream stage ({rows[-1]['stage']}) is not done"
        elif stage == "added" and state == "done":
            why = (f"{', '.join(s.name for s in run.added)}: candidates whose gradients are taken at theta*, "
                   f"which was not trained on them ({STAGE_DIRS['added']}/, added_sources.yaml)")
        elif stage == "gradients" and why == "changed: added":
            why += " (a re-run computes only the added sources' rows; theta*'s own rows are kept)"
        elif stage in ("meta", "gradients") and state == "done":
            why = ran_on(ledger.read(run.dir / STAGE_DIRS[stage])) or ""
        rows.append({"stage": STAGE_NAMES[stage], "state": state, "why": why})
        upstream_ok = upstream_ok and state == "done"
    selection = read_json(run.dir / "selection.json", "gradex select --force") if (run.dir / "selection.json").exists() else None
    final = run.dir / "final" / "metrics.json"
    if not final.exists():
        rows.append({"stage": "finetune", "state": "missing", "why": "not run yet"})
    elif not upstream_ok or selection is None:
        rows.append({"stage": "finetune", "state": "stale", "why": "an upstream stage is not done"})
    elif read_json(final, "gradex finetune --force").get("key") != finetune_key(run, selection["selected"], 0):
        rows.append({"stage": "finetune", "state": "stale", "why": "changed: the selection, the data, theta* or the "
                                                                   "finetune recipe"})
    else:
        rows.append({"stage": "finetune", "state": "done", "why": ran_on(read_json(final, "gradex finetune --force")) or ""})
    path = run.dir / "compare.json"
    if not path.exists():
        rows.append({"stage": "compare", "state": "missing", "why": "not run yet"})
    else:
        body = read_json(path, "gradex compare")
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
