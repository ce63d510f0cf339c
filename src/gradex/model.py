"""Base model, tokenizer, trainable parameters, and the per-example output u_s.

u_s is a log-odds whose logistic loss softplus(-u_s) is the loss GradEx estimates. Two definitions
(`gradients.output`):
- "ce" (default): the log-odds of the geometric mean p_bar of the answer tokens' probabilities,
  u_s = log(p_bar / (1 - p_bar)) = -log(expm1(CE_s)) with CE_s the example's mean token
  cross-entropy. softplus(-u_s) = -log p_bar = CE_s exactly, so the estimate is the usual
  validation loss, and the gradient weights each token by how uncertain it is.
- "mean-logodds" (the paper's; docs/method.md, section 2): the mean over answer tokens of the token log-odds
  o_t = logit_y - logsumexp(other logits) = log(p_t / (1 - p_t)). Every token weighs the same, so
  an answer's one uncertain token (a carried digit) is averaged away by its confident ones.
Token probabilities are clipped to [eps, 1 - eps]; "ce" floors CE_s at CE_FLOOR (see there). The LM
head is applied at answer positions only (the rest of the sequence needs no vocabulary projection),
which saves most of the head's cost, and in fp32 whatever the model's precision, so u_s and its
gradient with respect to the logits are fp32 numbers in every pass (gradients, validate, evaluate).

Two families of model: a causal LM (AutoModelForCausalLM), and an encoder-decoder of the T5 family
(T5, FLAN-T5, mT5, umT5: AutoModelForSeq2SeqLM), recognized by its config's `is_encoder_decoder`.
Batches keep one layout for both (gradex.data: prompt then answer tokens, right-padded);
`answer_logits` gives an encoder-decoder the prompt as encoder input and the answer as decoder
labels (`encoder_decoder_batch`), so training, gradients and evaluation do not tell them apart.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradex.config import ConfigError, ModelConfig
from gradex.data import CHAT, ENCODER_DECODER, Batch

EPS = 1e-6
OUTPUTS = ("ce", "mean-logodds")  # definitions of u_s; see the module docstring
LOGODDS_CLIP = math.log((1 - EPS) / EPS)  # p clipped to [eps, 1 - eps]
# The "ce" output's floor on an example's CE (u_s <= log-odds of p_bar = 0.999). Why: u = -log(expm1(CE))
# has du/dCE ~ -1/CE, and a near-solved example's CE is a small difference of two logit-sized
# numbers (logsumexp - logit_y), whose fp32 rounding (~1e-6 at |logit| ~ 20) that factor amplifies
# into its u_s and its gradient. Below 1e-3 the example can change the loss by less than 1e-3, and on
# the shipped examples none is below it (smallest CE at theta*: 1.5e-3), so no estimate there moves.
# A clipped example has u_s at the floor and a zero gradient; the store counts them (manifest).
CE_FLOOR = 1e-3


def resolve_name(cfg: ModelConfig) -> tuple[str, str | None]:
    """(path or hub id, gguf file) for transformers' from_pretrained."""
    if cfg.name == "smollm2":
        from gradex.assets import smollm2_dir

        return str(smollm2_dir()), None
    return cfg.name, cfg.gguf_file


def hub_commit(cfg: ModelConfig) -> str | None:
    """The commit of a hub model's files in the local Hugging Face cache (what a load of `model.name` at
    `model.revision` reads, offline or just downloaded), for the ledger: a hub model named without a
    pinned commit can change upstream unseen, and the recorded commit says which one a run used. None for
    the embedded default and local directories."""
    if cfg.name == "smollm2" or Path(cfg.name).exists():
        return None
    from huggingface_hub import try_to_load_from_cache
    from transformers.utils.hub import extract_commit_hash

    found = try_to_load_from_cache(cfg.name, "config.json", revision=cfg.revision)
    return extract_commit_hash(found, None) if isinstance(found, str) else None


def _no_hub_kernels() -> dict[str, Any]:
    """Tell a transformers that can (4.54+) not to swap the model's layers for kernels fetched from
    the Hugging Face Hub. Why: transformers 5 does so by default wherever the `kernels` package is
    installed (a dependency of transformers 5), which runs downloaded code that model.trust_remote_code
    never allowed, changes numerics that gradex's oracles pin, and refuses model.train() on a device
    the kernels library does not list (the tests' lazy device). Older versions take no such argument."""
    import transformers
    from packaging.version import Version

    return {"use_kernels": False} if Version(transformers.__version__) >= Version("4.54") else {}


def _source(cfg: ModelConfig, gguf: str | None) -> dict[str, Any]:
    """What every from_pretrained of the model is told: the GGUF file, the hub revision (where one is
    pinned) and whether the model's own code may run (only where the user said so)."""
    found: dict[str, Any] = {"gguf_file": gguf, "trust_remote_code": cfg.trust_remote_code}
    if cfg.revision is not None:
        found["revision"] = cfg.revision
    return found


def _load_error(cfg: ModelConfig, what: str, err: Exception) -> ConfigError:
    if "trust_remote_code" in str(err) and not cfg.trust_remote_code:
        return ConfigError(f"model.name: {cfg.name!r} ships Python code of its own, which gradex runs only "
                           f"with model.trust_remote_code: true (set it only for a model you trust)")
    return ConfigError(f"model.name: cannot load {what} {cfg.name!r} (a hub id, a local directory, or 'smollm2'): {err}")


def load_tokenizer(cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    name, gguf = resolve_name(cfg)
    try:  # code shipped with a model runs only if the user says so (model.trust_remote_code)
        tok = AutoTokenizer.from_pretrained(name, **_source(cfg, gguf))
    except (OSError, ValueError) as err:
        raise _load_error(cfg, "a tokenizer for", err) from err
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    try:
        seq2seq = _is_encoder_decoder(_hf_config(cfg, name, gguf))
    except (OSError, ValueError):  # a tokenizer without its model (the model's own load says what is wrong)
        seq2seq = False
    # how gradex.data.tokenize formats examples with this tokenizer: for an encoder-decoder (prompt and
    # answer each ending with EOS), and through the tokenizer's chat template (a decoder-only model's)
    setattr(tok, ENCODER_DECODER, seq2seq)
    setattr(tok, CHAT, cfg.chat_template == "auto" and bool(getattr(tok, "chat_template", None)) and not seq2seq)
    return tok


def load_base(cfg: ModelConfig) -> nn.Module:
    name, gguf = resolve_name(cfg)
    return pretrained(cfg, name, gguf)


# the encoder-decoders whose decoder-to-logits step answer_logits reproduces (see _decoder_scale)
ENCODER_DECODER_TYPES = ("t5", "mt5", "umt5")


def _hf_config(cfg: ModelConfig, name: str, gguf: str | None) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(name, **_source(cfg, gguf))


def _is_encoder_decoder(config: Any) -> bool:
    return bool(getattr(config, "is_encoder_decoder", False))


def pretrained(cfg: ModelConfig, name: str, gguf: str | None) -> nn.Module:
    """A transformers model in fp32 (autocast gives the compute precision), without a KV cache: a causal
    LM, or an encoder-decoder (AutoModelForSeq2SeqLM) when its config says it is one."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per load drowns gradex's own stage bars

    try:
        config = _hf_config(cfg, name, gguf)
    except (OSError, ValueError) as err:
        raise _load_error(cfg, "a model from", err) from err
    seq2seq = _is_encoder_decoder(config)
    if seq2seq and config.model_type not in ENCODER_DECODER_TYPES:
        raise ConfigError(f"model.name: {cfg.name!r} is an encoder-decoder of type {config.model_type!r}; gradex "
                          f"reads encoder-decoders of the T5 family only ({', '.join(ENCODER_DECODER_TYPES)})")
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(name, dtype=torch.float32, **_source(cfg, gguf), **_no_hub_kernels())
    except (OSError, ValueError) as err:
        raise _load_error(cfg, "an encoder-decoder from" if seq2seq else "a causal LM from", err) from err
    model.config.use_cache = False
    return model


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"  # GPT-2's linear layer with a transposed weight (in, out)


def make_trainable(model: nn.Module, cfg: ModelConfig, seed: int = 0) -> nn.Module:
    """Wrap with LoRA, or unfreeze the linear layers of the transformer blocks (full fine-tuning).

    Full fine-tuning leaves embeddings, LM head and norms frozen (docs/method.md, section 1). LoRA's
    target_modules name linear layers by their last name: q_proj, k_proj, v_proj, o_proj in a Llama;
    q, k, v, o (attention, cross-attention too) and wi, wo (wi_0, wi_1 gated) in encoder and decoder of a T5.
    """
    if cfg.finetune == "lora":
        from peft import LoraConfig, get_peft_model

        targets = cfg.lora.target_modules
        present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [t for t in targets if t not in present]
        if missing:
            raise ConfigError(f"model.lora.target_modules: {missing} not found in {type(model).__name__}; "
                              f"linear layers it has: {sorted(linear_module_names(model))}")
        fan_in_fan_out = any(is_conv1d(m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets)
        torch.manual_seed(seed)
        lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, target_modules=list(targets),
                          lora_dropout=0.0, fan_in_fan_out=fan_in_fan_out, bias="none")
        return get_peft_model(model, lora)
    head = model.get_output_embeddings()
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if (isinstance(m, nn.Linear) or is_conv1d(m)) and m is not head:
            m.weight.requires_grad_(True)
    return model


def linear_module_names(model: nn.Module) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)}


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """The model in eval mode (no dropout) inside the block, and in whatever mode it was in after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def trainable_vector(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float() for _, p in trainable(model)])


def set_trainable_vector(model: nn.Module, vec: torch.Tensor) -> None:
    start = 0
    with torch.no_grad():
        for _, p in trainable(model):
            p.copy_(vec[start:start + p.numel()].view_as(p))
            start += p.numel()


def language_model(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_encoder_decoder(model: nn.Module) -> bool:
    """Whether the model (under a peft wrapper or not) is an encoder-decoder (T5)."""
    return _is_encoder_decoder(getattr(language_model(model), "config", None))


@dataclass
class EncoderDecoderBatch:
    """A batch of gradex's causal layout (gradex.data.Batch) as an encoder-decoder reads it, on the
    batch's device: the prompt of each row as encoder input and its answer as decoder labels, each
    right-padded (pad id where the masks are 0)."""

    input_ids: torch.Tensor  # (B, P) the prompt tokens
    attention_mask: torch.Tensor  # (B, P)
    decoder_input_ids: torch.Tensor  # (B, A) decoder_start_token_id, then the labels shifted right
    decoder_attention_mask: torch.Tensor  # (B, A)
    labels: torch.Tensor  # (B, A) the answer tokens
    label_mask: torch.Tensor  # (B, A) bool, on the host: where labels are answer tokens


def encoder_decoder_batch(lm: nn.Module, batch: Batch) -> EncoderDecoderBatch:
    """The encoder and decoder inputs of a causal-layout batch (every row: prompt, then answer, then
    padding). Decoder position j is fed the start token (j = 0) or answer token j-1 and predicts
    answer token j, as the model's own forward does with `labels` (T5's _shift_right). The lengths
    and indices are found on the host (the masks are small); the token ids are gathered on the device."""
    config = lm.config
    start = config.decoder_start_token_id
    if start is None:
        start = getattr(getattr(lm, "generation_config", None), "decoder_start_token_id", None)
    if start is None:
        raise ValueError(f"{type(lm).__name__}: no decoder_start_token_id in its config")
    pad = config.pad_token_id if config.pad_token_id is not None else start
    answer = batch.answer_mask.cpu()
    n_prompt = (batch.attention_mask.cpu().bool() & ~answer).sum(1)  # the prompt is each row's first tokens
    n_answer = answer.sum(1)
    width = batch.input_ids.shape[1]
    p_len, a_len = int(n_prompt.max()), int(n_answer.max())
    prompt_mask = torch.arange(p_len)[None, :] < n_prompt[:, None]
    label_mask = torch.arange(a_len)[None, :] < n_answer[:, None]
    at = (n_prompt[:, None] + torch.arange(a_len)[None, :]).clamp(max=width - 1)  # answer token j of each row
    device = batch.input_ids.device
    ids = batch.input_ids[:, :p_len].masked_fill(~prompt_mask.to(device), pad)
    labels = batch.input_ids.gather(1, at.to(device)).masked_fill(~label_mask.to(device), pad)
    first = torch.full_like(labels[:, :1], start)
    return EncoderDecoderBatch(ids, prompt_mask.to(device=device, dtype=batch.attention_mask.dtype),
                               torch.cat([first, labels[:, :-1]], 1),
                               label_mask.to(device=device, dtype=batch.attention_mask.dtype), labels, label_mask)


def _decoder_scale(lm: nn.Module) -> float | None:
    """The factor T5's forward multiplies its decoder's output by before the LM head: d_model**-0.5 when
    config.scale_decoder_outputs (transformers 5 sets it unless the saved config says
    tie_word_embeddings: false, as T5 v1.1's and FLAN-T5's do; its mT5 never rescales). transformers 4
    had no such setting: its T5, mT5 and umT5 rescaled when tie_word_embeddings (not tested here)."""
    config = lm.config
    scaled = getattr(config, "scale_decoder_outputs", None)
    if scaled is None:
        import transformers

        scaled = int(transformers.__version__.split(".")[0]) < 5 and bool(config.tie_word_embeddings)
    return config.d_model ** -0.5 if scaled else None


def answer_logits(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits (fp32) at the positions that predict answer tokens, their targets, and their rows.

    Causal LM: position t-1 predicts token t, so an answer token at t is scored by the hidden state at
    t-1. Encoder-decoder: the encoder reads the prompt, and decoder position j (fed the start token and
    answer tokens < j) predicts answer token j (`encoder_decoder_batch`); the logits are the model's own
    forward's at those positions, in the same order (row by row, answer token by answer token).
    The head runs outside autocast: a bf16 logit of size 20 is rounded by up to 0.06, which moves a
    near-solved example's CE by ~6% and its u_s with it; casting bf16 logits up afterwards cannot undo that.
    """
    lm = language_model(model)
    scale = None
    if is_encoder_decoder(lm):
        s = encoder_decoder_batch(lm, batch)
        encoded = lm.get_encoder()(input_ids=s.input_ids, attention_mask=s.attention_mask).last_hidden_state
        hidden = lm.get_decoder()(input_ids=s.decoder_input_ids, attention_mask=s.decoder_attention_mask,
                                  encoder_hidden_states=encoded, encoder_attention_mask=s.attention_mask,
                                  use_cache=False).last_hidden_state
        predicts, tokens, shift, scale = s.label_mask, s.labels, 0, _decoder_scale(lm)
    else:
        hidden = lm.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        predicts, tokens, shift = batch.answer_mask[:, 1:], batch.input_ids, 1
    # found on the host: nonzero's size depends on the data, so CUDA waits for it anyway, and the
    # lazy device's nonzero gives indices its other ops refuse
    rows, cols = (t.to(hidden.device) for t in predicts.cpu().nonzero(as_tuple=True))
    h = hidden[rows, cols]
    # (a device without autocast, such as the tests' lazy device, computes in fp32 anyway)
    fp32 = (torch.autocast(device_type=h.device.type, enabled=False) if torch.amp.is_autocast_available(h.device.type)
            else contextlib.nullcontext())
    with fp32:
        h = h.float()
        if scale is not None:
            h = h * scale
        logits = lm.get_output_embeddings()(h).float()
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return logits, tokens[rows, cols + shift], rows


def token_logodds(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log(p_y / (1 - p_y)) per row: logit_y - logsumexp(other logits), clipped at p in [eps, 1-eps]."""
    logit_y = logits.gather(1, targets[:, None])[:, 0]
    others = logits.scatter(1, targets[:, None], float("-inf"))
    return (logit_y - torch.logsumexp(others, dim=1)).clamp(-LOGODDS_CLIP, LOGODDS_CLIP)


def per_example_mean(values: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """The mean of `values` per example (rows[i]: the example of values[i]), as a sum over the
    (n, tokens) membership mask rather than an index_add: the same sums in a fixed order on every
    device (CUDA's index_add adds atomically, in no fixed order), and a backward every device has.
    Selected, not multiplied: a product with a 0/1 matrix would spread one example's NaN to all
    (0 * NaN = NaN), and the gradient pass names the example that has one."""
    member = rows[None, :] == torch.arange(n, device=rows.device)[:, None]
    return torch.where(member, values[None, :], 0.0).sum(1) / member.sum(1).clamp_min(1).to(values.dtype)


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p_y per row."""
    return torch.logsumexp(logits, 1) - logits.gather(1, targets[:, None])[:, 0]


def ce_logodds(ce: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) for p = exp(-ce), computed as -log(expm1(ce)), with ce clipped to
    [CE_FLOOR, -log(eps)] (the clipped side gets a zero gradient)."""
    return -torch.log(torch.expm1(ce.clamp(CE_FLOOR, -math.log(EPS))))


def at_ce_floor(u: torch.Tensor) -> torch.Tensor:
    """Which "ce" outputs u_s sit at the floor (CE_s <= CE_FLOOR): u_s is monotone in CE_s, so these
    are exactly the u_s equal to the floor's (the largest fp32 value ce_logodds gives)."""
    return u.float() >= ce_logodds(torch.tensor(CE_FLOOR, dtype=torch.float32))


def example_outputs(model: nn.Module, batch: Batch, output: str = "ce") -> torch.Tensor:
    """u_s for each example of the batch (see the module docstring), shape (B,)."""
    return example_outputs_and_nll(model, batch, output)[0]


def example_outputs_and_nll(model: nn.Module, batch: Batch, output: str = "ce") -> tuple[torch.Tensor, torch.Tensor]:
    """(u_s, mean token cross-entropy of the answer) for each example, both (B,), from one forward pass."""
    if output not in OUTPUTS:
        raise ValueError(f"unknown output {output!r}; choose one of {OUTPUTS}")
    logits, targets, rows = answer_logits(model, batch)
    n = batch.input_ids.shape[0]
    nll = per_example_mean(token_nll(logits, targets), rows, n)
    if output == "ce":
        return ce_logodds(nll), nll
    return per_example_mean(token_logodds(logits, targets), rows, n), nll


def training_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Token-level cross-entropy over all answer tokens of the batch."""
    logits, targets, _ = answer_logits(model, batch)
    return nn.functional.cross_entropy(logits, targets)
