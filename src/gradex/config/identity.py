"""What a config part hashes to (`fingerprint`): only the settings that change a result, so a stage
whose inputs are unchanged is skipped, and settings added later change no earlier run's hash."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from gradex.config.schema import DataConfig, to_dict


def prepare_part(data: DataConfig) -> dict:
    """What of `data` shapes the prepared examples: all but the clusters (made later, at theta*), the
    answer patterns and the target's metric (read when evaluating), so changing those re-runs neither
    prepare nor the training after it. Left out unset too, so the configs of earlier runs keep their hash."""
    raw = to_dict(data)
    raw.pop("clusters")
    raw["target"].pop("metric")
    for src in [raw["target"], *raw["sources"]]:
        src.pop("answer_pattern")
    return raw


def fingerprint(*parts: Any) -> str:
    """A short stable hash of config sections (dataclasses or plain values), without the settings that
    change where or in how many pieces a result is computed but not the result (metadata identity=False)."""
    blob = json.dumps([_identity(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _identity(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _identity(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.metadata.get("identity", True) is True
                or f.metadata.get("identity") == "when_set" and getattr(value, f.name) is not None
                or f.metadata.get("identity") == "when_changed" and getattr(value, f.name) != _default(f)}
    if isinstance(value, (list, tuple)):
        return [_identity(v) for v in value]
    if isinstance(value, dict):
        return {k: _identity(v) for k, v in value.items()}
    return value


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
