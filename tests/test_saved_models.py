"""Saved models are what peft and transformers load: the oracle is their own loader.

A LoRA model saved by gradex loads with `PeftModel.from_pretrained` and gives the logits of the
model that was saved; a full fine-tune loads with `AutoModelForCausalLM.from_pretrained`;
`gradex export` merges an adapter into a model folder whose logits equal the adapter model's; an old
run directory (raw adapter.pt) is refused with a message and left as it was.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import tiny_run_config
from gradex import config, pipeline
from gradex.cli import main
from gradex.config import ConfigError
from gradex.model import load_base, make_trainable, trainable
from gradex.saved import load_model, save_model
from gradex.run import FINAL, THETA_STAR
from gradex.writer import LOCK, writing

IDS = torch.tensor([[5, 17, 99, 3, 200, 41, 7, 8], [60, 61, 62, 63, 64, 65, 66, 67]])


def trained(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Every trainable tensor moved off its initial value (peft starts lora_B at 0, which would make
    any adapter, saved or not, give the base model's logits)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in trainable(model):
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def lora_cfg(tiny_model_dir: Path) -> config.ModelConfig:
    return config.ModelConfig(name=str(tiny_model_dir), lora=config.LoraConfig(r=4, alpha=8,
                                                                               target_modules=["q_proj", "v_proj"]))


def test_lora_round_trip_through_peft(tmp_path, tiny_model_dir):
    from peft import PeftModel

    cfg = lora_cfg(tiny_model_dir)
    model = trained(make_trainable(load_base(cfg), cfg))
    save_model(model, tmp_path / "adapter")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    theirs = PeftModel.from_pretrained(load_base(cfg), str(tmp_path / "adapter")).eval()
    assert torch.equal(logits(theirs), logits(model))
    assert not torch.equal(logits(theirs), logits(load_base(cfg).eval()))  # the adapter does something
    ours = load_model(cfg, tmp_path / "adapter").eval()  # gradex's loader: trainable, same parameters in order
    assert [n for n, _ in trainable(ours)] == [n for n, _ in trainable(model)]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(trainable(ours), trainable(model)))
    save_model(ours, tmp_path / "again")  # the same adapter, the same bytes (the ledger hashes them)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "adapter" / name).read_bytes(), name


def test_lora_adapter_of_another_shape_is_an_error(tmp_path, tiny_model_dir):
    cfg = lora_cfg(tiny_model_dir)
    save_model(make_trainable(load_base(cfg), cfg), tmp_path / "adapter")
    cfg.lora.r = 8
    with pytest.raises(ConfigError, match="but model.lora says"):
        load_model(cfg, tmp_path / "adapter")


def test_full_finetune_is_a_transformers_model_folder(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    cfg = config.ModelConfig(name=str(tiny_model_dir), finetune="full")
    model = trained(make_trainable(load_base(cfg), cfg))
    save_model(model, tmp_path / "model")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    assert theirs.config.use_cache  # a standalone model generates with a KV cache; gradex trains without
    assert torch.equal(logits(theirs), logits(model))
    ours = load_model(cfg, tmp_path / "model")
    assert [n for n, _ in trainable(ours)] == [n for n, _ in trainable(model)]
    assert torch.equal(logits(ours.eval()), logits(model))


@pytest.fixture
def run_with_final(tmp_path, tiny_model_dir):
    """A run directory as finetune leaves it: the resolved config and a LoRA model in final/selected."""
    cfg = tiny_run_config(tmp_path, tiny_model_dir)
    model = trained(make_trainable(load_base(cfg.model), cfg.model))
    with writing(cfg.run_dir):  # made as a stage makes it: a marked run directory
        config.dump(cfg, cfg.run_dir / "config.yaml")
        save_model(model, cfg.run_dir / FINAL)
    return cfg, model


def test_export_merges_the_adapter_into_a_standalone_model(run_with_final, tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, model = run_with_final
    assert main(["export", str(cfg.run_dir), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not hasattr(merged, "peft_config") and "lora" not in " ".join(n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged), logits(model), rtol=1e-5, atol=1e-5)  # W + BA summed once
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tok("3+4=")["input_ids"] == AutoTokenizer.from_pretrained(tiny_model_dir)("3+4=")["input_ids"]


def test_export_of_theta_star_and_of_what_is_missing(run_with_final, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from gradex.export import export

    cfg, _ = run_with_final
    assert main(["export", str(cfg.run_dir), "--which", "meta"]) == 2
    assert "run `gradex meta-train`" in capsys.readouterr().err
    theta = trained(make_trainable(load_base(cfg.model), cfg.model), seed=2)
    save_model(theta, cfg.run_dir / THETA_STAR)
    out = export(cfg.run_dir, "meta")
    assert out == cfg.run_dir / "export" / "meta"
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out).eval()), logits(theta),
                               rtol=1e-5, atol=1e-5)
    assert main(["export", str(tmp_path)]) == 2
    assert "not a gradex run directory" in capsys.readouterr().err


def test_an_old_run_directory_is_refused_and_left_as_it_was(tmp_path, tiny_model_dir, capsys):
    cfg = tiny_run_config(tmp_path, tiny_model_dir)
    old = cfg.run_dir
    (old / "meta").mkdir(parents=True)
    (old / "meta" / "adapter.pt").write_bytes(b"tensors of an older gradex")
    (old / "meta" / "stage.json").write_text("{}")
    before = {p: p.read_bytes() for p in old.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="older gradex.*re-run the experiment into a new one"):
        pipeline.prepare(cfg)
    with pytest.raises(ConfigError, match="older gradex"):
        pipeline.select(cfg)
    assert main(["export", str(old)]) == 2
    assert "older gradex" in capsys.readouterr().err
    rows = pipeline.status(cfg)
    assert rows[0]["state"] == "old" and "--set name=" in rows[0]["why"]
    after = {p: p.read_bytes() for p in old.rglob("*") if p.is_file() and p.name != LOCK}  # the writers' lock
    assert after == before  # nothing written, nothing changed


def test_a_killed_save_leaves_the_previous_model(tmp_path, tiny_model_dir, monkeypatch):
    """save_model replaces the folder whole: a save that dies midway leaves the old adapter loadable."""
    cfg = lora_cfg(tiny_model_dir)
    first = trained(make_trainable(load_base(cfg), cfg))
    save_model(first, tmp_path / "adapter")
    second = trained(make_trainable(load_base(cfg), cfg), seed=3)

    def dies(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(second), "save_pretrained", dies)
    with pytest.raises(KeyboardInterrupt):
        save_model(second, tmp_path / "adapter")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no .partial left behind
    assert torch.equal(logits(load_model(cfg, tmp_path / "adapter").eval()), logits(first))
