"""The checks a config needs without its data: choices, sizes, names, templates, answer patterns,
clusters and proportions; each error names the key."""

from __future__ import annotations

import dataclasses
import re
import string
import types
import typing
from typing import Any

from gradex.config.schema import ALIASES, CLUSTER_NAME, Config, HFSourceConfig, SourceConfig, TargetConfig, TrainConfig
from gradex.errors import ConfigError


def choices(hint: Any) -> tuple | None:
    """The values a Literal annotation allows (inside Optional or list too), or None for any other type."""
    if typing.get_origin(hint) is typing.Literal:
        return typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType, list):
        found = [c for a in typing.get_args(hint) if (c := choices(a)) is not None]
        return found[0] if found else None
    return None


def check_choices(section: Any, where: str = "") -> None:
    """Every Literal-typed key of a config section (and the sections in it) holds an allowed value: the
    schema's annotations are the one table of choices."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        key = f"{where}.{ALIASES.get(f.name, f.name)}".lstrip(".")
        value = getattr(section, f.name)
        allowed = choices(hints[f.name])
        if allowed is not None:
            for v in value if isinstance(value, list) else [value]:
                if v is not None and v not in allowed:
                    raise ConfigError(f"{key}: {v!r} is not one of {list(allowed)}")
        elif dataclasses.is_dataclass(value):
            check_choices(value, key)


def validate(cfg: Config) -> None:
    """Checks that need no data: choices, positive sizes, unique names, target not a source."""
    if cfg.name in ("", ".", "..") or any(c in cfg.name for c in "/\\\0"):
        raise ConfigError(f"name: {cfg.name!r} must be one folder name (no '/', not empty, '.' or '..'): the run "
                          f"directory is runs_dir/name, and a name must not lead out of runs_dir")
    check_choices(cfg)
    if not cfg.data.target.name:
        raise ConfigError("data.target.name: the target needs a name")
    for i, src in enumerate([cfg.data.target, *cfg.data.sources]):
        check_source(src, "data.target" if i == 0 else f"data.sources[{i - 1}] ({src.name or 'unnamed'})")
    names = [s.name for s in cfg.data.sources]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"data.sources: duplicate source name(s) {dupes}")
    if cfg.data.target.name in names:
        raise ConfigError(f"data.sources: the target {cfg.data.target.name!r} is also listed as a source")
    check_template(cfg.data.sources_format.template, "data.sources_format.template")
    if (cfg.data.sources_file is None) != (cfg.data.sources_column is None):
        raise ConfigError("data: `sources_file` and `sources_column` go together")
    clusters = cfg.data.clusters
    if not cfg.data.sources and cfg.data.sources_file is None and not (clusters and clusters.from_ == "target_train"):
        raise ConfigError("data.sources: give at least one source (or sources_file + sources_column, or "
                          "data.clusters.from: target_train)")
    if clusters is not None:
        _validate_clusters(cfg)
    for i, src in enumerate([cfg.data.target, *cfg.data.sources]):
        if src.answer_pattern is not None:
            where = "data.target" if i == 0 else f"data.sources[{i - 1}] ({src.name})"
            check_pattern(src.answer_pattern, f"{where}.answer_pattern")
    t = cfg.data.target
    if t.metric == "options" and t.bigbench is None:
        raise ConfigError("data.target.metric: options scores a BIG-bench task's target_scores options, and the "
                          "target is not a BIG-bench task; use first_word (the first word of each answer, scored "
                          "by likelihood) or exact_match")
    for split in ("train", "validation", "test"):
        if getattr(t, split) < 1:
            raise ConfigError(f"data.target.{split}: needs at least 1 example")
    for key, value in [("model.max_length", cfg.model.max_length), ("gradients.dim", cfg.gradients.dim),
                       ("gradients.batch_size", cfg.gradients.batch_size), ("select.subsets", cfg.select.subsets)]:
        if value is not None and value < 1:
            raise ConfigError(f"{key}: must be positive, got {value}")
    if cfg.select.bootstrap < 0 or cfg.select.bootstrap == 1:
        raise ConfigError(f"select.bootstrap: resamples, 0 (none) or at least 2, got {cfg.select.bootstrap}")
    for section in ("meta", "finetune", "refit"):
        recipe: TrainConfig = getattr(cfg, section)
        for key in ("epochs", "lr"):
            if not getattr(recipe, key) > 0:
                raise ConfigError(f"{section}.{key}: must be positive, got {getattr(recipe, key)}")
        if recipe.batch_size < 1 or (recipe.max_steps is not None and recipe.max_steps < 1):
            raise ConfigError(f"{section}: batch_size and max_steps must be at least 1, got "
                              f"{recipe.batch_size} and {recipe.max_steps}")
        if recipe.micro_batch_size is not None and recipe.micro_batch_size < 1:
            raise ConfigError(f"{section}.micro_batch_size: must be at least 1 (or null), got {recipe.micro_batch_size}")
        if recipe.weight_decay < 0 or not 0 <= recipe.warmup < 1:
            raise ConfigError(f"{section}: weight_decay must be >= 0 and warmup in [0, 1), got "
                              f"{recipe.weight_decay} and {recipe.warmup}")
    f = cfg.finetune
    if f.max_tokens is not None and (f.max_tokens < 1 or f.max_steps is not None or f.budget != "equal"):
        raise ConfigError(f"finetune.max_tokens: a positive equal budget in tokens, instead of max_steps (and with "
                          f"budget: equal), got max_tokens {f.max_tokens}, max_steps {f.max_steps}, budget {f.budget}")
    if cfg.data.target.limit is not None:  # it would be silently ignored
        raise ConfigError(f"data.target: limit does not apply to the target (its size is train + validation + "
                          f"test), got {cfg.data.target.limit}")
    if cfg.data.per_source is not None and cfg.data.per_source < 1:
        raise ConfigError(f"data.per_source: must be at least 1, got {cfg.data.per_source}")
    if not 0 < cfg.select.alpha < 1:
        raise ConfigError(f"select.alpha: must be in (0, 1), got {cfg.select.alpha}")
    for key in ("output_change", "step_size", "l2"):
        value = getattr(cfg.estimate, key)
        if value is not None and not value > 0:
            raise ConfigError(f"estimate.{key}: must be positive, got {value}")
    if all(getattr(cfg.estimate, k) is None for k in ("output_change", "step_size", "l2")):
        raise ConfigError("estimate: set one of output_change, step_size or l2 (they set the regularization)")
    if not 0 <= cfg.estimate.tol < 1:
        raise ConfigError(f"estimate.tol: must be in [0, 1), got {cfg.estimate.tol}")
    if cfg.estimate.refinements < 0:
        raise ConfigError(f"estimate.refinements: must be >= 0, got {cfg.estimate.refinements}")
    for key, value in [("compare.seeds", cfg.compare.seeds), ("compare.run_seeds", cfg.compare.run_seeds)]:
        if value < 1:
            raise ConfigError(f"{key}: must be at least 1, got {value}")
    _validate_weights(cfg)
    if cfg.select.top_k is not None and cfg.select.top_k < 1:
        raise ConfigError(f"select.top_k: must be at least 1 (or null), got {cfg.select.top_k}")
    for key, value in [("data.seed", cfg.data.seed), ("meta.seed", cfg.meta.seed), ("finetune.seed", cfg.finetune.seed),
                       ("refit.seed", cfg.refit.seed), ("gradients.seed", cfg.gradients.seed),
                       ("select.seed", cfg.select.seed)]:
        if value < 0:  # numpy's generators refuse negative seeds, late
            raise ConfigError(f"{key}: must be >= 0, got {value}")
    configured = {s.name for s in cfg.data.sources}
    if cfg.data.sources_file is None and cfg.data.clusters is None:  # else the sources are known after prepare
        for name, members in cfg.compare.mixes.items():
            unknown = sorted(set(members) - configured)
            if unknown:
                raise ConfigError(f"compare.mixes.{name}: unknown source(s) {unknown}; sources: {sorted(configured)}")
    if cfg.gradients.preconditioner_batches < 1:
        raise ConfigError(f"gradients.preconditioner_batches: must be positive, got {cfg.gradients.preconditioner_batches}")
    if cfg.gradients.chunk_size < 1:
        raise ConfigError(f"gradients.chunk_size: must be positive, got {cfg.gradients.chunk_size}")
    lora = cfg.model.lora
    if lora.r < 1 or not lora.alpha > 0:
        raise ConfigError(f"model.lora: r must be at least 1 and alpha positive, got r={lora.r}, alpha={lora.alpha}")
    if not lora.target_modules:
        raise ConfigError("model.lora.target_modules: name at least one module (e.g. [q_proj, v_proj])")


def _validate_weights(cfg: Config) -> None:
    """select.method weights and its knobs: what can be checked without the data (the caps need the
    sources' sizes: gradex.proportions.check, at prepare)."""
    s = cfg.select
    if not 0 <= s.min_share < 0.5:
        raise ConfigError(f"select.min_share: must be in [0, 0.5), got {s.min_share}")
    if s.max_repeats is not None and not s.max_repeats > 0:
        raise ConfigError(f"select.max_repeats: must be positive (or null), got {s.max_repeats}")
    if bool(s.prior) != (s.max_shift is not None):
        raise ConfigError("select: `prior` and `max_shift` go together (stay within max_shift of the prior mix)")
    if s.max_shift is not None and not 0 <= s.max_shift <= 1:
        raise ConfigError(f"select.max_shift: a total variation distance in [0, 1], got {s.max_shift}")
    if s.prior:
        bad = {k: v for k, v in s.prior.items() if not isinstance(v, (int, float)) or v < 0}
        if bad:
            raise ConfigError(f"select.prior: shares must be numbers >= 0, got {bad}")
        if abs(sum(s.prior.values()) - 1) > 1e-6:
            raise ConfigError(f"select.prior: the shares must sum to 1, got {sum(s.prior.values()):.6g}")
        if cfg.data.sources_file is None and cfg.data.clusters is None:  # else the names are known after prepare
            names = [cfg.data.target.name, *(src.name for src in cfg.data.sources)]
            unknown = sorted(set(s.prior) - set(names))
            if unknown:
                raise ConfigError(f"select.prior: unknown name(s) {unknown}; the target and the sources are {names}")
    uses = s.method == "weights" or "weights" in cfg.compare.methods
    if uses and cfg.estimate.mode != "linear":
        raise ConfigError("select.method weights: needs estimate.mode linear (the proportions' gradient is the "
                          "linear estimate's)")
    f = cfg.finetune
    if uses and f.budget == "epochs" and f.max_steps is None and f.max_tokens is None:  # no fixed budget to share
        raise ConfigError("select.method weights: proportions share a fixed budget of steps, and finetune.budget "
                          "epochs gives each mix its own; set finetune.budget equal (or finetune.max_steps)")
    if uses and cfg.resolved_weighting() == "sum":
        raise ConfigError("select.method weights: proportions share a fixed budget of steps; set finetune.budget "
                          "equal (or finetune.max_steps) and estimate.weighting mean (or auto, which is sum "
                          "for data.clusters from target_train)")


def check_source(src: SourceConfig, where: str) -> None:
    """The checks one source needs without its data (`where` names it in the error); also those of
    the sources `gradex add-sources` reads from its own file."""
    if not src.name:
        raise ConfigError(f"{where}: every source needs a name")
    if src.name != src.name.strip() or any(c in src.name for c in ",=") or not src.name.isprintable():
        raise ConfigError(f"{where}: name {src.name!r}: no commas, '=', control characters or surrounding spaces "
                          f"(the CLI's --subset a,b and --mix name=a,b separate names with them)")
    check_template(src.template, f"{where}.template")
    given = [f"`{k}`" for k in ("bigbench", "path", "hf") if getattr(src, k) is not None]
    if len(given) != 1:
        said = f"sets both {' and '.join(given)}" if given else "sets none of `bigbench`, `path`, `hf`"
        raise ConfigError(f"{where}: {said}; give exactly one")
    if src.hf is not None:
        _check_hf(src.hf, f"{where}.hf")
    if (src.source_column is None) != (src.source_value is None):
        raise ConfigError(f"{where}: `source_column` and `source_value` go together")
    check_choices(src, where)  # also for a sources file's entries (gradex.added), which validate never sees
    if not isinstance(src, TargetConfig) and src.limit is not None and src.limit < 1:
        raise ConfigError(f"{where}: limit must be at least 1, got {src.limit}")


def _check_hf(hf: HFSourceConfig, where: str) -> None:
    if not hf.path:
        raise ConfigError(f"{where}.path: name the dataset (a hub id, a local folder, or json/csv/parquet with "
                          f"data_files)")
    files = hf.data_files
    items = files if isinstance(files, list) else list(files.values()) if isinstance(files, dict) else [files]
    flat = [f for item in items for f in (item if isinstance(item, list) else [item])]
    if files is not None and not all(isinstance(f, str) for f in flat):
        raise ConfigError(f"{where}.data_files: expected a file, a list of files or {{split: files}}, got {files!r}")


def check_template(template: str, where: str) -> None:
    """A prompt template that str.format can fill from a row's columns: it parses, and names each field
    ({prompt}, {question}) with no position ({}), attribute or index ({prompt.x}, {row[0]})."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise ConfigError(f"{where}: {template!r} is not a format string: {err} (write a literal brace as {{{{ or }}}})") \
            from None
    for name in fields:
        if not name.isidentifier():
            raise ConfigError(f"{where}: {template!r}: the field {{{name}}} is not a column name; write {{prompt}} or "
                              f"{{<column>}}")


def check_pattern(pattern: str, where: str) -> re.Pattern:
    """The compiled answer pattern, or an error naming where it was given."""
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"{where}: {pattern!r} is not a valid regular expression: {err}") from err


def _validate_clusters(cfg: Config) -> None:
    """data.clusters: its choices, k, and cluster names that no configured source already has."""
    c = cfg.data.clusters
    if c.k < 2:
        raise ConfigError(f"data.clusters.k: must be at least 2 (one cluster is the whole pool), got {c.k}")
    taken = [s.name for s in cfg.data.sources if CLUSTER_NAME.fullmatch(s.name)]
    if c.from_ == "target_train" and taken:
        raise ConfigError(f"data.sources: {taken} would collide with the clusters' names (cluster-NNN); rename them")

