"""The BLT-D forward: BLT's encoder and global model on the clean bytes, then a decoder that runs the
clean rows exactly as BLT does and, next to them, rows of corrupted blocks (Fast BLT, §3.2.2).

Shapes: b batch, N clean bytes, P patch slots, K blocks (K = P - 1 in training: one per patch after
the BOS patch), B cells per block, R = K * B block rows, D = D_d, H heads, V = 260.

Decoder input rows (the paper's D_0 = Embed([x ; x_block^t])):

* clean row t: the encoder's byte state h_enc[t], as in BLT (the decoder has no token embedding);
* block cell showing its byte x: ``local_encoder.tok_embeddings[x]`` alone. The encoder state of
  that byte, or its hash n-gram embeddings, would mix in the bytes before it, which may be masked
  cells of the same block (a leak), so only the byte's own embedding is used;
* block cell showing [MASK] (and a padding cell, which nobody attends): the learned vector
  ``local_decoder.mask_embedding`` (created when ``model.mask_embedding`` is on).

Each decoder layer runs the clean rows through BLT's own layer code (so clean logits are BLT's
logits), and the block rows through the same weights, with the clean rows' keys and values of that
layer as extra context: a block row attends the clean keys ``context_mask`` allows plus the cells of
its own block that ``self_mask`` allows. The clean stream never reads the block stream.

Memory (per example): the block rows add R * D activations per decoder layer (R = (P - 1) * B, e.g.
4 * N with B = 16 and P ~ N / 4) and the bool[R, N] context mask. Their attention (always this
module's exact XLA two-tile attention, whatever ``attention_impl`` says; the clean rows keep BLT's
attention path) holds H * chunk * N float32 scores at a time, forward and backward (recomputed
per chunk under ``jax.checkpoint``), never the whole H * R * N. See fastblt/diffusion.py for numbers.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fastblt.config import ModelConfig
from fastblt.model import patcher as patching
from fastblt.model.attention import causal_mask, document_ids
from fastblt.model.blt import BLT, patch_has_eos, positions_like
from fastblt.model.layers import SelfAttention, TransformerBlock
from fastblt.sharding import constrain

_BYTES = ("batch", "bytes", "embed")
_NEG = -1e30  # as fastblt.model.attention: finite, so an all-masked row stays finite


class DecoderBlocks(NamedTuple):
    """Corrupted blocks the decoder reads after the clean rows: K blocks of B cells each.

    tokens: int32[b, K, B], byte id of each cell (ignored where ``masked``).
    masked: bool[b, K, B], the cell's input is [MASK] (also set it on padding cells).
    positions: int32[b, K, B], RoPE position of each cell (its byte's index in the row).
    read_patch: int32[b, K], patch whose global output the block's cells cross-attend.
    context_mask: bool[b, K * B, N], clean rows each cell attends (cells in block-major order).
    self_mask: bool[b, K, B, B], cells of its own block each cell attends ([.., query, key]).
    """

    tokens: jax.Array
    masked: jax.Array
    positions: jax.Array
    read_patch: jax.Array
    context_mask: jax.Array
    self_mask: jax.Array


class _QKV(SelfAttention):
    """SelfAttention's q/k/v projections with RoPE on their own (same parameters, same code)."""

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        return self.qkv(x, positions)


class _Out(SelfAttention):
    """SelfAttention's output projection on its own."""

    @nn.compact
    def __call__(self, o: jax.Array) -> jax.Array:
        return self.out(o)


def _attention_modules(model: BLT, layer: TransformerBlock) -> tuple[dict, _QKV, _Out]:
    m = model.config
    args = (m.decoder, 0.0, jnp.dtype(m.dtype), m.attention_impl)
    return {"params": layer.attention.variables["params"]}, _QKV(*args), _Out(*args)


def encode(model: BLT, tokens: jax.Array, patch_lengths: jax.Array) -> dict[str, jax.Array]:
    """BLT's encoder and global model on the clean row (the first half of ``BLT.__call__``).

    Args: tokens: int32[b, N]; patch_lengths: int32[b, P] (reference convention, see BLT).

    Returns: ``h`` float[b, N, D_e] encoder byte states, ``slots`` float[b, P, k, D_d] decoder
      patch slots, ``positions`` int32[b, N], ``mask`` bool[b, N, N] decoder self-attention mask,
      ``read_patch`` int32[b, N] decoder cross-attention patch of each clean row.
    """
    m = model.config
    tokens = tokens.astype(jnp.int32)
    patch_lengths = patch_lengths.astype(jnp.int32)
    n, p = tokens.shape[1], patch_lengths.shape[1]
    if n > m.max_bytes:
        raise ValueError(f"rows of {n} bytes exceed model.max_bytes={m.max_bytes}")

    byte_pos = positions_like(tokens)
    docs = document_ids(tokens) if m.document_masking else None
    enc_mask = causal_mask(byte_pos, byte_pos, m.encoder.window, docs, docs)
    patch_ids = patching.patch_ids_from_lengths(patch_lengths, n)

    h = model.hash_embed(tokens, model.local_encoder.embed_tokens(tokens))
    h = constrain(h, _BYTES)
    h, pe = model.local_encoder(h, byte_pos, enc_mask, patch_ids, p)

    patch_pos = positions_like(patch_lengths)
    pdocs = None
    if m.document_masking:
        ends = patch_has_eos(tokens, patch_ids, p).astype(jnp.int32)
        pdocs = jnp.cumsum(ends, axis=-1) - ends
    g = model.global_transformer(pe, patch_pos, causal_mask(patch_pos, patch_pos, None, pdocs, pdocs))

    dec_mask = enc_mask
    if m.decoder.window != m.encoder.window:
        dec_mask = causal_mask(byte_pos, byte_pos, m.decoder.window, docs, docs)
    return {
        "h": h,
        "slots": model.local_decoder.slots(g),
        "positions": byte_pos,
        "mask": dec_mask,
        "read_patch": patching.decoder_patch_ids_from_lengths(patch_lengths, n),
    }


def block_embeddings(model: BLT, tokens: jax.Array, masked: jax.Array) -> jax.Array:
    """Decoder input of block cells: the byte's encoder token embedding, or the [MASK] vector.

    Args: tokens: int[..., ] byte ids; masked: bool, same shape. Returns float[..., D_d] (compute dtype).
    """
    if not model.config.mask_embedding:
        raise ValueError("BLT-D block rows need model.mask_embedding=True (a learned [MASK] input)")
    dtype = jnp.dtype(model.config.dtype)
    shown = model.local_encoder.embed_tokens(jnp.where(masked, 0, tokens).astype(jnp.int32))
    mask_vec = model.local_decoder.mask_embedding.astype(dtype)
    return jnp.where(masked[..., None], mask_vec, shown.astype(dtype))


# Scores per attention chunk (query rows x clean keys) that block_attention aims at when it picks
# the number of blocks per chunk itself: 2^22 float32 scores per example and head (16 MiB).
CHUNK_SCORES = 1 << 22


def _two_tile_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    k_ctx: jax.Array,
    v_ctx: jax.Array,
    context_mask: jax.Array,
    self_mask: jax.Array,
) -> jax.Array:
    """block_attention on all blocks at once: an R x N and a K x B x B score tile, one softmax."""
    b, r, h, d = q.shape
    nblk, bs = self_mask.shape[1], self_mask.shape[2]
    kvh = k.shape[2]
    g = h // kvh
    scale = d**-0.5
    qg = q.reshape(b, r, kvh, g, d)
    s_ctx = jnp.einsum("brkgd,bnkd->bkgrn", qg, k_ctx, preferred_element_type=jnp.float32) * scale
    s_ctx = jnp.where(context_mask[:, None, None], s_ctx, _NEG)
    qb = q.reshape(b, nblk, bs, kvh, g, d)
    kb = k.reshape(b, nblk, bs, kvh, d)
    s_own = jnp.einsum("bqikgd,bqjkd->bkgqij", qb, kb, preferred_element_type=jnp.float32) * scale
    s_own = jnp.where(self_mask[:, None, None], s_own, _NEG).reshape(b, kvh, g, r, bs)

    top = jnp.maximum(s_ctx.max(axis=-1), s_own.max(axis=-1))[..., None]
    p_ctx = jnp.exp(s_ctx - top)
    p_own = jnp.exp(s_own - top)
    denom = p_ctx.sum(axis=-1, keepdims=True) + p_own.sum(axis=-1, keepdims=True)
    p_ctx = (p_ctx / denom).astype(v.dtype)
    p_own = (p_own / denom).astype(v.dtype).reshape(b, kvh, g, nblk, bs, bs)
    o_ctx = jnp.einsum("bkgrn,bnkd->brkgd", p_ctx, v_ctx)
    o_own = jnp.einsum("bkgqij,bqjkd->bqikgd", p_own, v.reshape(b, nblk, bs, kvh, d))
    out = (o_ctx + o_own.reshape(b, r, kvh, g, d)).reshape(b, r, h, d)
    has_key = jnp.any(context_mask, axis=-1) | jnp.any(self_mask, axis=-1).reshape(b, r)
    return jnp.where(has_key[:, :, None, None], out, 0).astype(q.dtype)


def block_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    k_ctx: jax.Array,
    v_ctx: jax.Array,
    context_mask: jax.Array,
    self_mask: jax.Array,
    chunk_blocks: int | None = None,
) -> jax.Array:
    """Attention of block rows over the clean keys plus their own block's keys (one softmax).

    Exact attention in two score tiles, block rows x clean keys and each block x itself (the
    R x R block-to-block tile, almost all masked, is never formed), merged in one softmax. The
    blocks are processed ``chunk_blocks`` at a time under ``jax.checkpoint`` (``lax.map``): the
    scores held at once, also for the gradient, are b * H * chunk_blocks * B * N float32.

    Args:
      q: float[b, R, H, hd] block queries (R = K * B, block-major); k, v: float[b, R, KV, hd].
      k_ctx, v_ctx: float[b, N, KV, hd], the clean rows' keys and values of the same layer.
      context_mask: bool[b, R, N]; self_mask: bool[b, K, B, B].
      chunk_blocks: blocks per chunk; None: about CHUNK_SCORES / N rows per chunk.

    Returns: float[b, R, H, hd] in q's dtype; a row with no visible key gives 0 (as ``attention``).
    """
    b, r, h, d = q.shape
    nblk, bs = self_mask.shape[1], self_mask.shape[2]
    n = k_ctx.shape[1]
    if chunk_blocks is None:
        chunk_blocks = max(1, CHUNK_SCORES // (n * bs))
    if chunk_blocks >= nblk:
        return _two_tile_attention(q, k, v, k_ctx, v_ctx, context_mask, self_mask)

    chunks = -(-nblk // chunk_blocks)
    pad = chunks * chunk_blocks - nblk  # padding blocks: no visible key, output 0, sliced off

    def split(x: jax.Array, per_block: int) -> jax.Array:
        """[b, K * per_block, ...] -> [chunks, b, chunk_blocks * per_block, ...]."""
        x = jnp.pad(x, [(0, 0), (0, pad * per_block)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape(b, chunks, chunk_blocks * per_block, *x.shape[2:])
        return jnp.moveaxis(x, 1, 0)

    @jax.checkpoint
    def one(xs: tuple[jax.Array, ...]) -> jax.Array:
        qc, kc, vc, cm, sm = xs
        return _two_tile_attention(qc, kc, vc, k_ctx, v_ctx, cm, sm)

    out = jax.lax.map(
        one, (split(q, bs), split(k, bs), split(v, bs), split(context_mask, bs), split(self_mask, 1))
    )
    return jnp.moveaxis(out, 0, 1).reshape(b, chunks * chunk_blocks * bs, h, d)[:, :r]


def _block_layer(
    model: BLT,
    layer: TransformerBlock,
    hb: jax.Array,
    positions: jax.Array,
    k_ctx: jax.Array,
    v_ctx: jax.Array,
    blocks: DecoderBlocks,
    chunk_blocks: int | None,
) -> jax.Array:
    """One decoder transformer block on the block rows (pre-norm attention + SwiGLU, BLT's weights)."""
    variables, qkv, out = _attention_modules(model, layer)
    q, k, v = qkv.apply(variables, layer.attention_norm(hb), positions)
    o = block_attention(q, k, v, k_ctx, v_ctx, blocks.context_mask, blocks.self_mask, chunk_blocks)
    hb = hb + out.apply(variables, o)
    return hb + layer.feed_forward(layer.ffn_norm(hb))


def forward(
    model: BLT,
    tokens: jax.Array,
    patch_lengths: jax.Array,
    blocks: DecoderBlocks,
    chunk_blocks: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The BLT-D training forward on a bound BLT (use :func:`logits` from outside a module).

    ``chunk_blocks``: blocks per block-attention chunk (see :func:`block_attention`).

    Returns: clean logits float32[b, N, V] (exactly BLT's: logits[:, t] predicts byte t + 1) and
      block logits float32[b, K, B, V] (cell logits predict the cell's own byte, unshifted).
    """
    m = model.config
    b, nblk, bs = blocks.tokens.shape
    enc = encode(model, tokens, patch_lengths)
    dec = model.local_decoder
    h, slots, pos, mask, read = enc["h"], enc["slots"], enc["positions"], enc["mask"], enc["read_patch"]

    hb = block_embeddings(model, blocks.tokens, blocks.masked).reshape(b, nblk * bs, -1)
    hb = constrain(hb, _BYTES)
    pos_b = blocks.positions.reshape(b, nblk * bs).astype(jnp.int32)
    read_b = jnp.repeat(blocks.read_patch.astype(jnp.int32), bs, axis=1)
    for i, layer in enumerate(dec.layers):
        if i == 0 or m.decoder.cross_attn_all_layers:
            cross = dec.cross_attn_layers[i]
            h = h + cross.gathered(h, slots, read)
            hb = hb + cross.gathered(hb, slots, read_b)
        variables, qkv, _ = _attention_modules(model, layer)
        _, k_ctx, v_ctx = qkv.apply(variables, layer.attention_norm(h), pos)
        h = constrain(layer(h, pos, mask), _BYTES)
        hb = _block_layer(model, layer, hb, pos_b, k_ctx, v_ctx, blocks, chunk_blocks)
        hb = constrain(hb, _BYTES)

    clean = constrain(dec.output(dec.norm(h)).astype(jnp.float32), ("batch", "bytes", "vocab"))
    block = dec.output(dec.norm(hb)).astype(jnp.float32)
    block = constrain(block, ("batch", "bytes", "vocab")).reshape(b, nblk, bs, -1)
    return clean, block


def logits(
    params: dict,
    config: ModelConfig,
    tokens: jax.Array,
    patch_lengths: jax.Array,
    blocks: DecoderBlocks,
    chunk_blocks: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """:func:`forward` with BLT parameters ``params`` (unboxed tree of ``BLT(config)``)."""
    run = nn.apply(forward, BLT(config))
    return run({"params": params}, tokens, patch_lengths, blocks, chunk_blocks)
