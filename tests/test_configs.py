"""Experiment configs: loading, overrides, validation errors, and BLT-1B against the published numbers."""

from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

import ml_collections
import pytest

from fastblt import cli
from fastblt.config import (
    ConfigError,
    EntropyModelConfig,
    ModelConfig,
    available_experiments,
    entropy_model_config,
    load_config,
    model_config,
    parse_arg,
)

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS = ["base", "blt_1b", "entropy_100m", "entropy_tiny", "tiny"]
BLT_EXPERIMENTS = ["base", "blt_1b", "tiny"]
ENTROPY_EXPERIMENTS = ["entropy_100m", "entropy_tiny"]


# ---------------------------------------------------------------------------------------------------------
# Every experiment loads.
# ---------------------------------------------------------------------------------------------------------


def test_available_experiments_lists_the_repository_configs():
    assert set(EXPERIMENTS) <= set(available_experiments())


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_loads_by_name_and_by_path(name):
    by_name = load_config(name)
    by_path = load_config(str(REPO / "experiments" / f"{name}.py"))
    assert by_name.to_dict() == by_path.to_dict()
    for section in ("data", "optimizer", "train", "checkpoint"):
        assert section in by_name
    assert by_name.data.seq_len > 0 and by_name.data.batch_size > 0


@pytest.mark.parametrize("name", BLT_EXPERIMENTS)
def test_blt_experiment_model_section_validates(name):
    config = load_config(name)
    assert isinstance(model_config(config), ModelConfig)
    assert config.data.seq_len <= config.model.max_bytes


@pytest.mark.parametrize("name", ENTROPY_EXPERIMENTS)
def test_entropy_experiment_has_entropy_section(name):
    config = load_config(name)
    assert "model" not in config
    assert isinstance(entropy_model_config(config), EntropyModelConfig)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_docstring_shows_how_to_run_it(name):
    source = (REPO / "experiments" / f"{name}.py").read_text()
    docstring = ast.get_docstring(ast.parse(source))
    assert docstring and "fastblt train --config" in docstring


def test_loaded_config_is_locked():
    config = load_config("tiny")
    with pytest.raises(AttributeError):
        config.optimizer.lrr = 1.0  # a typo must not silently add a key


# ---------------------------------------------------------------------------------------------------------
# The models are the ones the notes describe.
# ---------------------------------------------------------------------------------------------------------


def test_blt_1b_matches_the_reference_config():
    """Numbers from blt-architecture.md §9 (the reference's args dump) and §8 (FFN widths)."""
    m = model_config(load_config("blt_1b"))
    assert (m.encoder.dim, m.encoder.n_layers, m.encoder.n_heads) == (1024, 1, 16)
    assert (m.global_model.dim, m.global_model.n_layers, m.global_model.n_heads) == (2048, 25, 16)
    assert (m.decoder.dim, m.decoder.n_layers, m.decoder.n_heads) == (1024, 9, 16)
    assert m.decoder.cross_attn_all_layers and not m.encoder.cross_attn_all_layers
    assert m.encoder.cross_heads == 16 and m.decoder.cross_heads == 16
    assert m.cross_attn_k == 2
    assert m.hash.group_sizes == (3, 4, 5, 6, 7, 8) and m.hash.nb_functions == 1 and m.hash.vocab == 500002
    assert m.encoder.window == 512 and m.decoder.window == 512 and m.global_model.window is None
    assert m.encoder.rope_theta == m.global_model.rope_theta == m.decoder.rope_theta == 500000.0
    assert m.max_bytes == 24576 and m.max_global_patches == 4096
    assert m.patcher.mode == "entropy" and m.patcher.threshold == 1.335442066192627
    assert m.vocab_size == 260 and m.init_std_factor == "current_depth"
    assert m.dtype == "bfloat16" and m.attention_impl == "auto"  # compute settings, not the reference's
    e = m.entropy_model
    assert (e.dim, e.n_layers, e.n_heads, e.rope_theta, e.window) == (768, 14, 12, 10000.0, 512)
    assert e.dtype == "bfloat16" and e.vocab_size == 260
    # FFN widths from the notes' table: 1024 -> 2816, 2048 -> 5632, 768 -> 2048.
    assert (m.encoder.hidden_dim, m.global_model.hidden_dim, e.hidden_dim) == (2816, 5632, 2048)
    assert m.global_input_dim == m.global_model.dim  # k * D_e == D_g: no input projection in the 1B


def test_tiny_is_cpu_sized():
    m = model_config(load_config("tiny"))
    assert (m.encoder.dim, m.encoder.n_layers, m.encoder.n_heads) == (128, 1, 4)
    assert (m.global_model.dim, m.global_model.n_layers, m.global_model.n_heads) == (256, 2, 4)
    assert (m.decoder.dim, m.decoder.n_layers, m.decoder.n_heads) == (128, 2, 4)
    assert m.cross_attn_k == 2
    assert m.hash.group_sizes == (3, 4, 5) and m.hash.nb_functions == 1 and m.hash.vocab == 4099
    assert (m.entropy_model.dim, m.entropy_model.n_layers, m.entropy_model.n_heads) == (64, 2, 2)
    assert load_config("tiny").data.seq_len == 512


@pytest.mark.parametrize(("entropy", "blt"), [("entropy_tiny", "tiny"), ("entropy_100m", "blt_1b")])
def test_entropy_experiment_trains_the_blt_entropy_model(entropy, blt):
    """A trained entropy model must drop into its BLT: the two sections must be identical."""
    assert entropy_model_config(load_config(entropy)) == model_config(load_config(blt)).entropy_model


def test_entropy_100m_has_about_100m_parameters():
    """Counted by hand from the notes §2.1: 14 blocks of (4 D^2 attention + 3 D H SwiGLU) + embed + out."""
    e = entropy_model_config(load_config("entropy_100m"))
    d, h = 768, 2048
    assert (e.dim, e.hidden_dim) == (d, h)
    n = 14 * (4 * d * d + 3 * d * h + 2 * d) + 2 * 260 * d + d
    assert 99e6 < n < 100e6


# ---------------------------------------------------------------------------------------------------------
# Arguments and overrides.
# ---------------------------------------------------------------------------------------------------------


def test_overrides_of_each_type():
    config = load_config(
        "tiny",
        [
            "model.encoder.n_heads=2",
            "optimizer.lr=1",  # an int where a float is expected is widened
            "model.hash.group_sizes=(3, 4)",
            "model.encoder.window=None",
            "model.encoder.n_kv_heads=2",  # a field whose default is None
            "model.patcher.mode=static",  # a bare word is a string
            "train.sample_prompt='def f(x):'",  # a quoted string
            "model.document_masking=false",
        ],
    )
    m = model_config(config)
    assert m.encoder.n_heads == 2 and m.encoder.window is None and m.encoder.n_kv_heads == 2
    assert config.optimizer.lr == 1.0 and isinstance(config.optimizer.lr, float)
    assert m.hash.group_sizes == (3, 4)
    assert m.patcher.mode == "static" and m.document_masking is False
    assert config.train.sample_prompt == "def f(x):"


def test_overrides_do_not_leak_between_loads():
    load_config("tiny", ["model.encoder.n_heads=2"])
    assert load_config("tiny").model.encoder.n_heads == 4


def test_experiment_argument():
    config = load_config("tiny:patching=static")
    assert config.model.patcher.mode == "static" and config.model.entropy_model is None
    assert model_config(config).entropy_model is None
    smoke = load_config("blt_1b:runlocal")
    assert smoke.train.steps < load_config("blt_1b").train.steps


def test_parse_arg():
    args = parse_arg("runlocal,steps=5,lr=1", runlocal=False, steps=10, lr=0.5, name="x")
    assert args.runlocal is True and args.steps == 5 and args.lr == 1.0 and args.name == "x"
    assert parse_arg(None, steps=10).steps == 10
    with pytest.raises(ConfigError, match="stepz"):
        parse_arg("stepz=3", steps=10)
    with pytest.raises(ConfigError, match="steps"):
        parse_arg("steps=abc", steps=10)


# ---------------------------------------------------------------------------------------------------------
# Errors name the key.
# ---------------------------------------------------------------------------------------------------------


def test_unknown_key_names_it_and_the_valid_keys():
    with pytest.raises(ConfigError, match=r"model\.encoder\.nheads") as info:
        load_config("tiny", ["model.encoder.nheads=4"])
    assert "n_heads" in str(info.value) and "cross_attn_all_layers" in str(info.value)
    with pytest.raises(ConfigError, match="optimiser") as info:
        load_config("tiny", ["optimiser.lr=1e-3"])
    assert "optimizer" in str(info.value)


def test_key_below_a_value_is_unknown():
    with pytest.raises(ConfigError, match=r"model\.encoder\.dim\.x"):
        load_config("tiny", ["model.encoder.dim.x=1"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.encoder.dim=1.5", "model.encoder.dim"),
        ("optimizer.lr=fast", "optimizer.lr"),
        ("model.decoder.cross_attn_all_layers=1", "model.decoder.cross_attn_all_layers"),
        ("model.encoder.n_kv_heads='two'", "model.encoder.n_kv_heads"),  # default None: no ConfigDict type
        ("model.patcher.max_patches=2.5", "model.patcher.max_patches"),
        ("model.hash.group_sizes=(3, 'x')", "model.hash.group_sizes"),
    ],
)
def test_wrong_type_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("tiny", [override])


@pytest.mark.parametrize(
    ("spec", "override", "key"),
    [
        ("tiny", "model.encoder.n_heads=3", "model.encoder.n_heads"),
        ("tiny", "model.global_model.n_heads=5", "model.global_model.n_heads"),
        ("blt_1b", "model.decoder.dim=512", "model.decoder.dim"),
        ("tiny", "model.patcher.mode=bytes", "model.patcher.mode"),
        ("tiny", "model.remat_policy=minimal", "model.remat_policy"),  # without model.remat=True
        ("entropy_tiny", "entropy_model.n_heads=3", "entropy_model.n_heads"),
        ("tiny", "data.seq_len=4096", "data.seq_len"),
    ],
)
def test_inconsistent_model_fails_at_load_naming_the_key(spec, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(spec, [override])


def test_section_replaced_by_a_value():
    with pytest.raises(ConfigError, match="model must be a section"):
        load_config("tiny", ["model=None"])
    with pytest.raises(ConfigError, match="entropy_model=3"):
        load_config("entropy_tiny", ["entropy_model=3"])


def test_malformed_override():
    with pytest.raises(ConfigError, match="key=value"):
        load_config("tiny", ["model.encoder.n_heads"])


def test_missing_experiment_names_the_path_and_lists_the_names(tmp_path):
    with pytest.raises(ConfigError, match="no_such_experiment") as info:
        load_config("no_such_experiment")
    assert "tiny" in str(info.value) and "blt_1b" in str(info.value)
    missing = tmp_path / "missing.py"
    with pytest.raises(ConfigError, match=str(missing)):
        load_config(str(missing))


def test_argument_to_an_experiment_that_takes_none():
    with pytest.raises(ConfigError, match="takes no argument"):
        load_config("entropy_tiny:runlocal")
    with pytest.raises(ConfigError, match="patchin"):
        load_config("tiny:patchin=static")


# ---------------------------------------------------------------------------------------------------------
# Experiment files outside the repository.
# ---------------------------------------------------------------------------------------------------------


def test_standalone_experiment_file(tmp_path):
    path = tmp_path / "my_experiment.py"
    path.write_text(
        textwrap.dedent(
            """
            from fastblt.config import Experiment, LocalModelConfig, ModelConfig, config_dict

            def get_config():
                model = ModelConfig(encoder=LocalModelConfig(dim=512, n_layers=1, n_heads=8),
                                    decoder=LocalModelConfig(dim=512, n_layers=1, n_heads=8))
                config = config_dict(Experiment(model=model))  # every section at its defaults
                config.data.seq_len = 1024
                return config
            """
        )
    )
    config = load_config(str(path), ["model.encoder.n_heads=4"])
    assert model_config(config).encoder.n_heads == 4


def test_experiment_file_without_get_config(tmp_path):
    path = tmp_path / "empty.py"
    path.write_text("X = 1\n")
    with pytest.raises(ConfigError, match="get_config"):
        load_config(str(path))


def test_experiment_without_a_model_section(tmp_path):
    path = tmp_path / "nomodel.py"
    path.write_text("import ml_collections\ndef get_config():\n    return ml_collections.ConfigDict()\n")
    with pytest.raises(ConfigError, match="model"):
        load_config(str(path))


def test_config_dict_round_trips_through_model_config():
    """to_dict() of the validated ModelConfig reproduces the section (nothing dropped or renamed)."""
    config = load_config("blt_1b")
    as_dict = model_config(config).to_dict()
    assert ml_collections.ConfigDict(as_dict).to_dict() == config.model.to_dict()


# ---------------------------------------------------------------------------------------------------------
# `fastblt config`: the command-line face of the above.
# ---------------------------------------------------------------------------------------------------------


def test_cli_config_prints_the_overridden_config(capsys):
    assert cli.main(["config", "--config", "tiny", "--set", "model.encoder.n_heads=2"]) == 0
    out = capsys.readouterr().out
    assert "n_heads: 2" in out


def test_cli_config_error_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["config", "--config", "tiny", "--set", "model.encoder.nheads=2"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("fastblt: error: ") and "model.encoder.nheads" in err
    assert "Traceback" not in err


def test_cli_accepts_ml_collections_style_overrides(capsys):
    from fastblt.cli import config_flag_overrides

    argv = [
        "config",
        "--config",
        "tiny",
        "--config.optimizer.lr=0.002",
        "--config.model.encoder.n_heads",
        "2",
    ]
    assert config_flag_overrides(argv) == [
        "config",
        "--config",
        "tiny",
        "--set",
        "optimizer.lr=0.002",
        "--set",
        "model.encoder.n_heads=2",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "lr: 0.002" in out and "n_heads: 2" in out


@pytest.mark.parametrize(
    "override,key",
    [
        ("optimizer.lr=-1e-3", "optimizer.lr"),
        ("optimizer.lr=0", "optimizer.lr"),
        ("train.steps=-5", "train.steps"),
        ("train.log_every=0", "train.log_every"),
        ("checkpoint.keep=0", "checkpoint.keep"),
        ("train.grad_accum=3", "train.grad_accum"),  # 8 rows do not split into 3 micro-batches
        ("entropy_stage.checkpoint=/nonexistent/entropy", "entropy_stage.checkpoint"),
        ("mesh.fsdp=0", "mesh.fsdp"),
        ("mesh.tensor=-2", "mesh.tensor"),
        ("mesh.fsdp=-1", "mesh"),  # two axes of -1 (data is -1 in the base config)
        ("mesh.data=3", "data.batch_size"),  # 8 rows over 3 data-parallel ways
    ],
)
def test_training_values_that_cannot_work_fail_at_load(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("tiny", [override])


@pytest.mark.parametrize("raw", ["[1,2", "(3, 4", "'abc", '{"a": 1'])
def test_broken_literal_override_is_an_error(raw):
    with pytest.raises(ConfigError, match="does not parse"):
        load_config("tiny", [f"data.paths={raw}"])


def test_batch_that_does_not_split_over_the_devices_fails_before_compiling():
    import jax

    from fastblt import sharding

    mesh = sharding.make_mesh({"data": -1}, jax.devices()[:4])
    sharding.check_batch(mesh, 8)
    with pytest.raises(ConfigError, match=r"data\.batch_size: 6 rows .* 4 data-parallel ways"):
        sharding.check_batch(mesh, 6)
    with pytest.raises(ConfigError, match="needs 6 devices, 4 are present"):
        sharding.make_mesh({"data": 3, "fsdp": 2}, jax.devices()[:4])


# ---------------------------------------------------------------------------------------------------------
# One form: every section typed, every key required, the defaults written once.
# ---------------------------------------------------------------------------------------------------------


def _experiment_file(tmp_path, body: str) -> str:
    """An experiment file that starts from tiny and runs ``body`` (indented code on ``config``)."""
    path = tmp_path / "changed.py"
    path.write_text(
        "from experiments import tiny\n\n\ndef get_config():\n    config = tiny.get_config()\n"
        + textwrap.indent(textwrap.dedent(body), "    ")
        + "    return config\n"
    )
    return str(path)


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ("del config.train['log_every']\n", "train.log_every"),
        ("del config.model.encoder['window']\n", "model.encoder.window"),  # was BLT-1B's 512, silently
        ("del config.data['seq_len']\n", "data.seq_len"),
        ("del config.optimizer['b2']\n", "optimizer.b2"),
        ("del config.checkpoint['keep']\n", "checkpoint.keep"),
        ("del config.mesh['fsdp']\n", "mesh.fsdp"),
        ("del config.objective['normalization']\n", "objective.normalization"),
        ("del config.entropy_stage['lr']\n", "entropy_stage.lr"),
        ("del config['seed']\n", "seed"),
    ],
)
def test_a_missing_key_is_an_error_naming_it(tmp_path, body, key):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)} is missing; set it \(the default is"):
        load_config(_experiment_file(tmp_path, body))


def test_a_missing_section_is_an_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match=r"^objective is missing; a BLT experiment needs it"):
        load_config(_experiment_file(tmp_path, "del config['objective']\n"))
    with pytest.raises(ConfigError, match=r"^train is missing"):
        load_config(_experiment_file(tmp_path, "del config['train']\n"))


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ("config.train.stepz = 5\n", "train.stepz"),
        ("config.data.batchsize = 4\n", "data.batchsize"),
        ("config.checkpoint.workdir = '/tmp/x'\n", "checkpoint.workdir"),  # dropped: nothing read it
        ("config.mesh.pipeline = 2\n", "mesh.pipeline"),
        ("config.objective.blocks = 4\n", "objective.blocks"),
        ("config.entropy_stage.stepz = 4\n", "entropy_stage.stepz"),
        ("config.optimiser = {'lr': 1.0}\n", "optimiser"),
    ],
)
def test_an_unknown_key_in_any_section_is_an_error_naming_it(tmp_path, body, key):
    with pytest.raises(ConfigError, match=rf"^unknown config key {re.escape(key)}; valid keys under"):
        load_config(_experiment_file(tmp_path, body))


@pytest.mark.parametrize(
    ("where", "change", "key"),
    [
        ("file", "config.train.steps = '100'\n", "train.steps"),
        ("file", "config.optimizer.lr = None\n", "optimizer.lr"),
        ("file", "config.checkpoint.async_save = 'yes'\n", "checkpoint.async_save"),
        ("override", "data.num_epochs='two'", "data.num_epochs"),  # default None: no ConfigDict type
        ("override", "data.eval_batches=1.5", "data.eval_batches"),
        ("override", "entropy_stage.steps=1e3", "entropy_stage.steps"),
        ("override", "objective.noise_eps=nan", "objective.noise_eps"),
    ],
)
def test_a_wrong_type_in_any_section_names_the_key(tmp_path, where, change, key):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)} (must be|is missing)"):
        if where == "file":
            load_config(_experiment_file(tmp_path, change))
        else:
            load_config("tiny", [change])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.source='/tmp/corpus.txt'", r"data\.source='/tmp/corpus\.txt' is not one of 'stdlib'"),
        ("data.source='text'", r"data\.paths is required for data\.source='text'"),
        ("data.eval_fraction=1.0", r"data\.eval_fraction: must be < 1"),
        ("train.on_nonfinite='ignore'", r"train\.on_nonfinite='ignore' is not one of 'stop', 'skip'"),
        ("optimizer.b2=1.0", r"optimizer\.b2: must be < 1"),
        ("objective.kind='blt_d'", r"model\.mask_embedding: .* set model\.mask_embedding=True"),
        ("objective.block_size=129", r"objective\.block_size: 129 exceeds model\.decoder\.window \(128\)"),
    ],
)
def test_every_section_is_validated_at_load(override, message):
    """The data and objective sections were checked only when training read them; now at load."""
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [override])


def test_the_experiment_kinds_have_their_own_sections(tmp_path):
    path = tmp_path / "entropy_with_objective.py"
    path.write_text(
        "from experiments import base, tiny\n\n\ndef get_config():\n"
        "    config = base.entropy_model(tiny.TINY.entropy_model)\n"
        "    config.objective = base.blt(tiny.TINY).objective\n"
        "    return config\n"
    )
    with pytest.raises(ConfigError, match=r"^objective: an entropy-model experiment .* remove it"):
        load_config(str(path))
    with pytest.raises(ConfigError, match=r"^entropy_model: an experiment trains a BLT .* not both"):
        load_config(_experiment_file(tmp_path, "config.entropy_model = config.model.entropy_model\n"))


def test_the_defaults_are_the_dataclass_defaults():
    """experiments/base.py holds no number of its own: its configs are the dataclasses' defaults."""
    from experiments import base
    from fastblt.config import EntropyModelConfig, Experiment, ObjectiveConfig, experiment_config
    from fastblt.train import blt_d

    assert experiment_config(base.get_config()) == Experiment()
    assert experiment_config(load_config("base")) == Experiment()
    entropy = experiment_config(base.entropy_model(EntropyModelConfig()))
    assert entropy == Experiment.of_entropy_model(EntropyModelConfig())
    assert "model" not in base.entropy_model(EntropyModelConfig()) and entropy.objective is None
    assert blt_d.objective_section().to_dict() == base.get_config().objective.to_dict()
    assert blt_d.objective_config(None, ModelConfig()) == ObjectiveConfig() == Experiment().objective


def test_loaded_config_is_the_validated_typed_form():
    """What load_config returns converts to the Experiment the package reads, and back, unchanged."""
    from fastblt.config import as_dict, config_dict, experiment_config

    config = load_config("blt_d_tiny:block=8", ["optimizer.lr=1", "data.paths=None"])
    experiment = experiment_config(config)
    assert experiment.objective.block_size == 8 and experiment.optimizer.lr == 1.0
    assert experiment.data.paths == () and config.data.paths == []
    assert config.to_dict() == config_dict(experiment).to_dict() == as_dict(experiment)
    assert experiment_config(as_dict(experiment)) == experiment


def test_an_old_saved_experiment_reads_back_once_upgraded():
    """A checkpoint's saved experiment from the first version that wrote one (3cd069d) lacks every
    key added since; read strictly it names the first, upgraded it is a valid experiment."""
    import json

    from fastblt.config import experiment_config, upgrade_experiment

    meta_file = REPO / "tests" / "fixtures" / "saved" / "3cd069d" / "run" / "checkpoints" / "2" / "meta"
    saved = json.loads((meta_file / "metadata").read_text())["experiment"]
    with pytest.raises(ConfigError, match=r"^model\.remat is missing"):
        experiment_config(saved)
    experiment = experiment_config(upgrade_experiment(saved))
    assert experiment.objective.kind == "next_byte" and experiment.train.on_nonfinite == "stop"
    assert experiment.model.scan_layers is False and experiment.train.sample_bytes == 0
    assert experiment.data.seq_len == saved["data"]["seq_len"] and experiment.data.paths == ()
