"""A whole experiment: the typed sections together, the rules between them, and the ConfigDict form.

An experiment trains a BLT (a ``model`` section, with ``objective`` and ``entropy_stage``) or an
entropy model alone (an ``entropy_model`` section and neither of those two); both have ``seed``,
``data``, ``optimizer``, ``train``, ``checkpoint`` and ``mesh``. Experiment files hold the
ml-collections form (:func:`config_dict`); the package reads the frozen :class:`Experiment` that
:func:`experiment_config` builds from it with the one validator (fastblt/config/schema.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fastblt.config.data import DataConfig
from fastblt.config.model import EntropyModelConfig, ModelConfig
from fastblt.config.schema import ConfigError, as_dict, build, join, plain, require, setting
from fastblt.config.training import (
    CheckpointConfig,
    EntropyStageConfig,
    MeshConfig,
    ObjectiveConfig,
    OptimizerConfig,
    TrainConfig,
)

if TYPE_CHECKING:  # ml-collections is imported where a ConfigDict is made
    import ml_collections

# The sections only a BLT experiment has.
BLT_SECTIONS = ("model", "objective", "entropy_stage")


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Every section of an experiment; the defaults are a BLT-1B run (float32, base settings).

    ``model``, ``entropy_model``, ``objective`` and ``entropy_stage`` are left out of the mapping
    form when None; which of ``model`` and ``entropy_model`` is there says what is trained.
    """

    seed: int = setting(0, ge=0)
    model: ModelConfig | None = setting(ModelConfig(), absent_is_none=True)
    entropy_model: EntropyModelConfig | None = setting(None, absent_is_none=True)
    objective: ObjectiveConfig | None = setting(ObjectiveConfig(), absent_is_none=True)
    entropy_stage: EntropyStageConfig | None = setting(EntropyStageConfig(), absent_is_none=True)
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    mesh: MeshConfig = MeshConfig()

    @classmethod
    def of_entropy_model(cls, model: EntropyModelConfig, **sections: Any) -> Experiment:
        """An experiment that trains ``model`` alone (no BLT sections)."""
        return cls(model=None, entropy_model=model, objective=None, entropy_stage=None, **sections)

    def check(self, key: str) -> None:
        del key  # the top level
        if self.model is None and self.entropy_model is None:
            raise ConfigError(_NO_MODEL)
        if self.model is not None:
            require(
                self.entropy_model is None,
                "entropy_model",
                "an experiment trains a BLT (`model`, whose entropy model is model.entropy_model) or an "
                "entropy model alone (`entropy_model`), not both: remove one section",
            )
            for name in BLT_SECTIONS[1:]:
                if getattr(self, name) is None:
                    raise ConfigError(
                        f"{name} is missing; a BLT experiment needs it (its defaults: "
                        f"fastblt.config.{_CLASSES[name]}(), in experiments/base.py's blt())"
                    )
            _check_blt(self)
        else:
            for name in BLT_SECTIONS[1:]:
                require(
                    getattr(self, name) is None,
                    name,
                    "an entropy-model experiment trains next-byte prediction and has no such section; remove it",
                )
        batch, accum = self.data.batch_size, self.train.grad_accum
        require(
            batch % accum == 0,
            "train.grad_accum",
            f"{accum} micro-batches do not divide data.batch_size={batch}",
        )
        ways = self.mesh.data_ways
        if ways is not None and batch % ways:
            raise ConfigError(
                f"data.batch_size: {batch} rows do not split over the mesh's {ways} data-parallel ways "
                f"(mesh.data x mesh.fsdp = {self.mesh.data} x {self.mesh.fsdp}); use a multiple of {ways}"
            )


_CLASSES = {"objective": ObjectiveConfig.__name__, "entropy_stage": EntropyStageConfig.__name__}
_NO_MODEL = (
    "the config has neither a `model` section (a BLT) nor an `entropy_model` section (an entropy "
    "model trained alone); start from experiments/base.py"
)


def _check_blt(e: Experiment) -> None:
    assert e.model is not None and e.objective is not None
    require(
        e.data.seq_len <= e.model.max_bytes,
        "data.seq_len",
        f"{e.data.seq_len} bytes exceed model.max_bytes ({e.model.max_bytes}); lower data.seq_len or "
        "raise model.max_bytes",
    )
    check_objective(e.objective, e.model)


def check_objective(objective: ObjectiveConfig, model: ModelConfig, prefix: str = "objective.") -> None:
    """The rules between the ``objective`` and ``model`` sections; raises ConfigError naming the key."""
    window = model.decoder.window
    require(
        window is None or objective.block_size <= window,
        join(prefix.rstrip("."), "block_size"),
        f"{objective.block_size} exceeds model.decoder.window ({window}): a block attends itself whole",
    )
    require(
        objective.kind != "blt_d" or model.mask_embedding,
        "model.mask_embedding",
        "objective.kind='blt_d' needs the decoder's learned [MASK] input; set model.mask_embedding=True",
    )


# ---------------------------------------------------------------------------------------------------------
# Between the forms.
# ---------------------------------------------------------------------------------------------------------


def experiment_config(values: Any) -> Experiment:
    """The validated Experiment of a whole config (a ConfigDict, a mapping or an Experiment).

    Every key must be there (experiment files start from the defaults); raises ConfigError naming
    the dotted key and the fix on any problem. A config saved by an older fastblt lacks keys added
    since: read it through :func:`fastblt.config.saved.upgrade_experiment` first.
    """
    if isinstance(values, Experiment):
        return values
    values = plain(values)
    if isinstance(values, Mapping) and "model" not in values and "entropy_model" not in values:
        raise ConfigError(_NO_MODEL)
    return build(Experiment, values)


def config_dict(obj: Any) -> ml_collections.ConfigDict:
    """The ml-collections form of a config dataclass (an Experiment or one section), for experiment
    files: tuples become lists; not type-safe, since the types are checked once, by
    :func:`experiment_config` (a glob string may replace a list of globs, ``4`` a float)."""
    import ml_collections

    return ml_collections.ConfigDict(as_dict(obj), type_safe=False)


def model_config(config: Any) -> ModelConfig:
    """The validated ModelConfig of a BLT experiment (its ``model`` section)."""
    return _section(config, "model")


def objective_config(config: Any) -> ObjectiveConfig:
    """The validated training objective of a BLT experiment (its ``objective`` section)."""
    return _section(config, "objective")


def entropy_model_config(config: Any) -> EntropyModelConfig:
    """The validated EntropyModelConfig of an entropy-model experiment (its ``entropy_model`` section)."""
    return _section(config, "entropy_model")


def _section(config: Any, name: str) -> Any:
    """One section of a whole experiment (ConfigDict, mapping or Experiment), validated with the rest."""
    value = getattr(experiment_config(config), name)
    if value is None:
        sections = ", ".join(sorted(plain(config)))
        raise ConfigError(f"the config has no `{name}` section; its sections: {sections}")
    return value
