"""The experiment config: a YAML file validated into dataclasses, with defaults and fingerprints.

Every key of the YAML is a field of the schema; unknown keys and wrong types are errors that name the key.
`resolve` fills defaults; `fingerprint` hashes the parts of the config a stage depends on, so a
stage whose inputs are unchanged is skipped on re-run.

The package, by concern: schema (the dataclasses, their defaults and choices), load (YAML and
overrides in, the resolved config out), validate (the checks that need no data), identity
(`fingerprint`). Its names are importable from gradex.config itself.
"""

from gradex.config.identity import fingerprint, prepare_part
from gradex.config.load import _build, dump, dumps, from_dict, load, load_received, parse_yaml
from gradex.config.schema import (ALIASES, BASELINES, CLUSTER_NAME, DEFAULT_CONFIG, EXAMPLES_DIR, LATER, RENAMED,
                                  SELECT_METHODS, Baseline, ClustersConfig, CompareConfig, Config, DataConfig,
                                  EstimateConfig, FinetuneConfig, GradientConfig, HFSourceConfig, LoraConfig,
                                  ModelConfig, SelectConfig, SelectMethod, SourceConfig, SourceFormat, TargetConfig,
                                  TrainConfig, to_dict)
from gradex.config.validate import check_choices, check_pattern, check_source, check_template, choices, validate
from gradex.errors import ConfigError  # re-exported: gradex.config.ConfigError is what callers catch

__all__ = [
    "prepare_part", "fingerprint", "from_dict", "load", "load_received", "parse_yaml", "dumps", "dump", "_build",
    "EXAMPLES_DIR", "DEFAULT_CONFIG", "LATER", "LoraConfig", "ModelConfig", "HFSourceConfig", "SourceConfig",
    "TargetConfig", "SourceFormat", "ClustersConfig", "DataConfig", "TrainConfig", "FinetuneConfig",
    "GradientConfig", "EstimateConfig", "SelectConfig", "CompareConfig", "Config", "SELECT_METHODS", "BASELINES",
    "SelectMethod", "Baseline", "CLUSTER_NAME", "ALIASES", "RENAMED", "to_dict",
    "validate", "check_source", "check_template", "check_pattern", "check_choices", "choices", "ConfigError",
]
