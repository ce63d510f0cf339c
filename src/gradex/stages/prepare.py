"""prepare: read, check and tokenize every source; write the resolved config and the data manifest."""

from __future__ import annotations

import hashlib
import json

from gradex import config as config_mod
from gradex.added import check_disjoint
from gradex.config import Config
from gradex.data import Example, Tokenized, check_lengths, load_examples, save_examples, tokenize
from gradex.model import legacy_message, legacy_models, load_tokenizer
from gradex.device import resolve_device
from gradex.launch import launch_rank, main_first
from gradex.run import Run, log
from gradex.writer import writes


def check_proportions(cfg: Config, examples: list[Example]) -> None:
    """At prepare, before anything is trained: that proportions exist within select.max_repeats and
    select.prior / max_shift for the sources' sizes (with data.clusters the sizes are known only
    after clustering: select checks again)."""
    s = cfg.select
    if cfg.data.clusters is not None or not (s.method == "weights" or "weights" in cfg.compare.methods):
        return
    from gradex.proportions import check
    from gradex.train import budget_steps

    sizes = {cfg.data.target.name: 0, **{src.name: 0 for src in cfg.data.sources}}
    for e in examples:
        if e.split == "train":
            sizes[e.source] = sizes.get(e.source, 0) + 1
    f = cfg.finetune
    check(cfg, sizes, budget_steps(f, f.budget, sum(sizes.values())) * f.batch_size)


def data_sha256(examples: list[Example], tokens: list[Tokenized]) -> str:
    """The hash of what training and evaluation see (sources, splits, texts, token ids), in order;
    provenance (file lines) is left out, so renumbering a file's rows makes nothing stale."""
    h = hashlib.sha256()
    for e, t in zip(examples, tokens):
        h.update(json.dumps([e.source, e.split, e.prompt, e.answer, list(e.choices), t.ids, t.n_prompt]).encode())
    return h.hexdigest()[:16]


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
        check_proportions(cfg, run.examples)  # the select settings may have changed since: said before training
        return run
    examples = load_examples(cfg)
    tokenizer = load_tokenizer(cfg.model)
    tokens = tokenize(tokenizer, examples)
    check_lengths(examples, tokens, cfg.model.max_length)
    from gradex.evaluate import scoring
    from gradex.stages.clusters import check_clusterable

    check_clusterable(cfg, examples)  # k clusters need k examples, known before anything is trained
    check_proportions(cfg, examples)
    # the target's metric fits its data (a BIG-bench output_regex compiles, target_scores exist), said now
    scoring(cfg.data.target, examples)
    manifest = save_examples(examples, tokens, out)
    run.__dict__.update(tokenizer=tokenizer)
    if not run.added:  # what Run.tokens would tokenize again from data/: the same texts, in the same order
        run.__dict__.update(tokens=tokens)
    run.mark("prepare", examples=manifest["examples"], outputs={"data": data_sha256(examples, tokens)})
    counts = ", ".join(f"{s}={v['count']}" for s, v in manifest["sources"].items())
    log(f"prepared {manifest['examples']} examples ({counts})")
    return run
