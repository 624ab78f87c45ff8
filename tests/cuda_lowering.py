"""Lowering a function for CUDA on the CPU, as the kernel tests check what Triton is handed."""

from __future__ import annotations

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
