"""Throughput of gradex's per-example gradient pass against a training step and the authors' approach.

    python benchmarks/gradients.py [--quick] [--repeats R]

SmolLM2-135M-Instruct + LoRA r=8 on q,k,v,o (921,600 trainable parameters), batches of 8 random
examples whose last 4 tokens are the answer, d=256, all in one process:

- train:     one LoRA training step (forward + backward of gradex.model.training_loss + AdamW step)
             under bf16 autocast, gradex's default precision;
- gradex:    compute_store into a temporary directory (projected per-example gradients, sparse
             projector, bf16 autocast, shard writes and merge included);
- reference: the authors' approach: a Python loop with one fp32 forward and torch.autograd.grad per
             example, the gradient flattened and multiplied by a dense fp32 Rademacher matrix (p x d).
             It uses gradex's answer-only output u_s, which flatters it.
Then full fine-tuning (every linear layer of the blocks, ~106M parameters) projected to d=512 by
the sparse projector. Numbers are medians over repeats; train and gradex alternate within a repeat,
so both see the same machine load. Peak RSS values are the process's maximum so far (ru_maxrss
only grows): `peak_rss_gb` after the LoRA train and gradex runs, `peak_rss_gb_with_reference` after
the reference, `full.peak_rss_gb` at the end. The last printed line is one JSON object; it is also written to
benchmarks/results/gradients.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from gradex.config import ModelConfig
from gradex.data import Tokenized, collate
from gradex.gradients import compute_store, make_projector
from gradex.model import autocast, example_outputs, load_base, make_trainable, trainable, training_loss

BATCH = 8
ANSWER = 4
RESULTS = Path(__file__).parent / "results" / "gradients.json"


def peak_rss_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # ru_maxrss is in KiB on Linux


def random_tokens(n: int, length: int, vocab: int, seed: int) -> list[Tokenized]:
    gen = torch.Generator().manual_seed(seed)
    return [Tokenized(torch.randint(10, vocab, (length,), generator=gen).tolist(), length - ANSWER) for _ in range(n)]


def lora_model() -> torch.nn.Module:
    model = make_trainable(load_base(ModelConfig()), ModelConfig(), seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter (peft starts lora_B at 0)
        for name, p in trainable(model):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    return model


def train_seconds(model: torch.nn.Module, batches: list, opt: torch.optim.Optimizer, precision: str) -> float:
    model.train()
    t0 = time.perf_counter()
    for batch in batches:
        with autocast(precision):
            loss = training_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def gradex_seconds(model: torch.nn.Module, tokens: list[Tokenized], projector, precision: str) -> tuple[float, str]:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        store = compute_store(model, tokens, range(len(tokens)), pad_id=0, out_dir=tmp, projector=projector,
                              batch_size=BATCH, chunk_size=64, precision=precision, progress=False)
        return time.perf_counter() - t0, store.manifest["method"]


def dense_rademacher(p: int, d: int, seed: int = 0) -> torch.Tensor:
    """(p, d) fp32 +-1/sqrt(d), filled in row blocks to avoid a p x d int64 temporary."""
    out = torch.empty(p, d)
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, p, 65536):
        out[start:start + 65536].bernoulli_(0.5, generator=gen).mul_(2 / d**0.5).sub_(1 / d**0.5)
    return out


def reference_seconds(model: torch.nn.Module, tokens: list[Tokenized], matrix: torch.Tensor) -> float:
    model.eval()
    params = [p for _, p in trainable(model)]
    t0 = time.perf_counter()
    for i, tok in enumerate(tokens):
        batch = collate([tok], [i], pad_id=0)
        u = example_outputs(model, batch)[0]
        grads = torch.autograd.grad(u, params)
        flat = torch.cat([g.reshape(-1) for g in grads])
        (flat @ matrix).numpy()
    return time.perf_counter() - t0


def lora_numbers(model: torch.nn.Module, length: int, repeats: int, n_examples: int, dim: int) -> dict:
    vocab = model.config.vocab_size
    tokens = random_tokens(n_examples, length, vocab, seed=length)
    batches = [collate(tokens[i:i + BATCH], range(i, i + BATCH), 0) for i in range(0, n_examples, BATCH)]
    opt = torch.optim.AdamW([p for _, p in trainable(model)], lr=0.0)  # lr 0: the adapter stays put
    projector = make_projector("sparse", dim=dim, seed=0)
    train_seconds(model, batches[:1], opt, "bf16")  # warm-up
    gradex_seconds(model, tokens[:BATCH], projector, "bf16")
    train, grad, method = [], [], ""
    for _ in range(repeats):
        train.append(n_examples / train_seconds(model, batches, opt, "bf16"))
        seconds, method = gradex_seconds(model, tokens, projector, "bf16")
        grad.append(n_examples / seconds)
    opt.zero_grad(set_to_none=True)
    del opt
    out = {"seq_len": length, "batch_size": BATCH, "d": dim, "examples_per_repeat": n_examples, "repeats": repeats,
           "train_samples_per_s": round(statistics.median(train), 3),
           "grad_samples_per_s": round(statistics.median(grad), 3), "grad_method": method,
           "trainable_params": projector.input_dim}
    out["ratio_vs_train"] = round(out["grad_samples_per_s"] / out["train_samples_per_s"], 3)
    print(f"[{length} tokens] train {out['train_samples_per_s']:.2f} ex/s   gradex {out['grad_samples_per_s']:.2f} ex/s "
          f"({method})   ratio {out['ratio_vs_train']:.2f}", flush=True)
    return out


def add_reference(model: torch.nn.Module, out: dict, matrix: torch.Tensor, repeats: int, n_examples: int) -> None:
    tokens = random_tokens(n_examples, out["seq_len"], model.config.vocab_size, seed=out["seq_len"])
    reference_seconds(model, tokens[:1], matrix)  # warm-up
    ref = [n_examples / reference_seconds(model, tokens, matrix) for _ in range(repeats)]
    out["reference_samples_per_s"] = round(statistics.median(ref), 3)
    out["ratio_vs_reference"] = round(out["grad_samples_per_s"] / out["reference_samples_per_s"], 3)
    print(f"[{out['seq_len']} tokens] reference {out['reference_samples_per_s']:.2f} ex/s   "
          f"gradex / reference {out['ratio_vs_reference']:.2f}", flush=True)


def full_numbers(lengths: list[int], repeats: int, n_examples: int, dim: int) -> dict:
    model = make_trainable(load_base(ModelConfig()), ModelConfig(finetune="full"))
    params = sum(p.numel() for _, p in trainable(model))
    t0 = time.perf_counter()
    projector = make_projector("sparse", model, dim, seed=0)
    bind_seconds = time.perf_counter() - t0
    out: dict = {"trainable_params": params, "d": dim, "projector": "sparse", "bind_seconds": round(bind_seconds, 2)}
    for length in lengths:
        tokens = random_tokens(n_examples, length, model.config.vocab_size, seed=length)
        gradex_seconds(model, tokens[:BATCH], projector, "bf16")  # warm-up
        rates = [n_examples / gradex_seconds(model, tokens, projector, "bf16")[0] for _ in range(repeats)]
        out[f"grad_samples_per_s_{length}"] = round(statistics.median(rates), 3)
        print(f"[full fine-tuning, {params / 1e6:.1f}M params, {length} tokens, d={dim}] gradex "
              f"{out[f'grad_samples_per_s_{length}']:.2f} ex/s", flush=True)
    out["peak_rss_gb"] = peak_rss_gb()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: one repeat, few examples")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    n_lora, n_ref, n_full = (8, 2, 8) if args.quick else (32, 8, 16)
    torch.manual_seed(0)

    model = lora_model()
    results = {length: lora_numbers(model, length, repeats, n_lora, 256) for length in (32, 64)}
    rss_gradex = peak_rss_gb()
    matrix = dense_rademacher(sum(p.numel() for _, p in trainable(model)), 256)
    for length in (32, 64):
        add_reference(model, results[length], matrix, repeats, n_ref)
    del matrix
    rss_reference = peak_rss_gb()
    del model
    full = full_numbers([32, 64], repeats, n_full, 512)

    summary = {
        **results[32],
        "peak_rss_gb": rss_gradex,  # LoRA model, training steps and gradex passes
        "peak_rss_gb_with_reference": rss_reference,  # plus the reference's dense 921,600 x 256 matrix
        "seq64": results[64],
        "full": full,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "quick": args.quick,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    if not args.quick:
        RESULTS.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
