"""Fixed-shape generation state: the byte buffer, patch bookkeeping and every KV cache.

All buffers are left-aligned: byte ``t`` of row ``b`` lives at index ``t`` (its RoPE position), so
rows of different lengths simply stop at different indices and each row carries its own ``length``.
The global cache and the byte buffers are full length (``bytes`` entries per row); sliding windows
and causality are applied with masks built from positions, never by shifting data. The local
models' self-attention caches (entropy model, encoder, decoder) are rings of S = :func:`ring_slots`
slots where S < N: byte ``t``'s keys live in slot ``t % S``, and S is large enough (the window plus
the widest append, minus one) that a slot is only overwritten once no later query can see what it
held (fastblt.sampler.local_cache.ring_positions). Entries at or beyond a row's ``length`` are scratch:
they may hold draft or stale values and are never read (masks hide them) until a later step
overwrites them.

Shapes: B rows, N = ``bytes`` buffer length, P = ``patches`` patch slots (``N + 1`` never overflows:
every patch holds at least one byte, plus the empty "next byte" patch; fastblt.sampler.patch_slots
sizes fewer from the prompts' patches where N + 1 would be large).

A stack's per-layer caches (:data:`Layers`) are a tuple of per-layer arrays where its layers are
unrolled, or one array with the layers on a leading axis where the sampler runs them as one
``lax.scan`` (:func:`scanned_stacks`); :func:`write_layer`, :func:`read_layer` and
:func:`gather_layer_rows` read and write either form, so the loop body is written once.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fastblt.config import ModelConfig, TransformerConfig

# Per-layer caches of one stack: a tuple of [B, N, ...] arrays, or one stacked [n_layers, B, N, ...].
Layers = tuple[jax.Array, ...] | jax.Array


class State(NamedTuple):
    """Everything one generation carries between steps (a pytree of arrays).

    tokens: int32[B, N] byte ids; only ``[:length]`` is committed.
    length: int32[B] committed bytes per row (prompt included, BOS included).
    completed: int32[B] patches whose last byte is committed *and* whose successor has started,
      i.e. patches ``0 .. completed - 1`` have final latents (kept as the decoder's ``dec_ck/dec_cv``).
    entropies: float32[B, N] entropy-model entropies (nats) of committed bytes.
    Per-layer caches are :data:`Layers`: a tuple of the shapes below, or stacked on a leading layer
    axis for a stack the sampler scans (:func:`scanned_stacks`).

    ent_k, ent_v: per entropy-model layer, [B, S, kv_heads, head_dim] (S: its :func:`ring_slots`).
    enc_k, enc_v: per local-encoder layer, [B, S, kv_heads, head_dim].
    enc_h: per encoder cross-attention layer, the byte states it reads: [B, N, D_e] (max-pooling).
    enc_ck, enc_cv: per encoder cross-attention layer, its keys/values of the byte states,
      [B, N, cross_heads, D_e / cross_heads].
    glob_k, glob_v: per global layer, [B, P, kv_heads, head_dim] (one entry per completed patch).
    patch_eos: bool[B, P], the patch holds an EOS (it ends a document for the global model).
    dec_k, dec_v: per local-decoder layer, [B, S, kv_heads, head_dim].
    dec_ck, dec_cv: per decoder cross-attention layer, the keys/values of each patch's k slots,
      [B, P, k, cross_heads, D_d / cross_heads]: written with the latent, so a byte reads its patch's
      instead of projecting the latent again in every layer.
    """

    tokens: jax.Array
    length: jax.Array
    completed: jax.Array
    entropies: jax.Array
    ent_k: Layers
    ent_v: Layers
    enc_k: Layers
    enc_v: Layers
    enc_h: Layers
    enc_ck: Layers
    enc_cv: Layers
    glob_k: Layers
    glob_v: Layers
    patch_eos: jax.Array
    dec_k: Layers
    dec_v: Layers
    dec_ck: Layers
    dec_cv: Layers


def encoder_cross_layers(config: ModelConfig) -> tuple[int, ...]:
    """Encoder layers followed by a cross-attention (the last one, or all of them)."""
    n = config.encoder.n_layers
    return tuple(range(n)) if config.encoder.cross_attn_all_layers else (n - 1,)


def decoder_cross_layers(config: ModelConfig) -> tuple[int, ...]:
    """Decoder layers preceded by a cross-attention (all of them, or the first)."""
    return tuple(range(config.decoder.n_layers)) if config.decoder.cross_attn_all_layers else (0,)


def uses_entropy_model(config: ModelConfig) -> bool:
    return config.patcher.mode == "entropy"


def scanned_stacks(config: ModelConfig) -> frozenset[str]:
    """The stacks ("entropy", "global", "decoder") whose layers the sampler runs as one ``lax.scan``:
    all three with ``config.scan_decode_layers`` (one compiled body per stack), except a decoder
    whose cross-attention precedes only its first layer (its layers differ). The encoder (one layer
    in BLT models) is always unrolled."""
    if not config.scan_decode_layers:
        return frozenset()
    out = {"entropy", "global"}
    if config.decoder.cross_attn_all_layers or config.decoder.n_layers == 1:
        out.add("decoder")
    return frozenset(out)


def _layers(n: int, shape: tuple, dtype: jnp.dtype, stacked: bool) -> Layers:
    if stacked:
        return jnp.zeros((n, *shape), dtype)
    return tuple(jnp.zeros(shape, dtype) for _ in range(n))


def _kv(
    c: TransformerConfig, batch: int, length: int, dtype: jnp.dtype, stacked: bool = False
) -> tuple[Layers, Layers]:
    shape = (batch, length, c.kv_heads, c.head_dim)
    return _layers(c.n_layers, shape, dtype, stacked), _layers(c.n_layers, shape, dtype, stacked)


def ring_slots(n_bytes: int, window: int | None, rows: int | None) -> int:
    """Slots of a local model's self-attention cache: a ring of ``window + rows - 1`` where that is
    shorter than the byte buffer ``n_bytes``, else the buffer (one slot per byte). ``rows``: the most
    bytes one append writes and queries (the prefill chunk, a verification chunk, inert columns);
    None (or no window): the buffer.

    A query at position q sees keys q - window + 1 .. q, all still in their slots as long as no
    position past q + rows - 1 has been written (its slot held q - window or later). That is the
    condition every method keeps: each position written so far, scratch included, lies below the
    lowest query still to come plus ``rows`` (an append of at most ``rows`` bytes from its first
    query; BLT-S's drafts, verified from the next length; BLT-D's blocks, which start at most
    B - 1 bytes before the length)."""
    if window is None or rows is None:
        return n_bytes
    return min(n_bytes, window + rows - 1)


def init_state(
    config: ModelConfig, batch: int, n_bytes: int, n_patches: int, ring_rows: int | None = None
) -> State:
    """An empty state (length 0) with zero-filled buffers.

    Args:
      config: the model config; batch: B; n_bytes: N, the byte buffer; n_patches: P, patch slots;
      ring_rows: the most bytes one append of the generation writes and queries: the local models'
        caches are rings of :func:`ring_slots` (None: one slot per byte).
    """
    dtype = jnp.dtype(config.dtype)
    m = config
    scanned = scanned_stacks(m)

    def slots(c) -> int:
        return ring_slots(n_bytes, c.window, ring_rows)

    if uses_entropy_model(m):
        ent_dtype = jnp.dtype(m.entropy_model.dtype)
        e = m.entropy_model
        ent_k, ent_v = _kv(e, batch, slots(e), ent_dtype, "entropy" in scanned)
    else:
        ent_k, ent_v = (), ()
    enc_k, enc_v = _kv(m.encoder, batch, slots(m.encoder), dtype)
    n_cross = len(encoder_cross_layers(m))
    d_e = m.encoder.dim
    heads = m.encoder.cross_heads
    cross_shape = (batch, n_bytes, heads, d_e // heads)
    glob_k, glob_v = _kv(m.global_model, batch, n_patches, dtype, "global" in scanned)
    dec_k, dec_v = _kv(m.decoder, batch, slots(m.decoder), dtype, "decoder" in scanned)
    dh = m.decoder.cross_heads
    slot_shape = (batch, n_patches, m.cross_attn_k, dh, m.decoder.dim // dh)
    n_dec_cross = len(decoder_cross_layers(m))
    return State(
        tokens=jnp.zeros((batch, n_bytes), jnp.int32),
        length=jnp.zeros((batch,), jnp.int32),
        completed=jnp.zeros((batch,), jnp.int32),
        entropies=jnp.zeros((batch, n_bytes), jnp.float32),
        ent_k=ent_k,
        ent_v=ent_v,
        enc_k=enc_k,
        enc_v=enc_v,
        enc_h=tuple(jnp.zeros((batch, n_bytes, d_e), dtype) for _ in range(n_cross)),
        enc_ck=tuple(jnp.zeros(cross_shape, dtype) for _ in range(n_cross)),
        enc_cv=tuple(jnp.zeros(cross_shape, dtype) for _ in range(n_cross)),
        glob_k=glob_k,
        glob_v=glob_v,
        patch_eos=jnp.zeros((batch, n_patches), bool),
        dec_k=dec_k,
        dec_v=dec_v,
        dec_ck=_layers(n_dec_cross, slot_shape, dtype, "decoder" in scanned),
        dec_cv=_layers(n_dec_cross, slot_shape, dtype, "decoder" in scanned),
    )


def scatter_rows(buffer: jax.Array, cols: jax.Array, values: jax.Array) -> jax.Array:
    """``buffer[b, cols[b, j]] = values[b, j]``; columns out of range (the "skip" marker) are dropped.

    Args: buffer: [B, L, ...]; cols: int32[B, T]; values: [B, T, ...].
    """
    rows = jnp.arange(buffer.shape[0])[:, None]
    return buffer.at[rows, cols].set(values.astype(buffer.dtype), mode="drop")


def gather_rows(buffer: jax.Array, index: jax.Array) -> jax.Array:
    """``buffer[b, index[b, j]]`` with the index clipped into range. buffer: [B, L, ...]; index: [B, T]."""
    index = jnp.clip(index, 0, buffer.shape[1] - 1)
    return jax.vmap(lambda x, i: x[i])(buffer, index)


def cache_slots(stack: Layers) -> int:
    """Slots per row of a stack's per-layer caches (either form of :data:`Layers`)."""
    return stack[0].shape[1] if isinstance(stack, tuple) else stack.shape[2]


def write_layer(stack: Layers, i: int | jax.Array | slice, cols: jax.Array, values: jax.Array) -> Layers:
    """Layer ``i``'s ``scatter_rows(cache, cols, values)`` in a stack's caches (either form; a
    stacked one is written in place, only at ``cols``). cols: int32[B, T] (out of range: dropped);
    values: [B, T, ...]."""
    if isinstance(stack, tuple):
        return replace_layer(stack, i, scatter_rows(stack[i], cols, values))
    rows = jnp.arange(stack.shape[1])[:, None]
    return stack.at[i, rows, cols].set(values.astype(stack.dtype), mode="drop")


def replace_layer(stack: tuple, i: int, cache: jax.Array) -> tuple:
    """An unrolled stack's caches with layer ``i``'s replaced by ``cache``."""
    return stack[:i] + (cache,) + stack[i + 1 :]


def write_all_layers(stack: jax.Array, cols: jax.Array, values: jax.Array) -> jax.Array:
    """Every layer's ``scatter_rows`` in a stacked stack: values [n_layers, B, T, ...] at ``cols``."""
    return write_layer(stack, slice(None), cols, values)


def read_layer(stack: Layers, i: int | jax.Array) -> jax.Array:
    """Layer ``i``'s cache [B, L, ...] (``i`` may be traced for a stacked one)."""
    if isinstance(stack, tuple):
        return stack[i]
    return jax.lax.dynamic_index_in_dim(stack, i, 0, keepdims=False)


def gather_layer_rows(stack: Layers, i: int | jax.Array, index: jax.Array) -> jax.Array:
    """``gather_rows(read_layer(stack, i), index)`` as one gather (no copy of the layer's cache).
    index: int32[B, T] -> [B, T, ...]."""
    if isinstance(stack, tuple):
        return gather_rows(stack[i], index)
    index = jnp.clip(index, 0, stack.shape[2] - 1)
    return stack[i, jnp.arange(stack.shape[1])[:, None], index]
