"""Few-row matrix products of a decode step as one Pallas kernel each, with the layer's elementwise
work fused in.

At batch 1 a decode step is a chain of products of one or two rows with 1-12 MB matrices, and each
product's cost is reading its matrix. XLA runs them as cuBLAS GEMMs of ~4-6 us (20-40% of the copy
rate on an H200, ``experiments/benchmarks/gemv_rate.py``) with the RMSNorm before them, the SwiGLU
between w13 and w2 and the residual adds as separate kernels: ~25 launches per layer. Here one kernel
computes ``[norm(x) | silu(gate) * up | x] @ w [+ residual]``: each program reads ``block_n`` columns
of the matrix in ``chunk``-wide slices of the input dimension and reduces them against the (few) rows
in float32, so all programs stream the matrix at once with nothing but the rows in between.

The numerics are the model's, operation for operation: RMSNorm in float32 cast to the input's dtype
(``fastblt.model.layers.rms_norm``), SwiGLU rounded to the input's dtype after silu and after the
product (as XLA computes ``silu(gate) * up`` in that dtype), operands cast to the weight's dtype,
float32 accumulation, the product in the weight's dtype, the residual added in the promoted dtype.

Pallas' Triton lowering loads and stores power-of-two shapes only: rows are padded to a power of two
(at most :data:`MAX_ROWS`), and the matrix's dimensions must be multiples of the tile (``tiling``
returns None where they are not; callers fall back to XLA).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# Products with more rows than this are left to XLA (a GEMM's rows are no longer nearly free there).
MAX_ROWS = 8
# float32 values of the matrix one program holds per slice: chunk x block_n (registers of 4 warps).
_PRODUCT_BUDGET = 8192


class Tiling(NamedTuple):
    """How a ``[K, N]`` product is split: ``block_n`` output columns per program, read in
    ``chunk``-wide slices of K, by ``warps`` warps."""

    block_n: int
    chunk: int
    warps: int = 4


def _pow2_floor(v: int) -> int:
    return 1 << (max(v, 1).bit_length() - 1)


def _pow2_ceil(v: int) -> int:
    return 1 << (max(v, 1) - 1).bit_length()


def tiling(rows: int, k: int, n: int, transposed: bool = False, programs: int = 128) -> Tiling | None:
    """Tiles for a product of ``rows`` rows with a ``[k, n]`` matrix (stored ``[n, k]`` if
    ``transposed``), or None where none fits.

    ``block_n``: the largest power of two that still gives about ``programs`` programs (an H200
    has 132 multiprocessors) and divides n; a ``[k, n]`` matrix is read in rows of at least 16
    elements (a 32-byte sector of bf16). ``chunk``: the largest power of two dividing k within the
    register budget.
    """
    rows = _pow2_ceil(rows)
    if rows > MAX_ROWS:
        return None
    block_n = min(_pow2_floor(max(n // programs, 1)), 64)
    if not transposed:
        block_n = max(block_n, 16)
    while block_n > 1 and n % block_n:
        block_n //= 2
    chunk = _pow2_floor(max(_PRODUCT_BUDGET // block_n, 16))
    chunk = min(chunk, 512)
    while chunk >= 16 and k % chunk:
        chunk //= 2
    if chunk < 16 or n % block_n:
        return None
    return Tiling(block_n, chunk)


def _kernel(*refs, k, t: Tiling, eps, has_norm, swiglu, has_residual, transposed):
    it = iter(refs)
    x_ref = next(it)
    g_ref = next(it) if has_norm else None
    w_ref = next(it)
    r_ref = next(it) if has_residual else None
    o_ref = next(it)
    f32 = jnp.float32
    x_dtype, w_dtype = x_ref.dtype, w_ref.dtype
    cols = pl.ds(pl.multiple_of(pl.program_id(0) * t.block_n, t.block_n), t.block_n)
    n_chunks = k // t.chunk

    def x_slice(c, r):  # row r's slice c, loaded from the ref (Triton slices no register values)
        s = pl.ds(c * t.chunk, t.chunk)
        if not swiglu:
            return x_ref[r, s]
        gate = x_ref[r, s].astype(f32)
        up = x_ref[r, pl.ds(k + c * t.chunk, t.chunk)].astype(f32)
        act = (gate * jax.nn.sigmoid(gate)).astype(x_dtype).astype(f32)
        return (act * up).astype(x_dtype)

    # Rows one at a time against each loaded slice of the matrix: 2-D products and reductions only
    # (a first version multiplied a [rows, block_n, chunk] block at once: at two rows it made the
    # decode step 1.7x slower, experiments/results/generate_speed.md run 6).
    rows = x_ref.shape[0]
    inv = [None] * rows
    if has_norm:
        ss = [jnp.zeros((1,), f32) for _ in range(rows)]
        for c in range(n_chunks):
            for r in range(rows):
                xc = x_slice(c, r).astype(f32)
                ss[r] = ss[r] + jnp.sum(xc * xc, keepdims=True)
        inv = [jax.lax.rsqrt(v / k + eps) for v in ss]

    acc = [jnp.zeros((t.block_n,), f32) for _ in range(rows)]
    for c in range(n_chunks):
        s = pl.ds(c * t.chunk, t.chunk)
        if has_norm:
            g = g_ref[s].astype(f32)
        w = (w_ref[cols, s] if transposed else w_ref[s, cols]).astype(f32)
        for r in range(rows):
            xr = x_slice(c, r)
            if has_norm:
                xr = (xr.astype(f32) * inv[r] * g).astype(x_dtype)
            xr = xr.astype(w_dtype).astype(f32)
            if transposed:  # w: [block_n, chunk]
                acc[r] = acc[r] + jnp.sum(w * xr[None, :], axis=1)
            else:  # w: [chunk, block_n]
                acc[r] = acc[r] + jnp.sum(w * xr[:, None], axis=0)
    for r in range(rows):
        y = acc[r].astype(w_dtype)
        if has_residual:
            y = r_ref[r, cols] + y
        o_ref[r, cols] = y.astype(o_ref.dtype)


def matvec(
    x: jax.Array,
    w: jax.Array,
    *,
    norm: jax.Array | None = None,
    eps: float = 0.0,
    swiglu: bool = False,
    residual: jax.Array | None = None,
    transposed: bool = False,
    tiles: Tiling | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """``prologue(x) @ w (+ residual)`` in one kernel.

    Args:
      x: float[..., K] (float[..., 2K] with ``swiglu``: gate then up), at most :data:`MAX_ROWS` rows.
      w: [K, N], or [N, K] if ``transposed`` (each output's weights contiguous).
      norm: float[K]: RMSNorm x first (with ``eps``), as ``fastblt.model.layers.rms_norm``.
      swiglu: the input is ``[gate | up]`` and the product reads ``silu(gate) * up``.
      residual: float[..., N], added to the product.
      tiles: the tiling (default: :func:`tiling`'s).
      interpret: run the kernel in Pallas' interpreter (default: on CPU, where there is no Triton).
    Returns: [..., N] in the product's dtype (w's), or the residual's promoted with it.
    """
    k, n = w.shape[::-1] if transposed else w.shape
    lead = x.shape[:-1]
    if x.shape[-1] != (2 * k if swiglu else k):
        raise ValueError(f"matvec: input width {x.shape[-1]} does not fit a [{k}, {n}] matrix")
    rows = 1
    for d in lead:
        rows *= d
    t = tiles or tiling(rows, k, n, transposed)
    if t is None:
        raise ValueError(f"matvec: no tiling for {rows} rows x [{k}, {n}]; check tiling() first")
    padded = _pow2_ceil(rows)
    pad = lambda a: jnp.pad(a, ((0, padded - rows), (0, 0))) if padded > rows else a  # noqa: E731
    args = [pad(x.reshape(rows, -1))]
    if norm is not None:
        args.append(norm)
    args.append(w)
    out_dtype = w.dtype
    if residual is not None:
        args.append(pad(residual.reshape(rows, n)))
        out_dtype = jnp.result_type(residual.dtype, w.dtype)
    kernel = functools.partial(
        _kernel,
        k=k,
        t=t,
        eps=eps,
        has_norm=norm is not None,
        swiglu=swiglu,
        has_residual=residual is not None,
        transposed=transposed,
    )
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    params = None
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        params = plgpu.CompilerParams(num_warps=t.warps, num_stages=1)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((padded, n), out_dtype),
        grid=(n // t.block_n,),
        compiler_params=params,
        interpret=interpret,
        name="decode_matvec",
    )(*args)
    return out[:rows].reshape(*lead, n)


def fits(rows: int, w: jax.Array, transposed: bool = False) -> bool:
    """Whether :func:`matvec` takes a product of ``rows`` rows with ``w`` (a tiling for its shape)."""
    k, n = w.shape[::-1] if transposed else w.shape
    return tiling(rows, k, n, transposed) is not None
