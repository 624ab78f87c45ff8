"""The encoder's patch max-pool kernel (fastblt.model.pool_kernel) in Pallas interpret mode: values
and gradients against a loop over patches by hand and against XLA's segment_max (ties included),
where the model uses it, and a BLT's gradients with it against XLA's."""

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

from fastblt.model import BLT, blt, pool_kernel
from fastblt.model import attention as attn_lib


def _oracle(h, ids, num_patches, g):
    """Each patch's column max (0 without bytes) and the gradient for cotangent g: each patch's
    gradient to the bytes that reach its max, split evenly among them; loops in float64."""
    h, g = np.asarray(h, np.float64), np.asarray(g, np.float64)
    b, n, d = h.shape
    out, dh = np.zeros((b, num_patches, d)), np.zeros_like(h)
    for r in range(b):
        for p in range(num_patches):
            rows = np.flatnonzero(ids[r] == p)
            if not rows.size:
                continue
            out[r, p] = h[r, rows].max(axis=0)
            hit = h[r, rows] == out[r, p]
            dh[r, rows] += hit * g[r, p] / hit.sum(axis=0)
    return out, dh


def _case(dtype, seed=0, b=2, n=64, d=32, num_patches=24):
    """Patch ids with runs of 1-7 bytes, the last patches empty; values on a coarse grid, so that
    ties with the max are common."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((b, n), np.int32)
    for r in range(b):
        lengths = rng.integers(1, 8, num_patches)
        ids[r] = np.minimum(np.repeat(np.arange(num_patches), lengths)[:n], num_patches - 1)
        ids[r, n - 3 :] = ids[r, n - 4]  # a longer last run, and the patches after it empty
    h = jnp.asarray(rng.integers(-3, 4, (b, n, d)) * 0.5, dtype)
    g = jnp.asarray(rng.normal(size=(b, num_patches, d)), dtype)
    return h, jnp.asarray(ids), num_patches, g


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_values_and_gradient_match_a_loop_over_patches_and_xla(dtype):
    h, ids, num_patches, g = _case(dtype)
    assert int(ids.max()) < num_patches - 1  # some patches have no bytes
    pooled, vjp = jax.vjp(lambda h: pool_kernel.patch_max_pool(h, ids, num_patches, interpret=True), h)
    (dh,) = vjp(g)
    want, want_dh = _oracle(h, np.asarray(ids), num_patches, g)
    assert pooled.dtype == dtype and dh.dtype == dtype
    np.testing.assert_array_equal(np.asarray(pooled, np.float64), want)
    tol = 1e-6 if dtype == jnp.float32 else 1e-2  # a third of a bf16 cotangent, rounded
    np.testing.assert_allclose(np.asarray(dh, np.float64), want_dh, rtol=tol, atol=tol)
    xla_pooled, xla_vjp = jax.vjp(lambda h: blt.patch_max_pool(h, ids, num_patches), h)  # the CPU: XLA
    np.testing.assert_array_equal(np.asarray(pooled), np.asarray(xla_pooled))
    np.testing.assert_allclose(
        np.asarray(dh, np.float64), np.asarray(xla_vjp(g)[0], np.float64), rtol=tol, atol=tol
    )


def test_runs_of_each_patch():
    ids = jnp.asarray([[0, 0, 1, 1, 1, 3], [0, 1, 2, 3, 4, 5]], jnp.int32)
    start, end = pool_kernel.patch_runs(ids, 7)
    np.testing.assert_array_equal(start, [[0, 2, 5, 5, 6, 6, 6], [0, 1, 2, 3, 4, 5, 6]])
    np.testing.assert_array_equal(end, [[2, 5, 5, 6, 6, 6, 6], [1, 2, 3, 4, 5, 6, 6]])


def test_which_calls_the_kernel_takes(monkeypatch):
    assert pool_kernel.supported(jnp.zeros((16, 4096, 512), jnp.bfloat16))  # blt_mid's encoder
    assert not pool_kernel.supported(jnp.zeros((2, 64, 48)))  # not a power of two
    assert not pool_kernel.supported(jnp.zeros((64, 64), jnp.bfloat16))
    with pytest.raises(ValueError, match="power of two"):
        pool_kernel.patch_max_pool(jnp.zeros((2, 8, 48)), jnp.zeros((2, 8), jnp.int32), 4)
    as_one_gpu(monkeypatch, blt, "GPU_POOL_KERNEL")
    h = jnp.zeros((4, 256, 32), jnp.bfloat16)
    assert not blt.use_pool_kernel(h)  # the CPU: XLA's segment_max
    with attn_lib.target_platform("gpu"):
        assert blt.use_pool_kernel(h) and not blt.use_pool_kernel(h[:1, :8])  # a prompt's prefill
        monkeypatch.setattr(jax, "device_count", lambda *a: 2)
        assert not blt.use_pool_kernel(h)  # several devices: no partitioning rule for the kernel


def test_blt_gradients_with_the_kernel_are_xlas(monkeypatch):
    """BLT traced for a GPU with the kernel pooling the encoder's bytes: the loss and every
    parameter's gradient are those of XLA's segment_max (the CPU trace)."""
    as_one_gpu(monkeypatch, blt, "GPU_POOL_KERNEL", POOL_KERNEL_MIN_ROWS=1)
    rng = np.random.default_rng(3)
    config = small_config(attention_impl="xla")
    tokens, lengths = batch(rng, [40, 33])
    params = init_params(config)

    def loss(p):
        return BLT(config).apply({"params": p}, jnp.asarray(tokens), jnp.asarray(lengths)).sum()

    with attn_lib.target_platform("gpu"):
        assert "fastblt_patch_max_pool" in str(jax.make_jaxpr(jax.grad(loss))(params))
        got_loss, got = jax.jit(jax.value_and_grad(loss))(params)
    want_loss, want = jax.jit(jax.value_and_grad(loss))(params)
    assert float(got_loss) == float(want_loss)

    def close(a, b):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6 * float(np.abs(b).max()))

    jax.tree.map(close, got, want)


def test_kernel_check_script_passes_the_kernel_and_flags_a_wrong_one(monkeypatch):
    """experiments/benchmarks/kernel_check.py (interpreted): the kernel passes; one whose backward
    hands every tied byte the whole gradient is reported as a mismatch."""
    kernel_check = kernel_check_script()

    (name, rows, dim) = kernel_check.SMALL[0]
    assert kernel_check.check("pool", name, rows, dim, interpret=True)["ok"]
    real = pool_kernel._pool_bwd

    def unsplit(interpret, res, g):
        h, ids, pooled, ties = res
        return real(interpret, (h, ids, pooled, jnp.minimum(ties, 1)), g)

    pool_kernel._pool.defvjp(pool_kernel._pool_fwd, unsplit)
    try:
        # Values on a coarse grid: many bytes tie with their patch's max.
        monkeypatch.setattr(
            jax.random, "normal", lambda key, shape: jnp.round(jax.random.uniform(key, shape) * 4)
        )
        result = kernel_check.check("pool", name, rows, dim, interpret=True)
    finally:
        pool_kernel._pool.defvjp(pool_kernel._pool_fwd, real)
    assert not result["ok"] and result["pooled_rel_error"] == 0 and result["dx_rel_error"] > 0.1


def test_kernel_lowers_for_cuda():
    """Triton takes the kernel at blt_mid's encoder shape (16 x 4 096 bytes of 512, 1 026 patches)."""
    h = jax.ShapeDtypeStruct((16, 4096, 512), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((16, 4096), jnp.int32)

    def loss(h, ids):
        return jnp.sum(pool_kernel.patch_max_pool(h, ids, 1026, interpret=False).astype(jnp.float32))

    assert cuda_text(jax.grad(loss), h, ids).count("xla.gpu.triton") == 1


@pytest.mark.parametrize("n", [64, 72])
def test_long_patches_and_runs_that_end_the_row(n):
    """Runs longer than a step's rows (pool_kernel.chunk_rows), and runs that end the row where a
    step's read is moved back inside it (n not a multiple of the step's rows)."""
    rng = np.random.default_rng(n)
    lengths = [33, 1, 2, 16, 4]  # a run of 33 bytes (three steps), then runs around a step's 16 rows
    ids = np.repeat(np.arange(len(lengths)), lengths)
    ids = np.concatenate([ids, np.full(n - ids.size, len(lengths))])[None].astype(np.int32)
    num_patches = len(lengths) + 2
    h = jnp.asarray(rng.integers(-4, 5, (1, n, 16)) * 0.25, jnp.float32)
    g = jnp.asarray(rng.normal(size=(1, num_patches, 16)), jnp.float32)
    assert pool_kernel.chunk_rows(n, 16) == 16
    pooled, vjp = jax.vjp(
        lambda h: pool_kernel.patch_max_pool(h, jnp.asarray(ids), num_patches, interpret=True), h
    )
    want, want_dh = _oracle(h, ids, num_patches, g)
    np.testing.assert_array_equal(np.asarray(pooled, np.float64), want)
    np.testing.assert_allclose(np.asarray(vjp(g)[0], np.float64), want_dh, rtol=1e-6, atol=1e-6)
