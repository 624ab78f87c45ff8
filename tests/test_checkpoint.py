"""Training checkpoints: round trips, retention, async saves, resharded restores, error paths,
grain iterator state and the preemption flag."""

from __future__ import annotations

import gc
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fastblt.config import LocalModelConfig, ModelConfig
from fastblt.io import checkpoint as ck
from fastblt.io.checkpoint import (
    Checkpointer,
    CheckpointError,
    CheckpointMismatchError,
    ConfigMismatchError,
    CorruptCheckpointError,
    config_fingerprint,
    config_meta,
)

# A failed Orbax restore leaves tensorstore reads behind whose event loop is closed: harmless, but
# pytest reports them as unraisable when they are garbage-collected. Collect them here, inside the
# tests of this module, where the warning is filtered.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(autouse=True)
def _collect_orbax_leftovers():
    yield
    gc.collect()


def small_state(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "params": {
            "w": jnp.asarray(rng.standard_normal((8, 4)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal(4), jnp.bfloat16),
        },
        "opt_state": {"mu": jnp.asarray(rng.standard_normal((8, 4)), jnp.float32)},
        "step": jnp.asarray(seed, jnp.int32),
        "rng": jax.random.key_data(jax.random.key(seed)),
    }


def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def assert_bitwise_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def test_round_trip_is_bitwise(tmp_path):
    state = small_state(3)
    with Checkpointer(tmp_path / "run", save_every=1, keep=2, async_save=False) as c:
        assert c.latest_step() is None and c.steps() == []
        assert (tmp_path / "run" / "checkpoints").is_dir()  # workdir created
        assert c.save(7, state, meta={"note": "hello", "n": 3})
        restored, meta = c.restore(None, abstract(state))
    assert_bitwise_equal(restored, state)
    assert meta == {"note": "hello", "n": 3}
    # A fresh Checkpointer on the same workdir sees the step.
    with Checkpointer(tmp_path / "run", save_every=1, keep=2) as c2:
        assert c2.latest_step() == 7 and c2.steps() == [7]
        restored, _ = c2.restore(7, abstract(state))
    assert_bitwise_equal(restored, state)


def test_typed_prng_key_round_trip(tmp_path):
    state = {"rng": jax.random.key(11), "w": jnp.ones(3)}
    with Checkpointer(tmp_path, save_every=1, keep=1, async_save=False) as c:
        c.save(1, state)
        restored, meta = c.restore(1, abstract(state))
    assert meta == {}
    assert restored["rng"].dtype == state["rng"].dtype
    np.testing.assert_array_equal(jax.random.key_data(restored["rng"]), jax.random.key_data(state["rng"]))


def test_save_every_and_force(tmp_path):
    with Checkpointer(tmp_path, save_every=5, keep=10, async_save=False) as c:
        saved = [s for s in range(1, 13) if c.save(s, small_state())]
        assert saved == [5, 10]
        assert c.save(12, small_state(), force=True)
        assert not c.save(12, small_state(), force=True)  # never overwrites an existing step
        assert c.steps() == [5, 10, 12]


def test_retention_keep_last_n_and_keep_every(tmp_path):
    # save_every=2 over steps 1..24 saves 2, 4, ..., 24. keep=2 keeps the newest two (22, 24);
    # keep_every=10 keeps 10 and 20 forever. Everything else (2, 4, 6, 8, 12, 14, 16, 18) is deleted.
    with Checkpointer(tmp_path, save_every=2, keep=2, keep_every=10, async_save=False) as c:
        for s in range(1, 25):
            c.save(s, small_state())
        assert c.steps() == [10, 20, 22, 24]
    on_disk = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert on_disk == [10, 20, 22, 24]


def test_keep_every_must_be_multiple_of_save_every(tmp_path):
    with pytest.raises(ValueError, match="keep_every"):
        Checkpointer(tmp_path, save_every=3, keep=1, keep_every=10)
    with pytest.raises(ValueError, match="save_every"):
        Checkpointer(tmp_path, save_every=0, keep=1)


def test_async_save_then_wait(tmp_path):
    state = small_state(1)
    c = Checkpointer(tmp_path, save_every=1, keep=3, async_save=True)
    assert c.save(1, state)
    assert c.save(2, small_state(2))
    c.wait()
    for step in (1, 2):
        assert (tmp_path / "checkpoints" / str(step) / "state").is_dir()
    restored, _ = c.restore(1, abstract(state))
    assert_bitwise_equal(restored, state)
    c.close()


def test_restore_onto_sharded_abstract_state(tmp_path):
    assert jax.device_count() == 8, "tests/conftest.py forces 8 CPU devices"
    state = {"w": jnp.arange(64 * 16, dtype=jnp.float32).reshape(64, 16), "v": jnp.arange(8.0)}
    assert len(state["w"].sharding.device_set) == 1
    with Checkpointer(tmp_path, save_every=1, keep=1, async_save=False) as c:
        c.save(1, state)
        mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
        target = {
            "w": NamedSharding(mesh, PartitionSpec("data", "model")),
            "v": NamedSharding(mesh, PartitionSpec("model")),
        }
        ab = {k: jax.ShapeDtypeStruct(state[k].shape, state[k].dtype, sharding=target[k]) for k in state}
        restored, _ = c.restore(1, ab)
    for k in state:
        assert restored[k].sharding == target[k]
        assert len(restored[k].addressable_shards) == 8
        np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(state[k]))
    # Each device holds its own block: device (i, j) of the mesh has rows 32i.., columns 4j..
    shard = next(s for s in restored["w"].addressable_shards if s.device == mesh.devices[1, 2])
    np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(state["w"])[32:64, 8:12])


def test_shape_mismatch_names_step_leaf_and_shapes(tmp_path):
    state = small_state()
    with Checkpointer(tmp_path, save_every=1, keep=1, async_save=False) as c:
        c.save(4, state)
        bad = abstract(state)
        bad["params"]["w"] = jax.ShapeDtypeStruct((8, 5), jnp.float32)
        with pytest.raises(CheckpointMismatchError) as info:
            c.restore(4, bad)
    msg = str(info.value)
    assert "step 4" in msg and "params.w" in msg and "(8, 4)" in msg and "(8, 5)" in msg


def test_structure_mismatch_names_missing_and_extra_leaves(tmp_path):
    state = small_state()
    with Checkpointer(tmp_path, save_every=1, keep=1, async_save=False) as c:
        c.save(2, state)
        bad = abstract(state)
        bad["params"]["c"] = bad["params"].pop("b")
        with pytest.raises(CheckpointMismatchError) as info:
            c.restore(2, bad)
    msg = str(info.value)
    assert "step 2" in msg and "params.b" in msg and "params.c" in msg


def test_corrupt_checkpoint_is_reported_and_others_survive(tmp_path):
    state1, state2 = small_state(1), small_state(2)
    with Checkpointer(tmp_path, save_every=1, keep=5, async_save=False) as c:
        c.save(1, state1)
        c.save(2, state2)
    step2 = tmp_path / "checkpoints" / "2" / "state"
    data_files = [p for p in step2.rglob("*") if p.is_file() and p.parent.name == "d"]
    assert data_files, "expected OCDBT data files under state/d"
    for p in data_files:
        p.unlink()
    before = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "checkpoints" / "1").rglob("*"))
    with Checkpointer(tmp_path, save_every=1, keep=5, async_save=False) as c:
        with pytest.raises(CorruptCheckpointError) as info:
            c.restore(None, abstract(state2))
        msg = str(info.value)
        assert "step 2" in msg and "fastblt train" in msg and "[1]" in msg  # a hint that exists
        assert c.steps() == [1, 2]  # nothing deleted
        restored, _ = c.restore(1, abstract(state1))
    assert_bitwise_equal(restored, state1)
    after = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "checkpoints" / "1").rglob("*"))
    assert after == before


def _break_state(tmp_path, step):
    for p in (tmp_path / "checkpoints" / str(step) / "state").rglob("*"):
        if p.is_file() and p.parent.name == "d":
            p.unlink()


def test_restore_newest_good_moves_an_unreadable_step_aside(tmp_path):
    state1, state2 = small_state(1), small_state(2)
    with Checkpointer(tmp_path, save_every=1, keep=5, async_save=False) as c:
        c.save(1, state1)
        c.save(2, state2)
    _break_state(tmp_path, 2)
    warnings = []
    with Checkpointer(tmp_path, save_every=1, keep=5, async_save=False) as c:
        step, restored, _ = c.restore_newest_good(abstract(state2), log_fn=warnings.append)
        assert step == 1 and c.steps() == [1]
        c.save(2, state2)  # saving goes on normally, under the same step number
        assert c.steps() == [1, 2]
    assert_bitwise_equal(restored, state1)
    aside = [p.name for p in (tmp_path / "checkpoints").iterdir() if ".corrupt-" in p.name]
    assert len(aside) == 1 and aside[0].startswith("2.corrupt-")  # kept, never deleted
    assert len(warnings) == 1 and "step 2" in warnings[0] and aside[0] in warnings[0]


def test_restore_newest_good_skips_one_step_at_most(tmp_path):
    """Two unreadable steps in a row point at something other than the files: raise, move no more."""
    with Checkpointer(tmp_path, save_every=1, keep=5, async_save=False) as c:
        c.save(1, small_state(1))
        c.save(2, small_state(2))
    _break_state(tmp_path, 1)
    _break_state(tmp_path, 2)
    with Checkpointer(tmp_path, save_every=1, keep=5, async_save=False) as c:
        with pytest.raises(CorruptCheckpointError, match="step 1"):
            c.restore_newest_good(abstract(small_state(1)), log_fn=lambda _: None)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert "1" in names and sum(n.startswith("2.corrupt-") for n in names) == 1


def test_restore_newest_good_read_only_moves_nothing(tmp_path):
    with Checkpointer(tmp_path, save_every=1, keep=5, async_save=False) as c:
        c.save(1, small_state(1))
        c.save(2, small_state(2))
    _break_state(tmp_path, 2)
    with Checkpointer(tmp_path, save_every=1, keep=5, async_save=False) as c:
        step, restored, _ = c.restore_newest_good(
            abstract(small_state(1)), log_fn=lambda _: None, move_aside=False
        )
    assert step == 1
    assert_bitwise_equal(restored, small_state(1))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if not p.name.startswith(".")) == [
        "1",
        "2",
    ]


def test_restore_errors_for_missing_steps(tmp_path):
    with Checkpointer(tmp_path, save_every=1, keep=1, async_save=False) as c:
        with pytest.raises(CheckpointError, match="no checkpoint"):
            c.restore(None, abstract(small_state()))
        c.save(3, small_state())
        with pytest.raises(CheckpointError, match=r"step 5 .*saved steps: \[3\]"):
            c.restore(5, abstract(small_state()))


def tiny_model_config(**changes) -> ModelConfig:
    base = ModelConfig(
        encoder=LocalModelConfig(dim=32, n_layers=1, n_heads=2),
        decoder=LocalModelConfig(dim=32, n_layers=1, n_heads=2, cross_attn_all_layers=True),
        entropy_model=None,
    )
    return base.replace(**changes)


def test_config_fingerprint_mismatch_lists_differing_keys(tmp_path):
    saved_cfg = tiny_model_config()
    with Checkpointer(tmp_path, save_every=1, keep=1, async_save=False) as c:
        c.save(1, small_state(), meta=config_meta(saved_cfg, task="blt"))
        # Same architecture, different runtime keys: accepted.
        _, meta = c.restore(1, abstract(small_state()), model_config=saved_cfg.replace(dtype="bfloat16"))
        assert meta["task"] == "blt" and meta["config_fingerprint"] == config_fingerprint(saved_cfg)
        other = saved_cfg.replace(
            cross_attn_k=4, encoder=LocalModelConfig(dim=32, n_layers=1, n_heads=2, window=64)
        )
        with pytest.raises(ConfigMismatchError) as info:
            c.restore(1, abstract(small_state()), model_config=other)
    msg = str(info.value)
    assert "step 1" in msg
    assert "model.cross_attn_k: checkpoint 2, current 4" in msg
    assert "model.encoder.window: checkpoint 512, current 64" in msg
    assert "2 key(s) differ" in msg


def test_fingerprint_ignores_runtime_keys_only():
    cfg = tiny_model_config()
    assert config_fingerprint(cfg) == config_fingerprint(cfg.replace(attention_impl="cudnn", max_bytes=99))
    assert config_fingerprint(cfg) == config_fingerprint(cfg.to_dict())
    assert config_fingerprint(cfg) != config_fingerprint(cfg.replace(vocab_size=300))


def test_fingerprint_is_stable():
    """Checkpoints store fingerprints: the flattening behind them (nested keys joined by ".", lists
    and empty sub-mappings kept as leaves) must not change. Values computed with the original code."""
    config = {"a": {}, "b": {"c": {}, "d": [1, (2, 3)], "e": {"f": None}}, "g.h": 1}
    assert config_fingerprint(config) == "c1bf3504d891cf7e"
    assert config_fingerprint({}) == "44136fa355b3678a"


def test_grain_iterator_round_trip(tmp_path):
    grain = pytest.importorskip("grain")
    it = iter(grain.MapDataset.range(100).to_iter_dataset())
    for _ in range(5):
        next(it)
    with Checkpointer(tmp_path, save_every=1, keep=1, async_save=False) as c:
        c.save(5, small_state(), data_iter=it)
        expected = next(it)  # the element after the saved position
        assert expected == 5
        fresh = iter(grain.MapDataset.range(100).to_iter_dataset())
        c.restore(5, abstract(small_state()), data_iter=fresh)
    assert next(fresh) == expected


def test_restoring_iterator_from_checkpoint_without_one_is_an_error(tmp_path):
    grain = pytest.importorskip("grain")
    with Checkpointer(tmp_path, save_every=1, keep=1, async_save=False) as c:
        c.save(1, small_state())
        fresh = iter(grain.MapDataset.range(10).to_iter_dataset())
        with pytest.raises(CheckpointError, match="data_iter=None"):
            c.restore(1, abstract(small_state()), data_iter=fresh)


def test_sigterm_sets_the_preemption_flag():
    old = signal.getsignal(signal.SIGTERM)
    try:
        assert ck.install_preemption_handler() == ["SIGTERM"]
        assert not ck.preemption_requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert ck.preemption_requested()
        assert Checkpointer.preemption_requested(step=3)  # same flag, as the train loop asks it
    finally:
        ck.uninstall_preemption_handler()
    assert signal.getsignal(signal.SIGTERM) is old
    assert not ck.preemption_requested()


def test_preemption_forces_a_save(tmp_path):
    try:
        ck.install_preemption_handler()
        with Checkpointer(tmp_path, save_every=100, keep=1, async_save=False) as c:
            assert not c.save(7, small_state())
            os.kill(os.getpid(), signal.SIGTERM)
            assert c.save(7, small_state())
            assert c.steps() == [7]
    finally:
        ck.uninstall_preemption_handler()


_TWO_PROCESS_PROBE = """
import os, signal, sys, time
pid, service, port = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3]
import jax
jax.config.update("jax_enable_preemption_service", service)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
from fastblt.io import checkpoint as ck
handled = ck.install_preemption_handler()
for step in range(60):
    if pid == 1 and step == 3:
        os.kill(os.getpid(), signal.SIGTERM)  # only process 1 is preempted
    time.sleep(0.05)
    if ck.preemption_requested(step):
        print("STOP", step, handled, flush=True)
        break
jax.distributed.shutdown()
"""


@pytest.mark.slow
@pytest.mark.parametrize("service", [False, True], ids=["allgather", "jax-preemption-service"])
def test_two_processes_stop_at_the_same_step(tmp_path, service):
    """A SIGTERM to one of two JAX processes stops both, at the same step, in both sync modes."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONPATH": str(repo)}
    script = tmp_path / "probe.py"
    script.write_text(_TWO_PROCESS_PROBE)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), str(int(service)), str(port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for i in range(2)
    ]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=120)[0])
        finally:
            p.kill()
    stops = [next((ln.split() for ln in out.splitlines() if ln.startswith("STOP")), None) for out in outs]
    assert all(stops), f"a process never stopped: {outs}"
    assert stops[0][1] == stops[1][1]  # the same step on both processes
    # Our SIGTERM handler yields to JAX's when its preemption service runs.
    assert all(("SIGTERM" in " ".join(s[2:])) != service for s in stops)


@pytest.mark.parametrize("async_save", [False, True])
def test_a_write_failure_during_save_keeps_earlier_steps_and_says_which_step(
    tmp_path, monkeypatch, async_save
):
    """The disk fills up while step 2 is written (injected into Orbax's metadata writer): the error
    names the step and the cause, step 1 stays the latest good step and restores bitwise."""
    import orbax.checkpoint as ocp

    state1, state2 = small_state(1), small_state(2)
    c = Checkpointer(tmp_path, save_every=1, keep=5, async_save=async_save)
    assert c.save(1, state1, meta={"n": 1})
    c.wait()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "save", disk_full)
    monkeypatch.setattr(ocp.JsonCheckpointHandler, "async_save", disk_full)
    with pytest.raises(CheckpointError, match="step 2 .* No space left on device.*intact"):
        c.save(2, state2, meta={"n": 2})
        c.wait()  # an asynchronous save reports its failure when waited on
    monkeypatch.undo()
    c.close()
    with Checkpointer(tmp_path, save_every=1, keep=5) as fresh:
        assert fresh.steps() == [1]
        restored, meta = fresh.restore(None, abstract(state1))
    assert_bitwise_equal(restored, state1)
    assert meta == {"n": 1}
