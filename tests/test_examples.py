"""The packaged strategyqa example: it loads, validates and prepares, and its documented overrides load."""

from __future__ import annotations

import io
import json
import random
import re
import shlex
import tarfile

from gradex import config, pipeline
from gradex.cli import EXAMPLES
from gradex.evaluate import extract_answer

STRATEGYQA = EXAMPLES["strategyqa"]  # what `gradex run --example strategyqa` loads
STRATEGYQA_QUESTIONS = 2290  # examples in BIG-bench strategyqa (bigbench==1.0.0)


def documented_overrides() -> list[str]:
    """The `--set KEY=VALUE` items of the GPU command in the example's comments."""
    lines = [line.lstrip("# ").rstrip("\\ ") for line in STRATEGYQA.read_text().splitlines()
             if line.startswith("#") and "--set" in line]
    words = shlex.split(" ".join(lines))
    return [words[i + 1] for i, w in enumerate(words) if w == "--set"]


def test_strategyqa_example_loads_as_documented():
    cfg = config.load(STRATEGYQA)
    t = cfg.data.target
    assert (t.bigbench, t.train, t.validation, t.test) == ("strategyqa", 480, 96, 200)
    c = cfg.data.clusters
    assert (c.from_, c.k, c.features) == ("target_train", 16, "gradients") and cfg.data.sources == []
    assert "dsir" in cfg.compare.baselines
    pattern = re.compile(t.answer_pattern)
    assert extract_answer("Yes. Frost is common in December.", pattern) == "Yes"
    assert extract_answer("No. The Spice Girls had five members.", pattern) == "No"
    assert extract_answer("Maybe. Nobody knows.", pattern) is None
    assert extract_answer("Nobody. It is No.", pattern) is None  # only a leading Yes/No word counts
    # a reference answer as prepare stores it, after its answer_prefix (the pattern may read it too)
    assert extract_answer(" No. Hydrogen's atomic number is one.", pattern) == "No"
    # the paper's sizes for a GPU, as the comment gives them: they load and use the whole task
    overrides = documented_overrides()
    gpu = config.load(STRATEGYQA, overrides)
    assert gpu.model.name == "google/flan-t5-base" and gpu.data.clusters.k == 100
    g = gpu.data.target
    assert g.train + g.validation + g.test == STRATEGYQA_QUESTIONS and g.train >= gpu.data.clusters.k


def fake_strategyqa(cache, n: int = 40) -> None:
    """A stand-in bigbench sdist holding a `strategyqa` task of n questions in its format."""
    rng = random.Random(0)
    examples = []
    for i in range(n):
        answer = rng.choice(["Yes", "No"])
        examples.append({"input": f"Is thing {i} bigger than thing {i + 1}?",
                         "target_scores": {"Yes": int(answer == "Yes"), "No": int(answer == "No")},
                         "target": f"{answer}. Thing {i} measures {rng.randint(1, 9)} units."})
    body = json.dumps({"name": "strategyqa", "examples": examples}).encode()
    (cache / "downloads" / "bigbench").mkdir(parents=True)
    with tarfile.open(cache / "downloads" / "bigbench" / "bigbench-1.0.0.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("bigbench-1.0.0/bigbench/benchmark_tasks/strategyqa/task.json")
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))


def test_strategyqa_example_prepares(tmp_path, tiny_model_dir, monkeypatch):
    """prepare on a small stand-in of the task (the real sdist is 358 MB), sizes scaled down: every
    split is there, each answer is " Yes. ..." or " No. ...", and the clusters fit the train split."""
    fake_strategyqa(tmp_path / "cache")
    monkeypatch.setenv("GRADEX_CACHE", str(tmp_path / "cache"))
    cfg = config.load(STRATEGYQA, [f"runs_dir={tmp_path / 'runs'}", f"model.name={tiny_model_dir}",
                                   "model.max_length=128", "data.target.train=16", "data.target.validation=8",
                                   "data.target.test=8", "data.clusters.k=4"])
    run = pipeline.prepare(cfg)
    splits = [e.split for e in run.examples]
    assert {s: splits.count(s) for s in set(splits)} == {"train": 16, "validation": 8, "test": 8}
    assert all(e.prompt.startswith("Q: Is thing") and e.prompt.endswith("\nA:") for e in run.examples)
    assert all(re.match(r" (Yes|No)\. Thing \d+ measures", e.answer) for e in run.examples)
    pattern = re.compile(cfg.data.target.answer_pattern)
    assert all(extract_answer(e.answer, pattern) == e.answer.split(".")[0].strip() for e in run.examples)
    assert run.sources == []  # until the clusters stage has run: the target alone
