"""Loss and task metrics of a model on a set of examples.

`loss` is the quantity GradEx estimates: the mean over examples of softplus(-u_s), the logistic
loss of the per-example output u_s (gradex.model; with the default output "ce" it equals the mean
over examples of their mean answer-token cross-entropy). `token_nll` is that cross-entropy, whatever
the output. The task metric (the target's `metric`, a `Scoring` here) is named for how it was
computed:

- exact_match: a greedy generation against the reference answer; multiple-choice rows count the
  choice with the highest length-normalized log-likelihood (summed likelihood favours short wrong
  options). With an answer pattern (`answer_pattern`, or a BIG-bench task's `output_regex`) the
  pattern's first match in the generation is compared with its first match in the reference, so a
  chain-of-thought reference "Yes. <reasons>" is compared as "Yes" (exact_match[pattern]); the
  metrics count the generations it found nothing in (`no_match`, scored wrong) and the references
  (`reference_no_match`, compared whole, as BIG-bench compares its targets).
- options: a BIG-bench task's `target_scores` options, the one with the highest length-normalized
  log-likelihood as the opening of the answer counts; right when it has the top score
  (accuracy[options by likelihood]).
- first_word: the same over the first words of the target's held-out answers, the right one being
  the word its own answer begins with (accuracy[first word by likelihood]).
The last two generate nothing, so a long chain of thought costs one forward pass per option.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from gradex.config import ConfigError, TargetConfig
from gradex.data import (Example, Tokenized, answer_pattern, batches, generated_answer, prompt_ids, target_scores,
                         tokenize, tokenize_openings)
from gradex.device import autocast, device_of, step_done
from gradex.model import example_outputs_and_nll, is_encoder_decoder, language_model


@torch.no_grad()
def outputs(model: nn.Module, tokens: Sequence[Tokenized], indices: Sequence[int], pad_id: int,
            precision: str = "bf16", output: str = "ce", batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(u_s, mean answer-token NLL) for the given examples, in the given order."""
    device = device_of(model)
    us, nlls = [], []
    for batch in batches(tokens, list(indices), batch_size, pad_id):
        with autocast(precision, device):
            u, nll = example_outputs_and_nll(model, batch.to(device), output)
        us.append(u.float().cpu())
        nlls.append(nll.float().cpu())
        step_done(device)
    return torch.cat(us), torch.cat(nlls)


def loss_from_outputs(u: torch.Tensor) -> float:
    return torch.nn.functional.softplus(-u).mean().item()


# Prompt and new tokens one generate call holds (rows x (longest prompt + max_new_tokens)). Every call
# pays each decoding step's fixed cost, so fewer, fuller calls are cheaper: the default's 100 test answers
# in one call took 0.6x the time of four calls of 32 (bf16, 2 CPU cores), with the same generations. The
# cap keeps long chains of thought to a few dozen rows a call (their cache grows with rows x length).
GENERATE_TOKENS = 8192


def generation_calls(lengths: Sequence[int], max_new_tokens: int, budget: int = GENERATE_TOKENS) -> list[list[int]]:
    """Positions into `lengths` (prompt lengths) grouped into generate calls: by length, so a call pads
    little, and as many rows a call as keep rows x (its longest prompt + max_new_tokens) within `budget`
    (one row at least)."""
    calls: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if calls and (len(calls[-1]) + 1) * (lengths[i] + max_new_tokens) <= budget:
            calls[-1].append(i)  # sorted: row i is the longest of its call so far
        else:
            calls.append([i])
    return calls


@torch.no_grad()
def generate_answers(model: nn.Module, tokenizer: Any, examples: Sequence[Example], max_new_tokens: int,
                     precision: str = "bf16", budget: int = GENERATE_TOKENS) -> list[str]:
    """Greedy answers, cut at the end marker, in the examples' order (calls: `generation_calls`). A causal
    LM continues its left-padded prompts, and its new tokens follow them; an encoder-decoder (T5) reads
    the prompts as its encoder input (right-padded) and generates decoder tokens only, after its decoder
    start token."""
    lm, device = language_model(model), device_of(model)
    seq2seq = is_encoder_decoder(lm)
    prompts = prompt_ids(tokenizer, [e.prompt for e in examples])  # formatted as the data was (gradex.data)
    pad = tokenizer.pad_token_id
    answers: list[str] = [""] * len(examples)
    for call in generation_calls([len(p) for p in prompts], max_new_tokens, budget):
        chunk = [prompts[i] for i in call]
        width = max(len(p) for p in chunk)
        if seq2seq:
            ids = torch.tensor([p + [pad] * (width - len(p)) for p in chunk], device=device)
            mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in chunk], device=device)
        else:  # left-padded, so every prompt ends where generation starts
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        with autocast(precision, device):
            out = lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                              use_cache=True, pad_token_id=pad)
        new = out[:, 1:] if seq2seq else out[:, width:]
        for i, row in zip(call, new.cpu()):
            answers[i] = generated_answer(tokenizer, row.tolist())
        step_done(device)
    return answers


@torch.no_grad()
def choose(model: nn.Module, tokenizer: Any, examples: Sequence[Example], precision: str = "bf16") -> list[str]:
    """For multiple-choice examples: the choice with the lowest mean token NLL, as a whole answer."""
    return _likeliest(model, tokenizer, examples, [e.choices for e in examples], tokenize, precision)


@torch.no_grad()
def likeliest_openings(model: nn.Module, tokenizer: Any, examples: Sequence[Example],
                       options: Sequence[Sequence[str]], precision: str = "bf16") -> list[str]:
    """Per example, the option with the lowest mean token NLL as the opening of its answer (no end
    marker after it: in "Yes. <reasons>" the answer goes on after the option)."""
    return _likeliest(model, tokenizer, examples, options, tokenize_openings, precision)


def _likeliest(model: nn.Module, tokenizer: Any, examples: Sequence[Example], options: Sequence[Sequence[str]],
               tokenizing: Any, precision: str) -> list[str]:
    """The option of each example whose tokens have the lowest mean NLL after its prompt (the first
    of equals): length-normalized log-likelihood, since a sum favours short options."""
    flat = [(i, c) for i, opts in enumerate(options) for c in opts]
    variants = [Example(examples[i].source, "test", examples[i].prompt, _prefix(examples[i]) + c) for i, c in flat]
    toks = tokenizing(tokenizer, variants)
    _, nll = outputs(model, toks, range(len(toks)), tokenizer.pad_token_id, precision)
    best: dict[int, tuple[float, str]] = {}
    for (i, c), v in zip(flat, nll.tolist()):
        if i not in best or v < best[i][0]:
            best[i] = (v, c)
    return [best[i][1] for i in range(len(examples))]


def _prefix(example: Example) -> str:
    """The whitespace the source puts before its answers (its `answer_prefix`)."""
    return example.answer[:len(example.answer) - len(example.answer.lstrip())]


def extract_answer(text: str, pattern: re.Pattern | None) -> str | None:
    """The answer a generation or a reference gives for exact match: all of it without `pattern`; else
    the pattern's first match, its group 1 when it has a group (as BIG-bench's output_regex: the first
    of re.findall), stripped; None when it finds nothing."""
    if pattern is None:
        return text.strip()
    found = pattern.search(text)
    if found is None:
        return None
    if pattern.groups:
        return (found.group(1) or "").strip()  # a group that took no part is empty, as in re.findall
    return found.group(0).strip()


def first_word(answer: str) -> str:
    """The word an answer begins with, without the punctuation after it: "Yes. because" -> "Yes"."""
    words = answer.split()
    if not words:
        return ""
    return words[0].rstrip(".,;:!?") or words[0]


FIRST_WORDS_LIMIT = 20  # first_word suits answers that open with one of a few words (Yes/No, a label)


@dataclass(frozen=True)
class Scoring:
    """How the task metric is computed: `rule` (the target's `metric`) and what it needs."""

    rule: str = "exact_match"  # exact_match | options | first_word
    pattern: str | None = None  # exact_match: the answer pattern, applied to generation and reference
    scores: Mapping[int, Mapping[str, float]] = field(default_factory=dict)  # options: target_scores by row
    words: tuple[str, ...] = ()  # first_word: the options

    @property
    def label(self) -> str:
        """The metric's name, which says how it was computed (exact_match on multiple-choice rows only
        is named `accuracy` by `evaluate`)."""
        if self.rule == "options":
            return "accuracy[options by likelihood]"
        if self.rule == "first_word":
            return "accuracy[first word by likelihood]"
        return "exact_match[pattern]" if self.pattern is not None else "exact_match"

    def options(self, example: Example) -> tuple[tuple[str, ...], set[str]]:
        """(the example's options, the right ones): target_scores' options and those with the top
        score; or the first words, and the one its answer begins with."""
        if self.rule == "options":
            scores = self.scores[example.row]
            top = max(scores.values())
            return tuple(scores), {o for o, v in scores.items() if v == top}
        return self.words, {first_word(example.answer)}


def scoring(target: TargetConfig, examples: Sequence[Example]) -> Scoring:
    """The target's Scoring (its `metric`), from its config and its prepared examples; a target whose
    data does not fit the metric is an error naming the key, raised before any fine-tune."""
    if target.metric == "options":
        return Scoring("options", scores=target_scores(target))
    if target.metric == "first_word":  # the held-out answers are the target's own (sources only train)
        words = sorted({first_word(e.answer) for e in examples if e.split != "train"})
        if len(words) > FIRST_WORDS_LIMIT:
            raise ConfigError(f"data.target.metric: first_word: the target's held-out answers begin with {len(words)} "
                              f"distinct words (e.g. {', '.join(map(repr, words[:5]))}); it suits answers that open "
                              f"with one of at most {FIRST_WORDS_LIMIT} words (Yes/No, a label): use exact_match")
        return Scoring("first_word", words=tuple(words))
    return Scoring("exact_match", pattern=answer_pattern(target))


EXACT_MATCH = Scoring()


def evaluate(model: nn.Module, tokenizer: Any, examples: Sequence[Example], tokens: Sequence[Tokenized],
             indices: Sequence[int], precision: str = "bf16", desc: str = "evaluate", output: str = "ce",
             scoring: Scoring = EXACT_MATCH) -> dict:
    """Loss, token NLL and the task metric (`scoring`, named in `metric`) on `indices`; with an answer
    pattern, `no_match` (generations it found nothing in, scored wrong) and `reference_no_match`."""
    model.eval()
    exs = [examples[i] for i in indices]
    with tqdm(total=2, desc=desc, leave=False) as bar:
        u, nll = outputs(model, tokens, indices, tokenizer.pad_token_id, precision, output)
        bar.update()
        if scoring.rule == "exact_match":
            longest = max(len(tokens[i].ids) - tokens[i].n_prompt for i in indices)
            correct, metric, extra = _exact_match(model, tokenizer, exs, longest + 1, precision, scoring.pattern)
        else:
            options = [scoring.options(e) for e in exs]
            got = likeliest_openings(model, tokenizer, exs, [o for o, _ in options], precision)
            correct, metric, extra = sum(g in right for g, (_, right) in zip(got, options)), scoring.label, {}
        bar.update()
    return {"loss": loss_from_outputs(u), "token_nll": nll.mean().item(), "metric": metric,
            "score": correct / len(exs), "examples": len(exs), **extra}


def _exact_match(model: nn.Module, tokenizer: Any, exs: Sequence[Example], max_new_tokens: int, precision: str,
                 answer_pattern: str | None) -> tuple[int, str, dict]:
    """(right answers, the metric's name, what the pattern found nothing in): free-form rows by a
    greedy generation, multiple-choice rows by the likeliest choice."""
    pattern = re.compile(answer_pattern) if answer_pattern is not None else None
    mc = [e for e in exs if e.choices]
    free = [e for e in exs if not e.choices]
    correct, extra = 0, {}
    if free:
        got = [extract_answer(g, pattern) for g in generate_answers(model, tokenizer, free, max_new_tokens, precision)]
        refs = [extract_answer(e.answer, pattern) for e in free]
        correct += sum(g is not None and g == (r if r is not None else e.answer.strip())
                       for g, r, e in zip(got, refs, free))
        if pattern is not None:
            extra = {"answer_pattern": answer_pattern, "no_match": sum(g is None for g in got),
                     "reference_no_match": sum(r is None for r in refs)}
    if mc:
        got = choose(model, tokenizer, mc, precision)
        correct += sum(g == e.answer.strip() for g, e in zip(got, mc))
    metric = "exact_match" if not mc else "accuracy" if not free else "exact_match_or_choice"
    return correct, metric + ("[pattern]" if pattern is not None and free else ""), extra
