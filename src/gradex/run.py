"""A config bound to its run directory: the cached examples, tokens and tokenizer, the models, and
the stage ledger (what each stage read and wrote, gradex.ledger), through which a stage tells done
from stale.

    <run dir>/data/    prepare       (STAGE_DIRS: where each ledgered stage keeps stage.json)
              meta/    meta-train
              added/   add-sources   (only once `gradex add-sources` has added sources: gradex.added)
              store/   gradients
              clusters/ clusters     (only with data.clusters: gradex.stages.clusters)
              select/  select
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from gradex import config as config_mod
from gradex import ledger
from gradex.config import Config
from gradex.data import Example, Tokenized, read_examples, tokenize
from gradex.graph import LEDGERED, inputs
from gradex.launch import launch_rank
from gradex.device import check_precision, resolve_device, resolve_precision
from gradex.model import load_base, load_tokenizer, make_trainable
from gradex.saved import load_model


def log(msg: str) -> None:
    if launch_rank() == 0:
        print(f"gradex: {msg}", file=sys.stderr, flush=True)


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
    def added(self) -> list[Any]:
        """The sources `gradex add-sources` added to this run, not trained into theta* (gradex.added)."""
        from gradex.added import read_added

        return read_added(self.dir)

    @cached_property
    def examples(self) -> list[Example]:
        """prepare's examples (the ones theta* was trained on), then the added sources' (added/)."""
        extra = self.dir / "added" / "examples.jsonl"
        more = read_examples(extra.parent) if self.added and extra.exists() else []
        return self.relabel(read_examples(self.dir / "data") + more)

    def relabel(self, examples: list[Example]) -> list[Example]:
        """The examples with each clustered one's source replaced by its cluster's name, once the clusters
        stage is done and current; otherwise (no data.clusters, or before the stage) as they are."""
        if self.cfg.data.clusters is None or self.state("clusters")[0] != "done":
            return examples
        out = list(examples)
        for found in json.loads((self.dir / CLUSTERS).read_text())["clusters"]:
            for i in found["members"]:
                out[i] = dataclasses.replace(out[i], source=found["name"])
        return out

    @cached_property
    def trained_sources(self) -> list[str]:
        """The sources theta* was trained on: the config's, without the added ones."""
        added = {s.name for s in self.added}
        return [s for s in self.sources if s not in added]

    def forget_sources(self) -> None:
        """Drop the examples' source labels (after the clusters stage relabelled them); the tokens stay."""
        for name in ("examples", "sources", "trained_sources"):
            self.__dict__.pop(name, None)

    def forget_data(self) -> None:
        """Drop the cached examples and tokens (after add-sources wrote new ones)."""
        for name in ("examples", "tokens", "sources", "trained_sources", "added"):
            self.__dict__.pop(name, None)

    @cached_property
    def tokens(self) -> list[Tokenized]:
        return tokenize(self.tokenizer, self.examples)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @cached_property
    def device(self) -> torch.device:
        """Where this process computes (`model.device` resolved: gradex.device); every model a stage
        loads is placed there, and everything else follows the model."""
        return resolve_device(self.cfg.model.device)

    @cached_property
    def precision(self) -> str:
        """The precision this process runs (`model.precision` with `auto` resolved for `device`)."""
        precision = resolve_precision(self.cfg.model.precision, self.device)
        check_precision(precision, self.device)
        return precision

    @property
    def gradient_precision(self) -> str:
        """The precision of the per-example gradient passes (preconditioner, store): `precision`, but fp32
        for fp16, which has no loss scaling there (a scaler watches one loss, not one per example), so
        small per-example gradients would underflow to zero unseen."""
        return "fp32" if self.precision == "fp16" else self.precision

    @property
    def compute(self) -> dict[str, str]:
        """Where and in what precision this process's model stages run, as their records keep it:
        the same config runs fp32 on one host and bf16 on another (`precision: auto`)."""
        return {"device": str(self.device), "precision": self.precision}

    @cached_property
    def sources(self) -> list[str]:
        """Auxiliary source names in config order, the added ones last (column j of a subset = source j)."""
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
        """The base model made trainable (LoRA drawn from `seed`), on `device`."""
        return make_trainable(load_base(self.cfg.model), self.cfg.model, seed=seed).to(self.device)

    def meta_model(self) -> torch.nn.Module:
        return self.saved_model(self.dir / THETA_STAR)

    def saved_model(self, path: Path) -> torch.nn.Module:
        """A model gradex.saved.save_model saved (a peft adapter or a transformers model folder), on `device`."""
        model = load_model(self.cfg.model, path).to(self.device)
        model.eval()
        return model

    # ------------------------------------------------------------------ the ledger
    @cached_property
    def data_files(self) -> dict[str, str]:
        """The hash of every data file the config names (a BIG-bench task from the pinned package is not
        hashed, one from a local copy or the web is: gradex.assets.bigbench_file; a hub dataset is named
        by its id and revision in the config, which is why pinning one matters)."""
        d = self.cfg.data
        return source_files([d.target, *d.sources], [d.sources_file] if d.sources_file else [])

    @property
    def tokenizer_source(self) -> list:
        """What names the tokenizer: the model's name and GGUF file, and its hub revision once pinned."""
        m = self.cfg.model
        return [m.name, m.gguf_file] + ([m.revision] if m.revision is not None else [])

    def inputs(self, stage: str) -> dict[str, str | None]:
        """What a stage's output depends on, hashed: the config parts it uses and the artifacts it reads.
        Each ledgered stage's module says which, in its `inputs(run)` (gradex.graph.inputs)."""
        return inputs(stage)(self)

    def data_key(self) -> Any:
        """The hash of every example a fine-tune of a mix may read: prepare's, and the added sources'."""
        return [self.output("data"), self.output("added")] if self.added else self.output("data")

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

    def base_inputs(self) -> dict:
        """The gradients stage's inputs but the added sources: what the store's own rows depend on."""
        return {k: v for k, v in self.inputs("gradients").items() if k != "added"}

    def base_current(self) -> bool:
        """Whether the store's own rows (the pass over the examples theta* was trained on, with this
        config, data and theta*) are complete and current, so that only added sources need computing."""
        from gradex.gradients.store import PENDING, READY, Store

        out = self.dir / "store"
        record = ledger.read(out)
        base = record.get("base_inputs")
        if base is None and record.get("status") == "done":  # a record from before add-sources existed
            base = {k: v for k, v in record.get("inputs", {}).items() if k != "added"}
        return base == self.base_inputs() and (Store.complete(out) or (out / PENDING / READY).exists())

    def begin(self, stage: str, force: bool) -> None:
        """Start (or resume) a stage: partial work made from other inputs must not be resumed."""
        if launch_rank() != 0:
            return
        where = self.dir / STAGE_DIRS[stage]
        if force or ledger.state(where, self.inputs(stage))[0] not in ("missing", "running"):
            shutil.rmtree(where, ignore_errors=True)
        self.mark(stage, status="running")


def ran_on(record: dict) -> str | None:
    """"cpu fp32", "cuda:0 bf16": where a stage record or a fine-tune's result says its model ran (None
    for a record written before gradex kept it)."""
    return f"{record['device']} {record['precision']}" if "precision" in record else None


def model_stages_ran_on(run_dir: Path, final: dict | None = None) -> dict[str, str | None]:
    """Where and in what precision each model stage of a run ran, from its records."""
    found = {STAGE_NAMES[s]: ran_on(ledger.read(run_dir / STAGE_DIRS[s])) for s in ("meta", "gradients")}
    if final is not None:
        found["finetune"] = ran_on(final)
    return found


def source_files(sources: list, extra: list[str] | None = None) -> dict[str, str]:
    """The hash of every local file the sources read (`path`, an `hf` source's local files, a BIG-bench
    task's task.json where it is read from a local copy or as fetched from the web), and of `extra` files, keyed
    "file <path>": what makes prepare's (or add-sources') output stale."""
    from gradex.assets import bigbench_file
    from gradex.data import hf_local_files

    paths = [s.path for s in sources if s.path] + list(extra or [])
    paths += [p for s in sources if s.hf is not None for p in hf_local_files(s.hf)]
    tasks = [bigbench_file(s.bigbench) for s in sources if s.bigbench is not None]
    paths += [str(p) for p in tasks if p is not None]
    return {f"file {p}": ledger.sha256(Path(p)) if Path(p).exists() else "missing" for p in dict.fromkeys(paths)}


# "added" (add-sources) exists only in a run that has added sources (Run.added)
THETA_STAR = Path("meta") / "theta_star"  # the meta-initialization: a peft adapter (LoRA) or a model folder (full)
# the meta-train's last Adam second moments, bias-corrected (gradients.preconditioner meta; with LoRA always kept)
META_MOMENTS = Path("meta") / "adam_moments.pt"
CLUSTERS = Path("clusters") / "clusters.json"  # with data.clusters: every cluster, its members and examples
FINAL = Path("final") / "selected"  # the final model, fine-tuned on target + the selected sources
# the ledgered stages, from the stage graph: ledger key -> its record's folder, its name; artifact -> its stage
STAGE_DIRS = {s.key: s.folder for s in LEDGERED}
STAGE_NAMES = {s.key: s.name for s in LEDGERED}
PRODUCER = {artifact: s.key for s in LEDGERED for artifact in s.writes}
