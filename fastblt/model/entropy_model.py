"""The entropy model: a small causal byte LM whose next-byte entropies place patch boundaries."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fastblt.config import EntropyModelConfig
from fastblt.model.attention import LocalMask, causal_mask, document_ids
from fastblt.model.layers import RMSNorm, TransformerBlock, dense, embed


class EntropyModel(nn.Module):
    """Llama-style byte LM (the reference's ``LMTransformer``): sliding-window causal attention
    restricted to the current document, untied output head, float32 logits."""

    config: EntropyModelConfig
    init_std_factor: str = "current_depth"
    attention_impl: str = "auto"  # the fused kernel on GPUs in bf16 (fastblt.model.attention.resolve_impl)

    @nn.compact
    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """tokens: int32[batch, bytes] -> logits float32[batch, bytes, vocab]."""
        c = self.config
        dtype = jnp.dtype(c.dtype)
        b, n = tokens.shape
        docs = document_ids(tokens) if c.document_masking else None
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
            mask = LocalMask(positions, docs, c.window)  # blockwise: positions are 0..n-1
        else:
            mask = causal_mask(positions, positions, c.window, docs, docs)
        h = embed(c.vocab_size, c.dim, ("vocab", "embed"), dtype, "tok_embeddings")(tokens)
        h = nn.with_logical_constraint(h, ("batch", "bytes", "embed"))
        for i in range(c.n_layers):
            h = TransformerBlock(c, i, self.init_std_factor, dtype, self.attention_impl, name=f"layers_{i}")(
                h, positions, mask
            )
            h = nn.with_logical_constraint(h, ("batch", "bytes", "embed"))
        h = RMSNorm(c.norm_eps, name="norm")(h)
        logits = dense(c.vocab_size, ("embed", "vocab"), c.dim**-0.5, dtype, "output")(h)
        return logits.astype(jnp.float32)
