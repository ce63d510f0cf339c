"""Per-example gradients (hooks vs the plain autograd loop) and projectors (JL, determinism, adjoint)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from conftest import trained_like
from gradex.config import LoraConfig, ModelConfig
from gradex.data import Tokenized, collate
from gradex.gradients import GradientComputer, make_projector, single_example
from gradex.gradients import projectors as projectors_module
from gradex.gradients.projectors import DenseProjector, Preconditioned
from gradex.model import example_outputs, make_trainable, trainable

LLAMA_LORA = ["q_proj", "k_proj", "v_proj", "o_proj"]


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=0, eos_token_id=0))


def build(arch: str, finetune: str, targets: list[str] | None = None) -> torch.nn.Module:
    base = tiny_llama() if arch == "llama" else tiny_gpt2()
    cfg = ModelConfig(finetune=finetune, lora=LoraConfig(r=4, target_modules=targets or LLAMA_LORA))
    return trained_like(make_trainable(base, cfg, seed=0))


def tokens(lengths: list[int], answer: int = 3, seed: int = 0) -> list[Tokenized]:
    gen = torch.Generator().manual_seed(seed)
    return [Tokenized(torch.randint(1, 64, (n,), generator=gen).tolist(), n - answer) for n in lengths]


LENGTHS = [7, 12, 9, 5, 12]
CASES = [("llama", "lora", LLAMA_LORA), ("gpt2", "lora", ["c_attn"]), ("llama", "full", None), ("gpt2", "full", None)]


def assert_grads_close(a: dict, b: dict, rtol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        scale = b[name].abs().max().item()
        assert scale > 0, f"{name}: reference gradient is zero"
        err = (a[name] - b[name]).abs().max().item()
        assert err <= rtol * scale, f"{name}: max error {err:.2e} vs scale {scale:.2e}"


@pytest.mark.parametrize("arch,finetune,targets", CASES)
def test_hooks_equal_autograd_loop(arch: str, finetune: str, targets: list[str] | None) -> None:
    model = build(arch, finetune, targets)
    batch = collate(tokens(LENGTHS), range(len(LENGTHS)), pad_id=0)
    fast = GradientComputer(model)
    assert fast.method == "hooks"
    grads, u = fast.per_example(batch, precision="fp32")
    ref_grads, ref_u = GradientComputer(model, method="loop").per_example(batch, precision="fp32")
    assert torch.allclose(u, ref_u, atol=1e-6)
    assert_grads_close(grads, ref_grads, rtol=1e-5)
    assert set(grads) == {n for n, _ in trainable(model)}


def test_uncovered_parameters_fall_back_to_the_loop() -> None:
    """A trainable norm weight and a trainable Conv1D bias: hooks for what they cover, a loop for the rest."""
    model = build("gpt2", "lora", ["c_attn"])
    lm = model.get_base_model()
    lm.transformer.h[0].ln_1.weight.requires_grad_(True)  # not a linear layer: loop
    lm.transformer.h[1].mlp.c_fc.bias.requires_grad_(True)  # Conv1D bias: hooks
    batch = collate(tokens(LENGTHS), range(len(LENGTHS)), pad_id=0)
    fast = GradientComputer(model)
    assert fast.method == "hooks+loop"
    assert [n for n, _ in fast.uncovered] == [n for n, _ in trainable(model) if "ln_1" in n]
    grads, _ = fast.per_example(batch, precision="fp32")
    ref, _ = GradientComputer(model, method="loop").per_example(batch, precision="fp32")
    assert_grads_close(grads, ref, rtol=1e-5)
    with pytest.raises(ValueError, match="cannot cover"):
        GradientComputer(model, method="hooks")


def test_gradient_independent_of_batchmates_and_padding() -> None:
    model = build("llama", "lora")
    toks = tokens([6, 14, 9, 11])
    computer = GradientComputer(model)
    alone, u_alone = computer.per_example(collate(toks[:1], [0], pad_id=0), precision="fp32")
    for mates, pad_id in (([1, 2, 3], 0), ([3, 1], 5), ([2], 63)):
        batch = collate([toks[i] for i in [0, *mates]], [0, *mates], pad_id=pad_id)
        grads, u = computer.per_example(batch, precision="fp32")
        assert abs(u[0].item() - u_alone[0].item()) < 1e-5
        assert_grads_close({k: v[:1] for k, v in grads.items()}, alone, rtol=1e-5)


def test_padding_positions_get_zero_output_gradient() -> None:
    """What makes padding harmless: u_s does not depend on any module output at a padded position."""
    model = build("llama", "full")
    batch = collate(tokens([5, 13, 8]), range(3), pad_id=7)
    outputs = []
    handles = [m.register_forward_hook(lambda _m, _i, y: outputs.append(y))
               for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight.requires_grad]
    u = example_outputs(model, batch)
    for h in handles:
        h.remove()
    grads = torch.autograd.grad(u.sum(), outputs)
    padded = batch.attention_mask == 0
    assert padded.any()
    for g in grads:
        assert torch.count_nonzero(g[padded]) == 0
        assert torch.count_nonzero(g[~padded]) > 0


@pytest.mark.parametrize("method", ["auto", "loop"])
def test_bf16_pass_returns_the_fp32_outputs(method: str) -> None:
    """Under bf16 autocast the gradients are within bf16 error of fp32's, and u_s is the fp32 forward's
    to rounding: the store's offsets are the numbers validate measures (a bf16 u_s was 1e-3 off here)."""
    model = build("llama", "lora")
    batch = collate(tokens(LENGTHS), range(len(LENGTHS)), pad_id=0)
    computer = GradientComputer(model, method=method)
    fp32, u32 = computer.per_example(batch, precision="fp32")
    bf16, u16 = computer.per_example(batch, precision="bf16")
    assert u16.dtype == torch.float32 and all(g.dtype == torch.float32 for g in bf16.values())
    num = sum((bf16[k] - fp32[k]).pow(2).sum() for k in fp32)
    den = sum(fp32[k].pow(2).sum() for k in fp32)
    assert 0 < math.sqrt(num / den) < 0.05  # bf16 did run: the gradients differ, by bf16 rounding
    torch.testing.assert_close(u16, u32, rtol=0, atol=1e-6)


def test_lm_head_runs_in_fp32_under_bf16_autocast() -> None:
    """The logits u_s is computed from are the fp32 product of the hidden states with the head, not a
    bf16 product cast up afterwards (which rounded these logits by up to 4e-3 relative)."""
    from gradex.device import autocast
    from gradex.model import answer_logits

    model = build("llama", "lora")
    with torch.no_grad():
        model.get_base_model().lm_head.weight.mul_(30)  # logits of size ~10, as in a trained model
    batch = collate(tokens(LENGTHS), range(len(LENGTHS)), pad_id=0)
    head = model.get_base_model().lm_head
    seen: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, inputs, _y: seen.append(inputs[0]))
    with torch.no_grad(), autocast("bf16"):
        logits, _, _ = answer_logits(model, batch)
    handle.remove()
    want = torch.nn.functional.linear(seen[0].float(), head.weight.float())
    assert logits.dtype == torch.float32 and want.abs().max() > 5
    torch.testing.assert_close(logits, want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("kind", ["sparse", "hashed", "dense", "none"])
def test_projected_equals_projecting_the_loop_gradients(kind: str) -> None:
    model = build("gpt2", "lora", ["c_attn"])
    batch = collate(tokens(LENGTHS), range(len(LENGTHS)), pad_id=0)
    computer = GradientComputer(model)
    projector = make_projector(kind, model, 32, seed=5)
    x, u = computer.projected(batch, projector, precision="fp32")
    ref, ref_u = GradientComputer(model, method="loop").per_example(batch, precision="fp32")
    assert x.shape == (len(LENGTHS), projector.dim) and x.dtype == torch.float32
    assert torch.allclose(x, projector.project(ref), atol=1e-5 * x.abs().max().item())
    assert torch.allclose(u, ref_u, atol=1e-6)


def test_loop_reference_uses_each_example_without_padding() -> None:
    batch = collate(tokens([4, 9]), range(2), pad_id=0)
    one = single_example(batch, 0)
    assert one.input_ids.shape == (1, 4) and bool(one.attention_mask.all())


# ---------------------------------------------------------------------------- projectors

LAYOUT = [("a.weight", (40, 50)), ("b.weight", (3000,)), ("c.bias", (7,))]
P = sum(math.prod(s) for _, s in LAYOUT)


def split(g: torch.Tensor) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for name, shape in LAYOUT:
        n = math.prod(shape)
        out[name] = g[:, start:start + n].reshape(g.shape[0], *shape)
        start += n
    return out


@pytest.mark.parametrize("kind", ["sparse", "hashed", "dense"])
def test_inner_products_preserved_within_jl_tolerance(kind: str) -> None:
    """JL: |<Px,Py> - <x,y>| <= 4 ||x|| ||y|| / sqrt(d) for at least 98% of pairs.

    Both projectors have error variance <= 2 ||x||^2 ||y||^2 / d, so 4/sqrt(d) is ~2.8 standard deviations.
    """
    d = 256
    gen = torch.Generator().manual_seed(0)
    common = torch.randn(1, P, generator=gen)
    g = torch.randn(40, P, generator=gen) + 0.7 * common + 0.3  # correlated and off-centre, like gradients of one task
    g[:, :2000] *= 3  # uneven scale across coordinates
    projector = make_projector(kind, LAYOUT, d, seed=11)
    x = projector.project(split(g))
    exact, approx = g @ g.T, x @ x.T
    norms = g.norm(dim=1)
    bound = 4 * norms[:, None] * norms[None, :] / math.sqrt(d)
    pairs = torch.triu(torch.ones(40, 40, dtype=torch.bool), diagonal=1)
    within = ((approx - exact).abs() <= bound)[pairs].float().mean().item()
    assert within >= 0.98, f"only {within:.1%} of pairs within the JL bound"
    ratio = (x.norm(dim=1) / norms).pow(2)
    assert abs(ratio.mean().item() - 1) < 0.1


@pytest.mark.parametrize("kind", ["sparse", "hashed", "dense", "none"])
def test_projection_deterministic_and_independent_of_layer_order(kind: str) -> None:
    g = split(torch.randn(3, P))
    a = make_projector(kind, LAYOUT, 64, seed=7).project(g)
    b = make_projector(kind, LAYOUT, 64, seed=7).project(g)
    assert torch.equal(a, b)
    if kind != "none":
        reordered = make_projector(kind, LAYOUT[::-1], 64, seed=7)
        assert torch.allclose(reordered.project(dict(reversed(g.items()))), a, atol=1e-4)
        other = make_projector(kind, LAYOUT, 64, seed=8).project(g)
        assert not torch.allclose(a, other)


def test_dense_regeneration_equals_holding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(projectors_module, "BLOCK_BYTES", 64 * 4 * 100)  # 100 rows per block: several per parameter
    held = DenseProjector(64, seed=2).bind(LAYOUT)
    regen = DenseProjector(64, seed=2, hold_limit_bytes=0).bind(LAYOUT)
    assert held.holds and not regen.holds
    g = split(torch.randn(4, P))
    assert torch.equal(held.project(g), regen.project(g))
    z = torch.randn(64)
    assert torch.equal(held.lift(z), regen.lift(z))
    m = held.matrix("b.weight")
    assert m.shape == (3000, 64) and torch.all(m.abs() == 1 / 8)


def test_dense_never_holds_above_the_limit() -> None:
    big = DenseProjector(256, seed=0).bind([("w", (300_000,))])  # 300k * 256 * 4 B = 307 MB
    assert not big.holds and big._held == {}


def preconditioned(kind: str, d: int, seed: int) -> Preconditioned:
    """A projector of `kind` behind coordinate scales spread over two orders of magnitude, like Adam's."""
    gen = torch.Generator().manual_seed(seed + 100)
    scales = {name: torch.exp(2.0 * torch.randn(math.prod(shape), generator=gen)) for name, shape in LAYOUT}
    inner = make_projector(kind, LAYOUT, d, seed=seed)
    return Preconditioned(inner, scales).bind(LAYOUT)


def projector_for(kind: str, d: int, seed: int, pre: bool):
    return preconditioned(kind, d, seed) if pre else make_projector(kind, LAYOUT, d, seed=seed)


KINDS_AND_PRECONDITIONING = [(k, pre) for k in ("sparse", "hashed", "dense", "none") for pre in (False, True)]


@pytest.mark.parametrize("kind,pre", KINDS_AND_PRECONDITIONING)
def test_lift_is_the_adjoint_and_col_norms_match(kind: str, pre: bool) -> None:
    projector = projector_for(kind, 48, 4, pre)
    d = projector.dim
    g = torch.randn(2, P, dtype=torch.float64).float()
    z = torch.randn(d)
    x = projector.project_flat(g)
    delta = projector.lift(z)
    assert delta.shape == (P,)
    assert [t.shape for t in projector.lift_params(z)] == [torch.Size(s) for _, s in LAYOUT]
    assert torch.allclose(x @ z, g @ delta, rtol=1e-4, atol=1e-3)  # <P^T g, z> == <g, P z>
    full = torch.stack([projector.lift(e) for e in torch.eye(d)], dim=1)  # P, (p, d)
    assert torch.allclose(projector.col_sq_norms(), full.pow(2).sum(0), rtol=1e-5)
    if kind in ("sparse", "hashed"):  # disjoint column supports: ||P z||^2 is exact from the column norms
        assert torch.allclose(delta.pow(2).sum(), (projector.col_sq_norms() * z.pow(2)).sum(), rtol=1e-5)
        if not pre:
            assert projector.col_sq_norms().sum().item() == P
    if kind != "none":
        assert torch.allclose(projector.gram(), (full.T @ full), rtol=1e-4, atol=1e-3 * full.pow(2).sum(0).max())


@pytest.mark.parametrize("kind,pre", KINDS_AND_PRECONDITIONING)
def test_project_delta_is_the_orthogonal_projection_onto_the_range(kind: str, pre: bool) -> None:
    projector = projector_for(kind, 48, 6, pre)
    delta = torch.randn(P)
    if kind == "none":
        expected = delta.double()
    else:
        full = torch.stack([projector.lift(e) for e in torch.eye(projector.dim)], dim=1).double()  # P, (p, d)
        expected = full @ torch.linalg.lstsq(full, delta.double()[:, None]).solution[:, 0]
    got = projector.project_delta(delta)
    assert torch.allclose(got.double(), expected, atol=1e-4 * delta.norm().item())
    assert torch.allclose(projector.project_delta(got), got, atol=1e-4 * delta.norm().item())  # idempotent
    in_range = projector.lift(torch.randn(projector.dim))
    assert torch.allclose(projector.project_delta(in_range), in_range, atol=1e-4 * in_range.norm().item())


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_preconditioned_projects_scaled_gradients(kind: str) -> None:
    projector = preconditioned(kind, 64, 3)
    g = torch.randn(3, P)
    scaled = g * torch.cat([projector.scales[name] for name, _ in LAYOUT])
    torch.testing.assert_close(projector.project_flat(g), make_projector(kind, LAYOUT, 64, seed=3).project_flat(scaled))
    ident = projector.identity()
    assert ident["kind"] == kind and ident["preconditioner"] == "adam" and len(ident["preconditioner_sha256"]) == 16
    assert preconditioned(kind, 64, 3).identity() == ident  # the same scales give the same store identity
    other = Preconditioned(make_projector(kind, LAYOUT, 64, seed=3), {n: t * 2 for n, t in projector.scales.items()})
    assert other.bind(LAYOUT).identity()["preconditioner_sha256"] != ident["preconditioner_sha256"]
    with pytest.raises(ValueError, match="no scales"):
        Preconditioned(make_projector(kind, LAYOUT, 64), {"a.weight": torch.ones(3)}).bind(LAYOUT)


def test_adam_scales_match_the_optimizer_step() -> None:
    """After one AdamW step from fresh state (no bias in v after correction), each coordinate moves by
    lr * g / (|g| + eps): the scales squared times g, up to the square root the definition puts in s."""
    from gradex.gradients.preconditioner import adam_scales

    g = torch.tensor([1e-4, 3e-2, -2.0, 0.0])
    s = adam_scales({"w": g.square()})["w"]
    torch.testing.assert_close(s.square(), 1 / (g.abs() + 1e-8))
    w = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.AdamW([w], lr=0.1, weight_decay=0.0)
    w.grad = g.clone()
    opt.step()
    torch.testing.assert_close(-w.detach(), 0.1 * g * s.square(), rtol=1e-4, atol=1e-7)


def test_make_projector_binds_to_a_model() -> None:
    model = build("llama", "lora")
    projector = make_projector("sparse", model, 16)
    assert projector.layout == GradientComputer(model).layout
    assert projector.input_dim == sum(p.numel() for _, p in trainable(model))


def test_identity_projector_is_exact() -> None:
    projector = make_projector("none", LAYOUT)
    g = torch.randn(3, P)
    assert projector.dim == P and torch.equal(projector.project(split(g)), g)
    assert projector.identity() == {"kind": "none", "seed": 0, "dim": P, "scale": 1.0, "input_dim": P}


def test_projector_identity_and_errors() -> None:
    sparse = make_projector("sparse", LAYOUT, 16, seed=3)
    assert sparse.identity() == {"kind": "sparse", "seed": 3, "dim": 16, "scale": 1.0, "input_dim": P}
    assert make_projector("dense", LAYOUT, 16).identity()["scale"] == 0.25
    with pytest.raises(ValueError, match="unknown kind"):
        make_projector("gaussian", LAYOUT, 16)
    with pytest.raises(KeyError, match="not bound"):
        sparse.add(sparse.start(1), "zzz", torch.zeros(1, 3))


def test_hashed_holds_nothing_per_coordinate_and_spreads_buckets_evenly() -> None:
    """hashed computes its buckets: no tensor held per parameter, the same P on every call and after a
    move, and buckets and signs as even as random ones (counts within 5 standard deviations)."""
    n, d = 400_000, 64
    projector = make_projector("hashed", [("w", (n,))], d, seed=1)
    held = [v for v in vars(projector).values() if isinstance(v, torch.Tensor)]
    assert not held and all(isinstance(k, int) for k in projector._keys["w"])
    index = projector.indices("w")
    assert torch.equal(index, projector.to("cpu").indices("w"))
    counts = torch.bincount(index % d, minlength=d).double()
    assert (counts - n / d).abs().max() < 5 * math.sqrt(n / d)
    assert abs((index >= d).double().mean().item() - 0.5) < 5 * 0.5 / math.sqrt(n)
    # consecutive coordinates, and coordinates a row apart, land in unrelated buckets
    for stride in (1, 576, 4096):
        same = ((index[stride:] % d) == (index[:-stride] % d)).double().mean().item()
        assert abs(same - 1 / d) < 0.005, stride
    assert not torch.equal(index, make_projector("hashed", [("w", (n,))], d, seed=2).indices("w"))


def test_sparse_narrow_index_gives_the_same_projection(monkeypatch: pytest.MonkeyPatch) -> None:
    g = split(torch.randn(3, P))
    wide = make_projector("sparse", LAYOUT, 32, seed=9)
    monkeypatch.setattr(projectors_module, "WIDE_INDEX_LIMIT", 0)
    narrow = make_projector("sparse", LAYOUT, 32, seed=9)
    assert narrow._index["b.weight"].dtype == torch.int32
    assert torch.equal(wide.project(g), narrow.project(g))
    assert torch.equal(wide.lift(torch.ones(32)), narrow.lift(torch.ones(32)))


def test_lora_on_the_head_gets_per_example_gradients_from_the_loop():
    """The head reads every row's answer positions flattened together, so the per-row products of
    the hooks cannot be formed there: with LoRA on lm_head those layers go to the per-example loop.
    Oracle: one autograd.grad per example, alone, with answers of 2-4 tokens (12 in all, a multiple
    of the batch, where a wrong split of the rows would not even raise)."""
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
    lora = LoraConfig(r=4, target_modules=["q_proj", "lm_head"])
    model = trained_like(make_trainable(base, ModelConfig(finetune="lora", lora=lora), 0))
    gen = torch.Generator().manual_seed(0)
    toks = [Tokenized(torch.randint(1, 64, (n,), generator=gen).tolist(), n - a) for n, a in [(7, 2), (12, 3), (9, 4), (8, 3)]]
    batch = collate(toks, range(len(toks)), pad_id=0)
    computer = GradientComputer(model)
    assert computer.method == "hooks+loop"
    grads, _ = computer.per_example(batch, precision="fp32")
    params = trainable(model)
    assert any("lm_head" in n for n, _ in params)
    for b in range(len(toks)):
        u = example_outputs(model, single_example(batch, b), "ce")[0]
        for (name, p), g in zip(params, torch.autograd.grad(u, [p for _, p in params], allow_unused=True)):
            want = torch.zeros_like(p) if g is None else g
            assert torch.allclose(grads[name][b], want, rtol=1e-4, atol=1e-6), name
