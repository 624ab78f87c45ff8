"""Transformer layers in decode form: each stack's weights fused once per generation.

A one-byte decode step is a chain of matrix-vector products whose cost is launches and weight reads,
not FLOPs. The model's modules (fastblt.model.layers) project q, k and v with three matmuls and the
SwiGLU gate and up with two; here each pair or triple is one matrix (``wqkv = [wq | wk | wv]``,
``w13 = [w1 | w3]``), concatenated and cast to the compute dtype once, outside the sampler's loop.
The math is the model's (the same RMSNorm, interleaved RoPE and SwiGLU functions), column for column,
so greedy generations stay the model's (tests/test_greedy_identity.py).

Every matmul of a decode step goes through :func:`project` (or :func:`dot`). On GPUs a one-row
product is given a second (zero) row: XLA rewrites a vector-times-matrix dot whose matrix has under
10M elements (all of the local models', the entropy model's) into an elementwise multiply and a
reduction, which run at a fraction of the copy bandwidth; two rows keep it a GEMM for cuBLAS
(experiments/benchmarks/gemv_rate.py).

Where :func:`kernels_on`, the local stacks' (encoder, decoder, entropy model) matrices are stored
transposed (``[N, K]``, each output's weights contiguous) and their few-row products run as one
Pallas kernel each with the RMSNorm before them, the SwiGLU between w13 and w2 and the residual add
fused in (fastblt.sampler.matvec); the global model's large matrices stay with cuBLAS.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import struct

from fastblt.config import TransformerConfig
from fastblt.model.attention import gathered_attention
from fastblt.model.layers import rms_norm, rope
from fastblt.sampler import matvec

# Fewest rows of a GPU matmul in decode form (see the module docstring); 1 turns the padding off.
GPU_MIN_DOT_ROWS = 2
# Fused Pallas products for the local stacks (module docstring): "auto" on GPUs, "off", or "on"
# (also on CPU, through Pallas' interpreter: tests). Off: measured no faster than XLA (run 6).
DECODE_KERNELS = "off"
# Products with more rows go to cuBLAS (experiments/results/generate_speed.md, run 6).
KERNEL_MAX_ROWS = 2


def kernels_on() -> bool:
    """Whether the local stacks' few-row products run as fused Pallas kernels here."""
    if DECODE_KERNELS not in ("auto", "on", "off"):
        raise ValueError(f"fused.DECODE_KERNELS={DECODE_KERNELS!r}: use 'auto', 'on' or 'off'")
    return DECODE_KERNELS == "on" or (DECODE_KERNELS == "auto" and jax.default_backend() == "gpu")


@struct.dataclass
class FusedLayer:
    """One pre-norm transformer layer's weights; matrices ``[K, N]``, or ``[N, K]`` if transposed."""

    attn_norm: jax.Array  # float[D] (applied in float32, as RMSNorm)
    wqkv: jax.Array  # [D, (H + 2 KV) * hd], compute dtype
    wo: jax.Array  # [H * hd, D]
    ffn_norm: jax.Array  # float[D]
    w13: jax.Array  # [D, 2 F]
    w2: jax.Array  # [F, D]
    transposed: bool = struct.field(pytree_node=False, default=False)


def _matrix(w: jax.Array, dtype: jnp.dtype, transposed: bool) -> jax.Array:
    w = w.astype(dtype)
    return w.T if transposed else w


def fuse_stack(
    c: TransformerConfig, params: dict, dtype: jnp.dtype, transposed: bool = False
) -> tuple[FusedLayer, ...]:
    """Fused weights of a stack's ``layers_0 .. layers_{L-1}`` (the model's parameter names);
    ``transposed``: stored for the fused kernels (:func:`kernels_on`)."""
    out = []
    for i in range(c.n_layers):
        p = params[f"layers_{i}"]
        a, f = p["attention"], p["feed_forward"]
        cat = lambda *ws: _matrix(  # noqa: E731
            jnp.concatenate([w["kernel"] for w in ws], axis=1), dtype, transposed
        )
        out.append(
            FusedLayer(
                attn_norm=p["attention_norm"]["scale"],
                wqkv=cat(a["wq"], a["wk"], a["wv"]),
                wo=_matrix(a["wo"]["kernel"], dtype, transposed),
                ffn_norm=p["ffn_norm"]["scale"],
                w13=cat(f["w1"], f["w3"]),
                w2=_matrix(f["w2"]["kernel"], dtype, transposed),
                transposed=transposed,
            )
        )
    return tuple(out)


def min_rows() -> int:
    """Fewest rows a decode matmul should have here: :data:`GPU_MIN_DOT_ROWS` on a GPU, else 1."""
    return GPU_MIN_DOT_ROWS if jax.default_backend() == "gpu" else 1


def padded_width(batch: int, width: int) -> int:
    """Columns to run a decode call over ``[batch, width]`` new bytes with, so that its matmuls have
    :func:`min_rows` rows without a pad per matmul (the sampler adds inert columns that write nothing)."""
    need = min_rows()
    return width if batch * width >= need else -(-need // batch)


def dot(x: jax.Array, w: jax.Array, at_least: int | None = None, transposed: bool = False) -> jax.Array:
    """``x @ w`` in w's dtype, as ``nn.Dense(dtype=...)`` computes it. x: [..., K]; w: [K, N]
    (``[N, K]`` if transposed).

    at_least: products of fewer rows get zero rows added (and cut off after); None: :func:`min_rows`.
    """
    x = x.astype(w.dtype)
    need = min_rows() if at_least is None else at_least
    rows = math.prod(x.shape[:-1])
    n = w.shape[0] if transposed else w.shape[1]
    mm = (
        (lambda a: jax.lax.dot_general(a, w, (((a.ndim - 1,), (1,)), ((), ()))))
        if transposed
        else (lambda a: jnp.dot(a, w))
    )
    if rows >= need:
        return mm(x)
    flat = jnp.pad(x.reshape(rows, x.shape[-1]), ((0, need - rows), (0, 0)))
    return mm(flat)[:rows].reshape(*x.shape[:-1], n)


def project(
    x: jax.Array,
    w: jax.Array,
    transposed: bool = False,
    *,
    norm: jax.Array | None = None,
    eps: float = 0.0,
    swiglu: bool = False,
    residual: jax.Array | None = None,
) -> jax.Array:
    """``prologue(x) @ w (+ residual)``: RMSNorm (``norm``, ``eps``) or SwiGLU (x = ``[gate | up]``)
    first, as the model computes them. One fused kernel (fastblt.sampler.matvec) for a transposed
    matrix and at most :data:`KERNEL_MAX_ROWS` rows; XLA's operations otherwise.

    x: float[..., K] (float[..., 2K] with swiglu); w: [K, N] or, transposed, [N, K];
    residual: float[..., N]. Returns [..., N].
    """
    rows = math.prod(x.shape[:-1])
    if transposed and rows <= KERNEL_MAX_ROWS and kernels_on() and matvec.fits(rows, w, True):
        return matvec.matvec(x, w, norm=norm, eps=eps, swiglu=swiglu, residual=residual, transposed=True)
    if norm is not None:
        x = rms_norm(x, norm, eps)
    if swiglu:
        gate, up = jnp.split(x, 2, axis=-1)
        x = jax.nn.silu(gate) * up
    y = dot(x, w, transposed=transposed)
    return y if residual is None else residual + y


def split_qkv(c: TransformerConfig, y: jax.Array, positions: jax.Array):
    """The fused q|k|v projection y: [B, T, (H + 2 KV) hd] -> rotated q [B, T, H, hd], k and v
    [B, T, KV, hd]."""
    b, t, _ = y.shape
    h, kv, hd = c.n_heads, c.kv_heads, c.head_dim
    qk = rope(y[..., : (h + kv) * hd].reshape(b, t, h + kv, hd), positions, c.rope_theta)
    return qk[:, :, :h], qk[:, :, h:], y[..., (h + kv) * hd :].reshape(b, t, kv, hd)


@struct.dataclass
class CrossQuery:
    """A cross-attention's query side (the keys/values of its slots are cached per patch)."""

    norm_q: jax.Array  # float[D]
    wq: jax.Array  # [D, D]
    wo: jax.Array  # [D, D]
    transposed: bool = struct.field(pytree_node=False, default=False)


def fuse_cross(params: dict, dtype: jnp.dtype, transposed: bool = False) -> CrossQuery:
    """The query side of a ``CrossAttention``'s params (``cross_attn_norm_q``, ``wq``, ``wo``)."""
    return CrossQuery(
        params["cross_attn_norm_q"]["scale"],
        _matrix(params["wq"]["kernel"], dtype, transposed),
        _matrix(params["wo"]["kernel"], dtype, transposed),
        transposed,
    )


def cross_attend(cq: CrossQuery, n_heads: int, eps: float, x: jax.Array, k: jax.Array, v: jax.Array):
    """``CrossAttention.gathered`` in decode form, the slots' keys/values already gathered: x float[B, T, D]
    queries over their own slots' keys/values [B, T, k, heads, hd]. Returns ``x + wo(attn)`` (the
    caller adds x once more)."""
    q = project(x, cq.wq, cq.transposed, norm=cq.norm_q, eps=eps)
    o = gathered_attention(q.reshape(*x.shape[:-1], n_heads, -1), k, v)
    return project(o.reshape(x.shape), cq.wo, cq.transposed, residual=x)


@struct.dataclass
class Head:
    """A stack's final norm and output projection."""

    norm: jax.Array  # float[D]
    w: jax.Array  # [D, V] ([V, D] if transposed)
    transposed: bool = struct.field(pytree_node=False, default=False)


def fuse_head(norm_params: dict, out_params: dict, dtype: jnp.dtype, transposed: bool = False) -> Head:
    return Head(norm_params["scale"], _matrix(out_params["kernel"], dtype, transposed), transposed)


def head_logits(head: Head, eps: float, h: jax.Array) -> jax.Array:
    """float32[B, T, V] logits of h float[B, T, D] (norm, projection, float32 as the model)."""
    return project(h, head.w, head.transposed, norm=head.norm, eps=eps).astype(jnp.float32)


Attend = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, object]]


def layer_step(
    layer: FusedLayer, c: TransformerConfig, h: jax.Array, positions: jax.Array, attend: Attend
) -> tuple[jax.Array, object]:
    """``h + attn(norm(h))`` then ``h + ffn(norm(h))`` (TransformerBlock), attention by ``attend``.

    Args: h: float[B, T, D]; positions: int32[B, T] (RoPE); attend(q, k, v) -> (o [B, T, H, hd],
      aux): where the new keys go (a cache write, a concatenation) and what they attend.
    Returns: (h, aux).
    """
    t, eps = layer.transposed, c.norm_eps
    q, k, v = split_qkv(c, project(h, layer.wqkv, t, norm=layer.attn_norm, eps=eps), positions)
    o, aux = attend(q, k, v)
    h = project(o.reshape(*o.shape[:2], -1), layer.wo, t, residual=h)
    y13 = project(h, layer.w13, t, norm=layer.ffn_norm, eps=eps)
    return project(y13, layer.w2, t, swiglu=True, residual=h), aux
