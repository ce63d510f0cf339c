"""Per-example gradients of u_s (gradex.model.example_outputs, either output) with respect to the trainable parameters.

Fast path ("hooks"): forward hooks on every nn.Linear / transformers Conv1D whose weight (or bias)
is trainable save the module's input and output; one batched backward of sum_b u_b gives each
output's gradient, and since examples are independent, example b's weight gradient is
sum_t dy[b, t] x[b, t]^T (one bmm per module). Padded positions have zero output gradient, because
u_s reads only answer positions and no answer position reads a padded one, so they do not leak: a
causal LM's attention is causal with right padding; an encoder-decoder's (T5: hooks on the linears of
encoder and decoder alike) encoder masks its padded prompt positions as keys, in its own attention
and in the decoder's cross-attention, and its decoder is causal with right-padded answers.
Each module's per-example gradients are handed to a sink (e.g. a projector) at once; the full
per-example gradient of the model is never formed.

Fallback ("loop"): one torch.autograd.grad per example, for parameters no hook covers (method
"hooks+loop", on the same batched graph) or for every parameter (method "loop", one forward per
example, no padding: the plain reference).

The model may run under bf16 autocast; per-example gradients are formed and projected in fp32, the
LM head and the output function run in fp32 (gradex.model.answer_logits), and the u_s returned come
from a second, fp32 forward unless the caller asks for the pass's own (the store does by default:
gradients.offsets).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from gradex.data import Batch
from gradex.device import autocast, device_of, resolve_precision
from gradex.model import evaluating, example_outputs, is_conv1d, language_model, trainable
from gradex.gradients.projectors import Projector

Sink = Callable[[str, torch.Tensor], None]  # (parameter name, per-example gradients (B, n_param) fp32)
METHODS = ("auto", "hooks", "loop")


class GradientComputer:
    """Per-example gradients of u_s for one model; `method` is auto (hooks where possible) | hooks | loop."""

    def __init__(self, model: nn.Module, method: str = "auto", output: str = "ce"):
        if method not in METHODS:
            raise ValueError(f"unknown gradient method {method!r}; choose one of {METHODS}")
        self.model = model
        self.output = output  # which u_s (gradex.model.OUTPUTS)
        self.params = trainable(model)
        if not self.params:
            raise ValueError("the model has no trainable parameters (call gradex.model.make_trainable first)")
        names = {id(p): n for n, p in self.params}
        # module -> (weight name or None, bias name or None) for hookable modules with a trainable part
        self.hooked: dict[nn.Module, tuple[str | None, str | None]] = {}
        if method != "loop":
            # the head reads the answer positions of every row flattened together (answer_logits), not
            # (B, T, d): the per-row products cannot be formed there, so its layers (LoRA on lm_head) are
            # left to the per-example loop
            head = language_model(model).get_output_embeddings()
            at_head = set(head.modules()) if head is not None else set()
            for module in model.modules():
                if module in at_head or not (isinstance(module, nn.Linear) or is_conv1d(module)):
                    continue
                w = names.get(id(module.weight))
                b = names.get(id(module.bias)) if module.bias is not None else None
                if w is not None or b is not None:
                    self.hooked[module] = (w, b)
        covered = {n for pair in self.hooked.values() for n in pair if n is not None}
        self.uncovered = [(n, p) for n, p in self.params if n not in covered]
        if method == "hooks" and self.uncovered:
            raise ValueError(f"method='hooks' cannot cover parameters {[n for n, _ in self.uncovered][:5]} "
                             f"(not weights of nn.Linear / Conv1D); use method='auto'")
        if method == "loop":
            self.method = "loop"
        else:
            self.method = "hooks" if not self.uncovered else ("hooks+loop" if self.hooked else "loop")

    @property
    def layout(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every trainable parameter in trainable() order: what a projector binds to."""
        return [(n, tuple(p.shape)) for n, p in self.params]

    # ------------------------------------------------------------------ public entry points
    def run(self, batch: Batch, sink: Sink, precision: str = "bf16", fp32_outputs: bool = True) -> torch.Tensor:
        """Feed every trainable parameter's per-example gradients (B, n_param) to `sink`; return u (B,) fp32,
        from an fp32 forward (`fp32_outputs`) or from the pass's own forward in `precision`."""
        batch = batch.to(device_of(self.model))  # computed where the model is
        with evaluating(self.model):
            u = self._loop(batch, sink, precision) if self.method == "loop" else self._hooks(batch, sink, precision)
        if fp32_outputs and resolve_precision(precision, device_of(self.model)) != "fp32":
            u = self.fp32_outputs(batch)
        return u

    @torch.no_grad()
    def fp32_outputs(self, batch: Batch) -> torch.Tensor:
        """u (B,) from an fp32 forward in eval mode. Why a second forward under bf16: u_s is the offset of
        every example's logistic loss, compared with validation losses measured in fp32, and bf16 hidden
        states move it (by 1e-3 on the tests' tiny Llama; by 0.026 on average, at most 0.15, in log-odds
        on SmolLM2-135M at the default's theta*). Gradients only set directions and stay bf16 (with fp32
        logits). The store leaves it out by default (gradients.offsets: pass): it took 44-47% of the
        pass, and `validate` found the estimates the same without it."""
        with evaluating(self.model):
            return example_outputs(self.model, batch.to(device_of(self.model)), self.output).float()

    def projected(self, batch: Batch, projector: Projector, precision: str = "bf16",
                  fp32_outputs: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(x (B, d), u (B,)): projected per-example gradients and outputs, both fp32 (u from an fp32
        forward, or the pass's own: `run`)."""
        acc = projector.start(batch.input_ids.shape[0])
        u = self.run(batch, lambda name, g: projector.add(acc, name, g), precision, fp32_outputs)
        return projector.result(acc), u

    def per_example(self, batch: Batch, precision: str = "fp32") -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """({name: (B, *shape)}, u): unprojected per-example gradients. For checks and small models."""
        out: dict[str, torch.Tensor] = {}

        def keep(name: str, g: torch.Tensor) -> None:
            out[name] = out[name] + g if name in out else g.clone()

        u = self.run(batch, keep, precision)
        bsz = batch.input_ids.shape[0]
        shaped = {}
        for name, p in self.params:
            g = out.get(name)
            shaped[name] = torch.zeros(bsz, *p.shape, device=p.device) if g is None else g.reshape(bsz, *p.shape)
        return shaped, u

    # ------------------------------------------------------------------ hooks
    def _hooks(self, batch: Batch, sink: Sink, precision: str) -> torch.Tensor:
        calls: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []

        def save(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            calls.append((module, inputs[0].detach(), output))

        handles = [m.register_forward_hook(save) for m in self.hooked]
        try:
            with torch.enable_grad(), autocast(precision, device_of(self.model)):
                u = example_outputs(self.model, batch, self.output)
        finally:
            for h in handles:
                h.remove()
        bsz = u.shape[0]
        outputs = [y for _, _, y in calls]
        grads = list(torch.autograd.grad(u.sum(), outputs, allow_unused=True, retain_graph=bool(self.uncovered))
                     if outputs else [])
        del outputs
        last_call = {module: i for i, (module, _, _) in enumerate(calls)}
        pending: dict[nn.Module, dict[str, torch.Tensor]] = {}  # modules called more than once (shared weights)
        for i, (module, x, _) in enumerate(calls):
            dy, grads[i], calls[i] = grads[i], None, None  # free each layer's tensors as soon as it is done
            acc = pending.setdefault(module, {})
            if dy is not None:
                for name, g in layer_gradients(module, self.hooked[module], x, dy, bsz):
                    acc[name] = acc[name] + g if name in acc else g
            if last_call[module] == i:  # hand over this layer's per-example gradients now: never all at once
                for name, g in pending.pop(module).items():
                    sink(name, g.reshape(bsz, -1))
        if self.uncovered:
            self._loop_on_graph(u, sink)
        return u.detach().float()

    # ------------------------------------------------------------------ loops
    def _loop_on_graph(self, u: torch.Tensor, sink: Sink) -> None:
        """Per-example autograd.grad for the parameters hooks do not cover, on the batched graph."""
        params = [p for _, p in self.uncovered]
        rows: list[list[torch.Tensor]] = [[] for _ in params]
        for b in range(u.shape[0]):
            gs = torch.autograd.grad(u[b], params, allow_unused=True, retain_graph=b < u.shape[0] - 1)
            for i, (g, p) in enumerate(zip(gs, params)):
                rows[i].append(torch.zeros(p.numel(), device=p.device) if g is None else g.reshape(-1).float())
        for (name, _), r in zip(self.uncovered, rows):
            sink(name, torch.stack(r))

    def _loop(self, batch: Batch, sink: Sink, precision: str) -> torch.Tensor:
        """The plain reference: each example alone (no padding), one forward and one autograd.grad."""
        params = [p for _, p in self.params]
        rows: list[list[torch.Tensor]] = [[] for _ in params]
        us = []
        for b in range(batch.input_ids.shape[0]):
            single = single_example(batch, b)
            with torch.enable_grad(), autocast(precision, device_of(self.model)):
                u = example_outputs(self.model, single, self.output)[0]
            gs = torch.autograd.grad(u, params, allow_unused=True)
            for i, (g, p) in enumerate(zip(gs, params)):
                rows[i].append(torch.zeros(p.numel(), device=p.device) if g is None else g.reshape(-1).float())
            us.append(u.detach().float())
        for (name, _), r in zip(self.params, rows):
            sink(name, torch.stack(r))
        return torch.stack(us)


def layer_gradients(module: nn.Module, names: tuple[str | None, str | None], x: torch.Tensor, dy: torch.Tensor,
                    bsz: int) -> list[tuple[str, torch.Tensor]]:
    """(name, per-example gradients (B, ...) fp32) of a linear layer's trainable weight and bias, from
    its input x and its output's gradient dy: example b's weight gradient is sum_t dy[b, t] x[b, t]^T,
    one bmm for the batch (`names`: the weight's and the bias's parameter names, None if frozen)."""
    w_name, b_name = names
    x = x.reshape(bsz, -1, x.shape[-1]).float()
    dy = dy.reshape(bsz, -1, dy.shape[-1]).float()
    out = []
    if w_name is not None:  # Linear weight (out, in): dy^T x; Conv1D weight (in, out): x^T dy
        out.append((w_name, torch.bmm(x.transpose(1, 2), dy) if is_conv1d(module) else torch.bmm(dy.transpose(1, 2), x)))
    if b_name is not None:
        out.append((b_name, dy.sum(1)))
    return out


def single_example(batch: Batch, b: int) -> Batch:
    """Row b of a batch as a batch of one, without its padding."""
    n = int(batch.attention_mask[b].sum())
    return Batch(batch.input_ids[b:b + 1, :n], batch.attention_mask[b:b + 1, :n],
                 batch.answer_mask[b:b + 1, :n], batch.index[b:b + 1])
