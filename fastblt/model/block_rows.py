"""BLT-D's block rows: what they are (:class:`DecoderBlocks`, :class:`BlockRows`) and their attention
(:func:`block_attention`), for the decoder layers that run them beside the clean rows (Fast BLT, §3.2.2).

Shapes: b batch, N clean bytes, P patch slots, K blocks (K = P - 1 in training: one per patch after
the BOS patch), B cells per block, R = K * B block rows, C the context width, D = D_d, H heads.

Decoder input rows (the paper's D_0 = Embed([x ; x_block^t])):

* clean row t: the encoder's byte state h_enc[t], as in BLT (the decoder has no token embedding);
* block cell showing its byte x: ``local_encoder.tok_embeddings[x]`` alone. The encoder state of
  that byte, or its hash n-gram embeddings, would mix in the bytes before it, which may be masked
  cells of the same block (a leak), so only the byte's own embedding is used;
* block cell showing [MASK] (and a padding cell, which nobody attends): the learned vector
  ``local_decoder.mask_embedding`` (created when ``model.mask_embedding`` is on).

Each decoder layer (fastblt.model.layers.TransformerBlock) runs the clean rows as BLT does (so clean
logits are BLT's logits) and, given :class:`BlockRows`, the block rows through the same layer function
(fastblt.model.layers.transformer_layer) and weights, with :meth:`BlockRows.attention`: the clean
rows' keys and values of that layer are extra context; a block row attends the clean
keys of its block's context window that ``context_mask`` allows, plus the cells of its own block
that ``self_mask`` allows. The clean stream never reads the block stream.

Memory and compute (per example): the block rows add R * D activations per decoder layer and a
bool[K, B, C] context mask (C = decoder.window - 1 in training). On the XLA kernel their attention
costs R * (C + B) scores per head, not R * N, and holds the gathered keys and scores of one chunk of
blocks at a time, forward and backward (recomputed per chunk under ``jax.checkpoint``). Where the
attention impl resolves to a fused kernel and patches have a length bound, tiles of consecutive
blocks over one shared slice of clean keys go through the attention core in one call
(:func:`_tiles_in_one_call`), or, with :data:`GPU_RANGE_KERNEL`, the context of every cell as its
range of clean rows on the key-range kernel (:func:`ranged_block_attention`). See
fastblt/train/blt_d.py for numbers.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from fastblt.model import range_attention
from fastblt.model.attention import Attend, attention, range_kernel_applies, resolve_impl
from fastblt.model.lookup import take_windows_batched

_NEG = -1e30  # as fastblt.model.attention: finite, so an all-masked row stays finite


class DecoderBlocks(NamedTuple):
    """Corrupted blocks the decoder reads after the clean rows: K blocks of B cells each.

    Each block sees a window of C clean rows, ``context_start + 0 .. C - 1`` (indices outside the
    row must be masked), so attention costs K * B * C scores, not K * B * N.

    tokens: int32[b, K, B], byte id of each cell (ignored where ``masked``).
    masked: bool[b, K, B], the cell's input is [MASK] (also set it on padding cells).
    positions: int32[b, K, B], RoPE position of each cell (its byte's index in the row).
    read_patch: int32[b, K], patch whose global output the block's cells cross-attend.
    context_start: int32[b, K], first clean row of each block's context window.
    context_mask: bool[b, K, B, C], which rows of its block's window each cell attends.
    self_mask: bool[b, K, B, B], cells of its own block each cell attends ([.., query, key]).
    """

    tokens: jax.Array
    masked: jax.Array
    positions: jax.Array
    read_patch: jax.Array
    context_start: jax.Array
    context_mask: jax.Array
    self_mask: jax.Array


@flax.struct.dataclass
class BlockRows:
    """Block rows as a decoder layer carries them beside the clean rows (one layer's input).

    h: float[b, R, D] the rows' states; positions: int32[b, R] (RoPE); read_patch: int32[b, R], the
    patch whose slots each row cross-attends; context_start, context_mask, self_mask: as
    :class:`DecoderBlocks`. ``max_patch_length`` and ``chunk_blocks`` are static (see
    :func:`block_attention`).
    """

    h: jax.Array
    positions: jax.Array
    read_patch: jax.Array
    context_start: jax.Array
    context_mask: jax.Array
    self_mask: jax.Array
    max_patch_length: int | None = flax.struct.field(pytree_node=False, default=None)
    chunk_blocks: int | None = flax.struct.field(pytree_node=False, default=None)

    def attention(self, k_ctx: jax.Array, v_ctx: jax.Array, impl: str) -> Attend:
        """The rows' attention in a layer (fastblt.model.attention.Attend): their queries, keys and
        values [b, R, ...] over the clean rows' keys and values of the same layer [b, N, ...]
        (``k_ctx``, ``v_ctx``: extra context, never written) and their own blocks; no aux."""

        def attend(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, None]:
            out = block_attention(
                q,
                k,
                v,
                k_ctx,
                v_ctx,
                self.context_start,
                self.context_mask,
                self.self_mask,
                self.chunk_blocks,
                self.max_patch_length,
                impl,
            )
            return out, None

        return attend


# Where block_attention would take a fused kernel on a GPU, run the block rows' context attention on
# fastblt.model.range_attention instead of tiles through the attention core: each cell's visible clean
# rows are one range [lo, hi), read in place (no key windows cut per tile, no dense mask, ~0.6x the
# scores of a tile's span plus its cells), and its own block's cells are merged by log-sum-exp. On
# since train_speed.md run 10 (one H100, BLT-D-4 at blt_mid, with GPU_CROSS_RANGES): one layer's block
# attention 4.70 -> 3.53 ms forward plus backward (range_check.py), the step 126.0 -> 114.7 ms.
GPU_RANGE_KERNEL = True

# The own block's cells as the range kernel's second key set, in the context's softmax
# (ranged_block_attention), instead of XLA's products per block merged by log-sum-exp: those took 3.9 ms
# of products and ~2 ms of merge (elementwise, forward and backward) in BLT-D-4's 114.7 ms blt_mid step
# on one H200 (train_speed.md run 11). The kernel visits one more key tile per query tile instead (a
# tile of 64 block rows reads its 64 own cells) and runs a second dk/dv launch. On since run 14 (one
# H100, blt_mid, two pairs in one call): one decoder layer's block attention 3.69 -> 2.71 ms forward
# plus backward (range_check.py), the loop's step 110.9 / 111.0 -> 107.7 / 107.6 ms for BLT-D-4 and
# 139.4 / 138.9 -> 134.2 / 134.3 ms for BLT-D-8, losses equal to bf16 rounding, ~0.1-0.3 GB less
# memory. It applies where the block rows take ranged_block_attention (GPU_RANGE_KERNEL, a fused
# kernel, one device). A cell whose own block's visible cells have a gap (a loss mask with a hole
# inside a block; the pipeline's masks are padding suffixes) makes the output NaN, so such a step
# fails loudly instead of attending the gap.
OWN_BLOCK_IN_KERNEL = True

# Elements per example that block_attention aims at per chunk when it picks the chunk itself (the
# gathered context keys, C * KV * hd per block, and scores, H * B * C per block).
CHUNK_ELEMENTS = 1 << 24


def _attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    k_keys: jax.Array,
    v_keys: jax.Array,
    keys: str,
    visible: jax.Array,
    has_context: jax.Array,
    self_mask: jax.Array,
) -> jax.Array:
    """One softmax over a block row's context scores and its own block's scores.

    ``k_keys``/``v_keys`` are the context keys in einsum subscripts ``keys``: "bqwkd" (a window per
    block) or "bwkd" (one slice shared by the blocks); ``visible`` bool[b, K, B, w] marks the keys
    each cell sees, ``has_context`` bool[b, K, B] whether it sees any. Shapes as block_attention.
    """
    b, r, h, d = q.shape
    nblk, bs = self_mask.shape[1:3]
    kvh = k.shape[2]
    scale = d**-0.5
    qb = q.reshape(b, nblk, bs, kvh, h // kvh, d)
    s_ctx = jnp.einsum(f"bqikgd,{keys}->bkgqiw", qb, k_keys, preferred_element_type=jnp.float32) * scale
    s_ctx = jnp.where(visible[:, None, None], s_ctx, _NEG)
    kb = k.reshape(b, nblk, bs, kvh, d)
    s_own = jnp.einsum("bqikgd,bqjkd->bkgqij", qb, kb, preferred_element_type=jnp.float32) * scale
    s_own = jnp.where(self_mask[:, None, None], s_own, _NEG)

    top = jax.lax.stop_gradient(jnp.maximum(s_ctx.max(axis=-1), s_own.max(axis=-1))[..., None])
    p_ctx = jnp.exp(s_ctx - top)
    p_own = jnp.exp(s_own - top)
    denom = p_ctx.sum(axis=-1, keepdims=True) + p_own.sum(axis=-1, keepdims=True)
    p_ctx = (p_ctx / denom).astype(v.dtype)
    p_own = (p_own / denom).astype(v.dtype)
    out = jnp.einsum(f"bkgqiw,{keys}->bqikgd", p_ctx, v_keys)
    out = out + jnp.einsum("bkgqij,bqjkd->bqikgd", p_own, v.reshape(b, nblk, bs, kvh, d))
    has_key = has_context | jnp.any(self_mask, axis=-1)  # [b, K, B]
    out = jnp.where(has_key[..., None, None, None], out, 0)
    return out.reshape(b, r, h, d).astype(q.dtype)


def context_ranges(
    context_start: jax.Array, context_mask: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Each cell's visible context as one range of clean rows.

    context_start: int32[b, K]; context_mask: bool[b, K, B, C] (DecoderBlocks). Returns lo, hi:
    int32[b, K, B] (the cell sees clean rows lo <= c < hi; lo = hi = 0 for a cell that sees none)
    and a bool scalar: every cell's visible rows are contiguous, as fastblt.train.blt_d.context_mask
    makes them (the first document row, the window and the block's start bound them).
    """
    width = context_mask.shape[-1]
    some = jnp.any(context_mask, axis=-1)
    first = jnp.argmax(context_mask, axis=-1).astype(jnp.int32)
    last = width - jnp.argmax(context_mask[..., ::-1], axis=-1).astype(jnp.int32)  # one past
    count = jnp.sum(context_mask, axis=-1, dtype=jnp.int32)
    contiguous = jnp.all(~some | (count == last - first))
    start = context_start[..., None]
    lo = jnp.where(some, start + first, 0)
    hi = jnp.where(some, start + last, 0)
    return lo, hi, contiguous


def ranged_block_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    k_ctx: jax.Array,
    v_ctx: jax.Array,
    context_start: jax.Array,
    context_mask: jax.Array,
    self_mask: jax.Array,
    interpret: bool | None = None,
) -> jax.Array:
    """block_attention with the context part on fastblt.model.range_attention (shapes as there).

    The kernel attends each cell's range of clean keys where they lie in ``k_ctx``/``v_ctx``. With
    :data:`OWN_BLOCK_IN_KERNEL` it also attends the cell's range of its own block's cells where they
    lie in ``k``/``v`` (the kernel's second key set), in the same softmax; without it XLA attends the
    own block (:func:`own_block_cells`) and the two softmaxes are merged exactly by their
    log-sum-exps. A call whose masks are not ranges returns NaN (the loss fails loudly), as the tiles
    do when their windows do not fit: with the switch on, that includes a cell whose own block's
    visible cells have a gap (a loss mask with a hole inside a block).
    """
    b, r = q.shape[:2]
    nblk, bs = self_mask.shape[1:3]
    lo, hi, contiguous = context_ranges(context_start, context_mask)
    lo, hi = lo.reshape(b, r), hi.reshape(b, r)
    if OWN_BLOCK_IN_KERNEL:
        block_start = jnp.broadcast_to(jnp.arange(nblk, dtype=jnp.int32) * bs, (b, nblk))
        own_lo, own_hi, own_contiguous = context_ranges(block_start, self_mask)
        out, _ = range_attention.range_attention(
            q,
            k_ctx,
            v_ctx,
            lo,
            hi,
            extra=(k, v, own_lo.reshape(b, r), own_hi.reshape(b, r)),
            interpret=interpret,
        )
        return jnp.where(contiguous & own_contiguous, out, jnp.nan).astype(q.dtype)

    out_ctx, lse_ctx = range_attention.range_attention(q, k_ctx, v_ctx, lo, hi, interpret=interpret)
    out_own, lse_own = own_block_cells(q, k, v, self_mask)
    lse = jnp.logaddexp(lse_ctx, lse_own)
    w_ctx = jnp.exp(lse_ctx - lse)[..., None]
    w_own = jnp.exp(lse_own - lse)[..., None]
    out = w_ctx * out_ctx.astype(jnp.float32) + w_own * out_own.astype(jnp.float32)
    return jnp.where(contiguous, out, jnp.nan).astype(q.dtype)


def own_block_cells(
    q: jax.Array, k: jax.Array, v: jax.Array, self_mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Each cell's attention over the cells of its own block that ``self_mask`` allows, as products
    per block (B x B scores).

    These tiny products took 3.9 ms of BLT-D-4's 114.7 ms blt_mid step (train_speed.md run 11). The
    same attention as 64-row products under a block-diagonal mask was no faster (run 12, one H100:
    BLT-D-4 115.9 against 114.5-118.2 ms, BLT-D-8 145.0 against 141.2-142.0 ms, ~1 GB more memory)
    and was removed.

    Args: q float[b, R, H, hd]; k, v float[b, R, KV, hd] (R = K * B); self_mask bool[b, K, B, B].
    Returns out float[b, R, H, hd] in v's dtype (0 where a cell sees no cell) and lse float32[b, R, H]
    (_NEG there), the log-sum-exp of its scores, to merge with another set of keys.
    """
    b, r, h, d = q.shape
    nblk, bs = self_mask.shape[1:3]
    kvh = k.shape[2]
    qb = q.reshape(b, nblk, bs, kvh, h // kvh, d)
    kb, vb = k.reshape(b, nblk, bs, kvh, d), v.reshape(b, nblk, bs, kvh, d)
    s_own = jnp.einsum("bqikgd,bqjkd->bqikgj", qb, kb, preferred_element_type=jnp.float32) * d**-0.5
    own = self_mask[:, :, :, None, None, :]  # [b, K, B, 1, 1, B]
    p_own, lse = _masked_softmax(s_own, own)
    out = jnp.einsum("bqikgj,bqjkd->bqikgd", p_own.astype(v.dtype), vb).reshape(b, r, h, d)
    return out, lse.reshape(b, r, h)


def _masked_softmax(s: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Softmax over the last axis of scores s: float32[..., J] where ``mask`` (broadcast to s) holds,
    and its log-sum-exp: (p float32[..., J], lse float32[...]); a row with no visible key gives
    p = 0 and lse = _NEG."""
    s = jnp.where(mask, s, _NEG)
    top = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    p = jnp.where(mask, jnp.exp(s - top), 0.0)
    den = jnp.sum(p, axis=-1)
    seen = den > 0
    lse = jnp.where(seen, top[..., 0] + jnp.log(jnp.where(seen, den, 1.0)), _NEG)
    return p / jnp.where(seen, den, 1.0)[..., None], lse


def check_patch_bound(lengths: jax.Array, max_patch_length: int | None) -> None:
    """Raises where concrete patch lengths break the bound block rows' tiles are sized from.

    lengths: int[b, P] (reference convention). Every slot but the last (where an overflowing
    buffer merges patches, and after which no block starts) must be at most ``max_patch_length``.
    Traced lengths are not checked (the patcher's obey the bound by construction).
    """
    if max_patch_length is None or isinstance(lengths, jax.core.Tracer):
        return
    inner = np.asarray(lengths)[:, :-1]
    if inner.size and int(inner.max()) > max_patch_length:
        row, slot = np.unravel_index(int(inner.argmax()), inner.shape)
        raise ValueError(
            f"patch_lengths[{row}, {slot}] = {int(inner[row, slot])} exceeds "
            f"model.patcher.max_patch_length={max_patch_length}, which BLT-D's block rows rely on; "
            "patch with the model's patcher (fastblt.model.patcher.patch) or raise the bound"
        )


# Per-example row gather: x float[b, N, ...], i int[b, ...] -> x[b, i[b]].
_take = jax.vmap(lambda x, i: x[i])


def _by_chunk(x: jax.Array, per_block: int, chunk_blocks: int) -> jax.Array:
    """[b, K * per_block, ...] -> [b, chunks, chunk_blocks * per_block, ...], padded at the end with
    blocks that see nothing (their output is 0 and sliced off)."""
    nblk = x.shape[1] // per_block
    chunks = -(-nblk // chunk_blocks)
    x = jnp.pad(x, [(0, 0), (0, (chunks * chunk_blocks - nblk) * per_block)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape(x.shape[0], chunks, chunk_blocks * per_block, *x.shape[2:])


def _windows_fit(offset: jax.Array, context_mask: jax.Array, room: int) -> jax.Array:
    """Every block that sees a context key starts at most ``room`` after its tile's first block.
    offset: int32[..., T]; context_mask: bool[..., T, B, C]. Returns a bool scalar."""
    return jnp.all((offset <= room) | ~jnp.any(context_mask, axis=(-2, -1)))


def _windowed_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    k_ctx: jax.Array,
    v_ctx: jax.Array,
    context_start: jax.Array,
    context_mask: jax.Array,
    self_mask: jax.Array,
) -> jax.Array:
    """block_attention on all the given blocks at once, each block with its gathered window of C
    context keys (shapes as there, R = K * B)."""
    width = context_mask.shape[-1]
    # Padded by C on both sides instead of clipped indices (whose gradient would pile onto row 0):
    # a window starts at most C before the row and at most at its end.
    pad = ((0, 0), (width, width), (0, 0), (0, 0))
    index = context_start[:, :, None] + width + jnp.arange(width, dtype=jnp.int32)
    k_win, v_win = _take(jnp.pad(k_ctx, pad), index), _take(jnp.pad(v_ctx, pad), index)  # [b, K, C, KV, hd]
    has_context = jnp.any(context_mask, axis=-1)
    return _attend(q, k, v, k_win, v_win, "bqwkd", context_mask, has_context, self_mask)


def _tile_visibility(context_mask: jax.Array, offset: jax.Array, span: int) -> jax.Array:
    """Which columns of a tile's shared slice of ``span`` clean keys each cell sees.

    Args: context_mask: bool[..., T, B, C] (each block's own window); offset: int32[..., T], where
    each block's window starts in the slice. Returns bool[..., T, B, span]: column j of the slice is
    column j - offset of its block's window.
    """
    width = context_mask.shape[-1]
    col = jnp.arange(span, dtype=jnp.int32) - offset[..., None]  # [..., T, span]
    inside = (col >= 0) & (col < width)
    index = jnp.clip(col, 0, width - 1)[..., None, :]
    index = jnp.broadcast_to(index, (*context_mask.shape[:-1], span))
    return jnp.take_along_axis(context_mask, index, axis=-1) & inside[..., None, :]


def _tiled_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    k_ctx: jax.Array,
    v_ctx: jax.Array,
    context_start: jax.Array,
    context_mask: jax.Array,
    self_mask: jax.Array,
    span: int,
) -> jax.Array:
    """block_attention on T consecutive blocks that share one slice of ``span`` clean keys.

    The slice starts at the first block's context start; block q's C-wide window sits in it at
    offset ``context_start[q] - context_start[0]``, which must be at most ``span - C`` for every
    block with a visible context key (the caller checks). Each key is read once per tile instead of
    once per block. Shapes as in block_attention, K = T here.
    """
    width = context_mask.shape[-1]
    first = context_start[:, 0]  # [b]
    pad = ((0, 0), (width, span), (0, 0), (0, 0))  # context starts may be negative (row start)

    def window(x, start):
        return jax.lax.dynamic_slice_in_dim(x, start + width, span, axis=0)

    k_tile = jax.vmap(window)(jnp.pad(k_ctx, pad), first)  # [b, span, KV, hd]
    v_tile = jax.vmap(window)(jnp.pad(v_ctx, pad), first)
    visible = _tile_visibility(context_mask, context_start - first[:, None], span)
    has_context = jnp.any(context_mask, axis=-1)
    return _attend(q, k, v, k_tile, v_tile, "bwkd", visible, has_context, self_mask)


def _tiles_in_one_call(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    k_ctx: jax.Array,
    v_ctx: jax.Array,
    context_start: jax.Array,
    context_mask: jax.Array,
    self_mask: jax.Array,
    tile_blocks: int,
    span: int,
    impl: str,
) -> jax.Array:
    """block_attention as one call of the attention core over all tiles at once (for fused kernels).

    Tiles of T = ``tile_blocks`` consecutive blocks become rows of a batch of b * ceil(K / T): the
    tile's T * B cells query the concatenation of its ``span`` clean keys (from its first block's
    context start, as :func:`_tiled_attention`) and its own T * B cells, under one dense mask: each
    cell's window columns, and its own block's cells by ``self_mask`` (the other blocks' cells are
    masked: the diagonal tile the XLA path never forms, here ~T*B / (span + T*B) of the scores).

    Every block's window must fit its tile's span, as it does when patches obey the length bound
    the span was sized from (block_attention's ``max_patch_length``). There is no fallback: a
    conditional on the device would copy its predicate to the host and drain the GPU's queue in
    every layer, forward and backward (~13 ms of a 147 ms BLT-D-4 step at blt_mid, 2026-12-04).
    A call whose windows do not fit returns NaN, so the loss fails loudly instead of reading the
    wrong keys. Shapes as block_attention.
    """
    b, r, h, d = q.shape
    nblk, bs, width = context_mask.shape[1:]
    kvh = k.shape[2]
    t = tile_blocks
    tiles = -(-nblk // t)

    def per_tile(x: jax.Array, per_block: int) -> jax.Array:
        return _by_chunk(x, per_block, t)

    start = per_tile(context_start, 1)  # [b, tiles, T]
    cm = per_tile(context_mask, 1)  # [b, tiles, T, B, C]
    sm = per_tile(self_mask, 1)  # [b, tiles, T, B, B]
    first = start[..., 0]  # [b, tiles]
    offset = start - first[..., None]
    fits = _windows_fit(offset, cm, span - width)

    def one_call() -> jax.Array:
        # Keys padded by C in front (a window may start before the row) and by the span behind, so
        # no start is clamped; rows of the padding are never visible (outside every block's
        # window). Tiles overlap: take_windows adds their gradients without atomic adds (a
        # scatter-add of the overlapping slices took 2.2 ms per layer and K/V at blt_mid).
        pad = ((0, 0), (width, span), (0, 0), (0, 0))
        k_tile = take_windows_batched(jnp.pad(k_ctx, pad), first + width, span).reshape(
            b * tiles, span, kvh, d
        )
        v_tile = take_windows_batched(jnp.pad(v_ctx, pad), first + width, span).reshape(
            b * tiles, span, kvh, d
        )
        ctx = _tile_visibility(cm, offset, span)  # [b, tiles, T, B, span]
        same_block = jnp.eye(t, dtype=bool)[:, None, :, None]  # [T, 1, T, 1]
        own = same_block & sm[..., :, None, :]  # [b, tiles, T, B, T, B]
        mask = jnp.concatenate(
            [ctx.reshape(b * tiles, t * bs, span), own.reshape(b * tiles, t * bs, t * bs)], axis=-1
        )
        keys = jnp.concatenate([k_tile, per_tile(k, bs).reshape(b * tiles, t * bs, kvh, d)], axis=1)
        vals = jnp.concatenate([v_tile, per_tile(v, bs).reshape(b * tiles, t * bs, kvh, d)], axis=1)
        out = attention(per_tile(q, bs).reshape(b * tiles, t * bs, h, d), keys, vals, mask, impl)
        return out.reshape(b, tiles * t * bs, h, d)[:, :r]

    return jnp.where(fits, one_call(), jnp.nan).astype(q.dtype)


def block_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    k_ctx: jax.Array,
    v_ctx: jax.Array,
    context_start: jax.Array,
    context_mask: jax.Array,
    self_mask: jax.Array,
    chunk_blocks: int | None = None,
    max_patch_length: int | None = None,
    impl: str = "xla",
) -> jax.Array:
    """Attention of block rows over their context window of clean keys plus their own block's keys.

    Exact attention, one softmax over two score tiles: each block's B cells x its C gathered clean
    keys, and x its own B cells (the R x R block-to-block tile, almost all masked, is never formed).
    Blocks go ``chunk_blocks`` at a time through ``lax.map`` under ``jax.checkpoint``, so gathered
    keys and scores exist for one chunk at a time, also for the gradient.

    Args:
      q: float[b, R, H, hd] block queries (R = K * B, block-major); k, v: float[b, R, KV, hd].
      k_ctx, v_ctx: float[b, N, KV, hd], the clean rows' keys and values of the same layer.
      context_start: int32[b, K]; context_mask: bool[b, K, B, C]; self_mask: bool[b, K, B, B]
        (see DecoderBlocks).
      chunk_blocks: blocks per chunk; None: tiles spanning about 1.5C with ``max_patch_length``,
        else about CHUNK_ELEMENTS per example and chunk.
      max_patch_length: the patcher's bound on patch lengths, if any. Given, a chunk of T blocks
        (starts at most (T - 1) x max_patch_length apart) reads one shared slice of
        C + (T - 1) x max_patch_length clean keys instead of T gathered windows of C, when that
        span is at most about 2C. The patcher's lengths obey it by construction (only the last
        slot, where a buffer overflow merges patches, may be longer, and no block starts after
        it). On the XLA kernel a tile whose starts are further apart takes the gather path; on
        a fused kernel the bound is a precondition (:func:`_tiles_in_one_call`).
      impl: the attention core's kernel (fastblt.model.attention.resolve_impl). Where it resolves
        to cuDNN with :data:`GPU_RANGE_KERNEL` on (attention.range_kernel_applies), every block runs on
        the key-range kernel (:func:`ranged_block_attention`); else where it resolves to a fused
        kernel, tiled blocks run as one call of the core (:func:`_tiles_in_one_call`);
        the gather path, and every block on the "xla" kernel, stay this module's exact XLA code.

    Returns: float[b, R, H, hd] in q's dtype; a row with no visible key gives 0 (as ``attention``).
    """
    b, r, h, d = q.shape
    nblk, bs, width = context_mask.shape[1:]
    if chunk_blocks is None and max_patch_length:
        # A tile's span grows with its blocks: stop at about 1.5x the window. Scores are then ~1.5x
        # the gathered windows' and each key is read ~1.5x instead of ~C / mean patch length
        # times; at 2x the window the extra scores cost more than the fewer tiles save
        # (experiments/benchmarks/block_attention.py).
        chunk_blocks = width // (2 * max_patch_length) + 1
    elif chunk_blocks is None:
        per_block = width * max(k_ctx.shape[2] * d, h * bs)
        chunk_blocks = max(1, CHUNK_ELEMENTS // per_block)
    chunk_blocks = min(chunk_blocks, nblk)
    tiled = None
    # Tiles pay off while their span stays near the window: a larger given chunk_blocks would
    # compute more scores than the gathered windows do.
    if max_patch_length and (chunk_blocks - 1) * max_patch_length <= width:
        span = width + (chunk_blocks - 1) * max_patch_length

        def tiled(q, k, v, start, cm, sm):
            return jax.lax.cond(
                _windows_fit(start - start[:, :1], cm, span - width),
                lambda: _tiled_attention(q, k, v, k_ctx, v_ctx, start, cm, sm, span),
                lambda: _windowed_attention(q, k, v, k_ctx, v_ctx, start, cm, sm),
            )

    if range_kernel_applies(GPU_RANGE_KERNEL, resolve_impl(impl, q), q, k_ctx):
        return ranged_block_attention(q, k, v, k_ctx, v_ctx, context_start, context_mask, self_mask)
    if tiled is not None:
        tile_q = jax.ShapeDtypeStruct((b, chunk_blocks * bs, h, d), q.dtype)
        if resolve_impl(impl, tile_q) != "xla":
            return _tiles_in_one_call(
                q, k, v, k_ctx, v_ctx, context_start, context_mask, self_mask, chunk_blocks, span, impl
            )

    if chunk_blocks >= nblk:
        if tiled is not None:
            return tiled(q, k, v, context_start, context_mask, self_mask)
        return _windowed_attention(q, k, v, k_ctx, v_ctx, context_start, context_mask, self_mask)

    chunks = -(-nblk // chunk_blocks)

    def split(x: jax.Array, per_block: int) -> jax.Array:
        """[b, K * per_block, ...] -> [chunks, b, chunk_blocks * per_block, ...] (lax.map's axis first)."""
        return jnp.moveaxis(_by_chunk(x, per_block, chunk_blocks), 1, 0)

    @jax.checkpoint
    def one(xs: tuple[jax.Array, ...]) -> jax.Array:
        qc, kc, vc, start, cm, sm = xs
        if tiled is not None:
            return tiled(qc, kc, vc, start, cm, sm)
        return _windowed_attention(qc, kc, vc, k_ctx, v_ctx, start, cm, sm)

    parts = (
        split(q, bs),
        split(k, bs),
        split(v, bs),
        split(context_start, 1),
        split(context_mask, 1),
        split(self_mask, 1),
    )
    out = jax.lax.map(one, parts)
    return jnp.moveaxis(out, 0, 1).reshape(b, chunks * chunk_blocks * bs, h, d)[:, :r]
