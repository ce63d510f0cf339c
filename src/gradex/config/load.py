"""YAML and `--set` overrides -> a validated `Config` (every mistake one line naming the key, file,
line and column), and the resolved config written back (`dumps`, `dump`)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from gradex.atomic import write_bytes
from gradex.config.identity import fingerprint
from gradex.config.schema import ALIASES, DEFAULT_CONFIG, RENAMED, Config, to_dict
from gradex.config.validate import validate
from gradex.errors import ConfigError


def _build(cls: type, raw: Any, where: str) -> Any:
    """Build dataclass `cls` from a YAML mapping, naming the key path of any mistake."""
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {ALIASES.get(f.name, f.name) for f in dataclasses.fields(cls)}
    fields = {ALIASES.get(f.name, f.name): f.name for f in dataclasses.fields(cls)}
    for key in raw:
        path = f"{where}.{key}".lstrip(".")
        if path in RENAMED:
            new, why = RENAMED[path]
            raise ConfigError(f"{path}: renamed to {new} ({why}); use {new}")
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {fields[key]: _coerce(hints[fields[key]], value, f"{where}.{key}".lstrip(".")) for key, value in raw.items()}
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, where)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {_coerce(args[0], k, f"{where} key"): _coerce(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if hint is float and isinstance(value, float) and not math.isfinite(value):  # no setting means nan or inf
        raise ConfigError(f"{where}: expected a finite number, got {value}")
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def from_dict(raw: dict) -> Config:
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (the embedded default when `path` is None) and apply `key=value` overrides."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if not path.is_file():
        raise ConfigError(f"config file {path}: not a file (give a YAML file)")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[:err.start].count(b"\n") + 1
        raise ConfigError(f"{path}, line {line}: not UTF-8 text (byte {err.object[err.start]:#04x}); save it as "
                          f"UTF-8") from err
    raw = parse_yaml(text, str(path))
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):  # said before an override tries to walk into it
        raise ConfigError(f"{path}: expected a mapping of sections (meta:, data:, ...), got {type(raw).__name__}")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. meta.epochs=2")
        node = raw
        *parents, leaf = key.split(".")
        for depth, part in enumerate(parents):
            if node.get(part) is None:  # absent, or a section left empty (`select:` with nothing under it)
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parents[:depth + 1])} is a value, not a section")
        if not all(part.strip() for part in key.split(".")):
            raise ConfigError(f"override {item!r}: {key!r} is not a key path (e.g. meta.epochs)")
        node[leaf] = parse_yaml(value, f"override {item!r}")
    return from_dict(raw)


def load_received(run_dir: Path, overrides: list[str] | None = None) -> Config:
    """A run directory's own config.yaml, as `--run-dir` and `gradex export` read it: a run directory
    may come from someone else, so its config cannot say to run the model's code. trust_remote_code
    is the invoking user's word (`--set model.trust_remote_code=true`), never the file's."""
    cfg = load(run_dir / "config.yaml", overrides)
    if not any(item.partition("=")[0].strip() == "model.trust_remote_code" for item in overrides or []):
        cfg.model.trust_remote_code = False
    return cfg


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that repeats a key (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: merged by the safe loader below
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: the key {key!r} is given twice")
            seen.add(key)
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, where: str) -> Any:
    """YAML text as Python values, every mistake one line naming `where`, the line and the column."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except ConfigError as err:
        raise ConfigError(f"{where}, {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = " ".join(str(getattr(err, "problem", None) or err).split())
        raise ConfigError(f"{where}{at}: not valid YAML: {what}") from None


def dumps(cfg: Config) -> str:
    """The resolved config as YAML, loadable as it is; its fingerprint goes in a comment so the text
    stays a valid config."""
    return f"# gradex resolved config, fingerprint {fingerprint(cfg)}\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False)


def dump(cfg: Config, path: Path) -> None:
    """Write `dumps(cfg)` (`gradex run runs/<name>/config.yaml` repeats the run); a file that already
    says the same is left as it is (an archived, read-only run can be read and resumed as it is)."""
    text = dumps(cfg).encode()
    if not path.is_file() or path.read_bytes() != text:
        write_bytes(path, text)
