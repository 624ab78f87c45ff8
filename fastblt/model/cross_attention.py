"""The model's two cross-attentions between bytes and patches.

* The encoder's (:func:`segment_attention`): each patch's k slot queries attend the bytes of their
  patch, one run of rows (patch ids are sorted along a row).
* The decoder's (:func:`latent_attention`): each byte row attends the k slots of the one patch it
  reads.

Each has an XLA reference form (segment maxima and sums; gathered slots), and both are key ranges that
fastblt.model.range_attention can read in place on a GPU (:data:`GPU_CROSS_RANGES`, decided by
fastblt.model.attention.range_kernel_applies like every other attention call).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fastblt.model import range_attention
from fastblt.model.attention import range_kernel_applies, resolve_impl
from fastblt.model.lookup import take_rows_batched


def segment_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, impl: str = "xla"
) -> jax.Array:
    """Each group of queries attends exactly the keys of its own segment (the encoder's patch
    slots over their patch's bytes), in memory linear in the number of keys.

    Args:
      q: float[batch, segments, slots, heads, head_dim] (slots of segment s query segment s).
      k, v: float[batch, len, heads, head_dim]; segment_ids: int32[batch, len] in [0, segments),
        non-decreasing along each row (patch ids are).
      impl: the attention core's kernel; with :data:`GPU_CROSS_RANGES`, where it resolves to a fused
        kernel in a GPU step on one device, the range kernel runs the call (:func:`segment_ranges`);
        otherwise segment maxima and sums (the reference, below).

    Returns: float[batch, segments, slots, heads, head_dim]; a segment without keys gives 0.
    """
    b, p, kk, h, d = q.shape
    if _cross_ranges(impl, jax.ShapeDtypeStruct((b, p * kk, h, d), q.dtype), k):
        return segment_ranges(q, k, v, segment_ids)
    # Segment ids are a row's patch ids: sorted, so the scatters may assume it and the query
    # gather's gradient sums runs of equal ids (fastblt.model.lookup) instead of colliding.
    seg = lambda x, i: jax.ops.segment_max(x, i, num_segments=p, indices_are_sorted=True)  # noqa: E731
    ssum = lambda x, i: jax.ops.segment_sum(x, i, num_segments=p, indices_are_sorted=True)  # noqa: E731
    take = jax.vmap(lambda a, i: a[i])
    qg = take_rows_batched(q, segment_ids, ids_sorted=True)  # [b, len, slots, heads, hd]
    logits = jnp.einsum("bnshd,bnhd->bnsh", qg, k, preferred_element_type=jnp.float32) * (d**-0.5)
    top = jax.lax.stop_gradient(jax.vmap(seg)(logits, segment_ids))  # [b, p, slots, heads]
    e = jnp.exp(logits - take(top, segment_ids))
    denom = jax.vmap(ssum)(e, segment_ids)
    num = jax.vmap(ssum)(e[..., None] * v[:, :, None].astype(jnp.float32), segment_ids)
    out = jnp.where(denom[..., None] > 0, num / jnp.where(denom > 0, denom, 1.0)[..., None], 0.0)
    return out.astype(q.dtype)


def segment_ranges(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, interpret: bool | None = None
) -> jax.Array:
    """:func:`segment_attention` on the key-range kernel: segment s's keys are the run of rows whose
    id is s, [first row with id >= s, first row with id > s), found by binary search. Exact for ids
    sorted along each row and in [0, segments), as patch ids are (the reference assumes both).
    Shapes as segment_attention."""
    b, p, kk, h, d = q.shape
    ids = jnp.arange(p, dtype=segment_ids.dtype)
    bounds = jax.vmap(lambda row: jnp.searchsorted(row, jnp.stack([ids, ids + 1]), side="left"))(segment_ids)
    lo, hi = (jnp.repeat(x.astype(jnp.int32), kk, axis=-1) for x in (bounds[:, 0], bounds[:, 1]))  # [b, p*kk]
    out, _ = range_attention.range_attention(q.reshape(b, p * kk, h, d), k, v, lo, hi, interpret=interpret)
    return out.reshape(b, p, kk, h, d)


def gathered_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Attention of each query over its own key set (all visible).

    Args:
      q: float[batch, q_len, heads, head_dim].
      k, v: float[batch, q_len, n_keys, heads, head_dim]: the keys of query t are k[:, t].

    Returns:
      float[batch, q_len, heads, head_dim].
    """
    d = q.shape[-1]
    logits = jnp.einsum("bthd,btshd->bths", q, k, preferred_element_type=jnp.float32) * (d**-0.5)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bths,btshd->bthd", probs, v).astype(q.dtype)


# Query rows of the tile by which :func:`_cross_ranges` asks which kernel the attention core resolves
# to: a training call's tile (attention.AUTO_MIN_QUERIES or more), not a decode step's few queries.
LATENT_BLOCK_ROWS = 64

# Whether the cross-attentions run on the key-range kernel (fastblt.model.range_attention) in a GPU
# step on one device, where the attention core resolves to a fused kernel. Both are key ranges: in the
# decoder (:func:`latent_attention`) a byte row reads the k slots of its patch, slots [index * k,
# index * k + k) of the slots laid end to end; in the encoder (:func:`segment_attention`) a patch's
# slots read the bytes of their patch, one run of rows. The kernel reads them where they lie, with
# a gradient written per key tile: no gathers, segment maxima, sums or scatters. The decoder's
# gathered form reads ~0.27 GB of gathered keys and values per layer at blt_mid; with its projections
# it was 7.7 ms of the 76.8 ms of kernels of a plain step, the encoder's 1.6 ms (train_speed.md, run
# 9). On since train_speed.md run 10 (one H100, blt_mid, range_check.py): forward plus backward 1.56 ->
# 0.83 ms (decoder) and 1.29 -> 0.92 ms (encoder); with GPU_RANGE_KERNEL the plain step 87.6 / 83.6 ->
# 80.6 / 80.1 ms in two pairs.
GPU_CROSS_RANGES = True


def _cross_ranges(
    impl: str, q: jax.Array | jax.ShapeDtypeStruct, k: jax.Array | jax.ShapeDtypeStruct
) -> bool:
    """Whether a cross-attention call runs on the range kernel: the kernel its 64-row tiles resolve
    to, under GPU_CROSS_RANGES (attention.range_kernel_applies decides). q: [b, rows, heads, head_dim]
    (the call's query layout), k: [b, keys, heads, head_dim]."""
    tile = jax.ShapeDtypeStruct((q.shape[0], LATENT_BLOCK_ROWS, *q.shape[2:]), q.dtype)
    return range_kernel_applies(GPU_CROSS_RANGES, resolve_impl(impl, tile), q, k)


def latent_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, index: jax.Array, impl: str = "xla"
) -> jax.Array:
    """The decoder's cross-attention: each row attends the k slots of the one patch it reads.

    Args:
      q: float[batch, len, heads, head_dim]; k, v: float[batch, patches, k, heads, head_dim], each
        patch's slot keys and values; index: int32[batch, len], the patch each row reads
        (fastblt.model.patcher.latent_index): non-decreasing along a row, by at most one per row.
      impl: the attention core's kernel. Where it resolves to a fused kernel: with
        :data:`GPU_CROSS_RANGES` (a GPU step on one device) each row reads its slots as a key range
        on the range kernel (:func:`latent_ranges`). Otherwise each row's k keys are gathered
        (:func:`gathered_attention`, the reference).

    Returns: float[batch, len, heads, head_dim].
    """
    if _cross_ranges(impl, q, jax.ShapeDtypeStruct((k.shape[0], k.shape[1], *k.shape[3:]), k.dtype)):
        return latent_ranges(q, k, v, index)
    # Bytes read their patch's slots in order: the gather's gradient sums runs of equal ids.
    k_rows = take_rows_batched(k, index, ids_sorted=True)
    v_rows = take_rows_batched(v, index, ids_sorted=True)
    return gathered_attention(q, k_rows, v_rows)


def latent_ranges(
    q: jax.Array, k: jax.Array, v: jax.Array, index: jax.Array, interpret: bool | None = None
) -> jax.Array:
    """:func:`latent_attention` on the key-range kernel: the patches' slots laid end to end
    ([batch, patches * k, heads, head_dim], a free reshape) and row t reading slots
    ``index[t] * k`` to ``index[t] * k + k``. Exact for any index in range. Shapes as latent_attention."""
    b, p, kk, h, d = k.shape
    lo = index.astype(jnp.int32) * kk
    out, _ = range_attention.range_attention(
        q, k.reshape(b, p * kk, h, d), v.reshape(b, p * kk, h, d), lo, lo + kk, interpret=interpret
    )
    return out
