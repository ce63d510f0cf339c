"""Sources added to a run after theta* was trained: the file `gradex add-sources` reads, and the
run directory's own record of them, `added_sources.yaml`.

A run's candidate sources are its config's `data.sources` (the ones theta* was trained on) followed
by the sources of `<run dir>/added_sources.yaml`, in the order they were added. That file is the
run's: the config is left as it is (config.yaml stays the config theta* was trained with, so the
meta stage is not stale), and every command on the run directory reads the file. To train theta*
with an added source, move its entry into the config's `data.sources` and delete it from
added_sources.yaml; gradex refuses a source named in both.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from gradex.config import Config, ConfigError, SourceConfig, _build, check_source, parse_yaml

ADDED_FILE = "added_sources.yaml"  # in the run directory
KEYS = ("sources",)  # the top-level keys of a sources file


def _line_of(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def read_sources_file(path: str | Path, allow_empty: bool = False) -> list[SourceConfig]:
    """The sources of a YAML file `{sources: [...]}`, each with the schema of the config's
    `data.sources` and its checks; every error names the file, the entry's line and the key. An empty
    list is an error unless `allow_empty` (a run's own list, whose entries were all dropped)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"sources file not found: {path}")
    text = path.read_text()
    try:
        root = yaml.compose(text)  # the nodes carry line numbers
    except yaml.YAMLError as err:  # one line: where, and what the parser expected
        mark = getattr(err, "problem_mark", None)
        at = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        what = " ".join(str(getattr(err, "problem", None) or err).split())
        raise ConfigError(f"{path}{at}: not valid YAML: {what}") from err
    # the values, as the config's own loader reads them: a repeated key (PyYAML keeps the last, while
    # the line numbers above would be the first's) is an error naming its line
    raw = parse_yaml(text, str(path))
    if not isinstance(raw, dict) or not isinstance(root, yaml.MappingNode):
        raise ConfigError(f"{path}: expected a mapping with the key `sources` (a list of sources, the schema of "
                          f"the config's data.sources), got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; known: {list(KEYS)}")
    items = raw.get("sources")
    node = next((v for k, v in root.value if k.value == "sources"), None)
    if not isinstance(items, list) or not (items or allow_empty) or not isinstance(node, yaml.SequenceNode):
        line = f" line {_line_of(node)}" if node is not None else ""
        raise ConfigError(f"{path}{line}: sources: expected a non-empty list of sources, got {items!r}")
    sources: list[SourceConfig] = []
    for i, (item, item_node) in enumerate(zip(items, node.value)):
        name = item.get("name") if isinstance(item, dict) else None
        where = f"{path} line {_line_of(item_node)}: sources[{i}]" + (f" ({name})" if name else "")
        src = _build(SourceConfig, item, where)
        check_source(src, where)
        sources.append(src)
    names = [s.name for s in sources]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        lines = [_line_of(n) for s, n in zip(sources, node.value) if s.name in dupes]
        raise ConfigError(f"{path} lines {lines}: duplicate source name(s) {dupes}")
    return sources


def read_added(run_dir: Path) -> list[SourceConfig]:
    """The sources added to the run at `run_dir` (none when it has no added_sources.yaml, or when the
    file says `sources: []`: every added source dropped)."""
    path = run_dir / ADDED_FILE
    return read_sources_file(path, allow_empty=True) if path.exists() else []


def write_added(run_dir: Path, sources: list[SourceConfig]) -> None:
    from gradex.atomic import write_bytes

    header = ("# Sources added to this run by `gradex add-sources`: their gradients are taken at the existing\n"
              "# theta*, which was not trained on them. Every command on this run directory treats them as\n"
              "# candidates after the config's data.sources. Delete an entry and re-run to drop it.\n")
    body = yaml.safe_dump({"sources": [dataclasses.asdict(s) for s in sources]}, sort_keys=False)
    write_bytes(run_dir / ADDED_FILE, (header + body).encode())


def merge(cfg: Config, trained: list[str], added: list[SourceConfig], new: list[SourceConfig],
          path: str | Path) -> list[SourceConfig]:
    """The run's added sources after adding `new` (read from `path`): a name already trained into
    theta* or the target's is an error; a source added before is kept if given again unchanged (so a
    re-run of an interrupted `gradex add-sources` resumes) and an error if given differently."""
    before = {s.name: s for s in added}
    out = list(added)
    for src in new:
        if src.name == cfg.data.target.name:
            raise ConfigError(f"{path}: source {src.name!r} is the target's name")
        if src.name in trained:
            raise ConfigError(f"{path}: source {src.name!r} is already a source of this run (the config's "
                              f"data.sources, trained into theta*); give the new source another name")
        if src.name in before:
            if before[src.name] != src:
                raise ConfigError(f"{path}: source {src.name!r} was added before with other settings "
                                  f"({cfg.run_dir / ADDED_FILE}); give it another name, or edit or delete its "
                                  f"entry there")
            continue
        out.append(src)
    return out


def check_disjoint(cfg: Config, added: list[SourceConfig]) -> None:
    """A source named both in the config and in added_sources.yaml would be ambiguous (trained into
    theta* or not?): refuse it before any stage runs."""
    both = sorted({s.name for s in added} & {s.name for s in cfg.data.sources} | {s.name for s in added} &
                  {cfg.data.target.name})
    if both:
        raise ConfigError(f"source(s) {both} are in the config (data.sources or the target) and in "
                          f"{cfg.run_dir / ADDED_FILE}; delete them from {ADDED_FILE} (a source in the config is "
                          f"trained into theta*)")
