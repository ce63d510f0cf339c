"""Examples -> tokens: plain, through a chat template, or for an encoder-decoder; prompts for
generation, the answer a generation holds, length checks, and padded batches."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

from gradex.config import ConfigError
from gradex.data.examples import END, Batch, Example, Tokenized


# gradex.model.load_tokenizer marks a tokenizer whose chat template the examples go through
# (model.chat_template: auto, and the tokenizer has one), so every caller that tokenizes with it (the
# data, multiple-choice scoring, generation) formats examples alike.
CHAT = "gradex_chat_template"
# ... and a tokenizer of an encoder-decoder model (T5), whose examples are formatted for it (`tokenize`)
ENCODER_DECODER = "gradex_encoder_decoder"


def uses_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, CHAT, False))


def for_encoder_decoder(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, ENCODER_DECODER, False))


def _ending_with_eos(tokenizer: Any, rows: list[list[int]]) -> list[list[int]]:
    """Each row as the tokenizer encoded it, with its EOS appended where the tokenizer did not end it so."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("model.name: the tokenizer of this encoder-decoder has no EOS token to end prompts and "
                          "answers with")
    return [list(r) if r and r[-1] == eos else [*r, eos] for r in rows]


def leading_special_ids(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer itself puts before a text (a Llama tokenizer's BOS; none for
    SmolLM2's GGUF tokenizer, whose bos_token <|im_start|> it never adds): its own add_special_tokens
    behaviour, without what it may append (an EOS)."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    start = next((k for k in range(len(full) - len(bare) + 1) if full[k:k + len(bare)] == bare), 0)
    return list(full[:start])


def chat_parts(tokenizer: Any, prompt: str, answer: str) -> tuple[str, str]:
    """(prompt as a user turn up to the assistant's opening, the answer and the end of its turn), as
    the tokenizer's chat template renders them: the first is what generation starts from, the
    second what the loss is on."""
    user = [{"role": "user", "content": prompt}]
    head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    whole = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": answer}], tokenize=False)
    if not whole.startswith(head) or answer not in whole[len(head):]:
        raise ConfigError("model.chat_template: auto: the tokenizer's chat template does not render the prompt "
                          "as a prefix of the conversation and the answer after it; set model.chat_template: none")
    return head, whole[len(head):]


def prompt_ids(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """The token ids generation starts from (an encoder-decoder's encoder input), formatted as `tokenize`
    formats the prompts."""
    if for_encoder_decoder(tokenizer):  # as the tokenizer encodes a text (T5: the text, then </s>)
        return _ending_with_eos(tokenizer, tokenizer(list(prompts), add_special_tokens=True)["input_ids"])
    if uses_chat_template(tokenizer):  # the template writes its own BOS, so no special tokens are added
        heads = [chat_parts(tokenizer, p, "")[0] for p in prompts]
        return tokenizer(heads, add_special_tokens=False)["input_ids"]
    bos = leading_special_ids(tokenizer)
    return [bos + ids for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]


def generated_answer(tokenizer: Any, ids: Sequence[int]) -> str:
    """The answer in generated token ids: the text up to END, or up to the end of the assistant turn (an
    encoder-decoder's decoder tokens: up to its EOS)."""
    if for_encoder_decoder(tokenizer):
        ids = list(ids)
        eos = tokenizer.eos_token_id
        ids = ids[:ids.index(eos)] if eos in ids else ids
        return tokenizer.decode(ids, skip_special_tokens=True).split(END)[0].strip()
    if not uses_chat_template(tokenizer):
        return tokenizer.decode(list(ids), skip_special_tokens=True).split(END)[0].strip()
    end = chat_parts(tokenizer, "", "\x00")[1].split("\x00", 1)[1].strip()  # e.g. <|im_end|>
    end_ids = tokenizer(end, add_special_tokens=False)["input_ids"] if end else []
    ids = list(ids)
    cut = next((k for k in range(len(ids)) if end_ids and ids[k:k + len(end_ids)] == end_ids), len(ids))
    return tokenizer.decode(ids[:cut], skip_special_tokens=True).split(END)[0].strip()


def tokenize(tokenizer: Any, examples: Sequence[Example]) -> list[Tokenized]:
    """Prompt and answer tokenized apart, so the answer boundary is exact; the answer tokens are what
    the loss is on. Plain: the tokenizer's own leading special tokens (BOS where it adds one), the
    prompt, then the answer and END. Chat template: the prompt as a user turn through the opening of
    the assistant turn, then the answer (without its answer_prefix: the turn separates them) and the
    end of the turn, which is then the end marker. Encoder-decoder (T5): the prompt, then the answer,
    each as the tokenizer encodes a text with its special tokens and ending with EOS (T5's tokenizer
    appends </s>; EOS is appended where a tokenizer does not); the prompt is the encoder's input and
    the answer the decoder's labels (gradex.model.encoder_decoder_batch), and the EOS is the end marker
    (T5's tokenizer cannot write END, a newline, which it reads as a space)."""
    if for_encoder_decoder(tokenizer):
        prompts = prompt_ids(tokenizer, [e.prompt for e in examples])
        answers = tokenizer([e.answer for e in examples], add_special_tokens=True)["input_ids"]
        answers = _ending_with_eos(tokenizer, answers)
    elif uses_chat_template(tokenizer):
        parts = [chat_parts(tokenizer, e.prompt, e.answer.strip()) for e in examples]
        prompts = tokenizer([head for head, _ in parts], add_special_tokens=False)["input_ids"]
        answers = tokenizer([tail for _, tail in parts], add_special_tokens=False)["input_ids"]
    else:
        prompts = prompt_ids(tokenizer, [e.prompt for e in examples])
        answers = tokenizer([e.answer + END for e in examples], add_special_tokens=False)["input_ids"]
    return [Tokenized(p + a, len(p)) for p, a in zip(prompts, answers)]


def tokenize_openings(tokenizer: Any, examples: Sequence[Example]) -> list[Tokenized]:
    """Each example's prompt as `tokenize` formats it, then its answer without what ends an answer (END,
    the end of the assistant turn, EOS): the tokens that score a text that only opens an answer, such as
    the "Yes" of "Yes. <reasons>". Chat template: the assistant turn up to the end of the answer text."""
    prompts = prompt_ids(tokenizer, [e.prompt for e in examples])
    if uses_chat_template(tokenizer) and not for_encoder_decoder(tokenizer):
        texts = []
        for e in examples:
            _, tail = chat_parts(tokenizer, e.prompt, e.answer.strip())
            texts.append(tail[:tail.index(e.answer.strip()) + len(e.answer.strip())])
    else:
        texts = [e.answer for e in examples]
    answers = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [Tokenized(p + a, len(p)) for p, a in zip(prompts, answers)]


def check_lengths(examples: Sequence[Example], tokens: Sequence[Tokenized], max_length: int) -> None:
    for ex, tok in zip(examples, tokens):
        if len(tok.ids) > max_length:
            raise ConfigError(f"source {ex.source!r}: {ex.origin or f'row {ex.row}'}: {len(tok.ids)} tokens is "
                              f"longer than model.max_length={max_length}; raise the limit or drop the row")
        if tok.n_prompt == 0:
            raise ConfigError(f"source {ex.source!r}: {ex.origin or f'row {ex.row}'}: empty prompt")


def collate(tokens: Sequence[Tokenized], index: Iterable[int], pad_id: int) -> Batch:
    width = max(len(t.ids) for t in tokens)
    ids = torch.full((len(tokens), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(tokens), width), dtype=torch.long)
    answer = torch.zeros((len(tokens), width), dtype=torch.bool)
    for row, t in enumerate(tokens):
        ids[row, :len(t.ids)] = torch.tensor(t.ids)
        attn[row, :len(t.ids)] = 1
        answer[row, t.n_prompt:len(t.ids)] = True
    return Batch(ids, attn, answer, torch.tensor(list(index), dtype=torch.long))


def batches(tokens: Sequence[Tokenized], indices: Sequence[int], batch_size: int, pad_id: int) -> Iterable[Batch]:
    """Batches of the given examples in the given order."""
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        yield collate([tokens[i] for i in chunk], chunk, pad_id)


