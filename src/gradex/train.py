"""One training loop for the meta-initialization, the final fine-tune and the validation fine-tunes.

The loop is deliberately small: AdamW on the trainable parameters, linear warm-up then linear
decay, token-level cross-entropy on answer tokens. The data order depends only on the seed and
the epoch, so a run resumed from its checkpoint takes exactly the steps it would have taken.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from gradex.config import TrainConfig
from gradex.data import Tokenized, collate
from gradex.model import autocast, save_atomic, trainable, training_loss


def total_steps(recipe: TrainConfig, n_examples: int) -> int:
    """Steps for `epochs` passes over the data (so bigger subsets get proportionally more steps)."""
    if recipe.max_steps is not None:
        return recipe.max_steps
    return max(1, math.ceil(recipe.epochs * math.ceil(n_examples / recipe.batch_size)))


def epoch_batches(tokens: Sequence[Tokenized], indices: Sequence[int], batch_size: int, seed: int,
                  epoch: int) -> list[list[int]]:
    """One epoch of batches: a seeded shuffle, grouped by length within windows of 8 batches so
    a batch is padded to its own longest example rather than the data set's, then batches shuffled."""
    rng = random.Random(f"{seed}:{epoch}")
    perm = list(indices)
    rng.shuffle(perm)
    window = 8 * batch_size
    out: list[list[int]] = []
    for start in range(0, len(perm), window):
        group = sorted(perm[start:start + window], key=lambda i: len(tokens[i].ids))
        out += [group[k:k + batch_size] for k in range(0, len(group), batch_size)]
    rng.shuffle(out)
    return out


def train(model: nn.Module, tokens: Sequence[Tokenized], indices: Sequence[int], recipe: TrainConfig,
          pad_id: int, precision: str = "bf16", checkpoint: Path | None = None, desc: str = "train",
          save_every: int = 20, progress: bool = True,
          on_step: Callable[[int], None] | None = None) -> list[dict]:
    """Train in place; return the per-step log. With `checkpoint`, resume from and save to it.
    `on_step(k)` is called after the k-th optimizer step (diagnostics take snapshots there)."""
    params = [p for _, p in trainable(model)]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps = total_steps(recipe, len(indices))
    warm = max(1, int(recipe.warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
    log: list[dict] = []
    start = 0
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        with torch.no_grad():
            for p, saved in zip(params, state["params"]):
                p.copy_(saved)
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start, log = state["step"], state["log"]
    model.train()
    bar = tqdm(range(start, steps), desc=desc, initial=start, total=steps, disable=not progress, leave=False)
    t0 = time.perf_counter()
    per_epoch = math.ceil(len(indices) / recipe.batch_size)
    epoch, plan = -1, []
    for step in bar:
        if step // per_epoch != epoch:
            epoch = step // per_epoch
            plan = epoch_batches(tokens, indices, recipe.batch_size, recipe.seed, epoch)
        chunk = plan[step % per_epoch]
        batch = collate([tokens[i] for i in chunk], chunk, pad_id)
        with autocast(precision):
            loss = training_loss(model, batch)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        log.append({"step": step + 1, "loss": round(loss.item(), 5), "seconds": round(time.perf_counter() - t0, 2)})
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if on_step is not None:
            on_step(step + 1)
        if checkpoint is not None and ((step + 1) % save_every == 0 or step + 1 == steps):
            _save(checkpoint, params, opt, sched, step + 1, log)
    model.eval()
    return log


def _save(path: Path, params: list[torch.Tensor], opt, sched, step: int, log: list[dict]) -> None:
    save_atomic({"params": [p.detach().clone() for p in params], "opt": opt.state_dict(),
                 "sched": sched.state_dict(), "step": step, "log": log}, path)


def write_log(log: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in log) + "\n")
