"""Devices, precision and multi-process training, checked without a GPU.

- Placement: the stages run on torch's lazy device (TorchScript backend, present in CPU builds of
  torch), on which an op that mixes a lazy tensor with a CPU tensor raises. A model, batch,
  accumulator or optimizer state left on the CPU by a forgotten `.to()` therefore fails here as it
  would on a GPU; the lazy run's results must also equal the CPU run's.
- DDP: `accelerate launch` with 2 CPU processes (gloo) trains meta-train and the final fine-tune;
  the weights equal a one-process run's within float rounding.
- Gradient accumulation: micro-batches take the same steps as whole batches.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama, tiny_run_config, write_config
from gradex import config as config_mod
from gradex import pipeline
from gradex.config import ConfigError, TrainConfig
from gradex.data import Tokenized
from gradex.device import check_precision, resolve_device, resolve_precision

# Max |difference| of trained weights between one process and two (DDP sums the two halves' gradients
# in another order than one process sums the batch's; measured 5.8e-7 for the fine-tune, 2.8e-7 for
# meta-train). Weighting each process's tokens by its own count rather than the batch's moved them by
# 4.1e-2 (measured). (A constant factor on the loss would not show: Adam does not see it.)
DDP_ATOL = 2e-5


_lazy_ready = False


def lazy_device() -> torch.device:
    """torch's lazy device, its TorchScript backend started once per process."""
    global _lazy_ready
    if not _lazy_ready:
        from torch._lazy import ts_backend

        ts_backend.init()
        _lazy_ready = True
    return torch.device("lazy")


def test_lazy_device_rejects_a_cpu_tensor():
    """The premise of the placement tests: the lazy device refuses a CPU operand, as CUDA does."""
    x = torch.ones(2, 2, device=lazy_device())
    with pytest.raises(RuntimeError, match="lazy"):
        (x @ torch.ones(2, 2)).sum().item()


def test_device_and_precision_errors_name_the_setting():
    with pytest.raises(ConfigError, match="model.device: 'cuda'.*no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="model.device: 'gpu0' is not a device"):
        resolve_device("gpu0")
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        check_precision("fp16", torch.device("cpu"))
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_precision("fp32", "cuda") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("auto", "mps") == "fp32"


@pytest.mark.parametrize("native, emulated, resolved", [(True, True, "bf16"), (False, True, "fp32"), (False, False, "fp32")])
def test_auto_takes_bf16_only_on_a_gpu_that_computes_it_natively(monkeypatch, native, emulated, resolved):
    """A T4 or V100 holds bf16 tensors (torch's default check says yes, counting emulation) but computes
    them slowly: `auto` stays fp32 there, as on a CPU without bf16."""
    def supported(including_emulation: bool = True) -> bool:
        return native or (including_emulation and emulated)

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert resolve_precision("auto", "cuda") == resolved


def test_device_is_not_part_of_any_stage_identity():
    """A run started on a GPU resumes on the CPU and the other way round: nothing goes stale."""
    a, b = config_mod.ModelConfig(), config_mod.ModelConfig(device="cuda:1")
    assert config_mod.fingerprint(a) == config_mod.fingerprint(b)
    assert config_mod.fingerprint(TrainConfig()) == config_mod.fingerprint(TrainConfig(micro_batch_size=2))
    assert config_mod.fingerprint(TrainConfig()) != config_mod.fingerprint(TrainConfig(batch_size=3))


def _every_stage_on(device: str, tmp_path: Path, model_dir: Path):
    """meta-train, preconditioner, gradients, estimate, select, finetune and evaluate on `device` and on
    the CPU give the same theta*, store and metrics (fp32); returns the device run's config."""
    import numpy as np

    results = {}
    for where in ("cpu", device):
        (tmp_path / where).mkdir()
        cfg = tiny_run_config(tmp_path / where, model_dir)
        cfg.model.device = where
        cfg.meta.max_steps, cfg.finetune.max_steps = 4, 3
        final = pipeline.finetune(cfg)
        store = cfg.run_dir / "store"
        results[where] = (pipeline.Run(cfg).meta_model().to("cpu"), np.load(store / "x.npy"), np.load(store / "u.npy"),
                          final)
    (cpu_model, cpu_x, cpu_u, cpu_final), (dev_model, dev_x, dev_u, dev_final) = results["cpu"], results[device]
    for (name, p), (_, q) in zip(cpu_model.named_parameters(), dev_model.named_parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)
    np.testing.assert_allclose(dev_x, cpu_x, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(dev_u, cpu_u, rtol=1e-4, atol=1e-5)
    assert dev_final["members"] == cpu_final["members"]
    for split in ("validation", "test"):
        assert dev_final[split]["loss"] == pytest.approx(cpu_final[split]["loss"], rel=1e-4)
        assert dev_final[split]["score"] == cpu_final[split]["score"]
    return cfg


def test_every_stage_runs_on_the_configured_device(tmp_path, tiny_model_dir):
    """Every stage on the lazy device gives the CPU run's results (a forgotten .to() raises on this
    device); then check-linearity's exact gradients and random directions run there too."""
    from gradex import diagnostics

    lazy_device()
    cfg = _every_stage_on("lazy", tmp_path, tiny_model_dir)
    linearity = diagnostics.check_linearity(cfg, examples=4, subsets=0)  # cfg: the lazy run's
    assert linearity["examples"] == 4 and all(math.isfinite(r["explained"]) for r in linearity["rows"])


def test_training_resumes_on_the_configured_device(tmp_path):
    """A checkpoint (written from the device) resumes onto it: parameters and Adam's moments go back
    to the model's device, and the steps equal an uninterrupted run's."""
    from gradex.model import trainable
    from gradex.train import train
    from peft import LoraConfig, get_peft_model

    device = lazy_device()
    tokens = [Tokenized([1 + (i * 7 + k) % 200 for k in range(6 + i % 3)], 4) for i in range(12)]

    def fresh():
        torch.manual_seed(0)
        model = get_peft_model(tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
        return model.to(device)

    recipe = TrainConfig(max_steps=4, batch_size=4, lr=1e-2)
    whole = fresh()
    train(whole, tokens, range(12), recipe, 0, "fp32", progress=False)
    ckpt = tmp_path / "ckpt.pt"

    def stop_after_two(step: int) -> None:
        if step == 2:
            raise KeyboardInterrupt  # killed after the second step's checkpoint

    with pytest.raises(KeyboardInterrupt):
        train(fresh(), tokens, range(12), recipe, 0, "fp32", ckpt, save_every=1, progress=False,
              on_step=stop_after_two)
    resumed = fresh()
    log = train(resumed, tokens, range(12), recipe, 0, "fp32", ckpt, save_every=1, progress=False)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    for (name, p), (_, q) in zip(trainable(whole), trainable(resumed)):
        assert q.device.type == "lazy"
        torch.testing.assert_close(q.cpu(), p.cpu(), rtol=1e-5, atol=1e-6, msg=name)


def test_a_checkpoint_keeps_fp16s_loss_scale(tmp_path):
    """fp16 training (a GPU's) resumes at the loss scale it had reached, not at the initial one: the
    checkpoint round trip with a CPU GradScaler, the same object accelerate makes on a GPU."""
    from gradex.train import _resume, _save

    param = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([param])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    scaler.scale(torch.ones(()))  # the first scaled loss
    scaler.update(new_scale=1024.0)  # where some overflowing steps would have taken it
    _save(tmp_path / "ckpt.pt", [param], opt, sched, 3, [], scaler)
    fresh = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    step, _ = _resume(tmp_path / "ckpt.pt", [param], opt, sched, fresh)
    assert step == 3 and fresh.get_scale() == 1024.0


def test_micro_batches_take_the_steps_whole_batches_take():
    from gradex.model import trainable
    from gradex.train import train
    from peft import LoraConfig, get_peft_model

    tokens = [Tokenized([1 + (i * 5 + k) % 200 for k in range(5 + i % 4)], 3) for i in range(20)]
    trained = []
    for micro in (None, 3):
        torch.manual_seed(0)
        model = get_peft_model(tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
        log = train(model, tokens, range(20), TrainConfig(max_steps=5, batch_size=8, lr=1e-2, micro_batch_size=micro),
                    0, "fp32", progress=False)
        trained.append(([p.detach().clone() for _, p in trainable(model)], [r["loss"] for r in log]))
    (whole, whole_log), (micro, micro_log) = trained
    assert micro_log == pytest.approx(whole_log, rel=1e-5)
    for p, q in zip(whole, micro):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_shares_split_every_batch_over_processes_and_pieces():
    from gradex.train import shares

    chunk = list(range(7))
    assert shares(chunk, 0, 2, None) == [([0, 2, 4, 6], 1.0)]
    assert shares(chunk, 1, 2, 2) == [([1, 3], 1.0), ([5], 1.0)]
    # a process with no rows of a small batch still joins the gradient sum, with nothing in it
    assert shares([3], 1, 2, None) == [([3], 0.0)]


def _launch(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    bin_dir = Path(sys.executable).parent
    cmd = [str(bin_dir / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "gradex.cli", *args]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600, cwd=cwd)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_two_process_meta_train_and_finetune_equal_one_process(tmp_path, tiny_model_dir):
    """accelerate launch --num_processes 2 (gloo): the final fine-tune (from the same theta*), then a
    whole `gradex run --force` (meta-train and every fine-tune by DDP, the gradient pass sharded, the
    rest on rank 0), give one process's weights within DDP_ATOL and its comparison within float
    rounding, and leave no partial file (only rank 0 writes the run's files)."""
    cfg = tiny_run_config(tmp_path, tiny_model_dir)
    cfg.finetune.batch_size = 7  # odd: the processes' shares differ in size, and so do their token counts
    cfg.compare.baselines = ["all", "random"]
    single_run = pipeline.run_all(cfg)
    single = single_run["final"]
    run_dir = cfg.run_dir
    one = {"theta": _weights(run_dir / "meta" / "theta_star"), "final": _weights(run_dir / "final" / "selected"),
           "meta_log": (run_dir / "meta" / "log.jsonl").read_text()}
    path = write_config(cfg, tmp_path / "cfg.yaml")

    done = _launch(["finetune", str(path), "--force"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((run_dir / "final" / "metrics.json").read_text())
    assert two["key"] == single["key"] and two["steps"] == single["steps"]
    assert _max_difference(_weights(run_dir / "meta" / "theta_star"), one["theta"]) == 0  # not retrained
    final_diff = _max_difference(_weights(run_dir / "final" / "selected"), one["final"])
    assert final_diff < DDP_ATOL
    assert two["test"]["loss"] == pytest.approx(single["test"]["loss"], rel=1e-4)

    done = _launch(["run", str(path), "--force"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("selected (") == 1  # the summary, printed by rank 0 only
    meta_diff = _max_difference(_weights(run_dir / "meta" / "theta_star"), one["theta"])
    assert meta_diff < DDP_ATOL
    losses = [json.loads(line)["loss"] for line in (run_dir / "meta" / "log.jsonl").read_text().splitlines()]
    want = [json.loads(line)["loss"] for line in one["meta_log"].splitlines()]
    assert losses == pytest.approx(want, rel=1e-4)  # the log holds the whole batch's loss, not rank 0's half
    compared = json.loads((run_dir / "compare.json").read_text())
    assert json.loads((run_dir / "selection.json").read_text())["selected"] == single_run["selection"]["selected"]
    pairs = [(a["mix"], a["test_loss"], b["test_loss"]) for a, b in zip(single_run["compare"]["rows"], compared["rows"])]
    assert [m for m, _, _ in pairs] == [r["mix"] for r in single_run["compare"]["rows"]]
    compare_diff = max(abs(a - b) / a for _, a, b in pairs)
    assert compare_diff < 1e-4
    assert not list(run_dir.rglob("*.tmp*"))
    print(f"DDP vs one process: final fine-tune max |diff| {final_diff:.2e}, meta-train {meta_diff:.2e}, "
          f"compare's test losses {compare_diff:.1e} relative")


def test_a_non_finite_training_loss_stops_with_the_step_and_the_batch():
    from gradex.model import trainable
    from gradex.train import train
    from peft import LoraConfig, get_peft_model

    tokens = [Tokenized([1 + (i * 5 + k) % 200 for k in range(6)], 3) for i in range(8)]
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        next(p for name, p in trainable(model) if "lora_B" in name).fill_(float("inf"))
    with pytest.raises(FloatingPointError, match=r"train: the training loss is (nan|inf) at step \d; its batch holds "
                                                 r"the examples \[\d+, \d+, \d+, \d+\]"):
        train(model, tokens, range(8), TrainConfig(max_steps=2, batch_size=4, lr=1e-2), 0, "fp32", progress=False)


def test_fp16_gradient_passes_run_in_fp32(tmp_path, tiny_model_dir):
    """The per-example gradient passes have no loss scaler: under fp16 (GPU) they take fp32, and the
    store's record says so; other precisions are kept."""
    run = pipeline.Run(tiny_run_config(tmp_path, tiny_model_dir))
    for precision, used in (("fp16", "fp32"), ("bf16", "bf16"), ("fp32", "fp32")):
        run.__dict__["precision"] = precision  # as resolve_precision would give it on a GPU
        assert run.gradient_precision == used


@pytest.mark.parametrize("kind", ["sparse", "dense", "hashed", "preconditioned"])
def test_an_unbound_projector_moved_to_the_models_device_gives_the_cpu_store(tmp_path, kind):
    """compute_store binds an unbound projector itself, after moving it to the model's device: the
    projector's state is then made there, and the store equals the CPU's."""
    from gradients_helper import tiny_model, tiny_tokens
    from gradex.gradients import GradientComputer, Preconditioned, compute_store, make_projector

    def projector():
        if kind != "preconditioned":
            return make_projector(kind, dim=8, seed=3)
        layout = GradientComputer(tiny_model(), "auto").layout
        scales = {n: torch.linspace(0.5, 2.0, math.prod(shape)) for n, shape in layout}
        return Preconditioned(make_projector("sparse", dim=8, seed=3), scales)

    stores = {}
    for where in ("cpu", "lazy"):
        device = lazy_device() if where == "lazy" else torch.device("cpu")
        stores[where] = compute_store(tiny_model().to(device), tiny_tokens(6), list(range(6)), pad_id=0,
                                      out_dir=tmp_path / where, projector=projector().to(device), batch_size=3,
                                      chunk_size=3, precision="fp32", progress=False)
    assert torch.allclose(torch.from_numpy(stores["lazy"].x[:]), torch.from_numpy(stores["cpu"].x[:]), atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh)")
def test_every_stage_runs_on_a_cuda_gpu(tmp_path, tiny_model_dir):
    """The lazy device's check on a real GPU, in fp32 (TF32 off, torch's default for matmuls)."""
    assert not torch.backends.cuda.matmul.allow_tf32
    _every_stage_on("cuda", tmp_path, tiny_model_dir)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh)")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_whole_run_in_gpu_precisions(tmp_path, tiny_model_dir, precision):
    """bf16 autocast, and fp16 with accelerate's loss scaling in training (its gradient passes run in
    fp32: Run.gradient_precision): a whole run on the GPU ends with finite losses, and the records say
    where and in what precision each stage ran."""
    cfg = tiny_run_config(tmp_path, tiny_model_dir)
    cfg.model.device, cfg.model.precision = "cuda", precision
    summary = pipeline.run_all(cfg)
    assert all(math.isfinite(r["test_loss"]) for r in summary["compare"]["rows"])
    ran = {stage: where.split() for stage, where in summary["ran_on"].items()}
    assert all(device.startswith("cuda") for device, _ in ran.values())
    assert ran["meta-train"][1] == ran["finetune"][1] == precision
    assert ran["gradients"][1] == ("fp32" if precision == "fp16" else precision)


@pytest.mark.parametrize("fails", [False, True])
def test_cli_destroys_the_process_group_it_ran_under(tmp_path, tiny_model_dir, fails):
    """A launched command ends its process group, on success and on error alike: a group left to the
    interpreter's teardown aborted rank 0 after its work was done ("terminate called without an active
    exception", measured 7 of 12 two-process launches of a bare all-reduce; 0 of 12 when destroyed)."""
    import torch.distributed as dist

    from gradex.cli import main

    path = write_config(tiny_run_config(tmp_path, tiny_model_dir), tmp_path / "cfg.yaml")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert main(["config", str(tmp_path / "missing.yaml") if fails else str(path)]) == (2 if fails else 0)
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
