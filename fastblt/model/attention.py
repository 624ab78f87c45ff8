"""The attention entry point and the boolean masks BLT needs.

All attention in the model goes through :func:`attention` (dense keys with a boolean mask) or
:func:`gathered_attention` (each query attends its own small gathered key set: the decoder's k
patch slots). Both give exactly 0 for a query with no visible key, as the reference's
flex-attention does, and never NaN: a NaN in a masked row would leak into other rows through
0 * NaN in later matmuls.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG = -1e30  # finite: an all-masked row stays finite before it is zeroed


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    impl: str = "xla",
) -> jax.Array:
    """Scaled dot-product attention with grouped kv heads.

    Args:
      q: float[batch, q_len, heads, head_dim].
      k, v: float[batch, kv_len, kv_heads, head_dim]; kv_heads divides heads.
      mask: bool[batch, q_len, kv_len] (True = visible).
      impl: "xla" (the reference path: float32 softmax, written here), "cudnn" (the fused cuDNN
        kernel through ``jax.nn.dot_product_attention``; GPU, bf16/fp16 only) or "auto"
        (``jax.nn.dot_product_attention`` choosing cuDNN where it applies, else XLA). A TPU
        Pallas/splash kernel slots in here as another ``impl``.

    Returns:
      float[batch, q_len, heads, head_dim] in q's dtype; rows with no visible key are 0.
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    has_key = jnp.any(mask, axis=-1)[:, :, None, None]  # [b, t, 1, 1]
    if impl == "xla":
        g = h // kv
        qg = q.reshape(b, t, kv, g, d)
        logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
        logits = logits * (d**-0.5)
        logits = jnp.where(mask[:, None, None], logits, _NEG)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, d)
    else:
        out = jax.nn.dot_product_attention(
            q,
            k,
            v,
            mask=mask[:, None],
            implementation="cudnn" if impl == "cudnn" else None,
        )
    return jnp.where(has_key, out, 0).astype(q.dtype)


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


def document_ids(tokens: jax.Array, eos_id: int = 2) -> jax.Array:
    """Document index of each byte: a document ends at (and includes) each EOS.

    Args: tokens: int32[batch, bytes]. Returns: int32[batch, bytes].
    """
    is_eos = (tokens == eos_id).astype(jnp.int32)
    return jnp.cumsum(is_eos, axis=-1) - is_eos


def causal_mask(
    q_pos: jax.Array,
    k_pos: jax.Array,
    window: int | None = None,
    q_doc: jax.Array | None = None,
    k_doc: jax.Array | None = None,
) -> jax.Array:
    """Causal (optionally sliding-window, optionally same-document) mask.

    Key j is visible to query i iff pos_j <= pos_i, pos_i - pos_j < window, and both are in the
    same document. Positions: int32[batch, q_len] / int32[batch, kv_len].

    Returns: bool[batch, q_len, kv_len].
    """
    qp = q_pos[:, :, None]
    kp = k_pos[:, None, :]
    mask = kp <= qp
    if window is not None:
        mask &= qp - kp < window
    if q_doc is not None and k_doc is not None:
        mask &= q_doc[:, :, None] == k_doc[:, None, :]
    return mask
