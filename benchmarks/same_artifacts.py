"""Whether two run directories of the same config hold the same artifacts: the check that a refactor
changed no result (issue "One stage graph").

    python benchmarks/same_artifacts.py RUN_A RUN_B

RUN_A and RUN_B are the run directories of one config made by two versions of gradex (e.g. one from a
`git worktree` of the older commit, with its src/ first on PYTHONPATH). Prints, for each, the hashes of
the prepared examples, theta*, the clusters (with data.clusters), every file of the store, and
selection.json, whole and without its timings (the only fields two runs of the same work may differ
in), compare's rows (what each fine-tune trained on and what it measured; columns a later version
added, like `proportions`, and the timings are left out), and which differ.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from gradex.ledger import sha256  # noqa: E402

import pandas as pd  # noqa: E402

# compare.parquet's columns that say what a fine-tune trained on and what it measured
COMPARE_ROWS = ("mix", "kind", "seed", "members", "size", "steps", "examples", "key", "estimate",
                "validation_loss", "test_loss", "test_score", "test_no_match")


def without_timings(value: object) -> object:
    """A JSON value without the keys that time work (`seconds`, `*_seconds`, per-second rates)."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items()
                if k != "seconds" and not k.endswith("_seconds") and "per_second" not in k}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def hashes(run: Path) -> dict[str, str]:
    out = {"data/examples.jsonl": sha256(run / "data" / "examples.jsonl"), "meta/theta_star": sha256(run / "meta" / "theta_star")}
    if (run / "clusters" / "clusters.json").exists():  # data.clusters: the sources the clusters made
        body = without_timings(json.loads((run / "clusters" / "clusters.json").read_text()))
        out["clusters/clusters.json without timings"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    for f in sorted((run / "store").iterdir()):
        if f.is_file() and f.name != "stage.json":
            out[f"store/{f.name}"] = sha256(f)
            if f.suffix == ".json":
                body = without_timings(json.loads(f.read_text()))
                out[f"store/{f.name} without timings"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    out["store (the ledger's output)"] = json.loads((run / "store" / "stage.json").read_text())["outputs"]["store"]
    out["selection.json"] = sha256(run / "selection.json")
    body = without_timings(json.loads((run / "selection.json").read_text()))
    out["selection.json without timings"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    if (run / "compare.parquet").exists():
        rows = pd.read_parquet(run / "compare.parquet")[list(COMPARE_ROWS)]
        out["compare rows"] = hashlib.sha256(rows.to_json(orient="records", double_precision=15).encode()).hexdigest()[:16]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs=2, type=Path)
    args = ap.parse_args(argv)
    a, b = (hashes(r) for r in args.runs)
    for name in a:
        print(f"{name:40s} {a[name]}  {b.get(name)}  {'same' if a[name] == b.get(name) else 'DIFFERENT'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
