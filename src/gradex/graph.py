"""The stage graph, declared once: every stage's name, what it needs, where its ledger record lives,
and the function that runs it.

    prepare -> meta-train -> [add-sources] -> gradients -> [clusters] -> select -> finetune -> compare
                                                       \\-> estimate   (clusters: only with data.clusters;
                                                                     add-sources: no-op without added sources)

A stage's `name` is the CLI verb and the word the log and `gradex status` print. `order` gives a
stage's upstream in the table's order; gradex.pipeline's `ensure` runs them, once each, on one `Run`
(which carries the loaded examples and tokens through the command), then the stage. A stage function
takes that `Run` and never calls another stage: what it needs from upstream it reads from the run
directory. Each stage decides itself whether its output is current (its ledger record,
gradex.ledger), so a done upstream stage costs a record read.

The stage functions are named here as "module:function" and imported when they run: their modules
import gradex.run, which reads this table (where each ledger record lives).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from gradex.config import Config


def _always(cfg: Config) -> bool:
    return True


def _clustered(cfg: Config) -> bool:
    return cfg.data.clusters is not None


def _clusters_needs(cfg: Config) -> tuple[str, ...]:
    """Clusters of gradients need the store; clusters of embeddings need theta* only."""
    clusters = cfg.data.clusters
    return ("gradients",) if clusters is not None and clusters.features == "gradients" else ("meta-train",)


@dataclass(frozen=True)
class Stage:
    name: str  # the CLI verb, and what the log and `gradex status` call it
    function: str  # "module:function", called as function(run, force, **options)
    needs: tuple[str, ...] | Callable[[Config], tuple[str, ...]] = ()
    key: str | None = None  # its ledger key (Run.state, Run.mark), where the stage keeps a record
    folder: str | None = None  # the folder of its ledger record, under the run directory
    writes: tuple[str, ...] = ()  # the artifacts whose hashes its record keeps (Run.output)
    applies: Callable[[Config], bool] = field(default=_always)  # whether this config has the stage
    help: str = ""
    in_run: bool = True  # part of `gradex run`
    command: bool = True  # a stage of the graph with a CLI verb (add-sources' data is neither: see below)
    # `--force` on these stages forces this one too (added/ is re-read under `gradients --force`)
    forced_by: tuple[str, ...] = ()

    def upstream(self, cfg: Config) -> tuple[str, ...]:
        return self.needs(cfg) if callable(self.needs) else self.needs


# In the order a run runs them. The ledger keys and folders are those of runs made before the table
# existed ("meta" for meta-train, "store" for the gradients), so that those runs stay current.
TABLE = [
    Stage("prepare", "gradex.stages.prepare:prepare", (), "prepare", "data", ("data",),
          help="read, check and tokenize every source (all data errors surface here)"),
    Stage("meta-train", "gradex.stages.meta:meta_train", ("prepare",), "meta", "meta", ("theta*",),
          help="multitask-train on target + all sources: theta*"),
    # The examples of the sources `gradex add-sources` added to a run (added/), prepared like
    # prepare's before the gradient pass computes their rows; nothing to do in a run without any.
    # Not a verb of its own: `gradex add-sources FILE` adds sources, then runs the gradient pass.
    Stage("add-sources", "gradex.stages.add_sources:prepare_added", ("prepare",), "added", "added", ("added",), command=False,
          in_run=False, forced_by=("gradients",)),
    Stage("gradients", "gradex.stages.gradients:gradients", ("meta-train", "add-sources"), "gradients", "store", ("store",),
          help="projected per-example gradients at theta* into the store"),
    Stage("clusters", "gradex.stages.clusters:clusters", _clusters_needs, "clusters", "clusters", ("clusters",), _clustered,
          help="with data.clusters: cluster the unlabelled examples into sources (clusters/clusters.json)"),
    Stage("estimate", "gradex.stages.estimate:estimate", ("gradients", "clusters"),
          help="estimate the target validation loss of given subsets", in_run=False),
    Stage("select", "gradex.stages.select:select", ("gradients", "clusters"), "select", "select", ("selection",),
          help="estimate subsets and select sources (selection.json)"),
    Stage("finetune", "gradex.stages.finetune:finetune", ("select",),
          help="fine-tune on target + selected sources: the final model (final/), with the finetune recipe "
               "(finetune.init; finetune.budget equal by default: the steps all sources need for "
               "finetune.epochs, the same for every mix)"),
    Stage("compare", "gradex.stages.compare:compare", ("select", "finetune"),
          help="fine-tune the selection and every baseline with the same recipe and step budget over seeds; "
               "paired differences with 95%% intervals"),
]
STAGES: dict[str, Stage] = {s.name: s for s in TABLE}
COMMANDS: dict[str, Stage] = {s.name: s for s in TABLE if s.command}  # the stages with a CLI verb
LEDGERED = [s for s in TABLE if s.key is not None]  # in order: what `gradex status` lists
RUN = [s.name for s in TABLE if s.in_run]  # what `gradex run` runs, in order


def stage(name: str) -> Stage:
    try:
        return STAGES[name]
    except KeyError:
        raise KeyError(f"no stage {name!r}; stages: {', '.join(STAGES)}") from None


def order(cfg: Config, names: tuple[str, ...] | list[str]) -> list[str]:
    """The stages `names` and everything they need that applies to `cfg`, upstream first, in table order."""
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name not in seen:
            seen.add(name)
            for up in stage(name).upstream(cfg):  # a stage that does not apply still needs its upstream
                visit(up)

    for name in names:
        visit(name)
    return [name for name in STAGES if name in seen and STAGES[name].applies(cfg)]


def function(name: str) -> Callable[..., Any]:
    module, attr = stage(name).function.split(":")
    return getattr(importlib.import_module(module), attr)


def inputs(key: str) -> Callable[[Any], dict[str, str | None]]:
    """The ledger inputs of the stage with ledger key `key`: its module's `inputs(run)`, the hashes of
    the config parts it uses and of the artifacts it reads (what makes it stale when they change)."""
    found = next((s for s in LEDGERED if s.key == key), None)
    if found is None:
        raise KeyError(f"no ledgered stage {key!r}")
    return importlib.import_module(found.function.split(":")[0]).inputs
