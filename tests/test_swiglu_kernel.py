"""SwiGLU's two-output gradient kernel (fastblt.model.swiglu_kernel) in Pallas interpret mode: the
gradients against a float64 recomputation by hand, where the model uses it, and a BLT's parameter
gradients with it against XLA's."""

from __future__ import annotations

import numpy as np
import pytest

try:
    from gpu_paths import as_one_gpu, cuda_text, kernel_check_script
    from test_model_vs_oracle import batch, init_params, small_config
except ImportError:  # pragma: no cover - when tests/ is a package
    from tests.gpu_paths import as_one_gpu, cuda_text, kernel_check_script
    from tests.test_model_vs_oracle import batch, init_params, small_config

import jax
import jax.numpy as jnp

from fastblt.model import BLT, layers, swiglu_kernel
from fastblt.model import attention as attn_lib


def _oracle(gate, up, g):
    """d/d gate and d/d up of sum(g * silu(gate) * up), in float64 by hand."""
    a, b, g = (np.asarray(t, np.float64) for t in (gate, up, g))
    s = 1.0 / (1.0 + np.exp(-a))
    return g * b * (s + a * s * (1.0 - s)), g * a * s


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(2, 64, 176), (3, 8, 512)])  # 176: no power of two, 22 528 elements
def test_gradients_match_float64(dtype, shape):
    rng = np.random.default_rng(0)
    gate = rng.normal(0, 3.0, shape)
    gate.reshape(-1)[:4] = [-100.0, -30.0, 30.0, 100.0]  # saturated sigmoids: no overflow to NaN
    gate, up, g = (jnp.asarray(t, dtype) for t in (gate, rng.normal(size=shape), rng.normal(size=shape)))
    assert swiglu_kernel.supported(gate)
    d_gate, d_up = swiglu_kernel.swiglu_grad(gate, up, g, interpret=True)
    want_gate, want_up = _oracle(gate, up, g)
    assert d_gate.dtype == dtype and d_up.dtype == dtype and d_gate.shape == shape
    # float32 inside: the float64 values rounded to the output dtype (bf16: within one rounding).
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    for got, want in ((d_gate, want_gate), (d_up, want_up)):
        got = np.asarray(got, np.float64)
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


def test_the_model_gradient_is_the_kernel_where_it_runs():
    """layers.swiglu's VJP with the kernel equals its XLA expression (the CPU's) to float32 rounding."""
    rng = np.random.default_rng(1)
    gate, up, g = (jnp.asarray(rng.normal(0, 2.0, (4, 32, 128)), jnp.float32) for _ in range(3))
    want = jax.vjp(layers.swiglu, gate, up)[1](g)
    got = swiglu_kernel.swiglu_grad(gate, up, g, interpret=True)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_which_calls_the_kernel_takes():
    assert swiglu_kernel.supported(jnp.zeros((16, 1026, 2816), jnp.bfloat16))  # blt_mid's global FFN
    assert swiglu_kernel.supported(jnp.zeros((16, 4096, 1536), jnp.bfloat16))  # its decoder's
    assert not swiglu_kernel.supported(jnp.zeros((3, 7, 11), jnp.bfloat16))  # blocks of 1
    assert not swiglu_kernel.supported(jnp.zeros((64, 64), jnp.int32))
    assert swiglu_kernel.block_size(16 * 1026 * 2816) == 4096 and swiglu_kernel.block_size(22528) == 2048
    with pytest.raises(ValueError, match="blocks of"):
        swiglu_kernel.swiglu_grad(*(jnp.zeros((3, 7, 11)),) * 3)


@pytest.fixture
def kernel_on(monkeypatch):
    """The kernel on, as on one GPU, for calls of any size (interpreted here)."""
    as_one_gpu(monkeypatch, layers, "GPU_SWIGLU_KERNEL", SWIGLU_KERNEL_MIN_SIZE=1)


def test_only_gpu_training_sized_calls_use_it(kernel_on, monkeypatch):
    x = jnp.zeros((4, 256, 96), jnp.bfloat16)
    assert not layers.use_swiglu_kernel(x)  # the CPU: XLA's fusions
    with attn_lib.target_platform("gpu"):
        assert layers.use_swiglu_kernel(x)
        assert not layers.use_swiglu_kernel(x[:1, :3, :11])  # no block of 512 divides 33 elements
        monkeypatch.setattr(layers, "SWIGLU_KERNEL_MIN_SIZE", 1 << 20)
        assert not layers.use_swiglu_kernel(x)  # a decode step's or a small model's call
        monkeypatch.setattr(layers, "SWIGLU_KERNEL_MIN_SIZE", 1)
        monkeypatch.setattr(jax, "device_count", lambda *a: 2)
        assert not layers.use_swiglu_kernel(x)  # several devices: no partitioning rule for the kernel


def test_blt_gradients_with_the_kernel_are_xlas(kernel_on):
    """BLT traced for a GPU with the kernel in every SwiGLU gradient it qualifies for: the
    parameters' gradients are those of XLA's expression (the CPU trace)."""
    rng = np.random.default_rng(3)
    config = small_config(attention_impl="xla")
    tokens, lengths = batch(rng, [64, 57])
    params = init_params(config)

    def loss(p):
        return BLT(config).apply({"params": p}, jnp.asarray(tokens), jnp.asarray(lengths)).sum()

    with attn_lib.target_platform("gpu"):
        assert "fastblt_swiglu_bwd" in str(jax.make_jaxpr(jax.grad(loss))(params))
        got = jax.jit(jax.grad(loss))(params)
    want = jax.jit(jax.grad(loss))(params)  # the CPU: XLA's expression everywhere

    def close(a, b):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6 * float(np.abs(b).max()))

    jax.tree.map(close, got, want)


def test_kernel_check_script_passes_the_kernel_and_flags_a_wrong_one(monkeypatch):
    """experiments/benchmarks/kernel_check.py (interpreted): the kernel passes; one that writes
    the gate's gradient without the sigmoid's derivative term is reported as a mismatch."""
    kernel_check = kernel_check_script()

    (name, rows, dim) = kernel_check.SMALL[0]
    assert kernel_check.check("swiglu", name, rows, dim, interpret=True)["ok"]

    def wrong(gate_ref, up_ref, g_ref, d_gate_ref, d_up_ref):
        a, b, g = (r[...].astype(jnp.float32) for r in (gate_ref, up_ref, g_ref))
        s = 1.0 / (1.0 + jnp.exp(-a))
        d_gate_ref[...] = (g * b * s).astype(d_gate_ref.dtype)  # silu' without its a s (1 - s) term
        d_up_ref[...] = (g * a * s).astype(d_up_ref.dtype)

    monkeypatch.setattr(swiglu_kernel, "_bwd_kernel", wrong)
    result = kernel_check.check("swiglu", name, rows, dim, interpret=True)
    assert not result["ok"] and result["d_gate_rel_error"] > 0.1 and result["d_up_rel_error"] < 8e-3


def test_kernel_lowers_for_cuda():
    """Triton takes the kernel's blocks: blt_mid's global FFN (16 x 1026 x 2816) lowers for CUDA to
    one kernel."""
    shape = (16, 1026, 2816)
    args = [jax.ShapeDtypeStruct(shape, jnp.bfloat16)] * 3
    text = cuda_text(lambda a, b, g: swiglu_kernel.swiglu_grad(a, b, g, interpret=False), *args)
    assert text.count("xla.gpu.triton") == 1
