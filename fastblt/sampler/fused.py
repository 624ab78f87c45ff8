"""Transformer layers in decode form: each stack's weights fused once per generation.

A one-byte decode step is a chain of matrix-vector products whose cost is launches and weight reads,
not FLOPs. The model's modules (fastblt.model.layers) project q, k and v with three matmuls and the
SwiGLU gate and up with two; here each pair or triple is one matrix (``wqkv = [wq | wk | wv]``,
``w13 = [w1 | w3]``), concatenated and cast to the compute dtype once, outside the sampler's loop.
The layer is the model's own function (fastblt.model.layers.transformer_layer and read_latents), given
these weights through :class:`DecodeLayer` and :class:`DecodeCross`: the same RMSNorm, interleaved
RoPE and SwiGLU, column for column, so greedy generations stay the model's
(tests/test_greedy_identity.py).

Every matmul of a decode step goes through :func:`dot`. On GPUs a one-row product is given a second
(zero) row: XLA rewrites a vector-times-matrix dot whose matrix has under 10M elements (all of the
local models', the entropy model's) into an elementwise multiply and a reduction, which run at a
fraction of the copy bandwidth; two rows keep it a GEMM for cuBLAS (experiments/benchmarks/gemv_rate.py).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fastblt.config import TransformerConfig
from fastblt.model.attention import Attend
from fastblt.model.head_view import HeadView
from fastblt.model.layers import read_latents, rms_norm, rope, swiglu, transformer_layer

# Fewest rows of a GPU matmul in decode form (see the module docstring); 1 turns the padding off.
GPU_MIN_DOT_ROWS = 2


class FusedLayer(NamedTuple):
    """One pre-norm transformer layer's weights (a pytree of arrays)."""

    attn_norm: jax.Array  # float[D] (applied in float32, as RMSNorm)
    wqkv: jax.Array  # [D, (H + 2 KV) * hd], compute dtype
    wo: jax.Array  # [H * hd, D]
    ffn_norm: jax.Array  # float[D]
    w13: jax.Array  # [D, 2 F]
    w2: jax.Array  # [F, D]


def fuse_stack(c: TransformerConfig, params: dict, dtype: jnp.dtype) -> tuple[FusedLayer, ...]:
    """Fused weights of a stack's ``layers_0 .. layers_{L-1}`` (the model's parameter names)."""
    out = []
    for i in range(c.n_layers):
        p = params[f"layers_{i}"]
        a, f = p["attention"], p["feed_forward"]
        cat = lambda *ws: jnp.concatenate([w["kernel"].astype(dtype) for w in ws], axis=1)  # noqa: E731
        out.append(
            FusedLayer(
                attn_norm=p["attention_norm"]["scale"],
                wqkv=cat(a["wq"], a["wk"], a["wv"]),
                wo=a["wo"]["kernel"].astype(dtype),
                ffn_norm=p["ffn_norm"]["scale"],
                w13=cat(f["w1"], f["w3"]),
                w2=f["w2"]["kernel"].astype(dtype),
            )
        )
    return tuple(out)


class Scanned(NamedTuple):
    """A stack's per-layer weights stacked on a leading axis: :func:`run_layers` scans them."""

    layers: Any  # a pytree of [n_layers, ...] arrays


def stack_layers(layers: tuple, scanned: bool) -> tuple | Scanned:
    """Per-layer weights as :func:`run_layers` runs them: unrolled (the tuple) or one scan (stacked)."""
    if not scanned:
        return layers
    return Scanned(jax.tree.map(lambda *xs: jnp.stack(xs), *layers))


def run_layers(layers: tuple | Scanned, body: Callable[[Any, Any, Any], Any], carry: Any) -> Any:
    """``carry = body(i, layer, carry)`` for each layer of a stack, in order.

    A tuple of layers is unrolled (``i`` a Python int); :class:`Scanned` layers run as one
    ``lax.scan`` (``i`` an int32 scalar), so the program holds one copy of the body. Caches the body
    writes travel in ``carry`` (fastblt.sampler.state.write_layer handles both forms).
    """
    if not isinstance(layers, Scanned):
        for i, layer in enumerate(layers):
            carry = body(i, layer, carry)
        return carry
    n = jax.tree.leaves(layers.layers)[0].shape[0]

    def step(c, x):
        return body(x[0], x[1], c), None

    carry, _ = jax.lax.scan(step, carry, (jnp.arange(n, dtype=jnp.int32), layers.layers))
    return carry


def min_rows() -> int:
    """Fewest rows a decode matmul should have here: :data:`GPU_MIN_DOT_ROWS` on a GPU, else 1."""
    return GPU_MIN_DOT_ROWS if jax.default_backend() == "gpu" else 1


def padded_width(batch: int, width: int) -> int:
    """Columns to run a decode call over ``[batch, width]`` new bytes with, so that its matmuls have
    :func:`min_rows` rows without a pad per matmul (the sampler adds inert columns that write nothing)."""
    need = min_rows()
    return width if batch * width >= need else -(-need // batch)


def dot(x: jax.Array, w: jax.Array, at_least: int | None = None) -> jax.Array:
    """``x @ w`` in w's dtype, as ``nn.Dense(dtype=...)`` computes it. x: [..., K]; w: [K, N].

    at_least: products of fewer rows get zero rows added (and cut off after); None: :func:`min_rows`.
    """
    x = x.astype(w.dtype)
    need = min_rows() if at_least is None else at_least
    rows = math.prod(x.shape[:-1])
    if rows >= need:
        return jnp.dot(x, w)
    flat = jnp.pad(x.reshape(rows, x.shape[-1]), ((0, need - rows), (0, 0)))
    return jnp.dot(flat, w)[:rows].reshape(*x.shape[:-1], w.shape[1])


@dataclasses.dataclass(frozen=True)
class DecodeLayer:
    """A :class:`FusedLayer` as fastblt.model.layers.LayerWeights: q|k|v as one product, w1|w3 as
    one product, every product through :func:`dot`."""

    w: FusedLayer
    c: TransformerConfig
    views: bool = False  # normed_qkv gives HeadViews of the product, for an Attend that reads them in place

    def normed_qkv(
        self, h: jax.Array, positions: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """h: float[B, T, D] -> (h, rotated q [B, T, H, hd], k and v [B, T, KV, hd] of RMSNorm(h))."""
        x = rms_norm(h, self.w.attn_norm, self.c.norm_eps)
        b, t, _ = x.shape
        heads, kv, hd = self.c.n_heads, self.c.kv_heads, self.c.head_dim
        y = dot(x, self.w.wqkv).reshape(b, t, heads + 2 * kv, hd)
        # q and k rotated as one array: one RoPE for both.
        qk = rope(y[:, :, : heads + kv], positions, self.c.rope_theta)
        q, k, v = HeadView(qk, 0, heads), HeadView(qk, heads, kv), HeadView(y, heads + kv, kv)
        return (h, q, k, v) if self.views else (h, q.value(), k.value(), v.value())

    def out(self, o: jax.Array) -> jax.Array:
        return dot(o.reshape(*o.shape[:2], -1), self.w.wo)

    def normed_feed_forward(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(h, SwiGLU ``w2(silu(w1 x) * w3 x)`` of x = RMSNorm(h)) with w1 and w3 as one matmul.
        h: float[B, T, D]."""
        gate, up = jnp.split(dot(rms_norm(h, self.w.ffn_norm, self.c.norm_eps), self.w.w13), 2, axis=-1)
        return h, dot(swiglu(gate, up), self.w.w2)


class CrossQuery(NamedTuple):
    """A cross-attention's query side (the keys/values of its slots are cached per patch)."""

    norm_q: jax.Array  # float[D]
    wq: jax.Array  # [D, D]
    wo: jax.Array  # [D, D]


def fuse_cross(params: dict, dtype: jnp.dtype) -> CrossQuery:
    """The query side of a ``CrossAttention``'s params (``cross_attn_norm_q``, ``wq``, ``wo``)."""
    return CrossQuery(
        params["cross_attn_norm_q"]["scale"],
        params["wq"]["kernel"].astype(dtype),
        params["wo"]["kernel"].astype(dtype),
    )


@dataclasses.dataclass(frozen=True)
class DecodeCross:
    """A :class:`CrossQuery` as fastblt.model.layers.CrossWeights."""

    w: CrossQuery
    n_heads: int
    eps: float

    def query(self, x: jax.Array) -> jax.Array:
        q = dot(rms_norm(x, self.w.norm_q, self.eps), self.w.wq)
        return q.reshape(*x.shape[:-1], self.n_heads, -1)

    def out(self, o: jax.Array) -> jax.Array:
        return dot(o.reshape(*o.shape[:-2], -1), self.w.wo)


def cross_attend(cq: CrossQuery, n_heads: int, eps: float, x: jax.Array, k: jax.Array, v: jax.Array):
    """``CrossAttention.gathered`` in decode form (fastblt.model.layers.read_latents), the slots'
    keys/values already gathered: x float[B, T, D] queries over their own slots' keys/values
    [B, T, k, heads, hd]. Returns ``x + wo(attn)`` (the caller adds x once more)."""
    return read_latents(DecodeCross(cq, n_heads, eps), x, k, v)


class Head(NamedTuple):
    """A stack's final norm and output projection."""

    norm: jax.Array  # float[D]
    w: jax.Array  # [D, V]


def fuse_head(norm_params: dict, out_params: dict, dtype: jnp.dtype) -> Head:
    return Head(norm_params["scale"], out_params["kernel"].astype(dtype))


def head_logits(head: Head, eps: float, h: jax.Array) -> jax.Array:
    """float32[B, T, V] logits of h float[B, T, D] (norm, projection, float32 as the model)."""
    return dot(rms_norm(h, head.norm, eps), head.w).astype(jnp.float32)


def layer_step(
    layer: FusedLayer, c: TransformerConfig, h: jax.Array, positions: jax.Array, attend: Attend
) -> tuple[jax.Array, object]:
    """The model's layer (fastblt.model.layers.transformer_layer) on decode-form weights.

    Args: h: float[B, T, D]; positions: int32[B, T] (RoPE); attend(q, k, v) -> (o [B, T, H, hd],
      aux): where the new keys go (a cache write, a concatenation) and what they attend. An attend
      with a true ``takes_head_views`` attribute gets q, k and v as
      fastblt.model.decode_attention.HeadView of the layer's product (fastblt.sampler.cached.cached_attend).
    Returns: (h, aux).
    """
    views = bool(getattr(attend, "takes_head_views", False))
    return transformer_layer(DecodeLayer(layer, c, views), h, positions, attend)
