"""CPU stand-ins for the fused (cuDNN) attention kernels, so the fused path's own work (packed
segments, kernel masks, biases, padding, one-call tiles) is tested without a GPU.

Each stand-in computes what the kernel is documented to compute from the kernel's *arguments* alone
(dense masks derived from is_causal/window, or from the packed layout's offsets and lengths), with
the XLA reference attention, so a wrong argument gives a wrong result here too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fastblt.model import attention as attn_lib


def packed_layout_mask(seqlen: jax.Array, offsets: jax.Array, n: int, window: int | None) -> jax.Array:
    """The mask cuDNN's packed layout with PADDING_CAUSAL means: positions of one segment see the
    earlier positions of that segment (and within ``window``); positions in no segment see nothing.

    Args: seqlen int32[b, M], offsets int32[b, M + 1] (-1 past the row's segments). Returns bool[b, n, n].
    """
    idx = jnp.arange(n)
    off, length = offsets[:, :-1, None], seqlen[:, :, None]
    inside = (length >= 0) & (idx >= off) & (idx < off + length)  # [b, M, n]
    seg = jnp.argmax(inside, axis=1)
    valid = jnp.any(inside, axis=1)
    mask = (seg[:, :, None] == seg[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    mask &= idx[None, None, :] <= idx[None, :, None]
    if window is not None:
        mask &= idx[None, :, None] - idx[None, None, :] < window
    return mask


def install(monkeypatch, calls: dict | None = None) -> dict:
    """Replaces the cuDNN entry points the attention core calls; returns a dict counting the calls."""
    calls = {} if calls is None else calls
    real = jax.nn.dot_product_attention

    def dense_stand_in(q, k, v, *, mask=None, is_causal=False, local_window_size=None, implementation=None):
        assert implementation == "cudnn"
        calls["dense"] = calls.get("dense", 0) + 1
        return real(q, k, v, mask=mask, is_causal=is_causal, local_window_size=local_window_size)

    def packed_stand_in(q, k, v, seqlen, offsets, window):
        calls["packed"] = calls.get("packed", 0) + 1
        mask = packed_layout_mask(seqlen, offsets, q.shape[1], window)
        return attn_lib.attention(q, k, v, mask, "xla")

    monkeypatch.setattr(attn_lib.jax.nn, "dot_product_attention", dense_stand_in)
    monkeypatch.setattr(attn_lib, "_cudnn_packed", packed_stand_in)
    return calls
