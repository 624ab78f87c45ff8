"""The encoder's max-pool of each patch's bytes as one Pallas (Triton) kernel, for training on a GPU.

``segment_max`` over the bytes of each patch is a scatter-max, and its derivative adds a second
scatter that counts each patch's ties with the maximum (to split the gradient among them); XLA runs
both with atomics over every element of the byte states: 0.28 + 0.32 ms of a blt_mid step on one
H200, plus 0.19 ms of gathers in the backward (experiments/results/train_speed.md, run 11's kernels).
A patch's bytes are one run of rows (patch ids never decrease along a row), so here one program per
patch reads its run once, up to 16 rows per step (an entropy patch may be hundreds of bytes long,
and the longest patch bounds the kernel's time), and writes the maximum and the count of bytes that
reach it, column by column; the backward is one elementwise pass that hands each patch's gradient to
its maximal bytes, split evenly among ties, as JAX's own derivative of ``segment_max`` does.

The Pallas call is compiled for the GPU whenever JAX's backend is one and interpreted otherwise
(``interpret``), as fastblt.model.norm_kernel does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

MAX_DIM = 4096
NUM_WARPS = 4
CHUNK_ELEMENTS = 8192  # elements a step of the loop holds: 64 float32 per thread with 4 warps


def supported(h: jax.Array) -> bool:
    """Whether the kernel takes h: float[B, N, D] with D a power of two (Triton's block shapes) in
    [16, MAX_DIM]."""
    d = h.shape[-1] if h.ndim == 3 else 0
    return h.dtype in (jnp.bfloat16, jnp.float16, jnp.float32) and 16 <= d <= MAX_DIM and d & (d - 1) == 0


def patch_runs(patch_ids: jax.Array, num_patches: int) -> tuple[jax.Array, jax.Array]:
    """Each patch's run of rows [start, end): int32[B, P] each (start = end for a patch without bytes).
    patch_ids: int32[B, N], non-decreasing along each row."""
    patches = jnp.arange(num_patches, dtype=patch_ids.dtype)

    def runs(ids):
        start = jnp.searchsorted(ids, patches, side="left", method="scan_unrolled")
        return start, jnp.searchsorted(ids, patches, side="right", method="scan_unrolled")

    start, end = jax.vmap(runs)(patch_ids)
    return start.astype(jnp.int32), end.astype(jnp.int32)


def patch_max_pool(
    h: jax.Array, patch_ids: jax.Array, num_patches: int, interpret: bool | None = None
) -> jax.Array:
    """Max over the bytes of each patch, 0 for a patch without bytes: fastblt.model.blt.patch_max_pool's
    values and gradient (:func:`supported` shapes).

    Args: h: float[B, N, D]; patch_ids: int32[B, N], non-decreasing along each row (the patcher's);
      num_patches: P; interpret: Pallas interpret mode (None: unless JAX's backend is a GPU).
    Returns float[B, P, D] in h's dtype.
    """
    if not supported(h):
        raise ValueError(
            f"pool_kernel.patch_max_pool takes h: float[B, N, D] with D a power of two in [16, {MAX_DIM}]; "
            f"got {h.dtype}{list(h.shape)}: use fastblt.model.blt.patch_max_pool, which falls back to XLA"
        )
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    start, end = patch_runs(patch_ids.astype(jnp.int32), num_patches)
    return _pool(h, patch_ids.astype(jnp.int32), start, end, bool(interpret))


def chunk_rows(n: int, d: int) -> int:
    """Rows each step of the kernel's loop reads: a power of two up to 16, at most CHUNK_ELEMENTS // d
    elements per step (registers) and at most n."""
    rows = max(1, min(16, CHUNK_ELEMENTS // d, n))
    return 1 << (rows.bit_length() - 1)


def _kernel(start_ref, end_ref, h_ref, out_ref, ties_ref):
    n, d = h_ref.shape
    r = chunk_rows(n, d)
    start, end = start_ref[...], end_ref[...]

    # A step reads r rows at once, so a long patch costs one memory round trip per r bytes rather
    # than per byte. The last steps' reads are moved back to end inside the row (as a clamped slice
    # would be in interpret mode, so both modes read the same rows); rows outside [i, end) are masked.
    def step(k, carry):
        top, ties = carry
        i = start + k * r
        at = jnp.minimum(i, n - r)
        x = h_ref[pl.ds(at, r), :].astype(jnp.float32)
        rows = at + jax.lax.broadcasted_iota(jnp.int32, (r, d), 0)
        valid = (rows >= i) & (rows < end)
        x = jnp.where(valid, x, -jnp.inf)
        best = jnp.max(x, axis=0)
        hits = jnp.sum((valid & (x == best[None, :])).astype(jnp.int32), axis=0)
        new_top = jnp.maximum(top, best)
        ties = jnp.where(top == new_top, ties, 0) + jnp.where(best == new_top, hits, 0)
        return new_top, ties

    top, ties = jax.lax.fori_loop(
        0,
        (end - start + r - 1) // r,
        step,
        (jnp.full((d,), -jnp.inf, jnp.float32), jnp.zeros((d,), jnp.int32)),
    )
    out_ref[...] = jnp.where(ties > 0, top, 0.0).astype(out_ref.dtype)
    ties_ref[...] = ties


def _forward(h, start, end, interpret):
    b, n, d = h.shape
    p = start.shape[1]
    scalar = pl.BlockSpec((None, None), lambda i, j: (i, j))
    patch = pl.BlockSpec((None, None, d), lambda i, j: (i, j, 0))
    params = {} if interpret else {"compiler_params": plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1)}
    return pl.pallas_call(
        _kernel,
        grid=(b, p),
        in_specs=[scalar, scalar, pl.BlockSpec((None, n, d), lambda i, j: (i, 0, 0))],
        out_specs=[patch, patch],
        out_shape=[jax.ShapeDtypeStruct((b, p, d), h.dtype), jax.ShapeDtypeStruct((b, p, d), jnp.int32)],
        interpret=interpret,
        name="fastblt_patch_max_pool",
        **params,
    )(start, end, h)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _pool(h, patch_ids, start, end, interpret):
    return _forward(h, start, end, interpret)[0]


def _pool_fwd(h, patch_ids, start, end, interpret):
    pooled, ties = _forward(h, start, end, interpret)
    return pooled, (h, patch_ids, pooled, ties)


def _pool_bwd(interpret, res, g):
    h, patch_ids, pooled, ties = res
    take = jax.vmap(lambda x, i: x[i])  # [B, P, D] by [B, N] -> [B, N, D]
    share = g.astype(jnp.float32) / jnp.maximum(ties, 1).astype(jnp.float32)
    hit = (h == take(pooled, patch_ids)) & (take(ties, patch_ids) > 0)
    dh = jnp.where(hit, take(share, patch_ids), 0.0).astype(h.dtype)
    return dh, None, None, None


_pool.defvjp(_pool_fwd, _pool_bwd)
