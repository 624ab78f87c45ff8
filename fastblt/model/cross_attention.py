"""The model's two cross-attentions between bytes and patches.

* The encoder's (:func:`segment_attention`): each patch's k slot queries attend the bytes of their
  patch, one run of rows (patch ids are sorted along a row).
* The decoder's (:func:`latent_attention`): each byte row attends the k slots of the one patch it
  reads.

Each has an XLA reference form (segment maxima and sums; gathered slots), and both are key ranges that
fastblt.model.range_attention can read in place on a GPU (:data:`GPU_CROSS_RANGES`, decided by
fastblt.model.attention.range_kernel_applies like every other attention call). The decoder's also has
a windowed form through the attention core (:data:`GPU_LATENT_WINDOWS`, measured slower, off).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fastblt.model import range_attention
from fastblt.model.attention import attention, range_kernel_applies, resolve_impl
from fastblt.model.lookup import take_rows_batched, take_windows_batched


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


# Rows per block of :func:`latent_attention`'s windowed form: patch ids rise by at most one per row,
# so R consecutive rows read at most R consecutive patches, and a block's keys are one window of the
# slots of R patches (R * k keys).
LATENT_BLOCK_ROWS = 64

# Whether :func:`latent_attention` runs its windowed form where the attention core resolves to a fused
# kernel (cuDNN on a GPU). The gathered form reads ~0.13 GB of gathered keys and as much of values per layer at
# blt_mid and spends its gradient in sorted-id sums and scatters: 7.7 ms of an 85 ms step in the
# decoder's cross-attention, 1.7 ms of it scatters (experiments/results/train_speed.md, run 7). Off:
# on one H100 the windows were slower (cross-attention 10.8 against 8.9 ms, the step 92.2 against
# 90.2 ms: cuDNN over 1 024 small windows with a bias, run 8; train_speed.py --latent-windows).
GPU_LATENT_WINDOWS = False

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
        on the range kernel (:func:`latent_ranges`); with :data:`GPU_LATENT_WINDOWS`, blocks of
        :data:`LATENT_BLOCK_ROWS` rows go through :func:`attention` over one window of slots each
        (:func:`latent_windows`). Otherwise each row's k keys are gathered
        (:func:`gathered_attention`, the reference).

    Returns: float[batch, len, heads, head_dim].
    """
    block_q = jax.ShapeDtypeStruct((q.shape[0], LATENT_BLOCK_ROWS, *q.shape[2:]), q.dtype)
    kernel = resolve_impl(impl, block_q)
    if _cross_ranges(impl, q, jax.ShapeDtypeStruct((k.shape[0], k.shape[1], *k.shape[3:]), k.dtype)):
        return latent_ranges(q, k, v, index)
    if GPU_LATENT_WINDOWS and kernel not in ("xla", "splash"):
        return latent_windows(q, k, v, index, LATENT_BLOCK_ROWS, kernel)
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


def latent_windows(
    q: jax.Array, k: jax.Array, v: jax.Array, index: jax.Array, block_rows: int, impl: str
) -> jax.Array:
    """:func:`latent_attention` as dense attention of row blocks over windows of patch slots.

    A block of R = ``block_rows`` rows starting at patch s reads patches s .. s + R - 1 at most: its
    keys are those patches' R * k slots (one window of consecutive slots, read without a gather and
    with a scatter-free gradient: fastblt.model.lookup.take_windows), and each row sees the k of
    its own patch. Exact where the index rises by at most one per row; elsewhere the output is NaN,
    so a loss fails loudly instead of reading the wrong slots. Shapes as latent_attention.
    """
    b, t, h, d = q.shape
    p, kk = k.shape[1], k.shape[2]
    r = block_rows
    nb = -(-t // r)
    index = jnp.pad(index.astype(jnp.int32), ((0, 0), (0, nb * r - t)), mode="edge")
    start = index[:, ::r]  # [b, nb]: the first row's patch
    local = index.reshape(b, nb, r) - start[..., None]  # [b, nb, r]: patch within the window
    fits = jnp.all((local >= 0) & (local < r))
    # Keys padded by one window at the end, so no window is clamped to the array.
    pad = ((0, 0), (0, r * kk), (0, 0), (0, 0))

    def windows(x):
        x = jnp.pad(x.reshape(b, p * kk, h, d), pad)
        return take_windows_batched(x, start * kk, r * kk).reshape(b * nb, r * kk, h, d)

    visible = local[..., None] == (jnp.arange(r * kk, dtype=jnp.int32) // kk)  # [b, nb, r, r * kk]
    qb = jnp.pad(q, ((0, 0), (0, nb * r - t), (0, 0), (0, 0))).reshape(b * nb, r, h, d)
    out = attention(qb, windows(k), windows(v), visible.reshape(b * nb, r, r * kk), impl)
    out = out.reshape(b, nb * r, h, d)[:, :t]
    return jnp.where(fits, out, jnp.nan).astype(q.dtype)
