"""Gradients collected inside training steps (gradex.gradients.collect) against the gradient pass's at the same parameters."""

from __future__ import annotations

import copy

import pytest
import torch

from gradex.config import TrainConfig
from gradex.data import collate
from gradex.gradients import GradientComputer, make_projector
from gradex.gradients.collect import Collector, ce_slope
from gradex.gradients.preconditioner import adam_scales, from_optimizer
from gradex.gradients.projectors import Preconditioned
from gradex.model import trainable, trainable_vector
from gradex.train import epoch_batches, train
from test_gradients import CASES, build, tokens

LENGTHS = [7, 12, 9, 5, 12, 8, 10, 6]


def without_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """GPT-2 drops activations in training (a Collector refuses that); SmolLM2 and Llama do not."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def oracle_rows(model: torch.nn.Module, toks: list, indices: list[int], projector) -> torch.Tensor:
    """The gradient pass's projected gradients of u_s at the model's parameters, one example at a time."""
    computer = GradientComputer(model, "loop")
    rows = []
    for i in indices:
        x, _ = computer.projected(collate([toks[i]], [i], 0), projector, "fp32")
        rows.append(x[0])
    return torch.stack(rows)


@pytest.mark.parametrize("arch,finetune,targets", CASES)
def test_one_step_rows_equal_the_pass_at_the_step_parameters(arch: str, finetune: str, targets) -> None:
    model = without_dropout(build(arch, finetune, targets))
    toks = tokens(LENGTHS)
    before = copy.deepcopy(model)
    projector = make_projector("sparse", model, dim=32, seed=1)
    everything = list(range(len(toks)))
    # one step of a batch of every example: each row is taken at the starting parameters
    collector = Collector(model, lambda opt: projector, range(0, 1))
    train(model, toks, everything, TrainConfig(epochs=1, batch_size=len(toks), lr=1e-2), 0, "fp32",
          progress=False, collector=collector)
    assert not torch.equal(trainable_vector(model), trainable_vector(before))  # it trained
    want = oracle_rows(before, toks, everything, projector)
    got = collector.rows(everything)
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * want.abs().max().item())


def test_an_epoch_of_steps_collects_every_example_at_its_own_step_without_changing_the_steps() -> None:
    toks = tokens(LENGTHS)
    everything = list(range(len(toks)))
    recipe = TrainConfig(epochs=2, batch_size=3, lr=1e-2, micro_batch_size=2)  # pieces: rescaled per piece
    plain = build("llama", "lora")
    train(plain, toks, everything, recipe, 0, "fp32", progress=False)

    model = build("llama", "lora")
    per_epoch = 3
    snapshots: dict[int, torch.nn.Module] = {}
    scales: list = []

    def preconditioned(opt):  # fixed at the first collected step, from the optimizer's moments then
        scales.append(adam_scales(from_optimizer(opt, trainable(model))))
        return Preconditioned(make_projector("sparse", model, dim=32, seed=1), scales[0])

    collector = Collector(model, preconditioned, range(per_epoch, 2 * per_epoch))
    train(model, toks, everything, recipe, 0, "fp32", progress=False, collector=collector,
          on_step=lambda k: snapshots.__setitem__(k, copy.deepcopy(model)))
    assert torch.equal(trainable_vector(model), trainable_vector(plain))  # collecting leaves the steps alone

    projector = collector.projector
    plan = epoch_batches(toks, everything, recipe.batch_size, recipe.seed, 1)
    for k, chunk in enumerate(plan):  # step per_epoch + k saw `chunk` at the parameters after step per_epoch + k
        want = oracle_rows(snapshots[per_epoch + k], toks, chunk, projector)
        torch.testing.assert_close(collector.rows(chunk), want, rtol=1e-4, atol=1e-6 * want.abs().max().item())
    with pytest.raises(ValueError, match="not seen"):
        collector.rows([len(toks)])


def test_ce_slope_is_autograds_slope_of_the_clamped_log_odds() -> None:
    from gradex.model import CE_FLOOR, ce_logodds

    ce = torch.tensor([CE_FLOOR / 2, CE_FLOOR * 2, 0.3, 2.0, 20.0], dtype=torch.float64, requires_grad=True)
    ce_logodds(ce).sum().backward()
    torch.testing.assert_close(ce_slope(ce.detach()), ce.grad)


def test_a_model_that_drops_activations_is_refused() -> None:
    with pytest.raises(ValueError, match="drops activations"):
        Collector(build("gpt2", "lora", ["c_attn"]), lambda opt: None, range(1))


def test_an_encoder_decoder_is_refused() -> None:
    from test_t5 import tiny_t5

    with pytest.raises(ValueError, match="causal language models only"):
        Collector(tiny_t5(64), lambda opt: None, range(1))
