"""Loss and task metrics of a model on a set of examples.

`loss` is the quantity GradEx estimates: the mean over examples of softplus(-u_s), the logistic
loss of the per-example output u_s (gradex.model; with the default output "ce" it equals the mean
over examples of their mean answer-token cross-entropy). `token_nll` is that cross-entropy, whatever
the output. The task metric is exact match of a greedy generation for
free-form answers, and length-normalized log-likelihood for multiple choice (summed likelihood
favours short wrong options). With an answer pattern (a source's `answer_pattern`, or a BIG-bench
task's `output_regex`) exact match compares the pattern's first match in the generation with the
reference answer, and the metrics count the generations it found nothing in (`no_match`).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from gradex.data import Example, Tokenized, batches, generated_answer, prompt_ids, tokenize
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


@torch.no_grad()
def generate_answers(model: nn.Module, tokenizer: Any, examples: Sequence[Example], max_new_tokens: int,
                     precision: str = "bf16", batch_size: int = 32) -> list[str]:
    """Greedy answers, cut at the end marker. A causal LM continues its left-padded prompts, and its new
    tokens follow them; an encoder-decoder (T5) reads the prompts as its encoder input (right-padded)
    and generates decoder tokens only, after its decoder start token."""
    lm, device = language_model(model), device_of(model)
    seq2seq = is_encoder_decoder(lm)
    prompts = prompt_ids(tokenizer, [e.prompt for e in examples])  # formatted as the data was (gradex.data)
    pad = tokenizer.pad_token_id
    answers: list[str] = []
    for start in range(0, len(examples), batch_size):
        chunk = prompts[start:start + batch_size]
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
        answers += [generated_answer(tokenizer, row.tolist()) for row in new.cpu()]
        step_done(device)
    return answers


@torch.no_grad()
def choose(model: nn.Module, tokenizer: Any, examples: Sequence[Example], precision: str = "bf16") -> list[str]:
    """For multiple-choice examples: the choice with the lowest mean token NLL."""
    flat = [(i, c) for i, e in enumerate(examples) for c in e.choices]
    variants = [Example(examples[i].source, "test", examples[i].prompt, _prefix(examples[i]) + c) for i, c in flat]
    toks = tokenize(tokenizer, variants)
    _, nll = outputs(model, toks, range(len(toks)), tokenizer.pad_token_id, precision)
    best: dict[int, tuple[float, str]] = {}
    for (i, c), v in zip(flat, nll.tolist()):
        if i not in best or v < best[i][0]:
            best[i] = (v, c)
    return [best[i][1] for i in range(len(examples))]


def _prefix(example: Example) -> str:
    """The whitespace the source puts before its answers (its `answer_prefix`)."""
    return example.answer[:len(example.answer) - len(example.answer.lstrip())]


def extract_answer(generation: str, pattern: re.Pattern | None) -> str | None:
    """The answer a generation gives for exact match: all of it without `pattern`; else the pattern's
    first match, its group 1 when it has a group (as BIG-bench's output_regex: the first of
    re.findall), stripped; None when it finds nothing. Only generations go through here: BIG-bench
    compares the extracted text with the targets as they are."""
    if pattern is None:
        return generation.strip()
    found = pattern.search(generation)
    if found is None:
        return None
    if pattern.groups:
        return (found.group(1) or "").strip()  # a group that took no part is empty, as in re.findall
    return found.group(0).strip()


def evaluate(model: nn.Module, tokenizer: Any, examples: Sequence[Example], tokens: Sequence[Tokenized],
             indices: Sequence[int], precision: str = "bf16", desc: str = "evaluate", output: str = "ce",
             answer_pattern: str | None = None) -> dict:
    """Loss, token NLL and the task metric (exact match or multiple-choice accuracy) on `indices`;
    with `answer_pattern`, exact match on what it extracts, and `no_match`, the generations it found
    nothing in (scored wrong)."""
    pattern = re.compile(answer_pattern) if answer_pattern is not None else None
    no_match = 0
    model.eval()
    with tqdm(total=2, desc=desc, leave=False) as bar:
        u, nll = outputs(model, tokens, indices, tokenizer.pad_token_id, precision, output)
        bar.update()
        exs = [examples[i] for i in indices]
        mc = [e for e in exs if e.choices]
        free = [e for e in exs if not e.choices]
        correct = 0
        if free:
            longest = max(len(tokens[i].ids) - tokens[i].n_prompt for i in indices)
            got = [extract_answer(g, pattern) for g in generate_answers(model, tokenizer, free, longest + 1, precision)]
            no_match = sum(g is None for g in got)
            correct += sum(g == e.answer.strip() for g, e in zip(got, free))
        if mc:
            got = choose(model, tokenizer, mc, precision)
            correct += sum(g == e.answer.strip() for g, e in zip(got, mc))
        bar.update()
    metric = "exact_match" if not mc else "accuracy" if not free else "exact_match_or_choice"
    result = {"loss": loss_from_outputs(u), "token_nll": nll.mean().item(), "metric": metric,
              "score": correct / len(exs), "examples": len(exs)}
    if pattern is not None and free:
        result.update(answer_pattern=answer_pattern, no_match=no_match)
    return result
