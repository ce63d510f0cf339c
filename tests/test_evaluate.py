"""The task metric on chain-of-thought answers ("Yes. <reasons>"): the answer pattern applied to the
generation and the reference alike, and options or first words scored by likelihood, against
hand-computed log-likelihoods; its name wherever accuracy is shown beside the loss."""

from __future__ import annotations

import io
import json
import re
import tarfile

import pytest
import torch

from conftest import byte_tokenizer, tiny_llama, tiny_run_config
from gradex import config, data, pipeline
from gradex import evaluate as ev
from gradex.config import ConfigError
from gradex.data import Example


def cot(prompt: str, answer: str, row: int = 0, split: str = "test") -> Example:
    return Example("cot", split, prompt, " " + answer, (), row)


def opening_nll(model, tok, prompt: str, text: str) -> float:
    """The oracle: mean negative log-likelihood of `text`'s tokens right after `prompt`, from the
    model's own logits over the whole sequence, in float64 (no end marker after the text)."""
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    a = tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([p + a])).logits[0].double(), dim=-1)
    return float(-sum(logp[len(p) + j - 1, t] for j, t in enumerate(a)) / len(a))


def oracle_choices(model, tok, exs, options) -> list[str]:
    """Per example, the option with the lowest mean NLL (the first of equals)."""
    out = []
    for e, opts in zip(exs, options):
        nll = [opening_nll(model, tok, e.prompt, " " + o) for o in opts]
        out.append(opts[min(range(len(opts)), key=nll.__getitem__)])
    return out


def test_answer_pattern_is_applied_to_generation_and_reference(monkeypatch):
    exs = [cot("Is 3 odd?", "Yes. 3 is odd.", 1), cot("Is 4 odd?", "No. 4 is even.", 2),
           cot("Is 5 odd?", "Yes. 5 is 2*2+1.", 3), cot("Is 6 odd?", "Because 6 is even.", 4)]
    generations = ["Yes, it is.", "Yes. 4 is odd", "I think so", "Because 6 is even."]
    monkeypatch.setattr(ev, "generate_answers", lambda *args, **kwargs: list(generations))
    tok = byte_tokenizer()
    model = tiny_llama(len(tok))
    tokens = data.tokenize(tok, exs)
    got = ev.evaluate(model, tok, exs, tokens, range(4), "fp32", scoring=ev.Scoring(pattern=r"(Yes|No)"))
    # by hand: Yes = Yes (right); Yes != No; no answer in "I think so" (wrong, counted); the 4th reference
    # holds no Yes/No, so it is compared whole, and the generation's extraction (none) cannot match it
    assert got["metric"] == "exact_match[pattern]" and got["score"] == pytest.approx(1 / 4)
    assert got["no_match"] == 2 and got["reference_no_match"] == 1 and got["answer_pattern"] == "(Yes|No)"
    # without a pattern: the whole generation against the whole reference
    plain = ev.evaluate(model, tok, exs, tokens, range(4), "fp32")
    assert plain["metric"] == "exact_match" and plain["score"] == pytest.approx(1 / 4) and "no_match" not in plain
    assert ev.extract_answer(" Yes. because", re.compile(r"(Yes|No)")) == "Yes"


def test_options_by_likelihood_match_hand_computed_log_likelihoods():
    tok = byte_tokenizer()
    model = tiny_llama(len(tok), seed=3).eval()
    prompts = ["Is 3 odd?", "Can a pear sink?", "Is 2+2 4?", "Is ice hot?", "Do cats bark?", "Is 9 > 7?",
               "Is the sky green?", "Are owls birds?"]
    exs = [cot(p, ("Yes" if i % 2 else "No") + ". Because.", i + 1) for i, p in enumerate(prompts)]
    scores = {}
    for i in range(len(prompts)):
        if i % 3 == 0:  # two right answers: either counts
            scores[i + 1] = {"Yes": 1.0, "Probably": 1.0, "No": 0.0}
        else:
            scores[i + 1] = {"Yes": float(i % 2), "No": float(1 - i % 2)}
    scoring = ev.Scoring("options", scores=scores)
    options = [tuple(scores[e.row]) for e in exs]
    want = oracle_choices(model, tok, exs, options)
    assert ev.likeliest_openings(model, tok, exs, options, "fp32") == want
    accuracy = sum(scores[e.row][w] == max(scores[e.row].values()) for e, w in zip(exs, want)) / len(exs)
    got = ev.evaluate(model, tok, exs, data.tokenize(tok, exs), range(len(exs)), "fp32", scoring=scoring)
    assert got["metric"] == "accuracy[options by likelihood]" and got["score"] == pytest.approx(accuracy)
    # the option is scored as the opening of the answer: the prompt, then the option, no end marker
    opened = data.tokenize_openings(tok, [Example("cot", "test", "Is 3 odd?", " Yes")])[0]
    assert opened.ids == tok("Is 3 odd?")["input_ids"] + tok(" Yes")["input_ids"] and opened.n_prompt == 9
    # and its mean token NLL, which the choice ranks by, is the oracle's
    _, nll = ev.outputs(model, [opened], [0], tok.pad_token_id, "fp32")
    assert nll.item() == pytest.approx(opening_nll(model, tok, "Is 3 odd?", " Yes"), rel=1e-5)


def test_an_opening_is_the_whole_answer_without_its_end_marker_in_every_layout():
    """Plain text (END), a chat template (the end of the assistant turn) and an encoder-decoder's
    answer (EOS): the opening is what `tokenize` makes of the same answer, less what ends it."""
    from test_chat_template import chat_tokenizer

    exs = [cot("Is 3 odd?", "Yes"), cot("Can a pear sink?", "No")]
    plain = byte_tokenizer()
    chat = chat_tokenizer()
    setattr(chat, data.CHAT, True)
    seq2seq = byte_tokenizer()
    setattr(seq2seq, data.ENCODER_DECODER, True)
    for tok, end in ((plain, plain(data.END)["input_ids"]), (chat, chat("<|end|>")["input_ids"]),
                     (seq2seq, [seq2seq.eos_token_id])):
        for whole, opening in zip(data.tokenize(tok, exs), data.tokenize_openings(tok, exs)):
            assert whole.ids == opening.ids + end and whole.n_prompt == opening.n_prompt


def test_first_word_by_likelihood_over_the_held_out_answers_first_words():
    tok = byte_tokenizer()
    model = tiny_llama(len(tok), seed=5).eval()
    exs = [cot(f"Is {i} odd?", f"{'Yes' if i % 2 else 'No'}. {i} is {'odd' if i % 2 else 'even'}.", i + 1)
           for i in range(6)]
    exs.append(cot("Train only?", "Maybe. a train answer", 7, split="train"))  # not an option: train only
    target = config.TargetConfig(name="cot", path="cot.jsonl", metric="first_word")
    scoring = ev.scoring(target, exs)
    assert scoring.words == ("No", "Yes") and scoring.label == "accuracy[first word by likelihood]"
    held = exs[:6]
    want = oracle_choices(model, tok, held, [("No", "Yes")] * len(held))
    accuracy = sum(w == ev.first_word(e.answer) for e, w in zip(held, want)) / len(held)
    got = ev.evaluate(model, tok, held, data.tokenize(tok, held), range(len(held)), "fp32", scoring=scoring)
    assert got["metric"] == "accuracy[first word by likelihood]" and got["score"] == pytest.approx(accuracy)
    assert ev.first_word(" Yes. because") == "Yes" and ev.first_word("-12") == "-12" and ev.first_word("...") == "..."
    many = [cot(f"q{i}", f"w{i} more", i) for i in range(25)]
    with pytest.raises(ConfigError, match=r"data.target.metric: first_word: .* 25 distinct words"):
        ev.scoring(target, many)


def test_the_metric_key_is_checked_and_named():
    raw = {"data": {"target": {"name": "t", "path": "t.jsonl", "metric": "accuracy"},
                    "sources": [{"name": "s", "path": "s.jsonl"}]}}
    with pytest.raises(ConfigError, match=r"data.target.metric: 'accuracy' is not one of \['exact_match', "
                                          r"'options', 'first_word'\]"):
        config.from_dict(raw)
    raw["data"]["target"]["metric"] = "options"
    with pytest.raises(ConfigError, match="data.target.metric: options scores a BIG-bench task's target_scores"):
        config.from_dict(raw)
    # the metric is read when evaluating: it leaves prepare's inputs as they were
    raw["data"]["target"]["metric"] = "first_word"
    assert "metric" not in config.prepare_part(config.from_dict(raw).data)["target"]


def test_strategyqa_references_agree_under_every_metric(real_bigbench):
    """The real BIG-bench strategyqa: answers "Yes. <reasons>" / "No. <reasons>" beside target_scores
    {Yes, No}; the pattern's extraction, the first word and the top-scored option are the same answer."""
    src = config.SourceConfig(name="sqa", bigbench="strategyqa")
    scores = data.target_scores(src)
    assert len(scores) == 2290 and all(set(s) == {"Yes", "No"} and sorted(s.values()) == [0, 1]
                                       for s in scores.values())
    raw = {"data": {"target": {"name": "sqa", "bigbench": "strategyqa", "train": 40, "validation": 30, "test": 30},
                    "clusters": {"from": "target_train", "k": 2}}}
    examples = data.load_examples(config.from_dict(raw))
    options = ev.Scoring("options", scores=scores)
    pattern = re.compile(r"(Yes|No)")
    for e in examples:
        _, right = options.options(e)
        assert right == {ev.first_word(e.answer)} == {ev.extract_answer(e.answer, pattern)}, e.origin
    target = config.from_dict(raw).data.target
    target.metric = "first_word"
    assert ev.scoring(target, examples).words == ("No", "Yes")


@pytest.fixture()
def cot_bigbench(tmp_path, monkeypatch) -> None:
    """A cache holding a stand-in for the bigbench sdist with one strategyqa-shaped task, short enough
    for the tiny model."""
    examples = [{"input": f"Is {i} odd?", "target": f"{'Yes' if i % 2 else 'No'}. {i} is {'odd' if i % 2 else 'even'}.",
                 "target_scores": {"Yes": i % 2, "No": 1 - i % 2}} for i in range(40)]
    cache = tmp_path / "cache"
    (cache / "downloads" / "bigbench").mkdir(parents=True)
    with tarfile.open(cache / "downloads" / "bigbench" / "bigbench-1.0.0.tar.gz", "w:gz") as tar:
        body = json.dumps({"name": "oddqa", "examples": examples}).encode()
        info = tarfile.TarInfo("bigbench-1.0.0/bigbench/benchmark_tasks/oddqa/task.json")
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    monkeypatch.setenv("GRADEX_CACHE", str(cache))


def test_options_metric_through_a_whole_run(tmp_path, tiny_model_dir, cot_bigbench):
    """A chain-of-thought BIG-bench target scored by its target_scores: the final model's test accuracy
    is the oracle's, and the metric's name is in final/metrics.json, compare.json, the summary and
    report.html."""
    from gradex.cli import format_summary
    from gradex.saved import load_model

    cfg = tiny_run_config(tmp_path, tiny_model_dir)
    cfg.model.max_length = 40
    cfg.data.target = config.TargetConfig(name="odd", bigbench="oddqa", train=12, validation=8, test=10,
                                          metric="options")
    cfg.compare.baselines = ["all", "target"]
    config.validate(cfg)
    summary = pipeline.run_all(cfg)
    name = "accuracy[options by likelihood]"
    final = json.loads((cfg.run_dir / "final" / "metrics.json").read_text())
    assert final["test"]["metric"] == name and final["validation"]["metric"] == name
    run = pipeline.Run(cfg)
    model = load_model(cfg.model, cfg.run_dir / "final" / "selected").eval()
    tok = run.tokenizer
    test = [run.examples[i] for i in run.indices("test")]
    want = oracle_choices(model, tok, test, [("Yes", "No")] * len(test))
    accuracy = sum(w == e.answer.split(".")[0].strip() for e, w in zip(test, want)) / len(test)
    assert final["test"]["score"] == pytest.approx(accuracy)
    compare = summary["compare"]
    assert compare["metric"] == name and all("test_score" in r and "test_loss" in r for r in compare["rows"])
    text = format_summary(summary)
    assert f"test {name} {final['test']['score']:.3f}" in text and f"{name} (sd)" in text
    assert name in (cfg.run_dir / "report.html").read_text()
    # a changed metric re-evaluates (a new fine-tune key), it does not re-prepare
    keys = {pipeline.finetune_key(run, [], 0)}
    cfg.data.target.metric = "exact_match"
    rows = {r["stage"]: r for r in pipeline.status(cfg)}
    assert rows["prepare"]["state"] == "done"
    assert pipeline.finetune_key(pipeline.Run(cfg), [], 0) not in keys


def test_generation_calls_group_by_length_within_the_token_budget():
    lengths = [5, 12, 3, 12, 7, 40]
    calls = ev.generation_calls(lengths, max_new_tokens=4, budget=48)
    assert sorted(i for c in calls for i in c) == list(range(len(lengths)))  # every row once
    for call in calls:  # within the budget, unless a row alone exceeds it
        assert len(call) == 1 or len(call) * (max(lengths[i] for i in call) + 4) <= 48
    assert calls == [[2, 0, 4], [1, 3], [5]]  # by length: 3, 5, 7 (3 x 11 = 33), 12, 12 (2 x 16), 40 alone


def test_generations_in_one_call_equal_each_prompt_generated_alone():
    """The oracle: each prompt generated on its own (no padding, one call each). Prompts of many lengths
    in few calls, left-padded and reordered by length, come back the same and in the examples' order."""
    tok = byte_tokenizer()
    model = tiny_llama(len(tok)).eval()
    examples = [cot(p, "Yes.") for p in ("Q: zebra 91?\nA:", "Hello", "Q: {}[]() a much longer prompt, this one?\nA:",
                                          "what!", "Q: 7*8?\nA:", "no")]
    alone = [ev.generate_answers(model, tok, [e], 6, precision="fp32", budget=1)[0] for e in examples]
    assert len(set(alone)) > 1  # the prompts lead to different generations: the order is tested
    assert ev.generate_answers(model, tok, examples, 6, precision="fp32") == alone
    assert ev.generate_answers(model, tok, examples, 6, precision="fp32", budget=120) == alone
