"""prepare: read, check and tokenize every source; write the resolved config and the data manifest."""

from __future__ import annotations

from gradex import config as config_mod
from gradex.added import check_disjoint
from gradex.config import Config
from gradex.data import check_lengths, data_sha256, load_examples, save_examples, tokenize
from gradex.model import load_tokenizer
from gradex.saved import legacy_message, legacy_models
from gradex.device import resolve_device
from gradex.launch import launch_rank, main_first
from gradex.proportions import check_proportions, checked
from gradex.run import Run, log
from gradex.writer import writes


def inputs(run: Run) -> dict[str, str | None]:
    """prepare's ledger inputs: what names the tokenizer, the data config, and every data file's hash."""
    c = run.cfg
    return {"config": config_mod.fingerprint(*run.tokenizer_source, c.model.max_length, c.model.chat_template,
                                             config_mod.prepare_part(c.data)),
            **run.data_files}


@writes
def prepare(cfg: Config, force: bool = False) -> Run:
    """Read, check and tokenize every source; write the resolved config and the data manifest.

    Every data error (missing file or column, empty source, over-long example, unknown model) and
    every device error (a GPU asked for and missing, fp16 on the CPU) is raised here, before anything
    expensive runs. Under a launch, rank 0 prepares while the others wait (gradex.launch).
    """
    resolve_device(cfg.model.device)  # first: it starts accelerate's process state for this device
    return _prepare(cfg, force)


@main_first
def _prepare(cfg: Config, force: bool = False) -> Run:
    run = Run(cfg)
    run.precision  # the precision this device can run, or the error now
    legacy = legacy_models(run.dir)
    if legacy:  # before anything is written: an old run directory stays as it was
        raise config_mod.ConfigError(legacy_message(legacy[0]))
    out = run.dir / "data"
    if launch_rank() != 0:
        if run.state("prepare")[0] != "done":  # rank 0 has prepared (main_first) before this runs
            raise config_mod.ConfigError(f"{run.dir}: rank 0 did not prepare the run")
        return run
    config_mod.dump(cfg, run.dir / "config.yaml")
    check_disjoint(cfg, run.added)
    if run.done("prepare", force):
        if checked(cfg):  # run.tokens is read only then (a cached run tokenizes nothing)
            check_proportions(cfg, run.examples, run.tokens)  # the select settings may have changed since: said before training
        return run
    examples = load_examples(cfg)
    run.__dict__.pop("data_files", None)  # hashed again: a BIG-bench task fetched just now is one of them
    tokenizer = load_tokenizer(cfg.model)
    tokens = tokenize(tokenizer, examples)
    check_lengths(examples, tokens, cfg.model.max_length)
    from gradex.evaluate import scoring
    from gradex.clustering import check_clusterable

    check_clusterable(cfg, examples)  # k clusters need k examples, known before anything is trained
    check_proportions(cfg, examples, tokens)
    # the target's metric fits its data (a BIG-bench output_regex compiles, target_scores exist), said now
    scoring(cfg.data.target, examples)
    run.mark("prepare", status="running")  # data/ is about to hold examples the old record does not describe
    manifest = save_examples(examples, tokens, out)
    run.__dict__.update(tokenizer=tokenizer)
    if not run.added:  # what Run.tokens would tokenize again from data/: the same texts, in the same order
        run.__dict__.update(tokens=tokens)
    run.mark("prepare", examples=manifest["examples"], outputs={"data": data_sha256(examples, tokens)})
    counts = ", ".join(f"{s}={v['count']}" for s, v in manifest["sources"].items())
    log(f"prepared {manifest['examples']} examples ({counts})")
    return run
