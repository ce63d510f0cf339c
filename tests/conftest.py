"""Shared fixtures: a tiny Llama and a byte-level tokenizer, built from config objects (no downloads)."""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import pytest
import torch


def byte_tokenizer():
    """A real byte-level tokenizer (one token per byte) with a pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<pad>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<pad>")


def tiny_llama(vocab_size: int = 257, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def trained_like(model: torch.nn.Module) -> torch.nn.Module:
    """peft starts lora_B at 0 (every lora_A gradient would be 0): give it random values instead."""
    from gradex.model import trainable

    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in trainable(model):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


@functools.cache
def bigbench_unavailable() -> str | None:
    """Why BIG-bench's real tasks cannot be had here (the pinned bigbench==1.0.0 sdist from the package
    index, BIG-bench's repository on the web, or the copy GRADEX_BIGBENCH names), or None when they can. Seen: an index that lists bigbench
    0.0.1 only. Only an AssetError counts; any other failure is raised."""
    from gradex.assets import bigbench_tasks
    from gradex.errors import AssetError

    try:
        bigbench_tasks(["arithmetic/3_digit_addition"])
    except AssetError as err:
        return str(err)
    return None


@pytest.fixture()
def real_bigbench() -> None:
    """For a test that reads real BIG-bench tasks: skipped, saying why, where they cannot be had."""
    why = bigbench_unavailable()
    if why is not None:
        pytest.skip(f"BIG-bench's tasks cannot be had here: {why}")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama + byte tokenizer saved like any Hugging Face model directory."""
    out = tmp_path_factory.mktemp("tiny-llama")
    tok = byte_tokenizer()
    tiny_llama(len(tok)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def arithmetic_rows(n: int, op: str, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        rows.append({"input": f"{a}{op}{b}=", "target": str(value)})
    return rows


def tiny_run_config(tmp_path: Path, model_dir: Path):
    """A whole run on the tiny Llama: a target and three sources written as JSONL under tmp_path."""
    from gradex import config

    write_jsonl(tmp_path / "add.jsonl", arithmetic_rows(60, "+", 0))
    write_jsonl(tmp_path / "add_more.jsonl", arithmetic_rows(24, "+", 1))
    write_jsonl(tmp_path / "mul.jsonl", arithmetic_rows(24, "*", 2))
    write_jsonl(tmp_path / "sub.jsonl", arithmetic_rows(24, "-", 3))
    raw = {
        "name": "tiny", "runs_dir": str(tmp_path / "runs"),
        "model": {"name": str(model_dir), "precision": "fp32", "max_length": 24,
                  "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}},
        "data": {"target": {"name": "add", "path": str(tmp_path / "add.jsonl"), "train": 20, "validation": 16, "test": 16},
                 "sources": [{"name": n, "path": str(tmp_path / f"{n}.jsonl")} for n in ("add_more", "mul", "sub")]},
        "meta": {"epochs": 2, "batch_size": 8, "lr": 0.01},
        "gradients": {"dim": 32, "batch_size": 4, "chunk_size": 16},
        "select": {"subsets": 20},
        "finetune": {"epochs": 1, "batch_size": 8, "lr": 0.01},
    }
    return config.from_dict(raw)


def write_config(cfg, path: Path) -> Path:
    """A config as the YAML file a user would pass to `gradex` (the CLI tests read it back)."""
    import yaml

    from gradex import config

    path.write_text(yaml.safe_dump(config.to_dict(cfg)))
    return path
