"""Building blocks shared by every BLT stack: RMSNorm, interleaved RoPE, SwiGLU, and the one
transformer layer that training, BLT-D's block rows, cached decoding and block unmasking all run.

The layer is a pure function, :func:`transformer_layer`: ``h + attn(norm(h))``, then
``h + ffn(norm(h))``. What differs between its callers is passed in, not written again:

* the weights, as a :class:`LayerWeights` (norms, rotated q/k/v projection, output projection,
  SwiGLU): :class:`TransformerBlock` (the Flax module; q, k, v and w1, w3 as separate kernels, as
  the reference stores them) or the sampler's decode form (fastblt.sampler.fused: q|k|v and w1|w3
  concatenated once per generation, one-row products padded to a GEMM);
* the attention, as an ``Attend`` callback ``(q, k, v) -> (out, aux)`` (fastblt.model.attention) that
  says which keys the queries see and where the new keys go, as MaxText's layers take a ``model_mode``:
  :func:`self_attention` (training and prefill: the rows' own keys under a mask or a
  :class:`~fastblt.model.attention.LocalMask` description), ``BlockRows.attention`` (BLT-D's block
  rows: the clean rows' keys of the same layer as extra context, plus their own block),
  ``fastblt.sampler.cached.cached_attend`` (a KV cache written and read) and the block passes of
  ``fastblt.sampler.unmasking`` (the cached clean rows plus the block's own cells).

:func:`read_latents` is the decoder's cross-attention over each row's patch latent, shared the
same way by :class:`CrossAttention` and the sampler.

Parameter names follow the reference (``attention.wq``, ``feed_forward.w1``, ``attention_norm``)
so that conversion is a rename plus a transpose. Parameters are float32; ``dtype`` is the compute
dtype. Every parameter carries logical axis names (see fastblt/sharding.py).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import meta

from fastblt.config import TransformerConfig
from fastblt.model import norm_kernel, prenorm
from fastblt.model.attention import Attend, LocalMask, attention, platform
from fastblt.model.block_rows import BlockRows
from fastblt.model.cross_attention import gathered_attention, latent_attention, segment_attention
from fastblt.model.lookup import take_rows

Dtype = jnp.dtype


def trunc_normal(std: float) -> nn.initializers.Initializer:
    """Truncated normal cut at +-3 std (the reference's ``trunc_normal_(std, a=-3std, b=3std)``)."""
    return nn.initializers.truncated_normal(stddev=std, lower=-3.0, upper=3.0)


def depth_factor(kind: str, layer_idx: int, n_layers: int, dim: int) -> float:
    """The reference's ``init_std_factor``: divides the init std of a layer's projections."""
    if kind == "current_depth":
        return math.sqrt(2 * (layer_idx + 1))
    if kind == "global_depth":
        return math.sqrt(2 * (n_layers + 1))
    if kind == "dim_ratio":
        return dim / 4096
    return 1.0


def dense(features: int, names: tuple[str, str], std: float, dtype: Dtype, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(trunc_normal(std), names),
        name=name,
    )


class Embed(nn.Embed):
    """``nn.Embed`` (same parameter) whose lookup has a collision-free gradient
    (fastblt/model/lookup.py): rows are gathered from the float32 table, then cast."""

    def __call__(self, inputs: jax.Array) -> jax.Array:
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError(f"embedding ids must be integers, got {inputs.dtype}")
        rows = take_rows(self.embedding, inputs.reshape(-1).astype(jnp.int32))
        return rows.reshape(*inputs.shape, self.features).astype(self.dtype or rows.dtype)


def embed(num: int, features: int, names: tuple[str, str], dtype: Dtype, name: str) -> nn.Embed:
    return Embed(
        num,
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        embedding_init=nn.with_logical_partitioning(trunc_normal(features**-0.5), names),
        name=name,
    )


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, scaled in float32, cast back (as the reference)."""

    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],)
        )
        return rms_norm(x, scale, self.eps)


# RMSNorm of training-sized calls as one Pallas kernel per direction on a GPU (fastblt.model.norm_kernel).
# XLA's norm kernels took 7.2 of the 76.8 ms of kernels in a blt_mid step on one H200, 4.5 of it in a
# backward that makes about ten passes over each tensor where six would do
# (experiments/results/train_speed.md, run 9). Off: in run 10 (one H100, speed_gpu.sh phase 28) the
# step moved 91.0 -> 89.8 ms (plain) and 129.6 -> 127.4 (BLT-D-4), but the loop's step 86.2 -> 87.1 ms
# (plain): within one run's noise, not worth a second kernel path. Only when the process has one
# device: XLA's SPMD partitioner cannot split a Pallas call, so a step over a mesh of several devices
# would need it under shard_map.
GPU_FUSED_NORM = False
FUSED_NORM_MIN_ROWS = 1024  # smaller calls (decode steps) stay in XLA's fusions with their neighbours


def one_gpu() -> bool:
    """Whether a Pallas kernel of the layers may run: traced for a GPU, in a process of one device
    (XLA's SPMD partitioner cannot split a Pallas call)."""
    return platform() == "gpu" and jax.device_count() == 1


def use_fused_norm(x: jax.Array) -> bool:
    """The one place that decides whether :func:`rms_norm` of x: float[..., D] runs the kernel."""
    return (
        GPU_FUSED_NORM
        and one_gpu()
        and norm_kernel.supported(x)
        and x.size // x.shape[-1] >= FUSED_NORM_MIN_ROWS
    )


# A layer's two pre-norms with their products (q, k, v; w1, w3) as one op on a GPU whose backward
# reads the products' input gradients unsummed and the residual's gradient in one pass of the norm
# kernel (fastblt.model.prenorm; ~10 passes over the attention norm's tensor -> 6). On: blt_mid's loop
# step 77.5 -> 76.0 ms on one H100 (experiments/results/train_speed.md, run 25); one device only, as
# GPU_FUSED_NORM. Where it applies it takes the pre-norms whole: their forward is XLA's expression even
# with GPU_FUSED_NORM on (that switch then covers the other norms: cross-attention, output).
GPU_NORM_PARTS = True


def use_norm_parts(x: jax.Array) -> bool:
    """The one place that decides whether a layer's pre-norms of x: float[..., D] run as
    fastblt.model.prenorm.norm_products."""
    return (
        GPU_NORM_PARTS
        and one_gpu()
        and norm_kernel.supported(x)
        and x.size // x.shape[-1] >= FUSED_NORM_MIN_ROWS
    )


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm of x: float[..., D] with scale float[D]: float32 inside, x's dtype out."""
    if use_fused_norm(x):
        return norm_kernel.rms_norm(x, scale, eps)
    return norm_kernel.reference_norm(x, scale, eps)[0]  # XLA's expression


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding on interleaved pairs (x[2i], x[2i+1]), computed in float32:
    ``(x0 cos - x1 sin, x0 sin + x1 cos)`` per pair, as the reference.

    Written as ``x * cos + pairs_swapped(x) * (-sin, sin)`` over the whole head: one elementwise pass
    that writes each output element once in order, where stacking the two halves of each pair made
    XLA emit an interleaving concatenation (1.8 ms of a blt_mid step's forward on an H100,
    experiments/results/train_speed.md, run 8).

    Args: x: float[batch, len, heads, head_dim]; positions: int32[batch, len].
    """
    d = x.shape[-1]
    freqs = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    angles = positions.astype(jnp.float32)[:, :, None, None] * freqs  # [b, len, 1, d/2]
    cos = jnp.repeat(jnp.cos(angles), 2, axis=-1)  # [b, len, 1, d]: pair i's at 2i and 2i + 1
    sin = jnp.repeat(jnp.sin(angles), 2, axis=-1) * jnp.tile(jnp.array([-1.0, 1.0], jnp.float32), d // 2)
    x32 = x.astype(jnp.float32)
    swapped = x32.reshape(*x.shape[:-1], d // 2, 2)[..., ::-1].reshape(x.shape)  # (x1, x0) per pair
    return (x32 * cos + swapped * sin).astype(x.dtype)


class LayerWeights(Protocol):
    """What :func:`transformer_layer` needs of a layer's weights (see the module docstring)."""

    def normed_qkv(
        self, h: jax.Array, positions: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """The attention's input: h float[B, T, D] -> (h, q [B, T, H, hd], k and v [B, T, KV, hd]),
        q, k and v projected from RMSNorm(h), q and k rotated (RoPE at positions int32[B, T]). h comes
        back for the residual, so that one op may take both of its gradients."""
        ...

    def out(self, o: jax.Array) -> jax.Array:
        """Output projection: float[B, T, H, hd] -> float[B, T, D]."""
        ...

    def normed_feed_forward(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        """h float[B, T, D] -> (h, SwiGLU ``w2(silu(w1 x) * w3 x)`` of x = RMSNorm(h)), h as in
        :meth:`normed_qkv`."""
        ...


def transformer_layer(
    w: LayerWeights, h: jax.Array, positions: jax.Array, attend: Attend
) -> tuple[jax.Array, Any]:
    """One pre-norm layer: ``h + attn(norm(h))``, then ``h + ffn(norm(h))`` (the reference's
    ``TransformerBlock``), for every stack and every caller.

    Args:
      w: the layer's weights (:class:`LayerWeights`); h: float[B, T, D] the rows' states;
      positions: int32[B, T] their RoPE positions; attend: which keys they see (``Attend``).

    Returns: (h float[B, T, D], attend's aux).
    """
    h, q, k, v = w.normed_qkv(h, positions)
    o, aux = attend(q, k, v)
    h, f = w.normed_feed_forward(h + w.out(o))
    return h + f, aux


def self_attention(mask: jax.Array | LocalMask, impl: str) -> Attend:
    """The rows attend their own keys under ``mask`` (bool[B, T, T] or a LocalMask description),
    as in a training forward or a prefill; aux: the layer's (k, v), the extra context BLT-D's block
    rows read."""

    def attend(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        return attention(q, k, v, mask, impl), (k, v)

    return attend


class SelfAttention(nn.Module):
    """Multi-head (or grouped-query) self-attention's projections, with RoPE (the attention itself
    is the caller's ``Attend``)."""

    config: TransformerConfig
    std: float
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        c = self.config
        self.wq = dense(c.n_heads * c.head_dim, ("embed", "heads"), self.std, self.dtype, "wq")
        self.wk = dense(c.kv_heads * c.head_dim, ("embed", "kv_heads"), self.std, self.dtype, "wk")
        self.wv = dense(c.kv_heads * c.head_dim, ("embed", "kv_heads"), self.std, self.dtype, "wv")
        self.wo = dense(c.dim, ("heads", "embed"), self.std, self.dtype, "wo")

    def qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Projects x: float[b, len, dim] to rotated q [b, len, H, hd] and k, v [b, len, KV, hd]."""
        return self.heads(self.wq(x), self.wk(x), self.wv(x), positions)

    def heads(
        self, q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The projections float[b, len, H * hd] (k, v: KV * hd) split into heads, q and k rotated."""
        c = self.config
        b, t, _ = q.shape
        q = rope(q.reshape(b, t, c.n_heads, c.head_dim), positions, c.rope_theta)
        k = rope(k.reshape(b, t, c.kv_heads, c.head_dim), positions, c.rope_theta)
        return q, k, v.reshape(b, t, c.kv_heads, c.head_dim)

    def out(self, o: jax.Array) -> jax.Array:
        """float[b, len, H, hd] -> float[b, len, dim]."""
        return self.wo(o.reshape(*o.shape[:2], -1))


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """SwiGLU's product ``silu(gate) * up``, float[..., F] each (the reference's forward, op for op).

    Its gradient is one elementwise pass over (gate, up, cotangent) in float32 that writes both
    input gradients. Autodiff of ``silu(gate) * up`` left XLA two passes (the silu gradient's two
    terms and the product's), 2.5 of a blt_mid step's 90 ms in the global model alone on an H100
    (experiments/results/train_speed.md, run 8)."""
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate: jax.Array, up: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    gate, up = res
    # A Pallas kernel writing both gradients in one pass ran no faster than this at blt_mid's and
    # BLT-1B's shapes on an H100 (both at ~2.9 TB/s; train_speed.md run 24), so XLA keeps it.
    a, b, g = gate.astype(jnp.float32), up.astype(jnp.float32), g.astype(jnp.float32)
    s = jax.nn.sigmoid(a)
    d_gate = g * b * (s * (1.0 + a * (1.0 - s)))  # silu'(a) = s + a s (1 - s)
    return d_gate.astype(gate.dtype), (g * (a * s)).astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    dim: int
    hidden: int
    std_in: float
    std_out: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gate = dense(self.hidden, ("embed", "mlp"), self.std_in, self.dtype, "w1")(x)
        up = dense(self.hidden, ("embed", "mlp"), self.std_in, self.dtype, "w3")(x)
        return dense(self.dim, ("mlp", "embed"), self.std_out, self.dtype, "w2")(swiglu(gate, up))


class TransformerBlock(nn.Module):
    """A pre-norm layer's parameters (:class:`LayerWeights` with separate kernels), run by
    :func:`transformer_layer`."""

    config: TransformerConfig
    layer_idx: int
    init_std_factor: str = "current_depth"
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

    def setup(self) -> None:
        c = self.config
        f = depth_factor(self.init_std_factor, self.layer_idx, c.n_layers, c.dim)
        self.attention_norm = RMSNorm(c.norm_eps)
        self.attention = SelfAttention(c, c.dim**-0.5 / f, self.dtype)
        self.ffn_norm = RMSNorm(c.norm_eps)
        self.feed_forward = FeedForward(
            c.dim, c.hidden_dim, c.dim**-0.5 / f, c.hidden_dim**-0.5 / f, self.dtype
        )

    def normed_qkv(
        self, h: jax.Array, positions: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        if not self._norm_parts(h):
            return h, *self.attention.qkv(self.attention_norm(h), positions)
        names = ("wq", "wk", "wv")
        h, qkv = prenorm.norm_products(
            h,
            self._param("attention_norm", "scale"),
            self._kernels("attention", names),
            float(self.config.norm_eps),
        )
        return h, *self.attention.heads(*qkv, positions)

    def out(self, o: jax.Array) -> jax.Array:
        return self.attention.out(o)

    def normed_feed_forward(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        if not self._norm_parts(h):
            return h, self.feed_forward(self.ffn_norm(h))
        w1, w3, w2 = self._kernels("feed_forward", ("w1", "w3", "w2"))
        h, (gate, up) = prenorm.norm_products(
            h, self._param("ffn_norm", "scale"), (w1, w3), float(self.config.norm_eps)
        )
        return h, prenorm.dense_product(swiglu(gate, up), w2)

    def _norm_parts(self, h: jax.Array) -> bool:
        # Initialisation creates the parameters through the submodules; the op reads them after.
        return h.dtype == self.dtype and use_norm_parts(h) and not self.is_initializing()

    def _param(self, *path: str) -> jax.Array:
        """A parameter of this layer by its path under the layer (the submodules' own, unboxed)."""
        value = self.variables["params"]
        for key in path:
            value = value[key]
        return meta.unbox(value)

    def _kernels(self, module: str, names: tuple[str, ...]) -> tuple[jax.Array, ...]:
        """The named ``nn.Dense`` kernels of a submodule, cast to the compute dtype as Dense casts them."""
        return tuple(self._param(module, name, "kernel").astype(self.dtype) for name in names)

    def __call__(
        self,
        h: jax.Array,
        positions: jax.Array,
        mask: jax.Array | LocalMask,
        rows: BlockRows | None = None,
    ) -> jax.Array | tuple[jax.Array, BlockRows]:
        """h: float[b, len, dim]; positions: int32[b, len]; mask: bool[b, len, len] or a LocalMask.

        With ``rows`` (BLT-D's block rows, fastblt/model/block_rows.py) the same weights also run
        the block rows, whose attention reads this layer's keys and values of the clean rows;
        returns (h, rows with their new states). The clean rows never read the block rows.
        """
        h, (k, v) = transformer_layer(self, h, positions, self_attention(mask, self.attention_impl))
        if rows is None:
            return h
        with jax.named_scope("blt_d_blocks"):  # fastblt.profiling's component of the block rows
            hb, _ = transformer_layer(self, rows.h, rows.positions, rows.attention(k, v, self.attention_impl))
        return h, rows.replace(h=hb)


def remat_policy(name: str) -> Any:
    """The ``jax.checkpoint`` policy of a ``model.remat_policy`` name (fastblt.config.REMAT_POLICIES)."""
    policies = {"full": None, "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
    if name not in policies:
        raise ValueError(f"model.remat_policy={name!r} is not one of {sorted(policies)}")
    return policies[name]


def block_class(remat: bool, policy: str = "full") -> type[TransformerBlock]:
    """TransformerBlock, or its rematerialised form (same parameters, activations recomputed but
    what ``policy`` keeps)."""
    return nn.remat(TransformerBlock, policy=remat_policy(policy)) if remat else TransformerBlock


class CrossWeights(Protocol):
    """The query side of a cross-attention, as :func:`read_latents` needs it."""

    def query(self, x: jax.Array) -> jax.Array:
        """Normed and projected queries: float[B, T, D] -> float[B, T, heads, head_dim]."""
        ...

    def out(self, o: jax.Array) -> jax.Array:
        """Output projection: float[B, T, heads, head_dim] -> float[B, T, D]."""
        ...


def read_latents(w: CrossWeights, x: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """The decoder's cross-attention: each row attends the k slots of the one patch latent it
    reads (fastblt.model.patcher.latent_index), their keys and values already gathered per row.

    Args: x: float[B, T, D] the rows; k, v: float[B, T, k, heads, head_dim].
    Returns ``x + wo(attn)``: the caller adds x once more (the reference's double residual).
    """
    return x + w.out(gathered_attention(w.query(x), k, v))


class CrossAttention(nn.Module):
    """Patch cross-attention (no RoPE). Returns ``x + wo(attn)``: the caller adds x once more,
    which gives the reference's double residual ``2 x + wo(attn)``."""

    dim: int
    n_heads: int
    eps: float
    std: float
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        self.cross_attn_norm_q = RMSNorm(self.eps)
        self.cross_attn_norm_kv = RMSNorm(self.eps)
        self.wq = dense(self.dim, ("embed", "heads"), self.std, self.dtype, "wq")
        self.wk = dense(self.dim, ("embed", "heads"), self.std, self.dtype, "wk")
        self.wv = dense(self.dim, ("embed", "heads"), self.std, self.dtype, "wv")
        self.wo = dense(self.dim, ("heads", "embed"), self.std, self.dtype, "wo")

    def _heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:-1], self.n_heads, self.dim // self.n_heads)

    def kv(self, kv_in: jax.Array) -> tuple[jax.Array, jax.Array]:
        """kv_in: float[b, len, dim] -> k, v: float[b, len, heads, head_dim]."""
        kv_in = self.cross_attn_norm_kv(kv_in)
        return self._heads(self.wk(kv_in)), self._heads(self.wv(kv_in))

    def query(self, x: jax.Array) -> jax.Array:
        """float[..., dim] -> float[..., heads, head_dim]."""
        return self._heads(self.wq(self.cross_attn_norm_q(x)))

    def out(self, o: jax.Array) -> jax.Array:
        """float[..., heads, head_dim] -> float[..., dim]."""
        return self.wo(o.reshape(*o.shape[:-2], self.dim))

    def segmented(
        self, x: jax.Array, kv_in: jax.Array, segment_ids: jax.Array, num_patches: int, impl: str = "xla"
    ) -> jax.Array:
        """The encoder's case: slot queries attend only the bytes of their own patch (exactly a dense
        attention with mask ``segment_ids[t] == s // k``, in memory linear in the row length).

        Args:
          x: float[b, num_patches * k, dim] slot queries (slot s belongs to patch s // k);
          kv_in: float[b, len, dim] byte states; segment_ids: int32[b, len], each byte's patch;
          impl: the attention core's kernel (fastblt.model.cross_attention.segment_attention).
        """
        b, pk, _ = x.shape
        k, v = self.kv(kv_in)
        q = self.query(x).reshape(b, num_patches, pk // num_patches, self.n_heads, -1)
        o = segment_attention(q, k, v, segment_ids, impl)
        return x + self.out(o.reshape(b, pk, self.n_heads, -1))

    def gathered(
        self, x: jax.Array, kv: tuple[jax.Array, jax.Array], index: jax.Array, impl: str = "xla"
    ) -> jax.Array:
        """Each query attends only the k slots of one patch (the decoder's case; the sampler's
        cached form is :func:`read_latents`).

        Args:
          x: float[b, len, dim] queries;
          kv: the slots' keys and values, :meth:`slot_kv` of the float[b, patches, k, dim] slots (once
            per layer where two streams read them: BLT-D's clean and block rows);
          index: int32[b, len], the patch each query reads (fastblt.model.cross_attention.latent_attention);
          impl: the attention core's kernel.
        """
        k, v = kv
        return x + self.out(latent_attention(self.query(x), k, v, index, impl))

    def slot_kv(self, slots: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keys and values of patch slots float[b, patches, k, dim]: [b, patches, k, heads, head_dim]."""
        b, p, kk, d = slots.shape
        k, v = self.kv(slots.reshape(b, p * kk, d))
        return k.reshape(b, p, kk, self.n_heads, -1), v.reshape(b, p, kk, self.n_heads, -1)
