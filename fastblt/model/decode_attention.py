"""Decode-step attention in one kernel: a few queries over a key cache (Pallas, Triton on GPU).

A decode step's attention on the XLA path is about seven kernels per layer: the score product, the
mask select, max, sum, normalisation, a conversion and the value product (generate_speed.md, run 8),
~10 us per layer and step at batch 1; at batch 32 XLA runs one-query products as reduction fusions.
Here one program per (batch row, kv head, key split) reads its keys and values straight from the
cache layout ``[B, N, KV, hd]`` in blocks of ``block_k``, keeps the scores in registers and folds
them into an online softmax (flash decoding), so a layer's attention is one launch (two with key
splits: the splits' partial results are combined by XLA).

Key blocks that no query of the program sees are skipped before their keys are read: a decode mask
is a window or a causal prefix of the buffer, so a long buffer (the global model's patch slots at a
16 000-byte prompt: ~4 000 of 16 193 used) costs what its visible keys cost.

Numerics follow the XLA path (float32 scores and softmax statistics, probabilities in the values'
dtype for the value product, float32 accumulation); the softmax is normalised after the value
product (flash form) instead of before it, which moves bf16 results by rounding only. Off GPU the
kernel runs in Pallas interpret mode (the CPU tests' way of running it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Query rows of a program are padded to at least this many (Triton's dot needs 16 on each side).
MIN_ROWS = 16
# Keys per block, and the fewest keys a split is given: splits only where there are too few
# (row, kv head) programs to fill the GPU (132 multiprocessors on an H100/H200).
BLOCK_K = 128
MIN_SPLIT_KEYS = 512
TARGET_PROGRAMS = 128
_NEG = -1e30  # finite, as fastblt.model.attention's


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def supported(q: jax.Array) -> bool:
    """Whether the kernel takes queries float[B, T, H, hd] of this head dim and dtype: a power of
    two of 16..256 (Triton's loads are powers of two) and a floating dtype."""
    d = q.shape[-1]
    return 16 <= d <= 256 and d == _pow2(d) and jnp.issubdtype(q.dtype, jnp.floating)


def key_splits(programs: int, n: int, block_k: int = BLOCK_K) -> int:
    """Splits of the keys: enough for ~``TARGET_PROGRAMS`` programs, none under ``MIN_SPLIT_KEYS``
    keys, each a whole number of blocks. programs: B * KV; n: keys."""
    splits = min(max(1, n // MIN_SPLIT_KEYS), max(1, TARGET_PROGRAMS // programs))
    return _ceil(n, _ceil(_ceil(n, splits), block_k) * block_k)  # splits of whole blocks that hold n


def _kernel(q_ref, k_ref, v_ref, m_ref, *out_refs, n: int, per_split: int, block_k: int, scale: float):
    """One (row, kv head, split): q_ref [R, hd], k_ref/v_ref [N, hd], m_ref int8[R, N] (1 = visible).
    Outputs: o [R, hd] (normalised, when there is one split), or o [R, hd] float32 unnormalised with
    the softmax max [R] and sum [R] (several splits)."""
    r = q_ref.shape[0]
    split = pl.program_id(2)
    first = split * per_split
    q = q_ref[...]

    def body(i, carry):
        o, mx, den = carry
        start = first + i * block_k
        in_range = start + jnp.arange(block_k) < n
        seen = plgpu.load(m_ref.at[:, pl.ds(start, block_k)], mask=in_range[None, :], other=0)
        vis = seen != 0

        def update():
            k = plgpu.load(k_ref.at[pl.ds(start, block_k), :], mask=in_range[:, None], other=0)
            v = plgpu.load(v_ref.at[pl.ds(start, block_k), :], mask=in_range[:, None], other=0)
            s = plgpu.dot(q, k, trans_b=True).astype(jnp.float32) * scale  # [R, block_k]
            s = jnp.where(vis, s, _NEG)
            new_mx = jnp.maximum(mx, jnp.max(s, axis=1))
            p = jnp.where(vis, jnp.exp(s - new_mx[:, None]), 0.0)
            fix = jnp.exp(mx - new_mx)
            o_new = o * fix[:, None] + plgpu.dot(p.astype(v.dtype), v).astype(jnp.float32)
            return o_new, new_mx, den * fix + jnp.sum(p, axis=1)

        # Skip a block no query sees before reading its keys (Triton has no "any": max of 0/1).
        return jax.lax.cond(jnp.max(seen.astype(jnp.int32)) > 0, update, lambda: (o, mx, den))

    init = (
        jnp.zeros((r, q.shape[1]), jnp.float32),
        jnp.full((r,), _NEG, jnp.float32),
        jnp.zeros((r,), jnp.float32),
    )
    o, mx, den = jax.lax.fori_loop(0, per_split // block_k, body, init)
    if len(out_refs) == 1:  # one split: finish here (a row with no visible key gives 0)
        out_refs[0][...] = jnp.where(den[:, None] > 0, o / jnp.where(den > 0, den, 1.0)[:, None], 0.0).astype(
            out_refs[0].dtype
        )
    else:
        o_ref, mx_ref, den_ref = out_refs
        o_ref[...] = o
        mx_ref[...] = mx
        den_ref[...] = den


def decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    *,
    block_k: int = BLOCK_K,
    splits: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Attention of a few queries per row over a key cache, under a dense mask, in one kernel.

    Args:
      q: float[B, T, H, hd] (T small: a decode step's new bytes).
      k, v: float[B, N, KV, hd], the cache as the sampler keeps it; KV divides H.
      mask: bool[B, T, N] (True = visible).
      block_k: keys per block (a power of two >= 16).
      splits: key splits (None: :func:`key_splits`).
      interpret: run in Pallas interpret mode (None: off GPU).

    Returns:
      float[B, T, H, hd] in q's dtype; a query with no visible key gives 0.
    """
    b, t, h, d = q.shape
    n, kv = k.shape[1], k.shape[2]
    if not supported(q) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"decode_attention takes a power-of-two head dim of 16..256 and one float dtype, got {q.shape} {q.dtype} / {k.dtype}"
        )
    if mask.shape != (b, t, n):
        raise ValueError(f"mask must be bool[{b}, {t}, {n}], got {mask.shape}")
    if block_k < 16 or block_k != _pow2(block_k):
        raise ValueError(f"block_k must be a power of two >= 16, got {block_k}")
    g = h // kv
    rows = max(MIN_ROWS, _pow2(t * g))
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    if splits is None:
        splits = key_splits(b * kv, n, block_k)
    per_split = _ceil(_ceil(n, splits), block_k) * block_k  # keys per split, whole blocks

    # Rows of a program: (query, head of the group), then zero rows up to a power of two.
    qr = q.reshape(b, t, kv, g, d).transpose(0, 2, 1, 3, 4).reshape(b, kv, t * g, d)
    qr = jnp.pad(qr, ((0, 0), (0, 0), (0, rows - t * g), (0, 0)))
    mr = jnp.repeat(mask, g, axis=1).astype(jnp.int8)
    mr = jnp.pad(mr, ((0, 0), (0, rows - t * g), (0, 0)))

    one = splits == 1
    if one:  # the kernel writes the normalised output
        out_shape = [jax.ShapeDtypeStruct((b, kv, rows, d), q.dtype)]
        out_specs = [pl.BlockSpec((None, None, rows, d), lambda i, j, s: (i, j, 0, 0))]
    else:  # each split writes its unnormalised output, softmax max and sum; XLA combines them
        stats = jax.ShapeDtypeStruct((splits, b, kv, rows), jnp.float32)
        out_shape = [jax.ShapeDtypeStruct((splits, b, kv, rows, d), jnp.float32), stats, stats]
        stats_spec = pl.BlockSpec((None, None, None, rows), lambda i, j, s: (s, i, j, 0))
        out_specs = [
            pl.BlockSpec((None, None, None, rows, d), lambda i, j, s: (s, i, j, 0, 0)),
            stats_spec,
            stats_spec,
        ]
    kernel = functools.partial(_kernel, n=n, per_split=per_split, block_k=block_k, scale=d**-0.5)
    params = {} if interpret else {"compiler_params": plgpu.CompilerParams(num_warps=4, num_stages=2)}
    outs = pl.pallas_call(
        kernel,
        grid=(b, kv, splits),
        in_specs=[
            pl.BlockSpec((None, None, rows, d), lambda i, j, s: (i, j, 0, 0)),
            pl.BlockSpec((None, n, None, d), lambda i, j, s: (i, 0, j, 0)),
            pl.BlockSpec((None, n, None, d), lambda i, j, s: (i, 0, j, 0)),
            pl.BlockSpec((None, rows, n), lambda i, j, s: (i, 0, 0)),
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=interpret,
        name="fastblt_decode_attention",
        **params,
    )(qr, k, v, mr)
    if one:
        o = outs[0]
    else:
        o, mx, den = outs
        top = jnp.max(mx, axis=0)
        w = jnp.exp(mx - top)  # [S, b, kv, rows]
        total = jnp.sum(den * w, axis=0)
        o = jnp.sum(o * w[..., None], axis=0)
        o = jnp.where(total[..., None] > 0, o / jnp.where(total > 0, total, 1.0)[..., None], 0.0)
    o = o[:, :, : t * g].reshape(b, kv, t, g, d).transpose(0, 2, 1, 3, 4).reshape(b, t, h, d)
    return o.astype(q.dtype)
