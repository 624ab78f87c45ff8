"""fastblt.compile_cache: where the persistent compilation cache goes, and that programs land there."""

import os

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.compilation_cache.compilation_cache import reset_cache

from fastblt.compile_cache import ENV, use_compilation_cache


@pytest.fixture
def jax_cache_dir(monkeypatch):
    """Runs the test with JAX's cache directory unset and every compiled program written, and puts the
    session's settings back afterwards."""
    before = jax.config.jax_compilation_cache_dir
    enabled = jax.config.jax_enable_compilation_cache
    min_secs = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_compilation_cache_dir", None)
    jax.config.update("jax_enable_compilation_cache", True)  # whatever the suite runs with
    # The suite writes only programs slower to compile than its threshold; these tests' tiny programs
    # must land in the cache all the same.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    monkeypatch.delenv(ENV, raising=False)
    yield
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_secs)
    jax.config.update("jax_enable_compilation_cache", enabled)
    jax.config.update("jax_compilation_cache_dir", before)
    reset_cache()  # the open cache follows the restored directory


def test_default_is_xdg_cache_home_and_programs_are_written_there(jax_cache_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert use_compilation_cache() is None  # CPU programs: the default stays off (module docstring)
    where = use_compilation_cache(platform="gpu")
    assert where == str(tmp_path / "fastblt" / "jax")
    assert jax.config.jax_compilation_cache_dir == where
    jax.jit(lambda x: jnp.sin(x) * 3.0 + 0.123).lower(jnp.ones(7)).compile()  # a program seen nowhere else
    assert os.listdir(where), "the compiled program was not written to the cache"


def test_env_variable_picks_the_directory_or_turns_it_off(jax_cache_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, str(tmp_path / "mine"))
    assert use_compilation_cache(platform="gpu") == str(tmp_path / "mine")
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setenv(ENV, "0")
    assert use_compilation_cache(platform="gpu") is None
    assert not jax.config.jax_compilation_cache_dir


def test_a_directory_jax_was_given_wins_over_the_default_but_not_over_an_explicit_one(
    jax_cache_dir, tmp_path
):
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "users"))
    assert use_compilation_cache() == str(tmp_path / "users")
    assert use_compilation_cache(False) == str(tmp_path / "users")
    assert use_compilation_cache(tmp_path / "explicit") == str(tmp_path / "explicit")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "explicit")


def test_an_unwritable_directory_warns_and_generation_goes_on(jax_cache_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.warns(UserWarning, match="cannot be used"):
        assert use_compilation_cache(blocker / "jax") is None


def test_an_empty_directory_is_off_for_xla_autotuning_cache_too(jax_cache_dir):
    """JAX reads ``JAX_COMPILATION_CACHE_DIR=`` as a directory of "": its own cache stays off, but XLA's
    autotuning cache is still pointed at a relative directory (JAX's compile options are the oracle)."""
    from jax._src import compiler

    def autotune_dir():
        options = compiler.get_compile_options(num_replicas=1, num_partitions=1)
        return options.executable_build_options.debug_options.xla_gpu_per_fusion_autotune_cache_dir

    for where in (False, True):
        jax.config.update("jax_compilation_cache_dir", "")
        assert autotune_dir() == "xla_gpu_per_fusion_autotune_cache_dir"  # the trap, as JAX has it
        assert use_compilation_cache(where, platform="gpu") is None  # off, the default not applied
        assert jax.config.jax_compilation_cache_dir is None
        assert autotune_dir() == ""


def test_the_cli_unsets_an_empty_directory_before_jax_reads_it(jax_cache_dir, monkeypatch, capsys):
    from fastblt import cli

    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "")
    assert cli.main(["config", "--config", "tiny"]) == 0
    assert "JAX_COMPILATION_CACHE_DIR" not in os.environ
    assert os.environ[ENV] == "0"  # still off for fastblt's default
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/somewhere")  # a real setting is left alone
    assert cli.main(["config", "--config", "tiny"]) == 0
    assert os.environ["JAX_COMPILATION_CACHE_DIR"] == "/somewhere"
