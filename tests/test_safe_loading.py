"""A run directory from someone else cannot run code when gradex reads it: tensor files only (loaded
with weights_only=True), models from safetensors only, and a model's own Python code only with
model.trust_remote_code."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from gradex.config import ConfigError, LoraConfig, ModelConfig, TrainConfig
from gradex.gradients import preconditioner
from gradex.model import load_base, load_tokenizer, make_trainable, trainable
from gradex.saved import load_model, save_model
from gradex.train import train

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_run_config  # noqa: E402
from gradients_helper import tiny_tokens  # noqa: E402


def dropout_model() -> torch.nn.Module:
    """A tiny LoRA Llama with attention dropout: training draws random numbers, so resuming it
    reproduces the uninterrupted run only if the checkpoint restores the RNG too."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.3))
    return make_trainable(base, ModelConfig(lora=LoraConfig(r=4)), seed=0)


RECIPE = TrainConfig(epochs=1, batch_size=4, lr=0.05, warmup=0.2, seed=3)  # 24 examples: 6 steps
TOKENS = tiny_tokens(24)


class Interrupt(Exception):
    pass


def stop_after(step: int):
    def on_step(k: int) -> None:
        if k == step:
            raise Interrupt

    return on_step


def test_checkpoint_is_tensors_and_resumes_to_the_uninterrupted_run(tmp_path: Path) -> None:
    torch.manual_seed(11)
    whole = dropout_model()
    log = train(whole, TOKENS, range(24), RECIPE, pad_id=0, precision="fp32", progress=False)
    assert len(log) == 6

    ckpt = tmp_path / "checkpoint.pt"
    torch.manual_seed(11)
    first = dropout_model()
    with pytest.raises(Interrupt):
        train(first, TOKENS, range(24), RECIPE, pad_id=0, precision="fp32", checkpoint=ckpt, save_every=2,
              progress=False, on_step=stop_after(3))  # killed after step 3: the checkpoint holds step 2
    saved = torch.load(ckpt, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in saved.values())
    assert json.loads(bytes(saved["state"].tolist()))["step"] == 2

    torch.manual_seed(99)  # a new process: any other RNG state
    resumed = dropout_model()
    resumed_log = train(resumed, TOKENS, range(24), RECIPE, pad_id=0, precision="fp32", checkpoint=ckpt,
                        save_every=2, progress=False)
    assert [r["loss"] for r in resumed_log] == [r["loss"] for r in log]
    for (name, a), (_, b) in zip(trainable(whole), trainable(resumed)):
        assert torch.equal(a, b), name


def pickled_payload(path: Path, marker: Path) -> None:
    """A file that, loaded by a full unpickler, creates `marker` (stands for any code)."""

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    torch.save({"params": Payload(), "step": 1}, path)


@pytest.mark.parametrize("artifact", ["checkpoint", "preconditioner"])
def test_a_pickled_object_in_an_artifact_is_refused(tmp_path: Path, artifact: str) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / f"{artifact}.pt"
    pickled_payload(path, marker)
    model = dropout_model()
    with pytest.raises(ValueError, match="refused to load: it holds Python objects other than tensors"):
        if artifact == "checkpoint":
            train(model, TOKENS, range(24), RECIPE, pad_id=0, precision="fp32", checkpoint=path, progress=False)
        else:
            preconditioner.load(path)
    assert not marker.exists()


def test_a_pickled_adapter_is_refused_and_never_unpickled(tmp_path: Path, tiny_model_dir: Path) -> None:
    """peft itself would fall back to adapter_model.bin (a pickle) without a safetensors file; gradex
    reads adapters from safetensors only."""
    cfg = ModelConfig(name=str(tiny_model_dir), lora=LoraConfig(r=4))
    saved = tmp_path / "adapter"
    save_model(make_trainable(load_base(cfg), cfg), saved)
    (saved / "adapter_model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    pickled_payload(saved / "adapter_model.bin", marker)
    with pytest.raises(ConfigError, match="safetensors only"):
        load_model(cfg, saved)
    assert not marker.exists()


def test_preconditioner_round_trip(tmp_path: Path) -> None:
    model = dropout_model()
    moments = {name: p.detach().square() for name, p in trainable(model)}
    preconditioner.save(moments, tmp_path / "preconditioner.pt")
    loaded = preconditioner.load(tmp_path / "preconditioner.pt")
    assert loaded.keys() == moments.keys() and all(torch.equal(loaded[k], moments[k]) for k in moments)
    torch.save({"weights": [torch.ones(2)]}, tmp_path / "nested.pt")  # plain data, but not named tensors
    with pytest.raises(ValueError, match="not a gradex tensor file"):
        preconditioner.load(tmp_path / "nested.pt")


def model_with_its_own_code(root: Path, marker: Path) -> Path:
    """A model directory whose config points at a Python file that creates `marker` when imported."""
    root.mkdir()
    (root / "config.json").write_text(json.dumps({
        "model_type": "gradex-test-custom",
        "auto_map": {"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"}}))
    (root / "custom.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import PretrainedConfig\n\n\n"
        "class CustomConfig(PretrainedConfig):\n"
        "    model_type = 'gradex-test-custom'\n")
    return root


def test_model_code_runs_only_with_trust_remote_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import dynamic_module_utils

    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    marker = tmp_path / "code-ran"
    name = str(model_with_its_own_code(tmp_path / "model", marker))
    assert ModelConfig().trust_remote_code is False
    with pytest.raises(ConfigError, match="runs only with model.trust_remote_code: true"):
        load_base(ModelConfig(name=name))
    assert not marker.exists()
    with pytest.raises(Exception):  # the user's choice: the code runs (this stub then fails to build a model)
        load_base(ModelConfig(name=name, trust_remote_code=True))
    assert marker.exists()


def test_a_received_run_directory_cannot_ask_to_run_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    """A run directory from someone else whose config.yaml names a model with its own code and says
    trust_remote_code: true: `--run-dir` and `gradex export` load it without running that code (the
    file is not the user's word); the user's own `--set model.trust_remote_code=true` still counts."""
    import yaml
    from transformers import dynamic_module_utils

    from gradex import config
    from gradex.cli import main
    from gradex.writer import MARKER

    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    marker = tmp_path / "code-ran"
    name = str(model_with_its_own_code(tmp_path / "model", marker))
    run = tmp_path / "received"
    run.mkdir()
    # data of its own (not the default's BIG-bench tasks), so that prepare gets as far as the model
    raw = config.to_dict(tiny_run_config(tmp_path, tmp_path / "model"))
    raw["model"].update(name=name, trust_remote_code=True)
    (run / "config.yaml").write_text(yaml.safe_dump(raw))
    (run / MARKER).write_text("")  # a gradex run, as it came
    assert config.load_received(run).model.trust_remote_code is False
    assert config.load_received(run, ["model.trust_remote_code=true"]).model.trust_remote_code is True
    assert main(["prepare", "--run-dir", str(run)]) == 2  # this stub has no tokenizer, so prepare stops there
    assert "tokenizer" in capsys.readouterr().err.lower()
    assert not marker.exists()
    (run / "final" / "selected").mkdir(parents=True)
    assert main(["export", str(run)]) == 2
    assert not marker.exists()


def test_a_pinned_revision_reaches_every_load_and_the_identity_only_once_set(tiny_model_dir: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    from gradex import config

    seen: list[dict] = []
    for cls in (transformers.AutoTokenizer, transformers.AutoConfig, transformers.AutoModelForCausalLM):
        original = cls.from_pretrained.__func__

        def spy(klass, name, *args, _original=original, **kwargs):
            if sys._getframe(1).f_globals["__name__"] == "gradex.model":  # gradex's calls, not transformers' own
                seen.append(dict(kwargs))
            kwargs.pop("revision", None)  # a local directory has no revisions
            return _original(klass, name, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    cfg = ModelConfig(name=str(tiny_model_dir), revision="0123abc")
    load_tokenizer(cfg)
    load_base(cfg)
    assert len(seen) >= 3 and all(kwargs.get("revision") == "0123abc" and kwargs.get("trust_remote_code") is False
                        for kwargs in seen)
    # unset, it changes no fingerprint (runs made before the key existed stay current); set, it does
    import dataclasses

    before = {k: v for k, v in dataclasses.asdict(ModelConfig()).items() if k not in ("revision", "device")}
    assert config.fingerprint(ModelConfig()) == config.fingerprint(before)
    assert config.fingerprint(ModelConfig()) != config.fingerprint(ModelConfig(revision="0123abc"))


def test_a_hub_model_s_commit_is_recorded(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A hub id read from the local Hugging Face cache (offline): meta-train's record names the commit
    its files came from, so an upstream change to an unpinned model shows in the ledger."""
    import shutil
    import subprocess

    from conftest import tiny_run_config, write_config

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--gradex--tiny"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    cfg = tiny_run_config(tmp_path, tiny_model_dir)
    cfg.model.name = "gradex/tiny"
    cfg.meta.max_steps = 1
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "gradex.cli", "meta-train", str(write_config(cfg, tmp_path / "c.yaml"))],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((cfg.run_dir / "meta" / "stage.json").read_text())["model_commit"] == commit
