"""The Byte Latent Transformer: hash-embedded bytes -> local encoder -> global transformer over
patches -> local decoder, with the reference's masks, residuals and initialisation.

Shapes: B batch, N bytes, P patch slots (fixed-shape buffer, zero-length padding at the end),
k = ``cross_attn_k`` slots per patch, D_e/D_d local widths, D_g global width, V = 260.
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from fastblt.config import HashConfig, LocalModelConfig, ModelConfig
from fastblt.model import patcher as patching
from fastblt.model import pool_kernel
from fastblt.model.attention import LocalMask, document_ids
from fastblt.model.block_rows import BlockRows, DecoderBlocks, check_patch_bound
from fastblt.model.entropy_model import EntropyModel
from fastblt.model.hash_embed import all_hash_ids
from fastblt.model.layers import (
    CrossAttention,
    RMSNorm,
    TransformerBlock,
    block_class,
    dense,
    depth_factor,
    embed,
    one_gpu,
    remat_policy,
    trunc_normal,
)
from fastblt.tokenizer import EOS

_BYTES = ("batch", "bytes", "embed")
_PATCHES = ("batch", "patches", "embed")


def positions_like(x: jax.Array) -> jax.Array:
    """int32[batch, len] positions 0..len-1 for x: [batch, len, ...]."""
    return jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])


# The encoder's patch max-pool as one Pallas kernel on a GPU (fastblt.model.pool_kernel): XLA's
# segment_max is a scatter-max, and its derivative a second scatter counting ties, each with atomics
# over every element of the byte states (0.28 + 0.32 ms of a blt_mid step on one H200, run 11), plus
# 0.19 ms of backward gathers. On: blt_mid's loop step 77.5 -> 77.0 ms on one H100, 75.6 with
# GPU_NORM_PARTS (experiments/results/train_speed.md, run 25); one device only.
GPU_POOL_KERNEL = True
POOL_KERNEL_MIN_ROWS = 1024  # bytes in the batch; smaller calls (prefill of a prompt) stay in XLA


def use_pool_kernel(h: jax.Array) -> bool:
    """The one place that decides whether :func:`patch_max_pool` of h: float[B, N, D] runs the kernel."""
    return (
        GPU_POOL_KERNEL
        and one_gpu()
        and pool_kernel.supported(h)
        and h.shape[0] * h.shape[1] >= POOL_KERNEL_MIN_ROWS
    )


def patch_max_pool(h: jax.Array, patch_ids: jax.Array, num_patches: int) -> jax.Array:
    """Max over the bytes of each patch; a patch without bytes gives zeros (as the reference).

    Args: h: float[B, N, D]; patch_ids: int32[B, N], non-decreasing along each row.
    Returns float[B, num_patches, D].
    """
    if use_pool_kernel(h):
        return pool_kernel.patch_max_pool(h, patch_ids, num_patches)
    return xla_patch_max_pool(h, patch_ids, num_patches)


def xla_patch_max_pool(h: jax.Array, patch_ids: jax.Array, num_patches: int) -> jax.Array:
    """:func:`patch_max_pool` as XLA's scatter-max (the reference path; the kernel's oracle)."""
    # Patch ids of a row are sorted (the patcher's cumsum): the scatter may assume it.
    pooled = jax.vmap(
        lambda x, i: jax.ops.segment_max(x, i, num_segments=num_patches, indices_are_sorted=True)
    )(h, patch_ids)
    counts = jax.vmap(lambda i: jnp.bincount(i, length=num_patches))(patch_ids)
    return jnp.where(counts[..., None] > 0, pooled, 0).astype(h.dtype)


def patch_has_eos(tokens: jax.Array, patch_ids: jax.Array, num_patches: int) -> jax.Array:
    """bool[B, P]: the patch holds an EOS byte (it ends a document for the global model)."""
    eos = (tokens == EOS).astype(jnp.int32)
    return jax.vmap(lambda e, i: jax.ops.segment_max(e, i, num_segments=num_patches))(eos, patch_ids) > 0


class HashEmbedding(nn.Module):
    """Sum of the hash n-gram table lookups (one table per function x group size)."""

    config: HashConfig
    dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, base: jax.Array) -> jax.Array:
        """Adds each table's embedding to ``base`` (float[B, N, D]) in the reference's order."""
        ids = all_hash_ids(tokens, self.config)  # [B, N, tables]
        for j in range(self.config.n_tables):
            table = embed(self.config.vocab, self.dim, ("hash_vocab", "embed"), self.dtype, f"table_{j}")
            base = base + table(ids[..., j])
        return base


def local_layers(m: ModelConfig, c: LocalModelConfig) -> list[TransformerBlock]:
    """A local model's transformer layers ``layers_0 ..`` (created in its ``setup``)."""
    dtype = jnp.dtype(m.dtype)
    return [
        block_class(m.remat, m.remat_policy)(
            c, i, m.init_std_factor, dtype, m.attention_impl, name=f"layers_{i}"
        )
        for i in range(c.n_layers)
    ]


def local_cross_layers(m: ModelConfig, c: LocalModelConfig) -> list[CrossAttention]:
    """A local model's patch cross-attentions ``cross_attn_layers_0 ..`` (created in its ``setup``)."""
    return [
        CrossAttention(
            c.dim,
            c.cross_heads,
            c.norm_eps,
            c.dim**-0.5 / depth_factor(m.init_std_factor, i, c.n_cross_layers, c.dim),
            jnp.dtype(m.dtype),
            name=f"cross_attn_layers_{i}",
        )
        for i in range(c.n_cross_layers)
    ]


class LocalEncoder(nn.Module):
    """Byte transformer whose patch slots cross-attend their own bytes."""

    config: ModelConfig

    def setup(self) -> None:
        m = self.config
        c = m.encoder
        dtype = jnp.dtype(m.dtype)
        self.tok_embeddings = embed(m.vocab_size, c.dim, ("vocab", "embed"), dtype, "tok_embeddings")
        self.layers = local_layers(m, c)
        self.patch_embedding_projection = dense(
            c.dim * m.cross_attn_k, ("embed", "patch_embed"), c.dim**-0.5, dtype, "patch_embedding_projection"
        )
        self.cross_attn_layers = local_cross_layers(m, c)

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        return self.tok_embeddings(tokens)

    def _pool(self, h: jax.Array, patch_ids: jax.Array, num_patches: int) -> jax.Array:
        b, _, d = h.shape
        with jax.named_scope("pool"):
            pooled = patch_max_pool(h, patch_ids, num_patches)
        pe = self.patch_embedding_projection(pooled)
        return pe.reshape(b, num_patches * self.config.cross_attn_k, d)

    def __call__(
        self, h: jax.Array, positions: jax.Array, mask: jax.Array, patch_ids: jax.Array, num_patches: int
    ) -> tuple[jax.Array, jax.Array]:
        """Args:
          h: float[B, N, D_e] input embeddings; positions: int32[B, N]; mask: bool[B, N, N] or a
            LocalMask;
          patch_ids: int32[B, N] (patch of each byte); num_patches: P.

        Returns: byte states float[B, N, D_e] and patch states float[B, P, k * D_e].
        """
        m = self.config
        k = m.cross_attn_k
        pe = None
        for i, layer in enumerate(self.layers):
            h = nn.with_logical_constraint(layer(h, positions, mask), _BYTES)
            if i == len(self.layers) - 1 or m.encoder.cross_attn_all_layers:
                if pe is None or m.encoder_repool_every_layer:
                    pe = self._pool(h, patch_ids, num_patches)
                cross = self.cross_attn_layers[i if m.encoder.cross_attn_all_layers else 0]
                pe = nn.with_logical_constraint(
                    pe + cross.segmented(pe, h, patch_ids, num_patches, m.attention_impl), _PATCHES
                )
        return h, pe.reshape(h.shape[0], num_patches, k * h.shape[-1])


class GlobalTransformer(nn.Module):
    """Causal transformer over patches; no embedding table and no final norm."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
        """x: float[B, P, k * D_e]; positions: int32[B, P]; mask: bool[B, P, P] -> float[B, P, D_g]."""
        m = self.config
        c = m.global_model
        dtype = jnp.dtype(m.dtype)
        if m.needs_global_projection:
            proj = dense(
                c.dim, ("patch_embed", "embed"), m.global_input_dim**-0.5, dtype, "token_embedding_projection"
            )
            x = proj(x)
        h = nn.with_logical_constraint(x.astype(dtype), _PATCHES)
        if m.scan_layers and not self.is_initializing():
            return self._scanned(h, positions, mask)
        for i in range(c.n_layers):
            layer = block_class(m.remat, m.remat_policy)(
                c, i, m.init_std_factor, dtype, m.attention_impl, name=f"layers_{i}"
            )
            h = nn.with_logical_constraint(layer(h, positions, mask), _PATCHES)
        return h

    def _scanned(self, h: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
        """The layer loop as ``lax.scan`` over the layers' parameters stacked on a leading axis.

        The parameters keep their per-layer names; they are stacked inside the step, which costs one
        copy of the global weights per step and saves compiling L copies of the block. The products'
        kernels are stacked already cast to the compute dtype (the norms' scales stay float32): each
        ``nn.Dense`` casts its kernel so anyway (a no-op on a cast one) and its gradient reaches the
        float32 parameter through the same cast, so values and gradients are unchanged, but no step of
        the loop casts its layer's weights (in the forward and again in remat's: 5.6 ms of BLT-1B's
        step on one H100, experiments/results/train_speed.md run 25), and the stack and its gradients
        are half the bytes. Unrolled layers keep casting inside remat's checkpoint: cast outside, the
        copies would live from the forward to the backward (2 bytes per global parameter), which is
        what remat is there to save.
        """
        m = self.config
        c = m.global_model
        dtype = jnp.dtype(m.dtype)
        params = nn.meta.unbox(self.variables["params"])

        def stack(path, *xs):
            x = jnp.stack(xs)
            return x.astype(dtype) if path[-1] == jax.tree_util.DictKey("kernel") else x

        stacked = jax.tree_util.tree_map_with_path(stack, *(params[f"layers_{i}"] for i in range(c.n_layers)))
        # Per-layer init scales do not matter here: the block is only applied.
        block = TransformerBlock(c, 0, m.init_std_factor, dtype, m.attention_impl, parent=None)

        def step(h, layer_params):
            out = block.apply({"params": layer_params}, h, positions, mask)
            return nn.with_logical_constraint(out, _PATCHES), None

        if m.remat:
            # prevent_cse=False: inside a scan the loop already keeps XLA from merging the recomputed
            # forward into the first (jax.checkpoint's documentation).
            step = jax.checkpoint(step, policy=remat_policy(m.remat_policy), prevent_cse=False)
        h, _ = jax.lax.scan(step, h, stacked)
        return h


class LocalDecoder(nn.Module):
    """Byte transformer that reads the k slots of one global patch output per byte."""

    config: ModelConfig

    def setup(self) -> None:
        m = self.config
        c = m.decoder
        dtype = jnp.dtype(m.dtype)
        self.patch_embedding_projection = dense(
            c.dim * m.cross_attn_k,
            ("embed", "patch_embed"),
            m.global_model.dim**-0.5,
            dtype,
            "patch_embedding_projection",
        )
        self.layers = local_layers(m, c)
        self.cross_attn_layers = local_cross_layers(m, c)
        self.norm = RMSNorm(c.norm_eps)
        self.output = dense(m.vocab_size, ("embed", "vocab"), c.dim**-0.5, dtype, "output")
        if m.mask_embedding:
            # BLT-D: the input row of a [MASK]ed block byte (fastblt/model/block_rows.py), float32[D_d].
            self.mask_embedding = self.param(
                "mask_embedding",
                nn.with_logical_partitioning(trunc_normal(c.dim**-0.5), ("embed",)),
                (c.dim,),
            )

    def slots(self, global_out: jax.Array) -> jax.Array:
        """float[B, P, D_g] -> the decoder's patch slots float[B, P, k, D_d]."""
        b, p, _ = global_out.shape
        s = self.patch_embedding_projection(global_out)
        return s.reshape(b, p, self.config.cross_attn_k, self.config.decoder.dim)

    def __call__(
        self,
        h: jax.Array,
        slots: jax.Array,
        read_patch: jax.Array,
        positions: jax.Array,
        mask: jax.Array | LocalMask,
        rows: BlockRows | None = None,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Args:
          h: float[B, T, D_d] byte states from the encoder; slots: float[B, P, k, D_d];
          read_patch: int32[B, T], the patch whose slots each row reads; positions: int32[B, T];
          mask: bool[B, T, T] self-attention mask, or a LocalMask;
          rows: BLT-D's block rows run beside the clean rows (fastblt/model/block_rows.py), or None.

        Returns: logits float32[B, T, V]; with ``rows`` also the rows' logits float32[B, R, V].
        """
        for i, layer in enumerate(self.layers):
            if i == 0 or self.config.decoder.cross_attn_all_layers:
                cross = self.cross_attn_layers[i]
                # One projection of the slots for both streams: computed per stream, XLA merged the
                # two forwards but not their backwards (twice the slots' key and value gradients).
                kv = cross.slot_kv(slots)
                h = h + cross.gathered(h, kv, read_patch, self.config.attention_impl)
                if rows is not None:
                    with jax.named_scope("blt_d_blocks"):
                        rows = rows.replace(
                            h=rows.h + cross.gathered(rows.h, kv, rows.read_patch, self.config.attention_impl)
                        )
            if rows is None:
                h = layer(h, positions, mask)
            else:
                h, rows = layer(h, positions, mask, rows)
                rows = rows.replace(h=nn.with_logical_constraint(rows.h, _BYTES))
            h = nn.with_logical_constraint(h, _BYTES)
        logits = self.logits(h)
        return logits if rows is None else (logits, self.logits(rows.h))

    def logits(self, h: jax.Array) -> jax.Array:
        """float[B, T, D_d] -> float32[B, T, V] (final norm and output projection)."""
        logits = self.output(self.norm(h)).astype(jnp.float32)
        return nn.with_logical_constraint(logits, ("batch", "bytes", "vocab"))


class BLT(nn.Module):
    """The whole model. ``apply({"params": p}, tokens, patch_lengths=None) -> logits``."""

    config: ModelConfig

    def setup(self) -> None:
        m = self.config
        self.hash_embed = HashEmbedding(m.hash, m.encoder.dim, jnp.dtype(m.dtype))
        self.local_encoder = LocalEncoder(m)
        self.global_transformer = GlobalTransformer(m)
        self.local_decoder = LocalDecoder(m)
        if m.entropy_model is not None:
            self.entropy_model = EntropyModel(m.entropy_model, m.init_std_factor, m.attention_impl)

    def entropies(self, tokens: jax.Array) -> jax.Array:
        """Next-byte entropies (nats) of the entropy model: float32[B, N], no gradient."""
        return patching.entropy(jax.lax.stop_gradient(self.entropy_model(tokens)))

    def patch(self, tokens: jax.Array, seq_lens: jax.Array | None = None) -> patching.Patching:
        """Patch lengths from the configured patcher (include_next_token: sum = N + 1 per row)."""
        pc = self.config.patcher
        ent = self.entropies(tokens) if pc.mode == "entropy" else None
        max_patches = pc.max_patches or tokens.shape[1] + 1
        return patching.patch(tokens, ent, pc, max_patches, include_next_token=True, seq_lens=seq_lens)

    def block_inputs(self, tokens: jax.Array, masked: jax.Array) -> jax.Array:
        """BLT-D's decoder input of block cells: the byte's encoder token embedding, or the [MASK]
        vector (fastblt/model/block_rows.py says why).

        Args: tokens: int[...] byte ids; masked: bool, same shape. Returns float[..., D_d] (compute dtype).
        """
        if not self.config.mask_embedding:
            raise ValueError("BLT-D block rows need model.mask_embedding=True (a learned [MASK] input)")
        dtype = jnp.dtype(self.config.dtype)
        shown = self.local_encoder.embed_tokens(jnp.where(masked, 0, tokens).astype(jnp.int32))
        mask_vec = self.local_decoder.mask_embedding.astype(dtype)
        return jnp.where(masked[..., None], mask_vec, shown.astype(dtype))

    def __call__(
        self,
        tokens: jax.Array,
        patch_lengths: jax.Array | None = None,
        blocks: DecoderBlocks | None = None,
        chunk_blocks: int | None = None,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Next-byte logits, and with ``blocks`` BLT-D's block logits.

        Args:
          tokens: int32[B, N] byte ids (byte + 4; BOS 1, EOS 2, pad 0), BOS first.
          patch_lengths: int32[B, P] in the reference convention: lengths[:, 0] == 1 (the BOS
            patch), each row sums to N + 1 (the last patch may be the empty "next byte" patch),
            zero-padded on the right. None: run the entropy model and patcher.
          blocks: BLT-D's corrupted blocks (fastblt/model/block_rows.py), run by the decoder beside
            the clean rows; chunk_blocks: static, see ``block_rows.block_attention``.

        Returns: float32[B, N, V]; logits[:, t] predicts byte t + 1. With ``blocks`` also the block
          logits float32[B, K, B_cells, V] (a cell's logits predict its own byte, unshifted).
        """
        m = self.config
        chex.assert_rank(tokens, 2)
        if tokens.shape[1] > m.max_bytes:
            raise ValueError(
                f"rows of {tokens.shape[1]} bytes exceed model.max_bytes={m.max_bytes}; "
                "shorten the rows or raise model.max_bytes"
            )
        if self.is_initializing() and m.entropy_model is not None:
            self.entropy_model(tokens)  # create its parameters even when lengths are supplied
        if patch_lengths is None:
            patch_lengths = self.patch(tokens).lengths
        chex.assert_rank(patch_lengths, 2)
        chex.assert_equal_shape_prefix([tokens, patch_lengths], 1)
        tokens = tokens.astype(jnp.int32)
        patch_lengths = patch_lengths.astype(jnp.int32)
        n, p = tokens.shape[1], patch_lengths.shape[1]

        byte_pos = positions_like(tokens)
        docs = document_ids(tokens) if m.document_masking else None
        enc_mask = LocalMask(byte_pos, docs, m.encoder.window)
        # Patch of each byte column 0..N (column N: the unseen next byte): the encoder pools bytes
        # 0..N-1 by it, and the decoder's byte t reads the latent its next byte t + 1 implies.
        column_ids = patching.patch_ids_from_lengths(patch_lengths, n + 1)
        patch_ids = column_ids[:, :n]

        h = self.hash_embed(tokens, self.local_encoder.embed_tokens(tokens))
        h = nn.with_logical_constraint(h, _BYTES)
        h, pe = self.local_encoder(h, byte_pos, enc_mask, patch_ids, p)

        patch_pos = positions_like(patch_lengths)
        pdocs = None
        if m.document_masking:
            ends = patch_has_eos(tokens, patch_ids, p).astype(jnp.int32)
            pdocs = jnp.cumsum(ends, axis=-1) - ends
        g = self.global_transformer(pe, patch_pos, LocalMask(patch_pos, pdocs, None))

        dec_mask = LocalMask(byte_pos, docs, m.decoder.window)
        read_patch = patching.latent_index(column_ids[:, 1:])  # decoder_patch_ids_from_lengths
        slots = self.local_decoder.slots(g)
        if blocks is None:
            return self.local_decoder(h, slots, read_patch, byte_pos, dec_mask)
        b, nblk, bs = blocks.tokens.shape
        check_patch_bound(patch_lengths, m.patcher.max_patch_length)
        rows = BlockRows(
            h=nn.with_logical_constraint(
                self.block_inputs(blocks.tokens, blocks.masked).reshape(b, nblk * bs, -1), _BYTES
            ),
            positions=blocks.positions.reshape(b, nblk * bs).astype(jnp.int32),
            read_patch=jnp.repeat(blocks.read_patch.astype(jnp.int32), bs, axis=1),
            context_start=blocks.context_start,
            context_mask=blocks.context_mask,
            self_mask=blocks.self_mask,
            max_patch_length=m.patcher.max_patch_length,
            chunk_blocks=chunk_blocks,
        )
        clean, block = self.local_decoder(h, slots, read_patch, byte_pos, dec_mask, rows)
        return clean, block.reshape(b, nblk, bs, -1)


def blt_d_logits(
    params: dict,
    config: ModelConfig,
    tokens: jax.Array,
    patch_lengths: jax.Array,
    blocks: DecoderBlocks,
    chunk_blocks: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """BLT-D's training forward from an unboxed parameter tree: ``BLT.__call__`` with ``blocks``.

    Returns: clean logits float32[b, N, V] (BLT's) and block logits float32[b, K, B, V].
    """
    return BLT(config).apply({"params": params}, tokens, patch_lengths, blocks, chunk_blocks)


def abstract_params(config: ModelConfig) -> dict:
    """The unboxed parameter tree ``BLT(config).init`` creates, as ShapeDtypeStructs (no memory).

    Parameter shapes do not depend on the row length: 8 bytes in 9 patch slots suffice.
    """
    tokens = jnp.zeros((1, 8), jnp.int32)
    lengths = jnp.ones((1, 9), jnp.int32)
    variables = jax.eval_shape(lambda: BLT(config).init(jax.random.key(0), tokens, lengths))
    return nn.meta.unbox(variables["params"])
