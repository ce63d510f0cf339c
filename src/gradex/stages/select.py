"""select: choose sources by their estimates (gradex.search's methods on the run's estimator);
writes selection.json and adds the estimates to estimates.parquet (keyed: stages.estimate.save_estimates)."""

from __future__ import annotations

import json
import time

from gradex import config as config_mod
from gradex import ledger
from gradex.atomic import write_bytes, write_json
from gradex.launch import main_first
from gradex.proportions import MIXTURE, mixture_yaml
from gradex.run import Run, log
from gradex.selection import selected_clusters, selection, stability
from gradex.stability import stability_lines
from gradex.surrogate import estimator, save_estimates
from gradex.writer import writes


def inputs(run: Run) -> dict[str, str | None]:
    """select's ledger inputs: the estimate and select settings, the weighting, the data, the store
    (and the clusters, which are the sources, with data.clusters)."""
    c = run.cfg
    found = {"config": config_mod.fingerprint(c.estimate, c.select, c.resolved_weighting()),
             "data": run.output("data"), "store": run.output("store")}
    if c.select.method == "weights":  # proportions found before the target's floor are stale
        found["weights"] = WEIGHTS_FORMAT
        f = c.finetune  # what the budget the shares divide (and the mixture's seed) comes from
        found["budget"] = config_mod.fingerprint(f.budget, f.max_steps, f.max_tokens, f.epochs, f.batch_size, f.seed)
    return {**found, "clusters": run.output("clusters")} if c.data.clusters else found


# bump when the weights method changes its answer for the same settings (2: select.target_floor)
WEIGHTS_FORMAT = 2


@writes
@main_first
def select(run: Run, force: bool = False) -> dict:
    """Select sources by their estimates; writes selection.json and adds its rows to estimates.parquet."""
    cfg = run.cfg
    path = run.dir / "selection.json"
    # the file the record describes: a kill between writing it and recording it leaves another's
    if run.done("select", force) and path.exists() and ledger.sha256(path) == run.output("selection"):
        return json.loads(path.read_text())
    fn, rows, l2 = estimator(run)
    body = selection(run, cfg.select.method, fn)
    body.update({"l2": l2, "estimated_subsets": len(rows)})
    t0 = time.perf_counter()
    if cfg.select.bootstrap and cfg.estimate.mode == "linear":  # reconstruct mode would re-run the model per resample
        body["stability"] = stability(run, body, l2)
    resampled = round(time.perf_counter() - t0, 3)
    chosen = selected_clusters(run, body["selected"])
    if chosen is not None:  # what the selected clusters hold, for a person to read (all: clusters/clusters.json)
        body["clusters"] = chosen
    run.mark("select", status="running")  # from here the files are this run's, not the old record's
    write_json(path, body)
    if "mixture" in body:  # the proportions as training frameworks take them
        write_bytes(run.dir / MIXTURE, mixture_yaml(body["mixture"]).encode())
    else:  # an earlier weights selection's, which this one replaces
        (run.dir / MIXTURE).unlink(missing_ok=True)
    save_estimates(run, rows)
    run.mark("select", subsets=len(rows), seconds=round(body["seconds"] + resampled, 3), bootstrap_seconds=resampled,
             outputs={"selection": ledger.sha256(path)})
    log(f"estimated {len(rows)} subsets in {body['seconds']:.2f} s ({cfg.estimate.mode} mode, l2={l2:.3g}); "
        f"selected {body['selected']}")
    if "proportions" in body:
        log("proportions: " + ", ".join(f"{n} {v:.1%}" for n, v in body["proportions"].items() if v > 0)
            + f" ({run.dir / MIXTURE}); {body['reason']}")
    if "stability" in body:
        found = body["stability"]
        log(f"selection stability over {found['resamples']} bootstrap resamples of the store "
            f"({resampled:.1f} s): " + (", ".join(f"{s} {found['share'][s]:.0%}" for s in body["selected"])
                                               or f"the target alone {found['stability']:.0%}"))
        for line in stability_lines(body):
            log(f"warning: {line}")
    if body["worse_than_target"]:
        log("warning: the selected sources are estimated to make the target worse than fine-tuning on the "
            "target alone (selection.json, reason); consider select.method exhaustive, forward or effects")
    return body
