"""`gradex export`: a run's final model (or theta*) as a standalone transformers model folder.

A LoRA adapter is merged into its base model with peft's `merge_and_unload`, so the result needs
neither peft nor the base model: `AutoModelForCausalLM.from_pretrained(folder)` (an encoder-decoder's,
T5's: `AutoModelForSeq2SeqLM`) and `AutoTokenizer.from_pretrained(folder)` load it. A full fine-tune is already a model folder; it
gets the tokenizer beside it. The run directory is read through its own resolved config
(`<run>/config.yaml`), so the base model, LoRA settings and tokenizer are the ones it was trained with.

The export replaces its folder whole, so it writes only where nothing of the user's can be lost: a
new or empty folder, an earlier export (it holds the marker `.gradex-export`), or the run's own
export/<which>. Any other folder is refused, never cleared.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from gradex import config as config_mod
from gradex.atomic import replacing_dir
from gradex.config import ConfigError
from gradex.model import load_tokenizer
from gradex.saved import legacy_message, legacy_models, load_model
from gradex.run import FINAL, THETA_STAR
from gradex.writer import writing

WHICH = {"final": FINAL, "meta": THETA_STAR}  # what can be exported -> where the run keeps it
PRODUCED_BY = {"final": "gradex finetune", "meta": "gradex meta-train"}
MARKER = ".gradex-export"  # in every folder an export wrote


def check_target(out: Path, default: Path) -> None:
    """Refuse to replace a folder that holds files and is not an export of gradex's."""
    if not out.exists() or out.resolve() == default.resolve():
        return
    if not out.is_dir():
        raise ConfigError(f"export: --out {out} is a file; give a new folder (or an earlier export)")
    if any(out.iterdir()) and not (out / MARKER).is_file():
        raise ConfigError(f"export: --out {out} holds files and is not an earlier gradex export (no {MARKER}); an "
                          f"export replaces its folder whole, so give a new or empty folder")


def export(run_dir: Path, which: str = "final", out: Path | None = None, trust_remote_code: bool = False) -> Path:
    """Write `which` model of the run in `run_dir` as a standalone model folder (default
    <run_dir>/export/<which>); return where it went. The model's own code runs only with
    `trust_remote_code` (the caller's word: the run's config.yaml cannot say it)."""
    if which not in WHICH:
        raise ConfigError(f"export: --which {which!r} is not one of {list(WHICH)}")
    legacy = legacy_models(run_dir)
    if legacy:
        raise ConfigError(legacy_message(legacy[0]))
    resolved = run_dir / "config.yaml"
    if not resolved.is_file():
        raise ConfigError(f"export: {run_dir} is not a gradex run directory (no config.yaml); give runs/<name>")
    cfg = config_mod.load_received(run_dir, ["model.trust_remote_code=true"] if trust_remote_code else [])
    saved = run_dir / WHICH[which]
    if not saved.exists():
        raise ConfigError(f"export: {saved} does not exist yet; run `{PRODUCED_BY[which]}` for this config first")
    default = run_dir / "export" / which
    out = out if out is not None else default
    check_target(out, default)  # before the model loads: a refusal costs nothing
    model = load_model(cfg.model, saved)
    if cfg.model.finetune == "lora":
        model = model.merge_and_unload()  # W + (alpha / r) B A in every adapted layer; the peft wrapper is gone
    model.config.use_cache = True  # gradex trains without a KV cache; generation wants one
    for p in model.parameters():
        p.requires_grad_(False)
    inside = out.resolve().is_relative_to(run_dir.resolve())
    with writing(run_dir) if inside else contextlib.nullcontext():  # a write into the run: its writer
        with replacing_dir(out) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            load_tokenizer(cfg.model).save_pretrained(tmp)
            (tmp / MARKER).write_text(json.dumps({"run": str(run_dir.resolve()), "which": which}) + "\n")
    return out
