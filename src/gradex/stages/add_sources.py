"""add-sources: new candidate sources for a run whose store is complete, without training theta*
again: their examples are read and checked like prepare's (added/), their gradients taken at the
existing theta* with the run's projector and appended to the store (stages.gradients.extend_store).

The run directory's added_sources.yaml (gradex.added) lists them; the config is left as it is, so
prepare and meta-train stay done and only the store and what reads it (select, fine-tunes of mixes)
change. The store's manifest (`added`) and the gradients record say which rows came from sources
that theta* was not trained on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import shutil
from pathlib import Path

from gradex import added as added_mod
from gradex import config as config_mod
from gradex import ledger
from gradex.config import Config, ConfigError
from gradex.data import Examples, check_lengths, load_examples, save_examples, tokenize
from gradex.launch import launch_rank
from gradex.run import STAGE_NAMES, Run, log, source_files
from gradex.writer import writes


def added_examples(cfg: Config, sources: list) -> Examples:
    """The sources' training examples, read exactly as prepare reads a config source: the same
    seeded order, per-source limit, corruption and leakage rule against the target's validation and
    test prompts (load_examples on the config with these sources instead of its own)."""
    data = dataclasses.replace(cfg.data, sources=list(sources), sources_file=None, sources_column=None)
    with contextlib.redirect_stderr(io.StringIO()):  # its report counts the target's train split again
        found = load_examples(dataclasses.replace(cfg, data=data))
    target = cfg.data.target.name
    leakage = dict(found.leakage)
    leakage["sources"] = {k: v for k, v in leakage.get("sources", {}).items() if k != target}
    leakage["found"] = sum(leakage["sources"].values())
    leakage["dropped"] = leakage["found"] if leakage.get("mode") == "drop" else 0
    if leakage["found"]:  # what prepare says of a config source, said of the added ones only
        verb = "dropped them" if leakage["mode"] == "drop" else "kept them (data.leakage: warn); they inflate every score"
        listed = ", ".join(f"{name} {n}" for name, n in leakage["sources"].items())
        log(f"data.leakage: {leakage['found']} training example(s) of the added sources repeat a target validation "
            f"or test prompt: {listed}; {verb}")
    return Examples([e for e in found if e.source != target], leakage)


def checked_examples(run: Run, sources: list) -> tuple[Examples, list]:
    """The sources' examples and tokens, with every data check prepare makes (lengths too)."""
    examples = added_examples(run.cfg, sources)
    tokens = tokenize(run.tokenizer, examples)
    check_lengths(examples, tokens, run.cfg.model.max_length)
    return examples, tokens


def inputs(run: Run) -> dict[str, str | None]:
    """The added sources' ledger inputs: like prepare's, and the prepared data (the target's held-out
    prompts, which the leakage rule reads)."""
    c = run.cfg
    return {"config": config_mod.fingerprint(*run.tokenizer_source, c.model.max_length, c.data, run.added),
            **source_files(run.added), "data": run.output("data")}


def prepare_added(run: Run, force: bool = False) -> None:
    """Read, check and tokenize the run's added sources into added/ (the add-sources record); with
    none left (added_sources.yaml says `sources: []`), remove added/. A missing added_sources.yaml
    beside an added/ is more likely lost than meant: added/ stays unless `force`."""
    if launch_rank() != 0:
        return
    where = run.dir / "added"
    if not run.added:
        if where.exists():
            if not force and not (run.dir / added_mod.ADDED_FILE).exists():
                named = ", ".join(ledger.read(where).get("sources") or []) or "sources"
                raise ConfigError(f"{where} holds the examples of {named} that `gradex add-sources` added, but "
                                  f"{run.dir / added_mod.ADDED_FILE} is gone: restore it to keep them, or write "
                                  f"`sources: []` into it to drop them (theta*'s rows stay), or re-run with --force "
                                  f"(it recomputes the whole store)")
            log("add-sources: the run has no added sources any more; removing added/")
            shutil.rmtree(where)
            run.forget_data()
        return
    if run.done("added"):
        return
    examples, tokens = checked_examples(run, run.added)
    from gradex.data import data_sha256

    run.mark("added", status="running")  # added/ is about to hold examples the old record does not describe
    manifest = save_examples(examples, tokens, where)
    run.mark("added", examples=manifest["examples"], sources=[s.name for s in run.added],
             outputs={"added": data_sha256(examples, tokens)})
    run.forget_data()
    counts = ", ".join(f"{s}={v['count']}" for s, v in manifest["sources"].items())
    log(f"add-sources: prepared {manifest['examples']} examples of sources not trained into theta* ({counts})")


@writes
def add_sources(run: Run, path: str | Path) -> None:
    """Add the sources of the YAML file `path` to the run: check them (names, schema, data, lengths,
    leakage) before any model runs, record them in added_sources.yaml and prepare their examples
    (added/). The gradients stage then extends the store with their rows (gradex.pipeline.add_sources)."""
    cfg = run.cfg
    new = added_mod.read_sources_file(path)
    for stage in ("prepare", "meta", "gradients"):
        state, why = run.state(stage)
        # the store may be stale only for its added rows (an interrupted add-sources): resumable
        if state != "done" and not (stage == "gradients" and run.base_current()):
            raise ConfigError(f"add-sources extends a run whose store is complete; {run.dir}: "
                              f"{STAGE_NAMES[stage]} is {state} ({why}); run `gradex gradients` on it first "
                              f"(with the run's config: {run.dir / 'config.yaml'})")
    merged = added_mod.merge(cfg, run.trained_sources, run.added, new, path)
    checked_examples(run, [s for s in merged if s.name in {n.name for n in new}])  # data errors before any write
    if merged != run.added:
        added_mod.write_added(run.dir, merged)
        run.forget_data()
        log(f"add-sources: {run.dir / added_mod.ADDED_FILE} now lists {[s.name for s in merged]}")
    prepare_added(run)
