"""Per-example projected gradients of u_s taken from a training step's own backward (ghost products).

The gradient pass runs one forward and one backward per example at theta*. The meta-train has already
run a forward and a backward over every training example in each epoch, and a training step's
backward holds each example's gradient separately at every linear layer: the batch's loss is a sum
over examples, and no example's activations read another's (gradex.gradients.compute says why), so
the output gradient dy[b] of layer l is example b's alone, and example b's weight gradient is
dy[b]^T x[b] (the product GradientComputer forms in its own pass). A `Collector` forms those products
inside the training backward, in the steps it is given (the meta-train's last epoch, where each
training example is seen exactly once), projects them at once, and rescales each row from the
training loss's gradient to u_s's:

    loss piece = scale * sum_b CE_b (CE_b: example b's summed answer-token cross-entropy)
    u_b = -log(expm1(CE_b / n_b))  =>  grad u_b = du/dce(CE_b / n_b) / (n_b * scale) * grad(scale * CE_b)

P is linear, so the rescaling after projection is exact. What is approximate is where: row b is
example b's gradient at the parameters of the step that saw it, not at theta*. benchmarks/last_epoch.py
measured what that costs with `gradex validate`: the store at half the pass's cost, but estimates that
err beyond the seed noise on both scenarios tried, so the gradients stage keeps its pass. The
projector's preconditioner must not move while rows are formed (rows projected with different
scales would not share one geometry), so it is fixed when the first collected step starts.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from gradex.data import Batch
from gradex.gradients.compute import GradientComputer, layer_gradients
from gradex.gradients.projectors import Projector
from gradex.model import CE_FLOOR, EPS, is_encoder_decoder, language_model


def ce_slope(ce: torch.Tensor) -> torch.Tensor:
    """d u / d ce for the "ce" output u = -log(expm1(clamp(ce))) (gradex.model.ce_logodds): -1 / (1 - e^-ce),
    0 where the clamp holds ce at its floor or ceiling (autograd's gradient of the same clamp)."""
    inside = (ce >= CE_FLOOR) & (ce <= -math.log(EPS))
    return torch.where(inside, -1.0 / -torch.expm1(-ce.clamp_min(CE_FLOOR)), torch.zeros_like(ce))


def dropout_in(model: nn.Module) -> str | None:
    """Where a model drops activations in training mode (a dropout module, or an attention dropout
    its config sets), or None."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return f"{name or 'the model'} (p={module.p})"
    config = getattr(language_model(model), "config", None)
    rate = getattr(config, "attention_dropout", 0.0) or 0.0
    return f"config.attention_dropout={rate}" if float(rate) > 0 else None


class Collector:
    """Collect the projected per-example gradients of u_s ("ce" output) in the given training steps.

    `projector(optimizer)` makes the projector when the first collected step starts (so a
    preconditioner can be read from the optimizer's moments at that point); `steps` are 0-based
    optimizer steps. gradex.train.train calls `wants`, `begin_piece` before a piece's forward and
    `end_piece` after its backward; `rows` gives the result."""

    def __init__(self, model: nn.Module, projector: Callable[[torch.optim.Optimizer], Projector], steps: range):
        if is_encoder_decoder(model):  # end_piece counts a causal LM's answer tokens
            raise ValueError("collector: causal language models only (an encoder-decoder scores its answer otherwise)")
        computer = GradientComputer(model, "hooks")  # every trainable parameter in a linear layer, or an error
        dropout = dropout_in(model)
        if dropout:
            raise ValueError(f"collector: the model drops activations in training ({dropout}), so a training step's "
                             f"gradients are not the gradient pass's; collect from a model without dropout")
        self.hooked, self.layout = computer.hooked, computer.layout
        self.make_projector, self.steps = projector, steps
        self.projector: Projector | None = None
        self.x: dict[int, torch.Tensor] = {}  # dataset position -> projected gradient of u_s (d,)
        self._acc: torch.Tensor | None = None
        self._handles: list = []

    def wants(self, step: int) -> bool:
        return step in self.steps

    def begin_piece(self, batch: Batch, opt: torch.optim.Optimizer) -> None:
        """Before a piece's forward: hook every trainable linear so its backward projects each example's product."""
        if self.projector is None:
            self.projector = self.make_projector(opt)
            if not self.projector.layout:
                self.projector.bind(self.layout)
        self._acc = self.projector.start(batch.input_ids.shape[0])
        self._handles = [m.register_forward_hook(self._save) for m in self.hooked]

    def _save(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        x = inputs[0].detach()
        if output.requires_grad:
            output.register_hook(lambda dy, module=module, x=x: self._project(module, x, dy))

    def _project(self, module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> None:
        bsz = self._acc.shape[0]
        for name, g in layer_gradients(module, self.hooked[module], x, dy.detach(), bsz):
            self.projector.add(self._acc, name, g.reshape(bsz, -1))

    def end_piece(self, batch: Batch, ce_sums: torch.Tensor, scale: float) -> None:
        """After the piece's backward: rescale its rows from the loss's gradient to u_s's, and keep them.
        `ce_sums` (B,): each example's summed answer-token cross-entropy; `scale`: the factor the
        piece's loss was multiplied by before its backward."""
        for h in self._handles:
            h.remove()
        self._handles = []
        n_answer = batch.answer_mask[:, 1:].sum(1).to(ce_sums)  # answer tokens each example's loss sums over
        factor = ce_slope(ce_sums / n_answer) / (n_answer * scale)
        rows = (self.projector.result(self._acc) * factor[:, None].to(self._acc)).cpu()
        for b, i in enumerate(batch.index.tolist()):
            if i in self.x:
                raise ValueError(f"collector: example {i} was seen twice in the collected steps")
            self.x[i] = rows[b]
        self._acc = None

    def rows(self, indices: list[int]) -> torch.Tensor:
        """(len(indices), d): the collected rows in this order; an error when one was never seen."""
        missing = [i for i in indices if i not in self.x]
        if missing:
            raise ValueError(f"collector: {len(missing)} examples were not seen in the collected steps "
                             f"(e.g. {missing[:3]}); the steps must cover an epoch")
        return torch.stack([self.x[i] for i in indices])
