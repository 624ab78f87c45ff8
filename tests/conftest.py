"""Test environment, set before JAX is imported: 8 CPU devices, LLVM at -O0, and a directory for the
session (its persistent compilation cache, the runs that shared_runs.py builds once).

pytest imports this file before any test module, so the variables below are in place when a test
first imports JAX. Markers (``slow``, ``parity``) are registered in setup.cfg.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from shared_runs import SESSION_ENV

_REPO = Path(__file__).resolve().parent.parent

# Tests never touch an accelerator: results must not depend on which machine runs them.
os.environ["JAX_PLATFORMS"] = "cpu"
_flags = os.environ.get("XLA_FLAGS", "")
# 8 fake CPU devices are enough to test meshes, FSDP/tensor sharding and resharded restores. Set
# through JAX's config (below, after the environment), not XLA_FLAGS: the `fastblt` processes that
# tests start inherit the environment, and see one device, as a user's CPU run does and as the
# in-process runs they are compared with do (_one_device_default_mesh).
_FAKE_DEVICES = None if "--xla_force_host_platform_device_count" in _flags else 8
# LLVM at -O0 (XLA's own HLO passes still run): compiling dominates the suite's time on CPU, and the
# tests' programs are small and run a few steps. A small train step compiles in 5.8 CPU-s instead of
# 11.8 and runs 20 steps in 2.0 s instead of 1.0. Values can differ from -O2's in the last bits (after
# 300 BLT-D steps one accuracy read 0.5557 instead of 0.5547); no test's tolerance changed. A setup of
# hundreds of steps trains in a subprocess at the default level (shared_runs.train_subprocess).
if "--xla_backend_optimization_level" not in _flags:
    _flags = f"{_flags} --xla_backend_optimization_level=0"
# XLA's older CPU fusion code generator instead of its MLIR fusion emitters: on the 2-core dev machine
# (jaxlib 0.10.2, 2026-12-05) a tiny ar and blt_s program and a 2-step train run took 34.9 CPU-s to
# compile and run with the emitters and 23.5 without (the train run 16.1 -> 11.3 s). Disabling the
# expensive LLVM passes, one codegen split or the old (non-thunk) runtime changed nothing. Tests
# compare programs with oracles, never with the emitters' own bits, so the generator is free to pick.
if "--xla_cpu_use_fusion_emitters" not in _flags:
    _flags = f"{_flags} --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = _flags
# A directory for the pytest session, made by the controlling process (or the one process of a run
# without xdist), inherited by its xdist workers and by the `fastblt` subprocesses that tests start,
# and removed at the end: a session starts cold, as CI does.
_own_session: str | None = None
if SESSION_ENV not in os.environ:
    _own_session = tempfile.mkdtemp(prefix="fastblt-tests-")
    os.environ[SESSION_ENV] = _own_session
# The persistent compilation cache: off unless asked for. Many tests compile the same programs (a
# small config's init and eval steps, a train step several tests run, one sampler program per method
# and shape), and with a cache in the session directory the first compile is written there and every
# later one, in any process of the session, is a load (tests/test_train.py, -n 2: 237 -> 151 s, 455 ->
# 294 CPU-s). But jaxlib 0.10.2 segfaults now and then serializing or loading a CPU executable: 2 of 3
# cold full runs on 2026-12-02 with the repo's .jax_cache, and one worker in the first full -n 2 run
# with the session cache (2026-12-04: 914 s, 1739 CPU-s; a crashed test is rerun once, setup.cfg).
# Without it the same suite took 959 s (1849 CPU-s): a 5% gain is not worth a test that fails when
# its rerun crashes too. FASTBLT_TEST_COMPILE_CACHE=session turns the session cache on; =1 keeps one
# in the repo's .jax_cache, for warm local reruns.
_MODE = os.environ.get("FASTBLT_TEST_COMPILE_CACHE", "0")
os.environ.setdefault("JAX_ENABLE_COMPILATION_CACHE", "false" if _MODE == "0" else "true")
if _MODE != "0":
    os.environ.setdefault(
        "JAX_COMPILATION_CACHE_DIR",
        os.path.join(os.environ[SESSION_ENV], "jax") if _MODE == "session" else str(_REPO / ".jax_cache"),
    )
# Programs that compile faster than this are left out: loading one costs about as much as compiling
# it, and each written entry is one more serialization.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


# Identical programs compiled once per test process, in memory. Tests build many jit wrappers of the
# same computation (a Trainer per test over the same small config: its init, train and eval steps;
# model.apply under new lambdas), and JAX's own caches key on the wrapper, so each compiled again.
# This keeps every executable under JAX's persistent-cache key (jax._src.compilation_cache: the module,
# devices, compile options, backend) and hands the same loaded executable back: what the persistent
# cache would do, without serialising executables, which is where jaxlib 0.10.2 crashed (above).
# Programs with host callbacks (the module indexes Python callables) compile as before. The key leaves
# out debug information, so a hit may carry an earlier identical program's op names in its HLO text
# (what fastblt.profiling reads). FASTBLT_TEST_EXECUTABLE_MEMO=0 turns it off.
_MEMO_SIZE = 128


def _memoize_executables() -> None:
    import collections
    import inspect
    import threading

    try:
        from jax._src import cache_key, compilation_cache, compiler
    except ImportError:  # another JAX: compile as JAX does
        return
    real = compiler.compile_or_get_cached
    names = list(inspect.signature(real).parameters)
    if names[:5] != ["backend", "computation", "devices", "compile_options", "host_callbacks"]:
        return
    memo: collections.OrderedDict = collections.OrderedDict()
    lock = threading.Lock()  # tests may compile from several threads (the sampler does on a GPU)

    def memoized(backend, computation, devices, compile_options, host_callbacks, *rest, **kw):
        bound = dict(zip(names[5:], rest, strict=False)) | kw
        if host_callbacks or bound.get("pgle_profiler") is not None:
            return real(backend, computation, devices, compile_options, host_callbacks, *rest, **kw)
        try:
            key = compilation_cache.get_cache_key(
                computation, devices, compile_options, backend, cache_key.IgnoreCallbacks.NO
            )
        except Exception:  # as JAX's own cache: no key, no cache
            return real(backend, computation, devices, compile_options, host_callbacks, *rest, **kw)
        key = (key, tuple(d.id for d in bound.get("executable_devices", ())))
        with lock:
            exe = memo.get(key)
            if exe is not None:
                memo.move_to_end(key)
                return exe
        exe = real(backend, computation, devices, compile_options, host_callbacks, *rest, **kw)
        with lock:
            memo[key] = exe
            while len(memo) > _MEMO_SIZE:
                memo.popitem(last=False)
        return exe

    compiler.compile_or_get_cached = memoized


if os.environ.get("FASTBLT_TEST_EXECUTABLE_MEMO", "1") != "0":
    _memoize_executables()


if _FAKE_DEVICES is not None:
    import jax

    jax.config.update("jax_num_cpu_devices", _FAKE_DEVICES)


def _one_device_default_mesh() -> None:
    """A mesh config that fits one device (the tests' default, data=-1) gets one device, not the 8
    fake ones. On 2 cores the 8 devices only add work: a partitioned program per step and
    executable, and 8 partitions run one after another (four training tests of test_train.py,
    2026-12-06: 101.5 -> 82.4 s). A test of meshes names the axis sizes it needs (mesh.data=8, or
    (2, 2, 2)), which do not fit one device and keep all 8; values do not depend on the mesh
    (test_train.py's sharded-vs-single tests). A rule of the config, not of the test: a module
    fixture (a shared run) is built before any per-test switch would apply."""
    from fastblt import sharding
    from fastblt.config import ConfigError

    real = sharding.make_mesh

    def make_mesh(mesh_cfg, devices=None):
        if devices is None:
            import jax

            try:
                return real(mesh_cfg, jax.devices()[:1])
            except ConfigError:  # sizes above 1: all the devices (or the config's own error)
                pass
        return real(mesh_cfg, devices)

    sharding.make_mesh = make_mesh


_one_device_default_mesh()


def pytest_unconfigure(config):
    if _own_session is not None:
        shutil.rmtree(_own_session, ignore_errors=True)
