"""Test environment: 8 CPU devices, LLVM at -O0 (and, on request, a persistent compilation cache),
set before JAX is imported.

pytest imports this file before any test module, so the variables below are in place when a test
first imports JAX. Markers (``slow``, ``parity``) are registered in setup.cfg.
"""

from __future__ import annotations

import os
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent

# Tests never touch an accelerator: results must not depend on which machine runs them.
os.environ["JAX_PLATFORMS"] = "cpu"
# 8 fake CPU devices are enough to test meshes, FSDP/tensor sharding and resharded restores.
_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in _flags:
    _flags = f"{_flags} --xla_force_host_platform_device_count=8".strip()
# LLVM at -O0 (XLA's own HLO passes still run): compiling dominates the suite's time on CPU, and the
# tests' programs are small and run a few steps. A small train step compiles in 5.8 CPU-s instead of
# 11.8 and runs 20 steps in 2.0 s instead of 1.0. Values can differ from -O2's in the last bits (after
# 300 BLT-D steps one accuracy read 0.5557 instead of 0.5547); no test's tolerance changed.
if "--xla_backend_optimization_level" not in _flags:
    _flags = f"{_flags} --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags
# The persistent compilation cache is off by default here: with jaxlib 0.10.2 on CPU, serializing or
# loading a train-step executable crashed a test worker with a segfault (inside
# compilation_cache.put_executable_and_time / get_executable_and_time) in 2 of 3 cold full runs on
# 2026-12-02, and never without the cache. FASTBLT_TEST_COMPILE_CACHE=1 turns it on for warm local
# reruns (compilation dominates CPU test time; a cold suite takes ~20% longer without it).
if os.environ.get("FASTBLT_TEST_COMPILE_CACHE", "") not in ("", "0"):
    os.environ.setdefault("JAX_ENABLE_COMPILATION_CACHE", "true")
else:
    os.environ.setdefault("JAX_ENABLE_COMPILATION_CACHE", "false")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_REPO / ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
