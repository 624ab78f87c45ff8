"""RMSNorm as one Pallas (Triton) kernel per direction, for training-sized calls on a GPU.

XLA runs a training step's RMSNorm as two kernels forward (a row reduction with the residual add, then
the scaling), near the copy rate, and two or three backward, which make about ten passes over each
tensor: 4.5 of the 76.8 ms of kernels in a blt_mid step on one H200 (experiments/results/train_speed.md,
run 9). Here the forward reads x once and writes y and each row's 1/rms; the backward reads x, dy and
1/rms once and writes dx and one partial sum of the scale's gradient per program.

The Pallas call is compiled for the GPU whenever JAX's backend is one and interpreted otherwise
(``interpret``), as fastblt.model.decode_attention does.

The arithmetic is the reference's (fastblt.model.layers.rms_norm): float32 inside,
``x * rsqrt(mean(x^2) + eps)`` then ``* scale``, cast to x's dtype; only the order of the row sums
differs. :func:`supported` says which calls qualify; fastblt.model.layers decides whether to use it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

MAX_ROWS = 16
# Elements of one program's tile: with 8 warps, 32 float32 values per thread for each of the
# backward's ~5 live [rows, D] tiles stay in registers.
TILE = 8192
MAX_DIM = 4096
NUM_WARPS = 8
# The backward's programs walk up to MAX_TILES tiles each, keeping at least MIN_PROGRAMS programs (~8 per
# SM, so that each SM still holds several at once): one tile per program wrote a float32 partial of the
# scale's gradient per 2-8 rows, as large as x itself at BLT-1B's global width.
MAX_TILES = 8
MIN_PROGRAMS = 1024


def block_rows(n: int, d: int, tile: int = TILE) -> int:
    """Rows per program for ``n`` rows of ``d``: the largest power of two up to MAX_ROWS and
    tile // d that divides n."""
    r = max(min(MAX_ROWS, tile // d), 1)
    while r > 1 and n % r:
        r //= 2
    return r


def supported(x: jax.Array) -> bool:
    """Whether the kernel takes x: float[..., D] with D a power of two (Triton's block shapes) in
    [16, MAX_DIM] and its rows in blocks of at least 2."""
    d = x.shape[-1] if x.ndim else 0
    n = x.size // d if d else 0
    return (
        x.dtype in (jnp.bfloat16, jnp.float16, jnp.float32)
        and 16 <= d <= MAX_DIM
        and d & (d - 1) == 0
        and n > 0
        and block_rows(n, d) >= 2
    )


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, interpret: bool | None = None) -> jax.Array:
    """RMSNorm of x: float[..., D] with scale float[D] (:func:`supported` shapes): x's dtype out.

    interpret: Pallas interpret mode (None: unless JAX's backend is a GPU, so CPU tests can trace a
    model for a GPU and still run the kernel).
    """
    if not supported(x):
        raise ValueError(
            f"norm_kernel.rms_norm takes a power-of-two width in [16, {MAX_DIM}] and rows in blocks of 2 or "
            f"more; got {x.dtype}{list(x.shape)}: use fastblt.model.layers.rms_norm, which falls back to XLA"
        )
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    d = x.shape[-1]
    y = _norm(x.reshape(-1, d), scale, float(eps), bool(interpret))
    return y.reshape(x.shape)


def _params(interpret: bool) -> dict:
    return {} if interpret else {"compiler_params": plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1)}


def _fwd_kernel(x_ref, s_ref, y_ref, r_ref, *, eps):
    x = x_ref[...].astype(jnp.float32)  # [R, D]
    r = jax.lax.rsqrt(jnp.mean(x * x, axis=1) + eps)  # [R]
    y_ref[...] = (x * r[:, None] * s_ref[...].astype(jnp.float32)[None, :]).astype(y_ref.dtype)
    r_ref[...] = r


def _bwd_kernel(x_ref, s_ref, r_ref, *refs, parts: int, residual: bool, rows: int):
    # refs: the output gradient's `parts` summands, the residual gradient if `residual`, then dx, ds.
    # The program's block holds several tiles of `rows` rows; it walks them in turn and keeps the
    # scale's gradient summed in registers, so the partial sums it writes stay small.
    dx_ref, ds_ref = refs[-2:]
    grad_refs = refs[:-2]
    s = s_ref[...].astype(jnp.float32)[None, :]

    def tile(j, ds):
        at = pl.ds(pl.multiple_of(j * rows, rows), rows)
        x = x_ref[at, :].astype(jnp.float32)
        r = r_ref[at][:, None]
        dy = grad_refs[0][at, :].astype(jnp.float32)
        for part in grad_refs[1:parts]:
            dy = dy + part[at, :].astype(jnp.float32)
        xh = x * r
        g = dy * s
        # d/dx of x * rsqrt(mean(x^2) + eps): r * (g - xh * mean(xh * g)), per row.
        dx = r * (g - xh * jnp.mean(xh * g, axis=1)[:, None])
        if residual:
            dx = dx + grad_refs[parts][at, :].astype(jnp.float32)
        dx_ref[at, :] = dx.astype(dx_ref.dtype)
        return ds + jnp.sum(dy * xh, axis=0)

    tiles = x_ref.shape[0] // rows
    ds = jax.lax.fori_loop(0, tiles, tile, jnp.zeros((x_ref.shape[1],), jnp.float32))
    ds_ref[...] = ds[None, :]


def tiles_per_program(blocks: int) -> int:
    """Tiles of rows each backward program walks: the largest power of two up to MAX_TILES that divides
    ``blocks`` and leaves at least MIN_PROGRAMS programs (to fill the GPU)."""
    t = MAX_TILES
    while t > 1 and (blocks % t or blocks // t < MIN_PROGRAMS):
        t //= 2
    return t


def inverse_rms(x: jax.Array, eps: float) -> jax.Array:
    """Each row's ``rsqrt(mean(x^2) + eps)`` in float32: float[..., D] -> float32[...]."""
    x32 = x.astype(jnp.float32)
    return jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1) + eps)


def reference_norm(x: jax.Array, scale: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    """RMSNorm as XLA computes it (fastblt.model.layers.rms_norm's expression, the reference's
    arithmetic): ``(x * inverse_rms(x) * scale)`` in float32, cast to x's dtype, and the
    :func:`inverse_rms` float32[...] it used."""
    r = inverse_rms(x, eps)
    return (x.astype(jnp.float32) * r[..., None] * scale.astype(jnp.float32)).astype(x.dtype), r


def grad_parts(
    x: jax.Array,
    scale: jax.Array,
    r: jax.Array,
    dys: tuple[jax.Array, ...],
    d_residual: jax.Array | None = None,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """RMSNorm's backward in one pass where the output feeds several products and x also feeds a
    residual: reads x, each summand of the output's gradient and the residual's gradient once.

    Args:
      x: float[..., D] (:func:`supported` shapes); scale: float[D]; r: float32[...], :func:`inverse_rms`
      of x; dys: the summands of the norm output's gradient, each float[..., D] (one per product that
      reads the output: q, k and v); d_residual: float[..., D], x's gradient from elsewhere, added.
    Returns: (dx float[..., D] in x's dtype, dscale float[D] in scale's dtype).
    """
    grads = (*dys, *(() if d_residual is None else (d_residual,)))
    if not (supported(x) and dys and all(g.shape == x.shape for g in grads)):
        raise ValueError(
            f"norm_kernel.grad_parts takes x of a power-of-two width in [16, {MAX_DIM}] with rows in blocks "
            f"of 2 or more and one or more gradients of its shape; got x {x.dtype}{list(x.shape)}, "
            f"gradients {[list(g.shape) for g in grads]}"
        )
    if r.shape != x.shape[:-1] or r.dtype != jnp.float32:
        raise ValueError(
            f"norm_kernel.grad_parts takes r = inverse_rms(x): float32{list(x.shape[:-1])}; got {r.dtype}{list(r.shape)}"
        )
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    d = x.shape[-1]
    flat = [t.reshape(-1, d) for t in (x, *grads)]
    dx, ds = _backward(flat[0], scale, r.reshape(-1), tuple(flat[1:]), len(dys), bool(interpret))
    return dx.reshape(x.shape), ds


def _forward(x, scale, eps, interpret):
    n, d = x.shape
    rows = block_rows(n, d)
    y, r = pl.pallas_call(
        functools.partial(_fwd_kernel, eps=eps),
        grid=(n // rows,),
        in_specs=[pl.BlockSpec((rows, d), lambda i: (i, 0)), pl.BlockSpec((d,), lambda i: (0,))],
        out_specs=[pl.BlockSpec((rows, d), lambda i: (i, 0)), pl.BlockSpec((rows,), lambda i: (i,))],
        out_shape=[jax.ShapeDtypeStruct((n, d), x.dtype), jax.ShapeDtypeStruct((n,), jnp.float32)],
        interpret=interpret,
        name="fastblt_rms_norm",
        **_params(interpret),
    )(x, scale)
    return y, r


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _norm(x, scale, eps, interpret):
    return _forward(x, scale, eps, interpret)[0]


def _norm_fwd(x, scale, eps, interpret):
    y, r = _forward(x, scale, eps, interpret)
    return y, (x, scale, r)


def _norm_bwd(eps, interpret, res, dy):
    x, scale, r = res
    return _backward(x, scale, r, (dy,), 1, interpret)


def _backward(x, scale, r, grads, parts, interpret):
    """The backward kernel over x: [n, d]: ``grads`` holds the output gradient's ``parts`` summands,
    then the residual gradient if there is one more."""
    n, d = x.shape
    # Half the tile where more than one gradient comes in (up to three summands and the residual's),
    # so that the tiles each program holds stay in registers; at least 2 rows, as supported() checked.
    rows = block_rows(n, d, TILE if len(grads) == 1 else max(TILE // 2, 2 * d))
    span = rows * tiles_per_program(n // rows)
    row_block = pl.BlockSpec((span, d), lambda i: (i, 0))
    dx, ds = pl.pallas_call(
        functools.partial(_bwd_kernel, parts=parts, residual=len(grads) > parts, rows=rows),
        grid=(n // span,),
        in_specs=[
            row_block,
            pl.BlockSpec((d,), lambda i: (0,)),
            pl.BlockSpec((span,), lambda i: (i,)),
            *[row_block] * len(grads),
        ],
        out_specs=[row_block, pl.BlockSpec((1, d), lambda i: (i, 0))],
        out_shape=[jax.ShapeDtypeStruct((n, d), x.dtype), jax.ShapeDtypeStruct((n // span, d), jnp.float32)],
        interpret=interpret,
        name="fastblt_rms_norm_bwd",
        **_params(interpret),
    )(x, scale, r, *grads)
    return dx, jnp.sum(ds, axis=0).astype(scale.dtype)


_norm.defvjp(_norm_fwd, _norm_bwd)
