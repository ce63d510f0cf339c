"""How an example becomes tokens, per tokenizer: plain text (with the BOS a Llama-style tokenizer adds
itself, none for one that adds none) or, with model.chat_template: auto and a tokenizer that has a
chat template, a user turn and an assistant turn; the loss mask is on the answer tokens only."""

from __future__ import annotations

import pytest
import torch

from conftest import byte_tokenizer
from gradex import config
from gradex.data import (Example, collate, generated_answer, leading_special_ids, prompt_ids, tokenize,
                         uses_chat_template)
from gradex.model import load_tokenizer

EXAMPLES = [Example("add", "train", "Q: 1+2\nA:", " 3"), Example("add", "train", "Q: 10+20\nA:", " 30")]
# A chat template of the Llama-3 kind: the template writes the BOS itself and ends a turn with a token.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def llama_style_tokenizer():
    """The byte tokenizer with a BOS its post-processor puts first, as Llama tokenizers do."""
    from tokenizers import processors

    tok = byte_tokenizer()
    tok.add_special_tokens({"bos_token": "<s>"})
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    return tok


def chat_tokenizer():
    tok = byte_tokenizer()
    tok.add_special_tokens({"bos_token": "<s>", "additional_special_tokens": ["<|end|>", "<|user|>", "<|assistant|>"]})
    tok.chat_template = TEMPLATE
    return tok


def bytes_of(tok, text: str) -> list[int]:
    """The oracle for plain text: the byte tokenizer has one token per byte (the ByteLevel alphabet)."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    table = {i: alphabet.index(ch) for i, ch in enumerate(_byte_chars())}
    return [table[b] for b in text.encode()]


def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table, the ByteLevel pre-tokenizer's."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def answer_mask(tokens) -> list[list[bool]]:
    batch = collate(tokens, range(len(tokens)), pad_id=0)
    return [row[:len(t.ids)].tolist() for row, t in zip(batch.answer_mask, tokens)]


def test_plain_tokenizer_without_bos():
    tok = byte_tokenizer()
    assert leading_special_ids(tok) == [] and not uses_chat_template(tok)
    tokens = tokenize(tok, EXAMPLES)
    for e, t in zip(EXAMPLES, tokens):
        assert t.ids == bytes_of(tok, e.prompt) + bytes_of(tok, e.answer + "\n")
        assert t.n_prompt == len(e.prompt.encode())
    assert answer_mask(tokens)[0] == [False] * 9 + [True] * 3  # " 3\n"


def test_llama_style_tokenizer_gets_its_bos_first():
    tok = llama_style_tokenizer()
    assert tok("x")["input_ids"][0] == tok.bos_token_id  # what the tokenizer does itself
    assert leading_special_ids(tok) == [tok.bos_token_id]
    tokens = tokenize(tok, EXAMPLES)
    for e, t in zip(EXAMPLES, tokens):
        assert t.ids == [tok.bos_token_id] + bytes_of(tok, e.prompt) + bytes_of(tok, e.answer + "\n")
        assert t.n_prompt == 1 + len(e.prompt.encode())
    assert prompt_ids(tok, [EXAMPLES[0].prompt]) == [tokens[0].ids[:tokens[0].n_prompt]]  # generation starts alike


@pytest.mark.parametrize("mode", ["auto", "none"])
def test_chat_template_on_and_off(tmp_path, mode):
    chat_tokenizer().save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(config.ModelConfig(name=str(tmp_path / "tok"), chat_template=mode))
    tokens = tokenize(tok, EXAMPLES)
    if mode == "none":  # the template is ignored: plain text, no BOS (this tokenizer adds none itself)
        assert not uses_chat_template(tok)
        assert [t.ids for t in tokens] == [bytes_of(tok, e.prompt) + bytes_of(tok, e.answer + "\n") for e in EXAMPLES]
        return
    assert uses_chat_template(tok)
    special = {s: tok.convert_tokens_to_ids(s) for s in ("<s>", "<|user|>", "<|end|>", "<|assistant|>")}
    for e, t in zip(EXAMPLES, tokens):
        want_prompt = [special["<s>"], special["<|user|>"], *bytes_of(tok, e.prompt), special["<|end|>"],
                       special["<|assistant|>"]]
        want_answer = [*bytes_of(tok, e.answer.strip()), special["<|end|>"]]  # the turn ends the answer
        assert t.ids == want_prompt + want_answer and t.n_prompt == len(want_prompt)
    assert answer_mask(tokens)[0] == [False] * (len(EXAMPLES[0].prompt) + 4) + [True] * 2  # "3", <|end|>
    assert prompt_ids(tok, [e.prompt for e in EXAMPLES]) == [t.ids[:t.n_prompt] for t in tokens]
    generated = tokens[1].ids[tokens[1].n_prompt:] + bytes_of(tok, "more") + [special["<|end|>"]]
    assert generated_answer(tok, generated) == "30"  # cut at the end of the assistant turn


def test_a_template_that_hides_the_prompt_is_an_error(tmp_path):
    from gradex.config import ConfigError

    tok = chat_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    tok.gradex_chat_template = True
    with pytest.raises(ConfigError, match="set model.chat_template: none"):
        tokenize(tok, EXAMPLES)


@pytest.mark.slow
def test_the_default_model_keeps_its_plain_tokens():
    """The embedded default (SmolLM2-135M-Instruct, whose GGUF tokenizer has a chat template and a
    bos_token it never adds) sets chat_template: none: its tokens are the raw encodings of prompt and
    answer, as every measured result had them; auto would wrap them in the template."""
    cfg = config.load(None)
    assert cfg.model.chat_template == "none"
    tok = load_tokenizer(cfg.model)
    assert tok.chat_template and leading_special_ids(tok) == []
    plain = [tok(e.prompt, add_special_tokens=False)["input_ids"] + tok(e.answer + "\n", add_special_tokens=False)["input_ids"]
             for e in EXAMPLES]
    assert [t.ids for t in tokenize(tok, EXAMPLES)] == plain
    cfg.model.chat_template = "auto"
    chat = tokenize(load_tokenizer(cfg.model), EXAMPLES)
    assert tok.decode(chat[0].ids[:chat[0].n_prompt]).endswith("<|im_start|>user\nQ: 1+2\nA:<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(chat[0].ids[chat[0].n_prompt:]) == "3<|im_end|>\n"
    assert torch.tensor(chat[0].ids).numel() > len(plain[0])
