"""The stage graph (gradex.graph): declared once, acyclic, run in order, each stage once per command,
and no stage module reaching for another stage."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import tiny_run_config
from gradex import config, graph, pipeline

STAGES_DIR = Path(graph.__file__).parent / "stages"


@pytest.fixture()
def cfg(tmp_path, tiny_model_dir):
    return tiny_run_config(tmp_path, tiny_model_dir)


def test_every_stage_comes_after_what_it_needs(cfg):
    """The table's order is a topological order, whatever data.clusters says (both its needs)."""
    for clusters in (None, config.ClustersConfig(features="gradients"), config.ClustersConfig(features="embeddings")):
        cfg.data.clusters = clusters
        names = [s.name for s in graph.TABLE]
        for s in graph.TABLE:
            for up in s.upstream(cfg):
                assert up in graph.STAGES and names.index(up) < names.index(s.name), (s.name, up)


def test_order_is_the_upstream_that_applies(cfg):
    store = ["prepare", "meta-train", "add-sources", "gradients"]  # added sources' examples before the pass
    assert graph.order(cfg, ["select"]) == [*store, "select"]  # no clusters here
    assert graph.order(cfg, ["compare"]) == [*store, "select", "finetune", "compare"]
    cfg.data.clusters = config.ClustersConfig(features="embeddings")
    assert graph.order(cfg, ["clusters"]) == ["prepare", "meta-train", "clusters"]  # embeddings need theta* only
    assert graph.order(cfg, ["select"]) == [*store, "clusters", "select"]
    cfg.data.clusters = config.ClustersConfig(features="gradients")
    assert graph.order(cfg, ["clusters"]) == [*store, "clusters"]


def test_no_stage_module_imports_another_stage():
    """A stage reads its upstream's artifacts and shares helpers through the modules below stages/; it
    never imports another stage module (so never calls another stage), at the top or in a function."""
    for path in sorted(STAGES_DIR.glob("*.py")):
        own = f"gradex.stages.{path.stem}"
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
                     if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not (name.startswith("gradex.stages.") and name != own), f"{path.name} imports {name}"


def test_force_on_the_gradient_pass_forces_the_added_sources_step(cfg, monkeypatch):
    """added/ is re-read under `gradients --force` (Stage.forced_by), and only then."""
    pipeline.gradients(cfg)
    forced: dict[str, bool] = {}
    real = graph.function
    monkeypatch.setattr(graph, "function", lambda name: lambda run, force=False, **kw: forced.__setitem__(name, force)
                        or real(name)(run, force, **kw))
    pipeline.gradients(cfg, force=True)
    assert forced == {"prepare": False, "meta-train": False, "add-sources": True, "gradients": True}
    forced.clear()
    pipeline.select(cfg)
    assert not any(forced.values())


def test_a_command_prepares_once(cfg, monkeypatch):
    """`gradex run` builds one Run and tokenizes the examples once: prepare's function runs once,
    however many stages need it, and every other stage once."""
    from gradex import data, run as run_mod
    from gradex.stages import prepare as prepare_stage

    calls: list[str] = []
    real = graph.function

    def counting(name):
        function = real(name)
        return lambda *args, **kwargs: calls.append(name) or function(*args, **kwargs)

    runs, tokenized = [], []
    init = run_mod.Run.__init__
    monkeypatch.setattr(run_mod.Run, "__init__", lambda self, c: runs.append(c) or init(self, c))
    for module in (prepare_stage, run_mod):  # the two places that tokenize a run's examples
        monkeypatch.setattr(module, "tokenize", lambda tok, exs: tokenized.append(len(exs)) or data.tokenize(tok, exs))
    monkeypatch.setattr(graph, "function", counting)
    pipeline.run_all(cfg)
    assert calls == graph.order(cfg, graph.RUN)
    assert len(runs) == 1 and len(tokenized) == 1
    calls.clear()
    pipeline.compare(cfg)  # everything done: each stage it needs is asked once, and finds itself current
    assert calls == graph.order(cfg, ["compare"])


def test_force_reruns_the_stage_asked_for_and_not_its_upstream(cfg, capsys):
    pipeline.prepare(cfg)
    capsys.readouterr()
    pipeline.prepare(cfg, force=True)
    assert "prepare: running again (--force)" in capsys.readouterr().err
    pipeline.meta_train(cfg)
    capsys.readouterr()
    pipeline.meta_train(cfg, force=True)
    err = capsys.readouterr().err
    assert "meta-train: running again (--force)" in err and "prepare: running" not in err


def test_the_cli_has_a_verb_per_stage():
    from gradex.cli import parser

    verbs = parser()._subparsers._group_actions[0].choices
    assert set(graph.COMMANDS) <= set(verbs) and "add-sources" in verbs  # add sources: `gradex add-sources FILE`
