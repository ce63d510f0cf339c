"""Fine-tunes of mixes under the finetune recipe and step budget, cached in finetunes/<key>/ and
shared by every stage that needs one; the finetune stage (the final model, final/) and evaluate."""

from __future__ import annotations

import shutil

from gradex import ledger
from gradex.atomic import replacing_dir
from gradex.finetunes import finetune_key, finetune_mix, recipe_summary
from gradex.launch import on_main
from gradex.run import FINAL, Run, log
from gradex.selection import read_selection
from gradex.writer import writes


@writes
def finetune(run: Run, force: bool = False) -> dict:
    """The deliverable: the finetune recipe on target + selected sources, copied to final/selected/
    (a peft adapter: `PeftModel.from_pretrained(base, "runs/<name>/final/selected")`; a transformers
    model folder under full fine-tuning) with its validation and test metrics (final/metrics.json)."""
    body = read_selection(run)
    members, proportions = body["selected"], body.get("proportions")
    key = finetune_key(run, members, 0, proportions)
    if force:
        on_main(lambda: shutil.rmtree(run.dir / "finetunes" / key, ignore_errors=True))
    result = finetune_mix(run, members, 0, desc="finetune[selected]", proportions=proportions)
    out = run.dir / "final"
    previous = out / "metrics.json"

    def copy_final() -> dict:
        record = ledger.kept(previous, key)
        if force or record is None or not (run.dir / FINAL).exists():
            with replacing_dir(run.dir / FINAL) as tmp:
                shutil.copytree(run.dir / result["adapter"], tmp, dirs_exist_ok=True)
            record = ledger.keep(previous, key, {**result, "recipe": recipe_summary(run)})
            log(f"fine-tuned the selection ({len(members)} sources, {result['examples']} examples) in "
                f"{result['steps']} steps: test {result['test']['metric']} {result['test']['score']:.3f}, "
                f"test loss {result['test']['loss']:.4f}")
        return record

    return on_main(copy_final)


