"""Configs saved by an older fastblt: the keys added or dropped since, and what an old config meant.

A training checkpoint saves its experiment (the meta item's ``experiment``) and model config (its
``model_config``); an export saves the model config (``config.json``). They are read back as strictly
as any config, after :func:`upgrade_experiment` / :func:`upgrade_model` apply the lists below. Each
added key comes with the value that reproduces what a run saved without it did -- not today's
default, which may change -- and the commit that added it. Checkpoints are written since 3cd069d
(2026-11-23). A key added to a section from now on needs an entry here, or old workdirs stop loading
(tests/test_saved_formats.py restores workdirs and exports of older versions).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from fastblt.config.schema import ConfigError, plain

# model.<key> (also in meta "model_config" and export config.json): value of a config without it.
ADDED_MODEL_KEYS: dict[str, Any] = {
    "remat": False,  # 106ddd1: blocks were not recomputed
    "scan_layers": False,  # bba5609: the global layers ran unrolled
    "scan_decode_layers": False,  # 0037ea3: the sampler ran its layers unrolled
    "remat_policy": "full",  # eb1d7c1: remat kept only each block's input
}

# Keys of an experiment (dotted), filled where their section is there.
ADDED_EXPERIMENT_KEYS: dict[str, Any] = {
    "train.sample_bytes": 0,  # 1050146: no sample was printed at evaluations
    "train.sample_prompt": "def ",  # 1050146
    "train.on_nonfinite": "stop",  # 92337e8: a non-finite step stopped the run
    "train.max_nonfinite_skips": 10,  # 92337e8
}

# Sections a BLT experiment has had to hold since: 0f8ab6c added the objective; a BLT before it
# trained the next-byte loss.
ADDED_BLT_SECTIONS: dict[str, Any] = {
    "objective": {
        "kind": "next_byte",
        "block_size": 4,
        "noise_eps": 1e-3,
        "diffusion_weight": 1.0,
        "next_byte_weight": 1.0,
        "normalization": "sum",
    },
}

# Keys dropped by the one config form (issue 13): nothing read them.
REMOVED_EXPERIMENT_KEYS = ("checkpoint.workdir",)
# Entropy-model experiments built on base.training_sections() carried the unused `objective`
# section of a BLT until the one config form, which refuses it there; it is dropped on reading.
REMOVED_ENTROPY_SECTIONS = ("objective",)


def upgrade_model(values: Any) -> dict[str, Any]:
    """A saved model config (a mapping) with the keys added since filled in."""
    out = _copy(values, "model config")
    for key, value in ADDED_MODEL_KEYS.items():
        out.setdefault(key, value)
    return out


def upgrade_experiment(values: Any) -> dict[str, Any]:
    """A saved experiment (a mapping) in the current form: added keys filled, dropped keys removed.

    Sections that are missing stay missing: the strict read that follows names them.
    """
    out = _copy(values, "experiment config")
    for key in REMOVED_EXPERIMENT_KEYS:
        section, _, name = key.rpartition(".")
        parent = out.get(section)
        if isinstance(parent, dict):
            parent.pop(name, None)
    if isinstance(out.get("model"), Mapping):
        out["model"] = upgrade_model(out["model"])
        for section, value in ADDED_BLT_SECTIONS.items():
            out.setdefault(section, copy.deepcopy(value))
    elif "entropy_model" in out:
        for section in REMOVED_ENTROPY_SECTIONS:
            out.pop(section, None)
    for key, value in ADDED_EXPERIMENT_KEYS.items():
        section, _, name = key.rpartition(".")
        parent = out.get(section)
        if isinstance(parent, dict):
            parent.setdefault(name, value)
    return out


def _copy(values: Any, what: str) -> dict[str, Any]:
    values = plain(values)
    if not isinstance(values, Mapping):
        raise ConfigError(f"a saved {what} must be a mapping of keys, got {type(values).__name__}")
    return copy.deepcopy(dict(values))
