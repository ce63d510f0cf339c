"""The per-example output u_s under both definitions, against oracles computed from full logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gradex.data import collate
from gradex.gradients import GradientComputer
from gradex.model import OUTPUTS, example_outputs, example_outputs_and_nll
from test_gradients import LENGTHS, assert_grads_close, build, tokens


def oracle(model: torch.nn.Module, toks) -> tuple[list[float], list[float]]:
    """(mean token log-odds, mean token cross-entropy) per example, one example at a time from full logits."""
    mean_logodds, ce = [], []
    for t in toks:
        ids = torch.tensor([t.ids])
        logp = F.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        pos = torch.arange(t.n_prompt, len(t.ids))
        lp = logp[pos - 1, ids[0, pos]]  # position t-1 predicts token t
        mean_logodds.append(float((lp - torch.log1p(-lp.exp())).mean().detach()))
        ce.append(float(-lp.mean().detach()))
    return mean_logodds, ce


def test_outputs_match_full_logit_oracle() -> None:
    model = build("llama", "lora")
    with torch.no_grad():  # a sharper head: tokens of one answer get very different probabilities
        model.get_base_model().lm_head.weight.mul_(8)
    toks = tokens(LENGTHS)
    batch = collate(toks, range(len(toks)), pad_id=0)
    want_logodds, want_ce = oracle(model, toks)
    with torch.no_grad():
        u_ce, nll = example_outputs_and_nll(model, batch, "ce")
        u_mean = example_outputs(model, batch, "mean-logodds")
    torch.testing.assert_close(nll.double(), torch.tensor(want_ce, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(u_mean.double(), torch.tensor(want_logodds, dtype=torch.float64), rtol=1e-4, atol=1e-5)
    # the defining property of "ce": its logistic loss is the example's mean token cross-entropy
    torch.testing.assert_close(F.softplus(-u_ce.double()), torch.tensor(want_ce, dtype=torch.float64),
                               rtol=1e-5, atol=1e-6)
    # the two differ whenever an answer's tokens are not equally certain
    assert (u_ce - u_mean).abs().max() > 1e-2


def test_ce_output_is_floored_and_clipped() -> None:
    """CE at or below CE_FLOOR gives the floor's u_s and no gradient (du/dCE ~ -1/CE no longer reaches
    near-solved examples); large CE is clipped like the token log-odds; in between u_s is exact."""
    from gradex.model import CE_FLOOR, LOGODDS_CLIP, at_ce_floor, ce_logodds

    ce = torch.tensor([0.0, 1e-12, 0.5 * CE_FLOOR, 2 * CE_FLOOR, 50.0, float(torch.log(torch.tensor(2.0)))],
                      requires_grad=True)
    u = ce_logodds(ce)
    assert torch.isfinite(u).all()
    ceiling = -torch.log(torch.expm1(torch.tensor(CE_FLOOR, dtype=torch.float64)))
    assert torch.allclose(u[:3].double(), ceiling.expand(3), rtol=1e-6)
    assert float(u[4]) == pytest.approx(-LOGODDS_CLIP, rel=1e-3)
    assert abs(float(u[5])) < 1e-5  # p = 1/2
    assert float(F.softplus(-u[3].double())) == pytest.approx(2 * CE_FLOOR, rel=1e-5)  # just above the floor: exact
    (grad,) = torch.autograd.grad(u.sum(), ce)
    assert torch.equal(grad[:3], torch.zeros(3)) and grad[4] == 0
    assert float(grad[3]) == pytest.approx(-1 / (1 - math.exp(-2 * CE_FLOOR)), rel=1e-4)  # -e^ce / expm1(ce)
    assert at_ce_floor(u.detach()).tolist() == [True, True, True, False, False, False]


@pytest.mark.parametrize("output", OUTPUTS)
def test_hooks_equal_loop_for_every_output(output: str) -> None:
    model = build("llama", "lora")
    batch = collate(tokens(LENGTHS), range(len(LENGTHS)), pad_id=0)
    grads, u = GradientComputer(model, output=output).per_example(batch, precision="fp32")
    ref, ref_u = GradientComputer(model, method="loop", output=output).per_example(batch, precision="fp32")
    torch.testing.assert_close(u, ref_u, atol=1e-5, rtol=1e-5)
    assert_grads_close(grads, ref, rtol=1e-5)


def test_unknown_output_is_an_error() -> None:
    model = build("llama", "lora")
    batch = collate(tokens(LENGTHS[:2]), range(2), pad_id=0)
    with pytest.raises(ValueError, match="unknown output"):
        example_outputs(model, batch, "logits")
