"""The prepared data on disk: examples.jsonl and its manifest (`save_examples`, `read_examples`),
and `data_sha256`, the hash of what training and evaluation see."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Sequence

from gradex import ledger
from gradex.atomic import write_bytes, write_json
from gradex.data.examples import Example, Examples, Tokenized


def save_examples(examples: Sequence[Example], tokens: Sequence[Tokenized], out: Path) -> dict:
    """Write examples.jsonl and a manifest of counts, token lengths, a content hash and (for
    load_examples' result) what the leakage check found."""
    out.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({**dataclasses.asdict(e), "n_tokens": len(t.ids)}) for e, t in zip(examples, tokens)]
    body = "\n".join(lines) + "\n"
    write_bytes(out / "examples.jsonl", body.encode())
    per_source: dict[str, dict] = {}
    for e, t in zip(examples, tokens):
        s = per_source.setdefault(e.source, {"count": 0, "splits": {}, "max_tokens": 0, "total_tokens": 0})
        s["count"] += 1
        s["splits"][e.split] = s["splits"].get(e.split, 0) + 1
        s["max_tokens"] = max(s["max_tokens"], len(t.ids))
        s["total_tokens"] += len(t.ids)
    manifest = {"examples": len(examples), "sha256": ledger.sha256(out / "examples.jsonl"), "sources": per_source}
    if isinstance(examples, Examples):
        manifest["leakage"] = examples.leakage
    write_json(out / "manifest.json", manifest)
    return manifest


def read_examples(out: Path) -> list[Example]:
    rows = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines() if line]
    return [Example(r["source"], r["split"], r["prompt"], r["answer"], tuple(r["choices"]), r["row"], r.get("origin", ""))
            for r in rows]


def data_sha256(examples: list[Example], tokens: list[Tokenized]) -> str:
    """The hash of what training and evaluation see (sources, splits, texts, token ids), in order;
    provenance (file lines) is left out, so renumbering a file's rows makes nothing stale."""
    h = hashlib.sha256()
    for e, t in zip(examples, tokens):
        h.update(json.dumps([e.source, e.split, e.prompt, e.answer, list(e.choices), t.ids, t.n_prompt]).encode())
    return h.hexdigest()[:16]
