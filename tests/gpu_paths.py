"""Helpers for tests of the GPU paths on the CPU: lowering for CUDA, switching a kernel on as on one
GPU, and the kernel checks of experiments/benchmarks."""

from __future__ import annotations

import importlib
import os
import sys
import types

import jax
import pytest

from fastblt.model import attention as attn_lib


def cuda_text(fn, *args) -> str:
    """``fn`` traced for a GPU (model code takes its GPU paths) and lowered for CUDA: the StableHLO
    text. Skips the calling test where this jax asks a GPU (or an abstract one) for its architecture
    before it lowers a Triton kernel."""
    try:
        with attn_lib.target_platform("gpu"):
            return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    except RuntimeError as e:
        if "No supported GPU" not in str(e):
            raise
        pytest.skip(f"this jax needs a GPU to lower Triton kernels: {e}")


def as_one_gpu(monkeypatch, module: types.ModuleType, switch: str, **settings) -> None:
    """A kernel's switch on as in a process of one GPU: ``module.switch = True``, each of
    ``settings`` (e.g. a minimum size of 1) set on ``module``, one device. The kernels run
    interpreted here; a test enters ``target_platform("gpu")`` where the model should take them."""
    monkeypatch.setattr(module, switch, True)
    for name, value in settings.items():
        monkeypatch.setattr(module, name, value)
    monkeypatch.setattr(jax, "device_count", lambda *a: 1)


def kernel_check_script() -> types.ModuleType:
    """experiments/benchmarks/kernel_check.py as a module."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments", "benchmarks"))
    return importlib.import_module("kernel_check")
