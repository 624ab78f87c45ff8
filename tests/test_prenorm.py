"""A layer's pre-norm and its products as one op (fastblt.model.prenorm, norm kernel interpreted): its
value and gradients against autodiff of the composition, and a BLT's loss and parameter gradients
with it against XLA's (the CPU's)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

try:
    import test_diffusion
    from gpu_paths import as_one_gpu
    from test_model_vs_oracle import batch, init_params, small_config
except ImportError:  # pragma: no cover - when tests/ is a package
    from tests import test_diffusion
    from tests.gpu_paths import as_one_gpu
    from tests.test_model_vs_oracle import batch, init_params, small_config

import flax.linen as nn
import jax
import jax.numpy as jnp

from fastblt.config import TransformerConfig
from fastblt.model import BLT, layers, prenorm
from fastblt.model import attention as attn_lib

EPS = 1e-5


def _composition(x, scale, kernels):
    """What a layer computes without the op: the residual's x, and RMSNorm(x) @ w per product."""
    y = layers.rms_norm(x, scale, EPS)
    return x, tuple(jnp.dot(y, w) for w in kernels)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("widths", [(64, 32, 32), (96, 96)])  # q, k, v (grouped); w1, w3
def test_value_and_gradients_are_autodiffs_of_the_composition(dtype, widths):
    rng = np.random.default_rng(len(widths))
    x = jnp.asarray(rng.normal(0, 2.0, (2, 24, 64)), dtype)
    scale = jnp.asarray(rng.normal(1.0, 0.3, 64), jnp.float32)
    kernels = tuple(jnp.asarray(rng.normal(0, 0.1, (64, f)), dtype) for f in widths)
    # The residual's cotangent and each product's, all nonzero, so a dropped term shows.
    cot = (
        jnp.asarray(rng.normal(size=x.shape), dtype),
        tuple(jnp.asarray(rng.normal(size=(2, 24, f)), dtype) for f in widths),
    )
    got, got_vjp = jax.vjp(lambda x, s, k: prenorm.norm_products(x, s, k, EPS), x, scale, kernels)
    want, want_vjp = jax.vjp(_composition, x, scale, kernels)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2  # bf16: XLA rounds the summed gradient, the kernel not

    def close(a, b):
        assert a.dtype == b.dtype and a.shape == b.shape
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())

    jax.tree.map(close, got, want)
    jax.tree.map(close, got_vjp(cot), want_vjp(cot))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_is_the_layers_own_to_the_bit(dtype):
    """The op's products are exactly RMSNorm (layers.rms_norm) then nn.Dense's product in the compute
    dtype: the layer's values do not move when the switch does."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(0, 2.0, (2, 24, 64)), dtype)
    scale = jnp.asarray(rng.normal(1.0, 0.3, 64), jnp.float32)
    kernels = [rng.normal(0, 0.1, (64, f)).astype(np.float32) for f in (64, 32)]
    dense = [nn.Dense(f, use_bias=False, dtype=dtype) for f in (64, 32)]
    want = [
        d.apply({"params": {"kernel": k}}, layers.rms_norm(x, scale, EPS))
        for d, k in zip(dense, kernels, strict=True)
    ]
    same, got = prenorm.norm_products(x, scale, tuple(jnp.asarray(k, dtype) for k in kernels), EPS)
    assert same is x
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and bool(jnp.all(a == b))


@pytest.fixture
def norm_parts_on(monkeypatch):
    """The op on, as on one GPU, for calls of any row count (the kernel interpreted here)."""
    as_one_gpu(monkeypatch, layers, "GPU_NORM_PARTS", FUSED_NORM_MIN_ROWS=1)


def test_only_gpu_training_sized_calls_use_it(norm_parts_on, monkeypatch):
    x = jnp.zeros((4, 256, 64), jnp.bfloat16)
    assert not layers.use_norm_parts(x)  # the CPU: XLA's norm
    with attn_lib.target_platform("gpu"):
        assert layers.use_norm_parts(x) and not layers.use_norm_parts(x[..., :48])
        monkeypatch.setattr(layers, "FUSED_NORM_MIN_ROWS", 1024)
        assert not layers.use_norm_parts(x[:1, :8])  # a decode step's rows
        monkeypatch.setattr(jax, "device_count", lambda *a: 2)
        assert not layers.use_norm_parts(x)  # several devices: no partitioning rule for the kernel


@pytest.mark.parametrize("lifted", [False, True])
def test_blt_loss_and_gradients_with_the_op_are_xlas(norm_parts_on, lifted):
    """BLT traced for a GPU with the op in every layer whose width the kernel takes (every stack
    here: the global model 64 wide), and, ``lifted``, the global layers scanned and rematerialised:
    the loss and every parameter's gradient are those of the CPU's composition."""
    rng = np.random.default_rng(4)
    config = small_config(attention_impl="xla")
    config = dataclasses.replace(
        config,
        global_model=TransformerConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2),
        scan_layers=lifted,
        remat=lifted,
    )
    tokens, lengths = batch(rng, [40, 33])
    params = init_params(config)

    def loss(p):
        return BLT(config).apply({"params": p}, jnp.asarray(tokens), jnp.asarray(lengths)).sum()

    with attn_lib.target_platform("gpu"):
        # One kernel call per pre-norm: 2 in each of the 2 encoder, 2 global and 2 decoder layers (the
        # scanned global layers' body is written once).
        calls = str(jax.make_jaxpr(jax.grad(loss))(params)).count("pallas_call[")
        assert calls == (10 if lifted else 12)
        got_loss, got = jax.jit(jax.value_and_grad(loss))(params)
    want_loss, want = jax.jit(jax.value_and_grad(loss))(params)  # the CPU: the composition everywhere
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-6)

    def close(a, b):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-5 * float(np.abs(b).max()))

    jax.tree.map(close, got, want)


def test_blt_d_bf16_loss_and_gradients_with_the_op_are_xlas(norm_parts_on):
    """BLT-D in bfloat16 with rematerialised layers keeping their products (remat_policy "minimal"):
    the block rows run the same layers as the clean rows and read the same parameters through the
    op; the loss and every parameter's gradient are those of the CPU's composition (bf16 rounding:
    autodiff rounds the summed gradients, the kernel does not)."""
    from fastblt.train import blt_d

    config = test_diffusion.CFG.replace(dtype="bfloat16", remat=True, remat_policy="minimal")
    objective = blt_d.objective_config(
        blt_d.objective_section(kind="blt_d", block_size=test_diffusion.B), config
    )
    tokens, targets, mask, lengths = test_diffusion.make_batch(3)
    params = test_diffusion.init_params()

    def loss(p):
        return blt_d.blt_d_loss(p, config, objective, tokens, targets, mask, lengths, jax.random.key(0))[0]

    with attn_lib.target_platform("gpu"):
        assert "pallas_call[" in str(jax.make_jaxpr(jax.grad(loss))(params))
        got_loss, got = jax.jit(jax.value_and_grad(loss))(params)
    want_loss, want = jax.jit(jax.value_and_grad(loss))(params)
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-6)  # the forward is unchanged

    def close(a, b):
        np.testing.assert_allclose(a, b, rtol=0, atol=3e-2 * float(np.abs(b).max()) + 1e-12)

    jax.tree.map(close, got, want)
