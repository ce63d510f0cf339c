"""Adam's preconditioner at theta*: what makes projected gradients rank subsets like Adam fine-tunes.

Fine-tuning with Adam moves each coordinate by about lr * m / sqrt(v): coordinates with small
gradients travel as far as those with large ones. The first-order effect of training on example s
on the output of example v is then g_v^T D g_s with D = diag(1 / (sqrt(v) + eps)), not g_v^T g_s.
Projecting D^(1/2) g instead of g (gradex.gradients.projectors.Preconditioned) gives the estimator that
geometry. v is measured where the fine-tunes start: the mean over minibatches (the fine-tune's
batch size, its data order) of the squared gradient of the training loss at theta*.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from gradex.data import Tokenized, collate
from gradex.device import autocast, device_of, step_done
from gradex.model import evaluating, trainable, training_loss
from gradex.tensorfile import load_tensors, save_tensors
from gradex.train import epoch_batches

ADAM_EPS = 1e-8  # torch.optim.AdamW's default eps


def second_moments(model: nn.Module, tokens: Sequence[Tokenized], indices: Sequence[int], pad_id: int,
                   batch_size: int, max_batches: int, precision: str = "bf16", seed: int = 0,
                   progress: bool = True) -> dict[str, torch.Tensor]:
    """{parameter name: mean over minibatches of the squared training-loss gradient}, fp32.

    Batches are the fine-tune's first epoch (gradex.train.epoch_batches with its seed), at most
    `max_batches` of them: an average of squares settles after a few dozen batches.
    """
    if max_batches < 1:
        raise ValueError(f"preconditioner_batches must be >= 1, got {max_batches}")
    params = trainable(model)
    plan = epoch_batches(tokens, indices, batch_size, seed, 0)[:max_batches]
    if not plan:
        raise ValueError("second_moments: no training examples")
    sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params}
    device = device_of(model)
    with evaluating(model):  # no dropout: the moments of the model the fine-tune starts from
        for chunk in tqdm(plan, desc="preconditioner", disable=not progress, leave=False):
            batch = collate([tokens[i] for i in chunk], chunk, pad_id).to(device)
            with torch.enable_grad(), autocast(precision, device):
                loss = training_loss(model, batch)
            grads = torch.autograd.grad(loss, [p for _, p in params])
            for (name, _), g in zip(params, grads):
                sums[name] += g.float().square()
            step_done(device)
    return {name: s / len(plan) for name, s in sums.items()}


def adam_scales(moments: dict[str, torch.Tensor], eps: float = ADAM_EPS) -> dict[str, torch.Tensor]:
    """s = D^(1/2) = (sqrt(v) + eps)^(-1/2) per parameter: x = P^T (s * g) has inner products g^T D h."""
    return {name: (v.sqrt() + eps).rsqrt() for name, v in moments.items()}


def bias_corrected(v: torch.Tensor, step: float, beta2: float) -> torch.Tensor:
    """Adam's second moment as its update uses it, v / (1 - beta2^t): fp32, a tensor of its own."""
    return (v.detach().float() / (1 - beta2 ** float(step))).clone(memory_format=torch.contiguous_format)


def from_checkpoint(path: Path, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """{parameter name: Adam's bias-corrected second moment v / (1 - beta2^t)} from the last optimizer
    state of a training run (a gradex.train checkpoint; `names`: its trainable parameters, in order).
    The meta-train's own v at theta*: the preconditioner without a pass of its own (it averages the
    squared gradients of the meta-train's last steps, at its batch size, where the pass measures the
    refit recipe's batches at theta* itself)."""
    from gradex.tensorfile import tensor_json

    tensors = load_tensors(path)
    groups = tensor_json(tensors["state"])["param_groups"]
    beta2 = float(groups[0]["betas"][1])
    out = {}
    for i, name in enumerate(names):
        out[name] = bias_corrected(tensors[f"opt.{i}.exp_avg_sq"], float(tensors[f"opt.{i}.step"]), beta2)
    return out


def from_optimizer(opt: torch.optim.Optimizer, named: Sequence[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{parameter name: Adam's bias-corrected second moment} from a live optimizer's state, as
    `from_checkpoint` reads it from a saved one (`named`: (name, parameter) in the optimizer's order)."""
    beta2 = float(opt.param_groups[0]["betas"][1])
    out = {}
    for name, p in named:
        state = opt.state[p]
        if "exp_avg_sq" not in state:
            raise ValueError(f"from_optimizer: no second moment for {name!r} yet (no step taken)")
        out[name] = bias_corrected(state["exp_avg_sq"], float(state["step"]), beta2)
    return out


def save(moments: dict[str, torch.Tensor], path: Path) -> None:
    save_tensors(moments, path)


def load(path: Path) -> dict[str, torch.Tensor]:
    return load_tensors(path)
