"""Saved models: a trained model is a folder the ecosystem loads. For LoRA, peft's adapter folder
(adapter_config.json + adapter_model.safetensors: `PeftModel.from_pretrained(base, folder)`); for
full fine-tuning, a transformers model folder (config.json + model.safetensors:
`AutoModelForCausalLM.from_pretrained(folder)`, AutoModelForSeq2SeqLM for a T5). gradex reads them
back the same way, from safetensors only, so reading a run directory received from someone else
cannot run code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from gradex.atomic import replacing_dir
from gradex.config import ConfigError, ModelConfig
from gradex.model import load_base, make_trainable, pretrained

ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")  # one file, or the index of shards
# Older gradex saved the trainable tensors as a raw torch file (meta/adapter.pt, final/adapter.pt,
# finetunes/<key>/adapter.pt, validate/refits/<key>/<id>.pt); such run directories are not read.
LEGACY_ADAPTER = "adapter.pt"
LEGACY_PATTERNS = ("meta/adapter.pt", "final/adapter.pt", "finetunes/*/adapter.pt", "validate/refits/*/*.pt")


def save_model(model: nn.Module, path: Path) -> None:
    """Save a trained model as a folder (see above), replacing `path` whole (gradex.atomic). The tensors
    are written from CPU copies, wherever the model is: the same weights are the same bytes on every
    device (and a device whose tensors have no host storage, like the tests' lazy one, saves too)."""
    with replacing_dir(path) as tmp:
        if hasattr(model, "peft_config"):
            from peft import get_peft_model_state_dict

            state = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(model).items()}
            model.save_pretrained(tmp, safe_serialization=True, state_dict=state)
            _sorted_adapter_config(model, tmp / "adapter_config.json")
        else:  # full fine-tuning: a standalone model folder, which generates with a KV cache
            model.config.use_cache = True
            try:
                model.save_pretrained(tmp, safe_serialization=True,
                                      state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()})
            finally:
                model.config.use_cache = False


def _sorted_adapter_config(model: nn.Module, path: Path) -> None:
    """peft writes a set-valued setting (target_modules) as a list in set order, which Python's string
    hashing makes differ between processes; sorted, the same adapter is the same bytes (the ledger
    hashes them, and two processes must write an identical theta*)."""
    body = json.loads(path.read_text())
    config = model.peft_config["default"]
    for key, value in body.items():
        if isinstance(getattr(config, key, None), (set, frozenset)) and isinstance(value, list):
            body[key] = sorted(value)
    path.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")


def check_saved(path: Path, cfg: ModelConfig) -> None:
    """A readable saved model at `path` for `cfg.model.finetune`, or an error saying what is wrong."""
    if not path.exists():
        legacy = [p for p in (path.parent / LEGACY_ADAPTER, path.with_name(path.name + ".pt")) if p.is_file()]
        raise ConfigError(legacy_message(legacy[0]) if legacy else f"{path}: no saved model there")
    if cfg.finetune == "lora":
        if not (path / ADAPTER_WEIGHTS).is_file():
            raise ConfigError(f"{path}: no peft adapter ({ADAPTER_WEIGHTS}) there; gradex reads adapters from "
                              f"safetensors only (a pickled adapter_model.bin could run code when loaded)")
    elif not any((path / name).is_file() for name in MODEL_WEIGHTS):
        raise ConfigError(f"{path}: no transformers model (model.safetensors) there; model.finetune is full")


def legacy_models(run_dir: Path) -> list[Path]:
    """The models of an older gradex in a run directory (none in one this gradex wrote)."""
    return sorted(p for pattern in LEGACY_PATTERNS for p in run_dir.glob(pattern))


def legacy_message(where: Path) -> str:
    return (f"{where} is a model in the raw tensor format of an older gradex (adapter.pt), which this gradex "
            f"no longer reads: it saves peft adapters and transformers model folders that peft and "
            f"transformers load. gradex does not convert or change that run directory; re-run the "
            f"experiment into a new one (`--set name=<new name>`), or delete it and re-run it in place")


def load_model(cfg: ModelConfig, path: Path) -> nn.Module:
    """A model `save_model` saved, through the loaders a user would call, set up like `make_trainable`
    (the same trainable parameters, in the same order, so training resumes and gradients align)."""
    check_saved(path, cfg)
    if cfg.finetune == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_base(cfg), str(path), is_trainable=True)
        _check_lora(model.peft_config["default"], cfg, path)
        return model
    model = pretrained(cfg, str(path), None)
    return make_trainable(model, cfg)


def _check_lora(saved: Any, cfg: ModelConfig, path: Path) -> None:
    """The adapter in the folder is the one the config describes (a swapped folder is an error here,
    not a silently different model)."""
    found = (saved.r, saved.lora_alpha, sorted(saved.target_modules))
    wanted = (cfg.lora.r, cfg.lora.alpha, sorted(cfg.lora.target_modules))
    if found != wanted:
        raise ConfigError(f"{path}: the adapter has r, alpha, target_modules = {found}, but model.lora says {wanted}")
