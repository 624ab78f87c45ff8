"""Shared base of the experiment configs: every section at the defaults of fastblt/config/.

Not an experiment of its own (its model is BLT-1B in float32 with the default training settings):
experiments start from :func:`blt` or :func:`entropy_model` and change what they need. The numbers
live once, in the dataclasses of fastblt/config/ (their comments say what each key does); every key is
in the ConfigDict these return, and an experiment that drops one fails to load, naming it.

    fastblt train --config experiments/base.py --workdir /tmp/base   # possible, but see blt_1b.py
"""

from __future__ import annotations

import ml_collections

from fastblt.config import EntropyModelConfig, EntropyStageConfig, Experiment, ModelConfig, config_dict


def blt(model: ModelConfig) -> ml_collections.ConfigDict:
    """A BLT experiment of ``model``: ``model``, ``objective`` (next-byte), ``entropy_stage`` and the
    training sections ``seed``, ``data``, ``optimizer``, ``train``, ``checkpoint``, ``mesh``."""
    return config_dict(Experiment(model=model))


def entropy_model(model: EntropyModelConfig) -> ml_collections.ConfigDict:
    """An experiment that trains the entropy model ``model`` alone: ``entropy_model`` and the training
    sections (no ``model``, ``objective`` or ``entropy_stage``)."""
    return config_dict(Experiment.of_entropy_model(model))


def entropy_stage(
    steps: int, lr: float, warmup_steps: int, target_patch_len: float
) -> ml_collections.ConfigDict:
    """The ``entropy_stage`` section (stage 1 of an entropy-patched BLT run: train
    ``model.entropy_model`` on the same data first) with these settings; see EntropyStageConfig."""
    return config_dict(
        EntropyStageConfig(steps=steps, lr=lr, warmup_steps=warmup_steps, target_patch_len=target_patch_len)
    )


def blt_d(config: ml_collections.ConfigDict, block_size: int) -> ml_collections.ConfigDict:
    """Turns a BLT experiment into BLT-D with blocks of ``block_size`` bytes (in place)."""
    config.model.mask_embedding = True
    config.model.patcher.max_patch_length = 8  # the paper's BLT-D setting
    config.objective.kind = "blt_d"
    config.objective.block_size = block_size
    return config


def get_config() -> ml_collections.ConfigDict:
    """The base config: BLT-1B's model section (float32) and the default training sections."""
    return blt(ModelConfig())
