"""Which keys of a local model's self-attention cache a query sees: the sliding window's span on a
buffer of one slot per byte, and the ring caches' slots (fastblt.sampler.state.ring_slots).

A ring of S slots holds byte ``t``'s keys in slot ``t % S``; for a query at position q, slot j holds
the latest position <= q congruent to j (:func:`ring_positions`), so masks and reads are built from
the queries' positions alone, with no bookkeeping of what each slot holds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fastblt.model.attention import document_ids
from fastblt.sampler.state import gather_rows


def window_span(n: int, t: int, window: int | None) -> int | None:
    """Keys a chunk of ``t`` queries can see in a buffer of ``n`` under a sliding ``window``:
    ``window + t - 1``, or None where reading the whole buffer costs about as much (n <= 2 spans)."""
    if window is None:
        return None
    span = window + t - 1
    return span if n > 2 * span else None


def window_start(first_pos: jax.Array, window: int, n: int, span: int) -> jax.Array:
    """int32[batch]: per row, the first of the ``span`` keys (``window_span``) read for queries at
    ``first_pos`` int32[batch] and after. The earliest key such a query sees is ``first_pos -
    window + 1``; the start is clipped so that the ``span`` keys lie in the buffer of ``n``."""
    return jnp.clip(first_pos - (window - 1), 0, n - span)


def ring_positions(pos: jax.Array, slots: int) -> jax.Array:
    """int32[B, T, S]: per query position ``pos`` int32[B, T], the position whose keys slot j of a
    ring of ``slots`` holds for that query: the latest position <= pos in slot j (``pos - ((pos - j)
    mod S)``; negative: none yet). fastblt.sampler.state.ring_slots sizes rings so that every
    position a query can see (pos - window + 1 .. pos) is still in its slot: nothing later has been
    written there."""
    j = jnp.arange(slots, dtype=jnp.int32)
    return pos[:, :, None] - jnp.mod(pos[:, :, None] - j, slots)


def ring_cols(cols: jax.Array, n: int, slots: int) -> jax.Array:
    """The ring slots of byte columns ``cols`` int32[B, T] of a buffer of ``n`` (``n`` and beyond,
    or negative: not written, given as ``slots``); ``cols`` itself where the ring is the buffer."""
    if slots == n:
        return cols
    return jnp.where((cols >= 0) & (cols < n), jnp.mod(cols, slots), slots)


def ring_mask(tokens, qpos, window: int, use_docs: bool, slots: int, rows: int) -> jax.Array:
    """bool[B, T, S]: causal, sliding-window, same-document mask of queries at ``qpos`` int32[B, T]
    over a ring of ``slots`` (tokens int32[B, N]: the byte buffer, for the documents). ``rows``: the
    queries' append width, checked against what the ring was sized for."""
    if window + rows - 1 > slots:
        raise ValueError(
            f"an append of {rows} bytes does not fit a ring of {slots} slots under a {window}-byte window "
            f"(it holds appends of up to {slots - window + 1}): the ring was sized for narrower appends "
            "(fastblt.sampler.state.ring_slots's rows)"
        )
    kpos = ring_positions(qpos, slots)
    mask = (kpos >= 0) & (qpos[:, :, None] - kpos < window)
    if use_docs:
        b, t = qpos.shape
        docs = document_ids(tokens)
        kdoc = jnp.take_along_axis(docs, jnp.clip(kpos, 0, docs.shape[1] - 1).reshape(b, -1), axis=1)
        mask &= kdoc.reshape(b, t, slots) == gather_rows(docs, qpos)[:, :, None]
    return mask


def context_mask(tokens, start, pos, window: int | None, use_docs: bool, slots: int) -> jax.Array:
    """bool[B, T, S]: which slots of a cache of ``slots`` (a ring, or the buffer itself where
    ``slots`` is the buffer's length) cells at ``pos`` int32[B, T] see of the committed prefix before
    ``start`` int32[B] (BLT-D's block: its cells sit past the prefix, so the cache is read as of
    position ``start - 1``): positions < start, in each cell's ``window``, in the prefix's last
    document (tokens int32[B, N]: the byte buffer)."""
    n = tokens.shape[1]
    if slots == n:
        kpos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (start.shape[0], 1, n))
    else:
        kpos = ring_positions((start - 1)[:, None], slots)  # [B, 1, S]
    mask = (kpos >= 0) & (kpos < start[:, None, None])
    if window is not None:
        mask &= pos[:, :, None] - kpos < window
    if use_docs:
        docs = document_ids(tokens)
        kdoc = jnp.take_along_axis(docs, jnp.clip(kpos[:, 0], 0, n - 1), axis=1)  # [B, S]
        mask &= (kdoc == gather_rows(docs, (start - 1)[:, None]))[:, None, :]
    return mask


def window_rows(x: jax.Array, start: jax.Array, span: int, axis: int) -> jax.Array:
    """Per row b, ``span`` entries of ``x[b]`` from ``start[b]`` along ``axis`` (of x[b])."""
    return jax.vmap(lambda xb, sb: jax.lax.dynamic_slice_in_dim(xb, sb, span, axis=axis))(x, start)
