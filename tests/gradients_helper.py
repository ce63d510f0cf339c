"""Writes a gradient store for a tiny deterministic model; run by tests/test_store.py in subprocesses.

    python tests/gradients_helper.py OUT [--slow SECONDS] [--n N]
    accelerate launch --multi_gpu --num_processes 2 tests/gradients_helper.py OUT   (torchrun on CPU)

Prints one JSON line on rank 0: the number of chunks this run computed and the store's size.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    from gradex.config import LoraConfig, ModelConfig
    from gradex.model import make_trainable, trainable

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    model = make_trainable(model, ModelConfig(lora=LoraConfig(r=4)), seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in trainable(model):
            if "lora_B" in name:  # peft starts B at 0, which would make every A gradient 0
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def tiny_tokens(n: int, seed: int = 0):
    from gradex.data import Tokenized

    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(5, 16, (1,), generator=gen))
        answer = int(torch.randint(1, 4, (1,), generator=gen))
        out.append(Tokenized(torch.randint(1, 64, (length,), generator=gen).tolist(), length - answer))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--slow", type=float, default=0.0, help="sleep this long per batch (to be killed mid-way)")
    parser.add_argument("--n", type=int, default=60)
    parser.add_argument("--precision", default="fp32")
    args = parser.parse_args()
    torch.set_num_threads(1)  # identical kernels in every process, so stores are byte-comparable

    from gradex.gradients import make_projector, store

    model = tiny_model()
    if args.slow:
        model.register_forward_pre_hook(lambda *_: time.sleep(args.slow))
    computed = []
    compute_chunk = store._compute_chunk

    def counting(*a, **k):
        computed.append(1)
        return compute_chunk(*a, **k)

    store._compute_chunk = counting
    tokens = tiny_tokens(args.n)
    indices = list(range(args.n))[::-1]
    result = store.compute_store(model, tokens, indices, pad_id=0, out_dir=args.out,
                                 projector=make_projector("sparse", dim=16, seed=3), batch_size=3, chunk_size=4,
                                 precision=args.precision, manifest_extra={"model": "tiny-llama"}, progress=False)
    import os

    if os.environ.get("RANK", "0") == "0":
        print(json.dumps({"computed_chunks": len(computed), "n": len(result), "dim": result.dim,
                          "world_size": result.manifest["world_size"]}), flush=True)


if __name__ == "__main__":
    main()
