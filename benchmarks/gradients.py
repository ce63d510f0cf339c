"""Throughput of gradex's per-example gradient pass against a training step and the authors' approach.

    python benchmarks/gradients.py [--quick] [--repeats R] [--device auto|cpu|cuda|cuda:N|mps] [--precision P]

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
the sparse projector and by the hashed one (the same sketch, buckets computed when applied:
`projector_state_gb` says what each holds). Numbers are medians over repeats; train and gradex alternate within a repeat,
so both see the same machine load. Peak RSS values are the process's maximum so far (ru_maxrss
only grows): `peak_rss_gb` after the LoRA train and gradex runs, `peak_rss_gb_with_reference` after
the reference, `full.peak_rss_gb` at the end. On an accelerator (`--device`, default
auto: the GPU when there is one) every run above is on it, and `accelerator` reports the device and
the peak accelerator memory of each part (torch.cuda.max_memory_allocated, reset before each):
the LoRA train step, the LoRA gradient pass, and full fine-tuning's gradient pass, beside what one
batch of per-example gradients of the largest layer takes (the pass holds one layer's at a time).
The last printed line is one JSON object; it is also written to benchmarks/results/gradients.json
(gradients-<device type>-<precision>.json for another device or precision, e.g. gradients-cuda.json,
gradients-fp32.json).
"""

from __future__ import annotations

import argparse
import json
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
from gradex.device import autocast, peak_memory_gb, resolve_device, resolve_precision
from gradex.model import example_outputs, load_base, make_trainable, trainable, training_loss

from machine import describe  # benchmarks/machine.py, beside this script

BATCH = 8
ANSWER = 4
RESULTS = Path(__file__).parent / "results" / "gradients.json"


def peak_rss_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # ru_maxrss is in KiB on Linux


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    peak = peak_memory_gb(device)
    return None if peak is None else round(peak, 3)


def random_tokens(n: int, length: int, vocab: int, seed: int) -> list[Tokenized]:
    gen = torch.Generator().manual_seed(seed)
    return [Tokenized(torch.randint(10, vocab, (length,), generator=gen).tolist(), length - ANSWER) for _ in range(n)]


def lora_model(device: torch.device) -> torch.nn.Module:
    model = make_trainable(load_base(ModelConfig()), ModelConfig(), seed=0).to(device)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter (peft starts lora_B at 0)
        for name, p in trainable(model):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen).to(p.device) * 0.01)
    return model


def layer_batch_gb(model: torch.nn.Module) -> float:
    """One batch of per-example fp32 gradients of the largest trainable parameter: what the pass holds
    at a time beside the model and its activations."""
    return round(BATCH * max(p.numel() for _, p in trainable(model)) * 4 / 2**30, 4)


def train_seconds(model: torch.nn.Module, batches: list, opt: torch.optim.Optimizer, precision: str) -> float:
    device = next(model.parameters()).device
    model.train()
    t0 = time.perf_counter()
    for batch in batches:
        with autocast(precision, device):
            loss = training_loss(model, batch.to(device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
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
    device = params[0].device
    t0 = time.perf_counter()
    for i, tok in enumerate(tokens):
        batch = collate([tok], [i], pad_id=0).to(device)
        u = example_outputs(model, batch)[0]
        grads = torch.autograd.grad(u, params)
        flat = torch.cat([g.reshape(-1) for g in grads])
        (flat @ matrix).cpu().numpy()
    return time.perf_counter() - t0


def lora_numbers(model: torch.nn.Module, length: int, repeats: int, n_examples: int, dim: int, precision: str) -> dict:
    vocab = model.config.vocab_size
    tokens = random_tokens(n_examples, length, vocab, seed=length)
    batches = [collate(tokens[i:i + BATCH], range(i, i + BATCH), 0) for i in range(0, n_examples, BATCH)]
    opt = torch.optim.AdamW([p for _, p in trainable(model)], lr=0.0)  # lr 0: the adapter stays put
    projector = make_projector("sparse", dim=dim, seed=0)
    device = next(model.parameters()).device
    train_seconds(model, batches[:1], opt, precision)  # warm-up
    gradex_seconds(model, tokens[:BATCH], projector, precision)
    train, grad, method, train_peak, grad_peak = [], [], "", None, None
    for _ in range(repeats):
        reset_peak(device)
        train.append(n_examples / train_seconds(model, batches, opt, precision))
        train_peak = peak_gb(device)
        reset_peak(device)
        seconds, method = gradex_seconds(model, tokens, projector, precision)
        grad_peak = peak_gb(device)
        grad.append(n_examples / seconds)
    opt.zero_grad(set_to_none=True)
    del opt
    out = {"seq_len": length, "batch_size": BATCH, "d": dim, "examples_per_repeat": n_examples, "repeats": repeats,
           "train_samples_per_s": round(statistics.median(train), 3),
           "grad_samples_per_s": round(statistics.median(grad), 3), "grad_method": method,
           "trainable_params": projector.input_dim}
    if grad_peak is not None:
        out.update(train_peak_accelerator_gb=train_peak, grad_peak_accelerator_gb=grad_peak)
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


def projector_state_gb(projector) -> float:
    """What a projector holds in tensors (the sparse one's bucket index; nothing for hashed)."""
    held = [t for t in vars(projector).values() if isinstance(t, torch.Tensor)]
    held += [t for v in vars(projector).values() if isinstance(v, dict) for t in v.values() if isinstance(t, torch.Tensor)]
    return round(sum(t.numel() * t.element_size() for t in held) / 2**30, 4)


def full_numbers(lengths: list[int], repeats: int, n_examples: int, dim: int, device: torch.device,
                 precision: str) -> dict:
    """Full fine-tuning's gradient pass with the sparse projector (its buckets held) and the hashed
    one (computed when applied), one after the other within each repeat."""
    model = make_trainable(load_base(ModelConfig()), ModelConfig(finetune="full")).to(device)
    params = sum(p.numel() for _, p in trainable(model))
    out: dict = {"trainable_params": params, "d": dim, "projector": "sparse"}
    projectors = {}
    for kind in ("sparse", "hashed"):
        t0 = time.perf_counter()
        projectors[kind] = make_projector(kind, model, dim, seed=0).to(device)
        prefix = "" if kind == "sparse" else "hashed_"
        out[f"{prefix}bind_seconds"] = round(time.perf_counter() - t0, 2)
        out[f"{prefix}projector_state_gb"] = projector_state_gb(projectors[kind])
    for length in lengths:
        tokens = random_tokens(n_examples, length, model.config.vocab_size, seed=length)
        rates: dict[str, list[float]] = {"sparse": [], "hashed": []}
        for kind, projector in projectors.items():
            gradex_seconds(model, tokens[:BATCH], projector, precision)  # warm-up
        reset_peak(device)
        for _ in range(repeats):
            for kind, projector in projectors.items():
                rates[kind].append(n_examples / gradex_seconds(model, tokens, projector, precision)[0])
        out[f"grad_samples_per_s_{length}"] = round(statistics.median(rates["sparse"]), 3)
        out[f"hashed_grad_samples_per_s_{length}"] = round(statistics.median(rates["hashed"]), 3)
        if peak_gb(device) is not None:
            out[f"grad_peak_accelerator_gb_{length}"] = peak_gb(device)
        print(f"[full fine-tuning, {params / 1e6:.1f}M params, {length} tokens, d={dim}] gradex "
              f"{out[f'grad_samples_per_s_{length}']:.2f} ex/s (sparse), "
              f"{out[f'hashed_grad_samples_per_s_{length}']:.2f} ex/s (hashed)", flush=True)
    out["peak_rss_gb"] = peak_rss_gb()
    out["layer_batch_gradients_gb"] = layer_batch_gb(model)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: one repeat, few examples")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--device", default="auto", help="auto (default: the GPU if any), cpu, cuda, cuda:N, mps")
    parser.add_argument("--precision", default="bf16",
                        help="bf16 (default, the figures in BENCHMARKS.md), fp16, fp32 or auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    repeats = args.repeats or (1 if args.quick else 3)
    n_lora, n_ref, n_full = (8, 2, 8) if args.quick else (32, 8, 16)
    torch.manual_seed(0)

    model = lora_model(device)
    results = {length: lora_numbers(model, length, repeats, n_lora, 256, precision) for length in (32, 64)}
    lora_layer_gb = layer_batch_gb(model)
    rss_gradex = peak_rss_gb()
    matrix = dense_rademacher(sum(p.numel() for _, p in trainable(model)), 256).to(device)
    for length in (32, 64):
        add_reference(model, results[length], matrix, repeats, n_ref)
    del matrix
    rss_reference = peak_rss_gb()
    del model
    full = full_numbers([32, 64], repeats, n_full, 512, device, precision)

    summary = {
        **results[32],
        "peak_rss_gb": rss_gradex,  # LoRA model, training steps and gradex passes
        "peak_rss_gb_with_reference": rss_reference,  # plus the reference's dense 921,600 x 256 matrix
        "seq64": results[64],
        "full": full,
        "accelerator": {"device": str(device), "precision": precision,
                        "name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                        "lora_layer_batch_gradients_gb": lora_layer_gb},
        "machine": describe(),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "quick": args.quick,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    # the default (bf16 on the CPU) in gradients.json; another device or precision beside it
    suffix = "".join(f"-{part}" for part in (device.type, precision) if part not in ("cpu", "bf16"))
    target = RESULTS.with_name(f"gradients{suffix}.json")
    if not args.quick:
        target.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
