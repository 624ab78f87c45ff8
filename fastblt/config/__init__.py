"""One config form: typed sections, one validator, one set of defaults.

An experiment is an ml-collections ``ConfigDict`` returned by ``get_config()`` in
``experiments/<name>.py`` (big_vision style; overrides with ``--set key=value`` or
``--config.key=value``). The package reads its typed form, a frozen :class:`Experiment` of frozen
sections, built by :func:`experiment_config`:

    seed
    model          ModelConfig: encoder, global_model, decoder (stacks), entropy_model, patcher, hash
    objective      ObjectiveConfig (a BLT)          entropy_stage  EntropyStageConfig (a BLT)
    entropy_model  EntropyModelConfig (instead of model: an entropy model trained alone)
    data           DataConfig          optimizer  OptimizerConfig     train  TrainConfig
    checkpoint     CheckpointConfig    mesh       MeshConfig

Modules, one job each:

- ``schema``: :func:`build`, the one validator (unknown, missing, mistyped and out-of-range keys
  named by their dotted key, with the fix), :func:`setting` for per-key rules, :func:`as_dict`.
- ``model``, ``data``, ``training``: the sections; their dataclass defaults are the only defaults
  (experiments/base.py copies them with :func:`config_dict`).
- ``experiment``: :class:`Experiment`, the rules between sections, the section accessors.
- ``saved``: configs saved by older versions (keys added since, filled on reading).
- ``experiment_files``: finding and importing experiment files, overrides, :func:`load_config`
  (loaded on first use: it imports ml-collections).
"""

from __future__ import annotations

from fastblt.config.data import SOURCES, DataConfig, parse_data_config
from fastblt.config.experiment import (
    Experiment,
    check_objective,
    config_dict,
    entropy_model_config,
    experiment_config,
    model_config,
    objective_config,
)
from fastblt.config.model import (
    ATTENTION_IMPLS,
    DTYPES,
    HASH_PRIMES,
    INIT_STD_FACTORS,
    PATCHING_MODES,
    REMAT_POLICIES,
    EntropyModelConfig,
    HashConfig,
    LocalModelConfig,
    ModelConfig,
    PatcherConfig,
    TransformerConfig,
    count_params,
    ffn_hidden_dim,
    model_config_from_dict,
    validate,
)
from fastblt.config.saved import upgrade_experiment, upgrade_model
from fastblt.config.schema import ConfigError, as_dict, build, setting
from fastblt.config.training import (
    MESH_AXES,
    NORMALIZATIONS,
    OBJECTIVE_KINDS,
    CheckpointConfig,
    EntropyStageConfig,
    MeshConfig,
    ObjectiveConfig,
    OptimizerConfig,
    TrainConfig,
)
from fastblt.lazy_exports import lazy_exports

_EXPORTS = {
    name: "experiment_files"
    for name in (
        "apply_override",
        "available_experiments",
        "experiment_dirs",
        "import_experiment",
        "load_config",
        "parse_arg",
        "resolve_experiment",
    )
}

__all__ = [
    "ATTENTION_IMPLS",
    "REMAT_POLICIES",
    "DTYPES",
    "HASH_PRIMES",
    "INIT_STD_FACTORS",
    "MESH_AXES",
    "NORMALIZATIONS",
    "OBJECTIVE_KINDS",
    "PATCHING_MODES",
    "SOURCES",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "EntropyModelConfig",
    "EntropyStageConfig",
    "Experiment",
    "HashConfig",
    "LocalModelConfig",
    "MeshConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "OptimizerConfig",
    "PatcherConfig",
    "TrainConfig",
    "TransformerConfig",
    "as_dict",
    "build",
    "check_objective",
    "config_dict",
    "count_params",
    "entropy_model_config",
    "experiment_config",
    "ffn_hidden_dim",
    "model_config",
    "model_config_from_dict",
    "objective_config",
    "parse_data_config",
    "setting",
    "upgrade_experiment",
    "upgrade_model",
    "validate",
    *sorted(_EXPORTS),
]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
