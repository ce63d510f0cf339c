"""One training loop for the meta-initialization, the final fine-tune and the validation fine-tunes.

The loop is deliberately small: AdamW on the trainable parameters, linear warm-up then linear
decay, token-level cross-entropy on answer tokens. The data order depends only on the seed and
the epoch, so a run resumed from its checkpoint takes exactly the steps it would have taken.

The model trains where it is (gradex.device). Under a launch of N processes each process computes its
share of every batch (rows rank, rank + N, ...) and DistributedDataParallel (through accelerate) sums
the gradients; with `micro_batch_size` a share is computed in pieces whose gradients accumulate.
Every piece's loss is its answer tokens' summed cross-entropy over the whole batch's answer-token
count, so pieces and processes add up to the one-process batch's mean loss and gradient exactly
(up to float summation order): the steps do not depend on how the batch was split.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from gradex.atomic import write_bytes
from gradex.config import TrainConfig
from gradex.data import Batch, Tokenized, collate
from gradex.device import accelerator, autocast, device_of, step_done
from gradex.launch import barrier, distributed
from gradex.model import answer_logits, token_nll, trainable
from gradex.tensorfile import json_tensor, load_tensors, save_tensors, tensor_json

CHECKPOINT_FORMAT = 2  # a tensor file (gradex.tensorfile); 1 was a pickled dict, no longer read


def total_steps(recipe: TrainConfig, n_examples: int) -> int:
    """Steps for `epochs` passes over the data (so bigger subsets get proportionally more steps)."""
    if recipe.max_steps is not None:
        return recipe.max_steps
    return max(1, math.ceil(recipe.epochs * math.ceil(n_examples / recipe.batch_size)))


def budget_steps(recipe: TrainConfig, budget: str, n_all: int, tokens_all: int = 0,
                 max_tokens: int | None = None) -> int | None:
    """The optimizer steps of every fine-tune of a mix under `budget` (finetune.budget): `max_steps`,
    else `max_tokens` over batches of the all-sources mix's mean example (n_all examples, tokens_all
    tokens), else under `equal` the steps `epochs` passes over the all-sources mix take. None under
    `epochs` without max_steps: each mix then takes `epochs` passes over its own data."""
    if recipe.max_steps is not None:
        return recipe.max_steps
    if max_tokens is not None:
        return max(1, math.ceil(max_tokens * n_all / (recipe.batch_size * max(tokens_all, 1))))
    if budget == "epochs":
        return None
    return total_steps(recipe, n_all)


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


class Collecting(Protocol):
    """What `train` calls on a collector (gradex.gradients.collect.Collector): whether it wants a step,
    then before each piece's forward and after its backward."""

    def wants(self, step: int) -> bool: ...

    def begin_piece(self, batch: Batch, opt: torch.optim.Optimizer) -> None: ...

    def end_piece(self, batch: Batch, ce_sums: torch.Tensor, scale: float) -> None: ...


class AnswerLoss(nn.Module):
    """The summed cross-entropy of a batch's answer tokens: the module DistributedDataParallel wraps,
    since DDP synchronizes gradients around its own forward (the LM head runs at answer positions
    only, outside the transformers model's forward)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.keep_sums = False  # a Collector rescales each example's row by its own cross-entropy
        self.sums: torch.Tensor | None = None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
        logits, targets, rows = answer_logits(self.model, Batch(input_ids, attention_mask, answer_mask, torch.empty(0)))
        if self.keep_sums:  # beside the loss, not instead of it: the steps stay the same bit for bit
            with torch.no_grad():
                nll = token_nll(logits.detach(), targets)
                self.sums = torch.zeros(input_ids.shape[0], device=nll.device, dtype=nll.dtype).index_add_(0, rows, nll)
        return nn.functional.cross_entropy(logits, targets, reduction="sum")


def answer_tokens(tokens: Sequence[Tokenized], rows: Sequence[int]) -> int:
    """How many answer tokens the loss of these examples averages over (every prompt is non-empty)."""
    return sum(len(tokens[i].ids) - tokens[i].n_prompt for i in rows)


def shares(chunk: list[int], rank: int, world: int, micro: int | None) -> list[tuple[list[int], float]]:
    """This process's pieces of one batch: (rows, weight). A process whose share is empty (a batch
    smaller than the launch) still takes part in the gradient sum, with one row at weight 0."""
    mine = chunk[rank::world]
    if not mine:
        return [(chunk[:1], 0.0)]
    size = micro or len(mine)
    return [(mine[k:k + size], 1.0) for k in range(0, len(mine), size)]


def train(model: nn.Module, tokens: Sequence[Tokenized], indices: Sequence[int], recipe: TrainConfig,
          pad_id: int, precision: str = "bf16", checkpoint: Path | None = None, desc: str = "train",
          save_every: int = 20, progress: bool = True,
          on_step: Callable[[int], None] | None = None, collector: Collecting | None = None) -> list[dict]:
    """Train in place; return the per-step log. With `checkpoint`, resume from and save to it (rank 0
    writes it). `on_step(k)` is called after the k-th optimizer step (diagnostics take snapshots there).
    `collector` (gradex.gradients.collect) takes each example's projected gradient from the backward
    of the steps it wants, without changing them."""
    device = device_of(model)
    rank, world = distributed()
    accelerate = accelerator(precision, device)
    params = [p for _, p in trainable(model)]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps = total_steps(recipe, len(indices))
    warm = max(1, int(recipe.warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
    log: list[dict] = []
    start = 0
    if checkpoint is not None and checkpoint.exists():
        start, log = _resume(checkpoint, params, opt, sched, accelerate.scaler)
    loss_of = AnswerLoss(model)
    # DDP only when this stage runs on every process (gradex.launch.distributed), through accelerate
    ddp = accelerate.prepare_model(loss_of, device_placement=False) if world > 1 else loss_of
    stepper = accelerate.prepare_optimizer(opt, device_placement=False)  # fp16: loss scaling, skipped steps
    model.train()
    bar = tqdm(range(start, steps), desc=desc, initial=start, total=steps, disable=not progress or rank != 0,
               leave=False)
    t0 = time.perf_counter()
    per_epoch = math.ceil(len(indices) / recipe.batch_size)
    epoch, plan = -1, []
    for step in bar:
        if step // per_epoch != epoch:
            epoch = step // per_epoch
            plan = epoch_batches(tokens, indices, recipe.batch_size, recipe.seed, epoch)
        chunk = plan[step % per_epoch]
        count = answer_tokens(tokens, chunk)
        pieces = shares(chunk, rank, world, recipe.micro_batch_size)
        total = torch.zeros((), device=device)
        collecting = collector is not None and collector.wants(step)
        loss_of.keep_sums = collecting
        for k, (rows, weight) in enumerate(pieces):
            batch = collate([tokens[i] for i in rows], rows, pad_id).to(device)
            sync = contextlib.nullcontext() if k == len(pieces) - 1 or world == 1 else accelerate.no_sync(ddp)
            # x world: DDP averages the processes' gradients, and the batch's loss is their sum. (A
            # tensor, not a Python float: the lazy device's backward fails on a float64 scalar.)
            scale = torch.tensor(weight * world / count, device=device)
            if collecting:
                collector.begin_piece(batch, opt)
            with sync:
                with autocast(precision, device):
                    piece = ddp(batch.input_ids, batch.attention_mask, batch.answer_mask)
                accelerate.backward(piece * scale)
            if collecting:
                collector.end_piece(batch, loss_of.sums, float(scale))
            total = total + piece.detach() * weight
        stepper.step()
        sched.step()
        stepper.zero_grad(set_to_none=True)
        step_done(device)
        if world > 1:
            torch.distributed.all_reduce(total)  # the whole batch's loss, for the log every process keeps alike
        loss = total.item() / count
        if not math.isfinite(loss):  # stop before the checkpoint keeps a poisoned state
            raise FloatingPointError(f"{desc}: the training loss is {loss} at step {step + 1}; its batch holds the "
                                     f"examples {sorted(chunk)} (positions in the run's examples, data/examples.jsonl "
                                     f"first); lower the learning rate or use another model.precision")
        log.append({"step": step + 1, "loss": round(loss, 5), "seconds": round(time.perf_counter() - t0, 2)})
        bar.set_postfix(loss=f"{loss:.3f}")
        if on_step is not None:
            on_step(step + 1)
        if checkpoint is not None and ((step + 1) % save_every == 0 or step + 1 == steps):
            if rank == 0:
                _save(checkpoint, params, opt, sched, step + 1, log, accelerate.scaler)
            barrier(world)  # no process runs ahead of a checkpoint it might resume from
    model.eval()
    return log


def _save(path: Path, params: list[torch.Tensor], opt: torch.optim.Optimizer,
          sched: torch.optim.lr_scheduler.LRScheduler, step: int, log: list[dict],
          scaler: torch.amp.GradScaler | None = None) -> None:
    """Everything a resumed run needs to take the same steps, as tensors plus JSON (no pickled
    objects): the parameters, the optimizer's per-parameter tensors, torch's RNG state (dropout), and
    the optimizer's settings, the scheduler, fp16's loss scale (`scaler`), the step and the log."""
    tensors = {f"param.{i}": p for i, p in enumerate(params)}
    opt_state = opt.state_dict()
    scalars: dict[str, dict] = {}
    for i, slots in opt_state["state"].items():
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{i}.{key}"] = value
            else:
                scalars.setdefault(str(i), {})[key] = value
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    tensors["state"] = json_tensor({"format": CHECKPOINT_FORMAT, "step": step, "log": log, "opt_scalars": scalars,
                                    "param_groups": opt_state["param_groups"], "sched": sched.state_dict(),
                                    "scaler": scaler.state_dict() if scaler is not None else None})
    save_tensors(tensors, path)


def _resume(path: Path, params: list[torch.Tensor], opt: torch.optim.Optimizer,
            sched: torch.optim.lr_scheduler.LRScheduler,
            scaler: torch.amp.GradScaler | None = None) -> tuple[int, list[dict]]:
    """Load what `_save` wrote into the parameters, optimizer, scheduler, loss scale and RNG; (step, log)."""
    tensors = load_tensors(path)
    state = tensor_json(tensors["state"]) if "state" in tensors else {}
    if state.get("format") != CHECKPOINT_FORMAT or sum(k.startswith("param.") for k in tensors) != len(params):
        raise ValueError(f"{path}: a checkpoint of another gradex version or of other parameters; "
                         f"delete it to train from the start")
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(tensors[f"param.{i}"])
    slots: dict[int, dict] = {}
    for name, t in tensors.items():
        if name.startswith("opt."):
            _, i, key = name.split(".", 2)
            slots.setdefault(int(i), {})[key] = t
    for i, values in state["opt_scalars"].items():
        slots.setdefault(int(i), {}).update(values)
    groups = state["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])  # JSON made the tuple a list
    opt.load_state_dict({"state": slots, "param_groups": groups})
    sched.load_state_dict(state["sched"])
    if scaler is not None and state.get("scaler"):  # fp16: resume at the scale the run had reached
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return state["step"], state["log"]


def write_log(log: list[dict], path: Path) -> None:
    write_bytes(path, ("\n".join(json.dumps(r) for r in log) + "\n").encode())
