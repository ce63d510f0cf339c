"""The run's estimator: the estimation problem read from the store, its l2 and weighting from the
config, and a function subsets -> estimated target loss that records every estimate; the
`gradex estimate` stage, which adds named subsets' estimates to estimates.parquet."""

from __future__ import annotations

import torch

from gradex import config as config_mod
from gradex.launch import main_first
from gradex.run import Run, log
from gradex.surrogate import estimator, member_mask, save_estimates
from gradex.writer import writes


@writes
@main_first
def estimate(run: Run, force: bool = False, subsets: list[list[str]] | None = None) -> list[dict]:
    """Estimate the target validation loss of named subsets (default: none, all, each source alone,
    and all but each source) and add them to estimates.parquet (save_estimates). `force` changes
    nothing: an estimate is always made afresh (and replaces its own earlier rows)."""
    rows = estimates(run, subsets)
    save_estimates(run, rows)
    return rows


def estimates(run: Run, subsets: list[list[str]] | None) -> list[dict]:
    """The estimates of the named subsets (the default set when None), each a row of the record."""
    names = run.sources
    if subsets is None:
        n = len(names)
        eye = torch.eye(n, dtype=torch.bool)
        members = torch.cat([torch.zeros(1, n, dtype=torch.bool), torch.ones(1, n, dtype=torch.bool), eye, ~eye])
    else:
        unknown = sorted({s for subset in subsets for s in subset} - set(names))
        if unknown:
            raise config_mod.ConfigError(f"estimate: unknown source(s) {unknown}; sources: {names}")
        members = member_mask(names, subsets)
    fn, rows, l2 = estimator(run, stage="estimate")
    log(f"estimate: {len(members)} subset(s)")
    loss = fn(members)
    bad = [rows[j]["members"] for j in (~torch.isfinite(loss)).nonzero().flatten().tolist()]
    if bad:  # as select refuses them: a NaN is no estimate, and is never written as one
        raise FloatingPointError(f"estimate: {len(bad)} subset(s) got a non-finite estimate, e.g. {bad[0]}; "
                                 f"the store holds non-finite gradients or estimate.l2 is out of range")
    return rows
