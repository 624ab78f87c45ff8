"""Test environment: 8 CPU devices and a persistent compilation cache, set before JAX is imported.

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
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()
# Compilation dominates CPU test time; cache every executable across runs (and xdist workers).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_REPO / ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
