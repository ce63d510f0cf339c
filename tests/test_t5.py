"""Encoder-decoder models (T5, FLAN-T5): a tiny T5 and a real T5 tokenizer, built from config objects.

answer_logits against the model's own forward, per-example gradients by hooks against the autograd
loop (LoRA and full fine-tuning), projection, the representation baseline, generation, and a whole
run (prepare, meta-train, gradients, select, fine-tune, evaluate) with its adapter loaded back by peft.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import byte_tokenizer, tiny_run_config, trained_like
from gradex import config, pipeline
from gradex.config import ConfigError, LoraConfig, ModelConfig, TrainConfig
from gradex.data import ENCODER_DECODER, Example, collate, generated_answer, prompt_ids, tokenize
from gradex.gradients import GradientComputer, make_projector
from gradex.model import (answer_logits, encoder_decoder_batch, example_outputs, is_encoder_decoder, language_model,
                          load_base, load_tokenizer, make_trainable, trainable)
from gradex.saved import load_model, save_model

T5_LORA = ["q", "k", "v", "o"]
CHARS = "0123456789+-*=:QA"


def t5_tokenizer():
    """transformers' T5 tokenizer (a sentencepiece Unigram model, </s> appended to every text) over a
    small vocabulary: T5's special tokens, then the characters the tests' examples use, alone and
    after the word-start mark."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -1.0) for c in CHARS] + [("\u2581" + c, -0.5) for c in CHARS]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_t5(vocab_size: int, seed: int = 0, kind: str = "t5", scaled: bool = True, pad: int = 0, eos: int = 1):
    """A 2-layer T5 (d_model 32), with T5's conventions: the decoder starts from the pad token. `scaled`
    False is T5 v1.1 / FLAN-T5 (tie_word_embeddings: false in its config: no rescaling before the head)."""
    import transformers

    config_class, model_class = {"t5": ("T5Config", "T5ForConditionalGeneration"),
                                 "mt5": ("MT5Config", "MT5ForConditionalGeneration"),
                                 "umt5": ("UMT5Config", "UMT5ForConditionalGeneration")}[kind]
    torch.manual_seed(seed)
    cfg = getattr(transformers, config_class)(
        vocab_size=vocab_size, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, dropout_rate=0.0,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, pad_token_id=pad, eos_token_id=eos,
        decoder_start_token_id=pad, **({} if scaled else {"tie_word_embeddings": False}))
    return getattr(transformers, model_class)(cfg)


@pytest.fixture(scope="module")
def tiny_t5_dir(tmp_path_factory) -> Path:
    """A tiny T5 + its T5 tokenizer saved like any Hugging Face model directory."""
    out = tmp_path_factory.mktemp("tiny-t5")
    tok = t5_tokenizer()
    tiny_t5(len(tok), pad=tok.pad_token_id, eos=tok.eos_token_id).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def t5_cfg(tiny_t5_dir: Path, finetune: str = "lora") -> ModelConfig:
    return ModelConfig(name=str(tiny_t5_dir), finetune=finetune, lora=LoraConfig(r=4, alpha=8, target_modules=T5_LORA))


EXAMPLES = [Example("t", "train", "Q: 3+4=", " 7"), Example("t", "train", "12*3=", " 36"),
            Example("t", "train", "9-15=", " -6"), Example("t", "train", "1+1=", " 2"),
            Example("t", "train", "QA: 88-80=", " 8")]


def mixed_batch(tok, examples=EXAMPLES):
    """A padded batch whose rows differ in prompt and in answer length."""
    tokens = tokenize(tok, examples)
    assert len({t.n_prompt for t in tokens}) > 2 and len({len(t.ids) - t.n_prompt for t in tokens}) > 1
    return collate(tokens, range(len(tokens)), tok.pad_token_id), tokens


# ---------------------------------------------------------------------------- tokens

def test_examples_are_tokenized_for_the_encoder_and_the_decoder(tiny_t5_dir):
    tok = load_tokenizer(t5_cfg(tiny_t5_dir))
    assert getattr(tok, ENCODER_DECODER) and not getattr(tok, "gradex_chat_template")
    tokens = tokenize(tok, EXAMPLES)
    for e, t in zip(EXAMPLES, tokens):  # each part as the T5 tokenizer encodes it, with its </s>
        assert t.ids[:t.n_prompt] == tok(e.prompt)["input_ids"] and t.ids[t.n_prompt - 1] == tok.eos_token_id
        assert t.ids[t.n_prompt:] == tok(e.answer)["input_ids"] and t.ids[-1] == tok.eos_token_id
    assert prompt_ids(tok, [e.prompt for e in EXAMPLES]) == [t.ids[:t.n_prompt] for t in tokens]
    answer = tokens[1].ids[tokens[1].n_prompt:]
    assert generated_answer(tok, answer + tok(" 5")["input_ids"]) == "36"  # cut at the first EOS
    assert generated_answer(tok, answer[:-1]) == "36"  # or at the end of what was generated
    # a tokenizer that adds no EOS of its own gets one after the prompt and after the answer
    plain = byte_tokenizer()
    setattr(plain, ENCODER_DECODER, True)
    t = tokenize(plain, EXAMPLES[:1])[0]
    eos = plain.eos_token_id
    assert t.ids == [*plain("Q: 3+4=")["input_ids"], eos, *plain(" 7")["input_ids"], eos] and t.n_prompt == 8


def test_layout_conversion(tiny_t5_dir):
    tok = load_tokenizer(t5_cfg(tiny_t5_dir))
    batch, tokens = mixed_batch(tok)
    lm = load_base(t5_cfg(tiny_t5_dir))
    s = encoder_decoder_batch(lm, batch)
    for row, t in enumerate(tokens):
        prompt, answer = t.ids[:t.n_prompt], t.ids[t.n_prompt:]
        assert s.input_ids[row, :len(prompt)].tolist() == prompt and s.attention_mask[row].sum() == len(prompt)
        assert (s.input_ids[row, len(prompt):] == tok.pad_token_id).all()
        assert s.labels[row, :len(answer)].tolist() == answer and s.label_mask[row].sum() == len(answer)
        start = lm.config.decoder_start_token_id
        assert s.decoder_input_ids[row, :len(answer)].tolist() == [start, *answer[:-1]]


# ---------------------------------------------------------------------------- the oracle: the model's own forward

@pytest.mark.parametrize("kind,scaled", [("t5", True), ("t5", False), ("mt5", False), ("umt5", True)])
def test_answer_logits_equal_the_models_own_forward(kind, scaled):
    """On a padded batch of mixed lengths: the logits the model's forward(input_ids, attention_mask,
    labels) gives at the answer positions, on the batch and on each example alone."""
    tok = t5_tokenizer()
    setattr(tok, ENCODER_DECODER, True)
    batch, tokens = mixed_batch(tok)
    model = tiny_t5(len(tok), kind=kind, scaled=scaled).eval()
    with torch.no_grad():
        logits, targets, rows = answer_logits(model, batch)
        width = max(t.n_prompt for t in tokens)
        a_len = max(len(t.ids) - t.n_prompt for t in tokens)
        ids = torch.tensor([t.ids[:t.n_prompt] + [0] * (width - t.n_prompt) for t in tokens])
        mask = (torch.arange(width)[None] < torch.tensor([t.n_prompt for t in tokens])[:, None]).long()
        labels = torch.tensor([t.ids[t.n_prompt:] + [-100] * (a_len - len(t.ids) + t.n_prompt) for t in tokens])
        want = model(input_ids=ids, attention_mask=mask, labels=labels).logits[labels != -100]
        alone = torch.cat([model(input_ids=torch.tensor([t.ids[:t.n_prompt]]),
                                 labels=torch.tensor([t.ids[t.n_prompt:]])).logits[0] for t in tokens])
    assert logits.dtype == torch.float32 and want.abs().max() > 3
    assert targets.tolist() == labels[labels != -100].tolist()
    assert rows.tolist() == [r for r, t in enumerate(tokens) for _ in t.ids[t.n_prompt:]]
    scale = want.abs().max().item()
    assert (logits - want).abs().max().item() <= 1e-6 * scale
    assert (logits - alone).abs().max().item() <= 1e-6 * scale


# ---------------------------------------------------------------------------- per-example gradients

def assert_grads_close(a: dict, b: dict, rtol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        scale = b[name].abs().max().item()
        assert scale > 0, f"{name}: reference gradient is zero"
        err = (a[name] - b[name]).abs().max().item()
        assert err <= rtol * scale, f"{name}: max error {err:.2e} vs scale {scale:.2e}"


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_hooks_equal_autograd_loop(tiny_t5_dir, finetune):
    """Hooks on every trainable linear of encoder and decoder, one batched backward, against one
    autograd.grad per example alone (no padding): padding and batchmates change nothing."""
    cfg = t5_cfg(tiny_t5_dir, finetune)
    tok = load_tokenizer(cfg)
    model = trained_like(make_trainable(load_base(cfg), cfg))
    batch, _ = mixed_batch(tok)
    fast = GradientComputer(model)
    assert fast.method == "hooks"
    names = {m: n for n, m in language_model(model).named_modules()}
    assert {names[m].split(".")[0] for m in fast.hooked} == {"encoder", "decoder"}
    grads, u = fast.per_example(batch, precision="fp32")
    ref, ref_u = GradientComputer(model, method="loop").per_example(batch, precision="fp32")
    torch.testing.assert_close(u, ref_u, rtol=0, atol=1e-6)
    assert_grads_close(grads, ref, rtol=1e-5)
    assert set(grads) == {n for n, _ in trainable(model)}
    if finetune == "full":  # block linears only: the head (the shared embedding) stays frozen
        assert not model.get_output_embeddings().weight.requires_grad
        assert any(".wi." in n for n in grads) and any("EncDecAttention" in n for n in grads)


def test_padding_positions_get_zero_output_gradient(tiny_t5_dir):
    """What makes padding harmless: u_s depends on no linear's output at a padded encoder or decoder position."""
    cfg = t5_cfg(tiny_t5_dir, "full")
    tok = load_tokenizer(cfg)
    model = make_trainable(load_base(cfg), cfg).eval()
    batch, _ = mixed_batch(tok)
    s = encoder_decoder_batch(model, batch)
    outputs = []
    handles = [m.register_forward_hook(lambda m, _i, y, name=name: outputs.append((name, y)))
               for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.weight.requires_grad]
    u = example_outputs(model, batch)
    for h in handles:
        h.remove()
    grads = torch.autograd.grad(u.sum(), [y for _, y in outputs])
    encoder_pad, decoder_pad = s.attention_mask == 0, s.decoder_attention_mask == 0
    assert encoder_pad.any() and decoder_pad.any()
    for (name, y), g in zip(outputs, grads):
        if name.startswith("decoder") and ".EncDecAttention.k" not in name and ".EncDecAttention.v" not in name:
            padded = decoder_pad
        else:  # the encoder's linears, and the cross-attention's keys and values (of the encoder's states)
            padded = encoder_pad
        assert g.shape[:2] == padded.shape, name
        assert torch.count_nonzero(g[padded]) == 0, name
        assert torch.count_nonzero(g[~padded]) > 0, name


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_projected_equals_projecting_the_loop_gradients(tiny_t5_dir, kind):
    cfg = t5_cfg(tiny_t5_dir)
    tok = load_tokenizer(cfg)
    model = trained_like(make_trainable(load_base(cfg), cfg))
    batch, _ = mixed_batch(tok)
    projector = make_projector(kind, model, 32, seed=5)
    x, u = GradientComputer(model).projected(batch, projector, precision="fp32")
    ref, ref_u = GradientComputer(model, method="loop").per_example(batch, precision="fp32")
    assert x.shape == (len(EXAMPLES), 32) and x.dtype == torch.float32
    torch.testing.assert_close(x, projector.project(ref), rtol=0, atol=1e-5 * x.abs().max().item())
    torch.testing.assert_close(u, ref_u, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- loading, saving, baselines

def test_lora_targets_name_t5s_linear_layers(tiny_t5_dir):
    cfg = ModelConfig(name=str(tiny_t5_dir), lora=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    base = load_base(cfg)
    assert type(base).__name__ == "T5ForConditionalGeneration" and is_encoder_decoder(base)
    assert base.config.use_cache is False and next(base.parameters()).dtype == torch.float32
    with pytest.raises(ConfigError, match=r"\['q_proj', 'v_proj'\] not found in T5ForConditionalGeneration; "
                                          r"linear layers it has: \['k', 'lm_head', 'o', 'q', 'v', 'wi', 'wo'\]"):
        make_trainable(base, cfg)


def test_other_encoder_decoders_are_refused(tmp_path):
    """BART's decoder reaches its logits another way (a bias after the head), which answer_logits does not do."""
    from transformers import BartConfig

    BartConfig(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="an encoder-decoder of type 'bart'; gradex reads encoder-decoders of the T5"):
        load_base(ModelConfig(name=str(tmp_path)))


def test_full_fine_tune_round_trip(tmp_path, tiny_t5_dir):
    """A full fine-tune saves as a transformers folder AutoModelForSeq2SeqLM loads, and gradex reloads it
    with the same trainable parameters."""
    from transformers import AutoModelForSeq2SeqLM

    cfg = t5_cfg(tiny_t5_dir, "full")
    tok = load_tokenizer(cfg)
    model = make_trainable(load_base(cfg), cfg)
    with torch.no_grad():
        for _, p in trainable(model):
            p.add_(torch.randn_like(p) * 0.05)
    save_model(model, tmp_path / "model")
    batch, _ = mixed_batch(tok)
    with torch.no_grad():
        want = answer_logits(model.eval(), batch)[0]
        theirs = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "model").eval()
        assert torch.equal(answer_logits(theirs, batch)[0], want)
        ours = load_model(cfg, tmp_path / "model").eval()
        assert torch.equal(answer_logits(ours, batch)[0], want)
    assert [n for n, _ in trainable(ours)] == [n for n, _ in trainable(model)]


def test_representations_are_the_encoders_over_the_prompt(tiny_t5_dir):
    from gradex.baselines import mean_hidden_states

    cfg = t5_cfg(tiny_t5_dir)
    tok = load_tokenizer(cfg)
    base = load_base(cfg).eval()
    _, tokens = mixed_batch(tok)
    got = mean_hidden_states(base, tokens, [4, 0, 2], tok.pad_token_id, batch_size=2)
    with torch.no_grad():
        want = [base.encoder(input_ids=torch.tensor([tokens[i].ids[:tokens[i].n_prompt]])).last_hidden_state[0].mean(0)
                for i in (4, 0, 2)]
    np.testing.assert_allclose(got, torch.stack(want).numpy(), rtol=1e-5, atol=1e-6)


def test_every_part_runs_where_the_model_is(tiny_t5_dir):
    """The layout conversion, the projected gradients, the representations and generation on torch's
    lazy device (which refuses a CPU operand, as CUDA does) equal the CPU's (tests/test_devices.py)."""
    from test_devices import lazy_device

    from gradex.baselines import mean_hidden_states
    from gradex.evaluate import generate_answers

    cfg = t5_cfg(tiny_t5_dir)
    tok = load_tokenizer(cfg)
    batch, tokens = mixed_batch(tok)
    device = lazy_device()
    cpu = trained_like(make_trainable(load_base(cfg), cfg)).eval()
    lazy = trained_like(make_trainable(load_base(cfg), cfg)).to(device).eval()
    with torch.no_grad():
        torch.testing.assert_close(answer_logits(lazy, batch.to(device))[0].cpu(), answer_logits(cpu, batch)[0],
                                   rtol=1e-5, atol=1e-5)
    x, u = GradientComputer(cpu).projected(batch, make_projector("dense", cpu, 16, seed=1), precision="fp32")
    lazy_x, lazy_u = GradientComputer(lazy).projected(batch, make_projector("dense", lazy, 16, seed=1).to(device),
                                                      precision="fp32")
    torch.testing.assert_close(lazy_x.cpu(), x, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lazy_u.cpu(), u, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mean_hidden_states(lazy, tokens, range(3), tok.pad_token_id),
                               mean_hidden_states(cpu, tokens, range(3), tok.pad_token_id), rtol=1e-4, atol=1e-5)
    assert (generate_answers(lazy, tok, EXAMPLES[:2], 3, precision="fp32")
            == generate_answers(cpu, tok, EXAMPLES[:2], 3, precision="fp32"))


# ---------------------------------------------------------------------------- generation

def test_generation_returns_decoder_tokens_only(tiny_t5_dir):
    """After a few steps on an answer that ignores the prompt, greedy generation gives that answer (and
    nothing of the prompt: T5 generates decoder tokens only); multiple choice picks it too."""
    from gradex.evaluate import choose, generate_answers
    from gradex.train import train

    cfg = t5_cfg(tiny_t5_dir)
    tok = load_tokenizer(cfg)
    examples = [Example("t", "train", f"{a}+{b}=", " 42") for a in range(4) for b in range(4)]
    tokens = tokenize(tok, examples)
    model = make_trainable(load_base(cfg), cfg)
    train(model, tokens, range(len(tokens)), TrainConfig(max_steps=40, batch_size=8, lr=0.05, warmup=0.0),
          tok.pad_token_id, precision="fp32", progress=False)
    assert generate_answers(model, tok, examples[:5], max_new_tokens=4, precision="fp32", budget=30) == ["42"] * 5
    mc = [Example("t", "test", "7+7=", " 42", choices=("14", "42", "7"))]
    assert choose(model, tok, mc, precision="fp32") == ["42"]


# ---------------------------------------------------------------------------- a whole run

def test_whole_run_on_t5(tmp_path, tiny_t5_dir):
    """prepare, meta-train, gradients, select, fine-tune and evaluate on the tiny T5; the final adapter is
    what PeftModel.from_pretrained loads, and `gradex export` merges it into a model AutoModelForSeq2SeqLM loads."""
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    from gradex.export import export
    from gradex.gradients import Store
    from gradex.run import FINAL

    cfg = tiny_run_config(tmp_path, tiny_t5_dir)
    cfg.model.lora.target_modules = T5_LORA
    cfg.meta.epochs, cfg.select.subsets = 1, 8
    cfg = config.from_dict(config.to_dict(cfg))  # validated as a user's config would be
    final = pipeline.finetune(cfg)
    store = Store.open(cfg.run_dir / "store")
    x = np.asarray(store.x)
    assert x.shape[0] > 0 and np.isfinite(x).all() and np.abs(x).max() > 0
    assert np.isfinite(np.asarray(store.u)).all()
    for split in ("validation", "test"):
        assert np.isfinite(final[split]["loss"]) and 0 <= final[split]["score"] <= 1
        assert final[split]["metric"] == "exact_match"
    run = pipeline.Run(cfg)
    ours = run.saved_model(run.dir / FINAL)
    theirs = PeftModel.from_pretrained(load_base(cfg.model), str(run.dir / FINAL)).eval()
    batch = collate(run.tokens[:6], range(6), run.pad_id)
    merged = AutoModelForSeq2SeqLM.from_pretrained(export(run.dir)).eval()
    with torch.no_grad():
        want = answer_logits(ours, batch)[0]
        assert torch.equal(answer_logits(theirs, batch)[0], want)
        assert not torch.equal(answer_logits(load_base(cfg.model).eval(), batch)[0], want)
        torch.testing.assert_close(answer_logits(merged, batch)[0], want, rtol=1e-5, atol=1e-5)
