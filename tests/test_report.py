"""report.html: built from a real tiny run, checked as text and in a real headless Chromium."""

from __future__ import annotations

import base64
import html
import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import tiny_run_config
from gradex import pipeline, report

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
HEADINGS = ["Run", "Per-source scores", "Selected mix", "Estimates vs real fine-tunes", "Comparison with baselines",
            "Stage costs"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VOID = {"meta", "link", "img", "br", "hr", "input"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """Every stage of `gradex run` on the tiny model (the config of test_pipeline's `cfg`)."""
    tmp = tmp_path_factory.mktemp("report")
    cfg = tiny_run_config(tmp, tiny_model_dir)
    pipeline.run_all(cfg)
    # `gradex validate` fine-tunes for real (minutes even here); its artifact is small to write by hand
    estimates = pd.read_parquet(cfg.run_dir / "estimates.parquet").head(4)
    rows = [{"members": list(r.members), "estimate": r.estimate, "real": r.estimate + 0.01 * i,
             "seeds": [r.estimate + 0.01 * i - 0.005, r.estimate + 0.01 * i + 0.005]}
            for i, r in enumerate(estimates.itertuples())]
    (cfg.run_dir / "validation.json").write_text(json.dumps({
        "recipe": "finetune", "recipe_description": "12 optimizer steps per fine-tune", "subsets": len(rows),
        "spearman": 0.8, "pearson": 0.9, "mean_abs_rel_error": 0.02, "seed_noise": float("nan"),
        "constant_error": 0.05, "rows": rows}))
    return cfg.run_dir


def test_report_of_a_full_run_has_every_section_and_inline_pngs(run_dir):
    text = report.write(run_dir).read_text(encoding="utf-8")
    assert_valid_html(text)
    for heading in HEADINGS:
        assert f"<h2>{heading}</h2>" in text
    for name in ("add_more", "mul", "sub"):
        assert name in text
    assert 'class="missing"' not in text  # every artifact was there
    assert "Error bars: the standard error" in text  # ensemble: spread over the sampled subsets
    images = re.findall(r"<img [^>]*>", text)
    assert len(images) == 3  # scores, validation, comparison (metric and loss in one figure)
    for tag in images:
        src = re.search(r'src="data:image/png;base64,([^"]+)"', tag)
        assert src, tag[:80]
        assert base64.b64decode(src.group(1)).startswith(PNG_MAGIC)
    assert not re.search(r'(?:src|href)="(?!data:)', text)  # nothing external


def test_report_loads_in_headless_chromium(run_dir, tmp_path):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium: pip install -e '.[test]'")
    from selenium.webdriver.chrome.service import Service

    path = report.write(run_dir)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.get(path.as_uri())
        assert driver.title == "gradex report: tiny"
        images = driver.execute_script(
            "return Array.from(document.images, i => [i.complete, i.naturalWidth, i.naturalHeight]);")
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        driver.quit()
    assert len(images) == 3 and all(done and w > 0 and h > 0 for done, w, h in images), images
    assert not severe, severe


def test_report_with_only_a_selection_names_the_missing_commands(tmp_path):
    hostile = "<b>x&y</b> $a$"  # escaped in HTML, and not mathtext in the plot
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"name": "only-select", "data": {"target": {"name": "qa"}}}))
    (tmp_path / "selection.json").write_text(json.dumps({
        "method": "forward", "scores": [-0.1, None], "selected": [hostile], "estimate": 1.2, "baseline": 1.1,
        "history": [], "reason": "forward stepwise <script>", "surrogate": None, "sources": [hostile, "web"],
        "source_scores": {hostile: -0.1, "web": None}, "mode": "linear", "worse_than_target": True,
        "seconds": 0.1, "l2": 1.0, "estimated_subsets": 3}))
    text = report.write(tmp_path).read_text(encoding="utf-8")
    assert_valid_html(text)
    assert "<title>gradex report: only-select</title>" in text
    for heading in HEADINGS:
        assert f"<h2>{heading}</h2>" in text
    for command in ("gradex finetune CONFIG", "gradex validate CONFIG", "gradex compare CONFIG"):
        assert command in text
    assert 'class="warning"' in text  # worse_than_target
    assert hostile not in text and html.escape(hostile) in text and "<script>" not in text
    assert text.count("<img ") == 1  # the scores chart, without error bars: forward samples no subsets


def test_score_errors_use_the_latest_select_call(tmp_path):
    old = [{"members": ["a"], "estimate": 100.0, "fingerprint": "old"}] * 3
    new = [{"members": m, "estimate": e, "fingerprint": "new"}
           for m, e in ((["a"], 1.0), (["a", "b"], 2.0), (["b"], 4.0), ([], 7.0), (["a"], 3.0))]
    pd.DataFrame(old + new).to_parquet(tmp_path / "estimates.parquet")
    errors, n = report.score_errors(tmp_path / "estimates.parquet", ["a", "b"])
    inside, outside = np.array([1.0, 2.0, 3.0]), np.array([4.0, 7.0])
    assert n == 5
    assert errors["a"] == pytest.approx(math.sqrt(inside.var(ddof=1) / 3 + outside.var(ddof=1) / 2))
    assert errors["b"] is not None


def assert_valid_html(text: str) -> None:
    """HTML5 doctype, a charset, and every non-void element closed in order."""
    assert text.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in text

    class Checker(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.stack: list[str] = []

        def handle_starttag(self, tag: str, attrs: list) -> None:
            if tag not in VOID:
                self.stack.append(tag)

        def handle_endtag(self, tag: str) -> None:
            assert self.stack and self.stack.pop() == tag, f"unbalanced </{tag}>"

    checker = Checker()
    checker.feed(text)
    checker.close()
    assert checker.stack == [], checker.stack
