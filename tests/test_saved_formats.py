"""Training workdirs and exports written by older fastblt versions still load and resume.

Fixtures (tests/fixtures/saved/make_saved.py says how each was written):

* 3cd069d/: a micro BLT's training workdir (``run``, 2 steps) and its export, written by the first
  version that wrote checkpoints: its saved configs lack every key added since.
* 020a00f/: the checkpoint meta items (model config + experiment) of a BLT, a BLT-D and an
  entropy-model run, written by the last version before the one config form (fastblt/config/).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from fastblt.config import (
    ConfigError,
    EntropyModelConfig,
    as_dict,
    experiment_config,
    model_config_from_dict,
    upgrade_experiment,
    upgrade_model,
)
from fastblt.config.saved import ADDED_MODEL_KEYS

SAVED = Path(__file__).resolve().parent / "fixtures" / "saved"
OLDEST = SAVED / "3cd069d"
BEFORE_ONE_FORM = SAVED / "020a00f"


def _meta(run: Path) -> dict:
    return json.loads((run / "checkpoints" / "2" / "meta" / "metadata").read_text())


@pytest.fixture
def oldest_run(tmp_path) -> Path:
    """A writable copy of the oldest workdir (restoring must not touch the fixture)."""
    return Path(shutil.copytree(OLDEST / "run", tmp_path / "run"))


def test_the_oldest_workdir_and_export_load_for_inference(oldest_run):
    from fastblt.io.loading import load_model

    meta = _meta(oldest_run)
    assert not set(ADDED_MODEL_KEYS) & set(meta["model_config"])  # written before those keys
    config, params = load_model(oldest_run)
    assert config == model_config_from_dict(upgrade_model(meta["model_config"]))
    assert (config.encoder.dim, config.global_model.dim, config.patcher.mode) == (8, 16, "static")
    assert (config.remat, config.scan_layers, config.scan_decode_layers) == (False, False, False)

    exported_config, exported = load_model(OLDEST / "export")  # config.json lacks the same keys
    assert exported_config == config
    jax.tree.map(np.testing.assert_array_equal, params, exported)


def test_the_oldest_workdir_resumes_training(oldest_run):
    """Its saved experiment, upgraded, is the config to resume with: the model config's fingerprint
    matches the checkpoint's and the data iterator picks up where it stopped."""
    from fastblt.train.loop import train

    values = upgrade_experiment(_meta(oldest_run)["experiment"])
    values["train"]["steps"] = 3
    lines: list[str] = []
    metrics = train(experiment_config(values), str(oldest_run), log=lines.append)
    assert any("resumed blt from step 2" in line for line in lines), lines
    assert np.isfinite(metrics["loss"]) and (oldest_run / "checkpoints" / "3").is_dir()


@pytest.mark.parametrize("name", ["blt", "blt_d", "entropy"])
def test_experiments_saved_before_the_one_form_read_back(name):
    meta = json.loads((BEFORE_ONE_FORM / f"{name}.json").read_text())
    saved = meta["experiment"]
    experiment = experiment_config(upgrade_experiment(saved))
    if name == "entropy":  # its stale BLT `objective` section (from base.training_sections) is dropped
        assert "objective" in saved and experiment.objective is None and experiment.model is None
        assert experiment.entropy_model == EntropyModelConfig(**saved["entropy_model"])
        return
    assert meta["model_config"] == saved["model"]
    # Keys added since (fastblt.config.saved.ADDED_MODEL_KEYS) take the values that reproduce that run.
    assert as_dict(experiment.model) == upgrade_model(saved["model"])
    assert as_dict(experiment.model)["remat_policy"] == "full"
    assert model_config_from_dict(upgrade_model(meta["model_config"])) == experiment.model
    assert experiment.objective.kind == ("blt_d" if name == "blt_d" else "next_byte")
    assert experiment.objective.block_size == (2 if name == "blt_d" else 4)
    # Read strictly (with only the model keys added since filled in), the key this version dropped is named.
    with pytest.raises(ConfigError, match=r"unknown config key checkpoint\.workdir"):
        experiment_config({**saved, "model": upgrade_model(saved["model"])})
