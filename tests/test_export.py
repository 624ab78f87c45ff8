"""Export directories: round trips, overwrite protection, atomic writes, error paths, and the CLI."""

from __future__ import annotations

import json
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import fastblt
from fastblt import cli
from fastblt.config import ModelConfig, load_config, model_config
from fastblt.io.export import (
    FORMAT_VERSION,
    ExportError,
    abstract_params,
    expected_param_shapes,
    load_export,
    save_export,
)


@pytest.fixture(scope="module")
def tiny_config() -> ModelConfig:
    return model_config(load_config("tiny"))


@pytest.fixture(scope="module")
def tiny_params(tiny_config):
    """Random parameters of the tiny BLT's shapes (no init: shapes are all the export needs)."""
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), abstract_params(tiny_config))


def toy_params():
    """A small pytree with the dtypes an export meets: float32, bfloat16, int32."""
    rng = np.random.default_rng(1)
    return {
        "dense": {"kernel": rng.standard_normal((4, 8)).astype(np.float32), "bias": np.zeros(8, np.float32)},
        "table": jnp.asarray(rng.standard_normal((16, 4)), jnp.bfloat16),
        "counts": np.arange(5, dtype=np.int32),
    }


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.dtype(x.dtype) == np.dtype(y.dtype)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------------------------------------------------
# Round trips.
# ---------------------------------------------------------------------------------------------------------


def test_round_trip_of_a_small_pytree(tmp_path, tiny_config):
    params = toy_params()
    dst = save_export(tmp_path / "export", tiny_config, params, check_shapes=False)
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "params"]
    # config.json is the documented format, readable without fastblt.
    on_disk = json.loads((dst / "config.json").read_text())
    assert on_disk == {"format_version": FORMAT_VERSION, **json.loads(json.dumps(tiny_config.to_dict()))}

    config, restored = load_export(dst, check_shapes=False)
    assert config == tiny_config
    assert_trees_equal(restored, params)


def test_no_temporary_directories_are_left(tmp_path, tiny_config):
    save_export(tmp_path / "export", tiny_config, toy_params(), check_shapes=False)
    save_export(tmp_path / "export", tiny_config, toy_params(), check_shapes=False, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_dtype_on_save_and_on_load(tmp_path, tiny_config):
    params = toy_params()
    dst = save_export(tmp_path / "bf16", tiny_config, params, dtype="bfloat16", check_shapes=False)
    _, restored = load_export(dst, check_shapes=False)
    assert restored["dense"]["kernel"].dtype == jnp.bfloat16
    assert restored["counts"].dtype == np.int32  # integers are never cast
    np.testing.assert_array_equal(
        np.asarray(restored["dense"]["kernel"]), params["dense"]["kernel"].astype(jnp.bfloat16)
    )
    _, widened = load_export(dst, dtype="float32", check_shapes=False)
    assert widened["table"].dtype == np.float32 and widened["counts"].dtype == np.int32
    np.testing.assert_array_equal(np.asarray(widened["table"]), np.asarray(params["table"], np.float32))


def test_restore_onto_a_mesh(tmp_path, tiny_config):
    assert jax.device_count() == 8, "tests/conftest.py should give 8 CPU devices"
    params = toy_params()
    dst = save_export(tmp_path / "export", tiny_config, params, check_shapes=False)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
    shardings = {
        "dense": {
            "kernel": NamedSharding(mesh, PartitionSpec("data", "fsdp")),
            "bias": NamedSharding(mesh, PartitionSpec("fsdp")),
        },
        "table": NamedSharding(mesh, PartitionSpec("fsdp", None)),
        "counts": NamedSharding(mesh, PartitionSpec()),
    }
    _, restored = load_export(dst, shardings=shardings, check_shapes=False)
    assert_trees_equal(restored, params)
    for leaf, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings), strict=True):
        assert leaf.sharding == sharding
    # One sharding for every array.
    replicated = NamedSharding(mesh, PartitionSpec())
    _, restored = load_export(dst, shardings=replicated, check_shapes=False)
    assert all(leaf.sharding == replicated for leaf in jax.tree.leaves(restored))


def test_round_trip_of_blt_parameters(tmp_path, tiny_config, tiny_params):
    dst = save_export(tmp_path / "tiny", tiny_config, tiny_params)
    config, restored = load_export(dst)
    assert config == tiny_config
    assert_trees_equal(restored, tiny_params)


def test_expected_param_shapes_follow_the_config(tiny_config):
    """Hash tables: one (vocab, encoder dim) table per group size and function (notes §3)."""
    shapes = expected_param_shapes(tiny_config)
    tables = {p: s for p, s in shapes.items() if p.startswith("hash_embed/")}
    assert tables == {f"hash_embed/table_{j}/embedding": (4099, 128) for j in range(3)}
    smaller = tiny_config.replace(hash=tiny_config.hash.__class__(group_sizes=(3, 4), vocab=1000))
    tables = {p: s for p, s in expected_param_shapes(smaller).items() if p.startswith("hash_embed/")}
    assert tables == {f"hash_embed/table_{j}/embedding": (1000, 128) for j in range(2)}


# ---------------------------------------------------------------------------------------------------------
# Overwriting and atomicity.
# ---------------------------------------------------------------------------------------------------------


def test_refuses_to_overwrite(tmp_path, tiny_config):
    dst = save_export(tmp_path / "export", tiny_config, toy_params(), check_shapes=False)
    with pytest.raises(FileExistsError, match="overwrite"):
        save_export(dst, tiny_config, toy_params(), check_shapes=False)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=str(occupied)):
        save_export(occupied, tiny_config, toy_params(), check_shapes=False)
    assert (occupied / "notes.txt").read_text() == "mine"


def test_overwrite_replaces_and_an_empty_directory_is_fine(tmp_path, tiny_config):
    empty = tmp_path / "empty"
    empty.mkdir()
    save_export(empty, tiny_config, toy_params(), check_shapes=False)
    new = {"only": np.ones(3, np.float32)}
    save_export(empty, tiny_config, new, check_shapes=False, overwrite=True)
    _, restored = load_export(empty, check_shapes=False)
    assert_trees_equal(restored, new)


def test_a_crash_while_writing_leaves_nothing_at_dst(tmp_path, tiny_config, monkeypatch):
    def crash(self, *args, **kwargs):
        raise RuntimeError("disk full")

    dst = tmp_path / "export"
    monkeypatch.setattr(ocp.StandardCheckpointer, "save", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_export(dst, tiny_config, toy_params(), check_shapes=False)
    assert list(tmp_path.iterdir()) == []


def test_a_crash_while_overwriting_keeps_the_old_export(tmp_path, tiny_config, monkeypatch):
    params = toy_params()
    dst = save_export(tmp_path / "export", tiny_config, params, check_shapes=False)

    def crash(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_export(dst, tiny_config, {"other": np.ones(2)}, check_shapes=False, overwrite=True)
    monkeypatch.undo()
    _, restored = load_export(dst, check_shapes=False)
    assert_trees_equal(restored, params)
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


# ---------------------------------------------------------------------------------------------------------
# Error paths.
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def toy_export(tmp_path, tiny_config):
    return save_export(tmp_path / "export", tiny_config, toy_params(), check_shapes=False)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        load_export(tmp_path / "nowhere")


def test_missing_config_json(toy_export):
    (toy_export / "config.json").unlink()
    with pytest.raises(ExportError, match="config.json"):
        load_export(toy_export, check_shapes=False)


def test_config_json_not_json(toy_export):
    (toy_export / "config.json").write_text("{not json")
    with pytest.raises(ExportError, match="JSON"):
        load_export(toy_export, check_shapes=False)


def test_config_json_that_does_not_validate_names_the_key(toy_export):
    path = toy_export / "config.json"
    values = json.loads(path.read_text())
    values["encoder"]["n_heads"] = 3
    path.write_text(json.dumps(values))
    with pytest.raises(ExportError, match=r"encoder\.n_heads"):
        load_export(toy_export, check_shapes=False)
    values["encoder"]["n_heads"] = 4
    values["encoder"]["heads"] = 4
    path.write_text(json.dumps(values))
    with pytest.raises(ExportError, match=r"encoder\.heads"):
        load_export(toy_export, check_shapes=False)


def test_unknown_format_version(toy_export):
    path = toy_export / "config.json"
    values = json.loads(path.read_text())
    values["format_version"] = FORMAT_VERSION + 1
    path.write_text(json.dumps(values))
    with pytest.raises(ExportError, match="format_version"):
        load_export(toy_export, check_shapes=False)


def test_missing_params(toy_export):
    import shutil

    shutil.rmtree(toy_export / "params")
    with pytest.raises(ExportError, match="params"):
        load_export(toy_export, check_shapes=False)


def test_params_that_do_not_match_the_config(tmp_path, tiny_config, tiny_params):
    # A toy tree is not a BLT: its leaves are unexpected and every BLT parameter is missing.
    dst = save_export(tmp_path / "toy", tiny_config, toy_params(), check_shapes=False)
    with pytest.raises(ExportError, match=f"{len(expected_param_shapes(tiny_config))} missing") as info:
        load_export(dst)
    assert "4 unexpected: counts (5,), dense/bias (8,), dense/kernel (4, 8), ..." in str(info.value)
    # Saving checks too, so a mismatched export is never written.
    wrong = jax.tree.map(lambda x: x, tiny_params)
    wrong["hash_embed"]["table_1"]["embedding"] = np.zeros((17, 128), np.float32)
    with pytest.raises(ExportError, match=r"hash_embed/table_1/embedding is \(17, 128\)"):
        save_export(tmp_path / "wrong", tiny_config, wrong)
    assert not (tmp_path / "wrong").exists()
    # A config.json edited after the fact (fewer decoder layers) no longer matches the parameters.
    dst = save_export(tmp_path / "tiny", tiny_config, tiny_params)
    path = dst / "config.json"
    values = json.loads(path.read_text())
    values["decoder"]["n_layers"] = 1
    path.write_text(json.dumps(values))
    with pytest.raises(ExportError, match=r"unexpected: local_decoder/\S*layers_1/"):
        load_export(dst)


def test_bad_dtype_argument(tmp_path, tiny_config):
    with pytest.raises(ValueError, match="dtype"):
        save_export(tmp_path / "x", tiny_config, toy_params(), dtype="float8", check_shapes=False)


# ---------------------------------------------------------------------------------------------------------
# `fastblt convert`, with a stand-in for fastblt.io.huggingface.
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_convert(monkeypatch, tiny_config, tiny_params):
    """Replaces fastblt.io.huggingface with a module that records what the CLI passes it."""
    calls = {}
    module = types.ModuleType("fastblt.io.huggingface")

    def from_hf(src):
        calls["from_hf"] = src
        return tiny_config, tiny_params

    def to_hf(config, params, out_dir):
        calls["to_hf"] = (config, params, out_dir)

    module.from_hf, module.to_hf = from_hf, to_hf
    monkeypatch.setitem(sys.modules, "fastblt.io.huggingface", module)
    # `from fastblt.io import huggingface` reads the package attribute once the real module is loaded
    # (test_parity_hf.py imports it at collection), so the stand-in replaces that too.
    monkeypatch.setattr(fastblt.io, "huggingface", module, raising=False)
    return calls


def test_cli_hf_to_orbax_and_back(tmp_path, fake_convert, tiny_config, tiny_params, capsys):
    hf = tmp_path / "hf"
    hf.mkdir()
    export = tmp_path / "export"
    assert cli.main(["convert", "hf-to-orbax", "--src", str(hf), "--dst", str(export)]) == 0
    assert str(fake_convert["from_hf"]) == str(hf)
    config, params = load_export(export)
    assert config == tiny_config
    assert_trees_equal(params, tiny_params)

    out = tmp_path / "hf_out"
    assert cli.main(["convert", "orbax-to-hf", "--src", str(export), "--dst", str(out)]) == 0
    config, params, out_dir = fake_convert["to_hf"]
    assert config == tiny_config and str(out_dir) == str(out)
    assert_trees_equal(params, tiny_params)
    assert "parameters" in capsys.readouterr().out


def test_cli_convert_user_errors_exit_2(tmp_path, fake_convert, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["convert", "hf-to-orbax", "--src", str(tmp_path / "nope"), "--dst", str(tmp_path / "x")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("fastblt: error: ") and "nope" in err and "Traceback" not in err
    assert "from_hf" not in fake_convert

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "file").write_text("x")
    with pytest.raises(SystemExit) as info:
        cli.main(["convert", "hf-to-orbax", "--src", str(tmp_path), "--dst", str(occupied)])
    assert info.value.code == 2 and "--overwrite" in capsys.readouterr().err

    not_an_export = tmp_path / "empty"
    not_an_export.mkdir()
    with pytest.raises(SystemExit) as info:
        cli.main(["convert", "orbax-to-hf", "--src", str(not_an_export), "--dst", str(tmp_path / "o")])
    assert info.value.code == 2 and "config.json" in capsys.readouterr().err


def test_cli_convert_needs_a_direction(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["convert"])
    assert info.value.code == 2
