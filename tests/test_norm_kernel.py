"""The RMSNorm kernel (fastblt.model.norm_kernel) in Pallas interpret mode: values and gradients
against a float64 recomputation, where the model uses it, and the BLT forward with it against the
numpy oracle."""

from __future__ import annotations

import numpy as np
import pytest

try:
    import oracle
    from gpu_paths import as_one_gpu, cuda_text, kernel_check_script
    from test_model_vs_oracle import batch, init_params, small_config
except ImportError:  # pragma: no cover - when tests/ is a package
    from tests import oracle
    from tests.gpu_paths import as_one_gpu, cuda_text, kernel_check_script
    from tests.test_model_vs_oracle import batch, init_params, small_config

import jax
import jax.numpy as jnp

from fastblt.model import BLT, layers, norm_kernel
from fastblt.model import attention as attn_lib

EPS = 1e-5


def _oracle(x, scale, dy):
    """RMSNorm's value and its gradients for cotangent dy, in float64 (by hand)."""
    x, scale, dy = (np.asarray(a, np.float64) for a in (x, scale, dy))
    r = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS)
    xh = x * r
    g = dy * scale
    dx = r * (g - xh * np.mean(xh * g, axis=-1, keepdims=True))
    ds = np.sum((dy * xh).reshape(-1, x.shape[-1]), axis=0)
    return xh * scale, dx, ds


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(3, 40, 64), (2, 16, 512)])
def test_kernel_value_and_gradients_match_float64(dtype, shape):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(0, 2.0, shape), dtype)
    scale = jnp.asarray(rng.normal(1.0, 0.3, shape[-1]), jnp.float32)
    dy = jnp.asarray(rng.normal(size=shape), dtype)
    assert norm_kernel.supported(x)

    def run(x, scale):
        return norm_kernel.rms_norm(x, scale, EPS, interpret=True)

    y, vjp = jax.vjp(run, x, scale)
    dx, ds = vjp(dy)
    want_y, want_dx, want_ds = _oracle(x, scale, dy)
    assert y.dtype == dtype and dx.dtype == dtype and ds.dtype == jnp.float32
    # float32 inside: the outputs are the float64 values rounded to the output dtype (and sums in
    # another order); bf16 outputs are within one bf16 rounding.
    tol = 2e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(y, np.float64), want_y, rtol=tol, atol=tol)
    np.testing.assert_allclose(
        np.asarray(dx, np.float64), want_dx, rtol=tol, atol=tol * np.abs(want_dx).max()
    )
    np.testing.assert_allclose(
        np.asarray(ds, np.float64), want_ds, rtol=1e-4, atol=1e-4 * np.abs(want_ds).max()
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("parts,residual", [(3, True), (2, True), (1, False)])
@pytest.mark.parametrize("min_programs", [norm_kernel.MIN_PROGRAMS, 2])
def test_backward_of_summed_gradients_and_a_residual_matches_float64(
    dtype, parts, residual, min_programs, monkeypatch
):
    """grad_parts: the norm's backward for an output read by `parts` products (q, k, v), plus the
    gradient x gets from its residual path, equals the float64 backward of the summed gradient plus
    the residual's; with one tile per program, and with programs that walk 4 tiles each."""
    monkeypatch.setattr(norm_kernel, "MIN_PROGRAMS", min_programs)
    rng = np.random.default_rng(parts)
    shape = (2, 64, 128)  # 8 tiles of 16 rows
    assert norm_kernel.tiles_per_program(128 // 16) == (1 if min_programs > 8 else 4)
    x = jnp.asarray(rng.normal(0, 2.0, shape), dtype)
    scale = jnp.asarray(rng.normal(1.0, 0.3, shape[-1]), jnp.float32)
    dys = tuple(jnp.asarray(rng.normal(size=shape), dtype) for _ in range(parts))
    d_res = jnp.asarray(rng.normal(size=shape), dtype) if residual else None
    r = norm_kernel.inverse_rms(x, EPS)
    dx, ds = norm_kernel.grad_parts(x, scale, r, dys, d_res, interpret=True)
    _, want_dx, want_ds = _oracle(x, scale, sum(np.asarray(dy, np.float64) for dy in dys))
    if residual:
        want_dx = want_dx + np.asarray(d_res, np.float64)
    assert dx.dtype == dtype and ds.dtype == jnp.float32 and dx.shape == shape
    tol = 2e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(
        np.asarray(dx, np.float64), want_dx, rtol=tol, atol=tol * np.abs(want_dx).max()
    )
    np.testing.assert_allclose(
        np.asarray(ds, np.float64), want_ds, rtol=1e-4, atol=1e-4 * np.abs(want_ds).max()
    )
    np.testing.assert_allclose(
        np.asarray(r), 1.0 / np.sqrt(np.mean(np.asarray(x, np.float64) ** 2, axis=-1) + EPS), rtol=1e-6
    )
    with pytest.raises(ValueError, match="one or more gradients of its shape"):
        norm_kernel.grad_parts(x, scale, r, (dys[0][:, :8],), interpret=True)
    with pytest.raises(ValueError, match="one or more gradients of its shape"):  # a residual of another shape
        norm_kernel.grad_parts(x, scale, r, dys, dys[0].reshape(2, 128, 64), interpret=True)
    with pytest.raises(ValueError, match="r = inverse_rms"):
        norm_kernel.grad_parts(x, scale, r.astype(jnp.bfloat16), dys, interpret=True)


def test_which_calls_the_kernel_takes():
    assert norm_kernel.supported(jnp.zeros((16400, 1024), jnp.bfloat16))  # blt_mid's global rows
    assert not norm_kernel.supported(jnp.zeros((64, 768), jnp.bfloat16))  # not a power of two
    assert not norm_kernel.supported(jnp.zeros((3, 7, 64), jnp.bfloat16))  # 21 rows: blocks of 1
    assert not norm_kernel.supported(jnp.zeros((64, 64), jnp.int32))
    # up to 16 rows and 8192 elements a program, dividing the rows
    assert norm_kernel.block_rows(65536, 512) == 16 and norm_kernel.block_rows(16400, 1024) == 8
    assert norm_kernel.block_rows(4100, 2048) == 4 and norm_kernel.block_rows(40, 64) == 8
    with pytest.raises(ValueError, match="power-of-two width"):
        norm_kernel.rms_norm(jnp.zeros((64, 48)), jnp.ones(48), EPS)


@pytest.fixture
def fused_norm_on(monkeypatch):
    """The kernel on, as on one GPU, for calls of any row count (interpreted here)."""
    as_one_gpu(monkeypatch, layers, "GPU_FUSED_NORM", FUSED_NORM_MIN_ROWS=1)


def test_only_gpu_training_sized_calls_use_it(fused_norm_on, monkeypatch):
    x = jnp.zeros((4, 256, 64), jnp.bfloat16)
    assert not layers.use_fused_norm(x)  # the CPU: XLA's norm
    with attn_lib.target_platform("gpu"):
        assert layers.use_fused_norm(x)
        assert not layers.use_fused_norm(x[..., :48])
        monkeypatch.setattr(layers, "FUSED_NORM_MIN_ROWS", 1024)
        assert layers.use_fused_norm(x) and not layers.use_fused_norm(x[:1, :8])  # a decode step's rows
        monkeypatch.setattr(jax, "device_count", lambda *a: 2)
        assert not layers.use_fused_norm(x)  # several devices: no partitioning rule for the kernel


def test_blt_forward_with_the_kernel_matches_the_oracle_and_xla_gradients(fused_norm_on):
    """BLT traced for a GPU with the kernel in every norm it takes (the local models' 32-wide rows;
    the global model's 48 are not a power of two and stay on XLA): the forward is the numpy
    oracle's and the parameters' gradients are XLA's."""
    rng = np.random.default_rng(3)
    config = small_config(attention_impl="xla")
    tokens, lengths = batch(rng, [40, 33])
    params = init_params(config)

    def loss(p):
        return BLT(config).apply({"params": p}, jnp.asarray(tokens), jnp.asarray(lengths)).sum()

    def logits(p):
        return BLT(config).apply({"params": p}, jnp.asarray(tokens), jnp.asarray(lengths))

    with attn_lib.target_platform("gpu"):
        assert "fastblt_rms_norm" in str(jax.make_jaxpr(jax.grad(loss))(params))
        got = jax.jit(logits)(params)
        got_grads = jax.jit(jax.grad(loss))(params)
    expected = oracle.blt_forward(jax.tree.map(np.asarray, params), config, tokens, lengths)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=0)
    want_grads = jax.jit(jax.grad(loss))(params)  # the CPU: XLA's norm everywhere

    def close(a, b):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6 * float(np.abs(b).max()))

    jax.tree.map(close, got_grads, want_grads)


def test_kernel_check_script_passes_the_kernel_and_flags_a_wrong_one(monkeypatch):
    """experiments/benchmarks/kernel_check.py (interpreted): the kernel passes; one that drops the
    scale's gradient is reported as a mismatch."""
    kernel_check = kernel_check_script()

    (name, rows, dim) = kernel_check.SMALL[0]
    assert kernel_check.check("norm", name, rows, dim, interpret=True)["ok"]
    real = norm_kernel._norm_bwd
    monkeypatch.setattr(norm_kernel, "_norm_bwd", lambda *a: (real(*a)[0], real(*a)[1] * 0))
    norm_kernel._norm.defvjp(norm_kernel._norm_fwd, norm_kernel._norm_bwd)
    try:
        result = kernel_check.check("norm", name, rows, dim, interpret=True)
    finally:
        norm_kernel._norm.defvjp(norm_kernel._norm_fwd, real)
    assert not result["ok"] and result["dscale_rel_error"] == pytest.approx(1.0)


def test_kernel_lowers_for_cuda_forward_and_backward():
    """Triton takes the kernels' block shapes: blt_mid's global rows (16 x 1025 of 1024) lower for
    CUDA to one kernel forward and one backward."""
    x = jnp.ones((16400, 1024), jnp.bfloat16)

    def loss(x, s):
        return jnp.sum(norm_kernel.rms_norm(x, s, EPS, interpret=False).astype(jnp.float32))

    assert cuda_text(jax.grad(loss, argnums=(0, 1)), x, jnp.ones(1024)).count("xla.gpu.triton") == 2


def test_grad_parts_lowers_for_cuda_as_one_kernel():
    """The backward of three summands and a residual's gradient lowers for CUDA to one Triton call at
    blt_mid's global rows."""
    x = jax.ShapeDtypeStruct((16400, 1024), jnp.bfloat16)

    def backward(x, s, a, b, c, d):
        return norm_kernel.grad_parts(x, s, norm_kernel.inverse_rms(x, EPS), (a, b, c), d, interpret=False)

    args = (x, jax.ShapeDtypeStruct((1024,), jnp.float32), x, x, x, x)
    assert cuda_text(backward, *args).count("xla.gpu.triton") == 1


def test_tiles_per_program():
    """Each backward program walks up to 8 tiles while at least 1 024 programs remain: blt_mid's local
    rows in tiles of 8 (65 536 rows), its global rows in tiles of 4 (16 x 1 026 rows, 4 104 tiles),
    BLT-1B's global rows in tiles of 2, a count with no power-of-two divisor, and too few tiles to share."""
    assert norm_kernel.tiles_per_program(65536 // 8) == 8
    assert norm_kernel.tiles_per_program(16 * 1026 // 4) == 4
    assert norm_kernel.tiles_per_program(4 * 1026 // 2) == 2
    assert norm_kernel.tiles_per_program(4103) == 1
    assert norm_kernel.tiles_per_program(1500) == 1


def test_a_bf16_scale_gets_xlas_bf16_gradient():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(0, 2.0, (32, 128)), jnp.bfloat16)
    scale = jnp.asarray(rng.normal(1.0, 0.3, 128), jnp.bfloat16)
    dy = jnp.asarray(rng.normal(size=(32, 128)), jnp.bfloat16)
    got = jax.vjp(lambda x, s: norm_kernel.rms_norm(x, s, EPS, interpret=True), x, scale)[1](dy)
    want = jax.vjp(lambda x, s: layers.rms_norm(x, s, EPS), x, scale)[1](dy)  # the CPU: XLA's norm
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-2, atol=1e-2)
